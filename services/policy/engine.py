"""The policy engine: the facade the servicer (services.policy.server) drives, with no gRPC in
it, so benchmarks and tests can run it in-process.

Its parts, one job each: `loading` (the model and tokenizer for a device and dtype),
`validation` (a request's checks), `sampling` (batched sampling with log-probs) and
`weight_store` (the versioned, verified swap). The servicer runs generate() and apply_weights()
on its one ComputeThread (rlhf.compute), one at a time, so every completion comes from exactly
one weight version.
"""

from __future__ import annotations

import mmap
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from rlhf.heap import release_freed_heap
from rlhf.weights import dtype_name
from services.policy.config import PolicyServiceConfig
from services.policy.loading import load_causal_lm
from services.policy.sampling import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    completions,
    encode_prompts,
    generation_config,
    left_pad,
    sample,
)
from services.policy.validation import (
    EngineLimits,
    SamplingParams,
    validate_prompt_lengths,
    validate_request,
)
from services.policy.weight_store import WeightStore

# What the servicer, the CLI and the bench import from here (defined in the parts above).
__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Completion",
    "EngineInfo",
    "EngineLimits",
    "PolicyEngine",
    "SamplingParams",
    "TokenizerFacts",
]


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
    instance_id: str = ""
    """The engine's PolicyEngine.instance_id."""
    engine: str = "hf"
    """Which generation engine serves: PolicyEngine.name."""


class PolicyEngine:
    """A causal LM + tokenizer serving batched sampling and versioned weight swaps."""

    name = "hf"
    """The engine's name in GetInfo and the logs (services.policy.config.ENGINES)."""

    def __init__(
        self,
        model: str,
        device: str | torch.device = PolicyServiceConfig.device,
        dtype: str | torch.dtype = PolicyServiceConfig.dtype,
        limits: EngineLimits | None = None,
    ) -> None:
        from rlhf.models import parse_device, parse_dtype

        self.model_name = model
        self.device = parse_device(device) if isinstance(device, str) else device
        self.dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        self.limits = limits or EngineLimits()
        loaded = load_causal_lm(model, self.device, self.dtype)
        self.source = loaded.source
        """The folder (or hub name) the model was loaded from."""
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.context_length = loaded.context_length
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.weights = WeightStore(self.model, self.device, backing=loaded.buffer)
        self.instance_id = uuid.uuid4().hex
        """Made once per engine (so once per service start): a client that sees it change knows
        the weights it pushed are gone and version 0 (as loaded) serves again."""

    @property
    def weight_version(self) -> int:
        return self.weights.version

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
                has_chat_template=self._has_chat_template(),
            ),
            limits=self.limits,
            instance_id=self.instance_id,
            engine=self.name,
        )

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of every served tensor: what an upload may carry."""
        return self.weights.state_spec()

    # --- generation -----------------------------------------------------------------------------
    def validate(self, prompts: Sequence[str], params: SamplingParams) -> None:
        """Rejects a request before any work, with a message that says what to fix."""
        validate_request(prompts, params, self.limits, self._has_chat_template())

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        """One completion per prompt, sampled as one left-padded batch from one weight version."""
        self.validate(prompts, params)
        texts, ids = encode_prompts(self.tokenizer, prompts, params.apply_chat_template)
        validate_prompt_lengths(ids, params.max_new_tokens, self.context_length)
        pad = int(self.tokenizer.pad_token_id)
        input_ids, attention = left_pad(ids, pad)
        config = generation_config(params, self.eos_token_ids, pad)
        version = self.weight_version
        new_tokens, logprobs = sample(self.model, input_ids, attention, config, params)
        return completions(
            self.tokenizer, texts, ids, new_tokens, logprobs, self.eos_token_ids, version
        )

    # --- weights --------------------------------------------------------------------------------
    def receive_buffer(self, nbytes: int) -> mmap.mmap:
        """Memory to receive an upload into: WeightStore.receive_buffer. The heap is trimmed
        first: what generation and the last upload's messages freed there would otherwise sit
        beside both weight buffers."""
        release_freed_heap()
        return self.weights.receive_buffer(nbytes)

    def release_buffer(self, buffer: object) -> None:
        """Ends an upload's hold on its receive buffer: WeightStore.release_buffer."""
        self.weights.release_buffer(buffer)

    def apply_weights(
        self, tensors: Mapping[str, torch.Tensor], version: int, backing: object | None = None
    ) -> int:
        """Makes verified tensors the served weights as `version`: WeightStore.apply."""
        return self.weights.apply(tensors, version, backing)

    def _has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))
