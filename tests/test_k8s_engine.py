"""deploy/k8s and the policy's generation engine: the base runs transformers (hf) in the one
image; the vLLM overlays (components/vllm over cpu and gpu) switch the policy's engine and image
and change nothing else. Rendered and validated strictly with the other overlays in test_k8s.py.
Fast, no torch, no cluster."""

from __future__ import annotations

import copy

import pytest

from tests.k8s_helpers import (
    GPU_OVERLAYS,
    IMAGE,
    OVERLAYS,
    VLLM_IMAGE,
    VLLM_OVERLAYS,
    Rendered,
    render_overlays,
)
from tools.k8s import manifests as m


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    return render_overlays(tmp_path_factory.mktemp("k8s"))


def _policy(rendered: Rendered, overlay: str) -> dict:
    return m.pod_spec(m.find(rendered[overlay][1], "Deployment", "policy"))["containers"][0]


def _bytes(quantity: str) -> float:
    """A Kubernetes memory quantity in the binary units the manifests use (Mi, Gi)."""
    units = {"Mi": 2**20, "Gi": 2**30}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_base_policy_runs_the_hf_engine(rendered: Rendered) -> None:
    for overlay in set(OVERLAYS) - set(VLLM_OVERLAYS):
        c = _policy(rendered, overlay)
        assert m.env_value(c, "RLHF_ENGINE") == "hf", overlay
        assert c["image"] == IMAGE, overlay


@pytest.mark.parametrize(("overlay", "parent"), VLLM_OVERLAYS.items())
def test_vllm_overlays_change_the_policy_engine_only(
    rendered: Rendered, overlay: str, parent: str
) -> None:
    """A vLLM overlay is the overlay it extends with the policy's engine and image switched (and
    its vLLM sizing): every other object, and the policy's placement, stay as they were."""
    ours, theirs = rendered[overlay][1], rendered[parent][1]

    def unlabelled(obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        for meta in (obj["metadata"], obj.get("spec", {}).get("template", {}).get("metadata")):
            if meta and "labels" in meta:
                meta["labels"].pop("rlhf.dev/overlay", None)
        return obj

    others = [unlabelled(o) for o in ours if m.key(o) != "Deployment/policy"]
    assert others == [unlabelled(o) for o in theirs if m.key(o) != "Deployment/policy"]
    c, before = _policy(rendered, overlay), _policy(rendered, parent)
    assert c["image"] == VLLM_IMAGE and m.env_value(c, "RLHF_ENGINE") == "vllm"
    env = {n: m.env_value(c, n) for n in m.env_names(c) if not n.startswith("RLHF_VLLM_")}
    assert env == {n: m.env_value(before, n) for n in m.env_names(before)} | {"RLHF_ENGINE": "vllm"}
    spec, parent_spec = (m.pod_spec(m.find(o, "Deployment", "policy")) for o in (ours, theirs))
    assert spec.get("nodeSelector") == parent_spec.get("nodeSelector")
    assert m.gpus(c) == m.gpus(before)
    kv_cache_gib = float(m.env_value(c, "RLHF_VLLM_KV_CACHE_GIB"))
    if overlay in GPU_OVERLAYS:
        # On a GPU the KV cache is what the memory-utilisation fraction leaves after the weights.
        assert kv_cache_gib == 0 and m.env_value(c, "RLHF_DEVICE") == "cuda"
    else:
        # On the CPU it is host memory: the pod's limit grows by at least that much.
        limit, old_limit = (x["resources"]["limits"]["memory"] for x in (c, before))
        assert kv_cache_gib > 0
        assert _bytes(limit) >= _bytes(old_limit) + kv_cache_gib * 2**30
