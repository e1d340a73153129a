"""The loop's peers over gRPC: the only module of the orchestrator that knows the wire.

`GrpcPolicy` / `GrpcReward` implement the protocols of peers.py and translate every failed call
into TransientError (UNAVAILABLE, DEADLINE_EXCEEDED) or FatalError (any other status), with a
message that names the peer and quotes its own status message. They do not retry: the loop's
retry with backoff is the one retry layer. Each call runs under the run's CallLimits (its
phase's deadline, and a watch on the peer's health while it waits: a hung peer fails the call
as UNAVAILABLE in seconds, rlhf.watched_call). The benchmark's in-process twins live in
bench/local_transports.py.

Every channel is opened per a ClientConfig (TLS, bearer token): the one passed in, else the
process's outbound identity that `rlhf trainer serve` sets once with `set_outbound` (the
trainer's own certificate, which the policy service allows to UpdateWeights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

import grpc
import torch

from rlhf.call_limits import CallLimits
from rlhf.channels import ROUND_ROBIN_OPTION
from rlhf.clients import PolicyClient, RewardClient
from rlhf.config.security import ClientConfig
from rlhf.tls import address_host
from rlhf.v1 import policy_pb2
from services.trainer.config import GenerationConfig
from services.trainer.orchestrator.fanout import split_host_port
from services.trainer.orchestrator.peers import (
    FatalError,
    PeerError,
    PolicyFacts,
    PolicyTransport,
    Pushed,
    RewardTransport,
    Rollout,
    TransientError,
    VersionConflict,
    checked_rollout,
    policy_facts,
)
from services.trainer.orchestrator.policy_endpoints import PolicyEndpoints
from services.trainer.orchestrator.policy_pool import PolicyPool
from services.trainer.orchestrator.reward_replicas import connect_source
from services.trainer.orchestrator.rewards import EndpointSpec, RewardMixer

TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
"""Statuses that say the peer was not reached or did not answer in time."""

_outbound = ClientConfig()
"""TLS and token of this process's channels to its peers when a transport is given none."""


def set_outbound(client: ClientConfig) -> None:
    """Sets the process's outbound TLS and token (once, at start: `rlhf trainer serve`)."""
    global _outbound
    _outbound = client


def _client_config(client: ClientConfig | None) -> ClientConfig:
    return client if client is not None else _outbound


@contextmanager
def _connecting(peer: str) -> Iterator[None]:
    """TLS or token settings that cannot reach `peer` (a missing file, plaintext off loopback)
    fail the run with their own message, like a peer that refuses."""
    try:
        yield
    except ValueError as err:  # TlsConfigError, AuthConfigError
        raise FatalError(f"cannot connect to {peer}: {err}", peer) from None


def generation_params(gen: GenerationConfig, seed: int) -> policy_pb2.GenerationParams:
    """The run's generation settings as the wire's GenerationParams (the one mapping)."""
    return policy_pb2.GenerationParams(
        max_new_tokens=gen.max_new_tokens,
        min_new_tokens=gen.min_new_tokens,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        do_sample=gen.do_sample,
        seed=seed,
        apply_chat_template=gen.apply_chat_template,
    )


def translate(
    err: grpc.RpcError,
    peer: str,
    call: str,
    special: Mapping[grpc.StatusCode, type[FatalError]] | None = None,
) -> PeerError:
    """A failed call as a transport-neutral error: `call` on `peer`, the status, its message.

    `special` maps a status to a narrower FatalError for the caller to act on.
    """
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    message = f"{call} on {peer} failed: {code.name}: {details}"
    if code in TRANSIENT:
        return TransientError(message, peer)
    return (special or {}).get(code, FatalError)(message, peer)


@contextmanager
def _calling(
    peer: str, call: str, special: Mapping[grpc.StatusCode, type[FatalError]] | None = None
) -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as err:
        raise translate(err, peer, call, special) from None


class GrpcPolicy:
    """The policy service; its facts are read once per connection."""

    def __init__(
        self, address: str, client: ClientConfig | None = None, limits: CallLimits | None = None
    ) -> None:
        self.address = address
        with _connecting(address):
            self.client = PolicyClient(address, limits, _client_config(client))
        self._facts: PolicyFacts | None = None

    def facts(self, fresh: bool = False) -> PolicyFacts:
        if self._facts is None or fresh:
            with _calling(self.address, "GetInfo"):
                self._facts = policy_facts(self.client.info())
        return self._facts

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        with _calling(self.address, "Generate"):
            reply = self.client.generate(prompts, generation_params(gen, seed))
        rollout = Rollout(
            query_ids=[list(c.prompt_token_ids) for c in reply.completions],
            response_ids=[list(c.response_token_ids) for c in reply.completions],
            response_logprobs=[list(c.response_logprobs) for c in reply.completions],
            response_texts=[c.response_text for c in reply.completions],
            weight_version=reply.weight_version,
            instance_id=reply.instance_id,
        )
        return checked_rollout(rollout, len(prompts), self.address)

    def push_weights(
        self,
        tensors: Mapping[str, torch.Tensor],
        version: int,
        full: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ) -> Pushed:
        dtype = self.facts().dtype
        conflict = {grpc.StatusCode.FAILED_PRECONDITION: VersionConflict}
        with _calling(self.address, "UpdateWeights", conflict):
            reply = self.client.update_weights(tensors, version, dtype=dtype)
        return Pushed(int(reply.version), reply.instance_id)

    def close(self) -> None:
        self.client.close()


class GrpcReward:
    """One reward service, or (`balanced`) one channel over every replica of a dns:/// name."""

    def __init__(
        self,
        address: str,
        client: ClientConfig | None = None,
        limits: CallLimits | None = None,
        balanced: bool = False,
    ) -> None:
        """`balanced`: `address` is dns:///HOST:PORT; gRPC's round_robin spreads the calls
        over HOST's addresses and TLS checks each replica's certificate against HOST."""
        self.address = address
        config = _client_config(client)
        if balanced:
            config = _checked_against(config, address_host(address))
        options = [ROUND_ROBIN_OPTION] if balanced else []
        with _connecting(address):
            self.client = RewardClient(address, limits, config, options)

    def name(self) -> str:
        with _calling(self.address, "GetInfo"):
            return self.client.info().name

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        with _calling(self.address, "Score"):
            return self.client.score(prompts, responses)

    def close(self) -> None:
        self.client.close()


def connect_reward(
    address: str, client: ClientConfig | None = None, limits: CallLimits | None = None
) -> RewardTransport:
    """The gRPC transport of one reward source from its ADDRESSES (EndpointSpec.address): a
    GrpcReward for HOST:PORT, else its replicas (reward_replicas.connect_source). Bad
    ADDRESSES fail like settings that cannot reach it (FatalError)."""
    with _connecting(address):
        return connect_source(
            address,
            lambda one: GrpcReward(one, client, limits),
            lambda target: GrpcReward(target, client, limits, balanced=True),
        )


def connect_rewards(
    specs: list[EndpointSpec], client: ClientConfig | None = None, limits: CallLimits | None = None
) -> RewardMixer:
    """A mixer over gRPC reward sources, each probed first."""
    mixer = RewardMixer(lambda address: connect_reward(address, client, limits))
    mixer.set_endpoints(specs)
    return mixer


def connect_policy(
    spec: str, client: ClientConfig | None = None, limits: CallLimits | None = None
) -> PolicyTransport:
    """The policy of a run.policy spec (policy_pool.PolicyEndpoints): one GrpcPolicy for
    HOST:PORT, else a PolicyPool of GrpcPolicy replicas. A dns:/// spec's replicas are dialled
    by address and their TLS certificates checked against its HOST (unless --tls-server-name
    names another). FatalError for a malformed spec."""
    try:
        endpoints = PolicyEndpoints.parse(spec)
    except ValueError as err:
        raise FatalError(f"cannot connect to the policy: {err}", spec) from None
    if not endpoints.pooled:
        return GrpcPolicy(endpoints.addresses[0], client, limits)
    config = _client_config(client)
    if endpoints.dns:
        config = _checked_against(config, split_host_port(endpoints.dns)[0])
    return PolicyPool(endpoints, lambda address: GrpcPolicy(address, config, limits))


def _checked_against(client: ClientConfig, host: str) -> ClientConfig:
    """`client` with TLS checking the servers' certificates against `host`: the replicas of a
    dns:/// name are reached by address. An operator's --tls-server-name wins."""
    if not client.tls.enabled or client.tls.tls_server_name:
        return client
    return replace(client, tls=replace(client.tls, tls_server_name=host))


def served_model_check(address: str, model_name: str, client: ClientConfig | None = None) -> None:
    """StartRun's pre-flight: raises ModelMismatch when the policy at `address` (a spec) serves
    another model than `model_name`. Where a side's facts cannot be had (the service does not
    answer GetInfo, the model folder cannot be read) nothing is judged here: the run itself
    checks again (TrainingLoop, with retries) and fails with that side's own error."""
    from services.trainer.orchestrator.model_check import check_served_model, trainer_model_facts

    try:
        policy = connect_policy(address, client)
    except PeerError:
        return
    try:
        served = policy.facts().model
    except PeerError:
        return
    finally:
        policy.close()
    try:
        trained = trainer_model_facts(model_name)
    except (OSError, ValueError):
        return
    check_served_model(trained, served, address)
