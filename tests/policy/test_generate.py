"""Generate, GetInfo, health and reflection, and the refusals of bad requests, through a real
policy server (tests/policy/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rlhf.channels import wait_until_serving
from rlhf.clients import PolicyClient
from rlhf.server import GrpcService, build_server
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.policy.engine import PolicyEngine
from services.policy.sampling import encode_prompts, generation_config, left_pad, sample
from services.policy.server import PolicyServicer, servicers
from services.policy.validation import SamplingParams
from tests.policy.common import PROMPTS, Code, assert_refused_and_serving, params, tokens
from tests.servers import open_config


# --- generation ----------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(client: PolicyClient) -> None:
    a = client.generate(PROMPTS, params(max_new_tokens=12, seed=7, temperature=1.5))
    b = client.generate(PROMPTS, params(max_new_tokens=12, seed=7, temperature=1.5))
    c = client.generate(PROMPTS, params(max_new_tokens=12, seed=8, temperature=1.5))
    assert tokens(a) == tokens(b)
    assert [list(x.response_logprobs) for x in a.completions] == [
        list(x.response_logprobs) for x in b.completions
    ]
    assert tokens(a) != tokens(c)
    # Unseeded calls draw a fresh seed each time (3 prompts x 12 tokens of 72: never equal).
    assert tokens(client.generate(PROMPTS, params(max_new_tokens=12))) != tokens(
        client.generate(PROMPTS, params(max_new_tokens=12))
    )
    assert a.request_id and a.request_id != b.request_id
    assert client.generate(["hi"], params(), request_id="req-42").request_id == "req-42"


def test_logprobs_equal_a_separate_forward_pass(client: PolicyClient, engine: PolicyEngine) -> None:
    temperature = 0.7
    reply = client.generate(
        PROMPTS, params(max_new_tokens=16, seed=3, temperature=temperature, top_k=5, top_p=0.9)
    )
    lengths = {len(c.prompt_token_ids) for c in reply.completions}
    assert len(lengths) == 3, "the batch must mix prompt lengths (left padding)"
    for c in reply.completions:
        assert engine.tokenizer.pad_token_id not in c.prompt_token_ids
        assert len(c.response_logprobs) == len(c.response_token_ids) > 0
        ids = list(c.prompt_token_ids) + list(c.response_token_ids)
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids])).logits[0].float()
        start = len(c.prompt_token_ids)
        expected = (
            torch.log_softmax(logits[start - 1 : -1] / temperature, dim=-1)
            .gather(1, torch.tensor(c.response_token_ids)[:, None])
            .squeeze(1)
        )
        assert torch.allclose(torch.tensor(list(c.response_logprobs)), expected, atol=1e-4)


@pytest.mark.parametrize(
    "knobs",
    [
        {"temperature": 0.7, "top_k": 5, "top_p": 0.9},
        # Every third token id ends a row: rows finish at different steps, padded after.
        {"temperature": 1.3, "eos_every": 3},
        {"min_new_tokens": 4, "eos_every": 2},
    ],
)
def test_sampled_logprobs_are_generates_own_logits_bit_for_bit(
    engine: PolicyEngine, knobs: dict
) -> None:
    # sample() records log-probs from the model's forward passes (SampledLogprobs) instead of
    # keeping generate's output_logits: the same numbers, exactly, and the same tokens.
    knobs = dict(knobs)
    eos_every = knobs.pop("eos_every", None)
    sampling = SamplingParams(max_new_tokens=12, seed=11, **knobs)
    eos = list(range(0, len(engine.tokenizer), eos_every)) if eos_every else engine.eos_token_ids
    _, ids = encode_prompts(engine.tokenizer, PROMPTS, chat=False)
    pad = int(engine.tokenizer.pad_token_id)
    input_ids, attention = left_pad(ids, pad)
    config = generation_config(sampling, eos, pad)
    new_tokens, logprobs = sample(engine.model, input_ids, attention, config, sampling)

    torch.manual_seed(sampling.seed)
    config.output_logits = True
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=input_ids, attention_mask=attention, generation_config=config
        )
    expected_tokens = out.sequences[:, input_ids.shape[1] :]
    expected = torch.stack(
        [
            torch.log_softmax(step.float() / (sampling.temperature or 1.0), dim=-1)
            .gather(1, expected_tokens[:, t : t + 1])
            .squeeze(1)
            for t, step in enumerate(out.logits)
        ],
        dim=1,
    )
    assert torch.equal(new_tokens, expected_tokens)
    assert torch.equal(logprobs, expected)
    if eos_every:
        finished = [any(int(t) in eos for t in row) for row in new_tokens]
        assert any(finished), "no row sampled an end token: the padded-rows case went untested"


def test_greedy_and_finish_reasons(client: PolicyClient, engine: PolicyEngine) -> None:
    eos = engine.tokenizer.eos_token_id
    greedy = params(max_new_tokens=10, do_sample=False)
    first, again = client.generate(PROMPTS, greedy), client.generate(PROMPTS, greedy)
    assert tokens(first) == tokens(again)

    # min_new_tokens = max_new_tokens forbids EOS: every completion runs to the length limit.
    full = client.generate(PROMPTS, params(max_new_tokens=6, min_new_tokens=6, seed=1))
    for c in full.completions:
        assert c.finish_reason == policy_pb2.FINISH_REASON_LENGTH
        assert len(c.response_token_ids) == 6 and eos not in c.response_token_ids

    # A hot sampler over 8 prompts x 40 tokens hits EOS somewhere (fixed seed: deterministic).
    hot = client.generate(["hello"] * 8, params(max_new_tokens=40, seed=5, temperature=3.0))
    reasons = {c.finish_reason for c in hot.completions}
    assert policy_pb2.FINISH_REASON_STOP in reasons
    for c in hot.completions:
        ids = list(c.response_token_ids)
        if c.finish_reason == policy_pb2.FINISH_REASON_STOP:
            assert ids[-1] == eos and eos not in ids[:-1]
            assert c.response_text == engine.tokenizer.decode(ids, skip_special_tokens=True)
        else:
            assert c.finish_reason == policy_pb2.FINISH_REASON_LENGTH
            assert len(ids) == 40 and eos not in ids


def test_chat_template(client: PolicyClient, engine: PolicyEngine) -> None:
    reply = client.generate(["hello world"], params(apply_chat_template=True, do_sample=False))
    c = reply.completions[0]
    assert c.prompt_text == "<|user|> hello world </s> <|assistant|> "
    assert (
        list(c.prompt_token_ids)
        == engine.tokenizer(c.prompt_text, add_special_tokens=False)["input_ids"]
    )
    plain = client.generate(["hello world"], params(do_sample=False)).completions[0]
    assert plain.prompt_text == "hello world" and len(plain.prompt_token_ids) == 2


# --- info, health, reflection -------------------------------------------------------------------
def test_get_info(client: PolicyClient, engine: PolicyEngine, tiny_lm: Path) -> None:
    info = client.info()
    assert info.model == str(tiny_lm)
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.num_parameters == sum(p.numel() for p in engine.model.parameters())
    assert info.max_new_tokens_cap == 64 and info.max_batch_size == 8
    assert info.max_prompt_chars == engine.limits.max_prompt_chars
    tok = info.tokenizer
    assert (tok.vocab_size, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (72, 3, 0, 2)
    assert tok.context_length == 128 and tok.has_chat_template


def test_reflection_lists_the_services(service: GrpcService) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in reply.list_services_response.service}
        assert {"rlhf.v1.PolicyService", "grpc.health.v1.Health"} <= names
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "rlhf.v1.PolicyService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_not_serving_until_loaded(engine: PolicyEngine) -> None:
    """As in run_service: bound and NOT_SERVING while loading (calls UNAVAILABLE), then SERVING."""
    servicer = PolicyServicer()
    svc = build_server("policy", servicers(servicer), open_config(), serving=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            for name in ("", "rlhf.v1.PolicyService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            for call in (
                lambda: stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5),
                lambda: stub.Generate(policy_pb2.GenerateRequest(prompts=["hi"]), timeout=5),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == Code.UNAVAILABLE
                assert "model is still loading" in err.value.details()
            servicer.attach(engine)
            svc.set_serving()
            wait_until_serving(channel, "rlhf.v1.PolicyService", timeout_s=5)
            reply = stub.Generate(
                policy_pb2.GenerateRequest(prompts=["hi"], params=params()), timeout=30
            )
            assert len(reply.completions) == 1
    finally:
        svc.stop(grace_s=0)


# --- bad requests ---------------------------------------------------------------------------------
LONG = " ".join(["good"] * 100)  # 100 tokens: + 40 new tokens > the context length of 128
BAD_REQUESTS = [
    ("no prompts", [], params(), Code.INVALID_ARGUMENT, "prompts is empty"),
    ("empty prompt", ["hi", ""], params(), Code.INVALID_ARGUMENT, "prompts[1] is empty"),
    ("too many", ["hi"] * 9, params(), Code.RESOURCE_EXHAUSTED, "max_batch_size 8"),
    ("zero tokens", ["hi"], params(max_new_tokens=0), Code.INVALID_ARGUMENT, "max_new_tokens"),
    ("over cap", ["hi"], params(max_new_tokens=65), Code.RESOURCE_EXHAUSTED, "cap 64"),
    ("min > max", ["hi"], params(min_new_tokens=9), Code.INVALID_ARGUMENT, "min_new_tokens 9"),
    ("temperature", ["hi"], params(temperature=-0.5), Code.INVALID_ARGUMENT, "temperature"),
    ("top_p > 1", ["hi"], params(top_p=1.5), Code.INVALID_ARGUMENT, "top_p"),
    ("top_p < 0", ["hi"], params(top_p=-0.1), Code.INVALID_ARGUMENT, "top_p"),
    ("chars", ["hi", "a" * 601], params(), Code.RESOURCE_EXHAUSTED, "prompts[1] has 601"),
    (
        "context",
        ["hi", LONG],
        params(max_new_tokens=40),
        Code.INVALID_ARGUMENT,
        "prompts[1] is 100 tokens; with max_new_tokens 40 that is 140, above the model's "
        "context length 128",
    ),
]


each_bad_request = pytest.mark.parametrize(
    ("prompts", "request_params", "code", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
"""BAD_REQUESTS as a test's parameters (both engines' tests take them)."""


@each_bad_request
def test_bad_requests_are_refused(
    client: PolicyClient,
    prompts: list[str],
    request_params: policy_pb2.GenerationParams,
    code: grpc.StatusCode,
    message: str,
) -> None:
    assert_refused_and_serving(client, prompts, request_params, code, message)


def test_chat_template_missing(client: PolicyClient, engine: PolicyEngine) -> None:
    template, engine.tokenizer.chat_template = engine.tokenizer.chat_template, None
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(["hi"], params(apply_chat_template=True))
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert "no chat template" in err.value.details()
    finally:
        engine.tokenizer.chat_template = template
    assert client.info().tokenizer.has_chat_template
