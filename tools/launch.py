"""Start services as separate OS processes on localhost, wait for them, stop them cleanly.

Used by `make run`, the integration tests and the benchmarks: each service runs exactly as a
user would run it (`rlhf <service> serve ...`), in its own process, with mutual TLS: a
development CA and certificates are made for the stack (LocalPki, rlhf.certs), every service
serves with its own certificate, the policy service lets only the identity `trainer` push
weights and the trainer's control API only `admin` (the certificate the launcher's clients
present). Reward services answer any client the CA signed.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlhf.certs import make_certs
from rlhf.channels import open_channel, wait_until_serving
from rlhf.config.security import LOCAL_HOSTS, ClientConfig, TlsConfig
from rlhf.defaults import DEFAULT_PORTS, LOOPBACK

ADMIN = "admin"
"""The client identity the launcher's own clients (run control, probes) present."""

ALLOWED_CALLERS = {"policy": "trainer", "trainer": ADMIN}
"""Per service kind (the first word of its `rlhf` arguments): who may call its mutating RPCs."""

SERVICE_KINDS = tuple(DEFAULT_PORTS)
"""policy, reward, trainer: each gets its own certificate."""

VLLM_VENV = Path(__file__).resolve().parents[1] / ".venv-vllm"
"""The environment the policy service's vLLM engine runs from (the Makefile builds it)."""


@dataclass(frozen=True)
class LocalPki:
    """A development CA and a certificate per service kind and for ADMIN, in `folder`."""

    folder: Path

    @classmethod
    def make(cls, folder: Path) -> LocalPki:
        """Writes them (the CA in `folder` is reused, the leaf certificates are renewed)."""
        make_certs(folder, list(SERVICE_KINDS), [ADMIN], list(LOCAL_HOSTS), force=True)
        return cls(folder)

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    def tls(self, name: str) -> TlsConfig:
        """NAME's certificate and key, trusting the stack's CA."""
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        return TlsConfig(tls_cert=str(cert), tls_key=str(key), tls_ca=str(self.ca))

    def client(self, name: str = ADMIN) -> ClientConfig:
        """What a client presenting NAME's certificate uses (`trainer` may UpdateWeights)."""
        return ClientConfig(tls=self.tls(name))

    def serve_flags(self, kind: str) -> list[str]:
        """`rlhf KIND serve` flags: mutual TLS with KIND's certificate and its allow-list."""
        if kind not in SERVICE_KINDS:
            raise ValueError(f"no certificate for a {kind!r} service; kinds: {SERVICE_KINDS}")
        tls = self.tls(kind)
        flags = ["--tls-cert", tls.tls_cert, "--tls-key", tls.tls_key, "--tls-ca", tls.tls_ca]
        if kind in ALLOWED_CALLERS:
            flags += ["--allow-identity", ALLOWED_CALLERS[kind]]
        return flags

    def grpcurl_flags(self, name: str = ADMIN) -> str:
        return f"-cacert {self.ca} -cert {self.folder / name}.pem -key {self.folder / name}.key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass
class ServiceProcess:
    name: str
    address: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL after timeout_s. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass(frozen=True)
class Threads:
    """Torch threads of the policy and the trainer process when both share one machine."""

    policy: int
    trainer: int


def engine_python(engine: str) -> str:
    """The Python that runs a policy service with `engine`: this one for hf; for vllm, this
    checkout's VLLM_VENV (`make install` builds it), or this one where vLLM is importable."""
    if engine != "vllm":
        return sys.executable
    venv_python = VLLM_VENV / "bin" / "python"
    if venv_python.exists():
        return str(venv_python)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise RuntimeError(
        f"the vllm engine needs vLLM: {venv_python} is missing (run `make install`) and this "
        "Python has no vllm"
    )


def _flag(args: Sequence[str], name: str) -> str | None:
    """The value of `name` in `args` (`--x v` or `--x=v`; the last one wins), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.partition("=")[2]
    return value


def service_threads(overlapping: bool, cores: int | None = None) -> Threads:
    """The policy's and the trainer's torch threads on `cores` cores (default: this process's).

    Lock-step: every core each (they take turns). Overlapping (run.max_staleness >= 1, the
    rollout runs under the update): the cores split between them, because more OpenMP threads
    than cores spin on descheduled siblings. Measured with `make run` at staleness 1 on 2 cores
    with 2 threads each: steps of 32-98 s against ~10 s lock-step.
    """
    cores = cores or len(os.sched_getaffinity(0))
    if not overlapping:
        return Threads(cores, cores)
    policy = max(1, cores // 2)
    return Threads(policy, max(1, cores - policy))


def start_service(
    name: str,
    args: Sequence[str],
    log_dir: Path,
    port: int | None = None,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 600.0,
    pki: LocalPki | None = None,
) -> ServiceProcess:
    """Runs `rlhf <args> --host 127.0.0.1 --port P` and waits until its health is SERVING.

    With this Python, or for a policy service the one its engine needs (engine_python of its
    `--engine`, else of RLHF_ENGINE in `env` or ours); raises engine_python's error where that
    engine is not installed.

    With `pki`, the service serves mutual TLS with the certificate of its kind (`args[0]`) and
    that kind's allow-list (LocalPki.serve_flags); without, plaintext (the args say the rest).
    Output goes to log_dir/<name>.log. Raises RuntimeError with the log's tail if the process
    exits or does not become ready in time.
    """
    port = port or free_port()
    python = sys.executable
    if args[0] == "policy":
        environment = {**os.environ, **(env or {})}
        python = engine_python(_flag(args, "--engine") or environment.get("RLHF_ENGINE", "hf"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    security = pki.serve_flags(args[0]) if pki else []
    command = [
        *(python, "-m", "rlhf.cli", *args, *security),
        *("--host", LOOPBACK, "--port", str(port)),
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    service = ServiceProcess(name, f"{LOOPBACK}:{port}", process, log_path)
    channel = open_channel(service.address, pki.client() if pki else None)
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {process.returncode} before it was ready:\n"
                    f"{service.log_tail()}"
                )
            try:
                wait_until_serving(channel, timeout_s=1.0)
                return service
            except TimeoutError:
                if time.monotonic() > deadline:
                    service.stop(5)
                    raise RuntimeError(
                        f"{name} not ready after {ready_timeout_s}s:\n{service.log_tail()}"
                    ) from None
    finally:
        channel.close()


def describe(services: Iterable[ServiceProcess]) -> str:
    """One line per service: its name, the address it listens on, its log."""
    return "\n".join(f"  {s.name:<8} {s.address:<16} log {s.log_path}" for s in services)


@contextmanager
def running_services(
    specs: Sequence[tuple[str, Sequence[str]]], log_dir: Path, pki: LocalPki | None = None
) -> Iterator[dict[str, ServiceProcess]]:
    """Starts each (name, args) service in turn, with mutual TLS from `pki` (default: one made
    in log_dir/certs); stops them all on exit, also on errors."""
    pki = pki or LocalPki.make(log_dir / "certs")
    with ExitStack() as stack:
        started: dict[str, ServiceProcess] = {}
        for name, args in specs:
            service = start_service(name, args, log_dir, pki=pki)
            stack.callback(service.stop)
            started[name] = service
        yield started
