"""The config system (rlhf.config): value conversion, YAML text, `--set` overrides, errors that
name the field; PPOConfig and the run config; config modules stay light to import."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlhf.config import apply_overrides, coerce_value
from services.trainer.config import TrainConfig, load_train_config
from services.trainer.learner.config import PPOConfig

ROOT = Path(__file__).resolve().parents[1]


# --- value conversion ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        ("off", bool, False),
        ("3", int, 3),
        (4.0, int, 4),
        ("1e-4", float, 1e-4),
        ("null", float | None, None),
        ("[a, b]", list[str], ["a", "b"]),
        ("a, ,b", list[str], ["a", "b"]),
    ],
)
def test_values_convert_to_the_field_type(
    value: object, annotation: object, expected: object
) -> None:
    assert coerce_value(value, annotation, "x") == expected


@pytest.mark.parametrize(
    ("value", "annotation", "message"),
    [
        ("maybe", bool, "ppo.f must be a boolean"),
        ("abc", int, "ppo.f must be an integer, got 'abc'"),
        (2.5, int, "ppo.f must be an integer"),
        (True, float, "ppo.f must be a number"),
        (None, int, "ppo.f cannot be None"),
        (3, str, "ppo.f must be a string"),
        ({"a": 1}, list[str], "ppo.f must be a list"),
    ],
)
def test_bad_values_name_the_field(value: object, annotation: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        coerce_value(value, annotation, "ppo.f")


# --- the run config: YAML text and --set overrides ----------------------------------------------
def test_yaml_text_fills_the_sections() -> None:
    text = (
        "ppo:\n  learning_rate: 1.0e-4\n  batch_size: 8\n  use_lora: true\n  max_grad_norm: null\n"
        "generation:\n  max_new_tokens: 16\n"
        "run:\n  rewards: [a:1, b:2=0.5]\n"
    )
    c = load_train_config(text)
    assert (c.ppo.learning_rate, c.ppo.batch_size, c.ppo.use_lora, c.ppo.max_grad_norm) == (
        1e-4,
        8,
        True,
        None,
    )
    assert c.generation.max_new_tokens == 16 and c.run.rewards == ["a:1", "b:2=0.5"]
    assert load_train_config(None) == TrainConfig() == load_train_config("")
    assert load_train_config("ppo:\n") == TrainConfig()  # an empty section keeps the defaults


def test_the_loader_takes_text_never_a_path(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  steps: 3\n")
    with pytest.raises(ValueError, match="must be a mapping.*a file path"):
        load_train_config(str(path))
    assert load_train_config(path.read_text()).run.steps == 3


def test_overrides_by_section_or_unique_name() -> None:
    c = load_train_config(
        "run:\n  steps: 9\n",
        [
            "ppo.learning_rate=1e-5",
            "ppo_epochs=2",
            "adap_kl_ctrl=false",
            "score_clip=3",
            "log_with=none",
            "lora_target_modules=q_proj, v_proj",
            "--mini-batch-size=1",
            "run.rewards=x:1,y:2=0.5",
            "generation.do_sample=no",
            "steps=4",  # a later source wins over the YAML
        ],
    )
    assert (c.ppo.learning_rate, c.ppo.ppo_epochs, c.ppo.adap_kl_ctrl) == (1e-5, 2, False)
    assert (c.ppo.score_clip, c.ppo.log_with, c.ppo.mini_batch_size) == (3.0, None, 1)
    assert c.ppo.lora_target_modules == ["q_proj", "v_proj"]
    assert c.run.rewards == ["x:1", "y:2=0.5"] and c.run.steps == 4
    assert c.generation.do_sample is False


@dataclass
class SectionA:
    seed: int = 0
    """A's seed."""


@dataclass
class SectionB:
    seed: int = 0
    """B's seed."""


@dataclass
class TwoSections:
    a: SectionA = field(default_factory=SectionA)
    b: SectionB = field(default_factory=SectionB)


def test_an_override_with_a_name_two_sections_share_is_refused() -> None:
    root = TwoSections()
    with pytest.raises(ValueError, match="ambiguous; write one of a.seed, b.seed"):
        apply_overrides(root, ["seed=1"])
    apply_overrides(root, ["b.seed=2"])
    assert (root.a.seed, root.b.seed) == (0, 2)


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (None, ["ppo.batch_size=0"], r"ppo.batch_size must be >= 1, got 0"),
        (None, ["ppo.batch_size=abc"], r"ppo.batch_size must be an integer, got 'abc'"),
        (None, ["batch_size=3"], r"ppo.batch_size \(3\) must be a multiple of mini_batch_size"),
        (None, ["device=tpu"], r"ppo.device: unknown device 'tpu'"),
        (None, ["dtype=int8"], r"ppo.dtype: unknown dtype 'int8'"),
        (None, ["use_lora"], "expected KEY=VALUE"),
        (None, ["sync_every=0"], r"run.sync_every must be >= 1, got 0"),
        (None, ["min_new_tokens=65"], r"generation.min_new_tokens \(65\) must be <= max_new"),
        (None, ["top_p=0"], r"generation.top_p must be in \(0, 1\], got 0.0"),
        (None, ["ppo=1"], r"ppo is a section; set one of its fields \(ppo.FIELD\)"),
        ("ppo:\n  batch_size: null\n", [], "ppo.batch_size cannot be None"),
        ("- a\n- b\n", [], "must be a mapping"),
        ("ppo: [1]\n", [], "ppo: a section is a mapping"),
        ("ppo: {a: [\n", [], "not valid YAML"),
    ],
)
def test_a_bad_config_names_the_field_and_the_reason(
    text: str | None, overrides: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_train_config(text, overrides)


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (None, ["learning_rat=1"], r"unknown field 'learning_rat'; did you mean ppo.learning_rate"),
        (None, ["ppo.batch_sise=1"], r"ppo: unknown field 'batch_sise'; did you mean batch_size"),
        (None, ["rn.steps=1"], r"unknown field 'rn'; did you mean run"),
        ("run:\n  stepz: 3\n", [], r"run: unknown field 'stepz'; did you mean steps"),
        ("ppo:\n  zzz: 3\n", [], r"ppo: unknown field 'zzz'; known: model_name, device"),
    ],
)
def test_an_unknown_field_suggests_close_names(
    text: str | None, overrides: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_train_config(text, overrides)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ValueError) as err:
        load_train_config(None, ["cliprange=-1", "lam=2", "dtype=int8"])
    assert all(f"ppo.{name}" in str(err.value) for name in ("cliprange", "lam", "dtype"))


# --- PPOConfig ------------------------------------------------------------------------------------
def test_ppo_defaults_are_the_seed_and_trl() -> None:
    c = PPOConfig()
    assert (c.learning_rate, c.batch_size, c.mini_batch_size, c.ppo_epochs) == (1.41e-5, 4, 2, 4)
    assert (c.init_kl_coef, c.adap_kl_ctrl, c.kl_penalty, c.target_kl, c.seed) == (
        0.2,
        True,
        "kl",
        0.1,
        0,
    )
    assert (c.target, c.horizon, c.gamma, c.lam, c.cliprange, c.vf_coef) == (
        6.0,
        10000,
        1.0,
        0.95,
        0.2,
        0.1,
    )
    assert c.log_with == "tensorboard" and c.backward_batch_size == 2


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_ppo_accepts_device_forms(device: str) -> None:
    assert PPOConfig(device=device).device == device


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", "CPU", "cpu:0", ""])
def test_ppo_refuses_other_devices(device: str) -> None:
    with pytest.raises(ValueError, match="device: unknown device"):
        PPOConfig(device=device)


def test_ppo_validation_errors() -> None:
    with pytest.raises(ValueError, match=r"multiple of mini_batch_size \* gradient_accumulation"):
        PPOConfig(batch_size=6, mini_batch_size=2, gradient_accumulation_steps=2)
    assert PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="kl_penalty must be one of"):
        PPOConfig(kl_penalty="l2")
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        PPOConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="log_with must be one of"):
        PPOConfig(log_with="wandb")


# --- import weight --------------------------------------------------------------------------------
def test_config_modules_import_without_torch_or_grpc() -> None:
    code = (
        "import sys, services.trainer.config, services.policy.config, services.reward.config, "
        "services.policy.cli, services.reward.cli, services.trainer.cli, rlhf.config; "
        "heavy = [m for m in ('torch', 'grpc') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
