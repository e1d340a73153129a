"""The transport seam: gRPC failures become TransientError / FatalError naming the peer and
quoting its message; the loop retries only transient ones (the one retry layer: channels do not
retry); policy facts are read once per connection; the orchestrator imports no gRPC."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench.local_transports import LocalPolicy
from rlhf.protocol import REWARD_SERVICE
from rlhf.server import GrpcService, ServerConfig, build_server
from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer, servicers
from services.trainer.config import TrainConfig, load_train_config
from services.trainer.orchestrator.loop import StepFailed, TrainingLoop
from services.trainer.orchestrator.peers import FatalError, TransientError, VersionConflict
from services.trainer.orchestrator.rewards import EndpointSpec, RewardMixer
from services.trainer.orchestrator.transports import GrpcPolicy, GrpcReward
from tests.servers import open_config

REPO = Path(__file__).resolve().parents[1]
Code = grpc.StatusCode
OK = "ok"


class ScriptedRewardService(reward_pb2_grpc.RewardServiceServicer):
    """Answers each Score call with the next scripted outcome: OK (0.5 per sample), a status
    code (aborts with it and a message of its own), or "hang" (waits until released)."""

    def __init__(self) -> None:
        self.script: list[object] = []
        self.calls = 0
        self.release = threading.Event()

    def GetInfo(self, request, context):  # noqa: ANN001, ANN201, N802 - gRPC method
        return reward_pb2.RewardInfo(name="scripted")

    def Score(self, request, context):  # noqa: ANN001, ANN201, N802 - gRPC method
        self.calls += 1
        outcome = self.script.pop(0) if self.script else OK
        if outcome == "hang":
            self.release.wait(timeout=30)
        elif outcome != OK:
            context.abort(outcome, f"scripted refusal number {self.calls}")
        return reward_pb2.ScoreResponse(scores=[0.5] * len(request.samples))


@pytest.fixture()
def reward_service() -> Iterator[tuple[ScriptedRewardService, str]]:
    servicer = ScriptedRewardService()
    service = GrpcService("scripted-reward", ServerConfig(host="127.0.0.1", port=0, grace_s=0))
    service.add(reward_pb2_grpc.add_RewardServiceServicer_to_server, servicer, REWARD_SERVICE)
    service.start()
    service.set_serving()
    yield servicer, f"127.0.0.1:{service.port}"
    servicer.release.set()
    service.stop(grace_s=0)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (Code.UNAVAILABLE, TransientError),
        (Code.INVALID_ARGUMENT, FatalError),
        (Code.INTERNAL, FatalError),
    ],
)
def test_wire_statuses_become_transient_or_fatal_errors_naming_the_peer(
    reward_service: tuple[ScriptedRewardService, str], code: grpc.StatusCode, kind: type
) -> None:
    servicer, address = reward_service
    transport = GrpcReward(address)
    servicer.script = [code]
    with pytest.raises(kind) as caught:
        transport.score(["p"], ["r"])
    transport.close()
    err = caught.value
    assert not isinstance(err, TransientError if kind is FatalError else FatalError)
    message = str(err)
    assert address in message and err.peer == address
    assert code.name in message and "scripted refusal number 1" in message
    assert "_InactiveRpcError" not in message and "debug_error_string" not in message
    # One call reached the service: the channel did not retry behind the caller's back.
    assert servicer.calls == 1


def test_a_deadline_is_transient(reward_service: tuple[ScriptedRewardService, str]) -> None:
    servicer, address = reward_service
    transport = GrpcReward(address)
    transport.client.limits.score_s = 0.3
    servicer.script = ["hang"]
    with pytest.raises(TransientError, match="DEADLINE_EXCEEDED"):
        transport.score(["p"], ["r"])
    servicer.release.set()
    transport.close()


def _tiny_config(tiny_lm: Path, tmp_path: Path, run_id: str, *overrides: str) -> TrainConfig:
    """A two-sample, one-epoch run of the tiny model under tmp_path; `overrides` add to it."""
    base = [
        f"model_name={tiny_lm}",
        "batch_size=2",
        "mini_batch_size=1",
        "ppo_epochs=1",
        "log_with=jsonl",
        f"run.output_dir={tmp_path}",
        f"run.run_id={run_id}",
    ]
    return load_train_config(None, [*base, *overrides])


@pytest.fixture
def loop(
    tiny_lm: Path, tmp_path: Path, reward_service: tuple[ScriptedRewardService, str]
) -> TrainingLoop:
    """A loop of the tiny model scored by the scripted reward service (3 tries per step)."""
    address = reward_service[1]
    config = _tiny_config(
        tiny_lm,
        tmp_path,
        "seam",
        "max_new_tokens=4",
        "run.steps=3",
        "run.save_every=0",
        "run.step_retries=3",
        "run.retry_backoff_s=0.01",
    )
    mixer = RewardMixer(GrpcReward)
    mixer.set_endpoints([EndpointSpec(address)])  # its probe is one Score call
    return TrainingLoop(config, LocalPolicy(str(tiny_lm)), mixer)


def test_a_fatal_reward_error_fails_the_step_at_once_with_the_services_message(
    loop: TrainingLoop, reward_service: tuple[ScriptedRewardService, str]
) -> None:
    servicer, address = reward_service
    before = servicer.calls
    servicer.script = [Code.INVALID_ARGUMENT, OK, OK]
    with pytest.raises(StepFailed, match="INVALID_ARGUMENT: scripted refusal") as caught:
        loop.run_step()
    assert servicer.calls - before == 1  # not retried
    assert address in str(caught.value) and loop.step == 0


def test_a_transient_reward_error_is_retried_and_the_step_goes_through(
    loop: TrainingLoop, reward_service: tuple[ScriptedRewardService, str]
) -> None:
    servicer, address = reward_service
    before = servicer.calls
    seen: list[tuple[str, int]] = []
    loop.progress.listeners.append(lambda p: seen.append((p.phase, p.retries)))
    servicer.script = [Code.UNAVAILABLE, Code.UNAVAILABLE, OK]
    result = loop.run_step()
    assert result.step == 1 and servicer.calls - before == 3
    assert ("scoring", 2) in seen  # each retry visible while it happens
    # Retries are bounded by run.step_retries: three outages in a row fail the step.
    servicer.script = [Code.UNAVAILABLE] * 3
    with pytest.raises(StepFailed, match="score failed 3 times"):
        loop.run_step()
    assert loop.step == 1


def test_policy_facts_are_read_once_per_connection(tiny_lm: Path) -> None:
    engine = PolicyEngine(str(tiny_lm))
    reads = 0
    info = engine.info

    def counted():  # noqa: ANN202
        nonlocal reads
        reads += 1
        return info()

    engine.info = counted  # type: ignore[method-assign]
    service = build_server("policy", servicers(PolicyServicer(engine)), open_config())
    policy = GrpcPolicy(f"127.0.0.1:{service.port}")
    try:
        facts = policy.facts()
        assert facts.weight_version == 0 and facts.model.vocab_size == len(engine.tokenizer)
        weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
        for version in (1, 2, 3):
            assert policy.push_weights(weights, version).version == version
        assert reads == 1
        # A version the service already passed: FAILED_PRECONDITION, for the loop to renumber.
        with pytest.raises(VersionConflict, match="FAILED_PRECONDITION: version 2 is not newer"):
            policy.push_weights(weights, 2)
        assert policy.facts(fresh=True).weight_version == 3 and reads == 2
    finally:
        policy.close()
        service.stop(grace_s=0)


def test_the_orchestrator_imports_no_grpc() -> None:
    code = (
        "import sys\n"
        "import services.trainer.orchestrator.loop, services.trainer.orchestrator.rewards\n"
        "bad = sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_the_policy_services_log_probs_reach_the_loop(tiny_lm: Path, tmp_path: Path) -> None:
    """Through the wire the sampled log-probs still match the trainer's to float32 rounding
    (the bound of test_policy_and_trainer_log_probs_agree_in_process), before and after a
    weight push: the log-probs travel with their tokens, in order."""
    from bench.local_transports import LocalReward
    from services.reward.backends.vader import VaderBackend

    service = build_server(
        "policy", servicers(PolicyServicer(PolicyEngine(str(tiny_lm)))), open_config()
    )
    config = _tiny_config(tiny_lm, tmp_path, "wire", "learning_rate=1e-3", "max_new_tokens=6")
    mixer = RewardMixer(lambda address: LocalReward(VaderBackend(), address=address))
    mixer.set_endpoints([EndpointSpec("local:1")])
    policy = GrpcPolicy(f"127.0.0.1:{service.port}")
    try:
        loop = TrainingLoop(config, policy, mixer)
        for step in (1, 2):
            stats = loop.run_step().stats
            assert stats["weight_version"] == step
            assert stats["rollout/logprob_diff_max"] < 1e-4, (step, stats)
    finally:
        policy.close()
        service.stop(grace_s=0)


def test_a_policy_refusal_fails_the_step_at_once(tiny_lm: Path, tmp_path: Path) -> None:
    """Generate refused (RESOURCE_EXHAUSTED: more new tokens than the service's cap): the same
    call would be refused again, so the step fails on its first attempt with the service's own
    message."""
    from bench.local_transports import LocalReward
    from services.policy.engine import EngineLimits
    from services.reward.backends.vader import VaderBackend

    engine = PolicyEngine(str(tiny_lm), limits=EngineLimits(max_new_tokens_cap=2))
    service = build_server("policy", servicers(PolicyServicer(engine)), open_config())
    config = load_train_config(
        None,
        [f"model_name={tiny_lm}", "batch_size=2", "mini_batch_size=1", "log_with=jsonl"]
        + ["max_new_tokens=4", f"run.output_dir={tmp_path}", "run.step_retries=3"],
    )
    mixer = RewardMixer(lambda address: LocalReward(VaderBackend(), address=address))
    mixer.set_endpoints([EndpointSpec("local:1")])
    address = f"127.0.0.1:{service.port}"
    policy = GrpcPolicy(address)
    try:
        loop = TrainingLoop(config, policy, mixer)
        retries: list[int] = []
        loop.progress.listeners.append(lambda p: retries.append(p.retries))
        with pytest.raises(StepFailed) as caught:
            loop.run_step()
        message = str(caught.value)
        assert message.startswith(f"step 1: Generate on {address} failed: RESOURCE_EXHAUSTED: ")
        assert "max_new_tokens 4 is above this server's cap 2" in message
        assert max(retries) == 0 and loop.step == 0
    finally:
        policy.close()
        service.stop(grace_s=0)
