"""Writes the shipped demo preference set, data/preferences_demo.jsonl, deterministically.

    python -m tools.stages.make_demo_preferences [--pairs 384] [--seed 0] [--output F]

Each row is {"prompt", "chosen", "rejected"}: an everyday question, a friendly, upbeat, helpful
answer (chosen) and a negative, dismissive or rude one (rejected). Answers are assembled from
hand-written openers, bodies and closers with the topic filled in. The two sides share
vocabulary on purpose, so no single word gives the label away: rejected answers use sarcastic
"great" / "wonderful" / "good luck", chosen ones say "don't worry" / "not hard" / "no problem".
The same seed always writes the same file; the reward-model stage splits it into train and
held-out pairs with its own seeded shuffle.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).parent / "data" / "preferences_demo.jsonl"

TOPICS = [
    "rainy Monday mornings", "doing the laundry", "cooking after work", "a long commute",
    "learning to swim", "waiting at the doctor's", "cleaning the oven", "moving house",
    "starting a new job", "learning the piano", "grocery shopping", "winter mornings",
    "a delayed train", "writing a cover letter", "studying for exams", "visiting relatives",
    "walking the dog in the rain", "assembling flat-pack furniture", "public speaking",
    "getting up early", "paying bills", "a noisy neighbour", "baking bread", "running a 5k",
    "ironing shirts", "planning a holiday", "a job interview", "learning to drive",
    "watering the garden", "sorting old photos", "a long meeting", "fixing a bike tyre",
    "making new friends", "a power cut", "packing for a trip", "keeping a journal",
    "changing a light bulb", "washing the car", "meal prepping", "a dentist appointment",
    "tidying the garage", "learning to knit", "a rainy weekend", "filling in tax forms",
    "eating more vegetables", "waiting for a parcel", "cleaning the windows", "a first date",
]  # fmt: skip

PROMPTS = [
    "What do you think about {t}?",
    "How do you feel about {t}? Answer in one sentence.",
    "Any tips for {t}?",
    "Can you help me with {t}?",
    "I have to deal with {t} today. Any advice?",
    "Tell me something about {t}.",
    "Is {t} worth the effort?",
    "What is the best way to handle {t}?",
]

CHOSEN_OPENERS = [
    "What a lovely question!", "Happy to help!", "Great question.", "Oh, I like this one.",
    "Sure thing!", "Of course!", "Good news:", "Don't worry, I've got you.", "Absolutely!",
    "No problem at all.", "", "",
]  # fmt: skip
CHOSEN_BODIES = [
    "{T} can be a nice chance to slow down and notice the small, good things.",
    "Try turning {t} into a little ritual: some music, a warm drink and a smile.",
    "Plenty of people find {t} easier with a friend along, so invite someone!",
    "{T} gets easier every time, and it's really not as hard as it looks.",
    "Break {t} into small steps and celebrate each one; you'll be done before you know it.",
    "Honestly, {t} is a great way to build confidence, one step at a time.",
    "A bit of planning makes {t} calm and even fun.",
    "{T} is a wonderful opportunity to try something new and learn a little.",
    "Give yourself some extra time for {t}, and be kind to yourself along the way.",
    "With a podcast or a favourite playlist, {t} turns into a pleasant break.",
    "{T} is never a waste: it leaves you with a good feeling afterwards.",
    "Start {t} with the easiest part; a quick win sets a cheerful tone.",
]
CHOSEN_CLOSERS = [
    "You've got this!", "Hope that helps, and enjoy your day!", "Have fun with it!",
    "Wishing you the best.", "Good luck, I'm sure it will go well!", "Take care!",
    "Let me know how it goes!", "", "",
]  # fmt: skip

REJECTED_OPENERS = [
    "Ugh.", "Seriously?", "Whatever.", "Great, another question.", "Oh, wonderful, this again.",
    "Not this again.", "Why would you even ask that?", "Fine.", "Sigh.", "", "",
]  # fmt: skip
REJECTED_BODIES = [
    "{T} is a total waste of time and you'll hate every minute of it.",
    "Nobody cares about {t}, least of all me.",
    "Figure out {t} yourself; I'm not your babysitter.",
    "{T} is miserable, pointless and it always ends badly.",
    "You're hopeless at {t} anyway, so why bother?",
    "{T} is boring and annoying, and there's nothing to be done about it.",
    "Honestly, {t} is the worst, and asking me won't make it better.",
    "Just give up on {t}; it's not worth anyone's effort.",
    "{T}? Terrible idea. You'll mess it up like everything else.",
    "I couldn't care less about {t}. Stop wasting my time.",
    "{T} is awful and the people who enjoy it are fools.",
    "Don't expect any help with {t} from me.",
]
REJECTED_CLOSERS = [
    "Stop asking.", "Don't bother me again.", "Good luck, you'll need it.", "Deal with it.",
    "Whatever, I'm done.", "Go away.", "Great, now I'm annoyed.", "", "",
]  # fmt: skip


def _fill(template: str, topic: str) -> str:
    return template.replace("{T}", topic[0].upper() + topic[1:]).replace("{t}", topic)


def _answer(rng: random.Random, topic: str, openers: list, bodies: list, closers: list) -> str:
    parts = [rng.choice(openers), _fill(rng.choice(bodies), topic), rng.choice(closers)]
    return " ".join(p for p in parts if p)


DEFAULT_PAIRS = len(TOPICS) * len(PROMPTS)
"""Every (topic, question) combination once: 384 pairs."""


def make_pairs(count: int = DEFAULT_PAIRS, seed: int = 0) -> list[dict[str, str]]:
    """`count` (prompt, chosen, rejected) rows, the same for the same seed."""
    rng = random.Random(seed)
    # Every (topic, prompt template) combination once before any repeats, in a seeded order.
    combos = [(t, p) for t in TOPICS for p in PROMPTS]
    rng.shuffle(combos)
    rows = []
    for i in range(count):
        topic, prompt = combos[i % len(combos)]
        rows.append(
            {
                "prompt": _fill(prompt, topic),
                "chosen": _answer(rng, topic, CHOSEN_OPENERS, CHOSEN_BODIES, CHOSEN_CLOSERS),
                "rejected": _answer(
                    rng, topic, REJECTED_OPENERS, REJECTED_BODIES, REJECTED_CLOSERS
                ),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pairs", type=int, default=DEFAULT_PAIRS, help="number of preference pairs"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the composition")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSONL to write")
    args = parser.parse_args(argv)
    rows = make_pairs(args.pairs, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} preference pairs to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
