"""This project's side of bench_seed.py: the policy, reward (VADER) and trainer services as three
processes on localhost with mutual TLS, started as `make run` starts them (tools.launch), and
PPO runs started through the trainer's API.

One ProjectStack per variant (fp32, bf16, and each at run.max_staleness 1), kept up for the
whole bench, so that each process's peak memory (VmHWM) belongs to one variant. The peaks are
read after a stack's first run, which is all a `make run` does.

Each round is one run of WARMUP_STEPS + K steps; its seconds are the wall time from the warm-up
step's metrics row to the last step's (the rows' `time`), so the warm-up step, the run's start
(model load, first weight push) and its final checkpoint are excluded, and a rollout that
overlaps the previous step's update counts once. Every run starts from the same weights and
seed, so each round repeats the same first steps.

    with ProjectStack(variant, model, work, threads, overrides, data) as stack:
        rows = stack.run_round(steps=3)         # the run's metrics rows, warm-up step first
        seconds = round_seconds(rows)           # the 3 measured steps' wall time
        stack.first_run_peak_mib                # {process: VmHWM MiB} after the first run
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bench.measure import peak_memory_mib

if TYPE_CHECKING:  # grpc and the launcher load when a stack starts
    from tools.launch import LocalPki, ServiceProcess, Threads

WARMUP_STEPS = 1
"""Steps at the start of each run that are not measured (lazy initialisation, first touches)."""
VLLM_KV_CACHE_GIB = 0.5
"""The vllm engine's KV cache here, host memory on the CPU that counts in the memory ratio: the
service's default is 1 GiB; vLLM refuses less than one sequence of the model's whole context
(SmolLM2's 8192 tokens in fp32: 0.35 GiB), though 4 sequences of under 100 tokens use a few MiB."""


@dataclass(frozen=True)
class Variant:
    """One way of running this project's side."""

    name: str
    """The run's name prefix and the column of the report (fp32, bf16, fp32-overlap, ...)."""
    policy_dtype: str
    """The policy service's --dtype."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Run config overrides of this variant, on top of the bench's common ones."""
    staleness: int = 0
    """run.max_staleness of its runs: 0 lock-step; 1 the rollout of step t+1 overlaps update t."""
    engine: str = "hf"
    """The policy service's --engine: hf (transformers' generate) or vllm (from .venv-vllm)."""


def round_seconds(rows: list[dict[str, Any]]) -> float:
    """Wall seconds of a run's measured steps: from the warm-up step's row to the last row."""
    if len(rows) <= WARMUP_STEPS:
        raise ValueError(f"{len(rows)} rows: nothing after the {WARMUP_STEPS} warm-up step(s)")
    return float(rows[-1]["time"]) - float(rows[WARMUP_STEPS - 1]["time"])


class ProjectStack:
    """The three services of one variant; run_round() runs one PPO run through the trainer."""

    def __init__(
        self,
        variant: Variant,
        model: Path,
        work: Path,
        threads: Threads,
        overrides: dict[str, str],
        data: Path,
        policy_device: str = "cpu",
    ) -> None:
        """`work`: this stack's folder (logs, certificates, run folders); `overrides`: the
        run config every variant shares (the trainer's device is its ppo.device); `data`: the
        trainer's --data-root (its run.prompts lies there); `policy_device`: the policy
        service's --device."""
        self.variant = variant
        self.model = model
        self.work = work
        self.data = data
        self.threads = threads
        self.policy_device = policy_device
        self.overrides = {
            **overrides,
            **variant.overrides,
            "run.max_staleness": str(variant.staleness),
            "ppo.model_name": str(model),
        }
        self.rounds = 0
        self.first_run_peak_mib: dict[str, float] = {}
        """Each process's peak memory (VmHWM, MiB) when the first run had ended."""
        self._stack = ExitStack()
        self._services: dict[str, ServiceProcess] = {}
        self._pki: LocalPki | None = None

    def __enter__(self) -> ProjectStack:
        from tools.launch import LocalPki

        self._pki = LocalPki.make(self.work / "certs")
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        from tools.launch import start_service

        logs = self.work / "logs"
        policy_args = ["policy", "serve", "--model", str(self.model)]
        policy_args += ["--dtype", self.variant.policy_dtype, "--threads", str(self.threads.policy)]
        policy_args += ["--device", self.policy_device, "--engine", self.variant.engine]
        if self.variant.engine == "vllm":
            policy_args += ["--vllm-kv-cache-gib", str(VLLM_KV_CACHE_GIB)]
        specs = [
            ("policy", policy_args, self.threads.policy),
            ("reward", ["reward", "serve", "--backend", "vader"], 1),
        ]
        for name, args, threads in specs:
            # OMP_NUM_THREADS sizes the OpenMP pool before torch starts; --threads sets torch's.
            env = {"OMP_NUM_THREADS": str(threads)}
            self._add(start_service(name, args, logs, env=env, pki=self._pki))
        trainer_args = [
            *("trainer", "serve", "--policy", self._services["policy"].address),
            *("--reward", self._services["reward"].address),
            *("--output-dir", str(self.work / "runs"), "--data-root", str(self.data)),
            *("--model-root", str(self.model)),
        ]
        trainer_args += ["--threads", str(self.threads.trainer)]
        env = {"OMP_NUM_THREADS": str(self.threads.trainer)}
        self._add(start_service("trainer", trainer_args, logs, env=env, pki=self._pki))

    def _add(self, service: ServiceProcess) -> None:
        self._stack.callback(service.stop)
        self._services[service.name] = service

    def run_round(self, steps: int) -> list[dict[str, Any]]:
        """One run of WARMUP_STEPS + `steps` steps, to its end; all its metrics rows (warm-up
        first). The run's checkpoints are deleted (each is the size of the model and its
        optimiser state). Raises RuntimeError when the run does not complete."""
        from rlhf.v1 import trainer_pb2
        from services.trainer.api.client import TrainerClient
        from services.trainer.orchestrator.metrics import read_metrics

        self.rounds += 1
        run_id = f"{self.variant.name}-round{self.rounds}"
        total = WARMUP_STEPS + steps
        request = trainer_pb2.StartRunRequest(
            run_id=run_id,
            policy_address=self._services["policy"].address,
            rewards=[trainer_pb2.RewardEndpoint(address=self._services["reward"].address)],
            overrides={**self.overrides, "run.steps": str(total)},
        )
        assert self._pki is not None, "ProjectStack is not entered"
        client = TrainerClient(self._services["trainer"].address, client=self._pki.client())
        end = None
        try:
            client.start(request)
            for message in client.watch(run_id):
                if message.event == trainer_pb2.WATCH_EVENT_END:
                    end = message
                    break
        finally:
            client.close()
        folder = self.work / "runs" / run_id
        if end is None:
            raise RuntimeError(
                f"{self.variant.name}: the watch of run {run_id} ended without its end: the "
                f"trainer went away\n{self._services['trainer'].log_tail()}"
            )
        if end.state != trainer_pb2.RUN_STATE_COMPLETED:
            state = trainer_pb2.RunState.Name(end.state)
            raise RuntimeError(
                f"{self.variant.name}: run {run_id} ended {state} at step {end.step}/{total}: "
                f"{end.error}\n{self._services['trainer'].log_tail()}"
            )
        if self.rounds == 1:
            self.first_run_peak_mib = self.peak_mib()
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        rows = read_metrics(folder / "metrics.jsonl")
        if [row["step"] for row in rows] != list(range(1, total + 1)):
            raise RuntimeError(f"{folder}/metrics.jsonl: expected steps 1..{total}, got {rows}")
        return rows

    def peak_mib(self) -> dict[str, float]:
        """Each service process's peak resident memory so far (VmHWM), in MiB."""
        return {name: peak_memory_mib(pid) for name, pid in self.pids().items()}

    def pids(self) -> dict[str, int]:
        """Each service's process id, by service name."""
        return {name: s.process.pid for name, s in self._services.items()}

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stack.close()
