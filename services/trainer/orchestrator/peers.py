"""What the loop knows of its peers (the policy service, the reward sources), without gRPC.

The transports (transports.py over gRPC, bench/local_transports.py in one process) implement
these protocols and raise only these errors, so the loop never sees a wire status:
  TransientError  the peer could not be reached or did not answer in time; the same call may
                  succeed later (the loop retries it, with backoff);
  FatalError      the peer answered, and refused or failed the call; the same call would fail
                  again, so the step fails at once with the peer's own message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rlhf.models import parse_dtype
from services.trainer.config import GenerationConfig


class PeerError(RuntimeError):
    """A call to a peer failed. The message names the peer and quotes the peer's own words."""

    def __init__(self, message: str, peer: str = "") -> None:
        super().__init__(message)
        self.peer = peer
        """The peer's address (or an in-process name)."""


class TransientError(PeerError):
    """Unreachable or too slow (gRPC UNAVAILABLE, DEADLINE_EXCEEDED): worth another try."""


class FatalError(PeerError):
    """Refused or failed by the peer (any other status, or an unusable answer): not retried."""


class VersionConflict(FatalError):
    """The policy service already serves this weight version or a newer one."""


@dataclass(frozen=True)
class ModelFacts:
    """What identifies a model for the model check at run start."""

    name: str
    """As the side names it: a folder, a hub name or the default alias."""
    num_parameters: int
    """Parameters of the causal LM, tied weights counted once."""
    vocab_size: int
    """len(tokenizer), added tokens included."""
    eos_token_id: int
    pad_token_id: int
    """The EOS id when the tokenizer has no pad token."""


@dataclass(frozen=True)
class PolicyFacts:
    """The policy service's GetInfo, as the loop needs it."""

    model: ModelFacts
    weight_version: int
    """The weight version served when the facts were read."""
    dtype: torch.dtype
    """The served weights' dtype: pushed weights are cast to it."""
    instance_id: str = ""
    """The policy service's instance (new on every start of it); empty from a service that
    does not report one."""


def policy_facts(info: Any) -> PolicyFacts:
    """PolicyFacts from a PolicyInfo message or the engine's EngineInfo (same field names)."""
    tok = info.tokenizer
    model = ModelFacts(
        name=info.model,
        num_parameters=int(info.num_parameters),
        vocab_size=int(tok.vocab_size),
        eos_token_id=int(tok.eos_token_id),
        pad_token_id=int(tok.pad_token_id),
    )
    return PolicyFacts(
        model, int(info.weight_version), parse_dtype(info.dtype), str(info.instance_id)
    )


@dataclass
class Rollout:
    """One batch of generations, as the PPO step needs them."""

    query_ids: list[list[int]]
    response_ids: list[list[int]]
    response_logprobs: list[list[float]]
    """The policy service's log-probability of each sampled token (one per response token)."""
    response_texts: list[str]
    weight_version: int
    """The weight version that produced every response."""
    instance_id: str = ""
    """The policy instance that produced them (PolicyFacts.instance_id)."""


@dataclass(frozen=True)
class Pushed:
    """What a weight push left served."""

    version: int
    """The version served after the push."""
    instance_id: str
    """The policy instance that took the push (PolicyFacts.instance_id)."""


def checked_rollout(rollout: Rollout, size: int, peer: str) -> Rollout:
    """`rollout` if it keeps the contract for `size` prompts (a completion per prompt, one
    log-prob per response token), else FatalError naming `peer`."""
    if len(rollout.response_ids) != size or len(rollout.response_logprobs) != size:
        raise FatalError(
            f"Generate on {peer} returned {len(rollout.response_ids)} completions for {size} "
            "prompts",
            peer,
        )
    for i, (ids, logprobs) in enumerate(zip(rollout.response_ids, rollout.response_logprobs)):
        if len(ids) != len(logprobs):
            raise FatalError(
                f"Generate on {peer}: completion {i} has {len(ids)} tokens but {len(logprobs)} "
                "log-probs (the contract: one per token)",
                peer,
            )
    return rollout


class PolicyTransport(Protocol):
    """How the loop reaches the policy: facts, sampling, weight sync."""

    address: str
    """Where the policy is (for messages)."""

    def facts(self, fresh: bool = False) -> PolicyFacts:
        """Read once per connection; `fresh` reads them again (for the served version)."""
        ...

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout: ...

    def push_weights(
        self,
        tensors: Mapping[str, torch.Tensor],
        version: int,
        full: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ) -> Pushed:
        """Makes `version` the served weights; says what is served after, and by whom.
        `full()`: all the weights of `version`, when `tensors` holds only the changed ones (a
        pool sends them to a replica that does not hold this run's weights); one service
        ignores it (WeightSync sends it everything when it restarted)."""
        ...

    def close(self) -> None: ...


class RewardTransport(Protocol):
    """How the loop reaches one reward source."""

    address: str

    def name(self) -> str: ...

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...

    def close(self) -> None: ...
