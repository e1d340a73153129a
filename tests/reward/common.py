"""What the reward service's tests share: a real server on a free loopback port, request
helpers, and texts to score."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.server import GrpcService, ServerConfig, build_server
from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.reward import cli
from services.reward.backends.base import RewardBackend
from services.reward.server import RewardServicer, ScoreSettings, servicers

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
    """A real server on a free loopback port, and a plain channel (no retries) to it: SERVING
    with a backend; without one NOT_SERVING, until `servicer.set_backend` and `set_serving()`."""
    if servicer is None:
        servicer = RewardServicer(settings or ScoreSettings(), backend)
    config = ServerConfig(host="127.0.0.1", port=0, workers=4, grace_s=0)
    service = build_server("reward", servicers(servicer), config, serving=backend is not None)
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
