"""The command line a user meets: `rlhf --help` and every subcommand's help are complete and
show defaults; commands against an address where nothing listens say what to check in one line
and exit non-zero, without a traceback."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from rlhf.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _flat(text: str) -> str:
    return "".join(text.split())  # argparse wraps lines, also after hyphens


def test_every_help_is_complete_and_shows_defaults() -> None:
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 20
    for parser in parsers:
        description = (parser.description or "").strip()
        assert description.endswith("."), (parser.prog, description)
        text = _flat(parser.format_help())
        assert _flat(description) in text, parser.prog
        for action in parser._actions:
            default = action.default
            if (
                not action.option_strings
                or action.help in (None, argparse.SUPPRESS)
                or default in (None, False, "", [], argparse.SUPPRESS)
                or "(default" in action.help
            ):
                continue
            assert _flat(f"(default: {default})") in text, (parser.prog, action.dest)


def test_top_level_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "deployonKubernetes." in _flat(out)  # the description, to its end
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ")}
    assert {"train", "status", "watch", "stop", "swap-reward", "policy", "k8s"} <= listed


@pytest.fixture
def dead_address() -> Iterator[str]:
    """A port bound (so nothing else takes it) where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    "command",
    [["watch"], ["train"], ["swap-reward", "127.0.0.1:9=1"]],  # status: in a process below
)
def test_a_dead_trainer_is_one_line(
    command: list[str], dead_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--trainer", dead_address]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"no trainer service answers at {dead_address}" in err
    assert "rlhf trainer serve" in err and "RLHF_TRAINER" in err


def test_train_here_against_a_dead_policy_is_one_line(
    dead_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--policy", dead_address]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no policy service answers at {dead_address}" in err, err


def test_the_process_prints_no_traceback(dead_address: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "status", "--trainer", dead_address],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"rlhf status: no trainer service answers at {dead_address} (UNAVAILABLE): is "
        "`rlhf trainer serve` running there? (--trainer / RLHF_TRAINER; a trainer serving TLS "
        "also needs --tls-ca, --tls-cert, --tls-key)"
    ]


def test_a_reader_that_goes_away_ends_a_command_quietly() -> None:
    """`rlhf ... | head` closes the pipe before the command has printed: exit 1, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf.cli", "k8s", "render", "--overlay", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # before kustomize has rendered anything: every write fails
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
