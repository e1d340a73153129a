"""The C heap under the services' tensors (glibc's malloc): what it keeps and what it gives back.

torch allocates CPU tensors with malloc. glibc serves a block of at least its mmap threshold with
a mapping of its own, unmapped at free; smaller blocks come from the heap, which keeps what they
free as resident memory. The threshold starts at 128 KiB and rises, up to 32 MiB, to the size of
each mapped block freed, so after a model's first large tensors come and go every tensor under
32 MiB lives on the heap: activations, logits and weight casts whose freed memory the heap then
holds beside the next step's, raising the process's peak. Off glibc these are no-ops.
"""

from __future__ import annotations

import ctypes
import functools

MMAP_THRESHOLD_BYTES = 4 * 2**20
"""Blocks of this size and more are mapped and unmapped on their own. Measured on the seed's
SmolLM2 run (2 cores, 1 + 3 steps): the trainer service's peak 3261-3362 -> 3170-3180 MiB, the
policy's 1584-1626 -> 1569-1596, step times unchanged; smaller sizes would map the many ~1 MiB
activations too."""
_M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (glibc's malloc.h)."""


@functools.cache
def libc() -> ctypes.CDLL:
    """This process's C library (madvise's argument types declared)."""
    lib = ctypes.CDLL(None, use_errno=True)
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


def map_large_blocks() -> bool:
    """Fixes the mmap threshold at MMAP_THRESHOLD_BYTES (which also stops it rising), so a freed
    block that large goes back to the system at once. Called once at a service's start; True
    where the C library took it."""
    mallopt = getattr(libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)


def release_freed_heap() -> None:
    """Gives the C heap's free memory back to the system (glibc's malloc_trim).

    Why, with large blocks mapped: the many smaller ones still free onto the heap. Loading a
    model in bfloat16 from float32 files left 216 MB of cast temporaries there (SmolLM2: 898 MiB
    resident after the load, 682 after a trim), and Generate calls leave their logits and
    caches: memory that then sits beside both weight buffers when the next upload arrives, the
    policy service's peak. It runs after a load and when an upload starts (where the peak is),
    not per Generate call (a call then pays the page faults of growing the heap again).
    """
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
