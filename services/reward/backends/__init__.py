"""The registry of reward backends: a --backend name -> a constructor reading the CLI's args.

Each backend's module is imported only when it is chosen, so a VADER or rule service never
imports torch or transformers.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from rlhf.defaults import REWARD_BACKENDS
from services.reward.backends.base import RewardBackend


def _vader(args: argparse.Namespace) -> RewardBackend:
    from services.reward.backends.vader import VaderBackend

    return VaderBackend()


def _hf_classifier(args: argparse.Namespace) -> RewardBackend:
    from services.reward.backends.hf_classifier import HFClassifierBackend

    threads = getattr(args, "threads", 0)
    if threads:
        import torch

        # Process-wide, which is right for a process that serves one backend.
        torch.set_num_threads(threads)
    return HFClassifierBackend(
        model=args.model or "",
        label=args.label or None,
        logit=bool(args.logit),
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
    )


def _length(args: argparse.Namespace) -> RewardBackend:
    from services.reward.backends.length import LengthBackend

    return LengthBackend(target=args.target_length, unit=args.length_unit)


def _keyword(args: argparse.Namespace) -> RewardBackend:
    from services.reward.backends.keyword import KeywordBackend, parse_keywords

    return KeywordBackend(parse_keywords(args.keywords or ""), weight=args.keyword_weight)


_BUILDERS: dict[str, Callable[[argparse.Namespace], RewardBackend]] = {
    "vader": _vader,
    "hf-classifier": _hf_classifier,
    "length": _length,
    "keyword": _keyword,
}


def build_backend(args: argparse.Namespace) -> RewardBackend:
    """Builds (and for hf-classifier, loads) the backend the parsed flags ask for.

    Raises ValueError for an unknown backend or a bad flag combination, and whatever loading
    the model raises (e.g. FileNotFoundError): the service must not start on a broken backend.
    """
    try:
        builder = _BUILDERS[args.backend]
    except KeyError:
        raise ValueError(
            f"unknown reward backend {args.backend!r}; choose one of {', '.join(REWARD_BACKENDS)}"
        ) from None
    return builder(args)


__all__ = ["RewardBackend", "build_backend"]
