"""rlhf.heap: with large blocks mapped on their own, freed tensors leave the process at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import json, sys
import torch
from rlhf.heap import map_large_blocks


def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


mapped = map_large_blocks() if sys.argv[1] == "map" else None
# A freed 16 MiB block raises glibc's default threshold to 16 MiB: what a model's first large
# tensors do. Then ten 8 MiB tensors, a small one kept after them (so the heap cannot shrink
# from its top), and the ten freed: the heap keeps them, unless they were mapped on their own.
first = torch.ones(4 * 2**20)
del first
before = rss_mib()
blocks = [torch.ones(2 * 2**20) for _ in range(10)]
kept = torch.ones(1024)
del blocks
print(json.dumps({"mapped": mapped, "held_mib": rss_mib() - before}))
"""


def _child(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_freed_tensors_go_back_to_the_system_once_large_blocks_are_mapped() -> None:
    default, mapped = _child("default"), _child("map")
    if mapped["mapped"] is False:
        pytest.skip("this C library has no mallopt (not glibc): the services leave it as it is")
    assert default["held_mib"] > 60, f"glibc's default kept {default['held_mib']:.0f} MiB"
    assert mapped["held_mib"] < 20, f"with large blocks mapped, {mapped['held_mib']:.0f} MiB held"
