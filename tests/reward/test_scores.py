"""Scores through a real reward server, checked against the libraries' own numbers computed
here: VADER, an HF classifier (probability and logit), a single-logit reward model, batching,
and the rule backends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf.v1 import common_pb2
from services.reward.backends import build_backend
from services.reward.backends.keyword import KeywordBackend
from services.reward.backends.length import LengthBackend
from services.reward.server import ScoreSettings
from tests.reward.common import (
    PROMPTS,
    RESPONSES,
    TINY_TEXTS,
    args_for,
    reference_outputs,
    score,
    score_texts,
    serving,
)


@pytest.mark.parametrize("mode", ["response", "prompt+response"])
def test_vader_scores_equal_vader_compound(mode: str) -> None:
    analyzer = SentimentIntensityAnalyzer()
    texts = [p + r if mode == "prompt+response" else r for p, r in zip(PROMPTS, RESPONSES)]
    expected = [analyzer.polarity_scores(t)["compound"] for t in texts]
    backend = build_backend(args_for("--backend", "vader"))
    with serving(backend, ScoreSettings(input=mode)) as (_, _, stub):
        got = score(stub, PROMPTS, RESPONSES)
    assert got == pytest.approx(expected, abs=1e-6)
    if mode == "prompt+response":  # the prompt really changes what is scored
        assert got != pytest.approx([analyzer.polarity_scores(r)["compound"] for r in RESPONSES])


def test_hf_classifier_label_probability_and_logit(tiny_classifier: Path) -> None:
    logits = reference_outputs(tiny_classifier, TINY_TEXTS)
    positive = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).config.label2id[
        "POSITIVE"
    ]
    probability = torch.softmax(logits, dim=-1)[:, positive].tolist()
    raw = logits[:, positive].tolist()
    model = str(tiny_classifier)
    prob_backend = build_backend(
        args_for("--backend", "hf-classifier", "--model", model, "--label", "POSITIVE")
    )
    with serving(prob_backend) as (_, _, stub):
        assert score_texts(stub, TINY_TEXTS) == pytest.approx(probability, abs=1e-5)
    logit_backend = build_backend(
        args_for("--backend", "hf-classifier", "--model", model, "--label", "POSITIVE", "--logit")
    )
    with serving(logit_backend) as (_, _, stub):
        assert score_texts(stub, TINY_TEXTS) == pytest.approx(raw, abs=1e-5)


def test_single_logit_reward_model_returns_its_scalar(tiny_reward_model: Path) -> None:
    expected = reference_outputs(tiny_reward_model, TINY_TEXTS)[:, 0].tolist()
    backend = build_backend(
        args_for("--backend", "hf-classifier", "--model", str(tiny_reward_model))
    )
    with serving(backend) as (_, _, stub):
        assert score_texts(stub, TINY_TEXTS) == pytest.approx(expected, abs=1e-5)


def test_batches_across_max_batch_size_give_unbatched_scores(tiny_classifier: Path) -> None:
    """10 texts of mixed lengths in passes of 3 (padded) equal passes of 1 (no padding)."""
    texts = TINY_TEXTS + ["", "good"]  # an empty text too
    scores = {}
    for size in (1, 3, 64):
        backend = build_backend(
            args_for(
                *("--backend", "hf-classifier", "--model", str(tiny_classifier)),
                *("--label", "POSITIVE", "--logit", "--max-batch-size", str(size)),
            )
        )
        with serving(backend, ScoreSettings(max_batch_size=size)) as (_, _, stub):
            scores[size] = score_texts(stub, texts)
            assert stub.GetInfo(common_pb2.GetInfoRequest()).max_batch_size == size
    assert scores[3] == pytest.approx(scores[1], abs=1e-5)
    assert scores[64] == pytest.approx(scores[1], abs=1e-5)


def test_length_and_keyword_rules() -> None:
    texts = ["one two three four", "", "a b c d e f g h", "one", "Good good goodness, thank you!"]
    with serving(LengthBackend(target=4, unit="words")) as (_, _, stub):
        # 4, 0, 8, 1 and 5 words
        assert score_texts(stub, texts) == pytest.approx([0.0, -1.0, -1.0, -0.75, -0.25])
    with serving(LengthBackend(target=10, unit="chars")) as (_, _, stub):
        # 18 chars -> -0.8; 0 -> -1; 15 -> -0.5; 3 -> -0.7; 30 -> -2
        assert score_texts(stub, texts) == pytest.approx([-0.8, -1.0, -0.5, -0.7, -2.0])
    keywords = KeywordBackend(["good", "thank you", "!"], weight=0.5)
    with serving(keywords) as (_, _, stub):
        # "Good", "good" (not "goodness"), "thank you", "!" -> 4 x 0.5
        assert score_texts(stub, texts) == pytest.approx([0.0, 0.0, 0.0, 0.0, 2.0])
    built = build_backend(args_for("--backend", "keyword", "--keywords", "one, two"))
    assert built.score(["One two, one; someone"]) == [3.0]
