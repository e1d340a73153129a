"""The reward-scoring service (rlhf.v1.RewardService) and its backends."""
