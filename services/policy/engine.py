"""The policy engine: a causal LM that samples completions and takes new weights.

No gRPC here: the servicer (services.policy.server) wraps it, and benchmarks or tests can run it
in-process. One lock orders generation and weight swaps: Generate holds it while sampling, and a
weight update takes it only for the final copy and version bump, so every completion comes from
exactly one weight version and a half-applied update is never sampled from.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf.errors import exhausted, invalid, precondition
from rlhf.models import resolve_model
from rlhf.weights import dtype_name
from services.policy.config import PolicyServiceConfig

log = logging.getLogger("rlhf.policy.engine")

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


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


@dataclass
class EngineLimits:
    """Server-side caps on one Generate call (defaults: PolicyServiceConfig's)."""

    max_new_tokens_cap: int = PolicyServiceConfig.max_new_tokens_cap
    max_batch_size: int = PolicyServiceConfig.max_batch_size
    max_prompt_chars: int = PolicyServiceConfig.max_prompt_chars


@dataclass
class TokenizerFacts:
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    bos_token_id: int
    """-1 when the tokenizer has no BOS token."""
    context_length: int
    has_chat_template: bool


@dataclass
class EngineInfo:
    model: str
    weight_version: int
    device: str
    dtype: str
    num_parameters: int
    tokenizer: TokenizerFacts
    limits: EngineLimits = field(default_factory=EngineLimits)


def _context_length(config: object, tokenizer: object) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", 0)
    # Tokenizers without a limit report a huge sentinel (int(1e30)); that is no limit at all.
    return value if isinstance(value, int) and 0 < value < 10**9 else 2**31 - 1


def _own_memory(model: torch.nn.Module) -> None:
    """Moves CPU weights that live in a file mapping (safetensors loads are mmapped) into the
    process's own memory.

    A mapped page is faulted in on first use and again whenever the kernel reclaims it from an
    idle server, and the first weight update would pay a copy-on-write fault for every 4 KiB:
    seconds on a VM. Tied weights stay tied (a shared Parameter is one object).
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def _target(model: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src. One memmove for contiguous CPU tensors: torch's copy_ splits a big copy over
    its thread pool, which gains nothing on a memory-bound copy and stalls for whole time
    slices when the machine's cores are busy (a shared CI box, or generation threads)."""
    if (
        dst.device.type == "cpu"
        and src.device.type == "cpu"
        and dst.dtype == src.dtype
        and dst.is_contiguous()
        and src.is_contiguous()
    ):
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())
    else:
        dst.copy_(src)


class PolicyEngine:
    """Loads a causal LM + tokenizer and serves batched sampling and versioned weight swaps."""

    def __init__(
        self,
        model: str,
        device: str | torch.device = PolicyServiceConfig.device,
        dtype: str | torch.dtype = PolicyServiceConfig.dtype,
        limits: EngineLimits | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.utils import logging as hf_logging

        from rlhf.models import parse_device, parse_dtype

        self.model_name = model
        self.device = parse_device(device) if isinstance(device, str) else device
        self.dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        self.limits = limits or EngineLimits()
        hf_logging.disable_progress_bar()

        source = resolve_model(model)
        if source.startswith("~"):
            source = str(Path(source).expanduser())
        # A path that is not there fails here, clearly, rather than as a hub lookup.
        if source.startswith(("/", "./", "../")) and not Path(source).is_dir():
            raise FileNotFoundError(f"model folder {source} does not exist")
        started = time.monotonic()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=self.dtype)
        except Exception as err:
            raise RuntimeError(
                f"cannot load {source!r} as a causal LM with its tokenizer: {err}"
            ) from err
        lm.to(self.device)
        lm.eval()
        lm.requires_grad_(False)
        _own_memory(lm)

        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise RuntimeError(f"{source}: the tokenizer has no EOS token; generation cannot stop")
        eos: set[int] = {int(tokenizer.eos_token_id)}
        model_eos = lm.generation_config.eos_token_id
        if isinstance(model_eos, int):
            eos.add(model_eos)
        elif model_eos:
            eos.update(int(i) for i in model_eos)
        self.eos_token_ids = sorted(eos)
        # A clean generation config: the request's knobs alone decide sampling. A checkpoint's
        # own defaults (repetition_penalty, top_k=50, ...) would silently change the sampled
        # distribution away from the one whose log-probs we report.
        lm.generation_config = GenerationConfig(
            eos_token_id=self.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        self.tokenizer = tokenizer
        self.model = lm
        self.context_length = _context_length(lm.config, tokenizer)
        self.weight_version = 0
        self._lock = threading.Lock()
        # name -> the served tensor; tied weights appear under each of their names.
        self._state = dict(lm.state_dict())
        # The Parameter (or buffer) object behind each name, tied names sharing one.
        self._targets = {name: _target(lm, name) for name in self._state}
        # Upload receive buffers: every one we hold, those an upload is filling, and which one
        # each served tensor lives in after a no-copy update (absent: torch's own memory).
        self._buffers: dict[int, mmap.mmap] = {}
        self._reserved: set[int] = set()
        self._backing: dict[str, int] = {}
        self._pool_lock = threading.Lock()
        self.num_parameters = sum(p.numel() for p in lm.parameters())
        log.info(
            "model loaded",
            extra={
                "model": model,
                "source": source,
                "device": str(self.device),
                "dtype": dtype_name(self.dtype),
                "num_parameters": self.num_parameters,
                "context_length": self.context_length,
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    # --- facts --------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        tok = self.tokenizer
        return EngineInfo(
            model=self.model_name,
            weight_version=self.weight_version,
            device=str(self.device),
            dtype=dtype_name(self.dtype),
            num_parameters=self.num_parameters,
            tokenizer=TokenizerFacts(
                vocab_size=len(tok),
                eos_token_id=int(tok.eos_token_id),
                pad_token_id=int(tok.pad_token_id),
                bos_token_id=-1 if tok.bos_token_id is None else int(tok.bos_token_id),
                context_length=self.context_length,
                has_chat_template=bool(getattr(tok, "chat_template", None)),
            ),
            limits=self.limits,
        )

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of every served tensor: what an upload may carry."""
        return {name: (tuple(t.shape), t.dtype) for name, t in self._state.items()}

    # --- generation -----------------------------------------------------------------------------
    def validate(self, prompts: Sequence[str], params: SamplingParams) -> None:
        """Rejects a request before any work, with a message that says what to fix."""
        limits = self.limits
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
        if not params.temperature >= 0:  # also catches NaN
            raise invalid(f"params.temperature {params.temperature} must be >= 0 (0 means 1.0)")
        if not 0 <= params.top_p <= 1:
            raise invalid(f"params.top_p {params.top_p} must be in [0, 1] (0 means 1.0, off)")
        if params.apply_chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise invalid(
                "apply_chat_template is set but this model's tokenizer has no chat template: "
                "send apply_chat_template=false and format the prompts yourself"
            )

    def _encode(self, prompts: Sequence[str], chat: bool) -> tuple[list[str], list[list[int]]]:
        tok = self.tokenizer
        if chat:
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
        else:
            texts = list(prompts)
        # A chat template writes its own special tokens (BOS included); don't add them twice.
        encoded = tok(texts, add_special_tokens=not chat)["input_ids"]
        return texts, [list(ids) for ids in encoded]

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        """One completion per prompt, sampled as one left-padded batch from one weight version."""
        from transformers import GenerationConfig

        self.validate(prompts, params)
        texts, ids = self._encode(prompts, params.apply_chat_template)
        for i, prompt_ids in enumerate(ids):
            if not prompt_ids:
                raise invalid(f"prompts[{i}] tokenises to no tokens: send some text")
            if len(prompt_ids) + params.max_new_tokens > self.context_length:
                raise invalid(
                    f"prompts[{i}] is {len(prompt_ids)} tokens; with max_new_tokens "
                    f"{params.max_new_tokens} that is {len(prompt_ids) + params.max_new_tokens}, "
                    f"above the model's context length {self.context_length}: shorten the prompt "
                    "or lower max_new_tokens"
                )

        temperature = params.temperature or 1.0
        do_sample = True if params.do_sample is None else params.do_sample
        pad = int(self.tokenizer.pad_token_id)
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for row, prompt_ids in enumerate(ids):
            input_ids[row, width - len(prompt_ids) :] = torch.tensor(prompt_ids)
            attention[row, width - len(prompt_ids) :] = 1
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens or None,
            do_sample=do_sample,
            # Warpers only apply when sampling; greedy must not carry them (generate warns).
            temperature=temperature if do_sample else None,
            top_k=params.top_k if do_sample else None,
            top_p=(params.top_p or 1.0) if do_sample else None,
            eos_token_id=self.eos_token_ids,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=True,
        )

        with self._lock:
            version = self.weight_version
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            # Seeded every call (a fresh random seed when unset) so a seeded call never leaves
            # the RNG in a state that makes the next unseeded one predictable.
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    generation_config=config,
                )
                new_tokens = out.sequences[:, width:]
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
                new_tokens = new_tokens.cpu()

        eos = set(self.eos_token_ids)
        completions = []
        for row, prompt_ids in enumerate(ids):
            tokens = new_tokens[row].tolist()
            finish = FINISH_LENGTH
            for t, token in enumerate(tokens):
                if token in eos:
                    tokens, finish = tokens[: t + 1], FINISH_STOP
                    break
            completions.append(
                Completion(
                    prompt_text=texts[row],
                    prompt_token_ids=prompt_ids,
                    response_token_ids=tokens,
                    response_logprobs=logprobs[row, : len(tokens)].tolist(),
                    response_text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    finish_reason=finish,
                    weight_version=version,
                )
            )
        return completions

    # --- weights --------------------------------------------------------------------------------
    def receive_buffer(self, nbytes: int) -> mmap.mmap:
        """Memory to receive an upload of `nbytes` into (WeightAssembler's `allocate`).

        A spare buffer when one is free (no page faults: it is mapped already), else a new one:
        page-aligned, so tensors received into it can become the served weights as they are
        (see apply_weights). Give it back with release_buffer() whatever the upload's fate.
        """
        with self._pool_lock:
            live = set(self._backing.values())
            for key, buffer in self._buffers.items():
                if key not in live and key not in self._reserved and len(buffer) >= nbytes:
                    self._reserved.add(key)
                    return buffer
            page = mmap.PAGESIZE
            buffer = mmap.mmap(-1, max(page, -(-nbytes // page) * page))
            if hasattr(mmap, "MADV_HUGEPAGE"):  # fewer, cheaper first-touch faults
                buffer.madvise(mmap.MADV_HUGEPAGE)
            self._buffers[id(buffer)] = buffer
            self._reserved.add(id(buffer))
            return buffer

    def release_buffer(self, buffer: object) -> None:
        """Ends an upload's hold on its receive buffer; keeps one free buffer as the spare."""
        with self._pool_lock:
            self._reserved.discard(id(buffer))
            live = set(self._backing.values())
            free = [k for k in self._buffers if k not in live and k not in self._reserved]
            free.sort(key=lambda k: len(self._buffers[k]), reverse=True)
            for key in free[1:]:
                del self._buffers[key]

    def _adoptable(self, tensors: Mapping[str, torch.Tensor], backing: object | None) -> bool:
        """Can these tensors become the served weights without a copy? Only a full upload (every
        served tensor, under any of its tied names) into one of our receive buffers, on CPU,
        with every tensor 64-byte aligned (as fast to compute with as torch's own memory)."""
        if backing is None or id(backing) not in self._buffers or self.device.type != "cpu":
            return False
        covered = {id(self._targets[name]) for name in tensors}
        if covered != {id(target) for target in self._targets.values()}:
            return False
        return all(t.is_contiguous() and t.data_ptr() % 64 == 0 for t in tensors.values())

    def apply_weights(
        self, tensors: Mapping[str, torch.Tensor], version: int, backing: object | None = None
    ) -> int:
        """Makes verified tensors the served weights and bumps the version; returns the count.

        Checked (and moved to the device) without the lock, so generation goes on meanwhile;
        the lock is held only for the swap and the version bump, so no Generate call ever sees
        a mix of two versions. When `backing` is the receive_buffer() the tensors are views
        into and they cover the whole model, the model's tensors are pointed at them (no copy:
        the previous weights' buffer becomes the next upload's spare); otherwise they are
        copied into the served tensors.
        """
        problems = []
        for name, tensor in tensors.items():
            served = self._state.get(name)
            if served is None:
                problems.append(f"{name}: no such tensor in the served model")
            elif tuple(tensor.shape) != tuple(served.shape) or tensor.dtype != served.dtype:
                problems.append(
                    f"{name}: {list(tensor.shape)} {dtype_name(tensor.dtype)}, served "
                    f"{list(served.shape)} {dtype_name(served.dtype)}"
                )
        if problems:
            raise invalid("weights rejected: " + "; ".join(problems[:5]))
        adopt = self._adoptable(tensors, backing)
        if self.device.type != "cpu":
            tensors = {name: t.to(self.device) for name, t in tensors.items()}
        with self._lock:
            if version <= self.weight_version:
                raise precondition(
                    f"version {version} is not newer than the served version "
                    f"{self.weight_version}; send a higher version"
                )
            with torch.no_grad():
                if adopt:
                    for name, tensor in tensors.items():
                        self._targets[name].data = tensor
                    self._state = dict(self.model.state_dict())
                    with self._pool_lock:
                        self._backing = {name: id(backing) for name in self._state}
                else:
                    for name, tensor in tensors.items():
                        _copy_into(self._state[name], tensor)
            self.weight_version = version
        return len(tensors)
