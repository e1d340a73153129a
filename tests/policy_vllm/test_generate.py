"""Generate and GetInfo on the vLLM engine against the transformers engine's answers: the same
refusals of bad requests, the same facts, the same chat template, and seeded sampling."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from rlhf.clients import PolicyClient
from rlhf.v1 import policy_pb2
from services.policy.engine import PolicyEngine
from services.policy.server import params_from_proto
from tests.policy.common import LIMITS, PROMPTS, assert_refused_and_serving, params, tokens
from tests.policy.test_generate import each_bad_request

pytestmark = pytest.mark.slow


@each_bad_request
def test_bad_requests_get_the_hf_engines_answers(
    client: PolicyClient,
    prompts: list[str],
    request_params: policy_pb2.GenerationParams,
    code: grpc.StatusCode,
    message: str,
) -> None:
    assert_refused_and_serving(client, prompts, request_params, code, message)


def test_get_info(client: PolicyClient, hf_engine: PolicyEngine, vllm_lm: Path) -> None:
    info = client.info()
    assert info.engine == "vllm"
    assert info.model == str(vllm_lm)
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert info.num_parameters == hf_engine.num_parameters
    facts = hf_engine.info().tokenizer
    tok = info.tokenizer
    assert (tok.vocab_size, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (
        facts.vocab_size,
        facts.eos_token_id,
        facts.pad_token_id,
        facts.bos_token_id,
    )
    assert (tok.context_length, tok.has_chat_template) == (facts.context_length, True)
    assert (info.max_new_tokens_cap, info.max_batch_size, info.max_prompt_chars) == (
        LIMITS.max_new_tokens_cap,
        LIMITS.max_batch_size,
        LIMITS.max_prompt_chars,
    )


def test_chat_template_as_the_hf_engine(
    client: PolicyClient, hf_engine: PolicyEngine, base_weights: dict[str, torch.Tensor]
) -> None:
    """Same prompt text and ids; and, on the same weights, the same greedy answer."""
    client.update_weights(base_weights, client.info().weight_version + 1)
    for chat in (True, False):
        request = params(apply_chat_template=chat, do_sample=False)
        served = client.generate(PROMPTS, request).completions
        expected = hf_engine.generate(PROMPTS, params_from_proto(request))
        assert [c.prompt_text for c in served] == [c.prompt_text for c in expected]
        assert [list(c.prompt_token_ids) for c in served] == [c.prompt_token_ids for c in expected]
        assert [list(c.response_token_ids) for c in served] == [
            c.response_token_ids for c in expected
        ]
    assert served[0].prompt_text == "hello world"  # the last round: no template


def test_seeded_sampling(client: PolicyClient) -> None:
    def sample(seed: int | None, prompts: list[str] = PROMPTS) -> policy_pb2.GenerateResponse:
        seeded = {} if seed is None else {"seed": seed}
        return client.generate(prompts, params(max_new_tokens=12, **seeded))

    a, b, c = sample(7), sample(7), sample(8)
    assert tokens(a) == tokens(b)
    assert [list(x.response_logprobs) for x in a.completions] == [
        list(x.response_logprobs) for x in b.completions
    ]
    assert tokens(a) != tokens(c)
    # Equal prompts in one batch sample apart (each row its own seed), reproducibly.
    twins = sample(7, ["hello world"] * 2)
    assert tokens(twins)[0] != tokens(twins)[1]
    assert tokens(twins) == tokens(sample(7, ["hello world"] * 2))
    # Unseeded calls draw a fresh seed each time (3 prompts x 12 tokens of 72: never equal).
    assert tokens(sample(None)) != tokens(sample(None))
