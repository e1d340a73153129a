"""The compose stack's test helpers: `docker` and `docker compose` for one private project of
the real compose file plus the test override (replicas included), and a small mutual-TLS client
of the trainer's read RPCs (the scenario itself is tests/compose/test_compose_stack.py)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from rlhf.defaults import POLICY_PORT
from rlhf.tls import TlsConfig, open_secure_channel
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "compose" / "docker-compose.yml"
TEST_OVERRIDE = Path(__file__).with_name("docker-compose.test.yml")
RUN_CONFIG = Path(__file__).with_name("run.yaml")
IMAGE = os.environ.get("RLHF_IMAGE", "rlhf-services:0.1.0")
# Where the compose file mounts each container's certificate, key and CA (deploy/compose).
CERT, KEY, CA = "/certs/tls.crt", "/certs/tls.key", "/certs/ca.crt"
# Run inside a policy container (`docker compose exec --index N policy python -c ...`): GetInfo
# on that replica itself, over TLS with its own certificate (reads take any certificate of the
# stack's CA; 127.0.0.1 is in it). Prints the weight version it serves and its instance id.
POLICY_INFO = f"""
import json
from rlhf.defaults import POLICY_PORT
from rlhf.tls import TlsConfig, open_secure_channel
from rlhf.v1 import common_pb2, policy_pb2_grpc
cfg = TlsConfig(tls_cert="{CERT}", tls_key="{KEY}", tls_ca="{CA}")
with open_secure_channel("127.0.0.1:{POLICY_PORT}", cfg) as channel:
    info = policy_pb2_grpc.PolicyServiceStub(channel).GetInfo(
        common_pb2.GetInfoRequest(), timeout=30)
print(json.dumps({{"weight_version": info.weight_version, "instance_id": info.instance_id}}))
"""


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout.strip()


class Stack:
    """One compose project of the real file plus the test override, on the engine at hand."""

    def __init__(self, models: Path, host_certs: Path, trainer_port: int, run_id: str) -> None:
        self.project = f"rlhf-it-{uuid.uuid4().hex[:8]}"
        self.trainer_address = f"127.0.0.1:{trainer_port}"
        self.host_certs = host_certs
        self.env = {
            **os.environ,
            "RLHF_IMAGE": IMAGE,
            "RLHF_TEST_MODELS": str(models),
            "RLHF_TRAINER_HOST_PORT": str(trainer_port),
            "RLHF_RUN_CONFIG": str(RUN_CONFIG),
            "RLHF_TRAIN_ARGS": f"--run-id {run_id}",
        }

    def command(self, *args: str) -> list[str]:
        return [
            "docker", "compose", "-p", self.project,
            "-f", str(COMPOSE_FILE), "-f", str(TEST_OVERRIDE), *args,
        ]  # fmt: skip

    def run(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )

    def admin_tls(self, folder: Path) -> TlsConfig:
        """The admin certificate, key and the stack's CA, copied out of the client service's
        volume into `folder`: the test's own calls to the trainer go over mutual TLS too."""
        files = {}
        for inside in (CERT, KEY, CA):
            text = self.run(
                "run", "--rm", "--no-deps", "-T", "--entrypoint", "cat", "client", inside
            )  # fmt: skip
            path = folder / Path(inside).name
            path.touch(mode=0o600)
            path.write_text(text)
            files[inside] = str(path)
        return TlsConfig(tls_cert=files[CERT], tls_key=files[KEY], tls_ca=files[CA])

    def containers(self, service: str) -> list[str]:
        """The ids of the service's containers (its replicas), in the order of their replica
        number: the first is `exec --index 1`'s."""
        ids = self.run("ps", "-q", service).split()
        assert ids, f"no container for {service}"
        number = '{{index .Config.Labels "com.docker.compose.container-number"}}'
        return sorted(ids, key=lambda i: int(docker("inspect", "-f", number, i)))

    def container(self, service: str) -> str:
        """The id of a service's one container."""
        (container_id,) = self.containers(service)
        return container_id

    def logs(self, service: str) -> str:
        """Every replica's log of the service, one after the other."""
        return self.run("logs", "--no-color", "--no-log-prefix", service, timeout=60)

    def print_logs(self) -> None:
        """Every service's log tail, for a failure's report (pytest shows captured output)."""
        for service in ("policy", "reward", "reward-b", "trainer"):
            try:
                print(f"--- logs of {service} ---\n{self.logs(service)[-4000:]}")
            except Exception as err:  # noqa: BLE001 - diagnostics only
                print(f"(no logs of {service}: {err})")

    def log_records(self, service: str, message: str) -> list[dict]:
        """The service's JSON log records (all replicas') whose msg is `message` or ends with
        it (the loop's retry messages start with the step: "step 3: score failed; retrying")."""
        return records(self.logs(service), message)

    def container_log_records(self, container_id: str, message: str) -> list[dict]:
        """The same, of one container (one replica), across its restarts."""
        done = subprocess.run(
            ["docker", "logs", container_id], capture_output=True, text=True, timeout=60,
            env=self.env, check=True,
        )  # fmt: skip
        return records(done.stdout + done.stderr, message)

    def policy_info(self, index: int) -> dict:
        """GetInfo of policy replica `index` (1-based), asked inside its container."""
        out = self.run(
            "exec", "-T", "--index", str(index), "policy", "python", "-c", POLICY_INFO,
            timeout=120,
        )  # fmt: skip
        return json.loads(out.strip().splitlines()[-1])


def records(text: str, message: str) -> list[dict]:
    """The JSON log records in `text` whose msg is `message` or ends with it."""
    found = []
    for line in text.splitlines():
        if line.startswith("{") and message in line:
            record = json.loads(line)
            if record.get("msg", "").endswith(message):
                found.append(record)
    return found


class Trainer:
    """The trainer's read RPCs (GetRun, WatchRun) from the host, over mutual TLS."""

    def __init__(self, address: str, tls: TlsConfig) -> None:
        self.channel = open_secure_channel(address, tls)
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)

    def get(self, run_id: str) -> trainer_pb2.RunStatus:
        return self.stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id), timeout=30)

    def watch(self, run_id: str, from_step: int) -> list[trainer_pb2.StepMetrics]:
        request = trainer_pb2.WatchRunRequest(run_id=run_id, from_step=from_step)
        return list(self.stub.WatchRun(request, timeout=120))

    def close(self) -> None:
        self.channel.close()


def engine_reachable() -> None:
    """Fails (never skips) with what to do when there is no engine or compose plugin."""
    for args in (("version",), ("compose", "version")):
        try:
            docker(*args, timeout=30)
        except (AssertionError, FileNotFoundError, subprocess.TimeoutExpired) as err:
            pytest.fail(
                f"`docker {' '.join(args)}` does not work here ({err}). Run the compose tests "
                "through `make test-compose`, which installs and starts an engine and builds "
                "the image."
            )
    if not docker("image", "ls", "-q", IMAGE):
        pytest.fail(f"image {IMAGE} is not built: `make images` (or `make test-compose`)")
