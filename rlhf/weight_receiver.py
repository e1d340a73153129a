"""The weight codec's receiving side: WeightChunk messages -> verified tensors.

`decode_chunk` parses a serialized chunk without copying its payload (the policy server's
deserializer); `WeightAssembler` checks a whole UpdateWeights stream (manifest, order, every
chunk's CRC-32 and the payload's) before it releases a single tensor. The format is described
in rlhf.weights.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Mapping

import numpy as np
import torch

from rlhf.crc32 import crc32, crc32_combine
from rlhf.errors import invalid, precondition
from rlhf.logs import quote
from rlhf.v1 import policy_pb2
from rlhf.weights import DTYPES, dtype_name


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
                problems.append(f"{quote(spec.name)}: listed twice")
            seen.add(spec.name)
            if spec.name not in self.expected:
                problems.append(f"{quote(spec.name)}: no such tensor in the served model")
                continue
            shape, dtype = self.expected[spec.name]
            if tuple(spec.shape) != tuple(shape):
                problems.append(f"{spec.name}: shape {list(spec.shape)}, served {list(shape)}")
            if spec.dtype != dtype_name(dtype):
                served_dtype = dtype_name(dtype)
                problems.append(f"{spec.name}: dtype {quote(spec.dtype)}, served {served_dtype}")
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
