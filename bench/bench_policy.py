"""Policy service cost: Generate vs in-process generation, UpdateWeights vs a raw byte stream.

(a) Generation tokens/s through the policy service against the same PolicyEngine.generate()
    in this process: same prompts (batch 8), same seed, same max_new_tokens, so both sides
    sample the very same tokens (checked). Target: service >= 0.95 x in-process.
(b) UpdateWeights MB/s for the model's full state dict (tied tensors once, as a trainer sends
    them) against a raw gRPC client stream of the same number of bytes in 1 MiB chunks, which
    a generic stream-unary handler writes into a reused buffer and nothing else: the transport's
    ceiling. Target: UpdateWeights >= 0.8 x raw.

The server runs in its own process (this file with --serve), hosting both the PolicyService
and the raw handler on one gRPC server. That is the fairer measurement: a server in this
process would share one GIL (and the 2 cores) with the client, so the client's encoding and
the server's decoding would queue behind each other and charge the service for a cost that a
deployment, where trainer and policy are separate processes, never pays. Rounds alternate
between the two sides so that load from other work on the machine hits both alike; the median
round of each is reported, after one warm-up round each (first-touch page faults, lazy init).

    python bench/bench_policy.py                 # SmolLM2-135M-Instruct (the default policy)
    python bench/bench_policy.py --quick         # a tiny random model: a smoke run, seconds
    python bench/bench_policy.py --model PATH    # any causal LM folder or hub name
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from rlhf.models import DEFAULT_POLICY  # noqa: E402

if TYPE_CHECKING:
    from rlhf.clients import PolicyClient
    from services.policy.engine import PolicyEngine

GEN_TARGET = 0.95
UPDATE_TARGET = 0.8
MiB = 1024 * 1024
RAW_METHOD = "/bench.RawStream/Upload"
PROMPTS = [
    "Write a short poem about a robot.",
    "Explain KL divergence in simple terms.",
    "What are the stages of RLHF?",
    "Tell me about your favourite movie.",
    "Name three friendly animals.",
    "How do I bake bread?",
    "Why is the sky blue?",
    "Give me a fun fact about space.",
]


# --- the server process ------------------------------------------------------------------------
def serve(model: str) -> int:
    """Serves the PolicyService and the raw byte-stream handler; prints PORT n when ready."""
    from rlhf.logs import setup_logging
    from rlhf.server import ServerConfig
    from services.policy.engine import PolicyEngine
    from services.policy.server import build_server

    setup_logging("policy-bench", "INFO")
    engine = PolicyEngine(model)
    service = build_server(engine, ServerConfig(host="127.0.0.1", port=0, workers=4))
    buffer = bytearray()

    def raw_upload(requests: Iterator[bytes], _context: grpc.ServicerContext) -> bytes:
        # The transport's ceiling: take each message's bytes into a reused buffer, nothing else.
        nonlocal buffer
        pos = 0
        for data in requests:
            end = pos + len(data)
            if end > len(buffer):
                buffer.extend(bytes(end - len(buffer)))
            buffer[pos:end] = data
            pos = end
        return str(pos).encode()

    handler = grpc.method_handlers_generic_handler(
        "bench.RawStream", {"Upload": grpc.stream_unary_rpc_method_handler(raw_upload)}
    )
    service.server.add_generic_rpc_handlers((handler,))
    port = service.start()
    service.set_serving()
    print(f"PORT {port}", flush=True)
    service.wait_for_termination()
    return 0


# --- the client process --------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_POLICY, help="causal LM folder or hub name")
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("RLHF_BENCH_QUICK", "") not in ("", "0"),
        help="a tiny random model and short runs (smoke test) [env RLHF_BENCH_QUICK]",
    )
    parser.add_argument("--batch", type=int, default=8, help="prompts per Generate call")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds per side")
    parser.add_argument(
        "--only", choices=["generate", "update"], help="measure one of the two parts only"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--server-log", help="keep the server process's log (INFO) in this file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.model)

    tmp = tempfile.TemporaryDirectory(prefix="bench-policy-")
    model = args.model
    if args.quick:
        from tests.tiny import make_causal_lm

        model = str(make_causal_lm(Path(tmp.name) / "tiny-lm"))
        args.max_new_tokens = min(args.max_new_tokens, 16)
    server_log = Path(args.server_log or Path(tmp.name) / "server.log")
    with server_log.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--model", model],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    try:
        return run_client(args, model, server)
    except Exception:
        print(f"server log: {server_log}\n{server_log.read_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        tmp.cleanup()


@dataclass
class Row:
    """One line of the result table."""

    measure: str
    service: float
    baseline: float
    baseline_name: str
    target: float
    detail: str

    @property
    def ratio(self) -> float:
        return self.service / self.baseline


def run_client(args: argparse.Namespace, model: str, server: subprocess.Popen[str]) -> int:
    import torch

    from rlhf.clients import PolicyClient
    from services.policy.engine import PolicyEngine

    started = time.monotonic()
    engine = PolicyEngine(model)
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line.startswith("PORT "):
        raise RuntimeError(f"the server process did not start (exit {server.poll()})")
    client = PolicyClient(f"127.0.0.1:{int(line.split()[1])}")
    client.wait_ready(timeout_s=120)
    info = client.info()
    print(
        f"model {model}: {info.num_parameters / 1e6:.1f} M parameters, {info.dtype}, "
        f"{torch.get_num_threads()} torch threads per process (set up in "
        f"{time.monotonic() - started:.0f} s)",
        flush=True,
    )
    rows: list[Row] = []
    ok = True
    try:
        if args.only in (None, "generate"):
            row, ok = measure_generation(args, engine, client)
            rows.append(row)
        if args.only in (None, "update"):
            rows.append(measure_update(args, engine, client))
    finally:
        client.close()

    print()
    print(f"{'measure':<44} {'service':>9} {'baseline':>20} {'ratio':>6} {'target':>7}  met")
    for r in rows:
        met = "yes" if r.ratio >= r.target else "NO"
        print(
            f"{r.measure:<44} {r.service:>9.1f} {r.baseline:>9.1f} {r.baseline_name:>10} "
            f"{r.ratio:>6.3f} {r.target:>7.2f}  {met}"
        )
    print(f"\nmedians of {args.rounds} alternating rounds per side, after warm-up")
    for r in rows:
        print(f"  {r.measure}: {r.detail}")
    if not ok:
        print("error: the service and the in-process engine sampled different tokens")
        return 1
    missed = any(r.ratio < r.target for r in rows)
    return 1 if args.strict and missed else 0


def measure_generation(
    args: argparse.Namespace, engine: PolicyEngine, client: PolicyClient
) -> tuple[Row, bool]:
    """Tokens/s of the same seeded batch in-process and through Generate; same tokens?"""
    from rlhf.v1 import policy_pb2
    from services.policy.server import params_from_proto

    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    proto = policy_pb2.GenerationParams(max_new_tokens=args.max_new_tokens, seed=args.seed)
    local = params_from_proto(proto)  # the very same knobs, as the server sees them

    def in_process() -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        out = engine.generate(prompts, local)
        return time.perf_counter() - t, [c.response_token_ids for c in out]

    def through_service() -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        reply = client.generate(prompts, proto)
        return time.perf_counter() - t, [list(c.response_token_ids) for c in reply.completions]

    warm = policy_pb2.GenerationParams(max_new_tokens=4, seed=1)
    engine.generate(prompts, params_from_proto(warm))
    client.generate(prompts, warm)
    sides = {"in-process": in_process, "service": through_service}
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    tokens: dict[str, list[int]] = {side: [] for side in sides}
    same = True
    for round_ in range(args.rounds):
        # ABBA order: a drift in the machine's load over a round charges both sides alike.
        order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
        ids: dict[str, list[list[int]]] = {}
        for side in order:
            s, ids[side] = sides[side]()
            seconds[side].append(s)
            tokens[side].append(sum(map(len, ids[side])))
        same &= ids["in-process"] == ids["service"]
    rate = {
        side: statistics.median(n / s for n, s in zip(tokens[side], seconds[side], strict=True))
        for side in sides
    }
    detail = (
        f"{tokens['service'][0]} tokens per call; same tokens on both sides: "
        f"{'yes' if same else 'NO'}; seconds in-process "
        + ", ".join(f"{s:.2f}" for s in seconds["in-process"])
        + "; service "
        + ", ".join(f"{s:.2f}" for s in seconds["service"])
    )
    row = Row(
        measure=f"Generate tok/s (batch {args.batch}, {args.max_new_tokens} new)",
        service=rate["service"],
        baseline=rate["in-process"],
        baseline_name="in-process",
        target=GEN_TARGET,
        detail=detail,
    )
    return row, same


def measure_update(args: argparse.Namespace, engine: PolicyEngine, client: PolicyClient) -> Row:
    """MB/s of UpdateWeights (full state dict) against a raw stream of as many bytes."""
    import torch

    weights: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in engine.model.state_dict().items():
        if tensor.data_ptr() not in seen:  # tied tensors (lm_head = embeddings) travel once
            seen.add(tensor.data_ptr())
            weights[name] = tensor
    total = sum(t.numel() * t.element_size() for t in weights.values())
    payload = b"".join(bytes(t.contiguous().view(torch.uint8).numpy()) for t in weights.values())
    raw_stub = client.channel.stream_unary(RAW_METHOD)

    def raw_chunks() -> Iterator[bytes]:
        view = memoryview(payload)
        for pos in range(0, len(view), MiB):
            yield bytes(view[pos : pos + MiB])

    version = client.info().weight_version

    def update() -> float:
        nonlocal version
        version += 1
        t = time.perf_counter()
        reply = client.update_weights(weights, version)
        seconds = time.perf_counter() - t
        assert reply.bytes_received == total and reply.version == version
        return seconds

    def raw() -> float:
        t = time.perf_counter()
        reply = raw_stub(raw_chunks(), timeout=600)
        seconds = time.perf_counter() - t
        assert int(reply) == total
        return seconds

    # Warm-up: the first touch of every buffer. The service double-buffers (the new version is
    # received next to the served one, then swapped in), so it takes two uploads to be steady.
    update(), update(), raw()
    sides = {"update": update, "raw": raw}
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        for side in list(sides) if round_ % 2 == 0 else list(sides)[::-1]:
            seconds[side].append(sides[side]())
    mb = total / 1e6
    detail = (
        f"{len(weights)} tensors; seconds UpdateWeights "
        + ", ".join(f"{s:.2f}" for s in seconds["update"])
        + "; raw "
        + ", ".join(f"{s:.2f}" for s in seconds["raw"])
    )
    return Row(
        measure=f"UpdateWeights MB/s ({mb:.0f} MB, 1 MiB chunks)",
        service=statistics.median(mb / s for s in seconds["update"]),
        baseline=statistics.median(mb / s for s in seconds["raw"]),
        baseline_name="raw stream",
        target=UPDATE_TARGET,
        detail=detail,
    )


if __name__ == "__main__":
    sys.exit(main())
