"""deploy/k8s with replicas (issue #16): policy and reward Deployments of several pods behind
headless Services that the trainer addresses as dns:///NAME:PORT, and the trainer as a
data-parallel indexed StatefulSet, one torchrun rank per pod (static rendezvous on pod 0), with
the control API on rank 0 only, rank-to-rank NetworkPolicy, a claim per rank and a GPU per rank
in the GPU overlays. Rendered and validated strictly with the other overlays in test_k8s.py.
Fast, no torch, no cluster."""

from __future__ import annotations

import re

import pytest

from tests.k8s_helpers import GPU_OVERLAYS, OVERLAYS, Rendered, admits, render_overlays
from tools.k8s import manifests as m

BACKENDS = ("policy", "reward")
RENDEZVOUS_PORT = 29500


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    return render_overlays(tmp_path_factory.mktemp("k8s"))


def _trainer(objects: list[dict]) -> tuple[dict, dict]:
    trainer = m.find(objects, "StatefulSet", "trainer")
    return trainer, m.pod_spec(trainer)["containers"][0]


def _dns_target(spec: str) -> tuple[str, int]:
    """dns:///HOST:PORT -> (HOST, PORT); anything else fails the test."""
    found = re.fullmatch(r"dns:///([a-z0-9.-]+):(\d+)", spec)
    assert found, f"{spec!r} is no dns:///HOST:PORT"
    return found[1], int(found[2])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy_and_reward_run_replicas_behind_headless_services(
    rendered: Rendered, overlay: str
) -> None:
    objects = rendered[overlay][1]
    _, trainer = _trainer(objects)
    for name in BACKENDS:
        deployment = m.find(objects, "Deployment", name)
        assert deployment["spec"]["replicas"] == 2, (overlay, name)
        # The trainer's address is the headless Service of this Deployment's pods, by name.
        host, port = _dns_target(m.env_value(trainer, f"RLHF_{name.upper()}"))
        service = m.find(objects, "Service", host)
        assert service["spec"]["clusterIP"] == "None", (overlay, name)
        # A replica that is not ready (loading, or failing its probe) is not in the answer.
        assert not service["spec"].get("publishNotReadyAddresses"), (overlay, name)
        assert [p["port"] for p in service["spec"]["ports"]] == [port]
        assert m.selects({"matchLabels": service["spec"]["selector"]}, m.pod_labels(deployment))
        # The readiness probe decides who is in the answer: unchanged, `rlhf health`.
        c = m.pod_spec(deployment)["containers"][0]
        assert c["readinessProbe"]["exec"]["command"] == ["rlhf", "health"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_ranks_are_an_indexed_statefulset_under_torchrun(
    rendered: Rendered, overlay: str
) -> None:
    objects = rendered[overlay][1]
    trainer, c = _trainer(objects)
    spec = trainer["spec"]
    ranks = spec["replicas"]
    assert ranks == 2, overlay
    # Every rank starts at once: rank 0 cannot be ready before the others have joined.
    assert spec["podManagementPolicy"] == "Parallel"
    flags = m.torchrun_flags(c)
    assert m.torchrun_split(c)[1] == ["trainer", "serve"]
    # One rank per pod, as many pods as ranks (static rendezvous waits for exactly --nnodes).
    assert flags["nproc-per-node"] == "1"
    assert flags["nnodes"] == "$(TRAINER_RANKS)" and m.env_value(c, "TRAINER_RANKS") == str(ranks)
    # Rank = the pod's index, from the label the StatefulSet controller sets.
    assert flags["node-rank"] == "$(POD_INDEX)"
    assert m.env_field(c, "POD_INDEX") == f"metadata.labels['{m.POD_INDEX_LABEL}']"
    # The c10d store: pod 0 (rank 0) by its name under the StatefulSet's headless Service.
    governing = m.find(objects, "Service", spec["serviceName"])
    assert flags["master-addr"] == f"{trainer['metadata']['name']}-0.{spec['serviceName']}"
    assert flags["master-port"] == str(RENDEZVOUS_PORT)
    # SIGTERM: torchrun gives the rank its drain (the step, its checkpoint) before SIGKILL,
    # and the pod's grace period gives torchrun that long.
    drain = int(m.env_value(c, "RLHF_GRACE_S"))
    grace = m.pod_spec(trainer)["terminationGracePeriodSeconds"]
    assert drain < int(flags["shutdown-timeout"]) < grace, (drain, flags, grace)
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert named["rendezvous"] == RENDEZVOUS_PORT
    # Ranks resolve each other before they are ready (they cannot be ready before they meet).
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["publishNotReadyAddresses"] is True
    assert m.selects({"matchLabels": governing["spec"]["selector"]}, m.pod_labels(trainer))
    # Kubernetes expands $(NAME) in args from the container's own variables only.
    for word in [*c.get("command", []), *c["args"]]:
        for name in re.findall(r"\$\((\w+)\)", word):
            assert name in m.env_names(c), (overlay, word)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_control_api_service_selects_rank_0_only(rendered: Rendered, overlay: str) -> None:
    objects = rendered[overlay][1]
    trainer, _ = _trainer(objects)
    selector = {"matchLabels": m.find(objects, "Service", "trainer")["spec"]["selector"]}
    ranks = trainer["spec"]["replicas"]
    selected = [i for i in range(ranks) if m.selects(selector, m.stateful_pod_labels(trainer, i))]
    assert selected == [0], overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ranks_reach_each_other_and_nobody_else_does(rendered: Rendered, overlay: str) -> None:
    objects = rendered[overlay][1]
    trainer, _ = _trainer(objects)
    rank = [m.stateful_pod_labels(trainer, i) for i in range(trainer["spec"]["replicas"])]
    client = {"rlhf.dev/trainer-client": "true"}
    policy = m.pod_labels(m.find(objects, "Deployment", "policy"))
    # gloo and NCCL: ephemeral ports in Linux's default range, both ways.
    for port in (RENDEZVOUS_PORT, 32768, 45000, 60999):
        assert admits(objects, trainer, rank[1], port, rank[0]), (overlay, port)
        assert admits(objects, trainer, rank[0], port, rank[1]), (overlay, port)
        for stranger in (client, policy, {"app.kubernetes.io/name": "something-else"}):
            assert not admits(objects, trainer, stranger, port, rank[0]), (overlay, port)
    # Nothing else opened between the ranks (the control API stays rank 0's clients').
    for port in (22, 50053, 32767, 61000):
        assert not admits(objects, trainer, rank[1], port, rank[0]), (overlay, port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_rank_keeps_its_own_claim(rendered: Rendered, overlay: str) -> None:
    """runs-trainer-R: rank 0's run folders and DDP checkpoints, rank R's FSDP shards; the
    claims stay when pods or the StatefulSet go."""
    trainer, c = _trainer(rendered[overlay][1])
    (claim,) = trainer["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == m.env_value(c, "RLHF_OUTPUT_DIR") == "/runs"
    retention = trainer["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # Not a shared volume from the pod template: each pod gets its own from the template.
    assert claim["metadata"]["name"] not in {v["name"] for v in m.pod_spec(trainer)["volumes"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_gpu_per_rank_and_per_replica(rendered: Rendered, overlay: str) -> None:
    objects = rendered[overlay][1]
    trainer, c = _trainer(objects)
    on_gpu = overlay in GPU_OVERLAYS
    # Resources are per pod: every rank and every replica its own GPU (the device plugin
    # never gives one GPU to two pods).
    assert m.gpus(c) == (1 if on_gpu else 0), overlay
    for name in BACKENDS:
        backend = m.pod_spec(m.find(objects, "Deployment", name))["containers"][0]
        assert m.gpus(backend) == (1 if on_gpu else 0), (overlay, name)
    # NCCL between GPU ranks; the default (auto: gloo on the CPU) elsewhere.
    assert m.env_value(c, "RLHF_DIST_BACKEND") == ("nccl" if on_gpu else None), overlay
    assert m.env_value(c, "RLHF_DATA_PARALLEL") == "ddp", overlay
    if on_gpu:
        shm = {v["mountPath"]: v["name"] for v in c["volumeMounts"]}["/dev/shm"]
        volume = {v["name"]: v for v in m.pod_spec(trainer)["volumes"]}[shm]
        assert volume["emptyDir"]["medium"] == "Memory"
