"""A rule reward for keywords: weight x the number of keyword occurrences in the text.

Explicit, for tests and for reward-shaping experiments; never a silent fallback.
"""

from __future__ import annotations

import re

from services.reward.backends.base import RewardBackend


def parse_keywords(raw: str) -> list[str]:
    """ "good, great,thank you" -> ["good", "great", "thank you"] (blanks dropped)."""
    return [word.strip() for word in raw.split(",") if word.strip()]


class KeywordBackend(RewardBackend):
    """score = weight x (occurrences of any keyword), matched case-insensitively as whole words.

    "Whole word" means a keyword that starts (ends) with a letter, digit or underscore must not
    be directly preceded (followed) by one, so "good" counts in "Good!" but not in "goodness";
    a keyword may contain spaces ("thank you") or be punctuation ("!"). Every occurrence counts,
    so "good good" scores 2 x weight.
    """

    name = "keyword"

    def __init__(self, keywords: list[str], weight: float = 1.0) -> None:
        if not keywords:
            raise ValueError("the keyword backend needs --keywords, e.g. --keywords good,great")
        self.keywords = keywords
        self.weight = weight
        # Longest first, so "thank you" wins over "thank" where both are keywords. The
        # whole-word guards apply only at a keyword's word-character ends, so "!" still matches
        # in "you!".
        alternatives = "|".join(
            (r"(?<!\w)" if re.match(r"\w", k) else "")
            + re.escape(k)
            + (r"(?!\w)" if re.search(r"\w$", k) else "")
            for k in sorted(keywords, key=len, reverse=True)
        )
        self._pattern = re.compile(alternatives, re.IGNORECASE)
        self.description = (
            f"{weight:g} x the number of case-insensitive whole-word occurrences of "
            f"{', '.join(keywords)}; 0 when none occurs"
        )

    def score(self, texts: list[str]) -> list[float]:
        return [self.weight * len(self._pattern.findall(text)) for text in texts]
