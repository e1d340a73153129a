"""deploy/k8s: every overlay renders (kubectl kustomize) and validates strictly (offline), the
workloads are shaped as a cluster expects (resources, security contexts, volumes, GPUs, network
policies), and the manifests agree with the services' real command lines. The TLS and Secret
checks are in test_k8s_security.py. Fast, no torch, no cluster; the one test that needs a
cluster runs only when KUBECONFIG points at one."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.cli_flags import env_flags, settings
from tests.k8s_helpers import (
    GPU_OVERLAYS,
    IMAGE,
    OVERLAYS,
    SWAP_JOB,
    VERSIONS,
    VLLM_IMAGE,
    VLLM_OVERLAYS,
    Rendered,
    admits,
    all_workloads,
    render_overlays,
    validate,
)
from tools.k8s import manifests as m

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"policy": "Deployment", "reward": "Deployment", "trainer": "StatefulSet"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    return render_overlays(tmp_path_factory.mktemp("k8s"))


# --- rendering and schema validation ---------------------------------------------------------


def test_overlays_found() -> None:
    assert m.overlays() == sorted(OVERLAYS)


@pytest.mark.parametrize("version", VERSIONS)
def test_overlays_validate_strictly(rendered: dict, version: str) -> None:
    paths = [rendered[o][0] for o in OVERLAYS] + [SWAP_JOB]
    result = validate(paths, version)
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_catches_a_misspelt_field(rendered: dict, tmp_path: Path) -> None:
    objects = copy.deepcopy(rendered["cpu"][1])
    container = m.pod_spec(m.find(objects, "Deployment", "policy"))["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    path = tmp_path / "misspelt.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    strict = validate([path], VERSIONS[-1])
    assert strict.returncode != 0 and "readinessProbes" in strict.stdout + strict.stderr
    # Plain mode lets it through: this is why the suite validates with --strict.
    assert validate([path], VERSIONS[-1], strict=False).returncode == 0


def test_run_config_is_the_default_config(rendered: dict) -> None:
    default = (ROOT / "configs" / "default.yaml").read_text()
    for overlay in ("cpu", "reward-swap", "vllm"):
        config = next(o for o in rendered[overlay][1] if o["kind"] == "ConfigMap")
        assert config["data"]["run.yaml"] == default
    expected = yaml.safe_load(default)
    expected["ppo"]["device"] = "cuda"
    for overlay in GPU_OVERLAYS:
        gpu = next(o for o in rendered[overlay][1] if o["kind"] == "ConfigMap")
        assert yaml.safe_load(gpu["data"]["run.yaml"]) == expected, overlay


# --- structure ----------------------------------------------------------------------------------


def test_every_container_has_resources_and_security(rendered: dict) -> None:
    for overlay, obj, spec in all_workloads(rendered):
        where = (overlay, m.key(obj))
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 10001, where
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
        mounts_needed = {"/tmp"}
        for c in m.containers(spec):
            res = c["resources"]
            assert {"cpu", "memory"} <= res["requests"].keys() <= res["limits"].keys(), where
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            mounts = {v["mountPath"]: v["name"] for v in c.get("volumeMounts", [])}
            cache = m.env_value(c, "RLHF_CACHE")
            output = m.env_value(c, "RLHF_OUTPUT_DIR")
            args = c.get("args", [])
            written = [a for i, a in enumerate(args) if i and args[i - 1] == "--output"]
            for path in mounts_needed | {p for p in (cache, output, *written) if p}:
                owner = next((mp for mp in mounts if path.startswith(mp)), None)
                assert owner, (where, path, "is not on a volume")
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
            for name in mounts.values():
                assert name in volumes or name in claims, (where, name)


def test_images_and_args(rendered: dict) -> None:
    for overlay, obj, spec in all_workloads(rendered):
        for c in m.containers(spec):
            # The vLLM image for the policy where it runs on vLLM, the one image elsewhere.
            on_vllm = overlay in VLLM_OVERLAYS and m.key(obj) == "Deployment/policy"
            assert c["image"] == (VLLM_IMAGE if on_vllm else IMAGE), (overlay, m.key(obj))
            # The image's entrypoint is rlhf: containers pass args, or run it under torchrun.
            if "command" in c:
                assert m.key(obj) == "StatefulSet/trainer", (overlay, m.key(obj))
                assert c["command"] == ["torchrun"], (overlay, m.key(obj))
    for overlay in OVERLAYS:
        for name, kind in SERVICES.items():
            c = m.pod_spec(m.find(rendered[overlay][1], kind, name))["containers"][0]
            assert m.torchrun_split(c)[1] == [name, "serve"]


def test_trainer_keeps_checkpoints_on_a_claim_and_mounts_the_run_config(rendered: dict) -> None:
    for overlay in OVERLAYS:
        trainer = m.find(rendered[overlay][1], "StatefulSet", "trainer")
        spec = m.pod_spec(trainer)
        c = spec["containers"][0]
        mounts = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}
        (claim,) = trainer["spec"]["volumeClaimTemplates"]
        assert mounts[claim["metadata"]["name"]] == m.env_value(c, "RLHF_OUTPUT_DIR")
        config_volume = next(v for v in spec["volumes"] if "configMap" in v)
        assert config_volume["configMap"]["name"].startswith("rlhf-run-config")
        config_map = next(o for o in rendered[overlay][1] if o["kind"] == "ConfigMap")
        assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
        assert mounts[config_volume["name"]] == "/etc/rlhf"


def _labels_of_pod_0(workload: dict) -> dict[str, str]:
    """The labels of a workload's first pod (a StatefulSet's carry its controller's too)."""
    if workload["kind"] == "StatefulSet":
        return m.stateful_pod_labels(workload, 0)
    return m.pod_labels(workload)


def test_services_are_grpc_cluster_ips(rendered: dict) -> None:
    for overlay in OVERLAYS:
        objects = rendered[overlay][1]
        for name, kind in SERVICES.items():
            service = m.find(objects, "Service", name)
            assert service["spec"]["type"] == "ClusterIP"
            # policy and reward: headless (every replica's address); trainer: one virtual IP.
            headless = service["spec"].get("clusterIP") == "None"
            assert headless == (kind == "Deployment"), (overlay, name)
            (port,) = service["spec"]["ports"]
            assert port["name"] == "grpc" and port["appProtocol"] == "grpc"
            assert port["port"] == m.DEFAULT_PORTS[name]
            workload = m.find(objects, kind, name)
            selector = {"matchLabels": service["spec"]["selector"]}
            assert m.selects(selector, _labels_of_pod_0(workload))
            # A Service selects its own workload's pods only (reward-b's pods are rlhf-reward too).
            for other in m.workloads(objects):
                if other[0] is not workload and other[0]["kind"] != "Job":
                    assert not m.selects(selector, _labels_of_pod_0(other[0]))


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlay_places_each_service_on_its_gpu(rendered: dict, overlay: str) -> None:
    objects = rendered[overlay][1]
    selectors = {}
    for name, kind in SERVICES.items():
        spec = m.pod_spec(m.find(objects, kind, name))
        c = spec["containers"][0]
        assert m.gpus(c) == 1, name
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "1", name
        if name != "trainer":  # the trainer's device is the run config's ppo.device
            assert m.env_value(c, "RLHF_DEVICE") == "cuda", name
        selectors[name] = spec["nodeSelector"]
        pool = spec["nodeSelector"]["rlhf.dev/pool"]
        tolerated = {(t["key"], t.get("value")) for t in spec["tolerations"]}
        assert ("rlhf.dev/pool", pool) in tolerated and ("nvidia.com/gpu", None) in tolerated
    assert selectors["reward"] != selectors["policy"]
    assert selectors["reward"] != selectors["trainer"]
    assert selectors["reward"] == {"rlhf.dev/pool": "reward-gpu"}
    for cpu_only in set(OVERLAYS) - set(GPU_OVERLAYS):
        for _, spec in m.workloads(rendered[cpu_only][1]):
            assert all(m.gpus(c) == 0 for c in m.containers(spec)), cpu_only
            assert "nodeSelector" not in spec, cpu_only


def test_reward_swap_runs_two_rewards(rendered: dict) -> None:
    objects = rendered["reward-swap"][1]
    a = m.pod_spec(m.find(objects, "Deployment", "reward"))["containers"][0]
    b = m.pod_spec(m.find(objects, "Deployment", "reward-b"))["containers"][0]
    assert m.env_value(a, "RLHF_BACKEND") != m.env_value(b, "RLHF_BACKEND")
    assert m.find(objects, "Service", "reward-b")["spec"]["ports"][0]["port"] == 50052
    job = m.load(SWAP_JOB.read_text())[0]
    c = m.pod_spec(job)["containers"][0]
    assert m.pod_labels(job)["rlhf.dev/trainer-client"] == "true"
    assert c["args"][0] == "swap-reward" and "reward-b:50052" in c["args"]
    assert m.env_value(c, "RLHF_TRAINER") == "trainer:50053"


# --- agreement with the real command lines --------------------------------------------------------


def test_env_args_and_ports_match_the_command_lines(rendered: dict) -> None:
    checked = 0
    for overlay, obj, spec in all_workloads(rendered):
        for c in m.containers(spec):
            where = (overlay, m.key(obj), c["name"])
            args = m.torchrun_split(c)[1]
            options = env_flags(args)  # the args are a valid command line (SystemExit if not)
            for name in m.env_names(c):
                if not name.startswith("RLHF_") or name in m.NON_FLAG_ENV:
                    continue
                assert name in options, (where, name, "is no flag of", args)
                checked += 1
            # Every value parses and validates as the service would read it.
            env = {n: m.env_value(c, n) or "" for n in m.env_names(c) if n.startswith("RLHF_")}
            settings(args, {n: v for n, v in env.items() if n not in m.NON_FLAG_ENV})
            if args[-1] == "serve":
                service = args[0]
                port = m.DEFAULT_PORTS[service]
                assert options["RLHF_PORT"].default == port, (service, "default port changed")
                assert m.env_value(c, "RLHF_PORT") == str(port), where
                # The trainer's pods also take the ranks' rendezvous (test_k8s_replicas.py).
                ports = [p["containerPort"] for p in c["ports"] if p["name"] != "rendezvous"]
                assert ports == [port], where
    assert checked > 30


def test_trainer_points_at_the_cluster_services(rendered: dict) -> None:
    for overlay in OVERLAYS:
        c = m.pod_spec(m.find(rendered[overlay][1], "StatefulSet", "trainer"))["containers"][0]
        # Every replica behind the headless Services (test_k8s_replicas.py).
        assert m.env_value(c, "RLHF_POLICY") == "dns:///policy:50051"
        assert m.env_value(c, "RLHF_REWARD") == "dns:///reward:50052"


# --- network policies ---------------------------------------------------------------------------


def test_network_policies(rendered: dict) -> None:
    client_pod = {"rlhf.dev/trainer-client": "true"}
    stranger = {"app.kubernetes.io/name": "something-else"}
    for overlay in OVERLAYS:
        objects = rendered[overlay][1]
        backends = [
            m.find(objects, "Deployment", "policy"),
            m.find(objects, "Deployment", "reward"),
        ]
        if overlay == "reward-swap":
            backends.append(m.find(objects, "Deployment", "reward-b"))
        trainer = m.find(objects, "StatefulSet", "trainer")
        # Rank 0 (pod trainer-0) calls policy and reward and serves the control API; rank 1
        # does neither.
        rank_0, rank_1 = (m.stateful_pod_labels(trainer, i) for i in (0, 1))
        for target in backends:
            port = m.pod_spec(target)["containers"][0]["ports"][0]["containerPort"]
            assert admits(objects, target, rank_0, port), m.key(target)
            assert not admits(objects, target, rank_1, port), m.key(target)
            assert not admits(objects, target, client_pod, port), m.key(target)
            assert not admits(objects, target, stranger, port), m.key(target)
            assert not admits(objects, target, rank_0, port + 100), m.key(target)
        assert admits(objects, trainer, client_pod, 50053, rank_0)
        assert not admits(objects, trainer, client_pod, 50053, rank_1)
        assert not admits(objects, trainer, stranger, 50053, rank_0)
        assert not admits(objects, trainer, rank_1, 50053, rank_0)
    swap_job = m.load(SWAP_JOB.read_text())[0]
    cpu = rendered["cpu"][1]
    trainer = m.find(cpu, "StatefulSet", "trainer")
    rank_0 = m.stateful_pod_labels(trainer, 0)
    assert admits(cpu, trainer, m.pod_labels(swap_job), 50053, rank_0)


# --- manifests.py helpers -----------------------------------------------------------------------


def test_with_default_port() -> None:
    assert m.with_default_port("reward-b") == "reward-b:50052"
    assert m.with_default_port("reward-b=0.5") == "reward-b:50052=0.5"
    assert m.with_default_port("rm.ns.svc:6000=2") == "rm.ns.svc:6000=2"
    assert m.with_default_port("dns:///reward-b") == "dns:///reward-b:50052"
    assert m.with_default_port("dns:///reward-b:6000=2") == "dns:///reward-b:6000=2"
    assert m.with_default_port("rm@a+b:6000=0.5") == "rm@a:50052+b:6000=0.5"


def test_with_namespace_and_apply_order() -> None:
    objects = [
        {"kind": "Deployment", "metadata": {"name": "a"}},
        {"kind": "Service", "metadata": {"name": "b", "namespace": "kept"}},
        {"kind": "ConfigMap", "metadata": {"name": "c"}},
    ]
    placed = m.with_namespace(objects, "rlhf")
    assert [o["metadata"]["namespace"] for o in placed] == ["rlhf", "kept", "rlhf"]
    assert "namespace" not in objects[0]["metadata"]  # inputs untouched
    assert [o["kind"] for o in m.apply_order(placed)] == ["ConfigMap", "Service", "Deployment"]


def test_selects() -> None:
    labels = {"a": "1", "b": "2"}
    assert m.selects({"matchLabels": {"a": "1"}}, labels)
    assert not m.selects({"matchLabels": {"a": "2"}}, labels)
    assert m.selects(
        {"matchExpressions": [{"key": "b", "operator": "In", "values": ["2"]}]}, labels
    )
    assert not m.selects({"matchExpressions": [{"key": "c", "operator": "Exists"}]}, labels)
    assert m.selects({}, labels)


def test_pod_rows() -> None:
    ns = SimpleNamespace
    pod = ns(
        metadata=ns(name="trainer-0"),
        spec=ns(containers=[ns()]),
        status=ns(phase="Running", container_statuses=[ns(ready=True, restart_count=2)]),
    )
    pending = ns(metadata=ns(name="policy-x"), spec=ns(containers=[ns()]), status=None)
    assert m.pod_rows([pod, pending]) == [
        ("trainer-0", "Running", "1/1", 2),
        ("policy-x", "Unknown", "0/1", 0),
    ]


def test_bad_overlay_is_named() -> None:
    with pytest.raises(ValueError, match=", ".join(sorted(OVERLAYS))):
        m.overlay_dir("tpu")


def test_cli_commands_registered() -> None:
    from rlhf.cli import COMMANDS

    words = {w for w, _, _ in COMMANDS}
    assert {("k8s", "render"), ("k8s", "apply"), ("k8s", "status"), ("k8s", "swap-reward")} <= words


def test_cli_render(capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf.cli import main

    assert main(["k8s", "render", "--overlay", "cpu"]) == 0
    assert "kind: StatefulSet" in capsys.readouterr().out


# --- against a cluster (only with KUBECONFIG) ------------------------------------------------


def test_server_side_dry_run_apply_on_a_cluster() -> None:
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig or not all(Path(p).is_file() for p in kubeconfig.split(os.pathsep)):
        pytest.skip("needs a cluster: set KUBECONFIG to a kubeconfig file to run it")
    from rlhf.cli import main

    try:
        from kubernetes import client, config

        config.load_kube_config()
        client.VersionApi().get_code(_request_timeout=5)
    except Exception as err:  # noqa: BLE001 - any failure means no reachable cluster
        pytest.skip(f"KUBECONFIG={kubeconfig} reaches no cluster ({type(err).__name__})")
    assert main(["k8s", "apply", "--overlay", "cpu", "--namespace", "default", "--dry-run"]) == 0
