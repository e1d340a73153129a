"""A Generate request's checks, in one place: prompts and sampling knobs against the server's
limits and the model's facts, before any work, each refusal saying what to fix.

Nothing here touches a model: any engine (transformers here, vLLM later) calls
`validate_request` on the request, then `validate_prompt_lengths` on the tokenised prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rlhf.errors import exhausted, invalid
from rlhf.logs import quote
from services.policy.config import PolicyServiceConfig

MIN_TEMPERATURE = 0.01
"""Lowest temperature accepted: logits / a smaller one overflow float32 (1e-45 gives inf, and
sampling fails). Near-greedy is do_sample=false."""
MAX_TEMPERATURE = 100.0
"""Highest temperature accepted: above it sampling is uniform noise."""
MAX_REQUEST_ID_CHARS = 128
"""Longest GenerateRequest.request_id (echoed in the response and every log line)."""


@dataclass
class SamplingParams:
    """The request's sampling knobs, with the wire's "0/unset means default" conventions."""

    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 0.0
    """0 means 1.0."""
    top_k: int = 0
    """0 turns top-k off."""
    top_p: float = 0.0
    """0 means 1.0 (off)."""
    do_sample: bool | None = None
    """None means True (the seed exercise samples)."""
    seed: int | None = None
    """None: a fresh random seed each call."""
    apply_chat_template: bool = False


@dataclass
class EngineLimits:
    """Server-side caps on one Generate call (defaults: PolicyServiceConfig's)."""

    max_new_tokens_cap: int = PolicyServiceConfig.max_new_tokens_cap
    max_batch_size: int = PolicyServiceConfig.max_batch_size
    max_prompt_chars: int = PolicyServiceConfig.max_prompt_chars


def validate_request(
    prompts: Sequence[str], params: SamplingParams, limits: EngineLimits, has_chat_template: bool
) -> None:
    """Refuses a request (RpcError: INVALID_ARGUMENT or RESOURCE_EXHAUSTED) before any work."""
    _validate_prompts(prompts, limits)
    if params.max_new_tokens == 0:
        raise invalid("params.max_new_tokens is 0: set how many tokens to generate (>= 1)")
    if params.max_new_tokens > limits.max_new_tokens_cap:
        raise exhausted(
            f"params.max_new_tokens {params.max_new_tokens} is above this server's cap "
            f"{limits.max_new_tokens_cap}: ask for fewer tokens"
        )
    if params.min_new_tokens > params.max_new_tokens:
        raise invalid(
            f"params.min_new_tokens {params.min_new_tokens} is above max_new_tokens "
            f"{params.max_new_tokens}: lower it"
        )
    _validate_floats(params)
    if params.apply_chat_template and not has_chat_template:
        raise invalid(
            "apply_chat_template is set but this model's tokenizer has no chat template: "
            "send apply_chat_template=false and format the prompts yourself"
        )


def validate_request_id(request_id: str) -> None:
    """Refuses (INVALID_ARGUMENT) a request id longer than MAX_REQUEST_ID_CHARS."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid(
            f"request_id {quote(request_id)} is longer than {MAX_REQUEST_ID_CHARS} characters"
        )


def _validate_floats(params: SamplingParams) -> None:
    """temperature 0 (1.0) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]; top_p 0 (off) or in
    (0, 1]; NaN and infinities refused (every comparison with NaN is false)."""
    temperature, top_p = params.temperature, params.top_p
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise invalid(
            f"params.temperature {temperature!r} must be 0 (meaning 1.0) or between "
            f"{MIN_TEMPERATURE} and {MAX_TEMPERATURE}"
        )
    if not (math.isfinite(top_p) and 0 <= top_p <= 1):
        raise invalid(f"params.top_p {top_p!r} must be in (0, 1] (0 means 1.0, off)")


def _validate_prompts(prompts: Sequence[str], limits: EngineLimits) -> None:
    if not prompts:
        raise invalid("prompts is empty: send at least one prompt")
    if len(prompts) > limits.max_batch_size:
        raise exhausted(
            f"{len(prompts)} prompts exceed this server's max_batch_size "
            f"{limits.max_batch_size}: split the request"
        )
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise invalid(f"prompts[{i}] is empty: every prompt needs some text")
        if len(prompt) > limits.max_prompt_chars:
            raise exhausted(
                f"prompts[{i}] has {len(prompt)} characters, above this server's "
                f"max_prompt_chars {limits.max_prompt_chars}: shorten it"
            )


def validate_prompt_lengths(
    prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, context_length: int
) -> None:
    """Refuses (INVALID_ARGUMENT) a prompt that tokenises to nothing, or that leaves no room in
    the model's context for max_new_tokens."""
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise invalid(f"prompts[{i}] tokenises to no tokens: send some text")
        if len(ids) + max_new_tokens > context_length:
            raise invalid(
                f"prompts[{i}] is {len(ids)} tokens; with max_new_tokens "
                f"{max_new_tokens} that is {len(ids) + max_new_tokens}, "
                f"above the model's context length {context_length}: shorten the prompt "
                "or lower max_new_tokens"
            )
