"""The reward service's contract through a real server: request limits, bad backend output
(INTERNAL, and the server keeps serving), the client's batching, GetInfo, health and
reflection."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from rlhf.channels import wait_until_serving
from rlhf.clients import RewardClient
from rlhf.v1 import common_pb2, reward_pb2
from services.reward.backends import build_backend
from services.reward.backends.base import RewardBackend
from services.reward.backends.vader import VaderBackend
from services.reward.server import RewardServicer, ScoreSettings
from tests.reward.common import (
    RESPONSES,
    args_for,
    expect_error,
    score,
    score_texts,
    serving,
)


def test_empty_too_many_and_oversized_requests() -> None:
    settings = ScoreSettings(max_samples=4, max_text_chars=20)
    with serving(VaderBackend(), settings) as (_, _, stub):
        assert list(stub.Score(reward_pb2.ScoreRequest(), timeout=10).scores) == []
        assert len(score_texts(stub, ["good"] * 4)) == 4
        details = expect_error(
            lambda: score_texts(stub, ["good"] * 5), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert "5 samples" in details and "4" in details
        # prompt + response together count: 12 + 9 = 21 > 20 at sample 1
        details = expect_error(
            lambda: score(stub, ["a", "twelve chars"], ["b", "nine char"]),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "sample 1" in details and "21" in details
        assert len(score(stub, ["", "x" * 10], ["", "y" * 10])) == 2  # exactly at the limit


class CountingBackend(RewardBackend):
    """Test-only: VADER, recording the batches it was given and the threads that scored them."""

    name = "counting"
    description = "test backend"

    def __init__(self) -> None:
        self.vader = VaderBackend()
        self.batch_sizes: list[int] = []
        self.threads: set[str] = set()

    def score(self, texts: list[str]) -> list[float]:
        self.batch_sizes.append(len(texts))
        self.threads.add(threading.current_thread().name)
        return self.vader.score(texts)


def test_client_splits_a_batch_larger_than_the_services_limit() -> None:
    backend = CountingBackend()
    texts = [f"{t} number {i}" for i, t in enumerate(RESPONSES * 2)]
    with serving(backend, ScoreSettings(max_samples=4)) as (service, _, _):
        client = RewardClient(f"127.0.0.1:{service.port}")
        try:
            # Before GetInfo the client does not know the limit: one call, refused as too big.
            expect_error(lambda: client.score([""] * 10, texts), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert client.info().max_samples_per_request == 4
            assert client.score([""] * 10, texts) == pytest.approx(
                VaderBackend().score(texts), abs=1e-6
            )
            assert backend.batch_sizes == [4, 4, 2]  # in order, never over the limit
            assert backend.threads == {"reward-compute"}  # never a gRPC worker thread
            assert client.score([], []) == []
        finally:
            client.close()


class FlakyBackend(RewardBackend):
    """Test-only: NaN for texts containing "nan", inf for "inf", too few scores for "short"."""

    name = "flaky"
    description = "test backend"

    def score(self, texts: list[str]) -> list[float]:
        if any("short" in t for t in texts):
            return [0.0] * (len(texts) - 1)
        values = {"nan": math.nan, "inf": math.inf, "huge": 1e39}
        return [next((v for k, v in values.items() if k in t), 0.25) for t in texts]


def test_bad_backend_output_fails_the_call_and_the_server_keeps_serving() -> None:
    with serving(FlakyBackend()) as (_, _, stub):
        details = expect_error(
            lambda: score_texts(stub, ["ok", "ok", "a nan here"]), grpc.StatusCode.INTERNAL
        )
        assert "sample 2" in details and "non-finite" in details
        details = expect_error(lambda: score_texts(stub, ["inf"]), grpc.StatusCode.INTERNAL)
        assert "sample 0" in details
        # finite in float64 but inf as the wire's float32
        expect_error(lambda: score_texts(stub, ["ok", "huge"]), grpc.StatusCode.INTERNAL)
        details = expect_error(lambda: score_texts(stub, ["ok", "short"]), grpc.StatusCode.INTERNAL)
        assert "1 scores for 2 samples" in details
        assert score_texts(stub, ["fine", "also fine"]) == [0.25, 0.25]


def test_get_info_reports_every_field(tiny_classifier: Path) -> None:
    settings = ScoreSettings(
        name="sentiment", input="prompt+response", max_batch_size=8, max_samples=100,
        max_text_chars=500,
    )  # fmt: skip
    with serving(VaderBackend(), settings) as (_, _, stub):
        info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10)
    assert (info.name, info.backend, info.model, info.device) == ("sentiment", "vader", "", "")
    assert info.input == "prompt+response"
    assert (info.max_batch_size, info.max_samples_per_request, info.max_text_chars) == (8, 100, 500)
    assert "[-1, 1]" in info.description

    args = args_for(
        *("--backend", "hf-classifier", "--model", str(tiny_classifier), "--label", "POSITIVE"),
    )
    with serving(build_backend(args)) as (_, _, stub):
        info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10)
    assert (info.name, info.backend) == ("hf-classifier", "hf-classifier")
    assert (info.model, info.device, info.input) == (str(tiny_classifier), "cpu", "response")
    assert "POSITIVE" in info.description and "probability" in info.description
    assert (info.max_batch_size, info.max_samples_per_request, info.max_text_chars) == (
        32,
        1024,
        20000,
    )


def test_health_goes_from_not_serving_to_serving_and_reflection_lists_the_service() -> None:
    servicer = RewardServicer(ScoreSettings())
    with serving(None, servicer=servicer) as (service, channel, stub):
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "rlhf.v1.RewardService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        expect_error(lambda: score_texts(stub, ["good"]), grpc.StatusCode.UNAVAILABLE)

        servicer.set_backend(VaderBackend())
        service.set_serving()
        wait_until_serving(channel, "rlhf.v1.RewardService", timeout_s=5)
        assert len(score_texts(stub, ["good"])) == 1

        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "rlhf.v1.RewardService" in services and "grpc.health.v1.Health" in services
