"""Reward scoring throughput: through the reward service vs the same backend in-process.

Same texts, same backend flags, same batches. The two sides are interleaved in small groups of
calls (one batch in-process, the same batch through the service, ...), so that load from other
work on the machine hits both alike; each row's ratio is the median of its rounds' ratios.
Target: service >= 0.9 x in-process scores/s.

The service runs as a subprocess started with the real `rlhf reward serve` command, as it is
deployed (its own process, its own GIL). That is the fairer choice: a server in this process
would share one GIL with the client, so every request's protobuf building and the backend's
scoring would queue behind each other, charging the service for a cost deployment never pays.

What the rows vary, and why:
- Texts: "seed-length" responses of about 48 words, what the seed's max_new_tokens=64 produces
  (~1.3 tokens per English word); "short" ones (1-3 sentences, ~19 words, `make run`'s
  20-token responses) are printed beside them, without a target.
- Samples per Score call: the trainer sends a step's whole batch in one call. The target rows
  use 256, TRL's PPOConfig default batch_size (v0.1-v0.7); 64 is printed beside it. Every call
  pays a fixed cost whatever its size (the `overhead` column: service minus in-process, per
  call): grpcio's sync server hands each call across several threads, and on a small VM each
  wake of an idle thread costs 0.1-0.3 ms, ~1 ms per call before any of this service's code
  runs. At 64 seed-length texts (~14 ms of VADER) that fixed cost alone is ~7 %.
- Calls in flight: 1 is the latency-bound case of a trainer waiting on each batch (a blocking
  call, as the trainer's RewardClient makes it); a few in flight is a trainer scoring ahead, or
  several trainers: the service always has the next request queued.
The verdict is printed on the target rows; the exit status reports errors only.

    python bench/bench_reward.py                       # VADER
    python bench/bench_reward.py --backend hf-classifier --model PATH --label POSITIVE

Flags the bench does not know are passed to both `rlhf reward serve` and the in-process backend.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.measure import speed_ratio, stop  # noqa: E402
from rlhf.channels import open_channel, wait_until_serving  # noqa: E402
from rlhf.defaults import ENV_PREFIX, LOOPBACK  # noqa: E402
from rlhf.protocol import REWARD_SERVICE  # noqa: E402
from rlhf.v1 import reward_pb2, reward_pb2_grpc  # noqa: E402
from services.reward import cli  # noqa: E402
from services.reward.backends import build_backend  # noqa: E402
from services.reward.server import texts_to_score  # noqa: E402
from tools.launch import free_port  # noqa: E402

TARGET = 0.9
TARGET_BATCH = 256
"""Samples per Score call of the target rows: TRL's PPOConfig default batch_size (v0.1-v0.7)."""

_SUBJECTS = [
    "The movie", "This restaurant", "My new phone", "The customer service", "Our trip to Rome",
    "The final chapter", "The robot", "Your answer", "The weather today", "This update",
    "The concert", "The teacher", "Their latest album", "The hotel room", "The assistant",
]  # fmt: skip
_VERBS = ["was", "is", "felt", "seemed", "turned out to be", "has been", "looked", "sounded"]
_ADJECTIVES = [
    "absolutely wonderful", "really good", "pretty boring", "terrible", "surprisingly helpful",
    "a bit disappointing", "great", "awful", "fine, I guess", "not bad at all", "amazing",
    "frustrating", "confusing", "lovely", "mediocre", "fantastic", "not good",
]  # fmt: skip
_TAILS = [
    "", " and I would do it again.", " but the ending was rushed.", ", honestly.",
    " and everyone around me agreed!", " though I expected more.", " :)", " :(",
    " and the staff were friendly.", " which made me quite sad.", " - highly recommended!",
    " but it could be worse.", " and I will never forget it.", " so I asked for a refund.",
]  # fmt: skip
_PROMPTS = [
    "Write a short review:", "Tell me how it went.", "Describe your experience in one line:",
    "What did you think?", "Give honest feedback:",
]  # fmt: skip


SEED_WORDS = 48
"""Words in a seed-length response: max_new_tokens=64 at ~1.3 tokens per English word."""


def make_samples(count: int, seed: int = 0, words: int = 0) -> tuple[list[str], list[str]]:
    """`count` (prompt, response) pairs of review-like sentences, deterministic.

    words=0: each response is 1-3 sentences (~19 words). words=N: sentences are added until a
    response has at least N - 4 words (sentences are ~7 words long, so about N on average)."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(count):
        sentences: list[str] = []
        target = rng.randint(1, 3)
        # A sentence is ~7 words: stopping 4 short of N makes the mean length about N.
        while (len(sentences) < target) if not words else (_words(sentences) < words - 4):
            sentences.append(
                f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ADJECTIVES)}"
                f"{rng.choice(_TAILS)}"
            )
        prompts.append(rng.choice(_PROMPTS))
        responses.append(" " + " ".join(sentences))
    return prompts, responses


def _words(sentences: list[str]) -> int:
    return sum(len(sentence.split()) for sentence in sentences)


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def paired_round(
    score: Callable[[list[str]], list[float]],
    stub: reward_pb2_grpc.RewardServiceStub,
    texts: list[list[str]],
    requests: list[reward_pb2.ScoreRequest],
    in_flight: int,
) -> tuple[float, float, list[float]]:
    """Every batch scored both ways, alternating in small groups so that other load on the
    machine slows both sides alike: a group of batches in-process, then the same group through
    the service with up to `in_flight` calls outstanding (a group of 1 when in_flight is 1).
    Returns (in-process seconds, service seconds, the service's scores)."""
    group = 1 if in_flight == 1 else 2 * in_flight
    local = remote = 0.0
    scores: list[float] = []
    for start in range(0, len(requests), group):
        started = time.perf_counter()
        for batch in texts[start : start + group]:
            score(batch)
        middle = time.perf_counter()
        pending: list[grpc.Future] = []
        for request in requests[start : start + group]:
            if in_flight == 1:  # one call at a time, as the trainer makes them
                scores.extend(stub.Score(request, timeout=120).scores)
                continue
            pending.append(stub.Score.future(request, timeout=120))
            if len(pending) >= in_flight:
                scores.extend(pending.pop(0).result().scores)
        for future in pending:
            scores.extend(future.result().scores)
        local += middle - started
        remote += time.perf_counter() - middle
    return local, remote, scores


Row = tuple[tuple[str, int], int]
"""One table row: (text size, samples per call) and the calls in flight."""


class BadFlags(Exception):
    """A flag the bench cannot run with; its message says which and why."""


@dataclass
class Timings:
    """Seconds per round of each row's two sides, and the empty call's round trip."""

    local_s: dict[Row, list[float]]
    remote_s: dict[Row, list[float]]
    floor_ms: dict[float, float]
    """Median ms of an empty Score call, by the seconds the caller works between calls."""


def main(argv: list[str] | None = None) -> int:
    try:
        ours, backend_args, backend_argv, call_sizes = parse_flags(argv)
    except BadFlags as err:
        print(f"bench_reward: error: {err}", file=sys.stderr)
        return 2
    backend = build_backend(backend_args)
    sizes = {"seed-length": SEED_WORDS, "short": 0}
    workloads = {
        (name, call): Workload.build(ours.samples, call, backend_args.input, words, backend.score)
        for name, words in sizes.items()
        for call in call_sizes
    }
    rows = [(work, mode) for work in workloads for mode in (1, ours.in_flight)]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    command = [sys.executable, "-m", "rlhf.cli", "reward", "serve", *backend_argv]
    command += ["--host", LOOPBACK, "--port", str(port), "--grace-s", "1"]
    command += ["--max-samples", str(max(call_sizes + [1024]))]
    with tempfile.TemporaryFile(mode="w+") as log:
        # The service's JSON log goes to a file: an unread pipe would fill and stall it.
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            timings = measure(server, port, workloads, rows, ours.rounds, backend.score)
        except Exception as err:
            log.seek(0)
            tail = log.read()[-4000:]
            print(f"bench_reward: error: {type(err).__name__}: {err}\n{tail}", file=sys.stderr)
            return 1
        finally:
            stop(server)
    print_table(ours, backend_args, workloads, rows, timings)
    return 0


def parse_flags(
    argv: list[str] | None,
) -> tuple[argparse.Namespace, argparse.Namespace, list[str], list[int]]:
    """(the bench's flags, the backend's flags, the backend's argv, the Score call sizes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4096, help="texts scored per round")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 512 texts, 2 rounds")
    parser.add_argument(
        "--batches",
        default=f"{TARGET_BATCH},64",
        help="samples per Score call, comma-separated: one set of rows each",
    )
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds per side")
    parser.add_argument("--in-flight", type=int, default=4, help="pipelined calls outstanding")
    ours, backend_argv = parser.parse_known_args(argv)
    try:
        call_sizes = [int(size) for size in ours.batches.split(",")]
    except ValueError:
        call_sizes = []
    if not call_sizes or min(call_sizes) < 1:
        raise BadFlags(f"--batches {ours.batches!r}: positive integers, e.g. 256,64")
    backend_parser = argparse.ArgumentParser(prog="backend flags")
    cli.configure(backend_parser)
    backend_args = backend_parser.parse_args(backend_argv)
    problem = cli.check_flags(backend_args)
    if problem:
        raise BadFlags(problem)
    if ours.quick:
        ours.samples, ours.rounds = 512, 2
    return ours, backend_args, backend_argv, call_sizes


def measure(
    server: subprocess.Popen,
    port: int,
    workloads: dict[tuple[str, int], Workload],
    rows: list[Row],
    rounds: int,
    score: Callable[[list[str]], list[float]],
) -> Timings:
    """Waits for the service, warms it up, then runs `rounds` paired rounds of every row."""
    channel = open_channel(f"{LOOPBACK}:{port}")
    wait_for_service(server, channel)
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    for work in workloads.values():  # warm-up: connection, lazy imports, first passes
        for request in work.requests[:4]:
            stub.Score(request, timeout=120)
    floor_ms = {busy: empty_call_ms(stub, busy) for busy in (0.0, 0.015)}
    timings = Timings({row: [] for row in rows}, {row: [] for row in rows}, floor_ms)
    for _ in range(rounds):
        for key, mode in rows:
            work = workloads[key]
            local, remote, got = paired_round(
                score, stub, work.text_batches, work.requests, in_flight=mode
            )
            check(got, work.expected)
            timings.local_s[key, mode].append(local)
            timings.remote_s[key, mode].append(remote)
    channel.close()
    return timings


def wait_for_service(server: subprocess.Popen, channel: grpc.Channel) -> None:
    """Until the reward service is SERVING; raises if its process exits or 300 s pass."""
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the reward service exited with {server.returncode}")
        try:
            wait_until_serving(channel, REWARD_SERVICE, timeout_s=1)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def print_table(
    ours: argparse.Namespace,
    backend_args: argparse.Namespace,
    workloads: dict[tuple[str, int], Workload],
    rows: list[Row],
    timings: Timings,
) -> None:
    name = backend_args.name or backend_args.backend
    detail = f" ({backend_args.model})" if backend_args.model else ""
    print(
        f"reward scoring: backend {name}{detail}, {ours.samples} samples per row and round, "
        f"median of {ours.rounds} rounds, service in a subprocess"
    )
    print(
        f"{'responses':<24}{'per call':>9}  {'client':<19}{'in-process/s':>13}{'service/s':>10}"
        f"{'overhead':>12}{'ratio':>7}  target >= {TARGET} (seed-length, {TARGET_BATCH} per call)"
    )
    for (size, call), mode in rows:
        local, remote = timings.local_s[(size, call), mode], timings.remote_s[(size, call), mode]
        local_rate = ours.samples / statistics.median(local)
        remote_rate = ours.samples / statistics.median(remote)
        # Each round's two sides ran interleaved under the same load: the median of the
        # per-round ratios is steadier than a ratio of medians on a busy machine.
        ratio = speed_ratio(remote, local)
        calls = len(workloads[size, call].requests)
        overhead_ms = statistics.median((b - a) / calls * 1000 for a, b in zip(local, remote))
        target_row = size == "seed-length" and call == TARGET_BATCH
        verdict = ("met" if ratio >= TARGET else "NOT met") if target_row else ""
        label = f"{mode} call{'s' if mode > 1 else ''} in flight"
        words = workloads[size, call].mean_words
        print(
            f"{f'{size} (~{words:.0f} words)':<24}{call:>9}  {label:<19}{local_rate:>13.0f}"
            f"{remote_rate:>10.0f}{f'{overhead_ms:.2f} ms':>12}{ratio:>7.2f}  {verdict}"
        )
    floor_ms = timings.floor_ms
    print(
        f"an empty Score call (no samples, no scoring), median round trip: "
        f"{floor_ms[0.0]:.2f} ms back to back, {floor_ms[0.015]:.2f} ms when the caller works "
        "15 ms between calls (the in-process side's rhythm): the transport's share of `overhead`"
    )


def empty_call_ms(
    stub: reward_pb2_grpc.RewardServiceStub, busy_s: float, calls: int = 200
) -> float:
    """Median milliseconds of an empty Score call, the caller spinning `busy_s` between calls."""
    request = reward_pb2.ScoreRequest()
    times = []
    for _ in range(calls):
        end = time.perf_counter() + busy_s
        while time.perf_counter() < end:
            pass
        started = time.perf_counter()
        stub.Score(request, timeout=30)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


@dataclass
class Workload:
    """One size of texts in calls of one size, pre-built both ways: backend inputs and
    ScoreRequests."""

    text_batches: list[list[str]]
    requests: list[reward_pb2.ScoreRequest]
    expected: list[float]
    mean_words: float

    @classmethod
    def build(
        cls,
        samples: int,
        call_size: int,
        input_mode: str,
        words: int,
        score: Callable[[list[str]], list[float]],
    ) -> Workload:
        prompts, responses = make_samples(samples, words=words)
        texts = texts_to_score(prompts, responses, input_mode)
        text_batches = batches(texts, call_size)
        requests = [
            reward_pb2.ScoreRequest(
                samples=[reward_pb2.Sample(prompt=p, response=r) for p, r in zip(ps, rs)]
            )
            for ps, rs in zip(batches(prompts, call_size), batches(responses, call_size))
        ]
        expected = [value for batch in text_batches for value in score(batch)]
        mean_words = statistics.mean(len(r.split()) for r in responses)
        return cls(text_batches, requests, expected, mean_words)


def check(got: list[float], expected: list[float]) -> None:
    """The service must return what the backend computes (to float32 precision)."""
    if len(got) != len(expected):
        raise RuntimeError(f"service returned {len(got)} scores for {len(expected)} samples")
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(got, expected))
    if worst > 1e-5:
        raise RuntimeError(f"service scores differ from in-process ones by up to {worst:.2e}")


if __name__ == "__main__":
    sys.exit(main())
