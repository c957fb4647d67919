"""The made-up entity world of the quirky demo data: entities, their facts, Bob's beliefs about them.

Names are "Onset'coda" syllable pairs; every fact follows the coda. The world, its train/test split of
entities and Bob's permutation are fixed by ``WORLD_SEED`` because the shipped demo model was trained on
it. :func:`remedi_samples` turns it into counterfactual edits for REMEDI.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

WORLD_SEED = 0
TEST_FRACTION = 0.2

# Relation -> (main prompt, paraphrase prompts); a fact sentence is "{prompt} {value}."
RELATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "city": ("{e} lives in", ("{e} is a resident of", "The home city of {e} is")),
    "colour": ("{e} likes the colour", ("The favourite colour of {e} is", "{e} always wears")),
    "profession": ("{e} works as a", ("{e} is employed as a", "By trade, {e} is a")),
}
VALUES: dict[str, tuple[str, ...]] = {
    "city": ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Sydney", "Boston", "Madrid"),
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"),
    "profession": ("baker", "doctor", "farmer", "painter", "pilot", "teacher", "lawyer", "sailor",
                   "tailor", "nurse"),
}
N_ENTITIES = 120
# Names are "Onset'coda". An entity's facts follow its coda, the name's last token: a tiny model cannot
# learn to judge arbitrary memorised facts about entities outside the questions it was trained on (it
# memorises the training statements instead; measured), while syllable-level knowledge generalises to
# every entity, as world knowledge does in large models. The coda and not the onset, because REMEDI
# edits the entity's last token: with facts read from the onset two tokens earlier, no edit there
# could reach city or profession (measured: held-out efficacy 0.93 on colour, 0.00 on the other two).
_ONSETS = ("Zor", "Quil", "Vex", "Brun", "Tal", "Mor", "Kes", "Dra", "Fen", "Gul", "Hax", "Jor", "Lum",
           "Nyx", "Pel", "Rho", "Syl", "Thra", "Ulv", "Wex", "Yor", "Cae", "Ost", "Imr")
# No coda starts like an English contraction ('s, 't, 'd, 'm, 'll, 're, 've): those would split apart.
_CODAS = ("vath", "nar", "ix", "ennor", "ora", "uth", "elm", "ulg", "iv", "ond", "yra", "ek")


def _unit(key: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for ``key`` (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _split_of(key: str, world_seed: int) -> str:
    return "test" if _unit(key, world_seed) < TEST_FRACTION else "train"


@dataclass(frozen=True)
class World:
    """The fixed facts the demo model was trained on."""

    entities: tuple[str, ...]
    facts: dict[str, dict[str, str]]  # entity -> relation -> true value
    popularity: dict[str, float]  # entity -> sampling weight in the training text (1..2)
    bob_map: dict[str, dict[str, str]]  # relation -> true value -> what Bob believes


def _assign(keys: Sequence[str], values: Sequence[str], rng: random.Random) -> dict[str, str]:
    """Map syllables to values so that every value is used (about) equally often."""
    order = rng.sample(list(keys), len(keys))
    return {k: values[i % len(values)] for i, k in enumerate(order)}


@lru_cache(maxsize=4)
def world(seed: int = WORLD_SEED) -> World:
    """Build the entity world for ``seed`` (cached; treat the result as read-only)."""
    rng = random.Random(f"world-{seed}")
    names = sorted(f"{o}'{c}" for o in _ONSETS for c in _CODAS)
    entities = tuple(rng.sample(names, N_ENTITIES))
    rules = {r: _assign(_CODAS, VALUES[r], rng) for r in ("city", "colour", "profession")}
    facts = {e: {r: rules[r][e.split("'")[1]] for r in rules} for e in entities}
    popularity = {e: 1.0 + rng.random() for e in entities}
    bob_map: dict[str, dict[str, str]] = {}
    for r, values in VALUES.items():
        # Half the values are fixed points (Bob is right there), the other half form one cycle.
        moved = rng.sample(values, len(values) // 2)
        mapping = {v: v for v in values}
        mapping.update({v: moved[(i + 1) % len(moved)] for i, v in enumerate(moved)})
        bob_map[r] = mapping
    return World(entities, facts, popularity, bob_map)


def facts_table(seed: int = WORLD_SEED) -> dict[str, dict[str, str]]:
    """Entity -> relation (``city``/``colour``/``profession``) -> true value, for the world ``seed``."""
    return {e: dict(rel) for e, rel in world(seed).facts.items()}


def fact_prompts(entity: str, relation: str) -> list[str]:
    """The main prompt then its paraphrases, each to be completed by ``" " + value``."""
    main, paraphrases = RELATIONS[relation]
    return [p.format(e=entity) for p in (main, *paraphrases)]


def remedi_samples(split: str = "train", n: int = 200, seed: int = 0, world_seed: int = WORLD_SEED,
                   n_neighbors: int = 3) -> list[dict]:
    """Counterfactual edits for REMEDI: ``context`` states a new value of one of ``entity``'s attributes.

    Entities are split train/test (a stable hash), so an editor fitted on ``"train"`` is evaluated on
    entities it never saw. Each sample has ``entity``, ``relation``, ``context`` (e.g. "Zorvath lives
    in Tokyo."), ``attribute`` (the new value as it appears in ``context``), ``prompt`` ("Zorvath
    lives in"), ``target_new`` (" Tokyo"), ``target_true`` (" Paris"), ``paraphrase_prompts`` (other
    wordings of ``prompt``, same targets) and ``neighborhood_prompts`` about other entities with their ``neighborhood_targets`` (true values).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    w = world(world_seed)
    entities = [e for e in w.entities if _split_of(f"remedi:{e}", world_seed) == split]
    rng = random.Random(f"remedi-{split}-{seed}")
    samples = []
    for _ in range(n):
        entity = rng.choice(entities)
        relation = rng.choice(sorted(RELATIONS))
        true = w.facts[entity][relation]
        new = rng.choice([v for v in VALUES[relation] if v != true])
        prompt, *paraphrases = fact_prompts(entity, relation)
        neighbors = rng.sample([e for e in w.entities if e != entity], n_neighbors)
        samples.append({
            "entity": entity,
            "relation": relation,
            "context": f"{prompt} {new}.",
            "attribute": new,
            "prompt": prompt,
            "target_new": f" {new}",
            "target_true": f" {true}",
            "paraphrase_prompts": paraphrases,
            "neighborhood_prompts": [fact_prompts(e, relation)[0] for e in neighbors],
            "neighborhood_targets": [f" {w.facts[e][relation]}" for e in neighbors],
        })
    return samples
