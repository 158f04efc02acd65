"""Real-text prompts for ``hicache bench multiturn --model-path``: seeded English passages and questions, cut to
exact token counts by the checkpoint's own tokenizer, so a real model reads text it can continue and the report
can show what it answered."""

from __future__ import annotations

import random
from typing import Any

PASSAGES = (
    "The river town kept its old stone bridge, though the trains had long since taken the trade upstream.",
    "A hierarchical cache keeps recent pages in fast memory and moves older ones to slower, larger tiers.",
    "In spring the orchard filled with blossom, and the beekeepers carried their hives up from the valley.",
    "The committee met on Tuesday to review the budget, the new library plans and the state of the roads.",
    "Photosynthesis turns light, water and carbon dioxide into sugar, and releases oxygen as it does so.",
    "She tuned the old piano by ear, one string at a time, while the rain drummed on the workshop roof.",
    "The first mechanical clocks appeared in European towers in the thirteenth century and kept poor time.",
    "To bake bread, mix flour, water, salt and yeast, knead the dough, let it rise, then bake until golden.",
    "The ship's log recorded calm seas for three days, then a storm that scattered the fleet to the south.",
    "Most of the universe is made of matter and energy that telescopes cannot see directly.",
    "The marathon route follows the harbour, climbs through the park and finishes in the central square.",
    "Good documentation explains what a tool does, how to install it, and what to do when something fails.",
    "The village school had one classroom, a wood stove and a teacher who knew every family by name.",
    "Glaciers carve valleys slowly, grinding rock into fine flour that turns mountain lakes a milky blue.",
    "The museum's new wing holds ceramics from five centuries, arranged by the kilns that fired them.",
    "A good night's sleep helps memory: the brain replays the day's lessons while the body rests.",
)
QUESTIONS = (
    "What is the main idea of the text so far?",
    "Which detail above surprised you most, and why?",
    "Summarize the last few sentences in plain words.",
    "What might happen next in this story?",
    "Explain one of the facts above to a child.",
    "Which two sentences above are most closely related?",
    "Give a short title for everything written so far.",
    "What question would you ask the author?",
)


def _cut(tokenizer: Any, rng: random.Random, n: int, text: str = "") -> list[int]:
    """Exactly ``n`` tokens: ``text``, then seeded passages (whole sentences, the last one cut)."""
    ids = tokenizer.encode(text, add_special_tokens=False) if text else []
    while len(ids) < n:
        text += (" " if text else "") + rng.choice(PASSAGES)
        ids = tokenizer.encode(text, add_special_tokens=False)
    return list(ids[:n])


def first_prompt(tokenizer: Any, rng: random.Random, n: int) -> list[int]:
    return _cut(tokenizer, rng, n)


def question(tokenizer: Any, rng: random.Random, n: int) -> list[int]:
    """A question on a new line, then more passage text when the question is shorter than ``n`` tokens."""
    return _cut(tokenizer, rng, n, "\nQuestion: " + rng.choice(QUESTIONS))
