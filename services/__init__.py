"""The three RLHF services: policy (generation), reward (scoring) and trainer (PPO loop)."""
