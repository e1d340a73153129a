"""Shared plumbing: env-var flags, JSON logs, health/reflection bootstrap, channel retries."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rlhf.compute import ComputeThread
from rlhf.config import add_env_argument, add_server_arguments, server_config
from rlhf.logs import JsonFormatter
from rlhf.server import GrpcService, ServerConfig


def test_env_vars_set_flag_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_PORT", "6001")
    monkeypatch.setenv("RLHF_SOME_FLAG", "yes")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, default_port=5000)
    add_env_argument(parser, "--some-flag", action="store_true")
    args = parser.parse_args([])
    assert server_config(args).port == 6001 and args.some_flag is True
    assert parser.parse_args(["--port", "7"]).port == 7  # the flag wins over the variable


def test_json_log_lines_carry_context() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "generated %d", (3,), None)
    record.weight_version = 4
    record.request_id = "r1"
    entry = json.loads(JsonFormatter("policy").format(record))
    assert entry["service"] == "policy" and entry["msg"] == "generated 3"
    assert entry["weight_version"] == 4 and entry["request_id"] == "r1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_health_goes_serving_and_reflection_lists_services() -> None:
    service = GrpcService("probe", ServerConfig(host="127.0.0.1", port=0, grace_s=1))
    port = service.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service="")
    assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
    service.set_serving()
    assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert "grpc.health.v1.Health" in names
    service.stop(grace_s=0)
    channel.close()


def test_compute_thread_runs_jobs_in_order_on_one_thread_and_passes_errors_back() -> None:
    compute = ComputeThread("test-compute")
    seen: list[tuple[int, str]] = []

    def job(n: int) -> int:
        time.sleep(0.01 if n == 0 else 0)  # the first job is the slowest: order must still hold
        seen.append((n, threading.current_thread().name))
        return n * n

    futures = [compute.submit(job, n) for n in range(4)]
    assert [f.result(timeout=10) for f in futures] == [0, 1, 4, 9]
    assert [n for n, _ in seen] == [0, 1, 2, 3]  # one at a time, in submission order
    assert {name for _, name in seen} == {"test-compute"}  # never the caller's thread

    def fails() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        compute.run(fails)
    assert compute.run(job, 5) == 25  # an exception does not end the thread
    compute.close()
    with pytest.raises(RuntimeError, match="closed"):
        compute.submit(job, 6)
