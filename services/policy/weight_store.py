"""The served weights of one model: their version, the receive buffers uploads land in, and the
verified swap that makes an upload the served weights.

Ordering: the swap (`apply`) runs on the service's ComputeThread, as generation does, so no
completion ever mixes two versions and none is sampled from a half-applied update. Receive
buffers are handed out and given back on the gRPC threads that stream uploads, while `apply`
(on the compute thread) records which buffer the served weights live in: `_pool_lock` guards
that bookkeeping, and only it.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Mapping

import torch

from rlhf.errors import invalid, precondition
from rlhf.weights import dtype_name

WEIGHT_ALIGN = 64
"""Byte alignment a tensor in a buffer needs to be served from it as it is (as fast to compute
with as torch's own memory)."""


class WeightStore:
    """The versioned weights of `model` (version 0 as loaded) and their receive buffers."""

    def __init__(
        self, model: torch.nn.Module, device: torch.device, backing: mmap.mmap | None = None
    ) -> None:
        """`backing`: the new_buffer() every served tensor already lives in (the loader's, see
        services.policy.own_memory), held as a receive buffer: the first full upload then adopts
        its own buffer and this one becomes the spare, so two buffers serve at steady state."""
        self.model = model
        self.device = device
        self.version = 0
        # name -> the served tensor; tied weights appear under each of their names.
        self._state = dict(model.state_dict())
        # The Parameter (or buffer) object behind each name, tied names sharing one.
        self._targets = {name: _target(model, name) for name in self._state}
        # Upload receive buffers: every one we hold, those an upload is filling, and which one
        # each served tensor lives in after a no-copy update (absent: torch's own memory).
        self._buffers: dict[int, mmap.mmap] = {}
        self._reserved: set[int] = set()
        self._backing: dict[str, int] = {}
        self._pool_lock = threading.Lock()
        if backing is not None:
            self._buffers[id(backing)] = backing
            self._backing = {name: id(backing) for name in self._state}

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of every served tensor: what an upload may carry."""
        return {name: (tuple(t.shape), t.dtype) for name, t in self._state.items()}

    @property
    def buffers_held(self) -> int:
        """Receive buffers held: filling, served from, or the one spare."""
        with self._pool_lock:
            return len(self._buffers)

    def receive_buffer(self, nbytes: int) -> mmap.mmap:
        """Memory to receive an upload of `nbytes` into (WeightAssembler's `allocate`).

        A spare buffer when one is free (no page faults: it is mapped already), else a new one:
        page-aligned, so tensors received into it can become the served weights as they are
        (see apply). Give it back with release_buffer() whatever the upload's fate.
        """
        with self._pool_lock:
            live = set(self._backing.values())
            for key, buffer in self._buffers.items():
                if key not in live and key not in self._reserved and len(buffer) >= nbytes:
                    self._reserved.add(key)
                    return buffer
            buffer = new_buffer(nbytes)
            self._buffers[id(buffer)] = buffer
            self._reserved.add(id(buffer))
            return buffer

    def release_buffer(self, buffer: object) -> None:
        """Ends an upload's hold on its receive buffer; keeps one free buffer as the spare, and
        only one at least this upload's size.

        Why the size rule: a smaller spare cannot take the next upload like this one, which
        would then map a third buffer while the spare is still held. It happens when a client
        sends tied weights under each of their names (the output embedding twice; this
        project's trainer did until it sent a tied tensor once): the upload is larger than the
        loader's buffer, which holds them once, and keeping that buffer as the spare raised the
        service's peak by about a model (SmolLM2 fp32 in bench_seed: 2291 MiB, 1837 MiB with
        this rule)."""
        with self._pool_lock:
            self._reserved.discard(id(buffer))
            live = set(self._backing.values())
            free = [k for k in self._buffers if k not in live and k not in self._reserved]
            free.sort(key=lambda k: len(self._buffers[k]), reverse=True)
            size = len(buffer) if isinstance(buffer, mmap.mmap) else 0
            keep = free[:1] if free and len(self._buffers[free[0]]) >= size else []
            for key in free:
                if key not in keep:
                    del self._buffers[key]

    def apply(
        self, tensors: Mapping[str, torch.Tensor], version: int, backing: object | None = None
    ) -> int:
        """Makes verified tensors the served weights and bumps the version; returns the count.

        When `backing` is the receive_buffer() the tensors are views into and they cover the
        whole model, the model's tensors are pointed at them (no copy: the previous weights'
        buffer becomes the next upload's spare); otherwise they are copied into the served
        tensors. Nothing changes unless every tensor fits and the version is newer.
        """
        self._check(tensors)
        adopt = self._adoptable(tensors, backing)
        if self.device.type != "cpu":
            tensors = {name: t.to(self.device) for name, t in tensors.items()}
        if version <= self.version:
            raise precondition(
                f"version {version} is not newer than the served version "
                f"{self.version}; send a higher version"
            )
        with torch.no_grad():
            if adopt:
                for name, tensor in tensors.items():
                    self._targets[name].data = tensor
                self._state = dict(self.model.state_dict())
                with self._pool_lock:
                    self._backing = {name: id(backing) for name in self._state}
            else:
                for name, tensor in tensors.items():
                    _copy_into(self._state[name], tensor)
        self.version = version
        return len(tensors)

    def _check(self, tensors: Mapping[str, torch.Tensor]) -> None:
        problems = []
        for name, tensor in tensors.items():
            served = self._state.get(name)
            if served is None:
                problems.append(f"{name}: no such tensor in the served model")
            elif tuple(tensor.shape) != tuple(served.shape) or tensor.dtype != served.dtype:
                problems.append(
                    f"{name}: {list(tensor.shape)} {dtype_name(tensor.dtype)}, served "
                    f"{list(served.shape)} {dtype_name(served.dtype)}"
                )
        if problems:
            raise invalid("weights rejected: " + "; ".join(problems[:5]))

    def _adoptable(self, tensors: Mapping[str, torch.Tensor], backing: object | None) -> bool:
        """Can these tensors become the served weights without a copy? Only a full upload (every
        served tensor, under any of its tied names) into one of our receive buffers, on CPU,
        with every tensor WEIGHT_ALIGN-byte aligned."""
        if backing is None or id(backing) not in self._buffers or self.device.type != "cpu":
            return False
        covered = {id(self._targets[name]) for name in tensors}
        if covered != {id(target) for target in self._targets.values()}:
            return False
        return all(t.is_contiguous() and t.data_ptr() % WEIGHT_ALIGN == 0 for t in tensors.values())


def new_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory of at least `nbytes` (one page at least) for weights: its
    own mapping, so freeing it gives the memory back to the system rather than to the heap."""
    page = mmap.PAGESIZE
    buffer = mmap.mmap(-1, max(page, -(-nbytes // page) * page))
    if hasattr(mmap, "MADV_HUGEPAGE"):  # fewer, cheaper first-touch faults
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


def _target(model: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src. One memmove for contiguous CPU tensors: torch's copy_ splits a big copy over
    its thread pool, which gains nothing on a memory-bound copy and stalls for whole time
    slices when the machine's cores are busy (a shared CI box, or generation threads)."""
    if (
        dst.device.type == "cpu"
        and src.device.type == "cpu"
        and dst.dtype == src.dtype
        and dst.is_contiguous()
        and src.is_contiguous()
    ):
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())
    else:
        dst.copy_(src)
