"""Start services as separate OS processes on localhost, wait for them, stop them cleanly.

Used by `make run`, the integration tests and the benchmarks: each service runs exactly as a
user would run it (`rlhf <service> serve ...`), in its own process.
"""

from __future__ import annotations

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

import grpc

from rlhf.channels import wait_until_serving


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
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


def start_service(
    name: str,
    args: Sequence[str],
    log_dir: Path,
    port: int | None = None,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 600.0,
) -> ServiceProcess:
    """Runs `rlhf <args> --host 127.0.0.1 --port P` and waits until its health is SERVING.

    Output goes to log_dir/<name>.log. Raises RuntimeError with the log's tail if the process
    exits or does not become ready in time.
    """
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    command = [sys.executable, "-m", "rlhf.cli", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    service = ServiceProcess(name, f"127.0.0.1:{port}", process, log_path)
    channel = grpc.insecure_channel(service.address)
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
    specs: Sequence[tuple[str, Sequence[str]]], log_dir: Path
) -> Iterator[dict[str, ServiceProcess]]:
    """Starts each (name, args) service in turn; stops them all on exit, also on errors."""
    with ExitStack() as stack:
        started: dict[str, ServiceProcess] = {}
        for name, args in specs:
            service = start_service(name, args, log_dir)
            stack.callback(service.stop)
            started[name] = service
        yield started
