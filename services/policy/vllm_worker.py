"""Runs inside vLLM's workers (vLLM's `worker_extension_cls`, the extension point its RLHF
examples use): makes the engine report the log-probabilities the wire contract promises.

The contract (policy.proto, Completion.response_logprobs): the log-probability of each sampled
token under the temperature-scaled logits, before top-k/top-p. vLLM offers, per engine, either
the raw logits' log-probs (no temperature: right only at temperature 1) or the processed ones
(after top-k/top-p too: right only without them). Its sampler computes the raw ones with
`compute_logprobs(logits)` on the raw logits of every request in the step; this subclass
divides each row by its request's temperature first, which is the contract's number for any
temperature, top_k and top_p. Rows of greedy requests (temperature 0 to vLLM) keep scale 1;
VllmPolicyEngine sends a greedy request that names another temperature as temperature T with
top_k 1, so its row is scaled too.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.sampler import _SAMPLING_EPS, Sampler


class TemperatureScaledLogprobs(Sampler):
    """vLLM's sampler, its "raw_logprobs" divided by each request's temperature."""

    _temperature: torch.Tensor | None = None

    def forward(self, logits: torch.Tensor, sampling_metadata: Any, *args: Any, **kw: Any) -> Any:
        # The step's per-request temperatures (None when every request is greedy), for
        # compute_logprobs, which the base class calls with the raw logits alone.
        self._temperature = sampling_metadata.temperature
        try:
            return super().forward(logits, sampling_metadata, *args, **kw)
        finally:
            self._temperature = None

    def compute_logprobs(self, logits: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        temperature = self._temperature
        if temperature is not None:
            if temperature.shape[0] != logits.shape[0]:
                # One logits row per request is what this engine runs (no speculative decoding).
                raise RuntimeError(
                    f"{logits.shape[0]} logits rows for {temperature.shape[0]} requests: "
                    "speculative decoding is not supported by the policy service"
                )
            scale = torch.where(temperature < _SAMPLING_EPS, 1.0, temperature).to(logits.dtype)
            logits = logits / scale.unsqueeze(1)
        return logits.log_softmax(dim=-1, dtype=torch.float32)


class ContractLogprobs:
    """The worker extension: `collective_rpc("use_contract_logprobs")` once after start-up."""

    model_runner: Any  # set by vLLM's worker

    def use_contract_logprobs(self) -> str:
        """Swaps the model runner's sampler for TemperatureScaledLogprobs; refuses (so the
        service does not start) a vLLM whose sampler is not the one this was written for."""
        sampler = getattr(self.model_runner, "sampler", None)
        if type(sampler) is not Sampler or sampler.logprobs_mode != "raw_logprobs":
            raise RuntimeError(
                f"this vLLM's model runner samples with {type(sampler).__name__} "
                f"(logprobs_mode {getattr(sampler, 'logprobs_mode', None)!r}), not "
                "vllm.v1.sample.sampler.Sampler with raw_logprobs: the policy service cannot "
                "report the contract's log-probs with it (pin the vLLM version in pyproject)"
            )
        sampler.__class__ = TemperatureScaledLogprobs
        return type(sampler).__name__
