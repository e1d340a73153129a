"""The PPO actor-critic: a causal LM (the policy) with a scalar value head on its last hidden state.

What TRL <= 0.11 called AutoModelForCausalLMWithValueHead, in plain PyTorch:
  - `forward(input_ids, attention_mask)` -> (logits (B, L, V) float32, values (B, L) float32);
    values[:, t] is V(s_t), the value of the state that predicts token t + 1.
  - LoRA (`use_lora`): peft adapters on the LM; the frozen reference is the same weights with the
    adapters switched off (`with model.reference(): ...`), so no second copy is held.
    Without LoRA, `create_reference()` gives a frozen copy of the LM.
  - `policy_state_dict_for_serving()`: the plain causal LM's state dict (LoRA merged on the fly,
    the training model untouched), what the trainer streams to the policy service.
  - `save_pretrained(folder)`: a transformers folder (LoRA merged) + value_head.safetensors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """Dropout -> Linear(hidden, 1), in float32 whatever the LM's dtype (as TRL's ValueHead) or
    autocast."""

    def __init__(self, hidden_size: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Outside any autocast: the values GAE and the value loss regress on stay float32.
        with torch.autocast(hidden_states.device.type, enabled=False):
            hidden = self.dropout(hidden_states.to(self.summary.weight.dtype))
            # A copy, not squeeze's view: FSDP2 warns about view outputs (an in-place op on one
            # would skip its backward hook); the copy is one float per token.
            return self.summary(hidden).squeeze(-1).clone()


class PolicyWithValueHead(nn.Module):
    """A causal LM (plain, or a peft LoRA model) + ValueHead. See the module docstring."""

    def __init__(self, lm: nn.Module, value_head_dropout: float = 0.1, tokenizer: Any = None):
        super().__init__()
        self.lm = lm
        self.v_head = ValueHead(_hidden_size(lm), value_head_dropout)
        self.v_head.to(next(lm.parameters()).device)
        self.tokenizer = tokenizer  # kept for save_pretrained and the trainer's padding id

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        device: str = "cpu",
        dtype: str = "float32",
        use_lora: bool = False,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        value_head_dropout: float = 0.1,
        seed: int | None = None,
    ) -> PolicyWithValueHead:
        """Loads the LM and tokenizer from a folder / hub name / the default alias.

        A `value_head.safetensors` in the folder (written by save_pretrained) is loaded; else
        the head starts random (seeded with `seed` when given, as are the LoRA adapters).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlhf.models import parse_device, parse_dtype, resolve_model

        path = resolve_model(model_name)
        torch_device = parse_device(device)
        # safetensors only: a folder's pytorch_model.bin would be a pickle to run.
        lm = AutoModelForCausalLM.from_pretrained(
            path, dtype=parse_dtype(dtype), use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if seed is not None:
            torch.manual_seed(seed)
        if use_lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=list(lora_target_modules) if lora_target_modules else None,
                bias="none",
                task_type="CAUSAL_LM",
            )
            lm = get_peft_model(lm, lora)
        model = cls(lm, value_head_dropout, tokenizer)
        head_file = Path(path) / VALUE_HEAD_FILE
        if head_file.is_file():
            state = load_file(str(head_file))
            model.v_head.load_state_dict({k.removeprefix("v_head."): v for k, v in state.items()})
        return model.to(torch_device)

    @classmethod
    def from_config(cls, config: Any) -> PolicyWithValueHead:
        """from_pretrained with every model field of a PPOConfig (services/trainer/config.py)."""
        return cls.from_pretrained(
            config.model_name,
            device=config.device,
            dtype=config.dtype,
            use_lora=config.use_lora,
            lora_r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            lora_target_modules=config.lora_target_modules,
            value_head_dropout=config.value_head_dropout,
            seed=config.seed,
        )

    # --- forward and reference ---------------------------------------------------------------
    @property
    def is_peft(self) -> bool:
        return hasattr(self.lm, "disable_adapter") and hasattr(self.lm, "get_base_model")

    @property
    def device(self) -> torch.device:
        return self.v_head.summary.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits float32, values float32), at every position (B, L, ...) or, given
        `positions` (b, T), only there (b, T, ...): PPO needs the response positions only, and
        skipping the LM head on prompt tokens saves a large part of a small model's compute.
        Packed sequences (one row, position_ids restarting at each; forward.model_inputs):
        positions index its tokens, b rows of them."""
        if positions is not None:
            logits, hidden = causal_lm_logits(
                self.lm, input_ids, attention_mask, positions, position_ids
            )
            return logits, self.v_head(hidden)
        out = _full_forward(self.lm, input_ids, attention_mask, position_ids)
        values = self.v_head(out.hidden_states[-1])
        return out.logits.float(), values

    @contextmanager
    def reference(self) -> Iterator[PolicyWithValueHead]:
        """Within the block this model computes the reference policy (LoRA adapters off)."""
        if not self.is_peft:
            raise RuntimeError(
                "reference() needs LoRA adapters (use_lora=True); a fully trained model needs a "
                "separate frozen copy: create_reference()"
            )
        with self.lm.disable_adapter():
            yield self

    def create_reference(self) -> nn.Module:
        """A frozen copy of the LM as it is now (call before training): the KL reference."""
        if self.is_peft:
            raise RuntimeError("with LoRA the reference is the base model: use reference()")
        ref = copy.deepcopy(self.lm)
        ref.requires_grad_(False)
        return ref.eval()

    # --- state -------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that train (LoRA adapters or the whole LM, + value head), detached and
        not copied: the live weights, valid until the next update. Its use, a checkpoint,
        writes them at once on the loop's thread between updates; a copy was a model's worth
        of memory at every checkpoint (SmolLM2 fp32, 1 + 2 steps and the final checkpoint: the
        trainer's peak 3141-3155 -> 3094-3121 MiB, three runs each).
        Clone them to keep them."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        if missing or unexpected:
            raise ValueError(
                f"trainable state does not fit this model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]} (use_lora or lora_* changed?)"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])

    def policy_state_dict_for_serving(
        self, clone: bool = True, trained_only: bool = False
    ) -> dict[str, torch.Tensor]:
        """The plain causal LM's state dict (same keys as AutoModelForCausalLM's), LoRA merged,
        a tied tensor under its first name only (the input embedding, not the LM head that
        shares it): the policy service's model ties the same way (the trainer's model check
        makes sure), so one copy updates both, and a push moves and stages it once (113 MB of
        SmolLM2's 650 MB in fp32).

        trained_only: with LoRA, only the merged weights of adapted layers (all that training
        can change), which is what a per-step weight sync needs to send.

        Merging is computed per adapted layer as W + delta (peft's get_delta_weight, i.e.
        B @ A * alpha / r) into new tensors: the training model is not modified. clone=False
        returns the non-merged tensors as views of the live weights (valid until the next
        update).
        """
        if not self.is_peft:
            return {k: _detached(v, clone) for k, v in _untied(self.lm).items()}
        from peft.tuners.lora import LoraLayer

        base = self.lm.get_base_model()
        out = {}
        for key, tensor in _untied(base).items():
            if ".lora_" in key or trained_only:
                continue
            out[key.replace(".base_layer.", ".")] = _detached(tensor, clone)
        with torch.no_grad():
            for name, module in base.named_modules():
                if not isinstance(module, LoraLayer) or module.merged:
                    continue
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                adapters += [a for a in module.active_adapters if a in module.lora_embedding_A]
                if any(module.use_dora.get(a, False) for a in adapters):
                    raise NotImplementedError("DoRA adapters cannot be merged for serving")
                weight = module.get_base_layer().weight.detach()
                for adapter in adapters:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
                if adapters or not trained_only:
                    out[f"{name}.weight"] = weight if adapters else _detached(weight, clone)
        return out

    def save_pretrained(
        self,
        folder: str | Path,
        save_tokenizer: bool = True,
        whole: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """A transformers folder of the policy (LoRA merged) + value_head.safetensors (+ the
        tokenizer): loadable by AutoModelForCausalLM, the policy service and from_pretrained.
        `whole`: the (LM, value head) weights to write instead of this model's own, for a model
        sharded over ranks (PPOTrainer.whole_policy)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if whole is not None:
            self.lm.save_pretrained(folder, state_dict=whole[0])
        elif self.is_peft:
            merged = copy.deepcopy(self.lm).merge_and_unload()
            merged.save_pretrained(folder)
            del merged
        else:
            self.lm.save_pretrained(folder)
        head_state = whole[1] if whole is not None else self.v_head.state_dict()
        head = {f"v_head.{k}": v.detach().contiguous().cpu() for k, v in head_state.items()}
        save_file(head, str(folder / VALUE_HEAD_FILE))
        if save_tokenizer and self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)


def causal_lm_logits(
    lm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    positions: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 (b, T, V), last hidden state (b, T, H)) at `positions` (b, T) only: of
    each row of input_ids (B, L), or, with one row holding b packed sequences (B = 1), of its
    tokens.

    The decoder runs on every token; the LM head only where asked, once per distinct position
    (packed, a shorter response's padding columns repeat its last token). Works for plain and
    peft (LoRA) causal LMs. Models whose head is more than a linear layer (logit soft-capping or
    scaling) take the full forward pass and are gathered after.
    """
    base = base_model(lm)
    config = getattr(base, "config", None)
    special_head = any(
        getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale")
    )
    if special_head or not hasattr(base, "get_decoder"):
        out = _full_forward(lm, input_ids, attention_mask, position_ids)
        hidden = _at(out.hidden_states[-1], positions)
        return _at(out.logits, positions).float(), hidden
    out = base.get_decoder()(
        **_token_inputs(base, input_ids),
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        return_dict=True,
    )
    states = out.last_hidden_state
    distinct, spread = torch.unique(_flat_positions(states, positions), return_inverse=True)
    rows = states.flatten(0, 1).index_select(0, distinct)
    logits = base.get_output_embeddings()(rows).float()
    return _spread(logits, spread), _spread(rows, spread)


def base_model(lm: nn.Module) -> nn.Module:
    """The plain causal LM: a peft model's base (its adapters still in it), else `lm`."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def _token_inputs(base: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The decoder's token input: `input_ids`, or their embeddings looked up with a sparse
    gradient (`_EmbeddingSparseGrad`) when the embedding is tied to the LM head and trains.

    Only a plain nn.Embedding is replaced (no scaled-embedding subclasses). Untied tables keep
    the dense lookup: their gradient would be sparse, which the fused optimiser refuses.
    """
    embedding = base.get_input_embeddings()
    head = base.get_output_embeddings()
    tied_and_trained = (
        type(embedding) is nn.Embedding
        and head is not None
        and head.weight is embedding.weight
        and embedding.weight.requires_grad
        and torch.is_grad_enabled()
    )
    if not tied_and_trained:
        return {"input_ids": input_ids}
    weight, padding_idx = embedding.weight, embedding.padding_idx
    return {"inputs_embeds": _EmbeddingSparseGrad.apply(input_ids, weight, padding_idx)}


class _EmbeddingSparseGrad(torch.autograd.Function):
    """nn.Embedding's lookup whose weight gradient holds only the rows the batch used.

    Why: the dense backward of a lookup fills a zero gradient the size of the whole vocabulary
    table (113 MB for SmolLM2), adds the batch's few hundred rows into it, and autograd then adds
    all of it to the LM head's gradient of the same tied tensor: ~0.1 s of memory traffic per
    mini-batch on a CPU (SmolLM2, seed settings). Autograd sums this sparse gradient
    into the head's dense one before the parameter's gradient is set, so the parameter still
    gets one dense gradient (what the optimiser, DDP and FSDP saw before), and the same numbers:
    each row's occurrences are summed in their order from zero, as the dense backward on a CPU
    does (torch's own sparse=True lookup sums them in another order), and then added to the
    head's gradient once.
    """

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None):
        ctx.save_for_backward(ids)
        ctx.shape, ctx.padding_idx = weight.shape, padding_idx
        return nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (ids,) = ctx.saved_tensors
        ids, grad = ids.reshape(-1), grad.reshape(ids.numel(), -1)
        if ctx.padding_idx is not None:  # nn.Embedding gives its padding row no gradient
            kept = ids != ctx.padding_idx
            ids, grad = ids[kept], grad[kept]
        rows, slot = torch.unique(ids, return_inverse=True)
        sums = grad.new_zeros(len(rows), grad.shape[1]).index_add_(0, slot, grad)
        sparse = torch.sparse_coo_tensor(
            rows[None], sums, ctx.shape, is_coalesced=True, check_invariants=True
        )
        return None, sparse, None


def _full_forward(
    lm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> Any:
    """The LM's own forward pass, logits at every position and the hidden states."""
    return lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
        return_dict=True,
    )


def _flat_positions(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """positions (b, T) of a (B, L, ...) model output as indices into its flattened (B * L)
    tokens: row b's, for B = b rows; as they are, for one row (B = 1: packed sequences)."""
    rows, length = tensor.shape[:2]
    if rows == 1:
        return positions
    return positions + torch.arange(rows, device=positions.device)[:, None] * length


def _spread(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows (M, ...) laid out as index (b, T) picks them: (b, T, ...)."""
    return rows.index_select(0, index.reshape(-1)).view(*index.shape, *rows.shape[1:])


def _at(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A (B, L, ...) model output at positions (b, T) (`causal_lm_logits` says how)."""
    return _spread(tensor.flatten(0, 1), _flat_positions(tensor, positions))


def _untied(module: nn.Module) -> dict[str, torch.Tensor]:
    """module.state_dict(), each parameter or buffer under its first name only."""
    seen: set[int] = set()
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def _detached(tensor: torch.Tensor, clone: bool) -> torch.Tensor:
    return tensor.detach().clone() if clone else tensor.detach()


def _hidden_size(lm: nn.Module) -> int:
    """Width of the last hidden state: the LM head's input features, else config.hidden_size."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[1])
    return int(lm.config.hidden_size)
