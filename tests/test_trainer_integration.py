"""The three services as separate OS processes, driven through the trainer's control API.

A tiny random policy; reward service A (VADER) and, as B, a trained reward model (a tiny
single-logit classifier served by hf-classifier) plus a length rule; one trainer. A PPO run
starts on A; after a step it is swapped to the weighted composition 1.0 x B + 0.2 x length:
the weight version advances every step, the step counter and the KL controller carry on, the
per-source statistics show the switch, a swap to a dead endpoint is refused, and StopRun
answers at once while the run finishes the step in progress and checkpoints. Every process
serves mutual TLS with the launcher's certificates (the trainer pushes weights as `trainer`,
the test drives the run as `admin`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from rlhf.clients import PolicyClient
from rlhf.v1 import policy_pb2, trainer_pb2
from services.trainer.api.client import TrainerClient, TrainerError
from tools.launch import LocalPki, free_port, running_services

pytestmark = pytest.mark.slow


def _config(model: Path, output_dir: Path, steps: int) -> str:
    return yaml.safe_dump(
        {
            "ppo": {
                "model_name": str(model),
                "batch_size": 4,
                "mini_batch_size": 2,
                "ppo_epochs": 1,
                "learning_rate": 1e-3,
                "log_with": "jsonl",
            },
            "generation": {"max_new_tokens": 6, "apply_chat_template": True},
            "run": {"steps": steps, "save_every": 2, "output_dir": str(output_dir)},
        }
    )


@dataclass
class _Run:
    """What the test saw of the run: its steps, the swap, StopRun's answer, the stream's END and
    the final status."""

    steps: list[trainer_pb2.StepMetrics] = field(default_factory=list)
    swap: trainer_pb2.SetRewardEndpointsResponse | None = None
    stopped: trainer_pb2.RunStatus | None = None
    end: trainer_pb2.StepMetrics | None = None
    final: trainer_pb2.RunStatus | None = None


def test_ppo_run_across_processes_with_a_reward_swap(
    tiny_lm: Path, tiny_reward_model: Path, tmp_path: Path
) -> None:
    specs = [
        ("policy", ["policy", "serve", "--model", str(tiny_lm)]),
        ("vader", ["reward", "serve", "--backend", "vader", "--name", "vader"]),
        ("length", ["reward", "serve", "--backend", "length", "--target-length", "4"]),
        (
            "rm",
            ["reward", "serve", "--backend", "hf-classifier", "--model", str(tiny_reward_model)]
            + ["--name", "rm", "--input", "prompt+response"],
        ),
    ]
    pki = LocalPki.make(tmp_path / "certs")
    with running_services(specs, tmp_path / "logs", pki) as services:
        trainer_args = [
            "trainer", "serve",
            "--policy", services["policy"].address,
            "--reward", services["vader"].address,
            "--output-dir", str(tmp_path / "runs"),
            "--model-root", str(tiny_lm),
            "--allowed-endpoints", "127.0.0.1:*",  # the swap's reward services
        ]  # fmt: skip
        with running_services([("trainer", trainer_args)], tmp_path / "logs", pki) as trainer:
            client = TrainerClient(trainer["trainer"].address, client=pki.client())
            config = _config(tiny_lm, tmp_path / "runs", steps=200)
            run = _run_swap_and_stop(client, config, services)
            client.close()

        _assert_stopped_after_the_step_in_progress(run)
        _assert_rewards_switched_and_kl_carried_on(run)
        _assert_policy_serves_the_last_version(services["policy"].address, pki, run)

    checkpoints = tmp_path / "runs" / "it" / "checkpoints"
    last_step = run.final.step
    assert (checkpoints / "latest").read_text().strip() == f"step-{last_step:06d}"
    assert (checkpoints / f"step-{last_step:06d}" / "policy" / "config.json").is_file()


def _run_swap_and_stop(client: TrainerClient, config: str, services: dict) -> _Run:
    """Starts run "it"; after step 1, a swap to a dead endpoint (refused) then to 1.0 x rm +
    0.2 x length; StopRun once a step on the new rewards is done; follows the run to its END."""
    status = client.start(trainer_pb2.StartRunRequest(run_id="it", config_yaml=config))
    assert status.run_id == "it" and status.total_steps == 200
    run = _Run()
    for metrics in client.watch("it", from_step=1):
        if metrics.event == trainer_pb2.WATCH_EVENT_END:
            run.end = metrics
            break
        if metrics.event != trainer_pb2.WATCH_EVENT_STEP:
            continue
        run.steps.append(metrics)
        if metrics.step == 1:
            # A dead endpoint is refused and the run keeps its rewards ...
            with pytest.raises(TrainerError) as refused:
                client.swap("it", [f"127.0.0.1:{free_port()}"])
            assert refused.value.code == "FAILED_PRECONDITION"
            assert "probe" in refused.value.details
            # ... a live one is taken from the next step that starts.
            run.swap = client.swap(
                "it",
                [services["rm"].address + "=1.0", services["length"].address + "=0.2"],
            )
        if run.swap is not None and metrics.step == run.swap.effective_from_step + 1:
            run.stopped = client.stop("it")  # answers at once; the stream's END follows
    run.final = client.get("it")
    return run


def _assert_stopped_after_the_step_in_progress(run: _Run) -> None:
    steps, end, final = run.steps, run.end, run.final
    assert run.stopped is not None and run.stopped.state == trainer_pb2.RUN_STATE_STOPPING
    assert end is not None and end.state == final.state == trainer_pb2.RUN_STATE_STOPPED
    assert [m.step for m in steps] == list(range(1, len(steps) + 1))
    assert final.step == end.step == steps[-1].step  # the step in progress was finished
    versions = [m.weight_version for m in steps]
    assert versions == list(range(versions[0], versions[0] + len(steps))), versions


def _assert_rewards_switched_and_kl_carried_on(run: _Run) -> None:
    steps, swap = run.steps, run.swap
    assert swap is not None and [r.name for r in swap.rewards] == ["rm", "length"]
    assert swap.effective_from_step >= 2  # the steps went on while the swaps were probed
    after = {"env/reward/rm", "env/reward/length"}
    for m in steps:
        names = {k for k in m.metrics if k.startswith("env/reward/")}
        expected = after if m.step >= swap.effective_from_step else {"env/reward/vader"}
        assert names == expected, (m.step, names)
        assert "objective/kl" in m.metrics and "ppo/loss/policy" in m.metrics
        # The policy service's sampled log-probs match the trainer's (the same model and
        # dtype in two processes: float32 rounding only, see test_trainer_loop's bound).
        assert m.metrics["rollout/logprob_diff_max"] < 1e-4, (m.step, m.metrics)
    # The step's reward is the weighted sum of the sources' means: 1.0 x rm + 0.2 x length.
    last = steps[-1].metrics
    weighted = last["env/reward/rm"] + 0.2 * last["env/reward/length"]
    assert last["env/reward_mean"] == pytest.approx(weighted, abs=1e-5)
    # The adaptive KL controller carried on across the swap (Ziegler et al.'s update):
    # beta_{t+1} = beta_t * (1 + clip(KL_t / target - 1, -0.2, 0.2) * batch_size / horizon).
    before_swap, at_swap = (
        steps[swap.effective_from_step - 2],
        steps[swap.effective_from_step - 1],
    )
    beta, kl = before_swap.metrics["objective/kl_coef"], before_swap.metrics["objective/kl"]
    expected_beta = beta * (1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * 4 / 10000)
    assert at_swap.metrics["objective/kl_coef"] == pytest.approx(expected_beta, rel=1e-6)


def _assert_policy_serves_the_last_version(address: str, pki: LocalPki, run: _Run) -> None:
    """The policy service serves the last version, and says so on Generate."""
    policy = PolicyClient(address, client=pki.client())
    assert policy.info().weight_version == run.final.weight_version >= run.steps[-1].weight_version
    reply = policy.generate(["hello"], policy_pb2.GenerationParams(max_new_tokens=2, seed=1))
    assert reply.weight_version == run.final.weight_version
    policy.close()
