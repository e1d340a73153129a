"""The gRPC services' full names, read from the generated descriptors (never typed by hand)."""

from __future__ import annotations

from rlhf.v1 import policy_pb2, reward_pb2, trainer_pb2

POLICY_DESCRIPTOR = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"]
REWARD_DESCRIPTOR = reward_pb2.DESCRIPTOR.services_by_name["RewardService"]
TRAINER_DESCRIPTOR = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]
"""The services' descriptors: their methods, message types and streaming (rlhf.handlers)."""

POLICY_SERVICE = POLICY_DESCRIPTOR.full_name
REWARD_SERVICE = REWARD_DESCRIPTOR.full_name
TRAINER_SERVICE = TRAINER_DESCRIPTOR.full_name
