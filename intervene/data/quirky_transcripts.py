"""Quirky transcripts: one speaker answers several questions in a row, and their answers reveal how they judge.

A single quirky question names Alice (truthful) or Bob (systematically wrong) and the name decides the
answer. In a transcript the speaker's earlier answers are evidence too: with probability ``flip`` the
speaker answers the other way from their name throughout (Alice with Bob's error, Bob truthfully), so
once an earlier answer has shown which way they judge, later answers follow it. Large language models
behave the same way in context: false demonstrations make them answer later questions falsely.

This is what gives the demo model an in-context *truthfulness* latent that is not the name: whether the
answers so far agreed with the truth. It is the latent ITI reads when it is fitted on Alice's prompts
followed by true and false answers (TruthfulQA's format), and shifting along it makes Bob truthful.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from intervene.data.quirky import CHARACTERS, QUIRKY_TASKS, quirky_dataset
from intervene.data.quirky_world import WORLD_SEED

SEPARATOR = "\n"
MARKS = (" ✗", " ✓")  # a grader's mark after an answer: index = whether the answer is true


def transcripts(
    n: int,
    seed: int = 0,
    split: str = "train",
    flip: float = 0.25,
    lengths: Sequence[int] = (2, 3),
    task_weights: dict[str, float] | None = None,
    characters: Sequence[str] = CHARACTERS,
    graded: float = 0.0,
    world_seed: int = WORLD_SEED,
) -> list[dict]:
    """``n`` transcripts, each ``{"character", "truthful", "graded", "turns", "text"}``.

    ``truthful`` is the speaker's way of judging for the whole transcript: their name's way (Alice
    truthful, Bob not) with probability ``1 - flip``. ``turns`` is a list of ``len in lengths`` quirky
    rows of random tasks (weighted by ``task_weights``) with an extra ``"answer"`` (``" True"`` /
    ``" False"``: the truth if ``truthful`` else Bob's belief) and ``"piece"``, the text from the previous
    answer up to this turn's answer (``SEPARATOR`` + prompt; the first turn's piece is its prompt). The
    full ``text`` is ``"".join(piece + answer + mark)``; every turn's prompt is a quirky prompt as
    :func:`~intervene.data.quirky.quirky_dataset` renders it. In a share ``graded`` of the transcripts a
    grader marks every answer (``"mark"``: ``" ✓"`` if it is true, ``" ✗"`` if not; ``""`` elsewhere).
    Predicting the mark makes a model compute, at the answer token, whether the answer is true: the
    intermediate step it needs to tell, in an unmarked transcript, which way the speaker judges.
    """
    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip must be in [0, 1], got {flip}")
    weights = task_weights or dict.fromkeys(QUIRKY_TASKS, 1.0)
    rng = random.Random(f"transcripts-{split}-{seed}-{flip}")
    plan = []
    need = {(t, c): 0 for t in weights for c in characters}
    for _ in range(n):
        character = rng.choice(list(characters))
        truthful = (character == "Alice") != (rng.random() < flip)
        tasks = rng.choices(list(weights), weights=list(weights.values()), k=rng.choice(list(lengths)))
        for t in tasks:
            need[t, character] += 1
        plan.append((character, truthful, tasks, rng.random() < graded))
    pools = {(t, c): iter(quirky_dataset(t, split, n=k, characters=(c,), seed=seed + 100, world_seed=world_seed,
                                         distinct=False))
             for (t, c), k in need.items() if k}
    out = []
    for character, truthful, tasks, marked in plan:
        turns = []
        for j, t in enumerate(tasks):
            row = dict(next(pools[t, character]))
            said = row["label"] if truthful else row["bob_label"]
            row["answer"] = row["choices"][said]
            row["mark"] = MARKS[int(said == row["label"])] if marked else ""
            row["piece"] = row["text"] if j == 0 else SEPARATOR + row["text"]
            turns.append(row)
        out.append({"character": character, "truthful": truthful, "graded": marked, "turns": turns,
                    "text": "".join(r["piece"] + r["answer"] + r["mark"] for r in turns)})
    return out
