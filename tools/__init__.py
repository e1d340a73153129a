"""Tooling that is not a deployable service: the local three-process stack (`make run`,
`make smoke`), the SFT -> RM -> PPO stages, the `rlhf k8s` commands, tiny models for tests
and benches."""
