"""The SFT and reward-model stages on tiny models, a few steps each.

SFT's output is served by the policy service as it is; the reward model's by the reward
service, and it ranks chosen above rejected on its training pairs. The pipeline that chains
them, and the commands, are in tests/test_pipeline.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import pytest
import torch

from rlhf.defaults import LOOPBACK
from rlhf.server import ServerConfig, build_server
from rlhf.v1 import policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer
from services.policy.server import servicers as policy_servicers
from services.reward.backends.hf_classifier import HFClassifierBackend
from services.reward.server import RewardServicer, ScoreSettings
from services.reward.server import servicers as reward_servicers
from tests.servers import open_config
from tests.stage_data import PAIRS, write_jsonl, write_pair_data, write_sft_data
from tools.stages import make_demo_preferences
from tools.stages.reward_model import (
    DEFAULT_BACKBONE,
    RMStageConfig,
    load_pairs,
    resolve_backbone,
    split_pairs,
    train_reward_model,
)
from tools.stages.reward_model import DEMO_DATA as RM_DEMO
from tools.stages.sft import DEMO_DATA as SFT_DEMO
from tools.stages.sft import SFTStageConfig, load_sft_rows, train_sft


@pytest.fixture()
def sft_data(tmp_path: Path) -> Path:
    return write_sft_data(tmp_path)


@pytest.fixture()
def pair_data(tmp_path: Path) -> Path:
    return write_pair_data(tmp_path)


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
    config = open_config(workers=2)
    service = build_server("policy", policy_servicers(PolicyServicer(engine)), config)
    channel = grpc.insecure_channel(f"{LOOPBACK}:{service.port}")
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
    config = ServerConfig(host=LOOPBACK, port=0, workers=2, grace_s=0)
    servicer = RewardServicer(ScoreSettings(input="prompt+response"), backend)
    service = build_server("reward", reward_servicers(servicer), config)
    channel = grpc.insecure_channel(f"{LOOPBACK}:{service.port}")
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
    AutoTokenizer.from_pretrained(resolve_backbone(DEFAULT_BACKBONE)).save_pretrained(backbone)
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
    assert (Path(resolve_backbone(DEFAULT_BACKBONE)) / "config.json").is_file()


def test_missing_backbone_is_a_clear_error(pair_data: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_reward_model(rm_config(tmp_path / "nope", pair_data, tmp_path / "rm"))
