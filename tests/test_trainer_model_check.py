"""The model check at run start: a run refuses a policy service that serves another model, in
TrainingLoop's construction and, before the run starts, as FAILED_PRECONDITION from StartRun."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bench.local_transports import LocalPolicy
from rlhf.server import build_server
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer, servicers
from services.trainer.api.client import TrainerClient, TrainerError
from services.trainer.api.service import TrainerServicer
from services.trainer.config import TrainerServiceConfig, load_train_config
from services.trainer.orchestrator.model_check import ModelMismatch, trainer_model_facts
from services.trainer.orchestrator.peers import policy_facts
from services.trainer.orchestrator.rewards import RewardMixer
from tests.servers import open_config
from tools.tiny import make_causal_lm


@pytest.fixture(scope="module")
def model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model B: tools/tiny.py's model made narrower (parameters), with two more tokens
    (vocabulary) and another pad token; same EOS. Its folder has another name."""
    folder = make_causal_lm(tmp_path_factory.mktemp("b") / "tiny-lm-b")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["zebra", "quokka"])
    tokenizer.pad_token = "<unk>"
    config = AutoConfig.from_pretrained(folder)
    config.hidden_size, config.intermediate_size = 32, 64
    config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    shutil.rmtree(folder)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _assert_names_both_sides(message: str, a: Path, b: Path) -> None:
    a_facts, b_facts = trainer_model_facts(str(a)), trainer_model_facts(str(b))
    assert f"model: trainer {b.name!r}, policy service {a.name!r}" in message
    assert (
        f"parameters: trainer {b_facts.num_parameters}, "
        f"policy service {a_facts.num_parameters}" in message
    )
    assert (
        f"vocabulary size: trainer {b_facts.vocab_size}, policy service {a_facts.vocab_size}"
        in message
    )
    assert (
        f"pad token id: trainer {b_facts.pad_token_id}, policy service {a_facts.pad_token_id}"
        in message
    )
    assert "eos token id" not in message  # the same on both sides


def test_trainer_facts_count_as_the_policy_engine_does(tiny_lm: Path) -> None:
    """Read from config and tokenizer without weights, the facts equal the loaded engine's."""
    served = policy_facts(PolicyEngine(str(tiny_lm)).info()).model
    assert trainer_model_facts(str(tiny_lm)) == served


def test_training_loop_refuses_a_policy_serving_another_model(
    tiny_lm: Path, model_b: Path, tmp_path: Path
) -> None:
    config = load_train_config(
        None, [f"model_name={model_b}", "log_with=jsonl", f"run.output_dir={tmp_path}"]
    )
    from services.trainer.orchestrator.loop import TrainingLoop

    with pytest.raises(ModelMismatch) as caught:
        TrainingLoop(config, LocalPolicy(str(tiny_lm), address="policy-a"), RewardMixer(print))
    assert "policy service at policy-a" in str(caught.value)
    _assert_names_both_sides(str(caught.value), tiny_lm, model_b)


@pytest.fixture(scope="module")
def policy_a(tiny_lm: Path) -> Iterator[str]:
    service = build_server(
        "policy", servicers(PolicyServicer(PolicyEngine(str(tiny_lm)))), open_config()
    )
    yield f"127.0.0.1:{service.port}"
    service.stop(grace_s=0)


def test_start_run_refuses_with_failed_precondition(
    tiny_lm: Path, model_b: Path, tmp_path: Path, policy_a: str
) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    # The reward address is never reached: the check refuses the run before it starts.
    defaults = TrainerServiceConfig(
        policy=policy_a, reward=["127.0.0.1:9"], output_dir=str(tmp_path), model_root=[str(model_b)]
    )
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(defaults), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = TrainerClient(f"127.0.0.1:{port}")
    try:
        with pytest.raises(TrainerError) as caught:
            client.start(
                trainer_pb2.StartRunRequest(run_id="b", overrides={"ppo.model_name": str(model_b)})
            )
        assert caught.value.code == "FAILED_PRECONDITION"
        _assert_names_both_sides(caught.value.details, tiny_lm, model_b)
        with pytest.raises(TrainerError) as missing:  # refused: no run was registered
            client.get("b")
        assert missing.value.code == "NOT_FOUND"
    finally:
        client.close()
        server.stop(0)
