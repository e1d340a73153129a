"""The config system (rlhf.config): field docs as help, RLHF_* defaults, YAML text, `--set`
overrides, errors that name the field; PPOConfig, the run config and the services' settings."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlhf.config import (
    add_dataclass_arguments,
    add_server_arguments,
    apply_overrides,
    coerce_value,
    field_docs,
    from_args,
    server_config,
    service_settings,
)
from rlhf.defaults import LOOPBACK
from services.policy.config import PolicyServiceConfig
from services.reward.config import RewardServiceConfig
from services.trainer.config import TrainConfig, TrainerServiceConfig, load_train_config
from services.trainer.learner.config import PPOConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Knobs:
    """A small config to exercise the generator with every supported type."""

    rate: float = 0.5
    """How fast, in 100% units."""
    count: int = 3
    """How many."""
    name: str = ""
    """Who."""
    fast: bool = False
    """Go fast."""
    loud: bool = True
    """Say more."""
    tags: list[str] = field(default_factory=lambda: ["a", "b"])
    """Comma-separated tags."""
    limit: float | None = None
    """None: unlimited."""
    mode: str = field(default="x", metadata={"choices": ("x", "y"), "group": "modes"})
    """Which mode."""


def parser_for(cls: type, **defaults: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_dataclass_arguments(parser, cls, defaults=defaults)
    return parser


def clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("RLHF_")]:
        monkeypatch.delenv(name)


# --- field docs and generated flags -------------------------------------------------------------
def test_field_docs_are_read_from_the_source() -> None:
    docs = field_docs(Knobs)
    assert docs["rate"] == "How fast, in 100% units." and docs["limit"] == "None: unlimited."
    ppo_docs = field_docs(PPOConfig)
    assert set(ppo_docs) == {f.name for f in dataclasses.fields(PPOConfig)}
    assert "AdamW" in ppo_docs["learning_rate"]
    assert "\n" not in ppo_docs["model_name"]  # whitespace collapsed


def test_help_is_the_docstring_the_default_and_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clear_env(monkeypatch)
    text = " ".join(parser_for(Knobs).format_help().split())
    assert "--rate RATE How fast, in 100% units. (default: 0.5) [env RLHF_RATE]" in text
    assert "--tags TAGS Comma-separated tags. (default: a,b) [env RLHF_TAGS]" in text
    assert "(default: empty) [env RLHF_NAME]" in text
    assert "modes: --mode {x,y}" in text  # its group, its choices
    assert "--loud, --no-loud Say more. (default: True) [env RLHF_LOUD]" in text


def test_a_switch_that_defaults_to_true_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clear_env(monkeypatch)
    assert parser_for(Knobs).parse_args(["--no-loud"]).loud is False
    monkeypatch.setenv("RLHF_FAST", "on")
    assert parser_for(Knobs).parse_args(["--no-fast"]).fast is False


def test_flags_parse_to_the_field_types(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_env(monkeypatch)
    parser = parser_for(Knobs, count=7)
    assert from_args(Knobs, parser.parse_args([])) == Knobs(count=7)
    args = parser.parse_args(
        ["--rate", "2", "--fast", "--tags", "p, q", "--limit", "none", "--mode", "y"]
    )
    knobs = from_args(Knobs, args)
    assert (knobs.rate, knobs.fast, knobs.tags, knobs.limit, knobs.mode) == (
        2.0,
        True,
        ["p", "q"],
        None,
        "y",
    )
    assert isinstance(knobs.rate, float)


def test_env_variables_set_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_env(monkeypatch)
    monkeypatch.setenv("RLHF_COUNT", "11")
    monkeypatch.setenv("RLHF_FAST", "yes")
    monkeypatch.setenv("RLHF_TAGS", "u,v,w")
    parser = parser_for(Knobs)
    args = parser.parse_args([])
    assert (args.count, args.fast, args.tags) == (11, True, ["u", "v", "w"])
    assert "(default: 11) [env RLHF_COUNT]" in " ".join(parser.format_help().split())
    assert parser.parse_args(["--count", "2"]).count == 2


def test_a_bad_flag_or_variable_names_itself(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clear_env(monkeypatch)
    with pytest.raises(SystemExit):
        parser_for(Knobs).parse_args(["--count", "many"])
    assert "--count (RLHF_COUNT) must be an integer, got 'many'" in capsys.readouterr().err
    monkeypatch.setenv("RLHF_RATE", "fast")
    with pytest.raises(SystemExit):  # reported at parse time, not while the parser is built
        parser_for(Knobs).parse_args([])
    assert "--rate (RLHF_RATE) must be a number, got 'fast'" in capsys.readouterr().err


def test_server_flags_take_each_services_port(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_env(monkeypatch)
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, default_port=5000)
    config = server_config(parser.parse_args(["--workers", "2", "--log-level", "debug"]))
    assert (config.port, config.workers, config.host, config.log_level) == (
        5000,
        2,
        LOOPBACK,
        "debug",
    )
    with pytest.raises(ValueError, match="log_level must be one of"):
        server_config(parser.parse_args(["--log-level", "loud"]))
    monkeypatch.setenv("RLHF_PORT", "6001")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, default_port=5000)
    assert server_config(parser.parse_args([])).port == 6001


def test_service_settings_exit_2_with_the_command_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clear_env(monkeypatch)
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, default_port=5000)
    add_dataclass_arguments(parser, PolicyServiceConfig)
    server, config = service_settings(parser.parse_args([]), PolicyServiceConfig, "rlhf x")
    assert server.port == 5000 and isinstance(config, PolicyServiceConfig)
    with pytest.raises(SystemExit) as bad:
        service_settings(parser.parse_args(["--dtype", "float8"]), PolicyServiceConfig, "rlhf x")
    assert bad.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf x: ") and "float8" in err


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


# --- the services' settings -----------------------------------------------------------------------
def test_policy_service_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_env(monkeypatch)
    monkeypatch.setenv("RLHF_MAX_BATCH_SIZE", "5")
    parser = parser_for(PolicyServiceConfig)
    config = from_args(PolicyServiceConfig, parser.parse_args(["--dtype", "bfloat16"]))
    assert (config.dtype, config.max_batch_size) == ("bfloat16", 5)
    with pytest.raises(ValueError, match="unknown dtype 'float8'; choose one of float32"):
        PolicyServiceConfig(dtype="float8")
    with pytest.raises(ValueError, match="threads must be >= 0"):
        PolicyServiceConfig(threads=-1)
    with pytest.raises(ValueError, match="max_prompt_chars must be >= 1"):
        PolicyServiceConfig(max_prompt_chars=0)


def test_reward_service_settings() -> None:
    with pytest.raises(ValueError, match="needs --model"):
        RewardServiceConfig(backend="hf-classifier")
    with pytest.raises(ValueError, match="needs --keywords"):
        RewardServiceConfig(backend="keyword", keywords=" , ")
    with pytest.raises(ValueError, match="target_length must be >= 1"):
        RewardServiceConfig(backend="length", target_length=0)
    with pytest.raises(ValueError, match="input must be one of response, prompt\\+response"):
        RewardServiceConfig(input="prompt")
    assert RewardServiceConfig(backend="keyword", keywords="good").keywords == "good"


def test_trainer_service_settings_split_rewards(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_env(monkeypatch)
    monkeypatch.setenv("RLHF_REWARD", "reward:50052,reward-b:50052=0.5")
    config = from_args(TrainerServiceConfig, parser_for(TrainerServiceConfig).parse_args([]))
    assert config.reward == ["reward:50052", "reward-b:50052=0.5"]
    with pytest.raises(ValueError, match="policy must not be empty"):
        TrainerServiceConfig(policy="")


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
