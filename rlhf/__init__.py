"""Shared plumbing of the RLHF services: gRPC bootstrap, channels, weight codec, logs, models.

The three services live in ``services/policy``, ``services/reward`` and ``services/trainer``;
everything they have in common lives here, written once.
"""

__version__ = "0.1.0"
