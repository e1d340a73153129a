"""What the deploy/k8s tests share: the overlays rendered once per test module, the strict
offline validator, every workload with its pod spec, and who presents which certificate."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tools.k8s import manifests as m

OVERLAYS = ["cpu", "gpu", "gpu-vllm", "reward-swap", "vllm"]
# The overlays that put the policy on vLLM (components/vllm), each over the overlay it extends.
VLLM_OVERLAYS = {"vllm": "cpu", "gpu-vllm": "gpu"}
GPU_OVERLAYS = ("gpu", "gpu-vllm")
IMAGE = "rlhf-services:0.1.0"
VLLM_IMAGE = "rlhf-services-vllm:0.1.0"
SWAP_JOB = m.OVERLAYS_DIR / "reward-swap" / "swap-reward-job.yaml"
# Whose certificate each workload presents (Secret rlhf-tls-NAME).
IDENTITY = {"policy": "policy", "reward": "reward", "reward-b": "reward-b", "trainer": "trainer",
            "swap-reward": "admin"}  # fmt: skip
VALIDATE = str(Path(sys.executable).parent / "kubernetes-validate")

Rendered = dict[str, tuple[Path, list[dict]]]
"""Overlay name -> (its rendered YAML file, its objects)."""


def _bundled_versions() -> list[str]:
    import kubernetes_validate

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    found = {
        tuple(int(x) for x in d.name[1:].split("-")[0].split("."))
        for d in folder.iterdir()
        if re.fullmatch(r"v\d+\.\d+\.\d+-local-strict", d.name)
    }
    return [".".join(map(str, v)) for v in sorted(found)]


def _validation_versions() -> list[str]:
    bundled = _bundled_versions()
    assert "1.29.0" in bundled, bundled
    return sorted({"1.29.0", bundled[-1]})


VERSIONS = _validation_versions()


def render_overlays(folder: Path) -> Rendered:
    """Every overlay rendered (kubectl kustomize) into `folder`, with its objects."""
    out = {}
    for overlay in OVERLAYS:
        text = m.render(overlay)
        path = folder / f"{overlay}.yaml"
        path.write_text(text)
        out[overlay] = (path, m.load(text))
    return out


def validate(paths: list[Path], version: str, strict: bool = True) -> subprocess.CompletedProcess:
    command = [VALIDATE, "--quiet", "-k", version, *map(str, paths)]
    if strict:
        command.insert(1, "--strict")
    return subprocess.run(command, capture_output=True, text=True, check=False)


def all_workloads(rendered: Rendered) -> Iterator[tuple[str, dict, dict]]:
    """(overlay, object, pod spec) of every workload, the reward-swap Job's included."""
    for overlay in OVERLAYS:
        for obj, spec in m.workloads(rendered[overlay][1]):
            yield overlay, obj, spec
    for obj, spec in m.workloads(m.load(SWAP_JOB.read_text())):
        yield "swap-reward-job", obj, spec


def admits(
    objects: list[dict],
    target: dict,
    source_labels: dict[str, str],
    port: int,
    target_labels: dict[str, str] | None = None,
) -> bool:
    """Whether the NetworkPolicies let a pod with source_labels reach target's pods (labelled
    target_labels: by default its template's) on TCP port, named ports and port ranges
    (endPort) resolved as a cluster does."""
    labels = m.pod_labels(target) if target_labels is None else target_labels
    policies = [
        p
        for p in objects
        if p["kind"] == "NetworkPolicy" and m.selects(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True
    named = {
        p["name"]: p["containerPort"] for c in m.pod_spec(target)["containers"] for p in c["ports"]
    }
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ranges = []
            for p in rule.get("ports", []):
                low = named.get(p["port"], p["port"])
                ranges.append((low, p.get("endPort", low)))
            peers = rule.get("from", [])
            if (not ranges or any(low <= port <= high for low, high in ranges)) and (
                not peers
                or any(m.selects(peer.get("podSelector", {}), source_labels) for peer in peers)
            ):
                return True
    return False
