"""The model check at run start: the policy service must serve the model the trainer trains.

Pushing weights to a service that serves another model fails on the first sync at best, and at
worst (same shapes, another tokenizer) trains on token ids the service decodes differently. So
the trainer compares, before any work, the facts both sides can state cheaply: the model's
name (the last path component: paths differ between containers), parameter count, vocabulary
size, eos and pad ids; any difference refuses the run, naming both sides of each.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from services.trainer.orchestrator.peers import ModelFacts


class ModelMismatch(RuntimeError):
    """The policy service serves another model than the run trains (a failed precondition)."""


def model_label(name: str) -> str:
    """The part of a model name both sides share: the folder's (or hub name's) last component;
    the default alias stands for its converted folder."""
    from rlhf.models import DEFAULT_POLICY, default_policy_dir

    if name in ("", "default", DEFAULT_POLICY):
        return default_policy_dir().name
    return PurePosixPath(name.rstrip("/")).name


def trainer_model_facts(name: str) -> ModelFacts:
    """The facts of the model `name` from its config and tokenizer, without loading weights.

    The parameter count comes from the architecture built on the meta device (no memory, no
    weights read), which counts exactly as the policy engine does: `lm.parameters()`, tied
    weights once (a safetensors header may list a tied tensor twice, or a buffer).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhf.models import resolve_model

    source = resolve_model(name)
    config = AutoConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return ModelFacts(
        name=name,
        num_parameters=sum(p.numel() for p in lm.parameters()),
        vocab_size=len(tokenizer),
        eos_token_id=-1 if eos is None else int(eos),
        pad_token_id=-1 if pad is None else int(pad),
    )


def differences(trained: ModelFacts, served: ModelFacts) -> list[str]:
    """One line per differing fact, each naming the trainer's and the policy service's value."""
    pairs = [
        ("model", model_label(trained.name), model_label(served.name)),
        ("parameters", trained.num_parameters, served.num_parameters),
        ("vocabulary size", trained.vocab_size, served.vocab_size),
        ("eos token id", trained.eos_token_id, served.eos_token_id),
        ("pad token id", trained.pad_token_id, served.pad_token_id),
    ]
    return [
        f"{fact}: trainer {mine!r}, policy service {theirs!r}"
        for fact, mine, theirs in pairs
        if mine != theirs
    ]


def check_served_model(trained: ModelFacts, served: ModelFacts, policy: str) -> None:
    """Raises ModelMismatch listing every differing fact; `policy` is the service's address."""
    found = differences(trained, served)
    if found:
        raise ModelMismatch(
            f"the policy service at {policy} serves {served.name!r}, not the model this run "
            f"trains ({trained.name!r}): " + "; ".join(found)
        )
