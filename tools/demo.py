"""A smoke run of the serving halves: start the policy and reward services on the offline
defaults as two processes, then show one Generate and one Score through them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf.clients import PolicyClient, RewardClient
from rlhf.v1 import policy_pb2
from tools.launch import LocalPki, describe, running_services

PROMPTS = [
    "Write one sentence about a rainy Monday morning.",
    "Describe your favourite movie in one sentence.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy model")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/demo"), help="service logs")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    print("starting the policy (", args.model, ") and reward (VADER) services ...", flush=True)
    specs = [
        ("policy", ["policy", "serve", "--model", args.model]),
        ("reward", ["reward", "serve", "--backend", "vader", "--input", "response"]),
    ]
    pki = LocalPki.make(args.log_dir / "certs")  # mutual TLS between the demo's processes
    with running_services(specs, args.log_dir, pki) as services:
        print(f"services up:\n{describe(services.values())}", flush=True)
        policy = PolicyClient(services["policy"].address, client=pki.client())
        reward = RewardClient(services["reward"].address, client=pki.client())
        info = policy.info()
        print(
            f"policy  {services['policy'].address}: {info.model} on {info.device}/{info.dtype}, "
            f"{info.num_parameters / 1e6:.1f} M parameters, weight version {info.weight_version}"
        )
        rinfo = reward.info()
        print(f"reward  {services['reward'].address}: {rinfo.name} ({rinfo.description})")

        params = policy_pb2.GenerationParams(
            max_new_tokens=args.max_new_tokens,
            top_k=0,
            top_p=1.0,
            seed=0,
            apply_chat_template=True,
        )
        reply = policy.generate(PROMPTS, params, request_id="demo")
        responses = [c.response_text for c in reply.completions]
        scores = reward.score(PROMPTS, responses)
        print(f"\nGenerate (weight version {reply.weight_version}) -> Score:")
        for prompt, completion, score in zip(PROMPTS, reply.completions, scores):
            reason = policy_pb2.FinishReason.Name(completion.finish_reason)
            logprobs = list(completion.response_logprobs)
            mean_logprob = sum(logprobs) / max(1, len(logprobs))
            print(f"\n  prompt   {prompt}\n  response {completion.response_text.strip()!r}")
            print(
                f"  tokens   {len(completion.response_token_ids)} ({reason}), "
                f"mean logprob {mean_logprob:.3f}"
                f"\n  reward   {score:+.4f}"
            )
        policy.close()
        reward.close()
    print("\nboth services stopped cleanly; logs in", args.log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
