"""Reward sources and their weighted sum, swappable between steps.

The trainer's reward for a sample is sum_i weight_i * score_i over the endpoints in force.
Each source's scores are kept apart for the statistics (env/reward/<name>). A source that
cannot be reached raises its transport's TransientError (the loop retries the step's scoring);
one that refuses the call, or answers with the wrong count or a non-finite score, fails the
step at once (FatalError, RewardError): nothing is applied for that step.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlhf.defaults import DNS_SCHEME, REPLICA_SEPARATOR
from rlhf.logs import quote
from services.trainer.orchestrator.fanout import split_host_port
from services.trainer.orchestrator.peers import FatalError, PeerError, RewardTransport

MAX_WEIGHT = 1e6
"""Largest |weight| of a reward endpoint: the weighted sum stays far from float overflow."""
MAX_REPLICAS = 16
"""Most addresses one reward source may list (HOST:PORT+HOST:PORT+...)."""
_NAME = re.compile(r"[A-Za-z0-9._:@+-]{0,64}")
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9._:@+-]")


class RewardError(FatalError):
    """A reward source gave an unusable answer, failed its probe, or none is set."""


def _host_port(address: str, text: str) -> str:
    """`address` if it is HOST:PORT, else ValueError quoting `text` (the whole ADDRESSES)."""
    if address.startswith("dns:") or "://" in address:
        raise ValueError(
            f"reward endpoint address {quote(text)}: {DNS_SCHEME}HOST:PORT names a whole source "
            f"alone; it cannot be one of a {REPLICA_SEPARATOR} list"
        )
    try:
        split_host_port(address)
    except ValueError as err:
        raise ValueError(f"reward endpoint address {quote(text)}: {err}") from None
    return address


def reward_addresses(text: str) -> list[str]:
    """The HOST:PORT addresses an ADDRESSES text names: HOST:PORT (one service),
    HOST:PORT+HOST:PORT[+...] (replicas of one source), dns:///HOST:PORT (its HOST:PORT: every
    address HOST resolves to is a replica). Refuses (ValueError) anything else."""
    if text.startswith(DNS_SCHEME) and REPLICA_SEPARATOR not in text:
        return [_host_port(text[len(DNS_SCHEME) :], text)]
    parts = text.split(REPLICA_SEPARATOR)
    if any(not part for part in parts):
        raise ValueError(
            f"reward endpoint address {quote(text)}: an empty replica address (expected "
            f"HOST:PORT, HOST:PORT{REPLICA_SEPARATOR}HOST:PORT... or {DNS_SCHEME}HOST:PORT)"
        )
    if len(parts) > MAX_REPLICAS:
        raise ValueError(
            f"reward endpoint address {quote(text)}: {len(parts)} replicas, at most {MAX_REPLICAS}"
        )
    addresses = [_host_port(part, text) for part in parts]
    twice = sorted({a for a in addresses if addresses.count(a) > 1})
    if twice:
        raise ValueError(f"reward endpoint address {quote(text)}: {quote(twice[0])} listed twice")
    return addresses


@dataclass
class EndpointSpec:
    """One reward source as a user names it: [NAME@]ADDRESSES[=WEIGHT], where ADDRESSES is
    HOST:PORT, HOST:PORT+HOST:PORT[+...] (replicas) or dns:///HOST:PORT (gRPC's round_robin
    over every address of HOST). Its text form (str) parses back to it: run.json and
    checkpoints store it."""

    address: str
    """The ADDRESSES text, as given."""
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        """Refuses (ValueError) ADDRESSES of none of the three forms, a weight that is not
        finite or above MAX_WEIGHT in size, and a name that is not a short plain label (it
        becomes a metric key, env/reward/<name>)."""
        reward_addresses(self.address)
        if not math.isfinite(self.weight) or abs(self.weight) > MAX_WEIGHT:
            raise ValueError(
                f"reward endpoint {quote(self.address)}: weight must be finite and at most "
                f"{MAX_WEIGHT:g} in size, got {self.weight}"
            )
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"reward endpoint name {quote(self.name)}: use at most 64 letters, digits or "
                "._:@+- characters"
            )

    @property
    def addresses(self) -> list[str]:
        """The HOST:PORT of each replica it lists; a dns:/// source: its one HOST:PORT (what
        an allow-list checks)."""
        return reward_addresses(self.address)

    @property
    def balanced(self) -> bool:
        """A dns:///HOST:PORT source: one channel that gRPC balances over HOST's addresses."""
        return self.address.startswith(DNS_SCHEME)

    @property
    def label(self) -> str:
        """The address without its scheme: what a default name is made of."""
        return self.address.removeprefix(DNS_SCHEME)

    @classmethod
    def parse(cls, text: str) -> EndpointSpec:
        """ "host:port", "host:port=0.2", "name@a:1+b:2=0.2" or "name@dns:///host:port"."""
        name, _, rest = text.rpartition("@")
        address, _, weight = rest.partition("=")
        if ":" not in address:
            raise ValueError(f"reward endpoint {quote(text)}: expected ADDRESSES[=WEIGHT]")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(
                f"reward endpoint {quote(text)}: weight {quote(weight)} is not a number"
            ) from None
        return cls(address=address, weight=value, name=name)

    def __str__(self) -> str:
        prefix = f"{self.name}@" if self.name else ""
        return f"{prefix}{self.address}={self.weight:g}"


def _as_name(text: str) -> str:
    """`text` as a valid source name (its text form must parse back on a resume): characters a
    name cannot hold become "_", and it is cut to 64."""
    return _NOT_IN_NAME.sub("_", text)[:64]


@dataclass
class RewardSource:
    spec: EndpointSpec
    transport: RewardTransport

    @property
    def name(self) -> str:
        return self.spec.name


class RewardMixer:
    """The reward sources in force, replaceable atomically between steps.

    Whoever scores a step takes a snapshot of the sources when its scoring starts
    (`begin_step`; lock-step: when the step starts) and scores with it, so a swap applies from
    the first step whose scoring had not begun (`swap` returns it: with run.max_staleness >= 1
    that can be a step or two past the one the learner trains); transports swapped out are
    closed only when no step uses them any more.
    """

    def __init__(self, connect: Callable[[str], RewardTransport]) -> None:
        self.connect = connect
        self._sources: list[RewardSource] = []
        self._retired: list[RewardSource] = []
        self._step_in_progress: int | None = None
        """Between begin_step(N) and end_step(): N; else None."""
        self._begun = 0
        """The last step whose scoring began (a resume: the last its checkpoint holds scored)."""
        self._scheduled: list[tuple[int, list[RewardSource]]] = []
        """(step, probed sources) put in force when that step begins, in step order: a resume
        re-applies the swaps made after its checkpoint from the steps they applied from."""
        self._lock = threading.Lock()

    @property
    def sources(self) -> list[RewardSource]:
        with self._lock:
            return list(self._sources)

    def begin_step(self, step: int) -> list[RewardSource]:
        """The sources for step `step`, which starts now (scheduled ones due by then put in
        force first); closes transports no step uses."""
        with self._lock:
            self._begun = max(self._begun, step)
            while self._scheduled and self._scheduled[0][0] <= step:
                self._retired.extend(self._sources)
                self._sources = self._scheduled.pop(0)[1]
            snapshot, retired = list(self._sources), self._retired
            self._retired = []
            self._step_in_progress = step
            pending = [s for _, sources in self._scheduled for s in sources]
        self._close_unused(retired, snapshot + pending)
        return snapshot

    def schedule(self, sources: list[RewardSource], from_step: int) -> None:
        """Puts probed `sources` in force when step `from_step` begins (a resume's re-applied
        swap). A swap made meanwhile (`replace`) cancels what is still scheduled."""
        with self._lock:
            self._scheduled.append((from_step, sources))
            self._scheduled.sort(key=lambda entry: entry[0])  # stable: same step, later wins

    @property
    def scheduled(self) -> list[tuple[int, list[EndpointSpec]]]:
        """What is scheduled and not yet in force: (from_step, specs)."""
        with self._lock:
            return [(step, [s.spec for s in sources]) for step, sources in self._scheduled]

    def end_step(self) -> None:
        with self._lock:
            self._step_in_progress = None

    def scored_through(self, step: int) -> None:
        """Steps up to `step` were scored already (a resume's checkpoint and the samples it
        holds), or (after a failed step) only those: a swap applies from `step` + 1."""
        with self._lock:
            self._begun = step

    def probe(self, specs: Sequence[EndpointSpec]) -> list[RewardSource]:
        """Connects to each endpoint and checks it speaks the reward contract.

        GetInfo, then a one-sample Score that must return one finite float. Raises RewardError
        naming the first endpoint that fails; on failure nothing is kept.
        """
        if not specs:
            raise RewardError("at least one reward endpoint is needed")
        sources: list[RewardSource] = []
        try:
            for spec in specs:
                transport = self.connect(spec.address)
                sources.append(RewardSource(spec, transport))
                try:
                    service_name = transport.name()
                    probe = transport.score(["probe"], ["This is a probe."])
                except Exception as err:  # noqa: BLE001 - reported with the endpoint's name
                    raise RewardError(
                        f"reward endpoint {spec.address} failed its probe: {err}", spec.address
                    ) from err
                if len(probe) != 1 or not math.isfinite(probe[0]):
                    raise RewardError(
                        f"reward endpoint {spec.address} answered a one-sample Score with "
                        f"{probe!r}",
                        spec.address,
                    )
                if not spec.name:
                    spec.name = _as_name(service_name or spec.label)
        except Exception:
            self._close_unused(sources, [])
            raise
        # Two sources with the same name are told apart by their address.
        names = [s.spec.name for s in sources]
        for source in sources:
            if names.count(source.spec.name) > 1:
                source.spec.name = _as_name(f"{source.spec.name}@{source.spec.label}")
        return sources

    def replace(self, sources: list[RewardSource]) -> int | None:
        """Puts probed sources in force. Returns the step in progress (it keeps the old
        sources; the next one takes these), or None between steps (the next step takes them).
        """
        return self._replace(sources)[0]

    def _replace(self, sources: list[RewardSource]) -> tuple[int | None, int]:
        """replace(), also returning the first step that scores with `sources`."""
        with self._lock:
            self._retired.extend(self._sources)
            self._sources = sources
            in_step, effective = self._step_in_progress, self._begun + 1
            # The caller's newest choice wins over swaps a resume scheduled and not yet applied.
            cancelled = [s for _, scheduled in self._scheduled for s in scheduled]
            self._scheduled = []
            retired = [] if in_step is not None else self._retired
            if in_step is None:
                self._retired = []
        self._close_unused(retired + cancelled, sources)
        return in_step, effective

    def set_endpoints(self, specs: Sequence[EndpointSpec]) -> tuple[list[EndpointSpec], int | None]:
        """Probes, then swaps. Returns the specs in force and the step in progress, if any."""
        in_step = self.replace(self.probe(specs))
        return [s.spec for s in self.sources], in_step

    def swap(self, specs: Sequence[EndpointSpec]) -> tuple[list[EndpointSpec], int]:
        """Probes, then swaps. Returns the specs in force and the first step whose scoring
        uses them (the first whose scoring had not begun when they were put in force)."""
        effective = self._replace(self.probe(specs))[1]
        return [s.spec for s in self.sources], effective

    @staticmethod
    def _close_unused(sources: list[RewardSource], keep: list[RewardSource]) -> None:
        for source in sources:
            if all(source.transport is not k.transport for k in keep):
                source.transport.close()

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        sources: list[RewardSource] | None = None,
    ) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per sample, each source's raw scores by name).

        `sources`: the step's snapshot from begin_step(); None: the sources in force now.
        """
        sources = self.sources if sources is None else sources
        if not sources:
            raise RewardError("no reward endpoints are set")
        count = len(responses)
        total = [0.0] * count
        per_source: dict[str, list[float]] = {}
        for source in sources:
            address = source.spec.address
            try:
                scores = [float(s) for s in source.transport.score(prompts, responses)]
            except PeerError as err:
                # Transient stays transient, a refusal keeps the service's own message; both now
                # name the source, so a failed run says which one.
                raise type(err)(f"reward source {source.name}: {err}", err.peer) from err
            except Exception as err:  # noqa: BLE001 - an in-process source's own failure
                raise RewardError(
                    f"reward source {source.name} ({address}): {type(err).__name__}: {err}",
                    address,
                ) from err
            if len(scores) != count:
                raise RewardError(
                    f"reward source {source.name} ({address}) returned {len(scores)} scores "
                    f"for {count} samples",
                    address,
                )
            bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
            if bad:
                raise RewardError(
                    f"reward source {source.name} ({address}) returned non-finite scores at "
                    f"samples {bad[:5]}",
                    address,
                )
            per_source[source.name] = scores
            total = [t + source.spec.weight * s for t, s in zip(total, scores)]
        return total, per_source

    def close(self) -> None:
        with self._lock:
            every = self._sources + self._retired
            every += [s for _, scheduled in self._scheduled for s in scheduled]
            self._sources, self._retired, self._scheduled = [], [], []
        self._close_unused(every, [])
