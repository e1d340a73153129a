"""The SFT and reward-model stages and the pipeline, on tiny models, a few steps each.

SFT's output is served by the policy service as it is; the reward model's by the reward
service, and it ranks chosen above rejected on its training pairs; the pipeline hands the SFT
folder to PPO (model_name and the policy service's --model) and the reward model to a reward
service, skips finished stages and reruns them with --force.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from rlhf.server import ServerConfig, build_server
from rlhf.v1 import policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer
from services.policy.server import servicers as policy_servicers
from services.reward.backends.hf_classifier import HFClassifierBackend
from services.reward.server import RewardServicer, ScoreSettings
from services.reward.server import servicers as reward_servicers
from tools import main_job
from tools.stages import make_demo_preferences
from tools.stages.pipeline import PPO_DONE, PipelineConfig, run_pipeline
from tools.stages.reward_model import (
    DEMO_DATA as RM_DEMO,
)
from tools.stages.reward_model import (
    RMStageConfig,
    load_pairs,
    resolve_backbone,
    split_pairs,
    train_reward_model,
)
from tools.stages.sft import DEMO_DATA as SFT_DEMO
from tools.stages.sft import SFTStageConfig, load_sft_rows, train_sft

# Words of the tiny tokenizer's vocabulary (tools/tiny.py), so the tiny models see real tokens.
SFT_ROWS = [
    ("tell me about the day", "what a wonderful day !"),
    ("write a short poem about a robot", "the robot is very happy and i love it !"),
    ("how was the movie ?", "a great film , really fun !"),
    ("what about the story ?", "a nice story , so good !"),
]
PAIRS = [
    ("tell me about the movie", "i love it , a great film !", "i hate it , a terrible film ."),
    ("how was the day ?", "a wonderful day , so happy", "an awful day , so sad"),
    ("what about the story ?", "really nice and fun", "really boring and bad"),
    ("hello", "hello ! what a nice day", "no . bad day"),
    ("write a poem", "a happy poem about love", "a sad poem about hate"),
    ("tell me about the robot", "the robot is friendly and good", "the robot is awful"),
    ("how is the film ?", "excellent ! very very good", "terrible , not good"),
    ("what is this ?", "this is great fun !", "this is boring"),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture()
def sft_data(tmp_path: Path) -> Path:
    rows = [{"prompt": p, "completion": c} for p, c in SFT_ROWS]
    return write_jsonl(tmp_path / "sft.jsonl", rows * 2)


@pytest.fixture()
def pair_data(tmp_path: Path) -> Path:
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def sft_config(model: Path, data: Path, output: Path, **kw: object) -> SFTStageConfig:
    kw = {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, **kw}
    return SFTStageConfig(model=str(model), data=str(data), output=str(output), **kw)


def rm_config(model: Path, data: Path, output: Path, **kw: object) -> RMStageConfig:
    kw = {"max_steps": 30, "batch_size": 4, "learning_rate": 1e-3, "eval_fraction": 0.0, **kw}
    return RMStageConfig(model=str(model), data=str(data), output=str(output), **kw)


# --- SFT -----------------------------------------------------------------------------------------
def test_sft_output_is_served_by_the_policy_service_and_its_loss_is_logged(
    tiny_lm: Path, sft_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sft"
    result = train_sft(sft_config(tiny_lm, sft_data, out))

    assert result.output == out and result.steps == 4
    logged = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3, 4]
    assert all(math.isfinite(row["loss"]) for row in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]  # it learns the repeated completions
    stage = json.loads((out / "stage.json").read_text())
    assert stage["steps"] == 4 and stage["data_format"] == "prompt-completion"
    assert not list(tmp_path.glob(".sft.*")), "the staging folder is gone"

    # The folder as it is: the policy service loads it, chat template included, and generates.
    engine = PolicyEngine(str(out))
    assert engine.info().tokenizer.has_chat_template
    config = ServerConfig(host="127.0.0.1", port=0, workers=2)
    service = build_server("policy", policy_servicers(PolicyServicer(engine)), config)
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        reply = policy_pb2_grpc.PolicyServiceStub(channel).Generate(
            policy_pb2.GenerateRequest(
                prompts=["tell me about the day"],
                params=policy_pb2.GenerationParams(
                    max_new_tokens=4, seed=1, apply_chat_template=True
                ),
            ),
            timeout=30,
        )
    finally:
        channel.close()
        service.stop(grace_s=0)
    assert len(reply.completions) == 1 and reply.completions[0].response_token_ids


def test_sft_refuses_an_existing_output_unless_forced(
    tiny_lm: Path, sft_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sft"
    out.mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        train_sft(sft_config(tiny_lm, sft_data, out))
    train_sft(sft_config(tiny_lm, sft_data, out, max_steps=1, force=True))
    assert (out / "config.json").is_file()


def test_sft_data_formats(tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "completion": "hello !"}])
    rows, kind = load_sft_rows(plain, chat_template=True)
    assert kind == "prompt-completion"
    assert rows[0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "hello !"}]
    assert load_sft_rows(plain, chat_template=False)[0] == [
        {"prompt": "hi", "completion": "hello !"}
    ]

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages = write_jsonl(tmp_path / "b.jsonl", [{"messages": chat}])
    assert load_sft_rows(messages, chat_template=True) == ([{"messages": chat}], "messages")

    bad = write_jsonl(tmp_path / "c.jsonl", [{"question": "hi", "answer": "hello"}])
    with pytest.raises(ValueError, match="prompt and completion, or messages"):
        load_sft_rows(bad, chat_template=True)
    mixed = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(ValueError, match="row 2"):
        load_sft_rows(mixed, chat_template=True)


def test_sft_default_model_is_the_embedded_policy() -> None:
    from rlhf.models import DEFAULT_POLICY

    assert SFTStageConfig().model == DEFAULT_POLICY


# --- reward model --------------------------------------------------------------------------------
def test_reward_model_ranks_chosen_above_rejected_and_is_served(
    tiny_reward_model: Path, pair_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rm"
    result = train_reward_model(rm_config(tiny_reward_model, pair_data, out))

    assert result.steps == 30 and result.train_accuracy == 1.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_accuracy"] == 1.0 and metrics["input"] == "prompt+response"
    assert metrics["heldout_accuracy"] is None and metrics["heldout_pairs"] == 0
    assert len((out / "loss.jsonl").read_text().splitlines()) == 30

    # The real reward service in this process, scoring prompt + response as it was trained.
    backend = HFClassifierBackend(str(out))
    assert backend.num_labels == 1
    config = ServerConfig(host="127.0.0.1", port=0, workers=2, grace_s=0)
    servicer = RewardServicer(ScoreSettings(input="prompt+response"), backend)
    service = build_server("reward", reward_servicers(servicer), config)
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        def score(responses: list[str]) -> list[float]:
            samples = [
                reward_pb2.Sample(prompt=p, response=r) for (p, _, _), r in zip(PAIRS, responses)
            ]
            return list(stub.Score(reward_pb2.ScoreRequest(samples=samples), timeout=30).scores)

        chosen = score([c for _, c, _ in PAIRS])
        rejected = score([r for _, _, r in PAIRS])
    finally:
        channel.close()
        service.stop(grace_s=0)
    assert all(c > r for c, r in zip(chosen, rejected)), (chosen, rejected)


def test_reward_model_on_a_bert_backbone_with_held_out_pairs(
    pair_data: Path, tmp_path: Path
) -> None:
    """The default backbone's family (BERT: no EOS token, [CLS] pooling), tiny and random, with
    the MiniLM's own tokenizer; and a held-out split, whose accuracy lands in metrics.json."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    backbone = tmp_path / "tiny-bert"
    AutoTokenizer.from_pretrained(resolve_backbone("all-minilm-l6-v2")).save_pretrained(backbone)
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(backbone)

    out = tmp_path / "rm"
    result = train_reward_model(
        rm_config(backbone, pair_data, out, max_steps=20, eval_fraction=0.25, seed=3)
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_pairs"] == 2 and metrics["train_pairs"] == 6
    assert metrics["heldout_accuracy"] == result.heldout_accuracy
    assert 0.0 <= metrics["heldout_accuracy"] <= 1.0
    assert result.train_accuracy == 1.0
    assert HFClassifierBackend(str(out)).num_labels == 1


def test_held_out_split_is_seeded_and_disjoint() -> None:
    pairs = load_pairs(RM_DEMO)
    train, held = split_pairs(pairs, 0.2, seed=0)
    assert len(held) == round(len(pairs) * 0.2) and len(train) + len(held) == len(pairs)
    assert not {json.dumps(p) for p in train} & {json.dumps(p) for p in held}
    assert split_pairs(pairs, 0.2, seed=0) == (train, held)
    assert split_pairs(pairs, 0.2, seed=1)[1] != held
    with pytest.raises(ValueError, match="eval-fraction"):
        split_pairs(pairs, 1.0, seed=0)


def test_demo_data_ships_and_is_reproducible() -> None:
    rows, kind = load_sft_rows(SFT_DEMO, chat_template=True)
    assert kind == "prompt-completion" and 60 <= len(rows) <= 100
    # The shipped preference file is exactly what its script writes.
    shipped = [json.loads(line) for line in RM_DEMO.read_text().splitlines()]
    assert shipped == make_demo_preferences.make_pairs()
    assert len(shipped) >= 300 and all(r["chosen"] != r["rejected"] for r in shipped)
    assert (Path(resolve_backbone("all-minilm-l6-v2")) / "config.json").is_file()


def test_missing_backbone_is_a_clear_error(pair_data: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_reward_model(rm_config(tmp_path / "nope", pair_data, tmp_path / "rm"))


# --- commands ------------------------------------------------------------------------------------
def test_commands_wire_the_stages(
    tiny_lm: Path,
    tiny_reward_model: Path,
    sft_data: Path,
    pair_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rlhf.cli import main

    sft = ["sft", "--model", str(tiny_lm), "--data", str(sft_data), "--output", str(tmp_path / "s")]
    assert main([*sft, "--max-steps", "1", "--batch-size", "2", "--seed", "1"]) == 0
    stage = json.loads((tmp_path / "s" / "stage.json").read_text())
    assert stage["config"]["batch_size"] == 2 and stage["config"]["seed"] == 1
    assert main(sft) == 1  # exists, no --force: one line, no traceback
    assert "--force" in capsys.readouterr().err

    rm = ["rm", "--model", str(tiny_reward_model), "--data", str(pair_data)]
    rm += ["--output", str(tmp_path / "r"), "--max-steps", "2", "--eval-fraction", "0.25"]
    assert main([*rm, "--input", "response"]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["input"] == "response" and metrics["heldout_pairs"] == 2


def test_make_run_is_one_ppo_job_on_the_default_policy_and_vader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import rlhf.models

    calls = []

    def fake_ppo_job(model, rewards, config, output_dir, run_id="", overrides=()):  # noqa: ANN001
        calls.append((model, rewards, config, output_dir, list(overrides)))
        return main_job.PPOJobResult(0, output_dir / "r", 0.1)

    monkeypatch.setattr(rlhf.models, "prepare_default_policy", lambda: tmp_path / "smol")
    monkeypatch.setattr(main_job, "run_ppo_job", fake_ppo_job)
    assert main_job.main(["--output-dir", str(tmp_path), "--set", "run.steps=3"]) == 0
    ((model, rewards, config, output_dir, overrides),) = calls
    assert model == str(tmp_path / "smol") and config == main_job.DEFAULT_CONFIG
    assert [(r.args, r.weight) for r in rewards] == [
        (["reward", "serve", "--backend", "vader"], 1.0)
    ]
    assert output_dir == tmp_path and overrides == ["run.steps=3"]


# --- pipeline ------------------------------------------------------------------------------------
def pipeline_config(
    tiny_lm: Path, tiny_rm: Path, sft: Path, pairs: Path, output: Path, ppo: Path, **kw: object
) -> PipelineConfig:
    return PipelineConfig(
        output=str(output),
        base_model=str(tiny_lm),
        sft_data=str(sft),
        sft_max_steps=2,
        rm_backbone=str(tiny_rm),
        rm_data=str(pairs),
        rm_max_steps=4,
        ppo_config=str(ppo),
        ppo_steps=1,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture()
def ppo_config(tmp_path: Path) -> Path:
    """A PPO run sized for tiny models (model_name and output_dir come from the pipeline)."""
    config = {
        "ppo": {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "log_with": "jsonl"},
        "generation": {"max_new_tokens": 4, "apply_chat_template": True},
        "run": {"steps": 3, "save_every": 1},
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pipeline_hands_outputs_on_and_skips_finished_stages(
    tiny_lm: Path,
    tiny_reward_model: Path,
    sft_data: Path,
    pair_data: Path,
    ppo_config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict] = []

    def fake_ppo_job(model, rewards, config, output_dir, run_id="", overrides=()):  # noqa: ANN001
        calls.append(
            {"model": model, "rewards": rewards, "config": config, "overrides": list(overrides)}
        )
        (output_dir / run_id).mkdir(parents=True)
        return main_job.PPOJobResult(0, output_dir / run_id, 0.1)

    monkeypatch.setattr(main_job, "run_ppo_job", fake_ppo_job)
    out = tmp_path / "pipe"
    config = pipeline_config(
        tiny_lm, tiny_reward_model, sft_data, pair_data, out, ppo_config, vader_weight=0.25
    )
    result = run_pipeline(config)

    assert result.ran == ["sft", "rm", "ppo"] and result.code == 0
    (call,) = calls
    assert call["model"] == str(out / "sft")  # PPOConfig.model_name and the policy's --model
    assert call["config"] == ppo_config and "run.steps=1" in call["overrides"]
    rm, vader = call["rewards"]
    assert rm.args[:4] == ["reward", "serve", "--backend", "hf-classifier"]
    assert rm.args[rm.args.index("--model") + 1] == str(out / "rm")
    assert rm.args[rm.args.index("--input") + 1] == "prompt+response"
    assert rm.weight == 1.0
    assert vader.args[3] == "vader" and vader.weight == 0.25
    assert (out / "ppo" / PPO_DONE).is_file()

    # Everything finished: nothing reruns.
    stamp = (out / "sft" / "stage.json").stat().st_mtime_ns
    assert run_pipeline(config).ran == []
    assert len(calls) == 1 and (out / "sft" / "stage.json").stat().st_mtime_ns == stamp

    # A new reward model makes the PPO run stale; SFT stays.
    (out / "rm" / "stage.json").unlink()
    with pytest.raises(FileExistsError, match="--force"):
        run_pipeline(config)  # an unfinished folder is not replaced without --force
    shutil.rmtree(out / "rm")
    assert run_pipeline(config).ran == ["rm", "ppo"]

    # --force reruns every stage.
    forced = pipeline_config(
        tiny_lm, tiny_reward_model, sft_data, pair_data, out, ppo_config, force=True
    )
    assert run_pipeline(forced).ran == ["sft", "rm", "ppo"]
    assert (out / "sft" / "stage.json").stat().st_mtime_ns != stamp
    assert len(calls) == 3 and len(calls[-1]["rewards"]) == 1  # no VADER without its weight


@pytest.mark.slow
def test_pipeline_end_to_end_across_processes(
    tiny_lm: Path,
    tiny_reward_model: Path,
    sft_data: Path,
    pair_data: Path,
    ppo_config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SFT and RM in this process, then the policy (on the SFT folder), reward (on the RM
    folder) and trainer services as processes for one PPO step."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the services' processes inherit these
    monkeypatch.setenv("RLHF_THREADS", "1")
    out = tmp_path / "pipe"
    config = pipeline_config(tiny_lm, tiny_reward_model, sft_data, pair_data, out, ppo_config)
    result = run_pipeline(config)

    assert result.code == 0 and result.ran == ["sft", "rm", "ppo"]
    run_dir = out / "ppo" / "run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    assert "env/reward/rm" in metrics[0] and math.isfinite(metrics[0]["env/reward_mean"])
    policy_log = (run_dir / "logs" / "policy.log").read_text()
    assert str(out / "sft") in policy_log  # the policy service served the SFT folder
    assert str(out / "rm") in (run_dir / "logs" / "rm.log").read_text()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest / "policy" / "config.json").is_file()
    done = json.loads((out / "ppo" / PPO_DONE).read_text())
    assert done["policy"] == str(out / "sft") and done["reward_model"] == str(out / "rm")
