"""The reward service through real gRPC servers on 127.0.0.1: scores checked against the
libraries' own numbers computed here, the error contract, health, reflection and the CLI."""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf.channels import wait_until_serving
from rlhf.clients import RewardClient
from rlhf.server import GrpcService, ServerConfig
from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.reward import cli
from services.reward.backends import build_backend
from services.reward.backends.base import RewardBackend
from services.reward.backends.keyword import KeywordBackend
from services.reward.backends.length import LengthBackend
from services.reward.backends.vader import VaderBackend
from services.reward.server import RewardServicer, ScoreSettings, build_server
from tools.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Explain the concept of KL divergence in simple terms:",
    "Write a short poem about a robot learning:",
    "What are the main stages of RLHF?",
    "",
    "Suggest a name for a friendly AI assistant:",
]
RESPONSES = [
    " It is a wonderful, really simple idea!",
    " The robot was sad and the day was terrible.",
    " I hate this. Not good at all :(",
    "Meh.",
    "",
]
# Words of the tiny tokenizer's vocabulary, so the tiny models see real tokens.
TINY_TEXTS = [
    "the movie was good",
    "i love this film very very much !",
    "bad",
    "what a terrible , boring story . i hate it",
    "hello world",
    "this is not a happy day but it is not sad",
    "explain kl divergence in simple terms",
    "great",
    "write me a short poem about a friendly robot and the story of a good day",
    "yes",
]


def args_for(*argv: str) -> argparse.Namespace:
    """The reward CLI's parsed flags, so tests go through the same wiring as `rlhf reward`."""
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args(list(argv))


@contextmanager
def serving(
    backend: RewardBackend | None,
    settings: ScoreSettings | None = None,
    servicer: RewardServicer | None = None,
) -> Iterator[tuple[GrpcService, grpc.Channel, reward_pb2_grpc.RewardServiceStub]]:
    """A real server on a free loopback port, and a plain channel (no retries) to it."""
    config = ServerConfig(host="127.0.0.1", port=0, workers=4, grace_s=0)
    service = build_server(backend, config, settings, servicer=servicer)
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield service, channel, reward_pb2_grpc.RewardServiceStub(channel)
    finally:
        channel.close()
        service.stop(grace_s=0)


def score(stub: reward_pb2_grpc.RewardServiceStub, prompts: list[str], responses: list[str]):
    samples = [reward_pb2.Sample(prompt=p, response=r) for p, r in zip(prompts, responses)]
    return list(stub.Score(reward_pb2.ScoreRequest(samples=samples), timeout=30).scores)


def score_texts(stub: reward_pb2_grpc.RewardServiceStub, texts: list[str]) -> list[float]:
    return score(stub, [""] * len(texts), texts)


def expect_error(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details()


def reference_outputs(folder: Path, texts: list[str]) -> torch.Tensor:
    """Each text's logits, one at a time (no padding), with transformers directly."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            rows.append(model(**tokenizer(text, return_tensors="pt")).logits[0])
    return torch.stack(rows)


# ---- scores ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["response", "prompt+response"])
def test_vader_scores_equal_vader_compound(mode: str) -> None:
    analyzer = SentimentIntensityAnalyzer()
    texts = [p + r if mode == "prompt+response" else r for p, r in zip(PROMPTS, RESPONSES)]
    expected = [analyzer.polarity_scores(t)["compound"] for t in texts]
    backend = build_backend(args_for("--backend", "vader"))
    with serving(backend, ScoreSettings(input=mode)) as (_, _, stub):
        got = score(stub, PROMPTS, RESPONSES)
    assert got == pytest.approx(expected, abs=1e-6)
    if mode == "prompt+response":  # the prompt really changes what is scored
        assert got != pytest.approx([analyzer.polarity_scores(r)["compound"] for r in RESPONSES])


def test_hf_classifier_label_probability_and_logit(tiny_classifier: Path) -> None:
    logits = reference_outputs(tiny_classifier, TINY_TEXTS)
    positive = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).config.label2id[
        "POSITIVE"
    ]
    probability = torch.softmax(logits, dim=-1)[:, positive].tolist()
    raw = logits[:, positive].tolist()
    model = str(tiny_classifier)
    prob_backend = build_backend(
        args_for("--backend", "hf-classifier", "--model", model, "--label", "POSITIVE")
    )
    with serving(prob_backend) as (_, _, stub):
        assert score_texts(stub, TINY_TEXTS) == pytest.approx(probability, abs=1e-5)
    logit_backend = build_backend(
        args_for("--backend", "hf-classifier", "--model", model, "--label", "POSITIVE", "--logit")
    )
    with serving(logit_backend) as (_, _, stub):
        assert score_texts(stub, TINY_TEXTS) == pytest.approx(raw, abs=1e-5)


def test_single_logit_reward_model_returns_its_scalar(tiny_reward_model: Path) -> None:
    expected = reference_outputs(tiny_reward_model, TINY_TEXTS)[:, 0].tolist()
    backend = build_backend(
        args_for("--backend", "hf-classifier", "--model", str(tiny_reward_model))
    )
    with serving(backend) as (_, _, stub):
        assert score_texts(stub, TINY_TEXTS) == pytest.approx(expected, abs=1e-5)


def test_batches_across_max_batch_size_give_unbatched_scores(tiny_classifier: Path) -> None:
    """10 texts of mixed lengths in passes of 3 (padded) equal passes of 1 (no padding)."""
    texts = TINY_TEXTS + ["", "good"]  # an empty text too
    scores = {}
    for size in (1, 3, 64):
        backend = build_backend(
            args_for(
                *("--backend", "hf-classifier", "--model", str(tiny_classifier)),
                *("--label", "POSITIVE", "--logit", "--max-batch-size", str(size)),
            )
        )
        with serving(backend, ScoreSettings(max_batch_size=size)) as (_, _, stub):
            scores[size] = score_texts(stub, texts)
            assert stub.GetInfo(common_pb2.GetInfoRequest()).max_batch_size == size
    assert scores[3] == pytest.approx(scores[1], abs=1e-5)
    assert scores[64] == pytest.approx(scores[1], abs=1e-5)


def test_length_and_keyword_rules() -> None:
    texts = ["one two three four", "", "a b c d e f g h", "one", "Good good goodness, thank you!"]
    with serving(LengthBackend(target=4, unit="words")) as (_, _, stub):
        # 4, 0, 8, 1 and 5 words
        assert score_texts(stub, texts) == pytest.approx([0.0, -1.0, -1.0, -0.75, -0.25])
    with serving(LengthBackend(target=10, unit="chars")) as (_, _, stub):
        # 18 chars -> -0.8; 0 -> -1; 15 -> -0.5; 3 -> -0.7; 30 -> -2
        assert score_texts(stub, texts) == pytest.approx([-0.8, -1.0, -0.5, -0.7, -2.0])
    keywords = KeywordBackend(["good", "thank you", "!"], weight=0.5)
    with serving(keywords) as (_, _, stub):
        # "Good", "good" (not "goodness"), "thank you", "!" -> 4 x 0.5
        assert score_texts(stub, texts) == pytest.approx([0.0, 0.0, 0.0, 0.0, 2.0])
    built = build_backend(args_for("--backend", "keyword", "--keywords", "one, two"))
    assert built.score(["One two, one; someone"]) == [3.0]


# ---- the error contract ---------------------------------------------------------------------


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


# ---- info, health, reflection ---------------------------------------------------------------


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


# ---- flags and the `rlhf reward serve` process ----------------------------------------------


def test_bad_flag_combinations_are_refused(tiny_classifier: Path) -> None:
    assert "needs --model" in (cli.check_flags(args_for("--backend", "hf-classifier")) or "")
    assert "needs --keywords" in (cli.check_flags(args_for("--backend", "keyword")) or "")
    assert cli.check_flags(args_for("--backend", "vader")) is None
    assert cli.ignored_flags(args_for("--backend", "vader", "--model", "x")) == ["--model"]
    model = ("--backend", "hf-classifier", "--model", str(tiny_classifier))
    with pytest.raises(ValueError, match="not one of the model's labels: NEGATIVE, POSITIVE"):
        build_backend(args_for(*model, "--label", "NEUTRAL"))
    with pytest.raises(ValueError, match="choose one with --label"):
        build_backend(args_for(*model, "--logit"))
    with pytest.raises(ValueError, match="choose one with --label"):
        build_backend(args_for(*model))


def rlhf_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "rlhf.cli", "reward", "serve", *argv]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}


def wait_for_process(proc: subprocess.Popen, channel: grpc.Channel, timeout_s: float = 30) -> None:
    """Until the service reports SERVING; fails at once, with its log, if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the service exited with {proc.returncode}: {proc.communicate()[1]}")
        try:
            wait_until_serving(channel, "rlhf.v1.RewardService", timeout_s=1)
            return
        except TimeoutError:
            continue
    pytest.fail(f"the service was not SERVING after {timeout_s}s")


def test_process_serves_and_exits_zero_on_sigterm() -> None:
    port = free_port()
    argv = ("--backend", "vader", "--host", "127.0.0.1", "--port", str(port), "--grace-s", "2")
    proc = subprocess.Popen(
        rlhf_command(*argv),
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_for_process(proc, channel)
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        analyzer = SentimentIntensityAnalyzer()
        expected = analyzer.polarity_scores("What a great day!")["compound"]
        assert score_texts(stub, ["What a great day!"]) == pytest.approx([expected], abs=1e-6)
        channel.close()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert '"msg": "scored"' in stderr and '"samples": 1' in stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--backend", "hf-classifier", "--model", "/nonexistent"), "/nonexistent"),
        (("--backend", "nope"), "invalid choice: 'nope'"),
        (("--backend", "hf-classifier"), "needs --model"),
    ],
)
def test_process_refuses_to_start(argv: tuple[str, ...], expected: str) -> None:
    done = subprocess.run(
        rlhf_command(*argv, "--host", "127.0.0.1", "--port", str(free_port())),
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode != 0
    assert expected in done.stderr, done.stderr
    if "/nonexistent" in argv:
        assert "does not exist" in done.stderr
