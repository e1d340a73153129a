"""Rank 0 and the other ranks of a data-parallel trainer (torchrun, learner/parallel.py).

Rank 0 is the trainer: it serves the control API, runs the loop, talks to the policy and reward
services, writes checkpoints and pushes weights. Ranks > 0 hold a replica (DDP) or a shard
(FSDP) of the learner and do what rank 0's loop tells them, just before rank 0 does the same:

    start    a run begins: build the model and PPOTrainer from its config (JSON)
    prepare  the step's rollouts (token ids and scores, JSON): forward passes of this rank's rows
    update   the PPO epochs on the prepared batch
    weights  FSDP: join the gathering of whole weights for a push
    save     FSDP: join the gathering for the checkpoint's policy folder, write this rank's shard
    load     a resume: DDP gets rank 0's state broadcast; FSDP ranks read their own shards
    end      the run is over (or failed): drop it
    shutdown the trainer service stops: leave

Commands travel on a gloo group of their own (learner/parallel.py), as a header tensor and a
JSON payload; state tensors as raw tensors after a JSON description. Nothing is pickled. The
rollouts reach the ranks from rank 0 (which alone generates and scores), so every rank holds
the whole batch and takes its share.

A rank that fails a command logs it and keeps following; a failure inside a collective leaves
the others waiting until torch.distributed's timeout, and torchrun tears the group down, as
with any torchrun job.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlhf.config import apply_mapping
from rlhf.defaults import DEFAULT_OUTPUT_DIR
from services.trainer.config import TrainConfig
from services.trainer.learner import parallel
from services.trainer.learner.parallel import DataParallel
from services.trainer.orchestrator.checkpoint import latest_checkpoint, save_checkpoint
from services.trainer.orchestrator.trainer_state import (
    decode_state,
    encode_state,
    read_state,
    write_state,
)

log = logging.getLogger("rlhf.trainer.ranks")

OPS = ("start", "prepare", "update", "weights", "save", "load", "end", "shutdown")
SHARDS_DIR = "shards"
"""In a run folder: FSDP ranks' checkpoint shards, shards/rank-R/step-NNNNNN (rank 0's shard is
in the run's own checkpoint)."""


def shard_root(run_folder: Path, rank: int) -> Path:
    """Where rank `rank` keeps its FSDP checkpoint shards of a run."""
    return run_folder / SHARDS_DIR / f"rank-{rank}"


# --- the wire between ranks --------------------------------------------------------------------
def _send(dp: DataParallel, op: str, payload: dict[str, Any]) -> None:
    data = torch.frombuffer(bytearray(json.dumps(payload).encode()), dtype=torch.uint8)
    dist.broadcast(torch.tensor([OPS.index(op), data.numel()]), 0, group=dp.commands)
    if data.numel():
        dist.broadcast(data, 0, group=dp.commands)


def _receive(dp: DataParallel) -> tuple[str, dict[str, Any]]:
    header = torch.zeros(2, dtype=torch.long)
    dist.broadcast(header, 0, group=dp.commands)
    data = torch.empty(int(header[1]), dtype=torch.uint8)
    if data.numel():
        dist.broadcast(data, 0, group=dp.commands)
    return OPS[int(header[0])], json.loads(bytes(data.numpy()).decode()) if data.numel() else {}


def _send_state(dp: DataParallel, state: dict[str, Any]) -> None:
    """`state` to every rank: its JSON form, then each tensor (described in the JSON)."""
    data, tensors = encode_state(state)
    shapes = {k: [str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in tensors.items()}
    _send(dp, "load", {"state": data, "tensors": shapes})
    for tensor in tensors.values():
        dist.broadcast(tensor, 0, group=dp.commands)


def _receive_state(dp: DataParallel, payload: dict[str, Any]) -> dict[str, Any]:
    tensors = {}
    for key, (dtype, shape) in payload["tensors"].items():
        tensors[key] = torch.empty(shape, dtype=getattr(torch, dtype))
        dist.broadcast(tensors[key], 0, group=dp.commands)
    return decode_state(payload["state"], tensors)


def _failed_ranks(dp: DataParallel, ok: bool) -> list[int]:
    """Every rank says whether its part worked; all learn which ranks failed."""
    flags = torch.zeros(dp.world, dtype=torch.long)
    flags[dp.rank] = 0 if ok else 1
    dist.all_reduce(flags, group=dp.commands)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


# --- rank 0 ------------------------------------------------------------------------------------
class Followers:
    """Rank 0's handle on ranks > 0. Without data parallelism every call does nothing."""

    def __init__(self, dp: DataParallel | None) -> None:
        self.dp = dp if dp is not None and dp.world > 1 else None
        self._lock = threading.Lock()  # the run's thread and the service's shutdown both send

    @property
    def sharded(self) -> bool:
        """Whether the learner is sharded (FSDP): whole weights need every rank."""
        return self.dp is not None and self.dp.strategy == "fsdp"

    def _tell(self, op: str, **payload: Any) -> None:
        if self.dp is not None:
            with self._lock:
                _send(self.dp, op, payload)

    def start(self, config: TrainConfig) -> None:
        self._tell("start", config=asdict(config))

    def prepare(
        self, queries: list[list[int]], responses: list[list[int]], scores: list[float]
    ) -> None:
        self._tell("prepare", queries=queries, responses=responses, scores=scores)

    def update(self) -> None:
        self._tell("update")

    def weights(self, trained_only: bool) -> None:
        if self.sharded:
            self._tell("weights", trained_only=trained_only)

    def save(self, step: int) -> None:
        if self.sharded:
            self._tell("save", step=step)

    def saved(self) -> None:
        """After rank 0 wrote its part of an FSDP checkpoint: raises unless every rank did."""
        if self.sharded and self.dp is not None:
            failed = _failed_ranks(self.dp, True)
            if failed:
                raise RuntimeError(f"ranks {failed} could not write their checkpoint shards")

    def load(self, step: int, state: dict[str, Any]) -> None:
        """A resume from step `step`: DDP ranks get `state` (rank 0's, whole); FSDP ranks load
        their own shards of that step. Raises naming the ranks that could not."""
        if self.dp is None:
            return
        with self._lock:
            if self.sharded:
                _send(self.dp, "load", {"step": step})
            else:
                _send_state(self.dp, state)
            failed = _failed_ranks(self.dp, True)
        if failed:
            raise ValueError(
                f"ranks {failed} could not load their part of the checkpoint of step {step} "
                f"(their logs say why; FSDP shards are under {SHARDS_DIR}/rank-R/)"
            )

    def end(self) -> None:
        self._tell("end")

    def shutdown(self) -> None:
        """The service stops: the other ranks leave (those already gone are not waited for),
        then this one leaves the process group (parallel.shut_down says why that is needed)."""
        try:
            self._tell("shutdown")
        except RuntimeError as err:  # a rank that died first: gloo says so
            log.warning("ranks gone before the shutdown", extra={"reason": str(err)[:200]})
        finally:
            parallel.shut_down()


# --- ranks > 0 ---------------------------------------------------------------------------------
def _train_config(data: dict[str, Any]) -> TrainConfig:
    """The run's config as rank 0 sent it (dataclasses.asdict form, as in run.json)."""
    config = TrainConfig()
    apply_mapping(config, data)
    return config


class _Follower:
    """A rank > 0's learner for the run in progress."""

    def __init__(self, dp: DataParallel, config: TrainConfig) -> None:
        from services.trainer.learner.ppo_trainer import PPOTrainer
        from services.trainer.learner.value_head import PolicyWithValueHead

        self.dp = dp
        self.config = config
        model = PolicyWithValueHead.from_config(config.ppo)
        self.trainer = PPOTrainer(config.ppo, model, model.tokenizer, parallel=dp)
        run = config.run
        self.shards = shard_root(Path(run.output_dir or DEFAULT_OUTPUT_DIR) / run.run_id, dp.rank)
        self.batch: Any = None

    def prepare(self, payload: dict[str, Any]) -> None:
        queries = [torch.tensor(q, dtype=torch.long) for q in payload["queries"]]
        responses = [torch.tensor(r, dtype=torch.long) for r in payload["responses"]]
        scores = torch.tensor(payload["scores"], dtype=torch.float32)
        self.batch = self.trainer.prepare(queries, responses, scores)

    def update(self) -> None:
        batch, self.batch = self.batch, None
        self.trainer.update(batch)

    def save(self, step: int) -> None:
        self.trainer.whole_policy()  # rank 0 writes the policy folder from these
        ok = True
        try:
            save_checkpoint(
                self.shards,
                step,
                lambda folder: write_state(folder, self.trainer.state_dict()),
                self.config.run.keep_checkpoints,
            )
        except OSError:
            log.exception("could not write this rank's checkpoint shard")
            ok = False
        _failed_ranks(self.dp, ok)

    def load(self, payload: dict[str, Any]) -> None:
        ok = True
        try:
            if "state" in payload:
                self.trainer.load_state_dict(_receive_state(self.dp, payload))
            else:
                folder = latest_checkpoint(self.shards)
                expected = self.shards / f"step-{int(payload['step']):06d}"
                if folder != expected:
                    raise FileNotFoundError(f"no checkpoint shard {expected}")
                self.trainer.load_state_dict(read_state(folder))
        except (OSError, ValueError, KeyError):
            log.exception("could not load this rank's part of the checkpoint")
            ok = False
        _failed_ranks(self.dp, ok)


def _outlast_signals(dp: DataParallel) -> None:
    """SIGTERM/SIGINT do not end a rank > 0: torchrun signals every rank at once, and rank 0
    drains (the step in progress and its checkpoint need the other ranks), then says shutdown;
    torchrun's --shutdown-timeout kills what is still there after that."""

    def note(signum: int, _frame: Any) -> None:
        log.info("signal noted: waiting for rank 0 to shut down", extra={"rank": dp.rank})

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, note)
        signal.signal(signal.SIGINT, note)


def follow(dp: DataParallel) -> None:
    """A rank > 0's main loop: do rank 0's commands until it says shutdown, then leave the
    process group."""
    try:
        _obey(dp)
    finally:
        parallel.shut_down()


def _obey(dp: DataParallel) -> None:
    _outlast_signals(dp)
    run: _Follower | None = None
    while True:
        op, payload = _receive(dp)
        if op == "shutdown":
            return
        try:
            if op == "start":
                run = None
                run = _Follower(dp, _train_config(payload["config"]))
            elif op == "end":
                run = None
            elif run is None:
                raise RuntimeError(f"rank 0 sent {op!r} with no run started")
            elif op == "prepare":
                run.prepare(payload)
            elif op == "update":
                run.update()
            elif op == "weights":
                run.trainer.servable_state_dict(trained_only=bool(payload["trained_only"]))
            elif op == "save":
                run.save(int(payload["step"]))
            elif op == "load":
                run.load(payload)
        except Exception:  # noqa: BLE001 - logged; rank 0 fails the run on its side
            log.exception("rank failed a command", extra={"rank": dp.rank, "op": op})
