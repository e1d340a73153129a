"""How the trainer reaches the policy and the reward sources: small swappable classes.

`GrpcPolicy` / `GrpcReward` talk to the services. The benchmark's in-process twins
(bench/local_transports.py) run the same engine and backend in one process; the loop cannot
tell them apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from rlhf.clients import PolicyClient, RewardClient
from rlhf.models import parse_dtype
from rlhf.v1 import policy_pb2
from services.trainer.config import GenerationConfig


@dataclass
class Rollout:
    """One batch of generations, as the PPO step needs them."""

    query_ids: list[list[int]]
    response_ids: list[list[int]]
    response_texts: list[str]
    weight_version: int
    """The weight version that produced every response."""


@dataclass
class PolicyFacts:
    model: str
    weight_version: int
    dtype: torch.dtype


class PolicyTransport(Protocol):
    def facts(self) -> PolicyFacts: ...

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout: ...

    def push_weights(self, tensors: Mapping[str, torch.Tensor], version: int) -> int:
        """Makes `version` the served weights; returns the version served after."""
        ...

    def close(self) -> None: ...


def _params(gen: GenerationConfig, seed: int) -> policy_pb2.GenerationParams:
    return policy_pb2.GenerationParams(
        max_new_tokens=gen.max_new_tokens,
        min_new_tokens=gen.min_new_tokens,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        do_sample=gen.do_sample,
        seed=seed,
        apply_chat_template=gen.apply_chat_template,
    )


class GrpcPolicy:
    def __init__(self, address: str) -> None:
        self.address = address
        self.client = PolicyClient(address)

    def facts(self) -> PolicyFacts:
        info = self.client.info()
        return PolicyFacts(info.model, info.weight_version, parse_dtype(info.dtype))

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        reply = self.client.generate(prompts, _params(gen, seed))
        return Rollout(
            query_ids=[list(c.prompt_token_ids) for c in reply.completions],
            response_ids=[list(c.response_token_ids) for c in reply.completions],
            response_texts=[c.response_text for c in reply.completions],
            weight_version=reply.weight_version,
        )

    def push_weights(self, tensors: Mapping[str, torch.Tensor], version: int) -> int:
        dtype = self.facts().dtype
        return self.client.update_weights(tensors, version, dtype=dtype).version

    def close(self) -> None:
        self.client.close()


class GrpcReward:
    def __init__(self, address: str) -> None:
        self.address = address
        self.client = RewardClient(address)

    def name(self) -> str:
        return self.client.info().name

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.client.score(prompts, responses)

    def close(self) -> None:
        self.client.close()
