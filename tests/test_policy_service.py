"""The policy service through a real gRPC server on loopback, with a tiny random Llama.

One server (module-scoped) serves most tests; tests that change weights read the served version
first and never assume another test's order. The CLI is tested as a real subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rlhf.channels import wait_until_serving
from rlhf.clients import PolicyClient
from rlhf.server import GrpcService, ServerConfig
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from rlhf.weights import decode_chunk, encode_weight_frames, encode_weights
from services.policy.engine import EngineLimits, PolicyEngine
from services.policy.server import PolicyServicer, build_server, params_from_proto
from tools.tiny import make_causal_lm

REPO = Path(__file__).resolve().parents[1]
LIMITS = EngineLimits(max_new_tokens_cap=64, max_batch_size=8, max_prompt_chars=600)
PROMPTS = ["hello world", "the movie was very good and i really love it", "why"]
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def engine(tiny_lm: Path) -> PolicyEngine:
    return PolicyEngine(str(tiny_lm), limits=LIMITS)


@pytest.fixture(scope="module")
def other_engine(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    """A second tiny LM (same shapes, other values), in-process: a "new version" and its output."""
    return PolicyEngine(str(make_causal_lm(tmp_path_factory.mktemp("tiny-lm-2"), seed=1)))


@pytest.fixture(scope="module")
def other_weights(other_engine: PolicyEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in other_engine.model.state_dict().items()}


@pytest.fixture(scope="module")
def service(engine: PolicyEngine) -> Iterator[GrpcService]:
    svc = build_server(engine, ServerConfig(host="127.0.0.1", port=0, workers=4))
    svc.start()
    svc.set_serving()
    yield svc
    svc.stop(grace_s=0)


@pytest.fixture(scope="module")
def client(service: GrpcService) -> Iterator[PolicyClient]:
    c = PolicyClient(f"127.0.0.1:{service.port}")
    yield c
    c.close()


def params(**kw: object) -> policy_pb2.GenerationParams:
    kw.setdefault("max_new_tokens", 8)
    return policy_pb2.GenerationParams(**kw)  # type: ignore[arg-type]


def tokens(reply: policy_pb2.GenerateResponse) -> list[list[int]]:
    return [list(c.response_token_ids) for c in reply.completions]


def served_version(client: PolicyClient) -> int:
    return client.info().weight_version


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
    svc = build_server(servicer)
    svc.start()
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


@pytest.mark.parametrize(
    ("prompts", "request_params", "code", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_are_refused(
    client: PolicyClient,
    prompts: list[str],
    request_params: policy_pb2.GenerationParams,
    code: grpc.StatusCode,
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.generate(prompts, request_params)
    assert err.value.code() == code
    assert message in err.value.details()
    assert len(client.generate(["hi"], params(max_new_tokens=2)).completions) == 1


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


# --- weight updates -------------------------------------------------------------------------------
GREEDY = params(max_new_tokens=12, do_sample=False)


def test_update_weights_changes_outputs_and_version(
    client: PolicyClient,
    engine: PolicyEngine,
    other_engine: PolicyEngine,
    other_weights: dict[str, torch.Tensor],
) -> None:
    version = served_version(client)
    before = client.generate(PROMPTS, GREEDY)
    assert before.weight_version == version
    # Tied embeddings: the upload may carry lm_head.weight instead of model.embed_tokens.weight.
    upload = {k: v for k, v in other_weights.items() if k != "model.embed_tokens.weight"}
    reply = client.update_weights(upload, version + 1, chunk_bytes=64 * 1024)
    assert reply.version == version + 1 and reply.tensors_updated == len(upload)
    assert reply.bytes_received == sum(t.numel() * 4 for t in upload.values())
    after = client.generate(PROMPTS, GREEDY)
    assert after.weight_version == version + 1 and client.info().weight_version == version + 1
    assert tokens(after) != tokens(before)
    # ...and exactly the new model's output: the embedding was updated through lm_head.
    expected = other_engine.generate(PROMPTS, params_from_proto(GREEDY))
    assert tokens(after) == [c.response_token_ids for c in expected]
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight  # still tied


def test_full_and_partial_updates(
    client: PolicyClient, engine: PolicyEngine, other_weights: dict[str, torch.Tensor]
) -> None:
    """A full upload becomes the served weights without a copy (the receive buffers alternate,
    two at most); a partial one is copied into them. Both serve exactly what was sent."""
    version = served_version(client)
    for step in range(1, 4):
        client.update_weights(other_weights, version + step)
        for name, tensor in engine.model.state_dict().items():
            assert torch.equal(tensor, other_weights[name]), name
    assert len(engine._buffers) <= 2  # noqa: SLF001 - the double buffer, not one per update
    before = client.generate(PROMPTS, GREEDY).completions[0].response_logprobs
    norm = torch.rand(other_weights["model.norm.weight"].shape, generator=torch.Generator())
    reply = client.update_weights({"model.norm.weight": norm}, version + 4)
    assert reply.version == version + 4 and reply.tensors_updated == 1
    assert torch.equal(engine.model.model.norm.weight, norm)
    assert torch.equal(engine.model.lm_head.weight, other_weights["lm_head.weight"])
    assert client.generate(PROMPTS, GREEDY).completions[0].response_logprobs != before
    client.update_weights(other_weights, version + 5)


def _chunks(weights: dict[str, torch.Tensor], version: int) -> list[policy_pb2.WeightChunk]:
    return list(encode_weights(weights, version, chunk_bytes=16 * 1024))


def _assert_old_weights_serve(client: PolicyClient, version: int, before: list[list[int]]) -> None:
    reply = client.generate(PROMPTS, GREEDY)
    assert reply.weight_version == version == client.info().weight_version
    assert tokens(reply) == before


def test_broken_streams_leave_the_old_weights(
    client: PolicyClient, other_weights: dict[str, torch.Tensor]
) -> None:
    version = served_version(client)
    before = tokens(client.generate(PROMPTS, GREEDY))
    chunks = _chunks(other_weights, version + 1)
    assert len(chunks) > 4

    def raising() -> Iterator[policy_pb2.WeightChunk]:
        yield from chunks[:3]
        raise RuntimeError("trainer crashed mid-upload")

    with pytest.raises(grpc.RpcError) as err:
        client.stub.UpdateWeights(raising(), timeout=30)
    assert err.value.code() in (Code.CANCELLED, Code.UNKNOWN)
    _assert_old_weights_serve(client, version, before)

    with pytest.raises(grpc.RpcError) as err:
        client.stub.UpdateWeights(iter(chunks[:-2]), timeout=30)
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "stream ended after" in err.value.details() and "not applied" in err.value.details()
    _assert_old_weights_serve(client, version, before)


def _corrupt_chunk(chunks: list[policy_pb2.WeightChunk]) -> list[policy_pb2.WeightChunk]:
    chunks[1].data = bytes([chunks[1].data[0] ^ 0xFF]) + chunks[1].data[1:]
    return chunks


def _corrupt_payload_crc(chunks: list[policy_pb2.WeightChunk]) -> list[policy_pb2.WeightChunk]:
    chunks[-1].payload_crc32 ^= 1
    return chunks


def _drop_manifest(chunks: list[policy_pb2.WeightChunk]) -> list[policy_pb2.WeightChunk]:
    chunks[0].ClearField("manifest")
    return chunks


BAD_UPLOADS = [
    # (id, how to change the weights, chunk mutation, version delta, code, message)
    (
        "unknown name",
        lambda w: {**w, "model.extra.weight": torch.zeros(3)},
        None,
        1,
        Code.INVALID_ARGUMENT,
        "model.extra.weight: no such tensor",
    ),
    (
        "wrong shape",
        lambda w: {**w, "model.norm.weight": torch.zeros(63)},
        None,
        1,
        Code.INVALID_ARGUMENT,
        "model.norm.weight: shape [63], served [64]",
    ),
    (
        "wrong dtype",
        lambda w: {k: v.half() for k, v in w.items()},
        None,
        1,
        Code.INVALID_ARGUMENT,
        "dtype float16, served float32",
    ),
    ("chunk crc", None, _corrupt_chunk, 1, Code.INVALID_ARGUMENT, "corrupted in transit"),
    ("payload crc", None, _corrupt_payload_crc, 1, Code.INVALID_ARGUMENT, "payload CRC-32"),
    ("no manifest", None, _drop_manifest, 1, Code.INVALID_ARGUMENT, "must carry the manifest"),
    ("old version", None, None, 0, Code.FAILED_PRECONDITION, "not newer than the served"),
]


@pytest.mark.parametrize(
    ("change", "mutate", "delta", "code", "message"),
    [case[1:] for case in BAD_UPLOADS],
    ids=[case[0] for case in BAD_UPLOADS],
)
def test_bad_uploads_are_rejected(
    client: PolicyClient,
    other_weights: dict[str, torch.Tensor],
    change: object,
    mutate: object,
    delta: int,
    code: grpc.StatusCode,
    message: str,
) -> None:
    version = served_version(client)
    before = tokens(client.generate(PROMPTS, GREEDY))
    weights = change(other_weights) if callable(change) else other_weights
    chunks = _chunks(weights, version + delta)
    if callable(mutate):
        chunks = mutate(chunks)
    with pytest.raises(grpc.RpcError) as err:
        client.stub.UpdateWeights(iter(chunks), timeout=30)
    assert err.value.code() == code
    assert message in err.value.details()
    _assert_old_weights_serve(client, version, before)


def test_malformed_chunk_is_refused(client: PolicyClient) -> None:
    version = served_version(client)
    before = tokens(client.generate(PROMPTS, GREEDY))
    raw = client.channel.stream_unary("/rlhf.v1.PolicyService/UpdateWeights")
    with pytest.raises(grpc.RpcError) as err:
        raw(iter([b"\x1a\xff\xff\x03abc"]), timeout=10)  # data field longer than the message
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "malformed WeightChunk" in err.value.details()
    _assert_old_weights_serve(client, version, before)


# --- the codec's fast paths ---------------------------------------------------------------------
@pytest.mark.parametrize("chunk_bytes", [64, 1000, 4096, 1 << 20])
def test_frames_are_the_serialized_chunks(chunk_bytes: int) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(1000, generator=g),
        "b": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "c": torch.zeros(7, dtype=torch.float16),
    }
    for version in (1, 300):
        chunks = list(encode_weights(tensors, version, chunk_bytes=chunk_bytes))
        frames = list(encode_weight_frames(tensors, version, chunk_bytes=chunk_bytes))
        assert frames == [c.SerializeToString() for c in chunks]
        for chunk, frame in zip(chunks, frames, strict=True):
            view = decode_chunk(frame)
            assert view.error is None
            assert (view.offset, bytes(view.data), view.crc32) == (
                chunk.offset,
                chunk.data,
                chunk.crc32,
            )
            assert view.HasField("manifest") == chunk.HasField("manifest")
            assert view.HasField("payload_crc32") == chunk.HasField("payload_crc32")
            if chunk.HasField("manifest"):
                assert view.manifest == chunk.manifest
            if chunk.HasField("payload_crc32"):
                assert view.payload_crc32 == chunk.payload_crc32


# --- the CLI, as a process ---------------------------------------------------------------------
def _serve(*flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf.cli", "policy", "serve", *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_serves_and_stops_on_sigterm(tiny_lm: Path) -> None:
    proc = _serve(
        "--model", str(tiny_lm), "--host", "127.0.0.1", "--port", "0", "--grace-s", "2",
        "--threads", "1",
    )  # fmt: skip
    lines: list[str] = []
    port: list[int] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if '"listening"' in line and not port:
                port.append(int(json.loads(line)["address"].rsplit(":", 1)[1]))
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert found.wait(60), "".join(lines)
        client = PolicyClient(f"127.0.0.1:{port[0]}")
        try:
            client.wait_ready(timeout_s=60)
            reply = client.generate(["hello"], params(max_new_tokens=3))
            assert reply.weight_version == 0 and len(reply.completions) == 1
        finally:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    messages = [json.loads(x)["msg"] for x in lines if x.startswith("{")]
    assert "model loaded" in messages and "serving" in messages and "stopped" in messages


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtype", "float8"], "unknown dtype 'float8'; choose one of float32, bfloat16, float16"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--model", "/nonexistent/policy-model"], "/nonexistent/policy-model does not exist"),
    ],
    ids=["dtype", "device", "missing model"],
)
def test_cli_refuses_bad_configuration(flags: list[str], message: str) -> None:
    proc = _serve("--host", "127.0.0.1", "--port", "0", *flags)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert message in stderr


def test_cli_is_import_light() -> None:
    code = (
        "import sys, services.policy.cli as c, rlhf.cli as r; r.build_parser();"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


def test_model_work_runs_on_the_compute_thread(
    client: PolicyClient, engine: PolicyEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generate and the weight swap run on the servicer's one ComputeThread, never on a gRPC
    worker thread (rlhf.compute: one OpenMP team per process)."""
    threads: list[tuple[str, str]] = []
    for name in ("generate", "apply_weights"):
        original = getattr(engine, name)

        def record(*args: object, _name: str = name, _original=original, **kwargs: object):  # noqa: ANN202
            threads.append((_name, threading.current_thread().name))
            return _original(*args, **kwargs)

        monkeypatch.setattr(engine, name, record)
    client.generate(PROMPTS, params(seed=1))
    same = {k: v.clone() for k, v in engine.model.state_dict().items()}
    client.update_weights(same, served_version(client) + 1)
    assert threads == [("generate", "policy-compute"), ("apply_weights", "policy-compute")]
