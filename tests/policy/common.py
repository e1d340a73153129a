"""What the policy service's tests share: the request helpers and the server's limits."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
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


def assert_refused_and_serving(
    client: PolicyClient,
    prompts: list[str],
    request_params: policy_pb2.GenerationParams,
    code: grpc.StatusCode,
    message: str,
) -> None:
    """A bad Generate gets `code` with `message` in its details, and the service answers the
    next good one: every engine's answer to tests.policy.test_generate's BAD_REQUESTS."""
    with pytest.raises(grpc.RpcError) as err:
        client.generate(prompts, request_params)
    assert err.value.code() == code
    assert message in err.value.details()
    assert len(client.generate(["hi"], params(max_new_tokens=2)).completions) == 1


def assert_cut_uploads_keep_the_old_weights(
    client: PolicyClient, chunks: list[policy_pb2.WeightChunk], version: int
) -> None:
    """Two broken uploads of `chunks` (a stream the client breaks after 3 chunks, and one that
    ends 2 chunks early): each refused, `version` and its greedy output still serving."""
    assert len(chunks) > 4
    before = tokens(client.generate(PROMPTS, GREEDY))

    def cut() -> Iterator[policy_pb2.WeightChunk]:
        yield from chunks[:3]
        raise RuntimeError("trainer crashed mid-upload")

    with pytest.raises(grpc.RpcError) as err:
        client.stub.UpdateWeights(cut(), timeout=30)
    assert err.value.code() in (Code.CANCELLED, Code.UNKNOWN)
    assert_old_weights_serve(client, version, before)

    with pytest.raises(grpc.RpcError) as err:
        client.stub.UpdateWeights(iter(chunks[:-2]), timeout=30)
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "stream ended after" in err.value.details() and "not applied" in err.value.details()
    assert_old_weights_serve(client, version, before)
