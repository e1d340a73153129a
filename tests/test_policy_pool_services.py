"""A pool of real policy engines and services (issue #16): the loop over two in-process
replicas that restart, TLS for dns:/// replicas, and (slow) two `rlhf policy serve` processes,
one SIGKILLed mid-run. The pool's rules with fakes: test_policy_pool.py."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from rlhf.call_limits import CallLimits
from rlhf.certs import make_certs
from rlhf.config.security import AuthConfig, ClientConfig, TlsConfig
from rlhf.config.server import ServerConfig
from rlhf.defaults import LOOPBACK
from rlhf.server import build_server
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer, servicers
from services.trainer.config import GenerationConfig
from services.trainer.orchestrator.loop import TrainingLoop
from services.trainer.orchestrator.peers import Rollout, TransientError
from services.trainer.orchestrator.policy_endpoints import PolicyEndpoints
from services.trainer.orchestrator.policy_pool import PolicyPool
from services.trainer.orchestrator.transports import GrpcPolicy, connect_policy
from tests.servers import NO_AUTH_FLAG
from tests.test_policy_restart import RestartablePolicy, _same_parameters, _versions
from tests.test_trainer_loop import _config, _vader_mixer
from tools.launch import start_service


def test_dns_replicas_check_the_certificate_against_the_name(tiny_lm: Path, tmp_path: Path) -> None:
    """A certificate for `localhost` only (no IP address): a replica of dns:///localhost:P,
    dialled at 127.0.0.1, is checked against `localhost`, so TLS holds."""
    make_certs(tmp_path, ["policy"], ["caller"], ["localhost"])
    tls = {
        name: TlsConfig(
            str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key"), str(tmp_path / "ca.pem")
        )
        for name in ("policy", "caller")
    }
    config = ServerConfig(
        host=LOOPBACK, port=0, grace_s=0, tls=tls["policy"], auth=AuthConfig(no_auth=True)
    )
    service = build_server("policy", servicers(PolicyServicer(PolicyEngine(str(tiny_lm)))), config)
    client = ClientConfig(tls=tls["caller"])
    by_address = GrpcPolicy(f"{LOOPBACK}:{service.port}", client, CallLimits(info_s=5))
    pool = connect_policy(f"dns:///localhost:{service.port}", client)
    try:
        assert pool.facts().model.name == str(tiny_lm)
        assert pool.states()[f"{LOOPBACK}:{service.port}"] == "ready"
        with pytest.raises(TransientError):  # the certificate does not name 127.0.0.1
            by_address.facts()
    finally:
        pool.close()
        by_address.close()
        service.stop(0)


# --- the loop over a pool of real engines (in this process) --------------------------------------
class EngineReplica(RestartablePolicy):
    """A replica in this process. Its engine seeds torch's global generator per call, which
    the replicas in one process share: their calls run one at a time (separate processes,
    as deployed, need no such lock)."""

    rng = threading.Lock()

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        with self.rng:
            return super().generate(prompts, gen, seed)


def _engines_pool(model: Path) -> tuple[PolicyPool, list[RestartablePolicy]]:
    engines = {f"e{i}:1": EngineReplica(str(model)) for i in range(2)}
    for address, engine in engines.items():
        engine.address = address
    return PolicyPool(PolicyEndpoints.parse(",".join(engines)), engines.__getitem__), list(
        engines.values()
    )


def test_all_replicas_restarted_the_run_repushes_in_full_and_completes(
    tiny_lm: Path, tmp_path: Path
) -> None:
    """LoRA (partial pushes). Both replicas restart after step 1: the pool has no ready
    replica, WeightSync's resync pushes everything (same version) to both, the step generates
    again, and the run equals one over a pool that never restarted."""
    straight_pool, _ = _engines_pool(tiny_lm)
    straight = TrainingLoop(
        _config(tiny_lm, tmp_path, 3, "straight", True), straight_pool, _vader_mixer()
    )
    straight.run()
    pool, engines = _engines_pool(tiny_lm)

    def restart_all(result: object) -> None:
        if result.step == 1:  # type: ignore[attr-defined]
            for engine in engines:
                engine.restart()

    loop = TrainingLoop(_config(tiny_lm, tmp_path, 3, "restarted", True), pool, _vader_mixer())
    loop.run(on_step=restart_all)
    full = len(loop.model.policy_state_dict_for_serving())
    partial = len(loop.model.policy_state_dict_for_serving(trained_only=True))
    for engine in engines:
        assert engine.pushes == [(1, partial), (1, full), (2, partial), (3, partial)]
    assert _versions(tmp_path / "restarted") == [1, 2, 3]
    assert _same_parameters(straight, loop)


# --- real processes -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_replica_process_killed_mid_run_is_left_out_and_readmitted(
    tiny_lm: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two `rlhf policy serve` processes; one is SIGKILLed after step 1 and started again on
    its port. The run goes on with the other, the restarted one gets everything at a later
    push and serves the run's final version; the log says it left and came back."""
    args = ["policy", "serve", "--model", str(tiny_lm), NO_AUTH_FLAG]
    logs = tmp_path / "logs"
    services = [start_service(f"policy-{i}", args, logs) for i in range(2)]
    victim = services[1]
    port = int(victim.address.rsplit(":", 1)[1])
    config = _config(tiny_lm, tmp_path, 5, "pool", lora=True)
    config.run.step_retries = 8
    config.run.retry_backoff_s = 0.25

    def kill_and_restart(result: object) -> None:
        if result.step == 1:  # type: ignore[attr-defined]
            victim.process.kill()
            victim.process.wait()
            services.append(start_service("policy-1-again", args, logs, port=port))

    spec = ",".join(s.address for s in services)
    policy = connect_policy(spec)
    try:
        with caplog.at_level(logging.INFO, logger="rlhf.trainer.pool"):
            loop = TrainingLoop(config, policy, _vader_mixer())
            assert loop.run(on_step=kill_and_restart) == "completed"
        restarted = GrpcPolicy(victim.address)
        try:
            served = restarted.facts(fresh=True)
        finally:
            restarted.close()
    finally:
        policy.close()
        for service in services:
            service.stop(timeout_s=5)
    assert len(services) == 3 and loop.step == 5
    assert served.weight_version == loop.weight_version == 5
    events = [(r.getMessage(), getattr(r, "replica", "")) for r in caplog.records]
    left = events.index(("policy replica left out", victim.address))
    assert ("policy replica re-admitted", victim.address) in events[left:]
    assert ("policy replica re-admitted", victim.address) not in events[:left]
    assert _versions(tmp_path / "pool") == [1, 2, 3, 4, 5]


def test_an_overlapped_run_over_a_pool_survives_a_replica_restart(
    tiny_lm: Path, tmp_path: Path
) -> None:
    """run.max_staleness 1 (the rollout worker generates ahead): a replica restarting after
    step 2 is left out of the worker's Generate and gets everything at the next push."""
    pool, engines = _engines_pool(tiny_lm)
    config = _config(tiny_lm, tmp_path, 4, "overlapped", True)
    config.run.max_staleness = 1
    loop = TrainingLoop(config, pool, _vader_mixer())
    restarted_after: list[int] = []

    def restart(result: object) -> None:
        if result.step == 2:  # type: ignore[attr-defined]
            restarted_after.append(len(engines[1].pushes))
            engines[1].restart()

    assert loop.run(on_step=restart) == "completed"
    full = len(loop.model.policy_state_dict_for_serving())
    after = engines[1].pushes[restarted_after[0] :]
    assert after and after[0][1] == full  # the first push after its restart: everything
    assert pool.states() == {"e0:1": "ready", "e1:1": "ready"}
    versions = _versions(tmp_path / "overlapped")
    assert versions == sorted(versions) and len(versions) == 4
