"""The trainer: PPO (config, math, KL control, value-head policy), the loop, its control API."""
