"""UpdateWeights through a real policy server (tests/policy/conftest.py): new versions served
exactly, with or without a copy; broken, corrupt or stale uploads rejected with the old weights
still serving; the codec's fast paths; the model work on the compute thread."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from rlhf.clients import PolicyClient
from rlhf.v1 import policy_pb2
from rlhf.weight_receiver import decode_chunk
from rlhf.weights import encode_weight_frames, encode_weights
from services.policy.engine import PolicyEngine
from services.policy.server import params_from_proto
from tests.policy.common import (
    GREEDY,
    PROMPTS,
    Code,
    assert_cut_uploads_keep_the_old_weights,
    assert_old_weights_serve,
    params,
    served_version,
    tokens,
    upload_chunks,
)


def test_update_weights_changes_outputs_and_version(
    client: PolicyClient,
    engine: PolicyEngine,
    other_engine: PolicyEngine,
    other_weights: dict[str, torch.Tensor],
) -> None:
    version = served_version(client)
    before = client.generate(PROMPTS, GREEDY)
    assert before.weight_version == version
    # Tied embeddings: the upload may carry lm_head.weight instead of model.embed_tokens.weight.
    upload = {k: v for k, v in other_weights.items() if k != "model.embed_tokens.weight"}
    reply = client.update_weights(upload, version + 1, chunk_bytes=64 * 1024)
    assert reply.version == version + 1 and reply.tensors_updated == len(upload)
    assert reply.bytes_received == sum(t.numel() * 4 for t in upload.values())
    after = client.generate(PROMPTS, GREEDY)
    assert after.weight_version == version + 1 and client.info().weight_version == version + 1
    assert tokens(after) != tokens(before)
    # ...and exactly the new model's output: the embedding was updated through lm_head.
    expected = other_engine.generate(PROMPTS, params_from_proto(GREEDY))
    assert tokens(after) == [c.response_token_ids for c in expected]
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight  # still tied


def test_full_and_partial_updates(
    client: PolicyClient, engine: PolicyEngine, other_weights: dict[str, torch.Tensor]
) -> None:
    """A full upload becomes the served weights without a copy (the receive buffers alternate,
    two at most); a partial one is copied into them. Both serve exactly what was sent."""
    version = served_version(client)
    for step in range(1, 4):
        client.update_weights(other_weights, version + step)
        for name, tensor in engine.model.state_dict().items():
            assert torch.equal(tensor, other_weights[name]), name
    assert engine.weights.buffers_held <= 2  # the double buffer, not one per update
    before = client.generate(PROMPTS, GREEDY).completions[0].response_logprobs
    norm = torch.rand(other_weights["model.norm.weight"].shape, generator=torch.Generator())
    reply = client.update_weights({"model.norm.weight": norm}, version + 4)
    assert reply.version == version + 4 and reply.tensors_updated == 1
    assert torch.equal(engine.model.model.norm.weight, norm)
    assert torch.equal(engine.model.lm_head.weight, other_weights["lm_head.weight"])
    assert client.generate(PROMPTS, GREEDY).completions[0].response_logprobs != before
    client.update_weights(other_weights, version + 5)


def test_broken_streams_leave_the_old_weights(
    client: PolicyClient, other_weights: dict[str, torch.Tensor]
) -> None:
    version = served_version(client)
    chunks = upload_chunks(other_weights, version + 1)
    assert_cut_uploads_keep_the_old_weights(client, chunks, version)


def _corrupt_chunk(chunks: list[policy_pb2.WeightChunk]) -> list[policy_pb2.WeightChunk]:
    chunks[1].data = bytes([chunks[1].data[0] ^ 0xFF]) + chunks[1].data[1:]
    return chunks


def _corrupt_payload_crc(chunks: list[policy_pb2.WeightChunk]) -> list[policy_pb2.WeightChunk]:
    chunks[-1].payload_crc32 ^= 1
    return chunks


def _drop_manifest(chunks: list[policy_pb2.WeightChunk]) -> list[policy_pb2.WeightChunk]:
    chunks[0].ClearField("manifest")
    return chunks


BAD_UPLOADS = [
    # (id, how to change the weights, chunk mutation, version delta, code, message)
    (
        "unknown name",
        lambda w: {**w, "model.extra.weight": torch.zeros(3)},
        None,
        1,
        Code.INVALID_ARGUMENT,
        "'model.extra.weight': no such tensor",
    ),
    (
        "wrong shape",
        lambda w: {**w, "model.norm.weight": torch.zeros(63)},
        None,
        1,
        Code.INVALID_ARGUMENT,
        "model.norm.weight: shape [63], served [64]",
    ),
    (
        "wrong dtype",
        lambda w: {k: v.half() for k, v in w.items()},
        None,
        1,
        Code.INVALID_ARGUMENT,
        "dtype 'float16', served float32",
    ),
    ("chunk crc", None, _corrupt_chunk, 1, Code.INVALID_ARGUMENT, "corrupted in transit"),
    ("payload crc", None, _corrupt_payload_crc, 1, Code.INVALID_ARGUMENT, "payload CRC-32"),
    ("no manifest", None, _drop_manifest, 1, Code.INVALID_ARGUMENT, "must carry the manifest"),
    ("old version", None, None, 0, Code.FAILED_PRECONDITION, "not newer than the served"),
]


@pytest.mark.parametrize(
    ("change", "mutate", "delta", "code", "message"),
    [case[1:] for case in BAD_UPLOADS],
    ids=[case[0] for case in BAD_UPLOADS],
)
def test_bad_uploads_are_rejected(
    client: PolicyClient,
    other_weights: dict[str, torch.Tensor],
    change: object,
    mutate: object,
    delta: int,
    code: grpc.StatusCode,
    message: str,
) -> None:
    version = served_version(client)
    before = tokens(client.generate(PROMPTS, GREEDY))
    weights = change(other_weights) if callable(change) else other_weights
    chunks = upload_chunks(weights, version + delta)
    if callable(mutate):
        chunks = mutate(chunks)
    with pytest.raises(grpc.RpcError) as err:
        client.stub.UpdateWeights(iter(chunks), timeout=30)
    assert err.value.code() == code
    assert message in err.value.details()
    assert_old_weights_serve(client, version, before)


def test_malformed_chunk_is_refused(client: PolicyClient) -> None:
    version = served_version(client)
    before = tokens(client.generate(PROMPTS, GREEDY))
    raw = client.channel.stream_unary("/rlhf.v1.PolicyService/UpdateWeights")
    with pytest.raises(grpc.RpcError) as err:
        raw(iter([b"\x1a\xff\xff\x03abc"]), timeout=10)  # data field longer than the message
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "malformed WeightChunk" in err.value.details()
    assert_old_weights_serve(client, version, before)


# --- the codec's fast paths ---------------------------------------------------------------------
@pytest.mark.parametrize("chunk_bytes", [64, 1000, 4096, 1 << 20])
def test_frames_are_the_serializedupload_chunks(chunk_bytes: int) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(1000, generator=g),
        "b": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "c": torch.zeros(7, dtype=torch.float16),
    }
    for version in (1, 300):
        chunks = list(encode_weights(tensors, version, chunk_bytes=chunk_bytes))
        frames = list(encode_weight_frames(tensors, version, chunk_bytes=chunk_bytes))
        assert frames == [c.SerializeToString() for c in chunks]
        for chunk, frame in zip(chunks, frames, strict=True):
            view = decode_chunk(frame)
            assert view.error is None
            assert (view.offset, bytes(view.data), view.crc32) == (
                chunk.offset,
                chunk.data,
                chunk.crc32,
            )
            assert view.HasField("manifest") == chunk.HasField("manifest")
            assert view.HasField("payload_crc32") == chunk.HasField("payload_crc32")
            if chunk.HasField("manifest"):
                assert view.manifest == chunk.manifest
            if chunk.HasField("payload_crc32"):
                assert view.payload_crc32 == chunk.payload_crc32


def test_model_work_runs_on_the_compute_thread(
    client: PolicyClient, engine: PolicyEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generate and the weight swap run on the servicer's one ComputeThread, never on a gRPC
    worker thread (rlhf.compute: one OpenMP team per process)."""
    threads: list[tuple[str, str]] = []
    for name in ("generate", "apply_weights"):
        original = getattr(engine, name)

        def record(*args: object, _name: str = name, _original=original, **kwargs: object):  # noqa: ANN202
            threads.append((_name, threading.current_thread().name))
            return _original(*args, **kwargs)

        monkeypatch.setattr(engine, name, record)
    client.generate(PROMPTS, params(seed=1))
    same = {k: v.clone() for k, v in engine.model.state_dict().items()}
    client.update_weights(same, served_version(client) + 1)
    assert threads == [("generate", "policy-compute"), ("apply_weights", "policy-compute")]
