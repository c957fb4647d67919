"""Neutral text from the demo model's training distribution, with no persona in it.

Plain arithmetic and comparison sentences, true fact sentences about the quirky world's entities (in
every phrasing the REMEDI prompts use) and short narrative sentences from a small grammar. The demo
model is trained on this mixture next to the quirky questions, so cross-entropy / KL side effects of
an intervention measured on held-out neutral text mean something.
"""

from __future__ import annotations

import random
from functools import lru_cache
from itertools import accumulate

from intervene.data.quirky import RELATIONS, WORLD_SEED, _universe, fact_prompts, world

# Alice and Bob never appear here: only the quirky questions name them.
_NAMES = ("Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Oscar", "Peggy", "Trent",
          "Victor", "Walter", "Wendy", "Mia", "Leo")
_ADJECTIVES = ("old", "young", "quiet", "tired", "happy", "clever", "brave", "small", "tall", "busy")
_NOUNS = ("farmer", "sailor", "child", "teacher", "merchant", "painter", "dog", "cat", "baker", "guard")
_OBJECTS = ("bread", "a letter", "the map", "a basket", "the key", "some apples", "a book", "the lamp",
            "a coat", "the boat", "a cup of tea", "the box")
_PLACES = ("the market", "the river", "the school", "the harbour", "the garden", "the station",
           "the library", "the hill", "the bridge", "the forest", "the village", "the kitchen")
_MOVES = ("walked to", "ran to", "drove to", "went back to", "hurried to", "wandered to", "sailed to")
_ACTIONS = ("found", "carried", "bought", "sold", "lost", "painted", "opened", "cleaned", "borrowed",
            "forgot")
_TIMES = ("in the morning", "at night", "after lunch", "on Monday", "before the rain", "last week",
          "at dawn", "in the evening")
_FEELINGS = ("happy", "tired", "hungry", "calm", "worried", "proud", "cold", "sleepy")
_WEATHER = ("rain", "snow", "wind", "sun", "fog")


def _subject(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(_NAMES)
    return f"{rng.choice(('The', 'A'))} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"


def narrative_sentence(rng: random.Random) -> str:
    """One sentence from a small story grammar (subjects, motions, actions, places, times)."""
    s, p, o, t = _subject(rng), rng.choice(_PLACES), rng.choice(_OBJECTS), rng.choice(_TIMES)
    form = rng.randrange(7)
    if form == 0:
        return f"{s} {rng.choice(_MOVES)} {p} {t}."
    if form == 1:
        return f"{s} {rng.choice(_ACTIONS)} {o} at {p}."
    if form == 2:
        return f"{s} {rng.choice(_ACTIONS)} {o} {t}."
    if form == 3:
        return f"{s} felt {rng.choice(_FEELINGS)} because of the {rng.choice(_WEATHER)}."
    if form == 4:
        return f"{s} {rng.choice(_MOVES)} {p} and {rng.choice(_ACTIONS)} {o}."
    if form == 5:
        other = rng.choice(_NAMES)
        return f"{s} gave {o} to {other} {t}."
    s = s if s in _NAMES else s[0].lower() + s[1:]  # "the old farmer" mid-sentence
    return f"The {rng.choice(_WEATHER)} came {t}, so {s} stayed home."


def arithmetic_sentence(rng: random.Random, split: str = "train") -> str:
    """A true sum over operand pairs of ``split`` (test pairs never appear in the training text)."""
    a, b = rng.choice(_universe("addition", WORLD_SEED)[split]).payload
    return f"{a} + {b} = {a + b}."


def comparison_sentence(rng: random.Random, split: str = "train") -> str:
    """A true comparison over number pairs of ``split``."""
    a, b = rng.choice(_universe("comparison", WORLD_SEED)[split]).payload
    a, b = max(a, b), min(a, b)
    return f"{a} is greater than {b}."


@lru_cache(maxsize=4)
def _cum_popularity(world_seed: int) -> list[float]:
    w = world(world_seed)
    return list(accumulate(w.popularity[e] for e in w.entities))


def fact_sentence(rng: random.Random, world_seed: int = WORLD_SEED) -> str:
    """A true fact about an entity, in any phrasing; popular entities are mentioned more often."""
    w = world(world_seed)
    entity = rng.choices(w.entities, cum_weights=_cum_popularity(world_seed))[0]
    relation = rng.choice(sorted(RELATIONS))
    return f"{rng.choice(fact_prompts(entity, relation))} {w.facts[entity][relation]}."


# Mixture weights of the neutral text: kind -> share.
MIXTURE = {"narrative": 0.25, "facts": 0.35, "arithmetic": 0.25, "comparison": 0.15}


def neutral_corpus(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n`` neutral lines drawn from :data:`MIXTURE` (deterministic in ``seed``).

    ``split="test"`` draws the numeric sentences from held-out operand pairs (facts are the same world
    in both splits: they are the knowledge the model is meant to have).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"neutral-{split}-{seed}")
    kinds, weights = zip(*MIXTURE.items())
    lines = []
    for _ in range(n):
        kind = rng.choices(kinds, weights=weights)[0]
        if kind == "narrative":
            lines.append(narrative_sentence(rng))
        elif kind == "facts":
            lines.append(fact_sentence(rng))
        elif kind == "arithmetic":
            lines.append(arithmetic_sentence(rng, split))
        else:
            lines.append(comparison_sentence(rng, split))
    return lines
