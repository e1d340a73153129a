"""The weight codec on its own: round trips, CRC combination, and every rejection."""

from __future__ import annotations

import os
import zlib

import grpc
import pytest
import torch

from rlhf.crc32 import crc32_combine
from rlhf.errors import RpcError
from rlhf.v1 import policy_pb2
from rlhf.weight_receiver import WeightAssembler
from rlhf.weights import encode_weights


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17),
        "b.bias": torch.randn(5).to(torch.bfloat16),
        "c.scale": torch.randn(()),
        "d.half": torch.randn(4, 4).to(torch.float16),
    }


def _expected(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def _receive(chunks: list[policy_pb2.WeightChunk], served_version: int = 0) -> dict:
    tensors = _tensors()
    asm = WeightAssembler(_expected(tensors), served_version)
    for chunk in chunks:
        asm.feed(chunk)
    return asm.finish()


@pytest.mark.parametrize("length", [0, 1, 7, 1000, 65537])
def test_crc32_combine_matches_zlib(length: int) -> None:
    a, b = os.urandom(123), os.urandom(length)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("chunk_bytes", [7, 64, 1 << 20])
def test_round_trip_is_exact(chunk_bytes: int) -> None:
    tensors = _tensors()
    chunks = list(encode_weights(tensors, version=3, chunk_bytes=chunk_bytes))
    assert chunks[0].HasField("manifest") and not any(c.HasField("manifest") for c in chunks[1:])
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert chunks[-1].HasField("payload_crc32")
    out = _receive(chunks)
    assert set(out) == set(tensors)
    for name, tensor in tensors.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor)


def test_cast_to_receiver_dtype() -> None:
    tensors = {"w": torch.randn(10, 10)}
    chunks = list(encode_weights(tensors, version=1, dtype=torch.bfloat16))
    asm = WeightAssembler({"w": ((10, 10), torch.bfloat16)}, 0)
    for chunk in chunks:
        asm.feed(chunk)
    assert torch.equal(asm.finish()["w"], tensors["w"].to(torch.bfloat16))


def test_a_cast_push_casts_each_tensor_when_the_stream_reaches_it() -> None:
    """Casting every tensor before the first chunk held a cast copy of the whole model for the
    whole push (a bf16 policy fed from fp32 weights: +270 MB on SmolLM2, and the trainer's heap
    kept growing by it step after step). Seen from outside: a tensor not yet reached when the
    first chunk goes out is read, and cast, later."""
    tensors = {"first": torch.randn(64, 64), "later": torch.randn(64, 64)}
    stream = encode_weights(tensors, version=1, chunk_bytes=1024, dtype=torch.bfloat16)
    chunks = [next(stream)]
    tensors["later"].fill_(3.0)  # after the first chunk, before the stream reaches "later"
    chunks += list(stream)
    shapes = {name: ((64, 64), torch.bfloat16) for name in tensors}
    asm = WeightAssembler(shapes, 0)
    for chunk in chunks:
        asm.feed(chunk)
    out = asm.finish()
    assert torch.equal(out["first"], tensors["first"].to(torch.bfloat16))
    assert torch.equal(out["later"], torch.full((64, 64), 3.0, dtype=torch.bfloat16))


def _expect(code: grpc.StatusCode, fragment: str, chunks: list, served_version: int = 0) -> None:
    with pytest.raises(RpcError) as caught:
        _receive(chunks, served_version)
    assert caught.value.code == code
    assert fragment in caught.value.message


def test_rejections() -> None:
    good = list(encode_weights(_tensors(), version=2, chunk_bytes=64))
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    _expect(grpc.StatusCode.FAILED_PRECONDITION, "not newer", good, served_version=2)
    _expect(invalid, "first WeightChunk must carry the manifest", good[1:])
    _expect(invalid, "stream ended after", good[:-1])
    _expect(invalid, "no manifest", [])

    corrupt = [policy_pb2.WeightChunk() for _ in good]
    for src, dst in zip(good, corrupt):
        dst.CopyFrom(src)
    corrupt[1].data = bytes([corrupt[1].data[0] ^ 1]) + corrupt[1].data[1:]
    _expect(invalid, "CRC-32", corrupt)

    swapped = [good[0], good[2], good[1], *good[3:]]
    _expect(invalid, "offset", swapped)

    bad_total = [policy_pb2.WeightChunk() for _ in good]
    for src, dst in zip(good, bad_total):
        dst.CopyFrom(src)
    bad_total[-1].payload_crc32 ^= 1
    _expect(invalid, "payload CRC-32", bad_total)


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ({"nope": torch.zeros(3)}, "no such tensor"),
        ({"a.weight": torch.zeros(17, 33)}, "shape"),
        ({"a.weight": torch.zeros(33, 17, dtype=torch.float16)}, "dtype"),
    ],
)
def test_manifest_rejections(tensors: dict[str, torch.Tensor], fragment: str) -> None:
    _expect(grpc.StatusCode.INVALID_ARGUMENT, fragment, list(encode_weights(tensors, version=1)))
