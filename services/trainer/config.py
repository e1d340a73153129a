"""A run's configuration (TrainConfig: ppo, generation, run) and the trainer service's settings.

A run's YAML file has three sections, each one dataclass:

    ppo:         # PPOConfig (services/trainer/learner/config.py): the seed's knobs
      learning_rate: 1.41e-5
    generation:  # GenerationConfig: the seed's generation_kwargs
      max_new_tokens: 64
    run:         # RunConfig: steps, data, endpoints, checkpoints
      steps: 20

`load_train_config` reads that YAML text (callers read files) and `--set section.field=value`
overrides through rlhf.config; a bad value raises ValueError naming it (`ppo.batch_size`).
Torch- and grpc-free: parsing a config imports no model or transport code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rlhf.call_limits import CallLimits
from rlhf.config import apply_mapping, apply_overrides, check, load_yaml_mapping
from rlhf.config.checks import at_least, at_most, choice_problems
from rlhf.defaults import DEFAULT_OUTPUT_DIR, POLICY_ADDRESS, REWARD_ADDRESS
from rlhf.logs import quote
from services.trainer.learner.config import PPOConfig
from services.trainer.orchestrator.policy_endpoints import PolicyEndpoints

MAX_CONFIG_BYTES = 64 * 1024
"""Largest run config a StartRun takes: its YAML text and its overrides together."""
MAX_NEW_TOKENS = 8192
"""Largest generation.max_new_tokens (the policy service applies its own, lower cap too)."""
TEMPERATURE_RANGE = (0.01, 100.0)
"""generation.temperature's bounds: below 0.01 the scaled logits overflow to inf; 0 would
travel as the wire's "unset" and mean 1.0."""
MAX_TOP_K = 1_000_000
"""Largest generation.top_k (above any vocabulary)."""
MAX_STEPS = 10_000_000
"""Largest run.steps, run.save_every and run.sync_every."""
MAX_STALENESS = 16
"""Largest run.max_staleness: each step of it keeps one more batch of samples in memory and in
every checkpoint, and one version of lag already hides the update behind the rollout."""
MAX_CALL_S = 86_400.0
"""Largest deadline of one call to a peer (a day), and of a health check or its interval."""
MIN_CALL_S = 0.1
"""Smallest deadline, health-check timeout or interval: below it a live peer on a busy machine
would be taken for a hung one."""
MAX_HEALTH_FAILURES = 100
"""Largest run.peer_health_failures (about seven minutes of silence at the default interval and
timeout)."""
DATA_PARALLEL = ("ddp", "fsdp")
"""TrainerServiceConfig.data_parallel's choices (learner/parallel.py)."""
DIST_BACKENDS = ("auto", "gloo", "nccl")
"""TrainerServiceConfig.dist_backend's choices."""
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A run id is a folder name: no separators, no leading dot, so never `..` or a path."""
RUN_ID_RULE = "use 1-64 letters, digits, '.', '_', '-', starting with a letter or digit"


@dataclass
class GenerationConfig:
    """Sampling knobs sent with every Generate call (the seed's generation_kwargs)."""

    max_new_tokens: int = 64
    """Response length cap in tokens (seed: 64)."""
    min_new_tokens: int = 0
    """Tokens before EOS may be sampled; 0 is the seed's min_length=-1 (stop any time)."""
    temperature: float = 1.0
    """Softmax temperature (seed: 1.0, sampling from the model's own distribution)."""
    top_k: int = 0
    """0 turns top-k filtering off (seed: top_k=0.0)."""
    top_p: float = 1.0
    """1.0 turns nucleus filtering off (seed: top_p=1.0)."""
    do_sample: bool = True
    """Sample rather than decode greedily (seed: True). PPO needs on-policy samples."""
    apply_chat_template: bool = True
    """Wrap each prompt as a user turn with the model's chat template (instruct models)."""

    def problems(self) -> list[str]:
        found = at_least(self, 1, "max_new_tokens") + at_least(self, 0, "min_new_tokens", "top_k")
        found += at_most(self, MAX_NEW_TOKENS, "max_new_tokens") + at_most(self, MAX_TOP_K, "top_k")
        if self.min_new_tokens > self.max_new_tokens:
            found.append(f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens")
        low, high = TEMPERATURE_RANGE
        if not low <= self.temperature <= high:
            found.append(f"temperature must be in [{low:g}, {high:g}], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            found.append(f"top_p must be in (0, 1], got {self.top_p}")
        return found


@dataclass
class RunConfig:
    """Everything about a run that is not PPO math or sampling."""

    run_id: str = ""
    """Name of the run and of its folder under output_dir: letters, digits, `.`, `_`, `-`
    (64 at most, starting with a letter or digit); empty: made from the time."""
    steps: int = 20
    """PPO steps (each: one batch of batch_size prompts -> generate -> score -> update)."""
    prompts: str = "builtin"
    """Prompt source: "builtin" (the shipped set), a .jsonl file or a datasets folder (through
    a trainer service: inside one of its --data-root folders)."""
    policy: str = ""
    """The PolicyService: HOST:PORT, or replicas of it as HOST:PORT,HOST:PORT,... or
    dns:///HOST:PORT (every address HOST resolves to; README "Policy replicas"). Empty: the
    trainer service's --policy (for `rlhf train` without a trainer service:
    rlhf.defaults.POLICY_ADDRESS)."""
    rewards: list[str] = field(default_factory=list)
    """Reward sources, each "[NAME@]ADDRESSES[=WEIGHT]"; ADDRESSES is HOST:PORT, replicas
    HOST:PORT+HOST:PORT[+...] or dns:///HOST:PORT (every address HOST resolves to, balanced by
    gRPC). Empty: the trainer service's --reward (without a trainer service:
    rlhf.defaults.REWARD_ADDRESS)."""
    output_dir: str = ""
    """Root of run folders: <output_dir>/<run_id>/{metrics.jsonl, tensorboard/, checkpoints/}.
    Empty: the trainer service's --output-dir, the only one a trainer service accepts (without
    a trainer service: rlhf.defaults.DEFAULT_OUTPUT_DIR)."""
    save_every: int = 10
    """Checkpoint every N steps (0: only at the end and at stop)."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep (older ones are deleted)."""
    sync_every: int = 1
    """Push the new weights to the policy service every N steps (1: on-policy, the default)."""
    max_staleness: int = 0
    """How many weight versions old a step's samples may be. 0: lock-step (generate, score,
    then update, then push). k >= 1: a rollout worker generates and scores step t from the
    weights of step t-1-k while the learner trains the steps before it; old log-probs are
    recomputed by the learner (the README's "overlap" section)."""
    step_retries: int = 5
    """Attempts of each call to a peer (generate, score, weight push, policy facts) that fails
    transiently: unreachable, past its deadline, or given up by the health watch."""
    retry_backoff_s: float = 2.0
    """First pause between those attempts; doubles each time."""
    generate_timeout_s: float = CallLimits.generate_s
    """Seconds a Generate call may take (default 600): a batch of long samples on a CPU takes
    minutes. A hung policy service is noticed sooner, by the health watch."""
    score_timeout_s: float = CallLimits.score_s
    """Seconds one Score call may take (default 120): a neural reward model on a CPU scores a
    few hundred samples in well under a minute."""
    sync_timeout_s: float = CallLimits.update_weights_s
    """Seconds a weight push (UpdateWeights) may take (default 600): about a second for a
    135 M-parameter model on loopback, minutes for billions of parameters over a network."""
    peer_health_interval_s: float = CallLimits.health_interval_s
    """While a call waits, every this many seconds (default 2) the trainer checks the peer's
    grpc.health.v1 health on the same channel; a call that ends sooner costs no check."""
    peer_health_timeout_s: float = CallLimits.health_timeout_s
    """Seconds one health check may take (default 2): a live service answers in milliseconds,
    even while busy with the call."""
    peer_health_failures: int = CallLimits.health_failures
    """Failed health checks in a row (no answer in time, UNAVAILABLE, NOT_SERVING) after which
    the waiting call is cancelled and retried like an unreachable peer (default 2: one lost
    check is forgiven). A SIGSTOPped peer is so noticed after about failures x (interval +
    timeout) seconds (8 by default) instead of at the call's deadline."""

    def problems(self) -> list[str]:
        found = at_least(self, 1, "steps", "keep_checkpoints", "sync_every", "step_retries")
        found += at_least(self, 0, "save_every", "retry_backoff_s")
        found += at_most(self, MAX_STEPS, "steps", "save_every", "sync_every")
        found += at_least(self, 0, "max_staleness") + at_most(self, MAX_STALENESS, "max_staleness")
        found += at_most(self, 1000, "keep_checkpoints") + at_most(self, 100, "step_retries")
        found += at_most(self, 3600, "retry_backoff_s")
        timing = (
            "generate_timeout_s",
            "score_timeout_s",
            "sync_timeout_s",
            "peer_health_interval_s",
            "peer_health_timeout_s",
        )
        found += at_least(self, MIN_CALL_S, *timing) + at_most(self, MAX_CALL_S, *timing)
        found += at_least(self, 1, "peer_health_failures")
        found += at_most(self, MAX_HEALTH_FAILURES, "peer_health_failures")
        if self.run_id and not RUN_ID.fullmatch(self.run_id):
            found.append(f"run_id {quote(self.run_id)}: {RUN_ID_RULE}")
        return found

    def call_limits(self) -> CallLimits:
        """The deadlines and health watch of this run's calls to its peers."""
        return CallLimits(
            generate_s=self.generate_timeout_s,
            score_s=self.score_timeout_s,
            update_weights_s=self.sync_timeout_s,
            health_interval_s=self.peer_health_interval_s,
            health_timeout_s=self.peer_health_timeout_s,
            health_failures=self.peer_health_failures,
        )


@dataclass
class TrainConfig:
    """A run's whole configuration: the three sections of its YAML file."""

    ppo: PPOConfig = field(default_factory=PPOConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_train_config(
    text: str | None, overrides: list[str] | None = None, max_bytes: int | None = None
) -> TrainConfig:
    """A TrainConfig from YAML text (None or "": the defaults), then `key=value` overrides
    (`section.field=value`, or `field=value` when the name is unique across sections).

    The text is plain YAML (no anchors or aliases); with `max_bytes`, longer text is refused
    unparsed. Raises ValueError naming the field and the reason; every problem at once."""
    config = TrainConfig()
    if text:
        apply_mapping(config, load_yaml_mapping(text, "run config", max_bytes))
    apply_overrides(config, overrides or [])
    check(config, "run config")
    return config


@dataclass
class TrainerServiceConfig:
    """`rlhf trainer serve`: what a StartRun that leaves fields empty gets, and what a StartRun
    may name at all (endpoints, data and model folders; everything it writes stays under
    output_dir)."""

    policy: str = POLICY_ADDRESS
    """Default PolicyService: HOST:PORT, HOST:PORT,HOST:PORT,... (replicas) or dns:///HOST:PORT
    (always allowed: every address listed, a DNS spec's HOST:PORT)."""
    reward: list[str] = field(default_factory=lambda: [REWARD_ADDRESS])
    """Default reward sources, comma-separated [NAME@]ADDRESSES[=WEIGHT] (run.rewards' forms;
    every address they name is always allowed)."""
    output_dir: str = DEFAULT_OUTPUT_DIR
    """Root of run folders: everything a run writes goes under it; a StartRun cannot name
    another."""
    allowed_endpoints: list[str] = field(default_factory=list)
    """Further policy and reward addresses a StartRun or SetRewardEndpoints may name,
    comma-separated HOST:PORT or HOST:* (any port); --policy and --reward are always
    allowed."""
    data_root: list[str] = field(default_factory=list)
    """Folders, comma-separated, whose files and datasets a run's run.prompts may name;
    "builtin" (the shipped prompts) is always allowed."""
    model_root: list[str] = field(default_factory=list)
    """Folders, comma-separated, whose models a run's ppo.model_name may name; the embedded
    default policy's alias is always allowed."""
    threads: int = 0
    """CPU threads for torch in this process (0: torch's default, one per core), set before any
    torch work. On a CPU shared with the policy service, give each process its own share (the
    policy service has the same flag) so that their OpenMP threads do not fight for cores."""
    data_parallel: str = field(default="ddp", metadata={"choices": DATA_PARALLEL})
    """Under torchrun (WORLD_SIZE > 1): how the ranks share the learner. "ddp": each rank holds
    the whole model and its gradients are all-reduced; "fsdp": FSDP2 shards parameters,
    gradients and optimiser state over the ranks (models that do not fit one device), and
    checkpoints are sharded (resumable on the same number of ranks). Rank 0 serves the control
    API; the other ranks serve only gRPC health."""
    dist_backend: str = field(default="auto", metadata={"choices": DIST_BACKENDS})
    """torch.distributed backend under torchrun: gloo (CPU), nccl (GPUs), or auto (nccl when
    CUDA is available, else gloo)."""
    resume_interrupted: bool = False
    """On start, resume by itself the most recent run this trainer finds INTERRUPTED under
    output_dir (it was active when the trainer stopped); the others stay INTERRUPTED."""
    resume_wait_s: float = 600.0
    """With resume_interrupted: how long to keep trying, every RESUME_RETRY_S seconds, while
    the resume is refused because a reward endpoint does not answer its probe yet (services
    restarting together after a node reboot); any other refusal is logged at once."""

    def __post_init__(self) -> None:
        check(self, "trainer settings")

    def problems(self) -> list[str]:
        found = [] if self.policy else ["policy must not be empty (a host:port)"]
        try:
            if self.policy:
                PolicyEndpoints.parse(self.policy)
        except ValueError as err:
            found.append(f"policy: {err}")
        if not self.output_dir:
            found.append("output_dir must not be empty (the root of every run folder)")
        for name in ("data_root", "model_root"):  # "" would allow the working directory
            if any(not entry.strip() for entry in getattr(self, name)):
                found.append(f"{name}: an entry is empty; name folders")
        found += at_least(self, 0, "threads")
        found += choice_problems("data_parallel", self.data_parallel, DATA_PARALLEL)
        found += choice_problems("dist_backend", self.dist_backend, DIST_BACKENDS)
        if not 0 <= self.resume_wait_s <= 86_400:
            found.append(f"resume_wait_s must be in [0, 86400] seconds, got {self.resume_wait_s}")
        for entry in self.allowed_endpoints:
            host, _, port = entry.rpartition(":")
            if not host or not (port == "*" or port.isdigit()):
                found.append(f"allowed_endpoints: {quote(entry)} is not HOST:PORT or HOST:*")
        return found
