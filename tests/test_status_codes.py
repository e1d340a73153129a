"""Right status codes at the service boundary (issue #12, item 6): undecodable and oversized
bodies, non-finite and out-of-range knobs, YAML errors with their line, and client text cut
short in answers and logs."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import grpc
import pytest

from rlhf.errors import MAX_DETAIL_CHARS, RpcError, handle_errors
from rlhf.logs import JsonFormatter, quote
from rlhf.protocol import POLICY_DESCRIPTOR, REWARD_DESCRIPTOR, TRAINER_DESCRIPTOR
from rlhf.v1 import (
    policy_pb2,
    policy_pb2_grpc,
    reward_pb2,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.policy.server import PolicyServicer
from services.reward.backends.vader import VaderBackend
from services.reward.server import RewardServicer, ScoreSettings
from services.reward.server import servicers as reward_servicers
from services.trainer.api.service import servicers as trainer_servicers
from tests.boundary import (
    Code,
    IdleTrainer,
    raw_call,
    server,
)

GARBAGE = b"\xff\xff\xff\xff\x0f"  # a truncated varint tag: no message parses from it


def test_quote_cuts_client_text() -> None:
    assert quote("abc") == "'abc'"
    long = quote("x" * 1_000_000)
    assert len(long) < 80 and "1000000 characters" in long


def test_handle_errors_cuts_long_messages() -> None:
    class Context:
        def abort(self, code: grpc.StatusCode, details: str) -> None:
            self.code, self.details = code, details
            raise RuntimeError("aborted")

    @handle_errors
    def method(self: object, request: object, context: object) -> None:
        raise RpcError(Code.NOT_FOUND, "no run " + "y" * 100_000)

    context = Context()
    with pytest.raises(RuntimeError):
        method(None, None, context)
    assert context.code == Code.NOT_FOUND and len(context.details) < MAX_DETAIL_CHARS + 40


def test_undecodable_bodies_are_invalid_argument_on_every_rpc(
    bounded_policy: tuple[PolicyServicer, grpc.Channel], tmp_path: Path
) -> None:
    reward = server("reward", reward_servicers(RewardServicer(ScoreSettings(), VaderBackend())))
    trainer = server("trainer", trainer_servicers(IdleTrainer(tmp_path)))
    _, policy_channel = bounded_policy
    try:
        for service, channel in [
            (POLICY_DESCRIPTOR, policy_channel),
            (REWARD_DESCRIPTOR, grpc.insecure_channel(f"127.0.0.1:{reward.port}")),
            (TRAINER_DESCRIPTOR, grpc.insecure_channel(f"127.0.0.1:{trainer.port}")),
        ]:
            for method in service.methods_by_name:
                code, details = raw_call(channel, service, method, GARBAGE)
                assert code == Code.INVALID_ARGUMENT, (method, code, details)
                assert "not a valid request message" in details or "malformed" in details
    finally:
        reward.stop(grace_s=0)
        trainer.stop(grace_s=0)


def test_a_huge_run_id_gets_a_short_answer_and_a_short_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = server("trainer", trainer_servicers(IdleTrainer(tmp_path)))
    stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(f"127.0.0.1:{trainer.port}"))
    caplog.set_level(logging.INFO, logger="rlhf")
    try:
        # 1 MB: over the message cap; 200 kB: read, then refused as no possible run id.
        for size, code in [(1_000_000, Code.INVALID_ARGUMENT), (200_000, Code.INVALID_ARGUMENT)]:
            with pytest.raises(grpc.RpcError) as err:
                stub.GetRun(trainer_pb2.GetRunRequest(run_id="x" * size), timeout=5)
            assert err.value.code() == code and len(err.value.details()) < 200
    finally:
        trainer.stop(grace_s=0)
    refusals = [r for r in caplog.records if r.getMessage() == "request refused"]
    assert len(refusals) == 2
    assert all(len(JsonFormatter("trainer").format(r)) < 1000 for r in caplog.records)


def test_yaml_errors_are_invalid_argument_with_line_and_column(tmp_path: Path) -> None:
    trainer = server("trainer", trainer_servicers(IdleTrainer(tmp_path)))
    stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(f"127.0.0.1:{trainer.port}"))
    broken = "run:\n  steps: 3\n ppo: [1,\n"
    try:
        for text in (broken, "a: " + "{b: " * 3000 + "1" + "}" * 3000):
            with pytest.raises(grpc.RpcError) as err:
                stub.StartRun(trainer_pb2.StartRunRequest(config_yaml=text), timeout=10)
            assert err.value.code() == Code.INVALID_ARGUMENT, err.value.details()
            assert len(err.value.details()) < 1000
        with pytest.raises(grpc.RpcError) as err:
            stub.StartRun(trainer_pb2.StartRunRequest(config_yaml=broken), timeout=10)
        assert "line 3, column" in err.value.details()
    finally:
        trainer.stop(grace_s=0)


@pytest.mark.parametrize(
    "knobs",
    [
        {"temperature": math.inf},
        {"temperature": 1e-45},
        {"temperature": math.nan},
        {"temperature": 1e6},
        {"top_p": math.nan},
        {"top_p": -math.inf},
    ],
)
def test_non_finite_or_out_of_range_floats_are_invalid(
    bounded_policy: tuple[PolicyServicer, grpc.Channel], knobs: dict[str, float]
) -> None:
    stub = policy_pb2_grpc.PolicyServiceStub(bounded_policy[1])
    params = policy_pb2.GenerationParams(max_new_tokens=2, **knobs)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(policy_pb2.GenerateRequest(prompts=["hi"], params=params), timeout=10)
    assert err.value.code() == Code.INVALID_ARGUMENT, err.value.details()


def test_a_long_request_id_is_refused_in_short(
    bounded_policy: tuple[PolicyServicer, grpc.Channel],
) -> None:
    stub = policy_pb2_grpc.PolicyServiceStub(bounded_policy[1])
    request = policy_pb2.GenerateRequest(
        prompts=["hi"], params={"max_new_tokens": 2}, request_id="r" * 100_000
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=10)
    assert err.value.code() == Code.INVALID_ARGUMENT and len(err.value.details()) < 200


def test_oversized_score_is_refused_before_parsing() -> None:
    servicer = RewardServicer(ScoreSettings(max_total_chars=1000, max_samples=4), VaderBackend())
    service = server("reward", reward_servicers(servicer))
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        body = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(response="a" * 9000)])
        code, details = raw_call(channel, REWARD_DESCRIPTOR, "Score", body.SerializeToString())
        assert code == Code.RESOURCE_EXHAUSTED and "bytes" in details
    finally:
        channel.close()
        service.stop(grace_s=0)
