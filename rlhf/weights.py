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
import zlib
from collections.abc import Iterator, Mapping

import torch

from rlhf.errors import invalid, precondition
from rlhf.v1 import policy_pb2

CHUNK_BYTES = 1024 * 1024  # 1 MiB: the fastest chunk size measured on loopback (DESIGN.md)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


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


def encode_weights(
    tensors: Mapping[str, torch.Tensor],
    version: int,
    chunk_bytes: int = CHUNK_BYTES,
    dtype: torch.dtype | None = None,
) -> Iterator[policy_pb2.WeightChunk]:
    """Yields the chunks of one weight version, lazily (one chunk in memory at a time).

    `dtype`, when given, casts floating tensors to the receiver's dtype before sending.
    """
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
    manifest = policy_pb2.WeightManifest(version=version, tensors=specs, total_bytes=offset)

    total, sent, payload_crc = offset, 0, 0
    pending: list[memoryview] = []
    pending_len = 0
    first = True

    def make_chunk(data: bytes) -> policy_pb2.WeightChunk:
        nonlocal sent, payload_crc, first
        crc = zlib.crc32(data)
        payload_crc = crc32_combine(payload_crc, crc, len(data)) if sent else crc
        chunk = policy_pb2.WeightChunk(offset=sent, data=data, crc32=crc)
        if first:
            chunk.manifest.CopyFrom(manifest)
            first = False
        sent += len(data)
        if sent == total:
            chunk.payload_crc32 = payload_crc
        return chunk

    for _name, tensor in prepared:
        view = _raw_bytes(tensor)
        pos = 0
        while pos < len(view):
            take = min(chunk_bytes - pending_len, len(view) - pos)
            pending.append(view[pos : pos + take])
            pending_len += take
            pos += take
            if pending_len == chunk_bytes:
                yield make_chunk(b"".join(pending))
                pending, pending_len = [], 0
    if pending_len or first:
        yield make_chunk(b"".join(pending))


# --- receiving -------------------------------------------------------------------------------
class WeightAssembler:
    """Receives one UpdateWeights stream and checks it completely before releasing tensors.

    `expected` maps every name the receiver accepts to its (shape, dtype); a manifest may carry
    any subset of it. Errors are RpcError with INVALID_ARGUMENT, or FAILED_PRECONDITION for a
    version that is not newer than `served_version`.
    """

    def __init__(
        self,
        expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        served_version: int,
    ) -> None:
        self.expected = expected
        self.served_version = served_version
        self.manifest: policy_pb2.WeightManifest | None = None
        self.buffer = bytearray()
        self.received = 0
        self.payload_crc = 0
        self.chunks = 0

    @property
    def version(self) -> int:
        return self.manifest.version if self.manifest else 0

    def feed(self, chunk: policy_pb2.WeightChunk) -> None:
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
        crc = zlib.crc32(data)
        if crc != chunk.crc32:
            raise invalid(
                f"chunk {self.chunks} at offset {chunk.offset}: CRC-32 {crc:#010x} does not match "
                f"the sent {chunk.crc32:#010x} (corrupted in transit)"
            )
        self.buffer[self.received : end] = data
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
        self.manifest = manifest
        self.buffer = bytearray(manifest.total_bytes)
