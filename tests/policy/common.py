"""What the policy service's tests share: the request helpers and the server's limits."""

from __future__ import annotations

import grpc
import torch

from rlhf.clients import PolicyClient
from rlhf.v1 import policy_pb2
from rlhf.weights import encode_weights
from services.policy.engine import EngineLimits

LIMITS = EngineLimits(max_new_tokens_cap=64, max_batch_size=8, max_prompt_chars=600)
PROMPTS = ["hello world", "the movie was very good and i really love it", "why"]
Code = grpc.StatusCode


def params(**kw: object) -> policy_pb2.GenerationParams:
    kw.setdefault("max_new_tokens", 8)
    return policy_pb2.GenerationParams(**kw)  # type: ignore[arg-type]


def tokens(reply: policy_pb2.GenerateResponse) -> list[list[int]]:
    return [list(c.response_token_ids) for c in reply.completions]


def served_version(client: PolicyClient) -> int:
    return client.info().weight_version


GREEDY = params(max_new_tokens=12, do_sample=False)


def upload_chunks(weights: dict[str, torch.Tensor], version: int) -> list[policy_pb2.WeightChunk]:
    """An upload of `weights` as `version`, in small chunks (so a stream can be cut mid-way)."""
    return list(encode_weights(weights, version, chunk_bytes=16 * 1024))


def assert_old_weights_serve(client: PolicyClient, version: int, before: list[list[int]]) -> None:
    """`version` still serves, and greedy decoding still gives `before`."""
    reply = client.generate(PROMPTS, GREEDY)
    assert reply.weight_version == version == client.info().weight_version
    assert tokens(reply) == before
