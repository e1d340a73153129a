"""In-process transports: the policy engine and a reward backend in the trainer's own process.

The loop cannot tell them from the gRPC transports, which is what lets bench_loop.py compare the
loop through the services with the loop without gRPC (and lets tests run the loop fast). The
sampling settings take the very path they take to the service: the run's GenerationConfig ->
GenerationParams (transports.generation_params) -> the engine's SamplingParams (the policy
service's own params_from_proto).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from services.trainer.config import GenerationConfig
from services.trainer.orchestrator.peers import PolicyFacts, Pushed, Rollout, policy_facts


class LocalPolicy:
    """The policy engine in this process (no gRPC): the benchmark's baseline."""

    def __init__(
        self, model: str, device: str = "cpu", dtype: str = "float32", address: str = "local"
    ) -> None:
        from services.policy.engine import PolicyEngine

        self.engine = PolicyEngine(model, device=device, dtype=dtype)
        self.address = address

    def facts(self, fresh: bool = False) -> PolicyFacts:
        return policy_facts(self.engine.info())  # in-process: always fresh, and cheap

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        from services.policy.server import params_from_proto
        from services.trainer.orchestrator.transports import generation_params

        completions = self.engine.generate(prompts, params_from_proto(generation_params(gen, seed)))
        return Rollout(
            query_ids=[c.prompt_token_ids for c in completions],
            response_ids=[c.response_token_ids for c in completions],
            response_logprobs=[c.response_logprobs for c in completions],
            response_texts=[c.response_text for c in completions],
            weight_version=completions[0].weight_version,
            instance_id=self.engine.instance_id,
        )

    def push_weights(
        self,
        tensors: Mapping[str, torch.Tensor],
        version: int,
        full: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ) -> Pushed:
        dtype = self.engine.dtype
        cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
        # The engine keeps its own copy, as the service does: copy, never alias, the trainer's.
        self.engine.apply_weights({k: v.detach().clone() for k, v in cast.items()}, version)
        return Pushed(self.engine.weight_version, self.engine.instance_id)

    def close(self) -> None:
        pass


class LocalReward:
    """A reward backend in this process (no gRPC): the benchmark's baseline."""

    def __init__(
        self, backend: object, input_mode: str = "response", address: str = "local"
    ) -> None:
        self.backend = backend
        self.input_mode = input_mode
        self.address = address

    def name(self) -> str:
        return str(getattr(self.backend, "name", "local"))

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from services.reward.server import texts_to_score

        return self.backend.score(texts_to_score(prompts, responses, self.input_mode))  # type: ignore[attr-defined]

    def close(self) -> None:
        pass
