"""The C heap under the services' tensors (glibc's malloc): what it keeps and what it gives back.

torch allocates CPU tensors with malloc. glibc serves a block of at least its mmap threshold with
a mapping of its own, unmapped at free; smaller blocks come from the heap, which keeps what they
free as resident memory. The threshold starts at 128 KiB and rises, up to 32 MiB, to the size of
each mapped block freed, so after a model's first large tensors come and go every tensor under
32 MiB lives on the heap: activations, logits and weight casts whose freed memory the heap then
holds beside the next step's, raising the process's peak. Threads allocate from arenas, up to 8
per core, each keeping the blocks it frees and partly used heaps apart from the others'; a
service caps them. Off glibc these are no-ops.
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
MAX_ARENAS = 2
"""Malloc arenas a service's threads share at most. glibc gives threads up to 8 per core (16
here), each keeping its own free blocks and partly used 64 MiB heaps; a service's gRPC worker
threads each touch one. Measured on the seed's SmolLM2 run (2 cores, fp32, 1 + 2 steps, the
three services' peaks together, MALLOC_ARENA_MAX in the environment): 4806-4837 MiB in four
runs at glibc's default, 4755-4763 in four at 2 arenas and 4757-4767 in two at 1, step times
within the machine's noise; then 4764-4776 in three with this cap set by limit_arenas(). Two
rather than one: a thread that finds one arena's lock taken takes the other rather than wait."""
_M_ARENA_MAX = -8
"""mallopt's parameter number for the most arenas (glibc's malloc.h)."""


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
    return _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def limit_arenas() -> bool:
    """Caps malloc's arenas at MAX_ARENAS (as MALLOC_ARENA_MAX would). Takes effect for arenas
    created later, so call it before the process starts threads; True where the C library took
    it."""
    return _mallopt(_M_ARENA_MAX, MAX_ARENAS)


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value); False where the C library has none or refused it."""
    mallopt = getattr(libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(param, value) == 1)


def tune_for_tensors() -> None:
    """map_large_blocks() and limit_arenas(): what every service process does first, before
    its model loads and its gRPC threads start."""
    map_large_blocks()
    limit_arenas()


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
