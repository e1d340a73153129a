"""How long a client waits on a peer's call, and how it watches the peer meanwhile.

Plain values (no grpc, no torch): the trainer's run config (services/trainer/config.py) makes
one per run from its fields, and rlhf.clients applies it to every call it makes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CallLimits:
    """Per-call deadlines, and the health watch that gives up on a call whose peer has hung."""

    generate_s: float = 600.0
    """Deadline of a Generate call: a batch of long samples on a CPU takes minutes."""
    score_s: float = 120.0
    """Deadline of one Score call (a batch may take several): a neural reward model on a CPU
    scores a few hundred samples in well under a minute."""
    update_weights_s: float = 600.0
    """Deadline of an UpdateWeights upload: a full push of a 135 M-parameter model takes about
    a second on loopback, minutes for billions of parameters over a network."""
    info_s: float = 10.0
    """Deadline of a GetInfo call: it reads facts the service already holds."""
    health_interval_s: float = 2.0
    """While a call waits, how often its peer's grpc.health.v1 health is checked. A call that
    ends sooner costs no check at all."""
    health_timeout_s: float = 2.0
    """Deadline of one health check: a live service answers in a millisecond, even while busy
    (its health has threads of its own)."""
    health_failures: int = 2
    """Failed health checks in a row (no answer in time, UNAVAILABLE, NOT_SERVING) after which
    the call is cancelled and reported as UNAVAILABLE: two, so one lost check is forgiven."""
