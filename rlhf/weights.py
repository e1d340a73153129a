"""The weight codec: a state dict <-> a verified stream of WeightChunk messages.

Wire format (see protos/rlhf/v1/policy.proto): the tensors' raw bytes are concatenated into one
payload, cut into chunks of at most `chunk_bytes`. The first chunk carries the manifest (version,
each tensor's name, dtype, shape, offset and length), every chunk its CRC-32, and the last chunk
the CRC-32 of the whole payload. The receiver (`WeightAssembler`) checks everything before it
hands back a single tensor, so a broken or partial upload can never be applied.

The whole-payload CRC is not computed over the payload a second time: it is combined from the
chunk CRCs with zlib's crc32_combine algorithm (GF(2) polynomial arithmetic), which costs a few
microseconds per chunk instead of a second pass over hundreds of megabytes.
"""

from __future__ import annotations

import functools
import mmap
import zlib
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

from rlhf.defaults import DTYPE_NAMES
from rlhf.errors import invalid, precondition
from rlhf.v1 import policy_pb2

CHUNK_BYTES = 1024 * 1024  # 1 MiB: the fastest chunk size measured on loopback (DESIGN.md)


def _fastest_crc32() -> Callable[[bytes], int]:
    """zlib's CRC-32 from the fastest implementation installed: the same numbers everywhere.

    Every payload byte is checksummed once on each side, and stock zlib's CRC-32 (~2 GB/s)
    costs as much as the transfer itself; zlib-ng's and ISA-L's (SIMD, 10-15 GB/s) don't.
    """
    try:
        from zlib_ng import zlib_ng

        return zlib_ng.crc32
    except ImportError:
        pass
    try:
        from isal import isal_zlib

        return isal_zlib.crc32
    except ImportError:
        return zlib.crc32


crc32 = _fastest_crc32()

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- CRC-32 combination (zlib's crc32_combine, after zlib 1.2.12's crc32.c) -------------------
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial, in zlib's reflected bit order."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


@functools.lru_cache(maxsize=64)
def _x8nmodp(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial: the operator that shifts a CRC past nbytes zeros."""
    p, k, n = 1 << 31, 3, nbytes
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc32(A), crc32(B) and len(B)."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2


# --- sending ---------------------------------------------------------------------------------
def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _chunk_parts(
    tensors: Mapping[str, torch.Tensor],
    version: int,
    chunk_bytes: int,
    dtype: torch.dtype | None,
) -> Iterator[tuple[policy_pb2.WeightManifest | None, int, list[memoryview], int, int | None]]:
    """The chunks of one upload as (manifest or None, offset, data pieces, crc32, payload crc32
    or None): views into the tensors' memory, nothing copied yet."""
    prepared: list[tuple[str, torch.Tensor]] = []
    for name, tensor in tensors.items():
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if dtype_name(tensor.dtype) not in DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be sent (use {list(DTYPES)})")
        prepared.append((name, tensor))

    specs, offset = [], 0
    for name, tensor in prepared:
        nbytes = tensor.numel() * tensor.element_size()
        specs.append(
            policy_pb2.TensorSpec(
                name=name,
                dtype=dtype_name(tensor.dtype),
                shape=list(tensor.shape),
                offset=offset,
                nbytes=nbytes,
            )
        )
        offset += nbytes
    manifest: policy_pb2.WeightManifest | None = policy_pb2.WeightManifest(
        version=version, tensors=specs, total_bytes=offset
    )

    total, sent, payload_crc = offset, 0, 0
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

    for _name, tensor in prepared:
        view = _raw_bytes(tensor)
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


# --- receiving -------------------------------------------------------------------------------
class ChunkView:
    """A WeightChunk parsed by `decode_chunk`: `data` is a view into the received message.

    Quacks like policy_pb2.WeightChunk as far as WeightAssembler.feed looks. A malformed
    message gives a view with `error` set (a gRPC deserializer must not raise: that would turn
    the caller's mistake into INTERNAL), which feed() rejects with INVALID_ARGUMENT.
    """

    __slots__ = ("manifest", "offset", "data", "crc32", "payload_crc32", "error")

    def __init__(self) -> None:
        self.manifest: policy_pb2.WeightManifest | None = None
        self.offset = 0
        self.data: memoryview | bytes = b""
        self.crc32 = 0
        self.payload_crc32: int | None = None
        self.error: str | None = None

    def HasField(self, name: str) -> bool:  # noqa: N802 - the protobuf method's name
        return getattr(self, name) is not None


def _read_varint(message: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(message) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = message[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def decode_chunk(message: bytes) -> ChunkView:
    """Parses a serialized WeightChunk without copying its data (the server's deserializer).

    WeightChunk.FromString would copy every payload byte twice (into the message, then into a
    Python bytes object on access); this reads the few scalar fields and keeps `data` a view.
    """
    chunk = ChunkView()
    view = memoryview(message)
    pos = 0
    try:
        while pos < len(message):
            key, pos = _read_varint(message, pos)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = _read_varint(message, pos)
                if field == 2:
                    chunk.offset = value
                elif field == 4:
                    chunk.crc32 = value & 0xFFFFFFFF
                elif field == 5:
                    chunk.payload_crc32 = value & 0xFFFFFFFF
                elif field in (1, 3):
                    raise ValueError(f"field {field} is not a varint")
            elif wire == 2:
                length, pos = _read_varint(message, pos)
                if pos + length > len(message):
                    raise ValueError("a length-delimited field runs past the message")
                if field == 1:
                    if chunk.manifest is None:
                        chunk.manifest = policy_pb2.WeightManifest()
                    chunk.manifest.MergeFromString(view[pos : pos + length].tobytes())
                elif field == 3:
                    chunk.data = view[pos : pos + length]
                elif field in (2, 4, 5):
                    raise ValueError(f"field {field} is not length-delimited")
                pos += length
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise ValueError(f"unsupported wire type {wire}")
            if pos > len(message):
                raise ValueError("a field runs past the message")
    except Exception as err:  # noqa: BLE001 - any parse failure is the sender's malformed chunk
        chunk.error = f"malformed WeightChunk: {err}"
    return chunk


class WeightAssembler:
    """Receives one UpdateWeights stream and checks it completely before releasing tensors.

    `expected` maps every name the receiver accepts to its (shape, dtype); a manifest may carry
    any subset of it. Errors are RpcError with INVALID_ARGUMENT, or FAILED_PRECONDITION for a
    version that is not newer than `served_version`.

    `allocate`, when given, is called with the payload's size once the manifest is accepted and
    returns the writable memory (a bytearray or an mmap, at least that long) to receive into,
    instead of a fresh bytearray: a receiver can hand out a reused, already-mapped buffer.
    Fresh memory costs a page fault per 4 KiB on first touch, which on a VM makes a new 500 MB
    buffer cost more than the whole transfer.
    """

    def __init__(
        self,
        expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        served_version: int,
        allocate: Callable[[int], bytearray | mmap.mmap] | None = None,
    ) -> None:
        self.expected = expected
        self.served_version = served_version
        self.manifest: policy_pb2.WeightManifest | None = None
        self._allocate = allocate
        self.buffer: bytearray | mmap.mmap = bytearray()
        self._view = np.empty(0, dtype=np.uint8)
        self.received = 0
        self.payload_crc = 0
        self.chunks = 0

    @property
    def version(self) -> int:
        return self.manifest.version if self.manifest else 0

    def feed(self, chunk: policy_pb2.WeightChunk | ChunkView) -> None:
        error = getattr(chunk, "error", None)
        if error:
            raise invalid(f"chunk {self.chunks}: {error}")
        if self.manifest is None:
            if not chunk.HasField("manifest"):
                raise invalid("the first WeightChunk must carry the manifest")
            self._accept_manifest(chunk.manifest)
        elif chunk.HasField("manifest"):
            raise invalid(f"chunk {self.chunks}: a manifest may only come in the first chunk")
        assert self.manifest is not None
        data = chunk.data
        if chunk.offset != self.received:
            raise invalid(
                f"chunk {self.chunks}: offset {chunk.offset}, expected {self.received} "
                "(chunks must arrive in order, without gaps)"
            )
        end = self.received + len(data)
        if end > self.manifest.total_bytes:
            raise invalid(
                f"chunk {self.chunks}: payload runs past the manifest's total_bytes "
                f"({end} > {self.manifest.total_bytes})"
            )
        crc = crc32(data)
        if crc != chunk.crc32:
            raise invalid(
                f"chunk {self.chunks} at offset {chunk.offset}: CRC-32 {crc:#010x} does not match "
                f"the sent {chunk.crc32:#010x} (corrupted in transit)"
            )
        # numpy's copy: about twice as fast as a bytearray/mmap slice assignment.
        self._view[self.received : end] = np.frombuffer(data, dtype=np.uint8)
        self.payload_crc = crc32_combine(self.payload_crc, crc, len(data)) if self.received else crc
        self.received = end
        self.chunks += 1
        if end == self.manifest.total_bytes:
            if not chunk.HasField("payload_crc32"):
                raise invalid("the last chunk must carry payload_crc32")
            if chunk.payload_crc32 != self.payload_crc:
                raise invalid(
                    f"payload CRC-32 {self.payload_crc:#010x} does not match the sent "
                    f"{chunk.payload_crc32:#010x}"
                )

    def finish(self) -> dict[str, torch.Tensor]:
        """The verified tensors (views into one buffer). Raises if the stream was short."""
        if self.manifest is None:
            raise invalid("empty UpdateWeights stream: no manifest was sent")
        if self.received != self.manifest.total_bytes:
            raise invalid(
                f"stream ended after {self.received} of {self.manifest.total_bytes} bytes; "
                f"version {self.manifest.version} was not applied"
            )
        out: dict[str, torch.Tensor] = {}
        for spec in self.manifest.tensors:
            dtype = DTYPES[spec.dtype]
            count = spec.nbytes // torch.empty((), dtype=dtype).element_size()
            flat = torch.frombuffer(self.buffer, dtype=dtype, count=count, offset=spec.offset)
            out[spec.name] = flat.view(tuple(spec.shape))
        return out

    def _accept_manifest(self, manifest: policy_pb2.WeightManifest) -> None:
        if manifest.version <= self.served_version:
            raise precondition(
                f"version {manifest.version} is not newer than the served version "
                f"{self.served_version}; send a higher version"
            )
        if not manifest.tensors:
            raise invalid("the manifest lists no tensors")
        seen: set[str] = set()
        offset = 0
        problems: list[str] = []
        for spec in manifest.tensors:
            if spec.name in seen:
                problems.append(f"{spec.name}: listed twice")
            seen.add(spec.name)
            if spec.name not in self.expected:
                problems.append(f"{spec.name}: no such tensor in the served model")
                continue
            shape, dtype = self.expected[spec.name]
            if tuple(spec.shape) != tuple(shape):
                problems.append(f"{spec.name}: shape {list(spec.shape)}, served {list(shape)}")
            if spec.dtype != dtype_name(dtype):
                problems.append(f"{spec.name}: dtype {spec.dtype}, served {dtype_name(dtype)}")
            if spec.offset != offset:
                problems.append(f"{spec.name}: offset {spec.offset}, expected {offset}")
            numel = 1
            for dim in spec.shape:
                numel *= dim
            if spec.nbytes != numel * dtype.itemsize:
                problems.append(
                    f"{spec.name}: nbytes {spec.nbytes}, shape needs {numel * dtype.itemsize}"
                )
            offset += spec.nbytes
        if manifest.total_bytes != offset:
            problems.append(f"total_bytes {manifest.total_bytes}, tensors add up to {offset}")
        if problems:
            shown = "; ".join(problems[:5]) + (
                f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            )
            raise invalid(f"weight manifest rejected: {shown}")
        if self._allocate is not None:
            buffer = self._allocate(manifest.total_bytes)
            if len(buffer) < manifest.total_bytes:
                raise ValueError(f"allocate gave {len(buffer)} bytes for {manifest.total_bytes}")
            self.buffer = buffer
        else:
            self.buffer = bytearray(manifest.total_bytes)
        self._view = np.frombuffer(self.buffer, dtype=np.uint8)
        self.manifest = manifest
