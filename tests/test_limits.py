"""Bounded resources at the service boundary (issue #12, item 7): idle and capped streams,
stalled and padded uploads, the reward service's per-call work bound, and calls nobody waits
for any more dropped before their work starts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.clients import RewardClient
from rlhf.v1 import (
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer
from services.reward.server import RewardServicer, ScoreSettings
from services.reward.server import servicers as reward_servicers
from services.trainer.api.service import servicers as trainer_servicers
from tests.boundary import (
    Code,
    IdleTrainer,
    RecordingBackend,
    server,
    upload,
)


@pytest.fixture
def stub(bounded_policy: tuple[PolicyServicer, grpc.Channel]) -> policy_pb2_grpc.PolicyServiceStub:
    """A stub on conftest's bounded policy service (its upload limits: 0.5 s idle, 4 chunks)."""
    return policy_pb2_grpc.PolicyServiceStub(bounded_policy[1])


def test_fifty_idle_watchers_leave_health_and_get_run_fast(tmp_path: Path) -> None:
    trainer = server("trainer", trainer_servicers(IdleTrainer(tmp_path)))
    channel = grpc.insecure_channel(f"127.0.0.1:{trainer.port}")
    stub = trainer_pb2_grpc.TrainerServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    watches = [stub.WatchRun(trainer_pb2.WatchRunRequest(run_id="r")) for _ in range(50)]
    try:
        for watch in watches:  # each has its first message: all 50 are open on the server
            assert next(watch).event == trainer_pb2.WATCH_EVENT_PROGRESS
        for _ in range(5):
            started = time.monotonic()
            assert stub.GetRun(trainer_pb2.GetRunRequest(run_id="r"), timeout=1).run_id == "r"
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - started < 1
    finally:
        for watch in watches:
            watch.cancel()
        channel.close()
        trainer.stop(grace_s=0)


def test_streams_beyond_max_streams_are_refused_and_slots_come_back(tmp_path: Path) -> None:
    trainer = server("trainer", trainer_servicers(IdleTrainer(tmp_path)), max_streams=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{trainer.port}")
    stub = trainer_pb2_grpc.TrainerServiceStub(channel)
    request = trainer_pb2.WatchRunRequest(run_id="r")
    try:
        open_ = [stub.WatchRun(request) for _ in range(2)]
        for watch in open_:
            next(watch)
        with pytest.raises(grpc.RpcError) as err:
            next(stub.WatchRun(request, timeout=5))
        assert err.value.code() == Code.RESOURCE_EXHAUSTED
        assert "--max-streams" in err.value.details()
        assert stub.GetRun(trainer_pb2.GetRunRequest(run_id="r"), timeout=1).run_id == "r"
        open_[0].cancel()
        deadline = time.monotonic() + 5
        while True:  # the cancelled stream's slot is given back once its generator is closed
            try:
                next(stub.WatchRun(request, timeout=5))
                break
            except grpc.RpcError as again:
                assert again.code() == Code.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the slot never came back"
                time.sleep(0.05)
        open_[1].cancel()
    finally:
        channel.close()
        trainer.stop(grace_s=0)


def test_a_stalled_upload_is_ended_and_the_old_weights_serve(
    stub: policy_pb2_grpc.PolicyServiceStub, engine: PolicyEngine
) -> None:
    served = engine.weight_version
    chunks = upload(engine, served + 1, chunk_bytes=1 << 30)
    never = threading.Event()

    def stall() -> Iterator[policy_pb2.WeightChunk]:
        yield chunks[0]
        never.wait(30)  # sends nothing more; the server's idle limit (0.5 s) ends the call

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateWeights(stall(), timeout=20)
    never.set()
    assert err.value.code() == Code.DEADLINE_EXCEEDED and "idle" in err.value.details()
    assert time.monotonic() - started < 10
    _readers_end()
    assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5).weight_version == served
    reply = stub.Generate(
        policy_pb2.GenerateRequest(prompts=["hello"], params={"max_new_tokens": 2}), timeout=10
    )
    assert reply.weight_version == served


def _readers_end() -> None:
    """Every ended upload's reader thread (rlhf.handlers) ends too."""
    deadline = time.monotonic() + 10
    while any(t.name == "UpdateWeights-reader" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "an ended upload's reader thread lives on"
        time.sleep(0.05)


def test_upload_chunk_count_is_capped_and_empty_chunks_refused(
    stub: policy_pb2_grpc.PolicyServiceStub, engine: PolicyEngine
) -> None:
    served = engine.weight_version
    many = upload(engine, served + 1, chunk_bytes=4096)  # far more than max_upload_chunks 4
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateWeights(iter(many), timeout=20)
    assert err.value.code() == Code.RESOURCE_EXHAUSTED
    assert "max-upload-chunks" in err.value.details()
    _readers_end()
    one = upload(engine, served + 1, chunk_bytes=1 << 30)
    empty = policy_pb2.WeightChunk(offset=0, crc32=0)  # the manifest chunk carried no data
    padded = [policy_pb2.WeightChunk(manifest=one[0].manifest, crc32=0), empty]
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateWeights(iter(padded), timeout=20)
    assert err.value.code() == Code.INVALID_ARGUMENT and "no data" in err.value.details()
    assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5).weight_version == served
    assert stub.UpdateWeights(iter(one), timeout=20).version == served + 1  # a good one still


def test_reward_total_characters_are_capped_and_reported() -> None:
    servicer = RewardServicer(ScoreSettings(max_total_chars=100), RecordingBackend())
    service = server("reward", reward_servicers(servicer))
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{service.port}"))
    try:
        assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5).max_total_chars == 100
        samples = [reward_pb2.Sample(prompt="p" * 20, response="r" * 20) for _ in range(3)]
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(reward_pb2.ScoreRequest(samples=samples), timeout=5)
        assert err.value.code() == Code.RESOURCE_EXHAUSTED and "120 characters" in (
            err.value.details()
        )
        assert servicer.backend.scored == []  # refused before any work
        ok = stub.Score(reward_pb2.ScoreRequest(samples=samples[:2]), timeout=5)
        assert list(ok.scores) == [0.5, 0.5]
    finally:
        service.stop(grace_s=0)


def test_policy_drops_a_generate_whose_deadline_passed_while_queued(
    bounded_policy: tuple[PolicyServicer, grpc.Channel],
    stub: policy_pb2_grpc.PolicyServiceStub,
    engine: PolicyEngine,
) -> None:
    servicer = bounded_policy[0]
    busy, release = threading.Event(), threading.Event()
    calls: list[list[str]] = []
    original = engine.generate

    def occupy() -> None:
        busy.set()
        release.wait(30)

    def counting(prompts: list[str], params: object) -> object:
        calls.append(list(prompts))
        return original(prompts, params)

    engine.generate = counting  # type: ignore[method-assign]
    try:
        servicer.compute.submit(occupy)
        assert busy.wait(10)
        late = policy_pb2.GenerateRequest(prompts=["too late"], params={"max_new_tokens": 2})
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(late, timeout=0.3)
        assert err.value.code() == Code.DEADLINE_EXCEEDED
        release.set()
        fresh = policy_pb2.GenerateRequest(prompts=["on time"], params={"max_new_tokens": 2})
        assert len(stub.Generate(fresh, timeout=10).completions) == 1
        assert calls == [["on time"]]  # the expired call never reached the model
    finally:
        release.set()
        del engine.generate


def test_reward_drops_calls_whose_deadline_passed_while_queued() -> None:
    backend = RecordingBackend()
    servicer = RewardServicer(ScoreSettings(), backend)
    service = server("reward", reward_servicers(servicer))
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{service.port}"))
    busy, release = threading.Event(), threading.Event()

    def occupy() -> None:  # the compute thread is busy with an earlier call
        busy.set()
        release.wait(30)

    try:
        servicer.compute.submit(occupy)
        assert busy.wait(10)
        late = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(response="too late")])
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(late, timeout=0.3)
        assert err.value.code() == Code.DEADLINE_EXCEEDED
        release.set()
        fresh = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(response="on time")])
        assert list(stub.Score(fresh, timeout=10).scores) == [0.5]
        assert backend.scored == ["on time"]  # the expired call was dropped unscored
    finally:
        release.set()
        service.stop(grace_s=0)


def test_reward_client_splits_by_total_characters() -> None:
    class Batches(RecordingBackend):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        def score(self, texts: list[str]) -> list[float]:
            self.sizes.append(len(texts))
            return super().score(texts)

    backend = Batches()
    servicer = RewardServicer(ScoreSettings(max_total_chars=30), backend)
    service = server("reward", reward_servicers(servicer))
    client = RewardClient(f"127.0.0.1:{service.port}")
    try:
        assert client.info().max_total_chars == 30
        texts = [f"text {i:05d}" for i in range(7)]  # 10 characters each
        assert client.score([""] * 7, texts) == [0.5] * 7
        assert backend.sizes == [3, 3, 1] and backend.scored == texts  # in order, within limits
    finally:
        client.close()
        service.stop(grace_s=0)
