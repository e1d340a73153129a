"""The trainer's control API takes no file system paths and no code from callers (issue #12,
items 4 and 6): a real TrainerServicer on port 0, runs on a tiny model with in-process
transports. Config text is never opened as a path, is capped and refuses YAML aliases; run
ids are folder names; runs write under the trainer's own root and read prompts and models
only inside the roots its operator allowed; addresses come from the allow-list; numbers are
finite and in range; the mutating RPCs name their run."""

from __future__ import annotations

import shutil
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench.local_transports import LocalPolicy, LocalReward
from rlhf.config import load_yaml_mapping
from rlhf.server import build_server
from rlhf.v1 import trainer_pb2
from services.reward.backends.vader import VaderBackend
from services.trainer.api.client import TrainerClient, TrainerError
from services.trainer.api.service import TrainerServicer, Transports, servicers
from services.trainer.config import MAX_CONFIG_BYTES, TrainerServiceConfig
from tests.servers import open_config

ALLOWED_POLICY = "127.0.0.9:5"
"""In --allowed-endpoints through `127.0.0.9:*` (nothing listens: the pre-flight model check
finds no service and leaves the check to the run, whose transports are in-process)."""
SMALL_RUN = {
    "ppo.batch_size": "2",
    "ppo.mini_batch_size": "1",
    "ppo.ppo_epochs": "1",
    "ppo.log_with": "jsonl",
    "generation.max_new_tokens": "3",
    "run.steps": "1",
    "run.save_every": "0",
}

# 378 bytes (the issue measured a 431-byte one): nine levels of nine aliases each, 9^9 (387
# million) strings once expanded.
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


@pytest.fixture
def roots(tmp_path: Path, tiny_lm: Path) -> dict[str, Path]:
    """runs/ (output root), data/ with a prompt file, models/ with a copy of the tiny model,
    and outside/ (a prompt file and the symlinks that lead out of the roots)."""
    paths = {name: tmp_path / name for name in ("runs", "data", "models", "outside")}
    for path in paths.values():
        path.mkdir()
    (paths["data"] / "prompts.jsonl").write_text('{"prompt": "inside the data root"}\n')
    (paths["outside"] / "secret.jsonl").write_text('{"prompt": "a secret line"}\n')
    (paths["data"] / "escape.jsonl").symlink_to(paths["outside"] / "secret.jsonl")
    shutil.copytree(tiny_lm, paths["models"] / "lm")
    (paths["models"] / "escape").symlink_to(tiny_lm)
    return paths


@pytest.fixture
def setup(roots: dict[str, Path], tiny_lm: Path) -> Iterator[tuple[TrainerClient, TrainerServicer]]:
    transports = Transports(
        policy=lambda address, limits: LocalPolicy(str(roots["models"] / "lm"), address=address),
        reward=lambda address, limits: LocalReward(VaderBackend(), address=address),
    )
    settings = TrainerServiceConfig(
        policy="local:1",
        reward=["local:2"],
        output_dir=str(roots["runs"]),
        allowed_endpoints=["127.0.0.9:*", "rm.example:7000"],
        data_root=[str(roots["data"])],
        model_root=[str(roots["models"])],
    )
    servicer = TrainerServicer(settings, transports)
    service = build_server("trainer", servicers(servicer), open_config(grace_s=0))
    client = TrainerClient(f"127.0.0.1:{service.port}")
    yield client, servicer
    client.close()
    for run in servicer.runs.values():
        if run.thread is not None:
            run.thread.join(60)
    service.stop(grace_s=0)


@pytest.fixture
def client(setup: tuple[TrainerClient, TrainerServicer]) -> TrainerClient:
    return setup[0]


def _request(
    roots: dict[str, Path], run_id: str = "r", **overrides: str
) -> trainer_pb2.StartRunRequest:
    request = trainer_pb2.StartRunRequest(run_id=run_id)
    request.overrides.update(SMALL_RUN)
    request.overrides["ppo.model_name"] = str(roots["models"] / "lm")
    request.overrides.update(overrides)
    return request


def _refused(client: TrainerClient, request: trainer_pb2.StartRunRequest, code: str) -> str:
    """StartRun's refusal details; asserts the code, a short message, and that no run exists."""
    with pytest.raises(TrainerError) as caught:
        client.start(request)
    assert caught.value.code == code, caught.value.details
    assert len(caught.value.details) < 600, len(caught.value.details)
    with pytest.raises(TrainerError) as none:
        client.get("")
    assert none.value.code == "NOT_FOUND"  # nothing was registered, nothing started
    return caught.value.details


def _run_to_end(client: TrainerClient, run_id: str) -> trainer_pb2.StepMetrics:
    end = list(client.watch(run_id, from_step=1))[-1]
    assert end.event == trainer_pb2.WATCH_EVENT_END
    return end


# --- the config text ----------------------------------------------------------------------------
def test_config_yaml_is_never_opened_as_a_path(
    client: TrainerClient, roots: dict[str, Path]
) -> None:
    path = roots["outside"] / "run.yaml"
    path.write_text("run:\n  steps: 3\n")
    request = _request(roots)
    request.config_yaml = str(path)
    details = _refused(client, request, "INVALID_ARGUMENT")
    assert "must be a mapping" in details and "pass the file's text" in details
    assert "steps" not in details  # the file's content was not read


def test_config_over_the_cap_is_refused_unparsed(
    client: TrainerClient, roots: dict[str, Path]
) -> None:
    request = _request(roots)
    request.config_yaml = "run: {steps: 1}\n" + "#" * MAX_CONFIG_BYTES
    details = _refused(client, request, "INVALID_ARGUMENT")
    assert f"cap of {MAX_CONFIG_BYTES} bytes" in details


def test_alias_bomb_is_refused_at_once_with_flat_memory(
    client: TrainerClient, roots: dict[str, Path]
) -> None:
    assert len(ALIAS_BOMB) <= 431  # no larger than the issue's
    request = _request(roots)
    request.config_yaml = ALIAS_BOMB
    tracemalloc.start()
    began = time.perf_counter()
    try:
        details = _refused(client, request, "INVALID_ARGUMENT")
        elapsed = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "anchors and aliases" in details and "line 1, column 4" in details
    assert elapsed < 1.0, elapsed
    assert peak < 20 * 2**20, peak  # expanded, the bomb takes hundreds of MB
    with pytest.raises(ValueError, match="anchors and aliases"):  # the loader itself, too
        load_yaml_mapping(ALIAS_BOMB, "config")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("run:\n  steps: [1\n", "line 3, column 1"),
        ("run: !!python/object/apply:os.system ['touch x']\n", "line 1, column 6"),
        ("[" * 50 + "]" * 50, "nested deeper than"),
        ("run: {stepz: 3}\n", "unknown field 'stepz'"),
        ("run:\n  steps: " + "9" * 5000 + "\n", "run config is not valid YAML"),
        ("run:\n  steps: 3\x00\n", "run config is not valid YAML"),  # found by tests/test_fuzz.py
    ],
)
def test_yaml_errors_name_the_place(
    client: TrainerClient, roots: dict[str, Path], text: str, fragment: str
) -> None:
    request = _request(roots)
    request.config_yaml = text
    assert fragment in _refused(client, request, "INVALID_ARGUMENT")


# --- run ids and the output root ------------------------------------------------------------------
@pytest.mark.parametrize(
    "run_id", ["../../x", "/tmp/abs", "a/b", ".hidden", "..", "x" * 65, "a\x00b", "x" * 1_000_000]
)
def test_run_ids_that_are_not_folder_names_are_refused(
    setup: tuple[TrainerClient, TrainerServicer], roots: dict[str, Path], run_id: str
) -> None:
    client, _ = setup
    details = _refused(client, _request(roots, run_id=run_id), "INVALID_ARGUMENT")
    # A 1 MB id is refused by the message size cap (rlhf.handlers) before it is read at all.
    refusal = "bytes per StartRun message" if len(run_id) > 100_000 else "is not a run id"
    assert refusal in details and len(details) < 300
    for rpc in (client.get, client.stop):
        with pytest.raises(TrainerError) as caught:
            rpc(run_id)
        assert caught.value.code == "INVALID_ARGUMENT" and len(caught.value.details) < 300
    assert not (roots["runs"].parent / "x").exists() and not Path("/tmp/abs").exists()


def test_run_id_in_the_config_is_checked_too(client: TrainerClient, roots: dict[str, Path]) -> None:
    request = _request(roots, run_id="")
    request.config_yaml = "run:\n  run_id: ../escape\n"
    assert "run.run_id '../escape'" in _refused(client, request, "INVALID_ARGUMENT")


def test_output_dir_is_the_trainers_own(client: TrainerClient, roots: dict[str, Path]) -> None:
    request = _request(roots, **{"run.output_dir": str(roots["outside"])})
    assert "run.output_dir" in _refused(client, request, "PERMISSION_DENIED")
    assert not any(roots["outside"].glob("r*"))
    # Naming the trainer's own root is accepted (the same folder, another spelling).
    same = _request(roots, **{"run.output_dir": str(roots["runs"] / ".." / "runs")})
    assert client.start(same).run_id == "r"
    assert _run_to_end(client, "r").state == trainer_pb2.RUN_STATE_COMPLETED
    assert (roots["runs"] / "r" / "metrics.jsonl").is_file()


# --- prompts and models inside the allowed roots -------------------------------------------------
@pytest.mark.parametrize("name", ["outside/secret.jsonl", "data/escape.jsonl", "/etc/passwd"])
def test_prompts_outside_the_data_roots_are_refused(
    client: TrainerClient, roots: dict[str, Path], name: str
) -> None:
    source = name if name.startswith("/") else str(roots["runs"].parent / name)
    details = _refused(client, _request(roots, **{"run.prompts": source}), "PERMISSION_DENIED")
    assert "run.prompts" in details and "--data-root" in details


def test_prompts_inside_a_data_root_are_used(client: TrainerClient, roots: dict[str, Path]) -> None:
    request = _request(roots, **{"run.prompts": str(roots["data"] / "prompts.jsonl")})
    client.start(request)
    assert _run_to_end(client, "r").state == trainer_pb2.RUN_STATE_COMPLETED
    missing = _request(roots, run_id="m", **{"run.prompts": str(roots["data"] / "nope.jsonl")})
    with pytest.raises(TrainerError) as caught:
        client.start(missing)
    assert caught.value.code == "INVALID_ARGUMENT" and "no such file" in caught.value.details


@pytest.mark.parametrize("name", ["escape", "gpt2", "../outside", "/"])
def test_models_outside_the_model_roots_are_refused(
    client: TrainerClient, roots: dict[str, Path], name: str
) -> None:
    model = str(roots["models"] / name) if name in ("escape", "../outside") else name
    details = _refused(client, _request(roots, **{"ppo.model_name": model}), "PERMISSION_DENIED")
    assert "ppo.model_name" in details and "--model-root" in details


# --- addresses ------------------------------------------------------------------------------------
def test_addresses_must_be_allowed(client: TrainerClient, roots: dict[str, Path]) -> None:
    request = _request(roots)
    request.policy_address = "attacker.example:50051"
    assert "policy address" in _refused(client, request, "PERMISSION_DENIED")
    request = _request(roots)
    request.rewards.add(address="rm.example:7001")  # listed with another port only
    assert "--allowed-endpoints" in _refused(client, request, "PERMISSION_DENIED")
    request = _request(roots)
    request.config_yaml = "run:\n  policy: 10.0.0.1:50051\n"
    _refused(client, request, "PERMISSION_DENIED")
    # A wildcard entry allows any port of its host; the defaults are always allowed.
    request = _request(roots)
    request.policy_address = ALLOWED_POLICY
    request.rewards.add(address="local:2", weight=0.5)
    assert client.start(request).run_id == "r"
    assert _run_to_end(client, "r").state == trainer_pb2.RUN_STATE_COMPLETED


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_reward_weights_must_be_finite(
    client: TrainerClient, roots: dict[str, Path], weight: float
) -> None:
    request = _request(roots)
    request.rewards.add(address="local:2", weight=weight)
    assert "weight must be finite" in _refused(client, request, "INVALID_ARGUMENT")
    text = _request(roots, **{"run.rewards": f"local:2={weight}"})
    assert "run.rewards" in _refused(client, text, "INVALID_ARGUMENT")


def test_override_lists_refuse_aliases_too(client: TrainerClient, roots: dict[str, Path]) -> None:
    request = _request(roots, **{"ppo.lora_target_modules": "[&a q_proj, *a]"})
    assert "anchors and aliases" in _refused(client, request, "INVALID_ARGUMENT")


# --- numbers --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run.steps", "-5"),
        ("run.steps", "0"),
        ("run.steps", "1e400"),
        ("run.retry_backoff_s", "inf"),
        ("ppo.learning_rate", "nan"),
        ("ppo.learning_rate", "inf"),
        ("ppo.batch_size", "1000000000"),
        ("ppo.seed", "-1"),
        ("ppo.horizon", "nan"),
        ("generation.temperature", "inf"),
        ("generation.temperature", "1e-45"),
        ("generation.max_new_tokens", "1000000"),
        ("generation.top_p", "nan"),
    ],
)
def test_numbers_are_finite_and_in_range(
    client: TrainerClient, roots: dict[str, Path], field: str, value: str
) -> None:
    details = _refused(client, _request(roots, **{field: value}), "INVALID_ARGUMENT")
    assert field in details, details


# --- the mutating RPCs name their run -------------------------------------------------------
def _raw_refusal(call: object, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)  # type: ignore[operator]
    return caught.value


def test_stop_and_swap_need_a_run_id(client: TrainerClient, roots: dict[str, Path]) -> None:
    client.start(_request(roots))
    _run_to_end(client, "r")
    stub = client.stub
    swap = trainer_pb2.SetRewardEndpointsRequest(rewards=[{"address": "local:2"}])
    for call, request in (
        (stub.StopRun, trainer_pb2.StopRunRequest()),
        (stub.SetRewardEndpoints, swap),
    ):
        err = _raw_refusal(call, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs a run_id" in err.details()
    assert client.get("").state == trainer_pb2.RUN_STATE_COMPLETED  # GetRun still takes ""
    assert client.stop("").run_id == "r"  # `rlhf stop` names the latest run itself
    with pytest.raises(TrainerError) as denied:
        client.swap("r", ["attacker.example:1"])
    assert denied.value.code == "PERMISSION_DENIED"
    # The typed client refuses a NaN weight itself: sent raw, the trainer refuses it too.
    nan = trainer_pb2.SetRewardEndpointsRequest(
        run_id="r", rewards=[{"address": "local:2", "weight": float("nan")}]
    )
    err = _raw_refusal(stub.SetRewardEndpoints, nan)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "finite" in err.details()


# --- the operator's settings ------------------------------------------------------------------
def test_trainer_settings_come_from_flags_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from rlhf.config import from_args
    from services.trainer.cli import configure

    monkeypatch.setenv("RLHF_ALLOWED_ENDPOINTS", "reward-b:50052,pool:*")
    monkeypatch.setenv("RLHF_DATA_ROOT", "/data/prompts,/data/more")
    parser = argparse.ArgumentParser()
    configure(parser)
    settings = from_args(TrainerServiceConfig, parser.parse_args(["--model-root", "/models"]))
    assert settings.allowed_endpoints == ["reward-b:50052", "pool:*"]
    assert settings.data_root == ["/data/prompts", "/data/more"]
    assert settings.model_root == ["/models"]
    for bad, fragment in (
        ({"allowed_endpoints": ["reward-b"]}, "not HOST:PORT or HOST:*"),
        ({"model_root": [" "]}, "model_root: an entry is empty"),
        ({"output_dir": ""}, "output_dir must not be empty"),
    ):
        with pytest.raises(ValueError, match=fragment):
            TrainerServiceConfig(**bad)  # type: ignore[arg-type]
