"""Several policy services as one: the PolicyPool (issue #16).

Its replicas are a run.policy list or every address of a dns:/// name (policy_endpoints.py),
re-resolved at every push and fresh facts read: scaled-up replicas join, vanished ones leave.

To WeightSync the pool is one policy service (peers.PolicyTransport) with the same rules:
- Its instance id is virtual: stable while at least one replica serves the run's weights
  (is ready), new when none does any more. WeightSync then sees a "restarted" policy and
  pushes everything again: its existing resync path.
- A push goes to every replica in parallel; a replica whose instance is new, restarted or was
  unreachable gets the FULL weights (push_weights' `full`); one already serving the version on
  its known instance is skipped. It succeeds when one replica took it; a replica that failed
  is left out until a later push gives it the current weights.
- Generate splits the prompts into contiguous shards, as even as possible, over the ready
  replicas in their order; the shard at prompt offset o is sampled with seed + o. The vLLM
  engine seeds row i with seed + i, so the shards sample what one replica would; the hf engine
  seeds a whole call once, so its samples depend on the split (still reproducible for the same
  replicas). Every shard must come from its replica's known instance at the pool's version,
  else that replica is left out and the shard is redone on another ready one (same seed): a
  step never mixes versions.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from rlhf.logs import ContextLogger
from services.trainer.config import GenerationConfig
from services.trainer.orchestrator.fanout import call_each, even_shards, resolve
from services.trainer.orchestrator.peers import (
    FatalError,
    PeerError,
    PolicyFacts,
    PolicyTransport,
    Pushed,
    Rollout,
    TransientError,
    VersionConflict,
    checked_rollout,
)
from services.trainer.orchestrator.policy_endpoints import PolicyEndpoints
from services.trainer.orchestrator.policy_replica import Replica

log = logging.getLogger("rlhf.trainer.pool")
POOL_THREADS = "policy-pool"
"""Name of the threads that call the replicas at once."""


class PolicyPool:
    """Several policy services that the loop and WeightSync see as one (the module says how)."""

    def __init__(
        self,
        endpoints: PolicyEndpoints,
        connect: Callable[[str], PolicyTransport],
        resolver: Callable[[str], list[str]] = resolve,
    ) -> None:
        """`connect(address)`: one replica's transport (GrpcPolicy; tests pass fakes);
        `resolver`: a dns:/// spec's addresses (socket.getaddrinfo)."""
        self.endpoints = endpoints
        self.address = f"policy pool {endpoints}"
        self.connect = connect
        self.resolver = resolver
        self.log = ContextLogger(log, {"policy": str(endpoints)})
        self._lock = threading.RLock()
        self._replicas: list[Replica] = [Replica(a, connect(a)) for a in endpoints.addresses]
        self._version: int | None = None
        """The pool's weight version (None until the first facts)."""
        self._virtual = uuid.uuid4().hex
        self._had_ready = False
        self._facts: PolicyFacts | None = None
        self.last_replicas = 0
        """How many replicas generated the last rollout."""

    # --- state ---------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version if self._version is not None else 0

    def _ready(self) -> list[Replica]:
        return [r for r in self._replicas if r.ready(self.version)]

    def states(self) -> dict[str, str]:
        """Each replica's state: ready, needs-weights or unreachable."""
        with self._lock:
            return {r.address: r.state(self.version) for r in self._replicas}

    @contextmanager
    def _tracking(self) -> Iterator[None]:
        """Logs every replica whose state the block changed (with its `why`); a pool left
        without a ready replica gets a new virtual instance id (it lost the run's weights)."""
        with self._lock:
            before = {id(r): r.state(self.version) for r in self._replicas}
            yield
            for replica in self._replicas:
                after, was = replica.state(self.version), before.get(id(replica), "new")
                if after == was:
                    continue
                extra = {"replica": replica.address, "state": after, "was": was}
                if after == "ready":
                    again = "re-admitted" if replica.served_run else "admitted"
                    self.log.info(
                        f"policy replica {again}", extra={**extra, "version": self.version}
                    )
                    replica.served_run = True
                else:
                    self.log.warning("policy replica left out", extra={**extra, "why": replica.why})
            self._check_lost()

    def _check_lost(self) -> None:
        if self._ready():
            self._had_ready = True
        elif self._had_ready:
            self._had_ready = False
            self._virtual = uuid.uuid4().hex
            self.log.warning(
                "no policy replica serves this run's weights any more",
                extra={"weight_version": self.version, "instance": self._virtual},
            )

    def _unreachable(self, replica: Replica, err: PeerError) -> None:
        with self._tracking():
            replica.reachable, replica.ours = False, False  # gets everything when it is back
            replica.why = str(err)

    def _observe(self, replica: Replica, instance: str, served: int, why: str) -> None:
        """What an answer of `replica` says: which instance answered, at which version (call
        inside _tracking)."""
        replica.why = why
        if instance != replica.instance:
            if replica.instance:
                replica.why = f"a new instance ({instance}) answered: it restarted"
            replica.instance, replica.attempted = instance, -1
            # The base model as loaded is the run's version 0 (WeightSync's rule).
            replica.ours = self._version == 0 and served == 0
        elif replica.ours and served > max(replica.version, replica.attempted):
            raise FatalError(
                f"policy replica {replica.address} serves weight version {served}, above "
                f"every version this run sent it ({max(replica.version, replica.attempted)}), "
                f"on the instance this run pushed to ({instance}): another writer is "
                "updating it",
                replica.address,
            )
        elif served == replica.attempted != replica.version:
            replica.ours = True  # a push whose answer was lost landed
        replica.version, replica.reachable = served, True

    def _served(self) -> int:
        """The version the pool says it serves: its own while a replica is ready, else the
        highest any reachable replica serves (WeightSync pushes above it or re-pushes)."""
        if self._ready() or self._version is None:
            return self.version
        seen = [r.version for r in self._replicas if r.reachable and r.version >= 0]
        return max(seen, default=self.version)

    # --- membership ------------------------------------------------------------------------------
    def _resolve(self) -> None:
        """A dns:/// spec's replicas now: new addresses join, vanished ones leave."""
        if not self.endpoints.dns:
            return
        try:
            addresses = self.resolver(self.endpoints.dns)
        except OSError as err:
            addresses, reason = [], str(err)
        else:
            reason = "it resolves to no address"
        with self._lock:
            if not addresses:  # keep what is known: a replica that is gone fails its calls
                self.log.warning(
                    "policy DNS name did not resolve", extra={"dns": self.endpoints.dns}
                )
                if not self._replicas:
                    raise TransientError(
                        f"{self.address}: {self.endpoints.dns}: {reason}", self.address
                    )
                return
            known = {r.address: r for r in self._replicas}
            for replica in self._replicas:
                if replica.address not in addresses:
                    self.log.warning(
                        "policy replica left",
                        extra={"replica": replica.address, "dns": self.endpoints.dns},
                    )
                    replica.transport.close()
            self._replicas = [known[a] for a in addresses if a in known] + [
                Replica(a, self.connect(a)) for a in addresses if a not in known
            ]
            for address in addresses:
                if address not in known:
                    self.log.info(
                        "policy replica joined",
                        extra={"replica": address, "dns": self.endpoints.dns},
                    )
            self._check_lost()

    # --- facts -----------------------------------------------------------------------------------
    def facts(self, fresh: bool = False) -> PolicyFacts:
        """Every replica's GetInfo (in parallel; fresh: read again, re-resolving a DNS name):
        they must serve the same model. The instance id and version are the pool's."""
        if self._facts is None or fresh:
            self._refresh()
        assert self._facts is not None
        with self._lock:
            return PolicyFacts(self._facts.model, self._served(), self._facts.dtype, self._virtual)

    def _refresh(self) -> None:
        self._resolve()
        with self._lock:
            replicas = list(self._replicas)

        def info(replica: Replica) -> PolicyFacts | None:
            try:
                return replica.transport.facts(fresh=True)
            except TransientError as err:
                self._unreachable(replica, err)
                return None

        answers = [
            (r, f)
            for r, f in zip(replicas, call_each(info, replicas, POOL_THREADS))
            if f is not None
        ]
        if not answers:
            raise TransientError(f"no replica of the {self.address} answered GetInfo", self.address)
        first, facts = answers[0]
        for replica, other in answers[1:]:
            if (other.model, other.dtype) != (facts.model, facts.dtype):
                raise FatalError(
                    f"policy replicas {first.address} and {replica.address} serve different "
                    f"models: {facts.model} ({facts.dtype}) and {other.model} ({other.dtype})",
                    replica.address,
                )
        with self._lock:
            self._facts = facts
            if self._version is None:  # the first look: no replica was admitted before
                self._begin(answers)
                self._check_lost()
                return
        with self._tracking():
            for replica, other in answers:
                self._observe(replica, other.instance_id, other.weight_version, "GetInfo")

    def _begin(self, answers: list[tuple[Replica, PolicyFacts]]) -> None:
        """The first look: replicas that all serve one version are ready at it (a fresh run
        over base models needs no push); if they disagree, none is (the pool says the highest,
        and WeightSync pushes everything above it)."""
        versions = {facts.weight_version for _, facts in answers}
        agree = len(versions) == 1
        self._version = max(versions)
        for replica, facts in answers:
            replica.instance, replica.version = facts.instance_id, facts.weight_version
            replica.ours = replica.served_run = agree
        self.log.info(
            "policy pool ready" if agree else "policy replicas serve different versions",
            extra={"states": self.states(), "weight_version": self._version},
        )

    # --- generate --------------------------------------------------------------------------------
    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        """The prompts' samples from the ready replicas, in prompt order, all from the pool's
        version; a rollout that WeightSync refuses when no replica is ready (it re-pushes)."""
        with self._lock:
            version, ready = self.version, self._ready()
        if not ready:  # the unreachable may be back, a restarted one may have the weights
            self._refresh()
            with self._lock:
                version, ready = self.version, self._ready()
        pending = even_shards(len(prompts), len(ready))
        done: dict[int, Rollout] = {}
        used: set[str] = set()
        while pending:
            with self._lock:
                ready = self._ready()
            if not ready:
                return self._not_ours()
            # One shard per replica at first; a redone shard goes to the next ready ones.
            jobs = [(shard, ready[i % len(ready)]) for i, shard in enumerate(pending)]
            answers = call_each(
                lambda job: self._shard(job, prompts, gen, seed), jobs, POOL_THREADS
            )
            pending = []
            for (shard, replica), rollout in zip(jobs, answers):
                if rollout is not None and self._is_ours(replica, rollout, version):
                    done[shard[0]] = rollout
                    used.add(replica.address)
                else:
                    pending.append(shard)
        self.last_replicas = len(used)
        parts = [done[offset] for offset in sorted(done)]
        return Rollout(
            query_ids=[q for p in parts for q in p.query_ids],
            response_ids=[r for p in parts for r in p.response_ids],
            response_logprobs=[lp for p in parts for lp in p.response_logprobs],
            response_texts=[t for p in parts for t in p.response_texts],
            weight_version=version,
            instance_id=self._virtual,
        )

    def _shard(
        self,
        job: tuple[tuple[int, int], Replica],
        prompts: list[str],
        gen: GenerationConfig,
        seed: int,
    ) -> Rollout | None:
        """One shard on one replica (None: it failed transiently and is left out)."""
        (start, end), replica = job
        try:
            rollout = replica.transport.generate(prompts[start:end], gen, seed + start)
        except TransientError as err:
            self._unreachable(replica, err)
            return None
        return checked_rollout(rollout, end - start, replica.address)

    def _is_ours(self, replica: Replica, rollout: Rollout, version: int) -> bool:
        """Whether the shard came from the replica's known instance at the pool's version;
        else the replica is left out (the shard is redone elsewhere)."""
        with self._lock:
            if rollout.instance_id == replica.instance and rollout.weight_version == version:
                return replica.ready(version)
        with self._tracking():
            self._observe(
                replica,
                rollout.instance_id,
                rollout.weight_version,
                f"Generate answered from instance {rollout.instance_id} at version "
                f"{rollout.weight_version}, not the pool's {version}",
            )
            replica.ours = False  # it gets everything at the next push
            return False

    def _not_ours(self) -> Rollout:
        """No replica is ready: TransientError when none is reachable (the loop retries),
        else a rollout under the pool's new instance id, which WeightSync takes for a restart
        (it pushes the weights again, in full, then generates again)."""
        with self._lock:
            if not any(r.reachable for r in self._replicas):
                raise TransientError(f"no replica of the {self.address} is reachable", self.address)
            self._check_lost()
            return Rollout([], [], [], [], self._served(), self._virtual)

    # --- push ------------------------------------------------------------------------------------
    def push_weights(
        self,
        tensors: Mapping[str, torch.Tensor],
        version: int,
        full: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ) -> Pushed:
        """`version` to every replica at once; `full()` (default: `tensors`) to each that does
        not hold this run's weights. Succeeds when one replica took it."""
        self._resolve()
        with self._lock:
            skipped = [r for r in self._replicas if r.ready(version)]
            jobs = [(r, not r.ours) for r in self._replicas if r not in skipped]
        everything = (full() if full is not None else tensors) if any(w for _, w in jobs) else {}
        outcomes = call_each(
            lambda job: self._push_one(job[0], everything if job[1] else tensors, version),
            jobs,
            POOL_THREADS,
        )
        return self._pushed(version, skipped, jobs, outcomes)

    def _push_one(
        self, replica: Replica, weights: Mapping[str, torch.Tensor], version: int
    ) -> Pushed | PeerError:
        """One replica's push: what it serves after, or why it did not take it."""
        with self._lock:
            landed_before = replica.attempted == version
            replica.attempted = version
        try:
            return replica.transport.push_weights(weights, version)
        except TransientError as err:
            self._unreachable(replica, err)
            return err
        except VersionConflict as err:
            try:
                now = replica.transport.facts(fresh=True)
            except TransientError as lost:
                self._unreachable(replica, lost)
                return lost
            with self._tracking():
                known = now.instance_id == replica.instance
                if known and landed_before and now.weight_version == version:
                    return Pushed(version, now.instance_id)  # an earlier attempt landed
                if known and replica.ours:
                    raise FatalError(
                        f"policy replica {replica.address} refused weight version {version} "
                        f"({err}) on the instance this run pushed to ({now.instance_id}): "
                        "another writer is updating it",
                        replica.address,
                    ) from None
                self._observe(replica, now.instance_id, now.weight_version, str(err))
            return err

    def _pushed(
        self,
        version: int,
        skipped: list[Replica],
        jobs: list[tuple[Replica, bool]],
        outcomes: list[Pushed | PeerError],
    ) -> Pushed:
        """The push's result from each replica's outcome (push_weights says the rules)."""
        with self._tracking():
            took = list(skipped)
            landed = False
            for (replica, whole), outcome in zip(jobs, outcomes):
                if not isinstance(outcome, Pushed):
                    continue
                # The full weights are right on any instance; a partial push only on the one
                # that holds this run's weights.
                ok = whole or outcome.instance_id == replica.instance
                self._observe(replica, outcome.instance_id, outcome.version, "UpdateWeights")
                replica.ours = ok
                replica.why = "" if ok else "a partial weight push reached a restarted instance"
                if ok:
                    took.append(replica)
                landed = True
            if took or landed:
                # Landed only partially on restarted instances: no replica is ready, the pool
                # has a new instance id, and WeightSync pushes everything as the next version.
                self._version = version
                self.log.info(
                    "weights pushed", extra={"weight_version": version, "took": len(took)}
                )
                return Pushed(version, self._virtual)
            conflicts = [o for o in outcomes if isinstance(o, VersionConflict)]
            reasons = "; ".join(str(o) for o in outcomes) or "no replica"
        if conflicts:
            raise VersionConflict(f"{self.address}: {reasons}", self.address)
        raise TransientError(f"{self.address}: no replica took the push: {reasons}", self.address)

    def close(self) -> None:
        with self._lock:
            for replica in self._replicas:
                replica.transport.close()
