"""What the vLLM engine's tests share: starting `rlhf policy serve --engine vllm` as a process,
and the trainer's recomputation of a completion's log-probs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf.v1 import policy_pb2
from services.trainer.learner.batch import pad_rollouts
from services.trainer.learner.config import PPOConfig
from services.trainer.learner.forward import per_sequence_attention, policy_forward
from services.trainer.learner.ppo import logprobs_from_logits
from services.trainer.learner.value_head import PolicyWithValueHead
from tests.policy.common import LIMITS
from tests.servers import NO_AUTH_FLAG
from tools.launch import ServiceProcess, start_service

READY_TIMEOUT_S = 240.0
"""A vLLM policy service starts in ~20-25 s here (tiny LM or SmolLM2, measured); the limit gives a
loaded machine ten times that before the test fails with the service's log."""


def start_vllm_policy(name: str, model: str, log_dir: Path) -> ServiceProcess:
    """`rlhf policy serve --engine vllm` on MODEL in a process of its own, run by the Python
    engine_python("vllm") names (which raises, failing the test, where vLLM is not installed):
    plaintext on loopback, no authorisation, one torch thread, tests.policy's LIMITS."""
    limits = [
        arg
        for field, value in dataclasses.asdict(LIMITS).items()
        for arg in (f"--{field.replace('_', '-')}", str(value))
    ]
    args = ["policy", "serve", "--engine", "vllm", "--model", model, NO_AUTH_FLAG]
    return start_service(
        name,
        [*args, "--threads", "1", *limits],
        log_dir,
        ready_timeout_s=READY_TIMEOUT_S,
    )


def trainer_model(folder: str) -> PolicyWithValueHead:
    """The trainer's PPO model on FOLDER's LM: float32, on the CPU, in eval mode, attending per
    packed sequence (as PPOTrainer.prepare runs it, packing by default)."""
    model = PolicyWithValueHead.from_pretrained(folder, dtype="float32").eval()
    per_sequence_attention(model.lm)
    return model


@torch.no_grad()
def trainer_logprobs(
    model: PolicyWithValueHead,
    completions: Sequence[policy_pb2.Completion],
    temperature: float,
    pad_token_id: int,
) -> list[torch.Tensor]:
    """Each completion's response log-probs as PPOTrainer.prepare computes its old log-probs
    (pad_rollouts -> policy_forward, packed as by default -> logprobs_from_logits, one batch), of
    the logits divided by `temperature`: the contract's number. The trainer itself uses the
    unscaled logits, the temperature-1 case, where x / 1.0 == x exactly."""
    queries = [torch.tensor(list(c.prompt_token_ids)) for c in completions]
    responses = [torch.tensor(list(c.response_token_ids)) for c in completions]
    batch = pad_rollouts(queries, responses, pad_token_id, full_kl=False, scores=None)
    idx = torch.arange(len(completions))
    logits, _ = policy_forward(model, batch, idx, packed=PPOConfig.pack_sequences)
    labels = batch.response_ids[:, : logits.shape[1]]
    logprobs = logprobs_from_logits(logits / temperature, labels)
    return [logprobs[row, : len(r)] for row, r in enumerate(responses)]


def logprob_gap(
    completions: Sequence[policy_pb2.Completion], recomputed: Sequence[torch.Tensor]
) -> tuple[float, float]:
    """(max, mean) |service's log-prob - recomputed| over every response token."""
    diffs = torch.cat(
        [
            (torch.tensor(list(c.response_logprobs), dtype=torch.float64) - r.double()).abs()
            for c, r in zip(completions, recomputed, strict=True)
        ]
    )
    return float(diffs.max()), float(diffs.mean())


def assert_logprobs_close(
    label: str,
    completions: Sequence[policy_pb2.Completion],
    recomputed: Sequence[torch.Tensor],
    tolerance: float,
) -> None:
    """|service's log-prob - recomputed| below `tolerance` on every token; the max and mean are
    printed (`pytest -s` shows them) and named in the failure."""
    worst, mean = logprob_gap(completions, recomputed)
    tokens = sum(len(c.response_token_ids) for c in completions)
    report = f"{label}: |vLLM - trainer| over {tokens} tokens: max {worst:.3g}, mean {mean:.3g}"
    print(report)
    assert worst < tolerance, report
