"""The compose stack for real: the built image, deploy/compose/docker-compose.yml, a PPO run.

Runs only under `make test-compose` (part of `make test`), which installs and starts a private
Docker engine, builds rlhf-services:0.1.0 offline and sets DOCKER_HOST / DOCKER_CONFIG; on its
own (`pytest -m compose`) it needs a reachable engine with that image and fails, never skips,
without one.

The scenario, on tiny random models (tests/compose/docker-compose.test.yml), with mutual TLS and
authorisation on as the compose file sets them (certificates made at `up` by its `certs` service):
  1. `docker compose up --wait` the policy (2 replicas), reward (VADER, 2 replicas), reward-b (a
     trained reward model: hf-classifier) and trainer services: the certs one-shot, then
     healthchecks (`rlhf health` over TLS) and depends_on bring them up in order. The trainer
     reaches the replicas as dns:///policy:50051 and dns:///reward:50052.
  2. Strangers are refused UpdateWeights on the policy: a container with the admin certificate
     (PERMISSION_DENIED: only `trainer` may push), one with no certificate and one speaking
     plaintext (both refused at the TLS handshake); and StartRun on the trainer with the reward
     service's certificate (PERMISSION_DENIED: only `admin` may). The test itself reads
     the trainer from the host with the admin certificate copied out of the stack.
  3. The one-shot client service (the admin certificate) starts a 10-step run and follows it.
  4. After step 2 both policy containers are paused (tiny steps take well under a second, so
     the run is held where it is: its next Generate or UpdateWeights waits on frozen policies);
     `rlhf swap-reward` (run inside the trainer container, as admin) points it at reward-b from
     the next step. reward-b is paused and the policies unpaused: the first step on reward-b
     scores on a hung service until the trainer gives that call up (its health watch) and
     retries; then reward-b's process is killed (SIGKILL, as a crash) and its container
     unpaused. The trainer retries until docker has restarted it (restart: unless-stopped) and
     it serves again. (Killing reward-b before the run reached it raced its restart: after a
     long pause the trainer can take longer to come back to scoring than reward-b takes to.)
  5. Once that step is done, the second policy replica's process is SIGKILLed mid-run (a crash:
     docker restarts it) while the first is paused, which holds the run until the second is
     back: the restarted replica serves its base weights as version 0 and the trainer must push
     the current ones to it before it samples there again (#16: a dropped replica is
     re-admitted with current weights). Then the first is unpaused.
  6. The client exits 0; the run is COMPLETED at 8/8; every step is in metrics.jsonl exactly
     once and the weight versions strictly increase; the steps before the swap were scored by
     vader and the steps from it by rm; reward-b and the policy restarted exactly once each and
     the first step on reward-b waited out its restart; both reward replicas got Score calls;
     both policy replicas serve the last weight version (GetInfo in each container), the
     restarted one generated from pushed weights only; the last checkpoint is on the runs
     volume.
`docker compose down -v` removes containers, network and volumes whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest
import yaml

from rlhf.defaults import POLICY_PORT, REWARD_PORT, TRAINER_ADDRESS, TRAINER_PORT
from rlhf.v1 import trainer_pb2
from tests.compose.stack import (
    CA,
    CERT,
    KEY,
    RUN_CONFIG,
    Stack,
    Trainer,
    docker,
    engine_reachable,
)
from tools.launch import free_port
from tools.tiny import make_causal_lm, make_classifier

pytestmark = pytest.mark.compose

RUN_ID = "compose-it"
STEPS = yaml.safe_load(RUN_CONFIG.read_text())["run"]["steps"]
# The admin certificate inside the trainer container, for `docker compose exec trainer rlhf ...`.
ADMIN_IN_TRAINER = ("--tls-cert", "/certs/admin/tls.crt", "--tls-key", "/certs/admin/tls.key")

# Run in one-shot containers: UpdateWeights on the policy as a stranger, three ways. Prints
# {way: status name}; "OK" would mean the policy took the call.
PUSH_AS_STRANGER = f"""
import json, grpc
from rlhf.tls import TlsConfig, open_secure_channel
from rlhf.v1 import policy_pb2, policy_pb2_grpc
def push(cfg):
    with open_secure_channel("policy:{POLICY_PORT}", cfg) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        try:
            stub.UpdateWeights(iter([policy_pb2.WeightChunk()]), timeout=30)
        except grpc.RpcError as err:
            return err.code().name
    return "OK"
ways = {{
    "admin-cert": TlsConfig(tls_cert="{CERT}", tls_key="{KEY}", tls_ca="{CA}"),
    "no-cert": TlsConfig(tls_ca="{CA}"),
    "plaintext": TlsConfig(allow_plaintext=True),
}}
print(json.dumps({{way: push(cfg) for way, cfg in ways.items()}}))
"""
# Run in a one-shot of the certs service (which holds every certificate in /ca): StartRun on the
# trainer with the reward service's certificate; only `admin` may call it. Prints the status name.
START_RUN_AS_REWARD = f"""
import grpc
from rlhf.tls import TlsConfig, open_secure_channel
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
cfg = TlsConfig(tls_cert="/ca/reward.pem", tls_key="/ca/reward.key", tls_ca="/ca/ca.pem")
with open_secure_channel("trainer:{TRAINER_PORT}", cfg) as channel:
    try:
        trainer_pb2_grpc.TrainerServiceStub(channel).StartRun(
            trainer_pb2.StartRunRequest(), timeout=30)
        print("OK")
    except grpc.RpcError as err:
        print(err.code().name)
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    engine_reachable()
    models = tmp_path_factory.mktemp("compose-models")
    make_causal_lm(models / "tiny-lm")
    make_classifier(models / "tiny-rm", labels=("LABEL_0",))
    # The containers run as uid 10001: the bind-mounted models must be world-readable.
    for path in [models.parent, models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    stack = Stack(models, tmp_path_factory.mktemp("compose-certs"), free_port(), RUN_ID)
    try:
        stack.run(
            "up", "--detach", "--wait", "--wait-timeout", "420",
            "policy", "reward", "reward-b", "trainer",
            timeout=480,
        )  # fmt: skip
    except BaseException:
        stack.print_logs()
        raise
    try:
        yield stack
    finally:
        subprocess.run(
            stack.command("down", "--volumes", "--remove-orphans", "--timeout", "20"),
            env=stack.env,
            capture_output=True,
            timeout=300,
            check=False,
        )
        shutil.rmtree(models, ignore_errors=True)
        shutil.rmtree(stack.host_certs, ignore_errors=True)


def _wait_for_step(client: Trainer, step: int, timeout_s: float) -> trainer_pb2.RunStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status = client.get(RUN_ID)
            if status.step >= step or status.state in (
                trainer_pb2.RUN_STATE_COMPLETED,
                trainer_pb2.RUN_STATE_FAILED,
            ):
                return status
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: the client has not started
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"run {RUN_ID} did not reach step {step} in {timeout_s} s")
        time.sleep(0.05)


def test_ppo_run_through_compose_survives_reward_and_policy_crashes(stack: Stack) -> None:
    try:
        _scenario(stack)
    except BaseException:
        stack.print_logs()
        raise


def _scenario(stack: Stack) -> None:
    _assert_all_healthy(stack)
    _assert_strangers_refused(stack)
    trainer = Trainer(stack.trainer_address, stack.admin_tls(stack.host_certs))
    client_proc = stack.popen("run", "--rm", "-T", "client")
    policy_ids = stack.containers("policy")
    reward_ids = stack.containers("reward")
    reward_b_id = stack.container("reward-b")
    try:
        effective = _swap_and_crash_mid_run(stack, trainer, policy_ids, reward_b_id)
        _crash_a_policy_replica_mid_run(trainer, policy_ids, effective)
    except BaseException:
        client_proc.kill()
        print(f"--- the client's output ---\n{client_proc.communicate()[0][-4000:]}")
        raise
    _wait_for_the_client(client_proc)
    final, steps = _assert_every_step_once(trainer, effective)
    _assert_metrics_file_has_every_step_once(stack)
    _assert_reward_b_restarted_and_waited_for(stack, reward_b_id, steps, effective)
    _assert_every_reward_replica_scored(stack, reward_ids)
    (survivor, victim) = policy_ids
    assert docker("inspect", "-f", "{{.RestartCount}}", survivor) == "0"
    _assert_restarted_once(victim, "policy replica 2")
    _assert_restarted_replica_sampled_pushed_weights_only(stack, victim)
    _assert_last_step_served_and_saved(stack, final)


def _assert_all_healthy(stack: Stack) -> None:
    """Every container of every service is healthy through the image's gRPC HEALTHCHECK; the
    replicated services run two each."""
    for service, replicas in (("policy", 2), ("reward", 2), ("reward-b", 1), ("trainer", 1)):
        containers = stack.containers(service)
        assert len(containers) == replicas, (service, containers)
        for container_id in containers:
            health = docker("inspect", "-f", "{{.State.Health.Status}}", container_id)
            assert health == "healthy", (service, container_id, health)


def _assert_strangers_refused(stack: Stack) -> None:
    """Only the trainer's certificate may UpdateWeights: a one-shot container with the admin
    certificate is refused by the authorisation interceptor, one without a certificate or in
    plaintext by the policy's mutual TLS (the handshake fails: UNAVAILABLE). Only the admin
    certificate may StartRun: the reward service's is refused."""
    out = stack.run(
        "run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "client",
        "-c", PUSH_AS_STRANGER,
        timeout=180,
    )  # fmt: skip
    answers = json.loads(out.strip().splitlines()[-1])
    print(f"UpdateWeights as a stranger: {answers}")
    assert answers["admin-cert"] == "PERMISSION_DENIED", answers
    assert answers["no-cert"] in ("UNAVAILABLE", "UNAUTHENTICATED"), answers
    assert answers["plaintext"] in ("UNAVAILABLE", "UNAUTHENTICATED"), answers
    refused = stack.log_records("policy", "call refused")
    assert any(r.get("code") == "PERMISSION_DENIED" for r in refused), refused
    # Nor can another service of the stack drive runs: only admin may.
    out = stack.run(
        "run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "certs",
        "-c", START_RUN_AS_REWARD,
        timeout=180,
    )  # fmt: skip
    assert out.strip().splitlines()[-1] == "PERMISSION_DENIED", out


def _swap_and_crash_mid_run(
    stack: Stack, trainer: Trainer, policy_ids: list[str], reward_b_id: str
) -> int:
    """Step 4 of the scenario: the run held after step 2 (steps 1 and 2 scored by the two
    reward replicas) and swapped to reward-b; reward-b hung, the run released onto it, and
    reward-b killed once the trainer has given up a call on it. Returns the swap's first step."""
    paused: list[str] = []  # unpaused again whatever fails
    try:
        status = _wait_for_step(trainer, 2, timeout_s=240)
        assert status.state == trainer_pb2.RUN_STATE_RUNNING, status
        assert status.total_steps == STEPS

        # Hold the run: its next Generate or UpdateWeights waits on frozen policies (all of
        # them: with one left the pool would go on without the other).
        for policy_id in policy_ids:
            docker("pause", policy_id)
            paused.append(policy_id)
        swap = stack.run(
            "exec", "-T", "trainer", "rlhf", "swap-reward", "--trainer", TRAINER_ADDRESS,
            *ADMIN_IN_TRAINER, "--run-id", RUN_ID, f"reward-b:{REWARD_PORT}",
            timeout=120,
        )  # fmt: skip
        assert "rewards from step" in swap and f"rm @ reward-b:{REWARD_PORT}" in swap, swap
        effective = int(swap.split("rewards from step")[1].split(":")[0])
        # Steps 1 and 2 were done before the swap; the held run got at most a step or two
        # further, which leaves steps for the policy's crash after it.
        assert 3 <= effective <= STEPS - 3, swap

        # The run goes on to the swap's first step and scores on a hung reward-b: it cannot
        # finish that step before reward-b's crash and restart, however long it takes to get
        # there after the policies' pause.
        docker("pause", reward_b_id)
        paused.append(reward_b_id)
        for policy_id in policy_ids:
            docker("unpause", policy_id)
            paused.remove(policy_id)
        _wait_for_a_retried_score(trainer, effective)
        # A crash of the reward service the run is waiting on. The SIGKILL stays pending in
        # the frozen process and ends it as the unpause thaws it, before it runs again (what
        # `docker kill` of a paused container does; a kill from the host counts as a crash).
        _crash(reward_b_id)
        paused.remove(reward_b_id)
        docker("unpause", reward_b_id, check=False)  # cgroup v2 may have ended it already
    finally:
        for container_id in paused:
            docker("unpause", container_id, check=False)
    return effective


def _wait_for_a_retried_score(trainer: Trainer, step: int) -> None:
    """The run is scoring `step` and has given up at least one Score call (a hung service:
    its health watch cancels the call) and is retrying it."""
    deadline = time.monotonic() + 240
    while True:
        status = trainer.get(RUN_ID)
        progress = status.progress
        assert status.state == trainer_pb2.RUN_STATE_RUNNING, status
        assert status.step < step, f"step {step} finished while reward-b was paused: {status}"
        if (
            progress.phase == trainer_pb2.RUN_PHASE_SCORING
            and progress.step == step
            and progress.retries >= 1
        ):
            print(f"step {step} retrying its score on the hung reward-b: {progress.last_error}")
            return
        assert time.monotonic() < deadline, f"step {step} never retried its score: {progress}"
        time.sleep(0.1)


def _crash(container_id: str) -> None:
    """SIGKILL of the container's main process from the host: a crash, which the restart
    policy answers (`docker kill` or `docker stop` would count as a manual stop: no restart)."""
    pid = int(docker("inspect", "-f", "{{.State.Pid}}", container_id))
    os.kill(pid, signal.SIGKILL)


def _crash_a_policy_replica_mid_run(
    trainer: Trainer, policy_ids: list[str], effective: int
) -> None:
    """Step 5: once the first step on reward-b is done, the second policy replica's process is
    killed while the first is paused: the run, with no live replica, waits until docker has
    restarted the second, which serves base weights as version 0 and must get the current ones
    before it generates. Then the first is unpaused and rejoins."""
    survivor, victim = policy_ids
    status = _wait_for_step(trainer, effective, timeout_s=240)
    assert status.state == trainer_pb2.RUN_STATE_RUNNING, status
    docker("pause", survivor)
    try:
        _crash(victim)
        # Tiny steps are quick: the crash must land before the run's last step, or it proves
        # nothing.
        assert trainer.get(RUN_ID).step < STEPS, "the run ended before the policy's crash"
        _wait_until_healthy_again(victim, "policy replica 2")
    finally:
        docker("unpause", survivor, check=False)


def _wait_for_the_client(client_proc: subprocess.Popen) -> None:
    """The client service follows the run to its end and exits 0 when it completed."""
    try:
        output, _ = client_proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        client_proc.kill()
        output, _ = client_proc.communicate()
    print(f"--- the client's output ---\n{output[-4000:]}")
    assert client_proc.returncode == 0, output
    assert f"run {RUN_ID}: COMPLETED at step {STEPS}/{STEPS}" in output, output


def _assert_every_step_once(
    trainer: Trainer, effective: int
) -> tuple[trainer_pb2.RunStatus, list[trainer_pb2.StepMetrics]]:
    """The run completed; every step once, in order, weight versions strictly increasing (a
    policy restart may cost a version); the reward sources switch at the swap. Returns the final
    status and the steps."""
    final = trainer.get(RUN_ID)
    assert final.state == trainer_pb2.RUN_STATE_COMPLETED, final.error
    assert final.step == final.total_steps == STEPS

    # Every step once, in order, versions strictly increasing; sources switch at the swap.
    messages = trainer.watch(RUN_ID, from_step=1)
    assert messages[-1].event == trainer_pb2.WATCH_EVENT_END, messages[-1]
    steps = [m for m in messages if m.event == trainer_pb2.WATCH_EVENT_STEP]
    trainer.close()
    assert [m.step for m in steps] == list(range(1, STEPS + 1))
    versions = [m.weight_version for m in steps]
    assert all(a < b for a, b in zip(versions, versions[1:])), versions
    assert final.weight_version == versions[-1]
    for m in steps:
        sources = {k for k in m.metrics if k.startswith("env/reward/")}
        expected = {"env/reward/rm"} if m.step >= effective else {"env/reward/vader"}
        assert sources == expected, (m.step, sources)
    return final, steps


def _assert_reward_b_restarted_and_waited_for(
    stack: Stack, reward_b_id: str, steps: list[trainer_pb2.StepMetrics], effective: int
) -> None:
    """reward-b crashed once and docker brought it back; the trainer waited for it."""
    _assert_restarted_once(reward_b_id, "reward-b")
    # The first step on reward-b waited out the hang and the restart (retried: by gRPC's retry
    # policy for UNAVAILABLE, then by the loop, which logs each attempt) instead of failing or
    # skipping.
    waited = steps[effective - 1].metrics["time/score"]
    retries = stack.log_records("trainer", "score failed; retrying")
    print(f"step {effective} scored after {waited:.1f} s; loop retries: {retries}")
    assert waited > 1.0, (effective, waited)
    assert retries, "the trainer logged no retry of the score on the crashed reward-b"
    assert all(r["run"] == RUN_ID and r["msg"].startswith(f"step {effective}:") for r in retries), (
        retries
    )


def _assert_restarted_once(container_id: str, service: str) -> None:
    """Docker restarted the crashed container once, and it became healthy again."""
    restarts = docker("inspect", "-f", "{{.RestartCount}}", container_id)
    assert restarts == "1", (service, restarts)
    _wait_until_healthy_again(container_id, service)


def _wait_until_healthy_again(container_id: str, service: str) -> None:
    """Docker has restarted the crashed container and its healthcheck passes again."""
    deadline = time.monotonic() + 120
    while docker("inspect", "-f", "{{.RestartCount}}", container_id) == "0":
        assert time.monotonic() < deadline, f"{service} was not restarted"
        time.sleep(0.5)
    while docker("inspect", "-f", "{{.State.Health.Status}}", container_id) != "healthy":
        assert time.monotonic() < deadline, f"{service} did not become healthy after its restart"
        time.sleep(1)


def _assert_metrics_file_has_every_step_once(stack: Stack) -> None:
    """The run's metrics.jsonl on the runs volume: steps 1..STEPS once each, in order, and
    weight versions strictly increasing (no step lost or done twice across the crashes)."""
    text = stack.run("exec", "-T", "trainer", "cat", f"/runs/{RUN_ID}/metrics.jsonl", timeout=60)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), [r["step"] for r in rows]
    versions = [r["weight_version"] for r in rows]
    assert all(a < b for a, b in zip(versions, versions[1:])), versions


def _assert_every_reward_replica_scored(stack: Stack, reward_ids: list[str]) -> None:
    """The reward source before the swap was both reward containers (dns:///reward:50052, the
    steps' batches split across them): each logged Score calls ("scored": its first call, then
    a summary every 10 s)."""
    for index, container_id in enumerate(reward_ids, start=1):
        scored = stack.container_log_records(container_id, "scored")
        print(f"reward replica {index}: {scored}")
        assert scored and all(r["samples"] > 0 for r in scored), (index, scored)


def _assert_restarted_replica_sampled_pushed_weights_only(stack: Stack, victim: str) -> None:
    """After its restart (its server's last "serving") the killed replica generated again, from
    the weights the trainer pushed it. An answer from its base weights (version 0) is allowed
    only before its first weight update, and only refused: when the replica died and came back
    while the trainer waited on the paused one, the pool meets the new instance first in a
    Generate answer (nothing else could have told it), leaves the replica out for it and
    redoes the work after a push; the trainer's log says so. No step used such samples:
    _assert_every_step_once checked every step's weight version."""
    records = stack.container_log_records(victim, "")  # every record
    starts = [i for i, r in enumerate(records) if r.get("msg") == "serving"]
    assert len(starts) >= 2, starts  # the first start and the restart
    after = records[starts[-1] :]
    updates = [i for i, r in enumerate(after) if r.get("msg") == "weights updated"]
    generated = [(i, r) for i, r in enumerate(after) if r.get("msg") == "generated"]
    print(f"policy replica 2 after its restart: {generated}")
    assert updates, "the restarted replica never got the trainer's weights"
    assert any(i > updates[0] for i, _ in generated), "the restarted replica was never used again"
    base = [(i, r) for i, r in generated if r["weight_version"] == 0]
    assert all(i < updates[0] for i, _ in base), base  # never once it had the weights
    if base:  # the pool met the restart in that answer and refused it
        refused = [
            r
            for r in stack.log_records("trainer", "policy replica left out")
            if "answered: it restarted" in r.get("why", "")
        ]
        assert refused, base


def _assert_last_step_served_and_saved(stack: Stack, final: trainer_pb2.RunStatus) -> None:
    # Every policy replica serves what the trainer pushed last (asked in each container).
    for index in (1, 2):
        info = stack.policy_info(index)
        print(f"policy replica {index}: {info}")
        assert info["weight_version"] == final.weight_version, (index, info, final)

    # The run's folder (metrics, checkpoint of the last step) is on the `runs` volume.
    latest = stack.run(
        "exec", "-T", "trainer", "cat", f"/runs/{RUN_ID}/checkpoints/latest", timeout=60
    )
    assert latest.strip() == f"step-{STEPS:06d}"
