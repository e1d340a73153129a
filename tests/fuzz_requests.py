"""The requests of tests/test_fuzz.py's storms, one maker per service: each returns the method's
name and a function that sends one request, typed (near-valid, with a few extreme values, or
every field extreme: tests/fuzzing.py) or raw (random or damaged bodies through a generic
channel method)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc

from rlhf.protocol import POLICY_DESCRIPTOR, REWARD_DESCRIPTOR, TRAINER_DESCRIPTOR
from rlhf.v1 import (
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from tests.boundary import upload
from tests.fuzzing import FLOATS, PIECES, Fuzzer
from tools.tiny import WORDS

TIMEOUT_S = 20.0
"""Per request: far above any answer's time; a request that reaches it is a hang, not a pass."""
Send = Callable[[], Any]


def raw_sender(channel: grpc.Channel, service: Any, method: str, bodies: list[bytes]) -> Send:
    """Sends raw bodies (one, or a stream of them) through a generic channel method."""
    descriptor = service.methods_by_name[method]
    path = f"/{service.full_name}/{method}"
    if descriptor.client_streaming:
        return lambda: channel.stream_unary(path)(iter(bodies), timeout=TIMEOUT_S)
    if descriptor.server_streaming:
        return lambda: first_then_cancel(channel.unary_stream(path)(bodies[0], timeout=TIMEOUT_S))
    return lambda: channel.unary_unary(path)(bodies[0], timeout=TIMEOUT_S)


def first_then_cancel(call: Any) -> None:
    """A response stream's first message (or its error), then the stream cancelled."""
    try:
        next(call, None)
    finally:
        call.cancel()


def _sentence(fz: Fuzzer) -> str:
    return " ".join(fz.rng.choice(WORDS) for _ in range(fz.rng.randrange(1, 6)))


def _near_params(fz: Fuzzer) -> policy_pb2.GenerationParams:
    rng = fz.rng
    params = policy_pb2.GenerationParams(
        max_new_tokens=rng.choice([0, 1, 2, 3, 4, 5, 2**32 - 1]),
        min_new_tokens=rng.choice([0, 0, 1, 4, 9, 2**32 - 1]),
        top_k=rng.choice([0, 1, 5, 2**32 - 1]),
        apply_chat_template=rng.random() < 0.5,
    )
    for name in ("temperature", "top_p"):
        if rng.random() < 0.6:
            setattr(params, name, rng.choice([*FLOATS[:10], 0.7, 0.9]))
    if rng.random() < 0.5:
        params.do_sample = rng.random() < 0.5
    if rng.random() < 0.5:
        params.seed = fz.integer(0, 2**64 - 1)
    return params


def _damaged_upload(fz: Fuzzer, chunks: list[policy_pb2.WeightChunk]) -> list:
    """A real upload with one thing wrong (or cut short, or with a chunk repeated)."""
    rng = fz.rng
    out = [policy_pb2.WeightChunk.FromString(c.SerializeToString()) for c in chunks]
    target = rng.randrange(4)
    if target == 0 and out[0].manifest.tensors:
        spec = rng.choice(out[0].manifest.tensors)
        spec.CopyFrom(fz.message(policy_pb2.TensorSpec))
    elif target == 1:
        out[0].manifest.total_bytes = fz.integer(0, 2**64 - 1)
    elif target == 2:
        chunk = rng.choice(out)
        chunk.data = chunk.data[: rng.randrange(len(chunk.data) + 1)]
    else:
        out = out[: rng.randrange(len(out) + 1)] + [out[-1]] * rng.randrange(3)
    return out


def policy_request(
    fz: Fuzzer, stub: policy_pb2_grpc.PolicyServiceStub, channel: grpc.Channel, engine: Any
) -> tuple[str, Send]:
    rng = fz.rng
    pick = rng.random()
    if pick < 0.3:
        prompts = [_sentence(fz) for _ in range(rng.choice([0, 1, 2, 4, 5]))]
        if rng.random() < 0.2:
            prompts.append(fz.string())
        request = policy_pb2.GenerateRequest(prompts=prompts, params=_near_params(fz))
        return "Generate", lambda: stub.Generate(request, timeout=TIMEOUT_S)
    if pick < 0.5:
        request = fz.message(policy_pb2.GenerateRequest)
        return "Generate", lambda: stub.Generate(request, timeout=TIMEOUT_S)
    if pick < 0.55:
        return "GetInfo", lambda: stub.GetInfo(common_pb2.GetInfoRequest(), timeout=TIMEOUT_S)
    if pick < 0.6:
        chunks = [fz.message(policy_pb2.WeightChunk) for _ in range(rng.randrange(0, 4))]
        return "UpdateWeights", lambda: stub.UpdateWeights(iter(chunks), timeout=TIMEOUT_S)
    if pick < 0.65:
        version = engine.weight_version + 1
        chunks = _damaged_upload(fz, upload(engine, version, rng.choice([4096, 65536, 1 << 20])))
        return "UpdateWeights", lambda: stub.UpdateWeights(iter(chunks), timeout=TIMEOUT_S)
    method = rng.choice(list(POLICY_DESCRIPTOR.methods_by_name))
    valid = {
        "Generate": policy_pb2.GenerateRequest(prompts=["hello"], params=_near_params(fz)),
        "GetInfo": common_pb2.GetInfoRequest(),
        "UpdateWeights": policy_pb2.WeightChunk(offset=3, data=b"abc", crc32=7),
    }[method].SerializeToString()
    bodies = [fz.raw(valid) for _ in range(rng.randrange(1, 4))]
    return method, raw_sender(channel, POLICY_DESCRIPTOR, method, bodies)


def reward_request(
    fz: Fuzzer, stub: reward_pb2_grpc.RewardServiceStub, channel: grpc.Channel
) -> tuple[str, Send]:
    rng = fz.rng
    pick = rng.random()
    if pick < 0.35:
        samples = [
            reward_pb2.Sample(prompt=fz.string() if rng.random() < 0.3 else "", response=text)
            for text in (
                fz.string() if rng.random() < 0.3 else rng.choice(PIECES) for _ in range(fz.count())
            )
        ]
        request = reward_pb2.ScoreRequest(samples=samples)
        return "Score", lambda: stub.Score(request, timeout=TIMEOUT_S)
    if pick < 0.6:
        request = fz.message(reward_pb2.ScoreRequest)
        return "Score", lambda: stub.Score(request, timeout=TIMEOUT_S)
    if pick < 0.65:
        return "GetInfo", lambda: stub.GetInfo(common_pb2.GetInfoRequest(), timeout=TIMEOUT_S)
    method = rng.choice(list(REWARD_DESCRIPTOR.methods_by_name))
    valid = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(prompt="a", response="good")])
    body = fz.raw(valid.SerializeToString() if method == "Score" else b"")
    return method, raw_sender(channel, REWARD_DESCRIPTOR, method, [body])


CONFIG_KEYS = {
    "ppo": ["learning_rate", "batch_size", "mini_batch_size", "ppo_epochs", "init_kl_coef"],
    "generation": ["max_new_tokens", "temperature", "top_p", "top_k"],
    "run": ["steps", "prompts", "output_dir", "run_id", "save_every", "rewards", "policy"],
}


NASTY_YAML = [
    # Deeper than Python's recursion limit (a deep "[[[[" list costs PyYAML seconds to find
    # out, so only the mapping, which fails fast, is in the storm).
    "a: " + "{b: " * 3000 + "1" + "}" * 3000,
    "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]",
    "run: !!python/name:os.system",
    "ppo:\n  learning_rate: 1\n ppo_epochs: [",
    "\t- \x00",
]


def _yaml(fz: Fuzzer) -> str:
    """Run-config YAML: real sections and fields with extreme values, nasty YAML, or junk."""
    rng = fz.rng
    if rng.random() < 0.05:
        return rng.choice(NASTY_YAML)
    if rng.random() < 0.3:
        return fz.string()
    lines = []
    for section, keys in CONFIG_KEYS.items():
        if rng.random() < 0.6:
            lines.append(f"{section}:")
            for key in rng.sample(keys, rng.randrange(1, len(keys) + 1)):
                value = rng.choice(
                    [
                        json.dumps(fz.string()),
                        str(rng.choice(FLOATS)),
                        str(fz.integer(-(2**63), 2**64)),
                        "[1, 2]",
                        "{a: 1}",
                        "~",
                        "yes",
                        "!!python/object/apply:os.system ['true']",
                    ]
                )
                lines.append(f"  {key}: {value}")
    if rng.random() < 0.1:
        lines.insert(rng.randrange(len(lines) + 1), fz.string())
    return "\n".join(lines)


def _endpoint(fz: Fuzzer) -> trainer_pb2.RewardEndpoint:
    rng = fz.rng
    address = rng.choice(["h:1", "local:2", ":", "", "a@b:3=x", fz.string()])
    return trainer_pb2.RewardEndpoint(
        address=address, weight=rng.choice(FLOATS[:12]), name=rng.choice(["", "v", fz.string()])
    )


def trainer_request(
    fz: Fuzzer, stub: trainer_pb2_grpc.TrainerServiceStub, channel: grpc.Channel, tiny: str
) -> tuple[str, Send]:
    rng = fz.rng
    pick = rng.random()
    run_id = rng.choice(["", "held", "nope", "../../x", "/abs", fz.string()])
    if pick < 0.25:
        request = trainer_pb2.StartRunRequest(run_id=run_id, config_yaml=_yaml(fz))
        if rng.random() < 0.5:
            request.overrides.update({"ppo.model_name": tiny, "run.steps": str(fz.integer(-5, 9))})
        if rng.random() < 0.3:
            request.rewards.extend(_endpoint(fz) for _ in range(fz.count()))
        return "StartRun", lambda: stub.StartRun(request, timeout=TIMEOUT_S)
    if pick < 0.35:
        request = fz.message(trainer_pb2.StartRunRequest)
        return "StartRun", lambda: stub.StartRun(request, timeout=TIMEOUT_S)
    if pick < 0.45:
        get = trainer_pb2.GetRunRequest(run_id=run_id)
        return "GetRun", lambda: stub.GetRun(get, timeout=TIMEOUT_S)
    if pick < 0.55:
        watch = trainer_pb2.WatchRunRequest(run_id=run_id, from_step=fz.integer(0, 2**64 - 1))
        return "WatchRun", lambda: first_then_cancel(stub.WatchRun(watch, timeout=TIMEOUT_S))
    if pick < 0.6:
        stop = trainer_pb2.StopRunRequest(run_id=rng.choice(["held", "nope", fz.string()]))
        return "StopRun", lambda: stub.StopRun(stop, timeout=TIMEOUT_S)
    if pick < 0.7:
        swap = trainer_pb2.SetRewardEndpointsRequest(
            run_id=run_id, rewards=[_endpoint(fz) for _ in range(fz.count())]
        )
        return "SetRewardEndpoints", lambda: stub.SetRewardEndpoints(swap, timeout=TIMEOUT_S)
    method = rng.choice(list(TRAINER_DESCRIPTOR.methods_by_name))
    valid = trainer_pb2.GetRunRequest(run_id="held").SerializeToString()
    return method, raw_sender(channel, TRAINER_DESCRIPTOR, method, [fz.raw(valid)])


def start_request(tiny: str, run_id: str, steps: int) -> trainer_pb2.StartRunRequest:
    request = trainer_pb2.StartRunRequest(run_id=run_id)
    request.overrides.update(
        {
            "ppo.model_name": tiny,
            "ppo.batch_size": "2",
            "ppo.mini_batch_size": "1",
            "ppo.ppo_epochs": "1",
            "ppo.log_with": "jsonl",
            "generation.max_new_tokens": "4",
            "run.steps": str(steps),
            "run.save_every": "0",
        }
    )
    return request
