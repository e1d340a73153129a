"""What the policy service's tests share: the request helpers and the server's limits."""

from __future__ import annotations

import grpc

from rlhf.clients import PolicyClient
from rlhf.v1 import policy_pb2
from services.policy.engine import EngineLimits

LIMITS = EngineLimits(max_new_tokens_cap=64, max_batch_size=8, max_prompt_chars=600)
PROMPTS = ["hello world", "the movie was very good and i really love it", "why"]
Code = grpc.StatusCode


def params(**kw: object) -> policy_pb2.GenerationParams:
    kw.setdefault("max_new_tokens", 8)
    return policy_pb2.GenerationParams(**kw)  # type: ignore[arg-type]


def tokens(reply: policy_pb2.GenerateResponse) -> list[list[int]]:
    return [list(c.response_token_ids) for c in reply.completions]


def served_version(client: PolicyClient) -> int:
    return client.info().weight_version


GREEDY = params(max_new_tokens=12, do_sample=False)
