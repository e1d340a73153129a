"""PolicyServiceConfig: `rlhf policy serve`'s settings; its flags and RLHF_* variables are
generated from these fields (rlhf.config), and PolicyEngine's limits default to them.

Torch-free: `rlhf --help` builds the parser from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config.checks import at_least, device_problems, dtype_problems
from rlhf.config.sections import check
from rlhf.defaults import DEFAULT_POLICY_MODEL


@dataclass
class PolicyServiceConfig:
    """What the policy service serves, where, and the limits on one Generate call."""

    model: str = DEFAULT_POLICY_MODEL
    """Causal LM to serve: a Hugging Face folder or hub name, or the alias of the embedded
    offline SmolLM2-135M-Instruct."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    dtype: str = "float32"
    """Weights' dtype: float32, bfloat16 or float16."""
    threads: int = 0
    """CPU threads for torch (0: torch's default, one per core); 1 avoids thread stalls on a CPU
    shared with other busy processes."""
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
        found += at_least(
            self, 1, "max_new_tokens_cap", "max_batch_size", "max_prompt_chars", "max_upload_chunks"
        )
        if not 0 < self.upload_idle_s < float("inf"):
            found.append(f"upload_idle_s must be > 0 seconds and finite, got {self.upload_idle_s}")
        return found + ([] if self.model else ["model must not be empty"])
