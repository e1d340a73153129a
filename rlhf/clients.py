"""Typed clients of the policy and reward services: one channel each (TLS and token per a
ClientConfig, rlhf.channels), a deadline on every call (rlhf.call_limits), and a watch on the
peer's health while a call waits (rlhf.watched_call), so a hung peer fails a call in seconds.

Nothing here retries (rlhf.channels): a failed call raises grpc.RpcError with the server's
status and message, and the caller decides (the trainer's transports translate it into
transient or fatal errors for the loop's one retry layer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from rlhf.call_limits import CallLimits
from rlhf.channels import open_channel, wait_until_serving
from rlhf.config.security import ClientConfig
from rlhf.protocol import POLICY_SERVICE, REWARD_SERVICE
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from rlhf.watched_call import wait_watched
from rlhf.weights import CHUNK_BYTES, encode_weight_frames


class PolicyClient:
    def __init__(
        self, address: str, limits: CallLimits | None = None, client: ClientConfig | None = None
    ) -> None:
        self.address = address
        self.limits = limits or CallLimits()
        self.channel = open_channel(address, client)
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        # UpdateWeights fed with encode_weight_frames' ready-serialized chunks (same wire bytes
        # as stub.UpdateWeights with WeightChunk messages, two copies fewer per payload byte).
        self._update_frames = self.channel.stream_unary(
            f"/{POLICY_SERVICE}/UpdateWeights",
            request_serializer=None,
            response_deserializer=policy_pb2.UpdateWeightsResponse.FromString,
        )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        wait_until_serving(self.channel, POLICY_SERVICE, timeout_s)

    def _wait(self, call: Any) -> Any:
        return wait_watched(call, self.channel, POLICY_SERVICE, self.limits)

    def info(self) -> policy_pb2.PolicyInfo:
        request = common_pb2.GetInfoRequest()
        return self._wait(self.stub.GetInfo.future(request, timeout=self.limits.info_s))

    def generate(
        self,
        prompts: Iterable[str],
        params: policy_pb2.GenerationParams,
        request_id: str = "",
    ) -> policy_pb2.GenerateResponse:
        request = policy_pb2.GenerateRequest(
            prompts=list(prompts), params=params, request_id=request_id
        )
        return self._wait(self.stub.Generate.future(request, timeout=self.limits.generate_s))

    def update_weights(
        self,
        tensors: Mapping[str, torch.Tensor],
        version: int,
        dtype: torch.dtype | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> policy_pb2.UpdateWeightsResponse:
        frames = encode_weight_frames(tensors, version, chunk_bytes=chunk_bytes, dtype=dtype)
        return self._wait(self._update_frames.future(frames, timeout=self.limits.update_weights_s))

    def close(self) -> None:
        self.channel.close()


class RewardClient:
    def __init__(
        self,
        address: str,
        limits: CallLimits | None = None,
        client: ClientConfig | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`options`: further channel options (rlhf.channels.open_channel)."""
        self.address = address
        self.limits = limits or CallLimits()
        self.channel = open_channel(address, client, options)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.max_samples_per_call = 0
        """Samples per Score call, from info(); 0 until info() has been called: one call."""
        self.max_chars_per_call = 0
        """Characters (prompts + responses) per Score call, from info(); 0: no limit known."""

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        wait_until_serving(self.channel, REWARD_SERVICE, timeout_s)

    def _wait(self, call: Any) -> Any:
        return wait_watched(call, self.channel, REWARD_SERVICE, self.limits)

    def info(self) -> reward_pb2.RewardInfo:
        """The service's RewardInfo; also remembers its max_samples_per_request for score()."""
        request = common_pb2.GetInfoRequest()
        info = self._wait(self.stub.GetInfo.future(request, timeout=self.limits.info_s))
        self.max_samples_per_call = info.max_samples_per_request
        self.max_chars_per_call = info.max_total_chars
        return info

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One score per (prompt, response), in order. A batch larger than the service's
        max_samples_per_request or max_total_chars (known once info() was called) goes as
        several calls, one after another, so a trainer's batch is never bound by a reward
        service's limits."""
        samples = [reward_pb2.Sample(prompt=p, response=r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for group in _groups(samples, self.max_samples_per_call, self.max_chars_per_call):
            request = reward_pb2.ScoreRequest(samples=group)
            call = self.stub.Score.future(request, timeout=self.limits.score_s)
            scores.extend(self._wait(call).scores)
        return scores

    def close(self) -> None:
        self.channel.close()


def _groups(
    samples: list[reward_pb2.Sample], max_samples: int, max_chars: int
) -> list[list[reward_pb2.Sample]]:
    """`samples` in order, cut into groups of at most `max_samples` samples and `max_chars`
    characters (0: no limit). A sample over `max_chars` alone goes alone (the service says why
    it refuses it)."""
    groups: list[list[reward_pb2.Sample]] = []
    group: list[reward_pb2.Sample] = []
    chars = 0
    for sample in samples:
        size = len(sample.prompt) + len(sample.response)
        full = (max_samples and len(group) >= max_samples) or (
            max_chars and chars + size > max_chars
        )
        if group and full:
            groups.append(group)
            group, chars = [], 0
        group.append(sample)
        chars += size
    return [*groups, group] if group else groups
