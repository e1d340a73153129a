"""A stalled peer is visible and bounded: a hung (SIGSTOPped) service is given up on within
seconds by the health watch and retried, GetRun and `rlhf status` say so while it happens, and
the run fails naming the peer when it never comes back or carries on when it does; a slow but
healthy peer is waited for; the timing fields are validated."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.local_transports import LocalPolicy
from rlhf.call_limits import CallLimits
from rlhf.cli import main
from rlhf.defaults import LOOPBACK
from rlhf.protocol import REWARD_SERVICE
from rlhf.server import Registration
from rlhf.v1 import reward_pb2_grpc, trainer_pb2
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer, servicers
from services.trainer.api.client import TrainerClient
from services.trainer.api.runs import progress_to_proto
from services.trainer.api.service import Transports
from services.trainer.config import TrainerServiceConfig, load_train_config
from services.trainer.orchestrator.peers import TransientError
from services.trainer.orchestrator.progress import LAST_ERROR_CHARS, ProgressTracker
from services.trainer.orchestrator.transports import GrpcPolicy, GrpcReward
from tests.fuzz_requests import start_request
from tests.hanging import Hang, Reward, hanging_server, trainer_for
from tests.reward.test_cli import ServiceLog, clean_env, rlhf_command

FAST = CallLimits(health_interval_s=0.5, health_timeout_s=1.0, health_failures=2)
"""The watch these tests run under: a hung peer is given up on after about 3 s; a live one on
a loaded machine has a second to answer each check."""
NOTICED_S = 10.0
"""The bound on noticing a hung peer with FAST (it takes about 3 s)."""
STALLED = "stopped answering its health checks"
TIMING = {
    "run.peer_health_interval_s": str(FAST.health_interval_s),
    "run.peer_health_timeout_s": str(FAST.health_timeout_s),
    "run.peer_health_failures": str(FAST.health_failures),
    "run.retry_backoff_s": "0.05",
}
"""FAST as a run's config overrides, with a short backoff between attempts."""


@pytest.fixture
def hang() -> Hang:
    return Hang()


@pytest.fixture
def reward(hang: Hang) -> Iterator[tuple[Reward, str]]:
    servicer = Reward(hang)
    add = reward_pb2_grpc.add_RewardServiceServicer_to_server
    with hanging_server([Registration(add, servicer, REWARD_SERVICE)], hang) as address:
        yield servicer, address


def _clean(message: str) -> None:
    """No raw gRPC exception in user-facing text."""
    assert "_InactiveRpcError" not in message and "<_" not in message, message
    assert "debug_error_string" not in message, message


# --- the transports ------------------------------------------------------------------------------
def test_a_hung_reward_service_is_given_up_on_in_seconds(
    reward: tuple[Reward, str], hang: Hang
) -> None:
    servicer, address = reward
    transport = GrpcReward(address, limits=FAST)
    try:
        hang.freeze()
        began = time.monotonic()
        with pytest.raises(TransientError) as caught:
            transport.score(["p"], ["r"])
        waited = time.monotonic() - began
        assert FAST.health_interval_s * FAST.health_failures <= waited < NOTICED_S
        message = str(caught.value)
        assert caught.value.peer == address and address in message
        assert message.startswith(f"Score on {address} failed: UNAVAILABLE: ")
        assert STALLED in message and "no answer within 1 s" in message
        _clean(message)
        hang.thaw()  # SIGCONT: the same transport works again
        assert transport.score(["p"], ["r"]) == [0.5]
    finally:
        transport.close()


def test_a_slow_but_healthy_reward_service_is_waited_for(
    reward: tuple[Reward, str], hang: Hang
) -> None:
    servicer, address = reward
    transport = GrpcReward(address, limits=CallLimits(health_interval_s=0.2, health_failures=2))
    try:
        for _ in range(20):  # a fast call costs no health check
            assert transport.score(["p"], ["r"]) == [0.5]
        assert hang.health_checks == 0
        servicer.slow_s = 2.0  # ten intervals of the watch
        assert transport.score(["p"], ["r"]) == [0.5]
        assert hang.health_checks >= 3  # it was watched all along, and the peer answered
    finally:
        transport.close()


def test_a_hung_policy_service_fails_generate_and_the_weight_push_in_seconds(
    engine: PolicyEngine, hang: Hang
) -> None:
    """Both call shapes are watched: unary Generate and the streamed UpdateWeights."""
    from services.trainer.config import GenerationConfig

    with hanging_server(servicers(PolicyServicer(engine)), hang) as address:
        policy = GrpcPolicy(address, limits=FAST)
        try:
            weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
            assert policy.facts().model.vocab_size == len(engine.tokenizer)
            gen = GenerationConfig(max_new_tokens=2)
            hang.freeze()
            for call in (
                lambda: policy.generate(["p"], gen, seed=1),
                lambda: policy.push_weights(weights, engine.weight_version + 1),
            ):
                began = time.monotonic()
                with pytest.raises(TransientError, match=STALLED) as caught:
                    call()
                assert time.monotonic() - began < NOTICED_S
                assert address in str(caught.value)
                _clean(str(caught.value))
            hang.thaw()
            assert len(policy.generate(["p"], gen, seed=1).response_ids) == 1
        finally:
            policy.close()


@pytest.mark.slow
def test_a_sigstopped_reward_process_is_noticed_and_works_again_after_sigcont() -> None:
    argv = ("--backend", "length", "--host", LOOPBACK, "--port", "0", "--grace-s", "0")
    proc = subprocess.Popen(
        rlhf_command(*argv),
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = ServiceLog(proc)
    try:
        assert log.bound.wait(60) and log.port, "".join(log.lines)
        transport = GrpcReward(f"{LOOPBACK}:{log.port}", limits=FAST)
        transport.client.wait_ready(60)
        assert len(transport.score(["p"], ["some words"])) == 1
        os.kill(proc.pid, signal.SIGSTOP)
        began = time.monotonic()
        with pytest.raises(TransientError, match=STALLED):
            transport.score(["p"], ["some words"])
        assert time.monotonic() - began < NOTICED_S
        os.kill(proc.pid, signal.SIGCONT)
        transport.client.wait_ready(30)  # the process runs again
        assert len(transport.score(["p"], ["some words"])) == 1
        transport.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


# --- a run through the trainer's API -------------------------------------------------------------
def _start(client: TrainerClient, tiny_lm: Path, run_id: str, **overrides: str) -> None:
    request = start_request(str(tiny_lm), run_id, steps=2)
    request.overrides.update({**TIMING, **overrides})
    client.start(request)


@pytest.mark.parametrize("comes_back", [True, False], ids=["comes-back", "never-comes-back"])
def test_a_stalled_reward_service_is_shown_retried_and_ends_the_run_only_if_it_stays_hung(
    reward: tuple[Reward, str],
    hang: Hang,
    tiny_lm: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    comes_back: bool,
) -> None:
    servicer, address = reward
    servicer.freeze_at = 2  # call 1 is the endpoint's probe; call 2 is step 1's scoring
    settings = TrainerServiceConfig(
        policy="local:1", reward=[address], output_dir=str(tmp_path), model_root=[str(tiny_lm)]
    )
    transports = Transports(
        policy=lambda address, limits: LocalPolicy(str(tiny_lm), address=address),
        reward=lambda address, limits: GrpcReward(address, limits=limits),
    )
    with trainer_for(settings, transports) as (client, _):
        _start(client, tiny_lm, "stall", **{"run.step_retries": "3"})
        stream = iter(client.watch("stall", from_step=1))
        retried = next(m for m in stream if m.progress.retries >= 1)  # the stream says so
        assert time.monotonic() - hang.frozen_at < NOTICED_S
        assert retried.progress.phase == trainer_pb2.RUN_PHASE_SCORING
        status = client.get("stall")  # and GetRun, while the run waits on the peer
        assert status.state == trainer_pb2.RUN_STATE_RUNNING
        progress = status.progress
        assert progress.phase == trainer_pb2.RUN_PHASE_SCORING and progress.step == 1
        assert progress.retries >= 1 and progress.phase_elapsed_s > 0
        assert STALLED in progress.last_error and address in progress.last_error
        _clean(progress.last_error)
        assert main(["status", "--trainer", client.address, "--run-id", "stall"]) == 0
        shown = capsys.readouterr().out
        assert "phase      scoring (step 1)" in shown and " retries" in shown
        assert f"last error reward source frozen: Score on {address}" in shown

        if comes_back:
            hang.thaw()
        end = next(m for m in stream if m.event == trainer_pb2.WATCH_EVENT_END)
    if comes_back:
        assert end.state == trainer_pb2.RUN_STATE_COMPLETED, end.error
        assert end.step == 2
    else:
        assert end.state == trainer_pb2.RUN_STATE_FAILED
        assert "step 1: score failed 3 times; last: reward source frozen: " in end.error
        assert address in end.error and STALLED in end.error
        _clean(end.error)


def test_a_run_whose_peer_is_unreachable_fails_in_plain_words(
    reward: tuple[Reward, str], tiny_lm: Path, tmp_path: Path
) -> None:
    """Nothing listens (a port bound but not listening refuses connections): the reward probe,
    then the policy's facts (retried), fail the run with the transports' words."""
    _, reachable = reward
    with socket.socket() as closed:
        closed.bind((LOOPBACK, 0))
        nobody = f"{LOOPBACK}:{closed.getsockname()[1]}"
        cases = {"no-reward": (reachable, nobody), "no-policy": (nobody, reachable)}
        for run_id, (policy, reward_address) in cases.items():
            settings = TrainerServiceConfig(
                policy=policy,
                reward=[reward_address],
                output_dir=str(tmp_path),
                model_root=[str(tiny_lm)],
            )
            with trainer_for(settings, Transports.grpc()) as (client, _):
                _start(client, tiny_lm, run_id, **{"run.step_retries": "2"})
                end = list(client.watch(run_id, from_step=1))[-1]
            assert end.state == trainer_pb2.RUN_STATE_FAILED
            assert nobody in end.error and "UNAVAILABLE" in end.error
            _clean(end.error)
            if run_id == "no-policy":
                assert "reading the policy service's facts failed 2 times" in end.error
                # retried while the run loaded: shown as the run's own progress, not lost
                assert end.progress.phase == trainer_pb2.RUN_PHASE_LOADING
                assert end.progress.retries == 1 and nobody in end.progress.last_error


def test_rlhf_train_in_this_process_ends_on_a_hung_reward_service_in_one_line(
    reward: tuple[Reward, str],
    engine: PolicyEngine,
    tiny_lm: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    servicer, address = reward
    servicer.freeze_at = 2  # the probe goes through; step 1's scoring hangs
    with hanging_server(servicers(PolicyServicer(engine)), Hang()) as policy:
        overrides = {
            **start_request(str(tiny_lm), "train-here", steps=2).overrides,
            **TIMING,
            "run.step_retries": "2",
            "run.output_dir": str(tmp_path),
        }
        sets = [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
        argv = ["train", "--policy", policy, "--reward", address, *sets]
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            assert main(argv) == 1
        finally:  # `rlhf train` routes the root logger to this test's captured stderr
            root.handlers[:] = handlers
            root.setLevel(level)
    err = capsys.readouterr().err.splitlines()
    failure = [line for line in err if line.startswith("rlhf train: ")]
    assert len(failure) == 1, err[-5:]
    assert "step 1: score failed 2 times; last: reward source frozen: " in failure[0]
    assert address in failure[0] and STALLED in failure[0]
    _clean(failure[0])
    assert not [line for line in err if line.startswith("Traceback")]


# --- the config and the progress record ----------------------------------------------------------
def test_the_timing_fields_make_the_runs_call_limits() -> None:
    config = load_train_config(
        "run:\n  score_timeout_s: 30\n  peer_health_failures: 4\n",
        ["run.generate_timeout_s=900", "run.sync_timeout_s=60", "run.peer_health_interval_s=1"],
    )
    limits = config.run.call_limits()
    assert (limits.generate_s, limits.score_s, limits.update_weights_s) == (900, 30, 60)
    assert (limits.health_interval_s, limits.health_failures) == (1, 4)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("run.score_timeout_s=0", "score_timeout_s must be >= 0.1"),
        ("run.generate_timeout_s=-5", "generate_timeout_s must be >= 0.1"),
        ("run.sync_timeout_s=1e9", "sync_timeout_s must be <= 86400"),
        ("run.peer_health_interval_s=0.01", "peer_health_interval_s must be >= 0.1"),
        ("run.peer_health_timeout_s=0", "peer_health_timeout_s must be >= 0.1"),
        ("run.peer_health_failures=0", "peer_health_failures must be >= 1"),
        ("run.peer_health_failures=1000", "peer_health_failures must be <= 100"),
        ("run.peer_health_failures=two", "peer_health_failures"),
    ],
)
def test_bad_timing_fields_are_refused(override: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        load_train_config(None, [override])


def test_last_error_is_kept_short_and_forgotten_with_its_phase() -> None:
    tracker = ProgressTracker()
    tracker.enter("scoring", 3)
    tracker.retried("Score on 10.0.0.7:50052 failed: UNAVAILABLE: " + "x" * 5000)
    now = tracker.current
    assert now.retries == 1 and len(now.last_error) == LAST_ERROR_CHARS
    assert now.last_error.startswith("Score on 10.0.0.7:50052") and now.last_error.endswith("...")
    assert progress_to_proto(now).last_error == now.last_error
    tracker.retried("short")
    assert (tracker.current.retries, tracker.current.last_error) == (2, "short")
    tracker.enter("updating", 3)
    assert (tracker.current.retries, tracker.current.last_error) == (0, "")


def test_rlhf_watch_prints_each_retrys_error_once(capsys: pytest.CaptureFixture[str]) -> None:
    from services.trainer.api.display import ProgressDisplay

    display = ProgressDisplay(total=3)
    display.phase("scoring", 1, 0.0)
    display.phase("scoring", 1, 2.0, retries=1, last_error="Score on a:1 failed: first")
    display.phase("scoring", 1, 3.0, retries=1, last_error="Score on a:1 failed: first")
    display.phase("scoring", 1, 5.0, retries=2, last_error="Score on a:1 failed: first")
    display.close()
    text = capsys.readouterr().err  # beside the bar, clear of the summary on stdout
    assert text.count("step 1 scoring: retry 1: Score on a:1 failed: first") == 1
    assert text.count("step 1 scoring: retry 2: Score on a:1 failed: first") == 1
