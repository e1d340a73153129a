"""The weight codec's wire format and its sending side: a state dict -> a stream of WeightChunk
messages (the receiving side is rlhf.weight_receiver).

Wire format (see protos/rlhf/v1/policy.proto): the tensors' raw bytes are concatenated into one
payload, cut into chunks of at most `chunk_bytes`. The first chunk carries the manifest (version,
each tensor's name, dtype, shape, offset and length), every chunk its CRC-32, and the last chunk
the CRC-32 of the whole payload. The receiver (`WeightAssembler`) checks everything before it
hands back a single tensor, so a broken or partial upload can never be applied.

The whole-payload CRC is not computed over the payload a second time: it is combined from the
chunk CRCs (rlhf.crc32.crc32_combine), which costs a few microseconds per chunk instead of a
second pass over hundreds of megabytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from rlhf.crc32 import crc32, crc32_combine
from rlhf.defaults import DTYPE_NAMES
from rlhf.v1 import policy_pb2

# 1 MiB: the fastest chunk size measured on loopback (2 cores: 1.16 GB/s; 4 MiB chunks 0.73 GB/s).
CHUNK_BYTES = 1024 * 1024

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
"""The dtypes a tensor may travel in, by their wire names."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raw_bytes(tensor: torch.Tensor, dtype: torch.dtype) -> memoryview:
    """`tensor`'s bytes in `dtype`, on the CPU: a view where it already is both, else a copy."""
    flat = tensor.detach().to("cpu", dtype).contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _wire_dtypes(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> list[tuple[str, torch.Tensor, torch.dtype]]:
    """(name, tensor, the dtype it travels in): floating tensors in `dtype` when given;
    ValueError for a dtype the wire cannot carry. Nothing is cast here: the casts happen one
    tensor at a time as the stream reaches them (_raw_bytes), so a bf16 push of fp32 weights
    holds one tensor's cast copy, not the whole model's."""
    prepared: list[tuple[str, torch.Tensor, torch.dtype]] = []
    for name, tensor in tensors.items():
        wire = tensor.dtype
        if dtype is not None and tensor.is_floating_point():
            wire = dtype
        if dtype_name(wire) not in DTYPES:
            raise ValueError(f"{name}: dtype {wire} cannot be sent (use {list(DTYPES)})")
        prepared.append((name, tensor, wire))
    return prepared


def _manifest(
    prepared: list[tuple[str, torch.Tensor, torch.dtype]], version: int
) -> policy_pb2.WeightManifest:
    """The manifest of one upload: each tensor's spec at its offset in the payload."""
    specs, offset = [], 0
    for name, tensor, wire in prepared:
        nbytes = tensor.numel() * wire.itemsize
        specs.append(
            policy_pb2.TensorSpec(
                name=name,
                dtype=dtype_name(wire),
                shape=list(tensor.shape),
                offset=offset,
                nbytes=nbytes,
            )
        )
        offset += nbytes
    return policy_pb2.WeightManifest(version=version, tensors=specs, total_bytes=offset)


def _chunk_parts(
    tensors: Mapping[str, torch.Tensor],
    version: int,
    chunk_bytes: int,
    dtype: torch.dtype | None,
) -> Iterator[tuple[policy_pb2.WeightManifest | None, int, list[memoryview], int, int | None]]:
    """The chunks of one upload as (manifest or None, offset, data pieces, crc32, payload crc32
    or None): views into the tensors' memory, nothing copied yet."""
    prepared = _wire_dtypes(tensors, dtype)
    first = _manifest(prepared, version)
    manifest: policy_pb2.WeightManifest | None = first  # sent with the first chunk only
    total, sent, payload_crc = first.total_bytes, 0, 0
    pending: list[memoryview] = []
    pending_len = 0

    def parts() -> tuple[policy_pb2.WeightManifest | None, int, list[memoryview], int, int | None]:
        nonlocal sent, payload_crc, manifest
        crc = 0
        for piece in pending:
            crc = crc32(piece, crc)
        payload_crc = crc32_combine(payload_crc, crc, pending_len) if sent else crc
        out = (manifest, sent, pending, crc, payload_crc if sent + pending_len == total else None)
        manifest = None
        sent += pending_len
        return out

    for _name, tensor, wire in prepared:
        view = _raw_bytes(tensor, wire)
        pos = 0
        while pos < len(view):
            take = min(chunk_bytes - pending_len, len(view) - pos)
            pending.append(view[pos : pos + take])
            pending_len += take
            pos += take
            if pending_len == chunk_bytes:
                yield parts()
                pending, pending_len = [], 0
    if pending_len or manifest is not None:
        yield parts()


def encode_weights(
    tensors: Mapping[str, torch.Tensor],
    version: int,
    chunk_bytes: int = CHUNK_BYTES,
    dtype: torch.dtype | None = None,
) -> Iterator[policy_pb2.WeightChunk]:
    """Yields the chunks of one weight version, lazily (one chunk in memory at a time).

    `dtype`, when given, casts floating tensors to the receiver's dtype before sending.
    """
    for manifest, offset, pieces, crc, payload_crc in _chunk_parts(
        tensors, version, chunk_bytes, dtype
    ):
        chunk = policy_pb2.WeightChunk(offset=offset, data=b"".join(pieces), crc32=crc)
        if manifest is not None:
            chunk.manifest.CopyFrom(manifest)
        if payload_crc is not None:
            chunk.payload_crc32 = payload_crc
        yield chunk


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_weight_frames(
    tensors: Mapping[str, torch.Tensor],
    version: int,
    chunk_bytes: int = CHUNK_BYTES,
    dtype: torch.dtype | None = None,
) -> Iterator[bytes]:
    """encode_weights' chunks already serialized, byte for byte, for a raw gRPC stream.

    Each frame is written straight from the tensors' memory: one copy per payload byte, where
    building a WeightChunk and serializing it costs three (join, message, wire), a cost that
    shows next to a 1 GB/s loopback stream. Fields go in field-number order, zeros of proto3
    scalars omitted, as protobuf writes them.
    """
    for manifest, offset, pieces, crc, payload_crc in _chunk_parts(
        tensors, version, chunk_bytes, dtype
    ):
        head = b""
        if manifest is not None:
            body = manifest.SerializeToString()
            head += b"\x0a" + _varint(len(body)) + body  # field 1, length-delimited
        if offset:
            head += b"\x10" + _varint(offset)  # field 2, varint
        length = sum(len(p) for p in pieces)
        if length:
            head += b"\x1a" + _varint(length)  # field 3, length-delimited
        tail = b"\x20" + _varint(crc) if crc else b""  # field 4, varint
        if payload_crc is not None:
            tail += b"\x28" + _varint(payload_crc)  # field 5, optional: written even if 0
        yield b"".join([head, *pieces, tail])
