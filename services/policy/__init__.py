"""The policy service: samples completions from the served causal LM and takes new weights.

`engine.PolicyEngine` does the work with no gRPC in it (so benchmarks and tests can run it
in-process), over `loading`, `validation`, `sampling` and `weight_store`; `server.PolicyServicer`
puts it behind rlhf.v1.PolicyService; `cli` is `rlhf policy serve`.
"""
