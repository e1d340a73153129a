"""A seeded storm of hostile requests against each service: at least REQUESTS per service, typed
(every field extreme: tests/fuzzing.py) and raw (random or damaged bodies through a generic
channel method). No answer may be INTERNAL or UNKNOWN, and afterwards each service answers a
valid request correctly. The counts per status code are printed (`pytest -s` shows them).

Each service runs in this process on a free loopback port: the policy with a tiny model (its
caps keep a valid Generate to a few tokens), the reward service with VADER, and the trainer's
control API with in-process transports and a run held inside its first Generate (so a valid
StartRun is refused as the API should, instead of starting runs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.local_transports import LocalReward
from rlhf.defaults import LOOPBACK
from rlhf.server import GrpcService, build_server
from rlhf.v1 import (
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.policy.config import PolicyServiceConfig
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer, params_from_proto
from services.policy.server import servicers as policy_servicers
from services.reward.backends.vader import VaderBackend
from services.reward.server import RewardServicer, ScoreSettings
from services.reward.server import servicers as reward_servicers
from services.trainer.api import service as trainer_service
from services.trainer.api.service import TrainerServicer, Transports
from services.trainer.config import TrainerServiceConfig
from tests.boundary import upload
from tests.fuzz_requests import (
    Send,
    policy_request,
    reward_request,
    start_request,
    trainer_request,
)
from tests.fuzzing import Fuzzer, Tally
from tests.servers import open_config
from tests.test_trainer_api import GatedPolicy

SEED = 20261129
REQUESTS = 10_000
"""Per service: typed and raw requests together."""


@pytest.fixture(autouse=True)
def quiet_refusals() -> Iterator[None]:
    """Each refusal logs a warning: 10,000 of them cost time and say nothing here. Errors (an
    INTERNAL's traceback) still show."""
    logger = logging.getLogger("rlhf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _serve(name: str, registrations: list) -> tuple[GrpcService, grpc.Channel]:
    # Authorisation off: the fuzzed requests must reach the decoding and the handlers.
    service = build_server(name, registrations, open_config(grace_s=0))
    return service, grpc.insecure_channel(f"{LOOPBACK}:{service.port}")


def _healthy(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _storm(tally: Tally, make: Callable[[], tuple[str, Send]]) -> None:
    for _ in range(REQUESTS):
        method, send = make()
        tally.call(method, send)
    print(tally.report())
    assert tally.total >= REQUESTS
    assert not tally.bad, f"{len(tally.bad)} INTERNAL/UNKNOWN answers, e.g. {tally.bad[:5]}"


# --- policy ----------------------------------------------------------------------------------


def test_fuzz_policy(tiny_lm: Path) -> None:
    engine = PolicyEngine(str(tiny_lm))
    settings = PolicyServiceConfig(
        model=str(tiny_lm),
        max_new_tokens_cap=4,
        max_batch_size=4,
        max_prompt_chars=200,
        upload_idle_s=5.0,
        max_upload_chunks=64,
    )
    service, channel = _serve("policy", policy_servicers(PolicyServicer(engine, settings)))
    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    fz = Fuzzer(SEED)
    try:
        _storm(Tally("policy"), lambda: policy_request(fz, stub, channel, engine))
        _healthy(channel)
        served = engine.weight_version
        assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5).weight_version == served
        params = policy_pb2.GenerationParams(max_new_tokens=4, do_sample=False)
        prompts = ["the movie was good", "tell me about a robot"]
        request = policy_pb2.GenerateRequest(prompts=prompts, params=params)
        reply = stub.Generate(request, timeout=10)
        expected = engine.generate(prompts, params_from_proto(params))
        assert [list(c.response_token_ids) for c in reply.completions] == [
            c.response_token_ids for c in expected
        ]
        update = stub.UpdateWeights(iter(upload(engine, served + 1, 1 << 20)), timeout=10)
        assert update.version == served + 1
        assert stub.Generate(request, timeout=10).weight_version == served + 1
    finally:
        channel.close()
        service.stop(grace_s=0)


# --- reward ----------------------------------------------------------------------------------


def test_fuzz_reward() -> None:
    settings = ScoreSettings(max_samples=64, max_text_chars=5000, max_total_chars=20_000)
    service, channel = _serve("reward", reward_servicers(RewardServicer(settings, VaderBackend())))
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    fz = Fuzzer(SEED + 1)
    try:
        _storm(Tally("reward"), lambda: reward_request(fz, stub, channel))
        _healthy(channel)
        texts = ["I love this, it is wonderful!", "terrible and sad", ""]
        request = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(response=t) for t in texts])
        scores = stub.Score(request, timeout=10).scores
        expected = VaderBackend().score(texts)
        assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(scores, expected, strict=True))
        assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5).max_total_chars == 20_000
    finally:
        channel.close()
        service.stop(grace_s=0)


# --- trainer ---------------------------------------------------------------------------------


def _end(stub: trainer_pb2_grpc.TrainerServiceStub, run_id: str) -> trainer_pb2.StepMetrics:
    request = trainer_pb2.WatchRunRequest(run_id=run_id, from_step=1)
    return list(stub.WatchRun(request, timeout=120))[-1]


def test_fuzz_trainer(tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The pre-flight dials the policy address a request names: not this test's subject.
    monkeypatch.setattr(trainer_service, "served_model_check", lambda address, model: None)
    policy = GatedPolicy(str(tiny_lm))
    policy.gated = True
    vader = VaderBackend()
    transports = Transports(
        policy=lambda address, limits: policy,
        reward=lambda address, limits: LocalReward(vader, address=address),
    )
    defaults = TrainerServiceConfig(
        policy="local:1", reward=["local:2"], output_dir=str(tmp_path), model_root=[str(tiny_lm)]
    )
    servicer = TrainerServicer(defaults, transports)
    service, channel = _serve("trainer", trainer_service.servicers(servicer))
    stub = trainer_pb2_grpc.TrainerServiceStub(channel)
    fz = Fuzzer(SEED + 2)
    tiny = str(tiny_lm)
    try:
        stub.StartRun(start_request(tiny, "held", steps=50), timeout=30)
        assert policy.generating.wait(60), "the held run never reached Generate"
        _storm(Tally("trainer"), lambda: trainer_request(fz, stub, channel, tiny))
        _healthy(channel)
        status = stub.GetRun(trainer_pb2.GetRunRequest(run_id="held"), timeout=5)
        assert status.run_id == "held" and status.state in (
            trainer_pb2.RUN_STATE_RUNNING,
            trainer_pb2.RUN_STATE_STOPPING,
        )
        policy.release.set()
        stub.StopRun(trainer_pb2.StopRunRequest(run_id="held"), timeout=5)
        assert _end(stub, "held").state == trainer_pb2.RUN_STATE_STOPPED
        stub.StartRun(start_request(tiny, "after", steps=1), timeout=30)
        end = _end(stub, "after")
        assert end.state == trainer_pb2.RUN_STATE_COMPLETED and end.step == 1, end.error
    finally:
        policy.release.set()
        channel.close()
        for run in servicer.runs.values():
            if run.thread is not None:
                run.thread.join(60)
        service.stop(grace_s=0)
