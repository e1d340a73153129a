"""rlhf.heap: with large blocks mapped on their own, freed tensors leave the process at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import ctypes, json, sys
import torch
from rlhf.heap import libc, map_large_blocks


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def mapped_mib():
    # glibc's count of bytes in blocks mapped on their own (mallinfo2, glibc >= 2.33).
    libc().mallinfo2.restype = MallInfo2
    return libc().mallinfo2().hblkhd / 2**20


def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


if not hasattr(libc(), "mallinfo2"):
    print(json.dumps({"glibc": False}))
    sys.exit()
took = map_large_blocks() if sys.argv[1] == "map" else None
# A freed 16 MiB block raises glibc's default threshold to at least 16 MiB, as a model's first
# large tensors do; then ten 8 MiB tensors, and the ten freed.
first = torch.ones(4 * 2**20)
del first
before_mapped, before_rss = mapped_mib(), rss_mib()
blocks = [torch.ones(2 * 2**20) for _ in range(10)]
mapped = mapped_mib() - before_mapped
del blocks
print(json.dumps({"glibc": True, "took": took, "mapped_mib": mapped,
                  "held_mib": rss_mib() - before_rss}))
"""


def _child(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_tensors_of_4_mib_and_more_are_mapped_and_given_back_at_free() -> None:
    default, mapped = _child("default"), _child("map")
    if not mapped["glibc"]:
        pytest.skip("not glibc >= 2.33 (no mallinfo2): map_large_blocks leaves malloc alone")
    # glibc's default, once its threshold rose: the 8 MiB tensors come from the heap, which
    # keeps what they free (how much of it stays resident depends on the heap's layout).
    assert default["mapped_mib"] < 8
    assert mapped["took"] is True
    assert mapped["mapped_mib"] >= 80  # each tensor a mapping of its own ...
    assert mapped["held_mib"] < 20  # ... unmapped when freed


ARENAS_CHILD = r"""
import sys, threading
from rlhf.heap import libc, limit_arenas

took = limit_arenas() if sys.argv[1] == "limit" else None
# Six threads, each allocating while the others hold theirs: glibc gives each a free arena of
# its own while it may create more (8 per core by default).
start, done = threading.Barrier(6), threading.Barrier(6)
def hold():
    start.wait()
    block = bytearray(200_000)
    done.wait()
threads = [threading.Thread(target=hold) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(took, file=sys.stderr, flush=True)
libc().malloc_stats()  # one "Arena N:" section per arena, on stderr
"""


def test_a_service_process_shares_at_most_max_arenas_between_its_threads() -> None:
    from rlhf.heap import MAX_ARENAS

    arenas = {}
    for mode in ("default", "limit"):
        done = subprocess.run(
            [sys.executable, "-c", ARENAS_CHILD, mode], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr[-2000:]
        if "Arena 0:" not in done.stderr:
            pytest.skip("not glibc: no malloc_stats arenas to count")
        arenas[mode] = done.stderr.count("Arena ")
        took = done.stderr.splitlines()[0]
    assert took == "True"
    assert arenas["default"] > MAX_ARENAS  # the default gives the threads arenas of their own
    assert arenas["limit"] <= MAX_ARENAS
