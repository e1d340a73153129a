"""The policy pool (issue #16): several policy services that the loop and WeightSync see as one.

Fakes (FakeReplica) tag each completion with its prompt and replica and record every call, so
order, seeds, who generated what and which pushes carried everything can be asserted. Real
engines and services: test_policy_pool_services.py."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch

from rlhf.errors import RpcError
from services.trainer.api.inputs import InputRules, apply_rules
from services.trainer.config import (
    GenerationConfig,
    TrainConfig,
    TrainerServiceConfig,
    load_train_config,
)
from services.trainer.orchestrator.fanout import resolve
from services.trainer.orchestrator.peers import (
    FatalError,
    ModelFacts,
    PolicyFacts,
    Pushed,
    Rollout,
    TransientError,
    VersionConflict,
)
from services.trainer.orchestrator.policy_endpoints import PolicyEndpoints
from services.trainer.orchestrator.policy_pool import PolicyPool
from services.trainer.orchestrator.transports import GrpcPolicy, connect_policy

MODEL = ModelFacts("tiny", 1000, 64, 2, 2)
GEN = GenerationConfig()
PARTIAL = {"lora": torch.zeros(1)}
FULL = {"lora": torch.zeros(1), "base": torch.zeros(1)}


class FakeReplica:
    """A policy service in miniature: an instance id, a served version, a call log."""

    def __init__(self, name: str) -> None:
        self.address = name
        self.instance = uuid.uuid4().hex
        self.version = 0
        self.calls: list[tuple] = []
        """("generate", prompts, seed) and ("push", version, "full" | "partial"), in order."""
        self.down = False
        self.answer_version: int | None = None
        """Generate answers at this version instead of the served one (a lagging replica)."""
        self.before_answer: threading.Event | None = None

    def restart(self) -> None:
        self.instance, self.version = uuid.uuid4().hex, 0

    def facts(self, fresh: bool = False) -> PolicyFacts:
        if self.down:
            raise TransientError(f"GetInfo on {self.address} failed: UNAVAILABLE", self.address)
        return PolicyFacts(MODEL, self.version, torch.float32, self.instance)

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        self.calls.append(("generate", list(prompts), seed))
        if self.down:
            raise TransientError(f"Generate on {self.address} failed: UNAVAILABLE", self.address)
        if self.before_answer is not None:
            assert self.before_answer.wait(10)
        version = self.answer_version if self.answer_version is not None else self.version
        return Rollout(
            query_ids=[[len(p)] for p in prompts],
            response_ids=[[1, 2] for _ in prompts],
            response_logprobs=[[-0.5, -0.5] for _ in prompts],
            response_texts=[f"{p}|{self.address}" for p in prompts],
            weight_version=version,
            instance_id=self.instance,
        )

    def push_weights(
        self,
        tensors: Mapping[str, torch.Tensor],
        version: int,
        full: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ) -> Pushed:
        self.calls.append(("push", version, "full" if len(tensors) == len(FULL) else "partial"))
        if self.down:
            raise TransientError(f"UpdateWeights on {self.address}: UNAVAILABLE", self.address)
        if version <= self.version:
            raise VersionConflict(f"{self.address} serves {self.version}", self.address)
        self.version = version
        return Pushed(version, self.instance)

    def close(self) -> None:
        pass


def _pool(count: int) -> tuple[PolicyPool, list[FakeReplica]]:
    fakes = {f"r{i}:1": FakeReplica(f"r{i}:1") for i in range(count)}
    pool = PolicyPool(PolicyEndpoints.parse(",".join(fakes)), fakes.__getitem__)
    return pool, list(fakes.values())


def _push(pool: PolicyPool, version: int) -> Pushed:
    """A step's push: the changed weights, everything on demand (as WeightSync does)."""
    return pool.push_weights(PARTIAL, version, full=lambda: FULL)


# --- splitting and reassembly --------------------------------------------------------------------
@pytest.mark.parametrize(("replicas", "sizes"), [(2, [3, 2]), (3, [2, 2, 1])])
def test_shards_are_contiguous_even_and_reassembled_in_prompt_order(
    replicas: int, sizes: list[int]
) -> None:
    """5 prompts over 2 and 3 replicas; the first replica answers last (it waits for the
    others), so an assembly in completion order would put its samples at the end."""
    pool, fakes = _pool(replicas)
    pool.facts()
    last_done = threading.Event()
    fakes[0].before_answer = last_done
    original = fakes[-1].generate

    def generate_then_release(prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        try:
            return original(prompts, gen, seed)
        finally:
            last_done.set()

    fakes[-1].generate = generate_then_release  # type: ignore[method-assign]
    prompts = [f"p{i}" for i in range(5)]
    rollout = pool.generate(prompts, GEN, seed=100)
    assert [t.split("|")[0] for t in rollout.response_texts] == prompts
    assert [q[0] for q in rollout.query_ids] == [len(p) for p in prompts]
    offsets = [sum(sizes[:i]) for i in range(replicas)]
    for fake, size, offset in zip(fakes, sizes, offsets):
        assert fake.calls == [("generate", prompts[offset : offset + size], 100 + offset)]
        assert sum(t.endswith(fake.address) for t in rollout.response_texts) == size
    assert rollout.weight_version == 0 and rollout.instance_id == pool.facts().instance_id
    assert pool.last_replicas == replicas


def test_fewer_prompts_than_replicas_use_the_first_replicas() -> None:
    pool, fakes = _pool(3)
    pool.facts()
    rollout = pool.generate(["a", "b"], GEN, seed=7)
    assert rollout.response_texts == ["a|r0:1", "b|r1:1"] and fakes[2].calls == []


def test_a_shard_with_a_wrong_count_fails_naming_the_replica() -> None:
    pool, fakes = _pool(2)
    pool.facts()
    real = fakes[1].generate
    fakes[1].generate = lambda p, g, s: real(p[:-1], g, s)  # type: ignore[method-assign]
    with pytest.raises(FatalError, match="Generate on r1:1 returned 1 completions for 2"):
        pool.generate(["a", "b", "c", "d"], GEN, seed=0)


# --- restarts, versions, unreachable replicas ----------------------------------------------------
def test_a_restarted_replica_is_left_out_then_gets_everything_before_it_generates() -> None:
    pool, (a, b) = _pool(2)
    virtual = pool.facts().instance_id
    assert _push(pool, 1) == Pushed(1, virtual)
    b.restart()  # a new instance at version 0: base weights
    prompts = ["p0", "p1", "p2", "p3"]
    rollout = pool.generate(prompts, GEN, seed=10)
    # Its shard was redone on the other replica, with the same seed.
    assert rollout.response_texts == [f"{p}|r0:1" for p in prompts]
    assert rollout.weight_version == 1 and rollout.instance_id == virtual
    assert b.calls[-1] == ("generate", ["p2", "p3"], 12)
    assert a.calls[-2:] == [("generate", ["p0", "p1"], 10), ("generate", ["p2", "p3"], 12)]
    assert pool.states() == {"r0:1": "ready", "r1:1": "needs-weights"}
    b_calls = len(b.calls)
    pool.generate(prompts, GEN, seed=20)
    assert len(b.calls) == b_calls  # not used while it lacks the weights
    assert _push(pool, 2) == Pushed(2, virtual)
    pool.generate(prompts, GEN, seed=30)
    assert a.calls[-2] == ("push", 2, "partial")
    assert b.calls[b_calls:] == [("push", 2, "full"), ("generate", ["p2", "p3"], 32)]
    assert pool.states() == {"r0:1": "ready", "r1:1": "ready"}


def test_an_unreachable_replica_is_left_out_and_gets_everything_when_back() -> None:
    pool, (a, b) = _pool(2)
    pool.facts()
    _push(pool, 1)
    b.down = True
    rollout = pool.generate(["x", "y"], GEN, seed=0)
    assert rollout.response_texts == ["x|r0:1", "y|r0:1"]
    assert _push(pool, 2).version == 2  # one replica took it: the push succeeded
    assert b.calls[-1] == ("push", 2, "full") and pool.states()["r1:1"] == "unreachable"
    b.down = False
    _push(pool, 3)
    assert b.calls[-1] == ("push", 3, "full") and a.calls[-1] == ("push", 3, "partial")
    assert pool.generate(["x", "y"], GEN, seed=0).response_texts == ["x|r0:1", "y|r1:1"]


def test_a_step_never_mixes_versions() -> None:
    """A replica answering at another version on its instance (its push was lost): its shard
    is redone on a replica at the pool's version."""
    pool, (a, b, c) = _pool(3)
    pool.facts()
    _push(pool, 1)
    c.answer_version = 0
    rollout = pool.generate(["p0", "p1", "p2"], GEN, seed=0)
    assert rollout.weight_version == 1
    assert rollout.response_texts == ["p0|r0:1", "p1|r1:1", "p2|r0:1"]
    assert pool.states()["r2:1"] == "needs-weights"
    c.answer_version = None
    c.version = 0  # what it really serves
    _push(pool, 2)
    assert c.calls[-1] == ("push", 2, "full")


def test_another_writer_on_a_replica_fails_naming_it() -> None:
    pool, (a, b) = _pool(2)
    pool.facts()
    _push(pool, 1)
    b.version = 9  # somebody else pushed to the instance this run pushes to
    with pytest.raises(FatalError, match="replica r1:1 serves weight version 9.*another writer"):
        pool.generate(["a", "b"], GEN, seed=0)


def test_when_no_replica_is_ready_the_pool_is_a_restarted_policy() -> None:
    """All replicas restarted: Generate answers under a new instance id (WeightSync re-pushes,
    in full); none reachable: TransientError (the loop retries)."""
    pool, (a, b) = _pool(2)
    virtual = pool.facts().instance_id
    _push(pool, 1)
    a.restart()
    b.restart()
    seen = pool.generate(["a", "b"], GEN, seed=0)
    assert seen.instance_id != virtual and seen.response_texts == []
    facts = pool.facts(fresh=True)
    assert (facts.instance_id, facts.weight_version) == (seen.instance_id, 0)
    assert _push(pool, 1) == Pushed(1, facts.instance_id)  # WeightSync's resync: same version
    assert a.calls[-1] == b.calls[-1] == ("push", 1, "full")
    a.down = b.down = True
    with pytest.raises(TransientError, match="no replica"):
        pool.generate(["a", "b"], GEN, seed=0)


def test_push_outcomes_none_took_it() -> None:
    pool, (a, b) = _pool(2)
    pool.facts()
    a.down = b.down = True
    with pytest.raises(TransientError, match="no replica took the push"):
        _push(pool, 1)
    a.down = b.down = False
    a.restart()
    b.restart()
    a.version = b.version = 5  # new instances already at a higher version: renumber
    with pytest.raises(VersionConflict):
        _push(pool, 2)
    assert pool.facts(fresh=True).weight_version == 5


def test_replicas_serving_different_versions_at_start_are_not_ready() -> None:
    pool, (a, b) = _pool(2)
    b.version = 4
    facts = pool.facts()
    assert facts.weight_version == 4 and set(pool.states().values()) == {"needs-weights"}
    _push(pool, 5)  # WeightSync's first push: everything
    assert a.calls == b.calls == [("push", 5, "full")]


def test_replicas_must_serve_the_same_model() -> None:
    pool, (a, b) = _pool(2)
    b.facts = lambda fresh=False: PolicyFacts(  # type: ignore[method-assign]
        ModelFacts("other", 5, 64, 2, 2), 0, torch.float32, b.instance
    )
    with pytest.raises(FatalError, match="replicas r0:1 and r1:1 serve different models"):
        pool.facts()


def test_a_dns_name_is_resolved_again_at_each_push(caplog: pytest.LogCaptureFixture) -> None:
    fakes = {a: FakeReplica(a) for a in ("10.0.0.1:5", "10.0.0.2:5", "10.0.0.3:5")}
    answer = ["10.0.0.1:5", "10.0.0.2:5"]
    pool = PolicyPool(PolicyEndpoints.parse("dns:///policy:5"), fakes.__getitem__, lambda t: answer)
    assert pool.address == "policy pool dns:///policy:5"
    pool.facts()
    answer = ["10.0.0.2:5", "10.0.0.3:5"]  # one scaled away, one added
    with caplog.at_level(logging.INFO, logger="rlhf.trainer.pool"):
        _push(pool, 1)
    assert fakes["10.0.0.3:5"].calls == [("push", 1, "full")]
    assert fakes["10.0.0.1:5"].calls == [] and list(pool.states()) == answer
    messages = [r.getMessage() for r in caplog.records]
    assert "policy replica joined" in messages and "policy replica left" in messages
    assert "policy replica admitted" in messages  # the new one, once it had the weights
    assert "policy replica re-admitted" not in messages


# --- the spec, connect_policy, the allow-list ----------------------------------------------------
def test_policy_specs() -> None:
    assert PolicyEndpoints.parse("a:1").allowed == ["a:1"]
    assert not PolicyEndpoints.parse("a:1").pooled
    assert PolicyEndpoints.parse("a:1,b:2").allowed == ["a:1", "b:2"]
    spec = PolicyEndpoints.parse("dns:///policy.ns.svc:50051")
    assert spec.pooled and spec.allowed == ["policy.ns.svc:50051"]
    assert str(spec) == "dns:///policy.ns.svc:50051"
    for bad in ("a", "a:1,", "a:1,a:1", "dns:///a", "a:99999", "a b:1"):
        with pytest.raises(ValueError, match="policy"):
            PolicyEndpoints.parse(bad)
    assert "127.0.0.1:7" in resolve("localhost:7")


def test_connect_policy_builds_one_service_or_a_pool() -> None:
    single = connect_policy("127.0.0.1:1")
    pool = connect_policy("127.0.0.1:1,127.0.0.1:2")
    try:
        assert isinstance(single, GrpcPolicy) and isinstance(pool, PolicyPool)
        assert pool.address == "policy pool 127.0.0.1:1,127.0.0.1:2"
    finally:
        single.close()
        pool.close()
    with pytest.raises(FatalError, match="expected HOST:PORT"):
        connect_policy("nowhere")


def test_the_allow_list_checks_every_replica(tmp_path: Path) -> None:
    """The trainer's own --policy list allows each of its addresses; a run's policy spec is
    checked address by address (a dns:/// spec: its HOST:PORT)."""
    rules = InputRules(
        TrainerServiceConfig(policy="a:1,b:2", allowed_endpoints=["p:5"], output_dir=str(tmp_path))
    )

    def run_config(policy: str) -> TrainConfig:
        return load_train_config(None, [f"run.policy={policy}", "run.run_id=r"])

    for allowed in ("b:2", "a:1,b:2", "b:2,p:5", "dns:///p:5"):
        apply_rules(rules, run_config(allowed))
    for denied, code in (("a:1,c:3", "PERMISSION_DENIED"), ("dns:///c:5", "PERMISSION_DENIED")):
        with pytest.raises(RpcError) as refused:
            apply_rules(rules, run_config(denied))
        assert refused.value.code.name == code and "c:" in str(refused.value)
    with pytest.raises(RpcError, match="run.policy: policy address ''"):
        apply_rules(rules, run_config("a:1,,b:2"))
