"""The stages before PPO: supervised fine-tuning (sft.py) and reward-model training
(reward_model.py) with TRL's SFTTrainer and RewardTrainer, and the pipeline that chains SFT ->
reward model -> PPO (pipeline.py). The `rlhf sft`, `rlhf rm` and `rlhf pipeline` commands live
in cli.py, import-light like every command module."""
