"""Keeping the policy service on this run's weights: version numbers, pushes and their retries,
and the check every Generate answer passes before its samples are used.

The rules (issue #13):
- One version, one set of weights. Versions strictly increase for a run across policy restarts,
  trainer restarts and resumes: before each push the version about to be pushed is written to
  the run folder's high-water file (`weight_version`), and a run's first push numbers above the
  checkpoint's version, that file and whatever the service serves.
- The policy service says which instance answered (a new id on every start of it). Samples
  count only if they come from the instance known to serve this run's version, at that
  version. A new instance, or a lower version, means the service restarted (and serves base
  weights): it gets the full current weights again, under the same version number when they are
  that version's, and the step generates again. The same instance at a higher version means
  somebody else is pushing to it: that, and only that, is "another writer".
- A push that failed transiently may have landed, or the service may have restarted under it:
  every retry reads the facts again, accepts an earlier attempt that landed, and sends the full
  weights to a new instance (a LoRA step's push carries only the adapted layers: right only if
  the restarted service loaded exactly the base this run started from; a full push does not
  depend on what it loaded).
- At run.max_staleness >= 1 the rollout worker's answers pass serves_ours too: no push happens
  while its Generate runs (rollouts.py's ordering rules), so the version served then is the
  one the rules say. A restart found by the worker is repaired by the loop, never by the
  worker: resync() between steps, or after an update, learner_moved() then resync(), which
  sends the learner's current weights, in full, as a new version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch

from rlhf.logs import ContextLogger
from services.trainer.orchestrator.checkpoint import replace_text
from services.trainer.orchestrator.peers import (
    FatalError,
    PolicyFacts,
    PolicyTransport,
    Pushed,
    Rollout,
    VersionConflict,
)

T = TypeVar("T")
Retrying = Callable[[str, Callable[[], T]], T]
"""The loop's one retry layer: (what, call) -> call's result, retrying TransientError."""

HIGH_WATER_FILE = "weight_version"
"""In the run folder: the highest weight version this run ever pushed or tried to push (text)."""


def read_high_water(folder: Path) -> int:
    """The run's highest pushed (or attempted) version; 0 when it never pushed."""
    path = folder / HIGH_WATER_FILE
    if not path.exists():
        return 0
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected a weight version (a whole number), found {text!r}")
    return int(text)


def write_high_water(folder: Path, version: int) -> None:
    """Records `version` atomically, on disk before the push it announces."""
    folder.mkdir(parents=True, exist_ok=True)
    replace_text(folder / HIGH_WATER_FILE, f"{version}\n", durable=True)


class WeightSync:
    """Which weight version this run is at, which policy instance serves it, and the pushes."""

    def __init__(
        self,
        policy: PolicyTransport,
        folder: Path,
        weights: Callable[[bool], Mapping[str, torch.Tensor]],
        retrying: Retrying,
        log: ContextLogger,
    ) -> None:
        """`weights(full)`: the servable weights, all of them or (False) only those training
        changes."""
        self.policy = policy
        self.folder = folder
        self.weights = weights
        self.retrying = retrying
        self.log = log
        self.version = 0
        """The run's weight version: the last one pushed (0: the base model as loaded)."""
        self.instance = ""
        """The policy instance known to serve `version`."""
        self.current = True
        """Whether the learner's weights are still those of `version` (False after an update
        that was not pushed: sync_every > 1)."""
        self._high_water = read_high_water(folder)

    def begin(self, facts: PolicyFacts, resumed: bool) -> None:
        """The run's first contact with the policy (facts: its GetInfo). A fresh run over a
        service that serves the base model as loaded uses it as it is; otherwise the full
        weights go out, numbered above every version the run or the service has used."""
        self.instance = facts.instance_id
        floor = max(self.version, self._high_water, facts.weight_version)
        if resumed or floor != 0:
            self._push("first weight push", floor + 1, full=True, expected=None)

    def learner_moved(self) -> None:
        """An update changed the learner and was not pushed (sync_every > 1)."""
        self.current = False

    def push_step(self, what: str) -> None:
        """The step's sync: the changed weights (all of them with full fine-tuning) as the next
        version."""
        self._push(what, self.version + 1, full=False, expected=self.instance)

    def serves_ours(self, rollout: Rollout) -> bool:
        """Whether `rollout` was sampled from this run's weights. False: the policy restarted
        or lost them (resync(), then generate again); FatalError when another writer is
        pushing to the instance that serves this run."""
        same_instance = rollout.instance_id == self.instance
        if same_instance and rollout.weight_version == self.version:
            return True
        if same_instance and rollout.weight_version > self.version:
            raise self._another_writer(rollout.weight_version)
        return False

    def _another_writer(self, served: int) -> FatalError:
        return FatalError(
            f"the policy service at {self.policy.address} serves weight version {served}, "
            f"expected {self.version}, on the instance this run pushed to "
            f"({self.instance or 'unnamed'}): another writer is updating it",
            self.policy.address,
        )

    def resync(self, what: str, seen: Rollout) -> None:
        """Makes a restarted policy (seen: its answer) serve this run's weights again."""
        facts = self.retrying(what, lambda: self.policy.facts(fresh=True))
        served = facts.weight_version
        if facts.instance_id == self.instance and served > self.version:
            raise self._another_writer(served)
        if facts.instance_id == self.instance and served == self.version:
            return  # served again by the time we looked: generate again
        self.log.warning(
            "the policy service restarted or lost this run's weights: pushing them again",
            extra={
                "old_instance": self.instance,
                "new_instance": facts.instance_id or seen.instance_id,
                "served_version": served,
                "weight_version": self.version,
            },
        )
        if served == self.version == 0:
            self.instance = facts.instance_id  # the base model as loaded: the run's version 0
        elif self.current and served < self.version:
            # The same weights under the same number: one version, one set of weights. (With
            # sync_every > 1 the learner may have moved past them: then it is a new version.)
            self._push(what, self.version, full=True, expected=facts.instance_id)
        else:
            self._push(what, max(served, self.version) + 1, full=True, expected=facts.instance_id)

    def _push(self, what: str, version: int, full: bool, expected: str | None) -> None:
        """Makes the policy serve the learner's weights as `version`; `expected`: the instance
        that should take them (None: any, for a full push). A conflict with the expected
        instance is another writer's doing; with another instance the push is renumbered."""
        try:
            pushed, full = self._push_retrying(what, version, full, expected)
        except VersionConflict as err:
            facts = self.retrying(what, lambda: self.policy.facts(fresh=True))
            if expected is not None and facts.instance_id == expected:
                raise self._another_writer(facts.weight_version) from err
            version = max(version, facts.weight_version) + 1
            pushed, full = self._push_retrying(what, version, True, facts.instance_id)
        if not full and pushed.instance_id != expected:
            # A restart between the last GetInfo and this partial push: base weights plus the
            # adapted layers now serve as this version; the next version carries everything.
            self.log.warning(
                "a partial weight push reached a restarted policy instance: pushing all weights",
                extra={"old_instance": expected, "new_instance": pushed.instance_id},
            )
            pushed, full = self._push_retrying(what, pushed.version + 1, True, pushed.instance_id)
        self.version = pushed.version
        self.instance = pushed.instance_id
        self.current = True

    def _push_retrying(
        self, what: str, version: int, full: bool, expected: str | None
    ) -> tuple[Pushed, bool]:
        """The push with the loop's retries; returns what is served and whether the attempt
        that served it carried all the weights."""
        tried = False

        def attempt() -> Pushed:
            nonlocal tried, full
            if tried:  # the last attempt failed on the way: read what is served now
                facts = self.policy.facts(fresh=True)
                if facts.weight_version == version and (facts.instance_id == expected or full):
                    return Pushed(version, facts.instance_id)  # it landed after all
                if facts.instance_id != expected:
                    full = True  # a restarted instance serves base weights: send everything
            tried = True
            if version > self._high_water:  # write-ahead: never reuse a number, even if it fails
                write_high_water(self.folder, version)
                self._high_water = version
            return self.policy.push_weights(
                self.weights(full), version, full=lambda: self.weights(True)
            )

        pushed = self.retrying(what, attempt)
        return pushed, full
