"""VADER sentiment: the offline default, standing in for the seed's "POSITIVE" classifier.

VADER's lexicon ships inside the vaderSentiment package, so nothing is downloaded, and it scores
tens of thousands of texts per second on one CPU core.
"""

from __future__ import annotations

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from services.reward.backends.base import RewardBackend


class VaderBackend(RewardBackend):
    """The compound polarity score of vaderSentiment's SentimentIntensityAnalyzer."""

    name = "vader"
    description = (
        "VADER compound sentiment of the text, in [-1, 1]: -1 most negative, 0 neutral "
        "(also an empty text), +1 most positive"
    )

    def __init__(self) -> None:
        # The analyzer only reads its lexicon after construction, so threads can share it.
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, texts: list[str]) -> list[float]:
        polarity = self._analyzer.polarity_scores
        return [float(polarity(text)["compound"]) for text in texts]
