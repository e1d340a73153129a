"""Reward replicas: one reward source served by several endpoints (a HOST:PORT+HOST:PORT list,
or dns:///HOST:PORT through gRPC's own round_robin), each step's batch split across them and
reassembled in sample order; the source stays one entry and one env/reward/<name> statistic."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from bench.local_transports import LocalPolicy, LocalReward
from rlhf.certs import make_certs
from rlhf.config.security import ClientConfig, TlsConfig
from rlhf.errors import RpcError
from rlhf.protocol import REWARD_SERVICE
from rlhf.server import GrpcService, ServerConfig
from rlhf.v1 import reward_pb2, reward_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.reward.backends.vader import VaderBackend
from services.trainer.api.client import TrainerClient
from services.trainer.api.inputs import InputRules
from services.trainer.api.service import TrainerServicer, Transports
from services.trainer.config import GenerationConfig, TrainerServiceConfig
from services.trainer.orchestrator.fanout import even_shards
from services.trainer.orchestrator.peers import FatalError, Rollout, TransientError
from services.trainer.orchestrator.reward_replicas import (
    BalancedReward,
    ReplicatedReward,
    connect_source,
    resolved_count,
)
from services.trainer.orchestrator.rewards import EndpointSpec, RewardError, RewardMixer
from services.trainer.orchestrator.transports import GrpcReward, connect_reward
from tests.fuzz_requests import start_request
from tests.servers import open_config
from tools.launch import start_service


def _batch(count: int) -> tuple[list[str], list[str]]:
    """Samples whose prompt is their index: a replica's score tells which sample it scored."""
    return [str(i) for i in range(count)], [f"response {i}" for i in range(count)]


# --- the spec ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "addresses", "balanced"),
    [
        ("h:1", ["h:1"], False),
        ("rm@a:1+b:2=0.5", ["a:1", "b:2"], False),
        ("a:1+[::1]:2+c.example:3", ["a:1", "[::1]:2", "c.example:3"], False),
        ("dns:///reward:50052", ["reward:50052"], True),
        ("rm@dns:///reward.ns.svc:50052=-2", ["reward.ns.svc:50052"], True),
    ],
)
def test_every_form_round_trips_through_its_text(
    text: str, addresses: list[str], balanced: bool
) -> None:
    spec = EndpointSpec.parse(text)
    assert spec.addresses == addresses and spec.balanced is balanced
    assert EndpointSpec.parse(str(spec)) == spec
    assert str(EndpointSpec.parse(str(spec))) == str(spec)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a:1+", "an empty replica address"),
        ("a:1++b:2", "an empty replica address"),
        ("+a:1", "an empty replica address"),
        ("a:1+dns:///b:2", "cannot be one of a + list"),
        ("dns:///a:1+b:2", "cannot be one of a + list"),
        ("a:1+b:99999", "port '99999' of 'b:99999' is not a number"),
        ("a:1+b:x", "port 'x' of 'b:x' is not a number"),
        ("dns:///reward", "'reward' is not HOST:PORT"),
        ("a:1+a:1", "'a:1' listed twice"),
        ("a:1+" + "+".join(f"h{i}:1" for i in range(16)), "17 replicas, at most 16"),
    ],
)
def test_malformed_addresses_are_refused_with_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="reward endpoint address") as err:
        EndpointSpec.parse(text)
    assert message in str(err.value)


def test_the_allow_list_checks_every_address_of_a_source(tmp_path: Path) -> None:
    rules = InputRules(
        TrainerServiceConfig(
            reward=["a:1+b:2"], allowed_endpoints=["c:3", "svc:*"], output_dir=str(tmp_path)
        )
    )
    for ok in ("a:1+b:2", "b:2+c:3", "dns:///svc:50052", "dns:///c:3"):
        rules.rewards([EndpointSpec.parse(ok)], "reward endpoints")
    for refused, unlisted in (("a:1+d:4", "'d:4'"), ("dns:///e:5", "'e:5'")):
        with pytest.raises(RpcError) as err:
            rules.rewards([EndpointSpec.parse(refused)], "reward endpoints")
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert unlisted in err.value.message


# --- splitting and reassembly, with in-process replicas ------------------------------------


class FakeReplica:
    """A replica scoring each sample with its index (its prompt; 0 for the mixer's probe);
    records the size of each Score call. `fail`: None, a PeerError class to raise, or "count"
    (one score too few). `gate`: an event Score waits on first."""

    def __init__(self, address: str, name: str = "rm") -> None:
        self.address = address
        self.service_name = name
        self.fail: type[Exception] | str | None = None
        self.calls: list[int] = []
        self.gate: threading.Event | None = None
        self.returned = threading.Event()
        self.closed = False

    def name(self) -> str:
        return self.service_name

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.calls.append(len(prompts))
        if self.gate is not None:
            assert self.gate.wait(30), "the other replica never answered"
            time.sleep(0.05)  # and its answer was taken in before this one's
        if isinstance(self.fail, type):
            raise self.fail(f"{self.address} is down", self.address)
        scores = [float(p) if p.isdigit() else 0.0 for p in prompts]
        self.returned.set()
        return scores[:-1] if self.fail == "count" else scores

    def close(self) -> None:
        self.closed = True


def test_shards_are_contiguous_and_even() -> None:
    assert even_shards(5, 2) == [(0, 3), (3, 5)]
    assert even_shards(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert even_shards(1, 3) == [(0, 1)]
    assert even_shards(0, 2) == []


def test_split_and_reassembly_keep_sample_order_whatever_answers_first() -> None:
    first, second = FakeReplica("a:1"), FakeReplica("b:2")
    first.gate = second.returned  # the first shard's answer comes in last
    source = ReplicatedReward("a:1+b:2", [first, second])
    assert source.score(*_batch(5)) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert (first.calls, second.calls) == ([3], [2])  # uneven: 5 over 2


def test_a_replica_failing_transiently_has_its_shard_redone_by_the_others() -> None:
    replicas = [FakeReplica("a:1"), FakeReplica("b:2"), FakeReplica("c:3")]
    replicas[1].fail = TransientError
    source = ReplicatedReward("a:1+b:2+c:3", replicas)
    assert source.score(*_batch(7)) == [float(i) for i in range(7)]
    assert [r.calls for r in replicas] == [[3, 2], [2], [2]]  # b's shard went to a
    replicas[1].fail = None  # left out for that call only: the next call tries it again
    assert source.score(*_batch(3)) == [0.0, 1.0, 2.0]
    assert replicas[1].calls == [2, 1]


def test_every_replica_failing_is_transient_and_a_refusal_is_fatal_naming_the_replica() -> None:
    first, second = FakeReplica("a:1"), FakeReplica("b:2")
    first.fail = second.fail = TransientError
    source = ReplicatedReward("a:1+b:2", [first, second])
    with pytest.raises(TransientError, match=r"every replica of reward source a:1\+b:2"):
        source.score(*_batch(4))
    first.fail, second.fail = None, FatalError
    with pytest.raises(FatalError, match="b:2 is down"):
        source.score(*_batch(4))
    second.fail = "count"
    with pytest.raises(RewardError, match="reward replica b:2 returned 1 scores for 2 samples"):
        source.score(*_batch(4))


def test_the_name_is_every_replicas_and_replicas_must_agree() -> None:
    replicas = [FakeReplica("a:1"), FakeReplica("b:2"), FakeReplica("c:3", name="other")]
    with pytest.raises(RewardError, match="replicas a:1 and c:3 serve different reward models"):
        ReplicatedReward("a:1+b:2+c:3", replicas).name()
    assert ReplicatedReward("a:1+b:2", replicas[:2]).name() == "rm"


def test_a_balanced_source_sends_one_shard_per_resolved_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    three = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 5)) for ip in ("10.0.0.1",) * 2]
    three.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 5)))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: three)
    assert resolved_count("reward:5") == 2  # duplicates counted once
    channel = FakeReplica("dns:///reward:5")
    made: list[str] = []

    def balanced(target: str) -> FakeReplica:
        made.append(target)
        return channel

    source = connect_source("dns:///reward:5", lambda a: FakeReplica(a), balanced)
    assert isinstance(source, BalancedReward) and made == ["dns:///reward:5"]
    assert source.score(*_batch(5)) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert channel.calls == [3, 2]  # two shards in flight on the one channel


def test_a_name_that_does_not_resolve_still_gets_one_shard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise socket.gaierror("no such name")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    assert resolved_count("nowhere.invalid:5") == 1


def test_connect_source_builds_one_transport_per_address() -> None:
    made: dict[str, FakeReplica] = {}

    def connect(address: str) -> FakeReplica:
        made[address] = FakeReplica(address)
        return made[address]

    assert isinstance(connect_source("a:1", connect, connect), FakeReplica)
    source = connect_source("a:1+b:2", connect, connect)
    assert isinstance(source, ReplicatedReward) and source.address == "a:1+b:2"
    assert [r.address for r in source.replicas] == ["a:1", "b:2"]
    source.close()
    assert made["a:1"].closed and made["b:2"].closed


# --- over gRPC -----------------------------------------------------------------------------


class IndexedRewardService(reward_pb2_grpc.RewardServiceServicer):
    """Scores each sample with its index (its prompt; 0 for the mixer's probe); counts the
    samples of each Score."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def GetInfo(self, request, context):  # noqa: ANN001, ANN201, N802 - gRPC method
        return reward_pb2.RewardInfo(name="indexed")

    def Score(self, request, context):  # noqa: ANN001, ANN201, N802 - gRPC method
        self.calls.append(len(request.samples))
        scores = [float(s.prompt) if s.prompt.isdigit() else 0.0 for s in request.samples]
        return reward_pb2.ScoreResponse(scores=scores)


@pytest.fixture()
def two_services() -> Iterator[list[tuple[IndexedRewardService, GrpcService]]]:
    started = []
    for name in ("reward-a", "reward-b"):
        servicer = IndexedRewardService()
        service = GrpcService(name, ServerConfig(host="127.0.0.1", port=0, grace_s=0))
        service.add(reward_pb2_grpc.add_RewardServiceServicer_to_server, servicer, REWARD_SERVICE)
        service.start()
        service.set_serving()
        started.append((servicer, service))
    yield started
    for _, service in started:
        service.stop(grace_s=0)


def test_a_stopped_replica_leaves_the_batch_to_the_other(
    two_services: list[tuple[IndexedRewardService, GrpcService]],
) -> None:
    (up, _), (_, down) = two_services
    address = "+".join(f"127.0.0.1:{service.port}" for _, service in two_services)
    mixer = RewardMixer(lambda a: connect_reward(a))
    [spec], _ = mixer.set_endpoints([EndpointSpec.parse(f"rm@{address}")])
    down.stop(grace_s=0)
    up.calls.clear()
    total, per_source = mixer.score(*_batch(6))
    assert total == [float(i) for i in range(6)] and list(per_source) == ["rm"]
    assert up.calls == [3, 3]  # its own shard, then the stopped one's
    mixer.close()


def test_round_robin_spreads_one_calls_shards_over_both_servers(
    two_services: list[tuple[IndexedRewardService, GrpcService]],
) -> None:
    # The ipv4: target lists both servers: the same balanced channel a dns:/// name resolving
    # to both would give, without DNS. Not loopback by rlhf.tls's reading: plaintext allowed.
    target = "ipv4:" + ",".join(f"127.0.0.1:{service.port}" for _, service in two_services)
    plaintext = ClientConfig(tls=TlsConfig(allow_plaintext=True))
    source = BalancedReward(GrpcReward(target, plaintext, balanced=True), lambda: 2)
    try:
        assert source.name() == "indexed"
        counters = [servicer.calls for servicer, _ in two_services]
        reached_both = False
        for _ in range(20):  # until round_robin has both connections READY
            for calls in counters:
                calls.clear()
            assert source.score(*_batch(4)) == [0.0, 1.0, 2.0, 3.0]
            if all(calls == [2] for calls in counters):
                reached_both = True
                break
            assert sorted(c for calls in counters for c in calls) == [2, 2]
        assert reached_both, f"no call reached both servers: {counters}"
    finally:
        source.close()


def test_a_dns_name_reaches_its_service_through_the_mixer(
    two_services: list[tuple[IndexedRewardService, GrpcService]],
) -> None:
    servicer, service = two_services[0]
    mixer = RewardMixer(lambda a: connect_reward(a))
    [spec], _ = mixer.set_endpoints([EndpointSpec.parse(f"dns:///localhost:{service.port}")])
    assert spec.name == "indexed"
    servicer.calls.clear()
    assert mixer.score(*_batch(5))[0] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert sum(servicer.calls) == 5
    mixer.close()


# --- through the trainer service -----------------------------------------------------------


class GatedPolicy(LocalPolicy):
    """A policy whose first Generate waits until `release` is set (`generating` says it is)."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.generating = threading.Event()
        self.release = threading.Event()

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        self.generating.set()
        assert self.release.wait(60), "the test never released the gate"
        return super().generate(prompts, gen, seed)


def _local_replicas(scored: dict[str, int]) -> Callable[[str, object], object]:
    """Transports.reward: replicas in this process, counting the samples each scored."""

    def one(address: str) -> LocalReward:
        reward = LocalReward(VaderBackend(), address=address)
        score = reward.score

        def counted(prompts: list[str], responses: list[str]) -> list[float]:
            scored[address] = scored.get(address, 0) + len(prompts)
            return score(prompts, responses)

        reward.score = counted  # type: ignore[method-assign]
        return reward

    return lambda address, limits: connect_source(address, one, one)


def test_a_replicated_source_is_one_entry_and_one_statistic(tiny_lm: Path, tmp_path: Path) -> None:
    scored: dict[str, int] = {}
    policy = GatedPolicy(str(tiny_lm))
    servicer = TrainerServicer(
        TrainerServiceConfig(
            policy="local:1",
            reward=["local:2+local:3"],
            output_dir=str(tmp_path),
            model_root=[str(tiny_lm)],
        ),
        Transports(policy=lambda address, limits: policy, reward=_local_replicas(scored)),
    )
    service = GrpcService("trainer", open_config(grace_s=0))
    service.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer, "trainer")
    service.start()
    service.set_serving()
    client = TrainerClient(f"127.0.0.1:{service.port}")
    try:
        client.start(start_request(str(tiny_lm), "replicas", steps=2))
        assert policy.generating.wait(60)
        swapped = client.swap("replicas", ["rm@local:3+local:2=0.5"])
        assert [(r.name, r.address, r.weight) for r in swapped.rewards] == [
            ("rm", "local:3+local:2", 0.5)
        ]
        policy.release.set()
        assert list(client.watch("replicas"))[-1].state == trainer_pb2.RUN_STATE_COMPLETED
        status = client.get("replicas")
        assert [(r.name, r.address) for r in status.rewards] == [("rm", "local:3+local:2")]
        assert [k for k in status.last_metrics if k.startswith("env/reward/")] == ["env/reward/rm"]
        assert scored.get("local:2", 0) > 1 and scored.get("local:3", 0) > 1  # both replicas
    finally:
        policy.release.set()
        client.close()
        for run in servicer.runs.values():
            if run.thread is not None:
                run.thread.join(60)
        service.stop(grace_s=0)


def test_two_reward_processes_score_as_one_and_survive_one_killed(tmp_path: Path) -> None:
    """A real `rlhf reward serve` pair behind one spec: the same scores, in the same order, as
    one of them alone; SIGKILL one and the next batch is scored by the other."""
    args = ["reward", "serve", "--backend", "length", "--name", "len", "--target-length", "20"]
    pair = [start_service(f"reward-{k}", args, tmp_path / "logs") for k in "ab"]
    mixer = RewardMixer(lambda a: connect_reward(a))
    alone = GrpcReward(pair[0].address)
    try:
        [spec], _ = mixer.set_endpoints([EndpointSpec.parse("+".join(s.address for s in pair))])
        assert spec.name == "len"
        prompts = [f"prompt {i}" for i in range(7)]
        responses = [" ".join(["word"] * i) for i in range(7)]  # a different score each
        expected = alone.score(prompts, responses)
        assert len(set(expected)) == 7
        assert mixer.score(prompts, responses)[0] == expected
        pair[1].process.kill()
        pair[1].process.wait()
        assert mixer.score(prompts, responses)[0] == expected
    finally:
        alone.close()
        mixer.close()
        for service in pair:
            service.stop(5)


def test_derived_names_parse_back_however_long_the_addresses() -> None:
    hosts = "+".join(f"reward-{i}.reward.rlhf.svc.cluster.local:50052" for i in range(3))
    specs = [EndpointSpec.parse(hosts), EndpointSpec.parse(f"dns:///{hosts.split('+')[0]}")]
    mixer = RewardMixer(lambda a: FakeReplica(a, name="same name"))
    for source in mixer.probe(specs):  # the same service name: told apart by address
        assert source.name.startswith("same_name@reward-0.reward")
        assert EndpointSpec.parse(str(source.spec)) == source.spec


def test_a_dns_source_checks_tls_against_its_host_not_the_address_reached(
    tmp_path: Path,
) -> None:
    """The reward service's certificate names "localhost" but not 127.0.0.1: through
    dns:///localhost:P the balanced channel (which connects to 127.0.0.1) is accepted; the
    same server by its IP is refused, so the name checked was HOST's."""
    make_certs(tmp_path, ["reward"], ["admin"], ["localhost"])
    pem = {n: (str(tmp_path / f"{n}.pem"), str(tmp_path / f"{n}.key")) for n in ("reward", "admin")}
    ca = str(tmp_path / "ca.pem")
    tls = TlsConfig(tls_cert=pem["reward"][0], tls_key=pem["reward"][1], tls_ca=ca)
    service = GrpcService("tls-reward", ServerConfig(host="127.0.0.1", port=0, grace_s=0, tls=tls))
    service.add(
        reward_pb2_grpc.add_RewardServiceServicer_to_server, IndexedRewardService(), REWARD_SERVICE
    )
    service.start()
    service.set_serving()
    client = ClientConfig(
        tls=TlsConfig(tls_cert=pem["admin"][0], tls_key=pem["admin"][1], tls_ca=ca)
    )
    by_name = connect_reward(f"dns:///localhost:{service.port}", client)
    by_ip = connect_reward(f"127.0.0.1:{service.port}", client)
    try:
        assert by_name.name() == "indexed"
        assert by_name.score(*_batch(3)) == [0.0, 1.0, 2.0]
        with pytest.raises(TransientError):  # the handshake fails: no 127.0.0.1 in the cert
            by_ip.name()
    finally:
        by_name.close()
        by_ip.close()
        service.stop(grace_s=0)
