"""Batched sampling with a causal LM: prompts encoded and left-padded into one batch, sampled
with the request's knobs, and each sampled token's log-probability under the sampling
distribution before top-k/top-p (what PPO's old log-probs are compared with)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from services.policy.validation import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass
class Completion:
    """One prompt's completion, without padding."""

    prompt_text: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float]
    response_text: str
    finish_reason: str
    """FINISH_STOP (EOS sampled, and included in response_token_ids) or FINISH_LENGTH."""
    weight_version: int
    """The weight version that produced it."""


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], chat: bool
) -> tuple[list[str], list[list[int]]]:
    """(the texts as the model reads them, their token ids); `chat` wraps each prompt as one user
    turn of the tokenizer's chat template, ready for the assistant's answer."""
    if chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    else:
        texts = list(prompts)
    # A chat template writes its own special tokens (BOS included); don't add them twice.
    encoded = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    return texts, [list(ids) for ids in encoded]


def left_pad(prompt_ids: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (batch, longest prompt), pads on the left."""
    width = max(len(x) for x in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    return input_ids, attention


def generation_config(params: SamplingParams, eos_token_ids: list[int], pad: int) -> Any:
    """The transformers GenerationConfig of a request: its knobs, the wire's defaults applied."""
    from transformers import GenerationConfig

    do_sample = True if params.do_sample is None else params.do_sample
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=params.min_new_tokens or None,
        do_sample=do_sample,
        # Warpers only apply when sampling; greedy must not carry them (generate warns).
        temperature=(params.temperature or 1.0) if do_sample else None,
        top_k=params.top_k if do_sample else None,
        top_p=(params.top_p or 1.0) if do_sample else None,
        eos_token_id=eos_token_ids,
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_logits=True,
    )


def sample(
    model: Any,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    config: Any,
    params: SamplingParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tokens (batch, steps), their log-probs (batch, steps)), both on the CPU."""
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    # Seeded every call (a fresh random seed when unset) so a seeded call never leaves the RNG
    # in a state that makes the next unseeded one predictable.
    torch.manual_seed(seed)
    temperature = params.temperature or 1.0
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention.to(model.device),
            generation_config=config,
        )
        new_tokens = out.sequences[:, input_ids.shape[1] :]
        # Log-prob of each sampled token under the raw logits / temperature, i.e. before
        # top-k/top-p: computed per step so no (batch, steps, vocab) copy is made.
        logprobs = torch.stack(
            [
                torch.log_softmax(step.float() / temperature, dim=-1)
                .gather(1, new_tokens[:, t : t + 1])
                .squeeze(1)
                for t, step in enumerate(out.logits)
            ],
            dim=1,
        ).cpu()
        return new_tokens.cpu(), logprobs


def completions(
    tokenizer: Any,
    texts: list[str],
    prompt_ids: list[list[int]],
    new_tokens: torch.Tensor,
    logprobs: torch.Tensor,
    eos_token_ids: list[int],
    weight_version: int,
) -> list[Completion]:
    """Each row of a padded batch's output as a completion (see make_completion)."""
    return [
        make_completion(
            tokenizer,
            texts[row],
            ids,
            new_tokens[row].tolist(),
            logprobs[row].tolist(),
            eos_token_ids,
            weight_version,
        )
        for row, ids in enumerate(prompt_ids)
    ]


def make_completion(
    tokenizer: Any,
    text: str,
    prompt_ids: list[int],
    tokens: list[int],
    logprobs: list[float],
    eos_token_ids: list[int],
    weight_version: int,
) -> Completion:
    """One prompt's sampled tokens as a completion, cut after the first EOS token (FINISH_STOP)
    or whole (FINISH_LENGTH), its text decoded by `tokenizer`: every engine ends here, so
    finish reasons, EOS handling and texts agree between them."""
    eos = set(eos_token_ids)
    finish = FINISH_LENGTH
    for t, token in enumerate(tokens):
        if token in eos:
            tokens, finish = tokens[: t + 1], FINISH_STOP
            break
    return Completion(
        prompt_text=text,
        prompt_token_ids=prompt_ids,
        response_token_ids=tokens,
        response_logprobs=logprobs[: len(tokens)],
        response_text=tokenizer.decode(tokens, skip_special_tokens=True),
        finish_reason=finish,
        weight_version=weight_version,
    )
