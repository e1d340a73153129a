"""PPOConfig: every knob of the PPO stage, under the names of classic TRL (<= 0.11).

One dataclass, a docstring under each field (CleanRL style). It is the `ppo:` section of a run
config: YAML and `--set ppo.field=value` overrides reach it through rlhf.config
(services/trainer/config.py). Importable without torch: parsing a config needs no model code.

Defaults are TRL 0.11's, except where the seed exercise set a value (batch_size=4,
mini_batch_size=2, target_kl=0.1) and `max_grad_norm` (TRL: None, no clipping; here 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config.checks import at_least, at_most, choice_problems, device_problems, dtype_problems
from rlhf.config.sections import check
from rlhf.defaults import DEFAULT_POLICY_MODEL

KL_PENALTIES = ("kl", "abs", "mse", "full")
MAX_BATCH_SIZE = 4096
"""Largest batch_size (rollouts per step), a bound on what one run config can allocate."""
MAX_SEED = 2**63 - 1
"""Largest seed torch takes."""
LOGGERS = (None, "tensorboard", "jsonl")
MIXED_PRECISIONS = ("no", "bf16")
"""PPOConfig.mixed_precision's choices (fp16 is not one: it needs a gradient scaler)."""


@dataclass
class PPOConfig:
    """Configuration of the PPO stage (policy + value head, reference, KL control, optimiser)."""

    # --- model -------------------------------------------------------------------------------
    model_name: str = DEFAULT_POLICY_MODEL
    """Policy to start from: a model folder, a hub name, or the alias of the embedded default
    (SmolLM2-135M-Instruct, converted once into the model cache). The frozen reference is the
    same weights."""
    device: str = "cpu"
    """Where the policy, value head and reference live: cpu, cuda or cuda:N."""
    dtype: str = "float32"
    """Weights' dtype: float32, bfloat16 or float16. The value head and all PPO math stay in
    float32 whatever this is."""
    mixed_precision: str = "no"
    """"bf16": the forward passes (old policy, reference, PPO epochs; so their backward passes
    too) run under torch.autocast in bfloat16, while the weights stay float32 masters, and the
    gradients, optimiser state and PPO math (log-softmax of the logits, ratios, GAE, losses,
    stats) stay float32. "no": everything in `dtype`. Needs dtype float32. fp16 is not offered:
    it needs a gradient scaler."""
    value_head_dropout: float = 0.1
    """Dropout on the last hidden state before the value head (TRL's summary_dropout_prob,
    default 0.1). Like every dropout of the model, it acts only with dropout_in_update: by
    default every forward pass runs in eval mode, as in TRL 0.11."""
    dropout_in_update: bool = False
    """Run the PPO epochs' forward passes in train mode, dropout active (attention, LoRA and
    value-head dropout). False, as TRL 0.11: every forward pass runs in eval mode, so the
    probability ratio starts at 1. Old log-probs, values and the reference are computed in eval
    mode either way."""
    pack_sequences: bool = True
    """Run each forward pass on its rows' real tokens only, packed end to end into one row with
    position ids restarting at every sequence (veRL's remove-padding, OpenRLHF's packing): no
    compute goes to padding, and attention stays within each sequence (sdpa runs on each on its
    own; flash attention separates them itself). False: the rows right-padded to the longest,
    as TRL 0.11 ran them. Same numbers up to float rounding (the kernels see other shapes). The
    trainer checks at start that the model keeps packed sequences apart, and refuses to start
    otherwise."""

    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = 1.41e-5
    """AdamW learning rate (weight decay 0, i.e. TRL's Adam)."""
    batch_size: int = 4
    """Rollouts (query, response, score) per PPO step; `step` requires exactly this many."""
    mini_batch_size: int = 2
    """Rollouts per forward/backward pass inside the PPO epochs."""
    gradient_accumulation_steps: int = 1
    """Mini-batches whose gradients are summed (each loss divided by this) per optimiser step."""
    ppo_epochs: int = 4
    """Passes over the batch, each in a fresh random order of mini-batches."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of the trained parameters to this; None: no clipping
    (TRL's default was None). None, in one process without gradient accumulation, also lets
    the parameters step during the backward pass (same numbers, no model-sized gradients held:
    optim.StepInBackward); clipping needs every gradient before any step."""
    seed: int = 0
    """Seeds python, numpy and torch at trainer start, and the mini-batch shuffling."""

    # --- KL penalty and control --------------------------------------------------------------
    init_kl_coef: float = 0.2
    """Initial KL coefficient beta: per-token reward is -beta * KL(policy || reference)."""
    adap_kl_ctrl: bool = True
    """Adapt beta towards `target` (Ziegler et al. 2019); False: beta stays init_kl_coef."""
    target: float = 6.0
    """Target KL (nats, summed over a response, averaged over the batch) of the adaptive
    controller."""
    horizon: float = 10000
    """Horizon of the adaptive controller, in rollouts: beta moves by at most
    20% * batch_size / horizon per step."""
    kl_penalty: str = "kl"
    """Per-token KL estimate in the reward: kl (logp - ref_logp), abs (|logp - ref_logp|),
    mse (0.5 * (logp - ref_logp)^2), full (exact KL over the whole vocabulary)."""

    # --- PPO objective -----------------------------------------------------------------------
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """Lambda of GAE (bias/variance trade-off of the advantages)."""
    cliprange: float = 0.2
    """Policy ratio clip epsilon: ratio is clipped to [1 - cliprange, 1 + cliprange]."""
    cliprange_value: float = 0.2
    """Value clip: new value predictions are kept within +-cliprange_value of the old ones."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (masked, mean kept) before GAE."""
    ratio_threshold: float = 10.0
    """Skip a mini-batch (no backward, no optimiser step) whose mean probability ratio exceeds
    this: a guard against a diverging policy."""
    early_stopping: bool = False
    """Stop the PPO epochs of a step once the policy KL of the last mini-batch exceeds
    1.5 * target_kl (TRL's rule)."""
    target_kl: float = 0.1
    """Policy KL (old vs. new, per token) that early stopping aims at; used only with
    early_stopping."""
    score_clip: float | None = None
    """Clip scores from the reward service to [-score_clip, score_clip]; None: no clipping."""

    # --- LoRA ----------------------------------------------------------------------------------
    use_lora: bool = False
    """Train LoRA adapters instead of all weights; the reference is then the base model with
    the adapters switched off (no second copy in memory)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt (e.g. q_proj,v_proj); None: peft's default for the architecture."""

    # --- logging -----------------------------------------------------------------------------
    log_with: str | None = "tensorboard"
    """Where the training loop writes stats: tensorboard, jsonl, or None (nowhere)."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def backward_batch_size(self) -> int:
        """Rollouts per optimiser step (TRL's name): mini_batch_size * accumulation steps."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    def validate(self) -> None:
        """Raises ValueError listing every invalid field."""
        check(self, "PPOConfig")

    def problems(self) -> list[str]:
        """Every invalid field, each text starting with the field's name."""
        errors = at_least(self, 1, "batch_size", "mini_batch_size")
        errors += at_least(self, 1, "gradient_accumulation_steps", "ppo_epochs", "lora_r")
        errors += at_most(self, MAX_BATCH_SIZE, "batch_size") + at_most(self, 100, "ppo_epochs")
        errors += at_most(self, 4096, "lora_r", "lora_alpha") + at_most(self, 1.0, "learning_rate")
        errors += at_least(self, 0, "seed") + at_most(self, MAX_SEED, "seed")
        if not errors and self.batch_size % self.backward_batch_size:
            errors.append(
                f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size * "
                f"gradient_accumulation_steps ({self.mini_batch_size} * "
                f"{self.gradient_accumulation_steps} = {self.backward_batch_size})"
            )
        positive = ("learning_rate", "target", "horizon", "target_kl", "cliprange")
        positive += ("cliprange_value", "ratio_threshold", "lora_alpha")
        errors += [
            f"{n} must be > 0, got {getattr(self, n)}" for n in positive if getattr(self, n) <= 0
        ]
        errors += at_least(self, 0, "init_kl_coef", "vf_coef")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                errors.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("max_grad_norm", "score_clip"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                errors.append(f"{name} must be > 0 or None, got {value}")
        for name in ("lora_dropout", "value_head_dropout"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        errors += choice_problems("kl_penalty", self.kl_penalty, KL_PENALTIES)
        errors += choice_problems("log_with", self.log_with, LOGGERS)
        errors += choice_problems("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        if self.mixed_precision == "bf16" and self.dtype != "float32":
            errors.append(
                f"mixed_precision bf16 keeps float32 master weights: it needs dtype float32, "
                f"got {self.dtype}"
            )
        errors += dtype_problems("dtype", self.dtype) + device_problems("device", self.device)
        if not self.model_name:
            errors.append("model_name must not be empty")
        return errors


__all__ = ["KL_PENALTIES", "LOGGERS", "MIXED_PRECISIONS", "PPOConfig"]
