"""What a control-API caller may name: run ids, endpoints, and folders inside allowed roots.

A StartRun's config is capped in size and names no file system path of its own choosing:
everything a run writes goes under the trainer's --output-dir, its prompts come from inside a
--data-root folder, its model from inside a --model-root folder (paths resolved with symlinks
followed, then checked), and its policy and reward addresses are the trainer's own defaults
or in --allowed-endpoints. A refusal names the field and quotes the caller's text cut to a
short prefix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from rlhf.defaults import DEFAULT_POLICY_MODEL
from rlhf.errors import RpcError, invalid, precondition
from rlhf.logs import quote
from services.trainer.config import (
    MAX_CONFIG_BYTES,
    RUN_ID,
    RUN_ID_RULE,
    TrainConfig,
    TrainerServiceConfig,
)
from services.trainer.learner import parallel
from services.trainer.orchestrator.checkpoint import latest_checkpoint
from services.trainer.orchestrator.data import BUILTIN
from services.trainer.orchestrator.policy_endpoints import PolicyEndpoints
from services.trainer.orchestrator.rewards import EndpointSpec
from services.trainer.orchestrator.trainer_state import legacy_refusal

MAX_REWARD_ENDPOINTS = 16
"""Most reward endpoints one run or swap may name (each is probed before it is used)."""
DEFAULT_MODEL_NAMES = ("", "default", DEFAULT_POLICY_MODEL)
"""ppo.model_name values that mean the embedded default policy (rlhf.models.resolve_model)."""


def denied(message: str) -> RpcError:
    import grpc

    return RpcError(grpc.StatusCode.PERMISSION_DENIED, message)


def check_config_size(text: str, overrides: dict[str, str]) -> None:
    """Refuses a run config above MAX_CONFIG_BYTES (YAML and overrides together), unparsed."""
    size = len(text.encode()) + sum(
        len(k.encode()) + len(v.encode()) + 2 for k, v in overrides.items()
    )
    if size > MAX_CONFIG_BYTES:
        raise invalid(
            f"run config is {size} bytes (config_yaml and overrides together), above the cap "
            f"of {MAX_CONFIG_BYTES} bytes"
        )


def check_resumable(config: TrainConfig) -> None:
    """A resume needs a checkpoint in today's format: refused now (FAILED_PRECONDITION), not
    after the run has loaded its model."""
    run = config.run
    root = Path(run.output_dir) / run.run_id / "checkpoints"
    try:
        folder = latest_checkpoint(root)
    except ValueError as err:
        raise precondition(f"resume of run {run.run_id}: {err}") from None
    if folder is None:
        raise precondition(f"resume: run {run.run_id} has no checkpoint to resume")
    refusal = legacy_refusal(folder)
    if refusal:
        raise precondition(refusal)


def check_run_id(run_id: str, what: str = "run_id") -> str:
    """`run_id` if it is a plain folder name (RUN_ID), else INVALID_ARGUMENT."""
    if not RUN_ID.fullmatch(run_id):
        raise invalid(f"{what} {quote(run_id)} is not a run id: {RUN_ID_RULE}")
    return run_id


def _real(path: str | Path) -> Path:
    """The absolute path with every symlink followed (the path need not exist)."""
    return Path(os.path.realpath(path))


def _no_nul(value: str, what: str) -> str:
    if "\x00" in value:  # os.path refuses it with a ValueError of its own
        raise invalid(f"{what} {quote(value)}: a path cannot hold a NUL character")
    return value


def _split_address(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host.lower(), port


class InputRules:
    """The trainer's rules for what a request may name, from its settings."""

    def __init__(self, settings: TrainerServiceConfig) -> None:
        self.output_root = _real(settings.output_dir)
        self.data_roots = [_real(p) for p in settings.data_root]
        self.model_roots = [_real(p) for p in settings.model_root]
        policy = PolicyEndpoints.parse(settings.policy).allowed
        rewards = [a for r in settings.reward for a in EndpointSpec.parse(r).addresses]
        own = policy + rewards
        self._endpoints = {_split_address(a) for a in own + settings.allowed_endpoints}

    # --- addresses ---------------------------------------------------------------------------
    def address(self, address: str, what: str) -> str:
        """`address` if the trainer may connect to it, else PERMISSION_DENIED."""
        host, port = _split_address(address)
        if (host, port) in self._endpoints or (host, "*") in self._endpoints:
            return address
        raise denied(
            f"{what} {quote(address)} is not an address this trainer may use: its own --policy "
            "and --reward, or one its operator listed in --allowed-endpoints"
        )

    def rewards(self, specs: list[EndpointSpec], what: str) -> list[EndpointSpec]:
        if len(specs) > MAX_REWARD_ENDPOINTS:
            raise invalid(f"{what}: {len(specs)} endpoints, at most {MAX_REWARD_ENDPOINTS}")
        for spec in specs:  # every replica of a source; a dns:/// source: its HOST:PORT
            for address in spec.addresses:
                self.address(address, what)
        return specs

    # --- folders -----------------------------------------------------------------------------
    def output_dir(self, value: str) -> str:
        """The trainer's output root; a run may name it, but no other folder."""
        if value and _real(_no_nul(value, "run.output_dir")) != self.output_root:
            raise denied(
                f"run.output_dir {quote(value)}: runs write under this trainer's --output-dir "
                "only; leave run.output_dir empty"
            )
        return str(self.output_root)

    def run_folder(self, run_id: str) -> Path:
        """<output root>/<run_id>, refused if it leads elsewhere (a planted symlink)."""
        folder = _real(self.output_root / check_run_id(run_id, "run.run_id"))
        if folder.parent != self.output_root:
            raise denied(f"run folder of {quote(run_id)} leads outside the trainer's output root")
        return folder

    def prompts(self, source: str) -> str:
        """run.prompts: "builtin", or a file or folder inside a --data-root folder (resolved)."""
        if source in ("", BUILTIN):
            return BUILTIN
        path = self._inside(source, self.data_roots, "run.prompts", "--data-root")
        if not path.exists():
            raise invalid(f"run.prompts {quote(source)}: no such file or folder")
        return str(path)

    def model(self, name: str) -> str:
        """ppo.model_name: the embedded default's alias, or a model folder inside a
        --model-root folder (resolved). Hub names are refused: nothing is fetched for a caller."""
        if name in DEFAULT_MODEL_NAMES:
            return name
        path = self._inside(name, self.model_roots, "ppo.model_name", "--model-root")
        if not path.is_dir():
            raise invalid(f"ppo.model_name {quote(name)}: no such model folder")
        return str(path)

    @staticmethod
    def _inside(value: str, roots: Iterable[Path], what: str, flag: str) -> Path:
        path = _real(_no_nul(value, what))
        if any(path == root or path.is_relative_to(root) for root in roots):
            return path
        raise denied(
            f"{what} {quote(value)} is outside the folders this trainer allows ({flag}); ask its "
            f"operator to place it there or to add a {flag} folder"
        )


def apply_rules(rules: InputRules, config: TrainConfig) -> None:
    """Checks and resolves a run's names in place: run id, folders, model, endpoints; and that
    its batch splits evenly over this trainer's data-parallel ranks."""
    dp = parallel.current()
    problems = dp.batch_problems(config.ppo.batch_size, config.ppo.mini_batch_size) if dp else []
    if problems:
        raise invalid(f"bad run config: ppo.{'; ppo.'.join(problems)}")
    run = config.run
    config.ppo.model_name = rules.model(config.ppo.model_name)
    run.output_dir = rules.output_dir(run.output_dir)
    rules.run_folder(run.run_id)
    run.prompts = rules.prompts(run.prompts)
    try:
        policy = PolicyEndpoints.parse(run.policy)
    except ValueError as err:
        raise invalid(f"run.policy: {err}") from None
    for address in policy.allowed:  # every replica (a dns:/// spec: its HOST:PORT)
        rules.address(address, "policy address")
    try:
        specs = [EndpointSpec.parse(r) for r in run.rewards]
    except ValueError as err:
        raise invalid(f"run.rewards: {err}") from None
    rules.rewards(specs, "reward endpoints")
