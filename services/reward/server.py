"""The RewardService servicer: request limits, text building and the one-finite-float-per-sample
guarantee, around any RewardBackend.

The contract (protos/rlhf/v1/reward.proto) promises exactly one finite score per sample, in
order, or an error and nothing at all. A backend is not trusted to keep that promise: a wrong
count or a NaN/inf (including a float64 too large for the wire's float32) fails the call with
INTERNAL naming the sample, and the service goes on serving the next request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import grpc

from rlhf.compute import ComputeThread
from rlhf.defaults import REWARD_INPUT_MODES
from rlhf.errors import RpcError, check_caller, exhausted, handle_errors, invalid, unavailable
from rlhf.handlers import CONTROL, MethodLimits, add_service
from rlhf.protocol import REWARD_DESCRIPTOR, REWARD_SERVICE
from rlhf.server import Registration
from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.reward.backends.base import RewardBackend
from services.reward.config import RewardServiceConfig

log = logging.getLogger("rlhf.reward")

FLOAT32_MAX = 3.4028234663852886e38
"""Scores travel as float32; anything larger in magnitude would arrive as inf."""


@dataclass
class ScoreSettings:
    """The service-level knobs RewardInfo reports; the CLI flags of the same names set them."""

    name: str = RewardServiceConfig.name
    """RewardInfo.name; empty means the backend's name."""
    input: str = RewardServiceConfig.input
    """"response" or "prompt+response" (prompt + response joined with nothing in between, as
    the seed decoded query and response tokens together into one string)."""
    max_batch_size: int = RewardServiceConfig.max_batch_size
    """Samples per forward pass (reported; the backend was built with the same value)."""
    max_samples: int = RewardServiceConfig.max_samples
    """Samples per Score call; RESOURCE_EXHAUSTED above."""
    max_text_chars: int = RewardServiceConfig.max_text_chars
    """len(prompt) + len(response) per sample, in characters; INVALID_ARGUMENT above."""
    max_total_chars: int = RewardServiceConfig.max_total_chars
    """The sum of those over a call's samples; RESOURCE_EXHAUSTED above."""

    def __post_init__(self) -> None:
        if self.input not in REWARD_INPUT_MODES:
            modes = ", ".join(REWARD_INPUT_MODES)
            raise ValueError(f"--input must be one of {modes}, got {self.input!r}")
        for field in ("max_batch_size", "max_samples", "max_text_chars", "max_total_chars"):
            if getattr(self, field) < 1:
                flag = "--" + field.replace("_", "-")
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, field)}")


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """Scores samples with a backend that may arrive later (UNAVAILABLE until set_backend)."""

    def __init__(self, settings: ScoreSettings, backend: RewardBackend | None = None) -> None:
        self.settings = settings
        self._backend = backend
        # Every backend call runs on this one thread, in arrival order (see rlhf.compute):
        # backends are CPU-bound (VADER holds the GIL; a model uses every core per forward
        # pass), so concurrent calls only thrash, and a model's OpenMP team stays single.
        # Load the backend on it too: `self.compute.run(build_backend, args)`.
        self.compute = ComputeThread("reward-compute")
        self._score_log = ScoreLog()

    def set_backend(self, backend: RewardBackend) -> None:
        """Installs the loaded backend; calls before this get UNAVAILABLE."""
        self._backend = backend

    @property
    def backend(self) -> RewardBackend | None:
        return self._backend

    def _require_backend(self) -> RewardBackend:
        backend = self._backend
        if backend is None:
            raise unavailable("the reward backend is still loading; retry when health is SERVING")
        return backend

    @handle_errors
    def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        backend = self._require_backend()
        settings = self.settings
        count = len(request.samples)
        if count == 0:
            return reward_pb2.ScoreResponse()
        if count > settings.max_samples:
            raise exhausted(
                f"{count} samples in one Score call; this service accepts at most "
                f"{settings.max_samples} (RewardInfo.max_samples_per_request): split the request"
            )
        _check_sizes(request, settings)
        texts = texts_to_score(
            [s.prompt for s in request.samples],
            [s.response for s in request.samples],
            settings.input,
        )
        started = time.perf_counter()
        # The backend's exception is raised here.
        scores = self.compute.run(_score, context, backend, texts)
        latency_ms = (time.perf_counter() - started) * 1000.0
        checked = _check_scores(scores, count, backend.name)
        self._score_log.record(count, latency_ms, backend.name)
        return reward_pb2.ScoreResponse(scores=checked)

    @handle_errors
    def GetInfo(
        self, request: common_pb2.GetInfoRequest, context: grpc.ServicerContext
    ) -> reward_pb2.RewardInfo:
        backend = self._require_backend()
        settings = self.settings
        return reward_pb2.RewardInfo(
            name=settings.name or backend.name,
            backend=backend.name,
            model=backend.model,
            input=settings.input,
            device=backend.device,
            max_batch_size=settings.max_batch_size,
            max_samples_per_request=settings.max_samples,
            max_text_chars=settings.max_text_chars,
            max_total_chars=settings.max_total_chars,
            description=backend.description,
        )


class ScoreLog:
    """The "scored" log records: every call at DEBUG; at INFO the first call, then one record
    per `every_s` seconds that sums the calls since the previous one.

    A JSON log line costs ~0.1 ms of the service's GIL per call, about 5% of a 64-sample VADER
    call (bench/bench_reward.py), and a line per call at tens of calls per second says nothing
    a summary doesn't.
    """

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last = -math.inf
        self._calls = self._samples = 0
        self._latency_sum = self._latency_max = 0.0

    def record(self, samples: int, latency_ms: float, backend: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._calls += 1
            self._samples += samples
            self._latency_sum += latency_ms
            self._latency_max = max(self._latency_max, latency_ms)
            if now - self._last < self.every_s:
                summary = None
            else:
                summary = {
                    "calls": self._calls,
                    "samples": self._samples,
                    "latency_ms_mean": round(self._latency_sum / self._calls, 3),
                    "latency_ms_max": round(self._latency_max, 3),
                    "backend": backend,
                }
                self._last = now
                self._calls = self._samples = 0
                self._latency_sum = self._latency_max = 0.0
        if summary is not None:
            log.info("scored", extra=summary)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug(
                "scored",
                extra={"samples": samples, "latency_ms": round(latency_ms, 3), "backend": backend},
            )


def _check_sizes(request: reward_pb2.ScoreRequest, settings: ScoreSettings) -> None:
    """Each sample within max_text_chars (INVALID_ARGUMENT), all within max_total_chars
    (RESOURCE_EXHAUSTED), before any work."""
    limit = settings.max_text_chars
    total = 0
    for index, sample in enumerate(request.samples):
        size = len(sample.prompt) + len(sample.response)
        if size > limit:
            raise invalid(
                f"sample {index}: prompt + response is {size} characters, over this "
                f"service's limit of {limit} (RewardInfo.max_text_chars)"
            )
        total += size
    if total > settings.max_total_chars:
        raise exhausted(
            f"{total} characters in one Score call; this service accepts at most "
            f"{settings.max_total_chars} (RewardInfo.max_total_chars): split the request"
        )


def _score(context: grpc.ServicerContext, backend: RewardBackend, texts: list[str]) -> object:
    """Compute-thread work: the backend's scores, unless the caller gave up while the call was
    queued (then nothing is scored)."""
    check_caller(context, "scoring started")
    return backend.score(texts)


def texts_to_score(prompts: list[str], responses: list[str], input_mode: str) -> list[str]:
    """What the backend scores: the response, or (prompt+response, the seed's way) the prompt
    followed directly by the response, as the seed decoded query + response together."""
    if input_mode == "prompt+response":
        return [p + r for p, r in zip(prompts, responses, strict=True)]
    return list(responses)


def _check_scores(scores: object, count: int, backend: str) -> list[float]:
    """The backend's output as `count` finite float32-representable floats, or INTERNAL."""
    try:
        values = list(scores)  # type: ignore[call-overload]
    except TypeError:
        raise RpcError(
            grpc.StatusCode.INTERNAL,
            f"backend {backend} returned {type(scores).__name__}, not a list of scores",
        ) from None
    if len(values) != count:
        raise RpcError(
            grpc.StatusCode.INTERNAL,
            f"backend {backend} returned {len(values)} scores for {count} samples; "
            "nothing is returned for this request",
        )
    checked: list[float] = []
    for index, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RpcError(
                grpc.StatusCode.INTERNAL,
                f"backend {backend} returned {value!r} for sample {index}, not a number",
            ) from None
        if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
            raise RpcError(
                grpc.StatusCode.INTERNAL,
                f"backend {backend} produced a non-finite score ({number!r}) for sample "
                f"{index}; nothing is returned for this request",
            )
        checked.append(number)
    return checked


def request_limits(settings: ScoreSettings) -> dict[str, MethodLimits]:
    """Score's request cap follows from the settings: every character 4 bytes at most in
    UTF-8, and each sample's two fields' and its own tag and length bytes."""
    per_sample = 3 * 6
    score_bytes = 4 * settings.max_total_chars + per_sample * settings.max_samples + 4096
    return {"Score": MethodLimits(max_bytes=score_bytes), "GetInfo": CONTROL}


def add_reward_service(servicer: RewardServicer, server: grpc.Server) -> None:
    """Registers the servicer with rlhf.handlers' self-decoding, size-capped handlers."""
    add_service(REWARD_DESCRIPTOR, servicer, server, request_limits(servicer.settings))


def servicers(servicer: RewardServicer) -> list[Registration]:
    """What rlhf.server.run_service / build_server register for the reward service."""
    return [Registration(add_reward_service, servicer, REWARD_SERVICE)]
