"""Batched sampling with a causal LM: prompts encoded and left-padded into one batch, sampled
with the request's knobs, and each sampled token's log-probability under the sampling
distribution before top-k/top-p (what PPO's old log-probs are compared with)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    recorder = SampledLogprobs(params.temperature or 1.0)
    with torch.inference_mode(), recorder.attached(model):
        out = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention.to(model.device),
            generation_config=config,
        )
        new_tokens = out.sequences[:, input_ids.shape[1] :]
        return new_tokens.cpu(), recorder.logprobs(new_tokens).cpu()


class SampledLogprobs:
    """Each sampled token's log-prob under the raw logits / temperature (before top-k/top-p),
    recorded while `generate` runs, by hooks on the model's forward.

    Why not generate's output_logits: it keeps every step's logits until the end, batch x steps
    x vocabulary floats (SmolLM2, 4 x 64 x 49152: 50 MB), on top of the served weights and the
    next upload's buffer: the policy service's peak. Here one step's log-softmax is kept, until
    the next forward's input shows which token was sampled from it (decoding feeds the last
    sampled token back in); the last step's token is paired after generate returns. The numbers
    are output_logits' (the same logits, the same float32 cast and log-softmax). It relies on
    generate calling the model once for the prompt, then once per sampled token, as plain
    sampling and greedy search do (generation_config asks for nothing else);
    tests/policy/test_generate.py checks it against output_logits, bit for bit.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self._pending: torch.Tensor | None = None
        self._taken: list[torch.Tensor] = []

    @contextmanager
    def attached(self, model: torch.nn.Module) -> Iterator[None]:
        """Records the forward passes of `model` within the block."""
        handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _before_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self._pending is None:
            return  # the prompt's forward pass
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise RuntimeError("a decoding step without input_ids: cannot pair sampled tokens")
        self._take(input_ids[:, -1:])

    def _after_forward(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        self._pending = torch.log_softmax(output.logits[:, -1].float() / self.temperature, dim=-1)

    def _take(self, tokens: torch.Tensor) -> None:
        assert self._pending is not None
        self._taken.append(self._pending.gather(1, tokens.to(self._pending.device)).squeeze(1))
        self._pending = None

    def logprobs(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(batch, steps) log-probs of `new_tokens`, generate's output after the prompt. A step
        generate ran and then undid (a deferred stop check) is dropped."""
        steps = new_tokens.shape[1]
        if self._pending is not None and len(self._taken) < steps:
            self._take(new_tokens[:, len(self._taken) : len(self._taken) + 1])
        if len(self._taken) < steps:
            raise RuntimeError(f"{len(self._taken)} forward passes recorded for {steps} tokens")
        if steps == 0:
            return torch.empty((new_tokens.shape[0], 0))
        return torch.stack(self._taken[:steps], dim=1)


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
