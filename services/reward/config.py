"""RewardServiceConfig: `rlhf reward serve`'s settings; its flags and RLHF_* variables are
generated from these fields (rlhf.config), and the servicer's ScoreSettings default to them.

Torch-free: `rlhf --help` builds the parser from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf.config.checks import at_least, choice_problems, device_problems, dtype_problems
from rlhf.config.sections import check
from rlhf.defaults import DTYPE_NAMES, REWARD_BACKENDS, REWARD_INPUT_MODES

HF = {"group": "hf-classifier backend"}
RULES = {"group": "length and keyword backends"}
LENGTH_UNITS = ("words", "chars")


@dataclass
class RewardServiceConfig:
    """Which backend scores, what it reads, and the limits on one Score call."""

    backend: str = field(default=REWARD_BACKENDS[0], metadata={"choices": REWARD_BACKENDS})
    """vader (offline sentiment), hf-classifier (a sequence-classification model), length or
    keyword (explicit rule rewards)."""
    name: str = ""
    """RewardInfo.name, the source name in the trainer's statistics (empty: the backend's)."""
    input: str = field(default=REWARD_INPUT_MODES[0], metadata={"choices": REWARD_INPUT_MODES})
    """What is scored: the response alone, or prompt immediately followed by response (no
    separator, as the seed decoded them together)."""
    max_batch_size: int = 32
    """Samples per forward pass; larger requests are split."""
    max_samples: int = 1024
    """Samples accepted per Score call (RESOURCE_EXHAUSTED above)."""
    max_text_chars: int = 20000
    """Largest len(prompt) + len(response) in characters (INVALID_ARGUMENT above)."""
    max_total_chars: int = 200_000
    """Largest sum of len(prompt) + len(response) over one Score call's samples
    (RESOURCE_EXHAUSTED above): bounds one call's work (VADER's cost grows with the square of
    a text's length: 10 texts at the 20,000-character limit take about 10 s on one core)."""

    model: str = field(default="", metadata=HF)
    """AutoModelForSequenceClassification folder or hub name."""
    label: str = field(default="", metadata=HF)
    """Score this label's softmax probability (e.g. POSITIVE); required when the model has
    several labels, not needed for a single-logit reward model."""
    logit: bool = field(default=False, metadata=HF)
    """Score the raw logit of --label instead of its probability."""
    device: str = field(default="cpu", metadata=HF)
    """cpu, cuda or cuda:N."""
    threads: int = field(default=0, metadata=HF)
    """CPU threads for torch (0: torch's default, one per core); 1 avoids thread stalls on a CPU
    shared with other busy processes."""
    dtype: str = field(default=DTYPE_NAMES[0], metadata={**HF, "choices": DTYPE_NAMES})
    """Weights' dtype on the device."""

    target_length: int = field(default=50, metadata=RULES)
    """Length backend: score = -|len - N| / N (0 at N, -1 when empty)."""
    length_unit: str = field(default="words", metadata={**RULES, "choices": LENGTH_UNITS})
    """Length backend: count whitespace-separated words or characters."""
    keywords: str = field(default="", metadata=RULES)
    """Keyword backend: comma-separated words or phrases, matched case-insensitively as whole
    words."""
    keyword_weight: float = field(default=1.0, metadata=RULES)
    """Keyword backend: score = weight x number of keyword occurrences."""

    def __post_init__(self) -> None:
        check(self, "reward service settings")

    def problems(self) -> list[str]:
        """Wrong values and flag combinations that need no model; whether --label is one of
        the model's labels is checked by the backend once the model is read."""
        found = choice_problems("backend", self.backend, REWARD_BACKENDS)
        found += choice_problems("input", self.input, REWARD_INPUT_MODES)
        found += choice_problems("length_unit", self.length_unit, LENGTH_UNITS)
        found += dtype_problems("dtype", self.dtype) + device_problems("device", self.device)
        found += at_least(self, 0, "threads")
        found += at_least(
            self, 1, "max_batch_size", "max_samples", "max_text_chars", "max_total_chars"
        )
        if self.backend == "hf-classifier" and not self.model:
            found.append("model: --backend hf-classifier needs --model (a folder or hub name)")
        if self.backend == "keyword" and not self.keywords.strip(", "):
            found.append("keywords: --backend keyword needs --keywords, e.g. 'good,great,thanks'")
        if self.backend == "length":
            found += at_least(self, 1, "target_length")
        return found


def ignored_flags(settings: Any) -> list[str]:
    """hf-classifier flags given to another backend. Warned about, not refused: an RLHF_MODEL
    meant for the policy service may share the environment."""
    if settings.backend == "hf-classifier":
        return []
    given = [("--model", settings.model), ("--label", settings.label), ("--logit", settings.logit)]
    return [flag for flag, value in given if value]
