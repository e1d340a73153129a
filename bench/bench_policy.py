"""Policy service cost: Generate vs in-process generation, UpdateWeights vs a raw byte stream;
and the service's two engines, hf and vllm, side by side.

(a) Generation tokens/s through the policy service against the same PolicyEngine.generate()
    in this process: same prompts (batch 8), same seed, same max_new_tokens, so both sides
    sample the very same tokens (checked). Target: service >= 0.95 x in-process.
(b) UpdateWeights MB/s for the model's full state dict (tied tensors once, as a trainer sends
    them) against a raw gRPC client stream of the same number of bytes in 1 MiB chunks, which
    a generic stream-unary handler copies into a reused buffer and nothing else: the
    transport's ceiling. Target: UpdateWeights >= 0.8 x raw.

How it is measured, and why:
- The server runs in its own process (this file with --serve), hosting both the PolicyService
  and the raw handler on one gRPC server. A server in this process would share one GIL (and
  the cores) with the client, so the client's encoding and the server's decoding would queue
  behind each other and charge the service for a cost that a deployment, where trainer and
  policy are separate processes, never pays.
- Rounds alternate between the two sides (ABBA), after warm-up, so that load from other work on
  the machine hits both alike. Each round's two sides ran back to back under the same load, so
  the ratio is the median of the rounds' ratios (service / baseline); the rates in the table are
  each side's median round, and each side's best round is printed below it. An UpdateWeights
  round takes ~0.3 s, short enough for a burst of other work to halve one side of one round:
  there are more of them (--update-rounds) than of the ~10 s generation rounds.
- torch runs one thread per process by default (--threads), on both sides alike: on a CPU
  shared with other busy processes, OpenMP threads spin-waiting on a descheduled sibling made
  one in-process generate() swing from 6 s to 130 s here; one thread per process does not.
- For (b) the CPU seconds both processes spent are printed too: on a loaded machine the wall
  clock follows CPU cost, so they say what the ratio will be where the cores are contended.

(c) The engine comparison: Generate tok/s and UpdateWeights seconds on the hf and the vllm
    engine, and the ratio vllm/hf (bench.engines says how; its services run every core).

    python bench/bench_policy.py                 # SmolLM2-135M-Instruct (the default policy)
    python bench/bench_policy.py --quick         # a tiny random model: a smoke run, seconds
    python bench/bench_policy.py --model PATH    # any causal LM folder or hub name
    python bench/bench_policy.py --engines       # (c) only; --device cuda on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.engines import PROMPTS, add_engine_flags, compare_engines, sent_tensors  # noqa: E402
from bench.measure import alternate, speed_ratio, stop  # noqa: E402
from rlhf.defaults import DEFAULT_POLICY_MODEL, LOOPBACK  # noqa: E402

if TYPE_CHECKING:
    from rlhf.clients import PolicyClient
    from services.policy.engine import PolicyEngine

GEN_TARGET = 0.95
UPDATE_TARGET = 0.8
MiB = 1024 * 1024
RAW_METHOD = "/bench.RawStream/Upload"


# --- the server process ------------------------------------------------------------------------
def serve(model: str) -> int:
    """Serves the PolicyService and the raw byte-stream handler; prints PORT n when ready."""
    import numpy as np

    from rlhf.config.security import AuthConfig
    from rlhf.logs import setup_logging
    from rlhf.server import Registration, ServerConfig, build_server
    from services.policy.engine import PolicyEngine
    from services.policy.server import PolicyServicer, servicers

    setup_logging("policy-bench", "INFO")
    engine = PolicyEngine(model)
    buffer = np.empty(0, dtype=np.uint8)

    def raw_upload(requests: Iterator[bytes], _context: grpc.ServicerContext) -> bytes:
        # The transport's ceiling: each message's bytes into a reused buffer, nothing else
        # (with the same copy as WeightAssembler's, numpy's).
        nonlocal buffer
        pos = 0
        for data in requests:
            end = pos + len(data)
            if end > len(buffer):  # grows once, on the warm-up call
                grown = np.empty(max(end, 2 * len(buffer)), dtype=np.uint8)
                grown[:pos] = buffer[:pos]
                buffer = grown
            buffer[pos:end] = np.frombuffer(data, dtype=np.uint8)
            pos = end
        return str(pos).encode()

    handler = grpc.method_handlers_generic_handler(
        "bench.RawStream", {"Upload": grpc.stream_unary_rpc_method_handler(raw_upload)}
    )
    raw = Registration(
        lambda _servicer, server: server.add_generic_rpc_handlers((handler,)),
        None,
        "bench.RawStream",
    )
    # Plaintext loopback without authorisation: the wire's cost alone is measured here.
    config = ServerConfig(host="127.0.0.1", port=0, workers=4, auth=AuthConfig(no_auth=True))
    service = build_server("policy", [*servicers(PolicyServicer(engine)), raw], config)
    print(f"PORT {service.port}", flush=True)
    service.wait_for_termination()
    return 0


# --- the client process --------------------------------------------------------------------------
def parse_flags(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--model", default=DEFAULT_POLICY_MODEL, help="causal LM folder or hub name")
    add("--quick", action="store_true", help="a tiny random model and short runs (smoke test)")
    add("--batch", type=int, default=8, help="prompts per Generate call")
    add("--max-new-tokens", type=int, default=48)
    add("--seed", type=int, default=0)
    add("--rounds", type=int, default=5, help="measured Generate rounds per side")
    add("--update-rounds", type=int, default=15, help="measured UpdateWeights rounds per side")
    add(
        "--threads",
        type=int,
        help="torch CPU threads in each process (0: torch's default, one per core; "
        "default: 1 for (a) and (b), every core for the engine comparison)",
    )
    add("--only", choices=["generate", "update", "engines"], help="measure one part only")
    add("--strict", action="store_true", help="exit 1 if a target is missed")
    add("--server-log", help="keep the server process's log (INFO) in this file")
    add("--serve", action="store_true", help=argparse.SUPPRESS)
    add_engine_flags(parser)
    args = parser.parse_args(argv)
    args.only = "engines" if args.engines else args.only
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_flags(argv)
    if args.serve:
        set_threads(args)
        return serve(args.model)
    tmp = tempfile.TemporaryDirectory(prefix="bench-policy-")
    model = args.model
    if args.quick:
        from tools.tiny import VLLM_SIZES, make_causal_lm

        # One tiny LM for every part: one vLLM can serve (its CPU attention's head sizes).
        model = str(make_causal_lm(Path(tmp.name) / "tiny-lm", **VLLM_SIZES))
        args.max_new_tokens = min(args.max_new_tokens, 16)
    try:
        code = 0
        if args.only != "engines":
            code = service_vs_in_process(args, model, Path(tmp.name))
        if args.only in (None, "engines"):  # after (a) and (b): their server process is gone
            code = compare_engines(args, model, Path(tmp.name)) or code
        return code
    finally:
        tmp.cleanup()


def set_threads(args: argparse.Namespace) -> int:
    """Sets (a) and (b)'s torch threads in this process (see the docstring); returns them."""
    threads = 1 if args.threads is None else args.threads
    if threads:
        import torch

        torch.set_num_threads(threads)  # before anything computes
    return threads


def service_vs_in_process(args: argparse.Namespace, model: str, tmp: Path) -> int:
    """(a) and (b): this process against the --serve process (see the module docstring)."""
    threads = set_threads(args)
    server_log = Path(args.server_log or tmp / "server.log")
    command = [sys.executable, __file__, "--serve", "--model", model, "--threads", str(threads)]
    with server_log.open("w") as log_file:
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        return run_client(args, model, server)
    except Exception:
        print(f"server log: {server_log}\n{server_log.read_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        stop(server)


@dataclass
class Row:
    """One line of the result table: each side's median rate, the median of the rounds'
    ratios, and how the rounds went."""

    measure: str
    service: float
    baseline: float
    baseline_name: str
    ratio: float
    target: float
    detail: str


def paired_row(
    measure: str,
    amount: float,
    service_s: list[float],
    baseline_s: list[float],
    baseline_name: str,
    target: float,
    detail: str,
) -> Row:
    """The row of `amount` per round: each side's median round's rate, and the median of the
    per-round ratios (round i of one side ran right beside round i of the other, under the same
    load)."""
    service, baseline = (
        amount / statistics.median(service_s),
        amount / statistics.median(baseline_s),
    )
    ratio = speed_ratio(service_s, baseline_s)
    return Row(measure, service, baseline, baseline_name, ratio, target, detail)


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
    client = PolicyClient(f"{LOOPBACK}:{int(line.split()[1])}")
    client.wait_ready(timeout_s=120)
    info = client.info()
    print(
        f"model {model}: {info.num_parameters / 1e6:.1f} M parameters, {info.dtype}, "
        f"{torch.get_num_threads()} torch thread(s) per process, rounds per side: "
        f"{args.rounds} Generate, {args.update_rounds} UpdateWeights "
        f"(set up in {time.monotonic() - started:.0f} s)",
        flush=True,
    )
    rows: list[Row] = []
    same = True
    try:
        if args.only in (None, "generate"):
            row, same = measure_generation(args, engine, client)
            rows.append(row)
        if args.only in (None, "update"):
            rows.append(measure_update(args, engine, client, server.pid))
    finally:
        client.close()

    print()
    print(f"{'measure (median round; ratio: median pair)':<44} {'service':>9} {'baseline':>20} "
          f"{'ratio':>6} {'target':>7}  met")  # fmt: skip
    for r in rows:
        met = "yes" if r.ratio >= r.target else "NO"
        print(
            f"{r.measure:<44} {r.service:>9.1f} {r.baseline:>9.1f} {r.baseline_name:>10} "
            f"{r.ratio:>6.3f} {r.target:>7.2f}  {met}"
        )
    print()
    for r in rows:
        print(f"{r.measure}:\n  {r.detail}")
    if args.quick:
        print("(--quick: a smoke run on a tiny model; the targets apply to the default model)")
    if not same:
        print("error: the service and the in-process engine sampled different tokens")
        return 1
    missed = any(r.ratio < r.target for r in rows)
    return 1 if args.strict and missed else 0


def _rounds_detail(
    head: str, unit: str, amount: float, digits: int, sides: dict[str, list[float]], extra: str = ""
) -> str:
    """ "HEAD; best round UNIT A 9.9, B 9.9; EXTRA;" and, on a line of its own, each side's
    seconds per round."""
    best = ", ".join(f"{name} {amount / min(s):.{digits}f}" for name, s in sides.items())
    rounds = "; ".join(f"{name} " + ", ".join(f"{t:.2f}" for t in s) for name, s in sides.items())
    return f"{head}; best round {unit} {best};{f' {extra};' if extra else ''}\n  seconds: {rounds}"


def measure_generation(
    args: argparse.Namespace, engine: PolicyEngine, client: PolicyClient
) -> tuple[Row, bool]:
    """Tokens/s of the same seeded batch in-process and through Generate; same tokens?"""
    from rlhf.v1 import policy_pb2
    from services.policy.server import params_from_proto

    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    proto = policy_pb2.GenerationParams(max_new_tokens=args.max_new_tokens, seed=args.seed)
    local = params_from_proto(proto)  # the very same knobs, as the server sees them
    sampled: dict[str, list[list[int]]] = {}

    def in_process() -> float:
        t = time.perf_counter()
        out = engine.generate(prompts, local)
        seconds = time.perf_counter() - t
        sampled["in-process"] = [c.response_token_ids for c in out]
        return seconds

    def through_service() -> float:
        t = time.perf_counter()
        reply = client.generate(prompts, proto)
        seconds = time.perf_counter() - t
        sampled["service"] = [list(c.response_token_ids) for c in reply.completions]
        return seconds

    warm = policy_pb2.GenerationParams(max_new_tokens=4, seed=1)
    engine.generate(prompts, params_from_proto(warm))
    client.generate(prompts, warm)
    seconds = alternate({"service": through_service, "in-process": in_process}, args.rounds)
    same = sampled["in-process"] == sampled["service"]  # every round samples the same tokens
    tokens = sum(map(len, sampled["service"]))
    service_s, local_s = seconds["service"], seconds["in-process"]
    head = f"{tokens} tokens per call, the same on both sides: {'yes' if same else 'NO'}"
    detail = _rounds_detail(head, "tok/s", tokens, 1, {"service": service_s, "in-process": local_s})
    measure = f"Generate tok/s (batch {args.batch}, {args.max_new_tokens} new)"
    row = paired_row(measure, tokens, service_s, local_s, "in-process", GEN_TARGET, detail)
    return row, same


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_update(
    args: argparse.Namespace, engine: PolicyEngine, client: PolicyClient, server_pid: int
) -> Row:
    """MB/s of UpdateWeights (full state dict) against a raw stream of as many bytes."""
    import torch

    weights = sent_tensors(engine.model)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    payload = b"".join(bytes(t.contiguous().view(torch.uint8).numpy()) for t in weights.values())
    raw_stub = client.channel.stream_unary(RAW_METHOD)

    def raw_chunks() -> Iterator[bytes]:
        view = memoryview(payload)
        for pos in range(0, len(view), MiB):
            yield bytes(view[pos : pos + MiB])

    version = client.info().weight_version
    cpu: dict[str, list[tuple[float, float]]] = {"update": [], "raw": []}

    def timed(side: str, call: Callable[[], int]) -> float:
        here, there = time.process_time(), _cpu_seconds(server_pid)
        t = time.perf_counter()
        received = call()
        seconds = time.perf_counter() - t
        cpu[side].append((time.process_time() - here, _cpu_seconds(server_pid) - there))
        assert received == total, (side, received, total)
        return seconds

    def update() -> float:
        nonlocal version
        version += 1
        return timed("update", lambda: client.update_weights(weights, version).bytes_received)

    def raw() -> float:
        return timed("raw", lambda: int(raw_stub(raw_chunks(), timeout=600)))

    # Warm-up: the first touch of every buffer. The service double-buffers (a new version is
    # received next to the served one, then swapped in), so it takes two uploads to be steady.
    update(), update(), raw()
    cpu = {"update": [], "raw": []}
    seconds = alternate({"update": update, "raw": raw}, args.update_rounds)
    return _update_row(len(weights), total, seconds, cpu)


def _update_row(
    tensors: int,
    total: int,
    seconds: dict[str, list[float]],
    cpu: dict[str, list[tuple[float, float]]],
) -> Row:
    """The UpdateWeights row from each round's seconds and (client, server) CPU seconds."""
    mb = total / 1e6
    gb = total / 1e9

    def per_gb(side: str) -> str:
        client_s = statistics.median(c for c, _ in cpu[side]) / gb
        server_s = statistics.median(s for _, s in cpu[side]) / gb
        return f"{client_s + server_s:.2f} (client {client_s:.2f} + server {server_s:.2f})"

    update_s, raw_s = seconds["update"], seconds["raw"]
    cpu_per_gb = f"CPU seconds per GB: UpdateWeights {per_gb('update')}, raw {per_gb('raw')}"
    sides = {"UpdateWeights": update_s, "raw": raw_s}
    detail = _rounds_detail(f"{tensors} tensors", "MB/s", mb, 0, sides, cpu_per_gb)
    measure = f"UpdateWeights MB/s ({mb:.3g} MB, 1 MiB chunks)"
    return paired_row(measure, mb, update_s, raw_s, "raw stream", UPDATE_TARGET, detail)


if __name__ == "__main__":
    sys.exit(main())
