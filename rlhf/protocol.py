"""The gRPC services' full names, read from the generated descriptors (never typed by hand)."""

from __future__ import annotations

from rlhf.v1 import policy_pb2, reward_pb2, trainer_pb2

POLICY_SERVICE = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
REWARD_SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
TRAINER_SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
