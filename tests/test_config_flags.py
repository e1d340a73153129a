"""The config system's flags (rlhf.config): field docs as help, generated flags, RLHF_*
defaults, server flags, and the services' settings built from them."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from rlhf.config import (
    add_dataclass_arguments,
    add_server_arguments,
    field_docs,
    from_args,
    server_config,
    service_settings,
)
from rlhf.defaults import LOOPBACK
from services.policy.config import PolicyServiceConfig
from services.reward.config import RewardServiceConfig
from services.trainer.config import TrainerServiceConfig
from services.trainer.learner.config import PPOConfig


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
