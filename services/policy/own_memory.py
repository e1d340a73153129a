"""Moves a loaded model's CPU weights out of the file mapping they were loaded into, into one
buffer of the process's own, without holding the weights twice on the way.

Why own memory: a mapped page is faulted in on first use and again whenever the kernel reclaims
it from an idle server, and the first weight update would pay a copy-on-write fault for every
4 KiB: seconds on a VM. Why one mmapped buffer rather than a clone per tensor: the WeightStore
holds it as a receive buffer, so the first full upload's buffer replaces it and it becomes the
spare (two buffers at steady state); clones would sit on the malloc heap, which keeps the memory
they free, one dead model's worth. Why the file pages are dropped as they are copied: else the
copy and the file's pages read so far are both resident, and the load peaks at twice the model.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path

import numpy as np
import torch

from rlhf.heap import libc
from services.policy.weight_store import WEIGHT_ALIGN, new_buffer

log = logging.getLogger("rlhf.policy.engine")

COPY_CHUNK = 16 * 2**20
"""Bytes copied before their file pages are dropped: a big tensor (an embedding) then costs
this much twice at most, not its whole size."""


def own_memory(model: torch.nn.Module) -> mmap.mmap | None:
    """Moves `model`'s CPU state-dict tensors into one new_buffer(), each WEIGHT_ALIGN-aligned, and
    returns it (None when no weight is on the CPU). Tied weights stay tied (a shared Parameter
    is one object, copied once)."""
    targets: dict[int, torch.Tensor] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        if tensor.device.type == "cpu":
            targets.setdefault(id(tensor), tensor)
    # The rest (non-persistent buffers such as rotary tables) is computed, not loaded: the
    # process's own memory already, and it must not live in a buffer an upload reuses.
    if not targets:
        return None
    offsets, total = [], 0
    for tensor in targets.values():
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // WEIGHT_ALIGN) * WEIGHT_ALIGN
    buffer = new_buffer(total)
    maps = _file_maps()
    with torch.no_grad():
        for tensor, offset in zip(targets.values(), offsets, strict=True):
            source = tensor.data
            copy = _view(buffer, offset, source)
            _copy_dropping(copy, source, maps)
            tensor.data = copy
    return buffer


def _view(buffer: mmap.mmap, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor shaped like `like` over `buffer` at `offset`."""
    if like.numel() == 0:
        return torch.empty(like.shape, dtype=like.dtype)
    flat = torch.frombuffer(buffer, dtype=like.dtype, count=like.numel(), offset=offset)
    return flat.view(like.shape)


def _copy_dropping(dst: torch.Tensor, src: torch.Tensor, maps: list[tuple[int, int]]) -> None:
    """dst <- src (contiguous dst), dropping src's file pages behind the copy."""
    if not src.is_contiguous():
        dst.copy_(src)
        storage = src.untyped_storage()
        _drop_file_pages(storage.data_ptr(), storage.nbytes(), maps)
        return
    nbytes = src.numel() * src.element_size()
    for done in range(0, nbytes, COPY_CHUNK):
        size = min(COPY_CHUNK, nbytes - done)
        ctypes.memmove(dst.data_ptr() + done, src.data_ptr() + done, size)
        _drop_file_pages(src.data_ptr() + done, size, maps)


def _file_maps() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of files (Linux; none elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    maps = []
    for line in lines:
        fields = line.split(maxsplit=5)
        # address perms offset dev inode path: a mapped file has an inode.
        if len(fields) == 6 and fields[4] != "0":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            maps.append((start, end))
    return maps


def _drop_file_pages(first: int, size: int, maps: list[tuple[int, int]]) -> None:
    """Drops this process's pages of [first, first + size) when they are a mapped file's own.

    Safe: the tensor they were read for now points at its copy, and nothing reads the old
    storage; and even a read would see no change, as only pages that hold the file's bytes
    unwritten are dropped (a shared mapping's pages, a private one's never copied-on-write:
    checked in pagemap), and such a page faults the same bytes back in from the file. Anonymous
    memory is never touched: MADV_DONTNEED would zero it under whoever still uses it.
    """
    page = mmap.PAGESIZE
    for start, end in maps:
        if start <= first and first + size <= end:
            low = max(start, first // page * page)
            high = min(end, -(-(first + size) // page) * page)
            if not _unwritten(low, high):
                return
            advice = mmap.MADV_DONTNEED
            if libc().madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), advice):
                err = ctypes.get_errno()
                log.warning("madvise failed", extra={"errno": err, "error": os.strerror(err)})
            return


def _unwritten(low: int, high: int) -> bool:
    """Does no page in [low, high) hold anonymous memory (a private file page once written)?"""
    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(low // page * 8)
            entries = np.frombuffer(pagemap.read((high - low) // page * 8), dtype=np.uint64)
    except OSError:
        return False
    # Bit 63: in memory, 62: swapped out, 61: a file page (or shared anonymous memory).
    in_use = (entries >> np.uint64(63)) | ((entries >> np.uint64(62)) & np.uint64(1))
    file_page = (entries >> np.uint64(61)) & np.uint64(1)
    return not bool(np.any(in_use & (file_page ^ np.uint64(1))))
