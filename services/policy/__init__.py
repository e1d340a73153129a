"""The policy service: samples completions from the served causal LM and takes new weights.

`engine.PolicyEngine` does the work with no gRPC in it (so the trainer and benchmarks can run
it in-process); `server.PolicyServicer` puts it behind rlhf.v1.PolicyService; `cli` is
`rlhf policy serve`.
"""
