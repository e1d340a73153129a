"""The policy service's peak memory (issue #14): loading holds the weights about once, not twice,
and full uploads alternate between two buffers with no dead copy left on the heap, also when an
upload is larger than the loaded weights (a client that sends a tied tensor under each name).

VmHWM is per process and needs a model big enough to see, so a ~200 MB synthetic causal LM is
saved as safetensors and measured in a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tools.tiny import make_causal_lm

LOAD_PEAK = 1.3
"""VmHWM the load may add, in model sizes: the weights once, plus the file's pages in flight."""
UPLOAD_PEAK = 2.3
"""VmHWM after full uploads, in upload sizes: the served buffer and the spare, nothing else."""

CHILD = r"""
import json, sys
import torch

from services.policy.loading import load_causal_lm
from services.policy.weight_store import WeightStore


def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


# A tiny model's load first: imports, tokenizer and loader overheads stay out of the baseline.
warmup = load_causal_lm(sys.argv[2], torch.device("cpu"), torch.float32)
del warmup
baseline = vm("VmHWM")
loaded = load_causal_lm(sys.argv[1], torch.device("cpu"), torch.float32)
result = {"baseline": baseline, "load_hwm": vm("VmHWM")}
store = WeightStore(loaded.model, torch.device("cpu"), backing=loaded.buffer)
model = loaded.model
del loaded  # as the engine keeps the model, not the loader's buffer: the store decides its fate
sent = {}  # shapes and dtypes only: a served tensor held here would keep its buffer alive
for name, tensor in model.state_dict().items():
    # "once": each tied tensor under one name, as the trainer sends them; "every": under each.
    key = name if sys.argv[3] == "every" else tensor.data_ptr()
    sent.setdefault(key, (name, tensor.shape, tensor.dtype, tensor.numel() * tensor.element_size()))
del tensor
total = sum(nbytes for *_, nbytes in sent.values())
result["upload_bytes"] = total
for version in (1, 2, 3):
    buffer = store.receive_buffer(total)
    tensors, offset = {}, 0
    for name, shape, dtype, nbytes in sent.values():
        view = torch.frombuffer(buffer, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        tensors[name] = view.view(shape).fill_(version)
        offset += nbytes
    store.apply(tensors, version, backing=buffer)
    store.release_buffer(buffer)
    del tensors, view, buffer
result["upload_hwm"] = vm("VmHWM")
result["buffers_held"] = store.buffers_held
result["served"] = float(model.lm_head.weight[0, 0])
print(json.dumps(result))
"""


def _synthetic_lm(folder: Path) -> int:
    """Saves a ~200 MB Llama (tied embeddings, many tensors) to `folder`; returns its bytes."""
    make_causal_lm(
        folder,
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    weights = load_file(folder / "model.safetensors")  # tied weights are stored once
    return sum(t.numel() * t.element_size() for t in weights.values())


def _child(script: str, *args: str) -> dict:
    """Runs `script` in a fresh Python (its own VmHWM) from the repository root; its last line
    of output, as JSON."""
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("tied_names", ["once", "every"])
def test_load_and_full_uploads_peak_memory(tmp_path: Path, tied_names: str) -> None:
    weights = _synthetic_lm(tmp_path / "lm")
    assert weights > 150 * 2**20
    tiny = str(make_causal_lm(tmp_path / "tiny"))
    result = _child(CHILD, str(tmp_path / "lm"), tiny, tied_names)
    load = (result["load_hwm"] - result["baseline"]) / weights
    assert load < LOAD_PEAK, f"the load peaked at {load:.2f}x the weights"
    assert result["served"] == 3.0  # the last upload serves
    assert result["buffers_held"] == 2
    if tied_names == "every":  # the tied embedding twice: each upload is larger than the load
        assert result["upload_bytes"] > 1.2 * weights
    uploads = (result["upload_hwm"] - result["baseline"]) / result["upload_bytes"]
    assert uploads < UPLOAD_PEAK, f"three full uploads peaked at {uploads:.2f}x an upload"


CAST_CHILD = r"""
import json, sys
import torch

from rlhf import heap
from services.policy import loading


def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024


trims = []
loading.release_freed_heap = lambda: trims.append(1)  # the load's own trim, counted, not done
loaded = loading.load_causal_lm(sys.argv[1], torch.device("cpu"), torch.bfloat16)
untrimmed = rss()
heap.release_freed_heap()
print(json.dumps({"trims": len(trims), "untrimmed": untrimmed, "trimmed": rss()}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_a_bf16_load_from_float32_files_gives_its_cast_temporaries_back(tmp_path: Path) -> None:
    # The float32 -> bfloat16 cast's temporaries are freed onto the C heap, which keeps them
    # resident until trimmed (rlhf.heap.release_freed_heap, which the load calls once).
    # SmolLM2: 898 MiB resident after the load, 682 after the trim.
    weights = _synthetic_lm(tmp_path / "lm") // 2  # served in bfloat16
    result = _child(CAST_CHILD, str(tmp_path / "lm"))
    assert result["trims"] == 1
    released = (result["untrimmed"] - result["trimmed"]) / weights
    assert released > 0.3, f"the trim gave back {released:.2f}x the bf16 weights"
