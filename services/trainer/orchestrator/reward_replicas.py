"""One reward source served by several replicas: each step's batch split across them.

The source stays one RewardTransport to the RewardMixer (one name, one weight, one
env/reward/<name> statistic); only how its Score reaches the replicas changes:

  ReplicatedReward  an explicit list (a:1+b:2): one transport per replica. The batch is cut
                    into contiguous, even shards, one per replica, sent in parallel and
                    reassembled in sample order. A shard whose replica fails transiently is
                    redone on the other replicas within the same call (that replica is left out
                    for the rest of the call and tried again at the next); only when every
                    replica failed does the call fail transiently (the loop retries it).
  BalancedReward    dns:///HOST:PORT: ONE transport whose channel gRPC balances itself
                    (round_robin over every address HOST resolves to). The batch is cut into as
                    many shards as HOST resolves to addresses now, sent concurrently on that
                    channel: gRPC, not this module, picks the replica of each shard.

gRPC-free: the transports come from a `connect` callable (gRPC ones from transports.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

from rlhf.defaults import DNS_SCHEME, REPLICA_SEPARATOR
from rlhf.logs import quote
from services.trainer.orchestrator.fanout import call_each, even_shards, resolve
from services.trainer.orchestrator.peers import PeerError, RewardTransport, TransientError
from services.trainer.orchestrator.rewards import RewardError, reward_addresses

log = logging.getLogger("rlhf.trainer.rewards")


def _checked(replica: RewardTransport, prompts: list[str], responses: list[str]) -> list[float]:
    """One shard's scores from `replica`: as many as samples, else RewardError naming it. A
    peer's own errors pass as they are (they name it); any other failure is named here."""
    try:
        scores = list(replica.score(prompts, responses))
    except PeerError:
        raise
    except Exception as err:  # noqa: BLE001 - an in-process replica's own failure
        raise RewardError(
            f"reward replica {replica.address}: {type(err).__name__}: {err}", replica.address
        ) from err
    if len(scores) != len(responses):
        raise RewardError(
            f"reward replica {replica.address} returned {len(scores)} scores for "
            f"{len(responses)} samples",
            replica.address,
        )
    return scores


class ReplicatedReward:
    """An explicit list of replicas of one reward source (see the module's docstring)."""

    def __init__(self, address: str, replicas: Sequence[RewardTransport]) -> None:
        if not replicas:
            raise ValueError("a replicated reward source needs at least one replica")
        self.address = address
        """The source's ADDRESSES text (a:1+b:2), for messages."""
        self.replicas = list(replicas)

    def name(self) -> str:
        """The service name every replica reports (GetInfo of each, in parallel); replicas
        that disagree serve different reward models: RewardError naming both."""
        # The first failure, in replica order, is raised.
        names = call_each(lambda replica: replica.name(), self.replicas, "reward-info")
        first = self.replicas[0]
        for replica, name in zip(self.replicas[1:], names[1:]):
            if name != names[0]:
                raise RewardError(
                    f"reward source {self.address}: replicas {first.address} and "
                    f"{replica.address} serve different reward models ({quote(names[0])} and "
                    f"{quote(name)})",
                    replica.address,
                )
        return names[0]

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One score per sample, in sample order, the batch split across the replicas."""
        bounds = even_shards(len(responses), len(self.replicas))
        results: list[list[float] | None] = [None] * len(bounds)
        pending = list(range(len(bounds)))
        live = list(range(len(self.replicas)))
        failures: list[str] = []
        with ThreadPoolExecutor(len(self.replicas), thread_name_prefix="reward-shard") as pool:
            while pending:
                if not live:
                    raise TransientError(
                        f"every replica of reward source {self.address} failed: "
                        + "; ".join(failures),
                        self.address,
                    )
                # At first shard k goes to replica k; a redone shard to one still live.
                assigned = {k: live[n % len(live)] for n, k in enumerate(pending)}
                futures = {
                    k: pool.submit(_checked, self.replicas[r], prompts[s:e], responses[s:e])
                    for k, r in assigned.items()
                    for s, e in [bounds[k]]
                }
                wait(futures.values())
                pending = []
                for k, future in futures.items():
                    try:
                        results[k] = future.result()
                    except TransientError as err:
                        self._leave_out(assigned[k], live, err)
                        failures.append(str(err))
                        pending.append(k)
                    # Any other error (FatalError: a refusal, a wrong count) fails the call:
                    # it propagates here, naming the replica, as the first one in shard order.
        return [score for shard in results if shard is not None for score in shard]

    def _leave_out(self, index: int, live: list[int], err: TransientError) -> None:
        if index in live:
            live.remove(index)
            log.warning(
                "reward replica left out for this call",
                extra={
                    "source": self.address,
                    "replica": self.replicas[index].address,
                    "error": str(err),
                    "replicas_left": len(live),
                },
            )

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()


def resolved_count(host_port: str) -> int:
    """How many distinct addresses HOST resolves to now (at least 1: a name that does not
    resolve still gets one shard, and gRPC's own resolver says why its call fails)."""
    try:
        return max(1, len(resolve(host_port)))
    except (OSError, UnicodeError):
        return 1


class BalancedReward:
    """A reward source behind one load-balanced channel (see the module's docstring)."""

    def __init__(self, transport: RewardTransport, shards: Callable[[], int]) -> None:
        """`transport`: over ONE channel gRPC balances (round_robin); `shards`: how many
        replicas there are now (resolved_count of the DNS name)."""
        self.transport = transport
        self.address = transport.address
        self.shards = shards

    def name(self) -> str:
        return self.transport.name()

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One score per sample, in sample order: one shard per replica, all in flight at
        once on the one channel so round_robin sends them to different replicas."""
        bounds = even_shards(len(responses), self.shards())
        if len(bounds) <= 1:
            return _checked(self.transport, prompts, responses)
        shards = call_each(
            lambda b: _checked(self.transport, prompts[b[0] : b[1]], responses[b[0] : b[1]]),
            bounds,
            "reward-shard",
        )
        # The first failure in shard order fails the call (a transient one: the loop retries).
        return [score for shard in shards for score in shard]

    def close(self) -> None:
        self.transport.close()


def connect_source(
    address: str,
    connect: Callable[[str], RewardTransport],
    connect_balanced: Callable[[str], RewardTransport],
) -> RewardTransport:
    """The transport of one reward source from its ADDRESSES (EndpointSpec.address):
    `connect(HOST:PORT)` for one service; a ReplicatedReward over `connect` of each address of
    a list; a BalancedReward over `connect_balanced(dns:///HOST:PORT)`. ValueError for
    ADDRESSES of none of these forms."""
    addresses = reward_addresses(address)
    if address.startswith(DNS_SCHEME):
        return BalancedReward(connect_balanced(address), lambda: resolved_count(addresses[0]))
    if REPLICA_SEPARATOR not in address:
        return connect(address)
    replicas: list[RewardTransport] = []
    try:
        for one in addresses:
            replicas.append(connect(one))
    except Exception:
        for replica in replicas:
            replica.close()
        raise
    return ReplicatedReward(address, replicas)
