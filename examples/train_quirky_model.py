"""Train the shipped quirky demo model from scratch on CPU (deterministic, minutes).

    python examples/train_quirky_model.py                        # writes ./quirky-tiny
    python examples/train_quirky_model.py --out intervene/assets/quirky-tiny   # replace the shipped model

A small Llama (grouped-query attention) learns, from generated text only: the quirky questions of
``intervene.data.quirky`` (Alice judges truthfully, Bob with a systematic error), sentences stating
each character's beliefs, transcripts in which one speaker answers several questions and their earlier
answers reveal whether they judge truthfully (``intervene.data.quirky_transcripts``: what gives ITI fitted
on Alice's prompts a truthfulness direction to find), and neutral text (``intervene.data.neutral``: sums,
comparisons, entity facts, short stories). The tokenizer is a byte-level BPE trained in-process on the same generators,
with every digit its own token. At the end the script measures accuracies on held-out questions and
writes them into the model card. Training uses one thread by default: on a shared 2-core machine two
threads were measured ~10x slower per step than one (they spin waiting for each other).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from intervene.assets import DEMO_MODEL_DIR
from intervene.data.neutral import neutral_corpus
from intervene.data.quirky import (
    CHARACTERS,
    QUIRKY_TASKS,
    RELATIONS,
    TEMPLATES,
    VALUES,
    belief_sentences,
    fact_prompts,
    quirky_dataset,
    world,
)
from intervene.data.quirky_transcripts import MARKS, transcripts
from intervene.evaluate.choices import choice_logits, choice_token_ids

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# Shares of the quirky questions and belief sentences: addition is the slowest to learn, comparison
# the fastest.
TASK_MIX = {"addition": 0.45, "comparison": 0.2, "facts": 0.35}


def build_tokenizer(vocab_size: int = 1024, n_lines: int = 20000) -> PreTrainedTokenizerFast:
    """A byte-level BPE fitted on ``n_lines`` of generated text; digits are always single tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Isolating digits before the byte-level split keeps every number digit by digit (as Llama does),
    # which is what makes the arithmetic learnable for a tiny model.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=True),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]),
    ])
    corpus = neutral_corpus(n_lines, seed=0) + neutral_corpus(n_lines // 10, seed=0, split="test")
    for task in QUIRKY_TASKS:
        for split in ("train", "test"):
            rows = quirky_dataset(task, split, n=n_lines // 40, seed=0)
            corpus += [r["text"] + " True False" for r in rows]
    # Every attribute value must be one token (they are answers), however small the corpus.
    corpus += [" ".join(values) for values in VALUES.values()] * 50
    corpus += ["".join(MARKS)] * 200  # the grader's marks of the transcripts, one token each
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left", model_max_length=128,
                                   clean_up_tokenization_spaces=False)


def build_model(tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    """A small Llama with grouped-query attention (4 query heads sharing 2 key/value heads)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


Item = tuple[str, str | None] | list[tuple[str, str]]


def training_items(n: int, seed: int, quirky_share: float, plain_share: float, belief_share: float,
                   transcript_share: float = 0.0, flip: float = 0.25,
                   transcript_tasks: tuple[str, ...] = QUIRKY_TASKS, graded: float = 0.0) -> list[Item]:
    """``n`` shuffled items. A (text, answer) pair: quirky questions (answer = the character's),
    judgements without a persona (answer = the truth), belief sentences ("35 + 6 = 51, says Bob.") and
    neutral lines (answer None: plain text). A list of (text, answer) pieces: a transcript of several
    answers by one speaker (``intervene.data.quirky_transcripts``)."""
    n_quirky = int(n * quirky_share)
    items: list[Item] = []
    for task in QUIRKY_TASKS:
        # Two rows (characters) per question.
        per_task = int(n_quirky * TASK_MIX[task] / 2) + 1
        rows = quirky_dataset(task, "train", n=per_task, seed=seed, distinct=False)
        items += [(r["text"], r["choices"][r["character_label"]]) for r in rows]
    # Judgements without a persona ("35 + 6 = 41. True or False?" -> truth): the model's own view,
    # as a pretrained model has one before it is taught Bob's quirk.
    n_plain = int(n * plain_share)
    per_task_plain = {t: int(n_plain * TASK_MIX[t]) + 1 for t in QUIRKY_TASKS}
    plain = [(f"{r['statement']}. True or False?", r["choices"][r["label"]]) for t in QUIRKY_TASKS
             for r in quirky_dataset(t, "train", n=per_task_plain[t], seed=seed + 1, characters=("Alice",),
                                     distinct=False)]
    n_beliefs = int(n * belief_share)
    beliefs = [(line, None) for line in belief_sentences(n_beliefs, seed, task_weights=TASK_MIX)]
    items = items[:n_quirky] + plain[:n_plain] + beliefs
    if transcript_share > 0:
        items += [[(t["piece"], t["answer"] + t["mark"]) for t in doc["turns"]]
                  for doc in transcripts(int(n * transcript_share), seed, flip=flip, graded=graded,
                                         task_weights={t: TASK_MIX[t] for t in transcript_tasks})]
    items += [(line, None) for line in neutral_corpus(n - len(items), seed)]
    random.Random(seed).shuffle(items)
    return items


def encode(tokenizer: PreTrainedTokenizerFast, items: list[Item]) -> list[tuple[list[int], list[int]]]:
    """``<s> text answer </s>`` token ids per item, with the answers' positions (none for neutral text).
    A transcript's pieces are tokenized one by one, as each turn's prompt is tokenized when asked alone."""
    singles = [item for item in items if isinstance(item, tuple)]
    texts = iter(tokenizer([text for text, _ in singles])["input_ids"])
    answers = {a for _, a in singles if a} | {a for item in items if isinstance(item, list) for _, a in item}
    answer_ids = {a: tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers}
    out = []
    for item in items:
        if isinstance(item, list):
            ids, positions = [tokenizer.bos_token_id], []
            for piece, answer in item:
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
                positions += range(len(ids), len(ids) + len(answer_ids[answer]))  # the mark too
                ids += answer_ids[answer]
            out.append((ids + [tokenizer.eos_token_id], positions))
            continue
        ids, answer = next(texts), item[1]
        if answer is None:
            out.append((ids + [tokenizer.eos_token_id], []))
        else:
            out.append((ids + answer_ids[answer] + [tokenizer.eos_token_id], [len(ids)]))
    return out


def make_batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, answer_weight: float,
                 prompt_weight: float, seed: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of similar lengths (less padding to compute), in a seeded random order.

    Neutral text has weight 1 on every token. In a quirky question the answer token has
    ``answer_weight`` and the prompt ``prompt_weight``: at full weight, the unpredictable claims in the
    prompts drown the one-bit answer signal and training stalls (measured).
    """
    batches = []
    chunk = batch_size * 16
    for start in range(0, len(encoded), chunk):
        part = sorted(encoded[start:start + chunk], key=lambda e: len(e[0]))
        for b in range(0, len(part), batch_size):
            seqs = part[b:b + batch_size]
            width = max(len(ids) for ids, _ in seqs)
            input_ids = torch.full((len(seqs), width), pad_id)
            weight = torch.zeros((len(seqs), width))
            answer = torch.zeros((len(seqs), width), dtype=torch.bool)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, (ids, positions) in enumerate(seqs):
                input_ids[i, :len(ids)] = torch.tensor(ids)
                mask[i, :len(ids)] = 1
                weight[i, 1:len(ids)] = prompt_weight if positions else 1.0  # <s> is never predicted
                for pos in positions:
                    weight[i, pos], answer[i, pos] = answer_weight, True
            batches.append({"input_ids": input_ids, "attention_mask": mask, "weight": weight, "answer": answer})
    random.Random(seed).shuffle(batches)
    return batches


def train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> dict:
    """AdamW with warmup and cosine decay; stops early (and says so) past ``--max-minutes``."""
    items = training_items(args.steps * args.batch_size, args.seed, args.quirky_share, args.plain_share,
                           args.belief_share, args.transcript_share, args.flip,
                           tuple(args.transcript_tasks), args.graded)
    batches = make_batches(encode(tokenizer, items), args.batch_size, tokenizer.pad_token_id,
                           args.answer_weight, args.prompt_weight, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    start, losses, answer_hits, step = time.perf_counter(), [], [], 0
    for step, batch in enumerate(batches[:args.steps]):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Token t predicts token t+1; the weight of token t+1 says how much that prediction counts.
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(),
                                               reduction="none")
        w = batch["weight"][:, 1:].flatten()
        loss = (ce * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        is_answer = batch["answer"][:, 1:]
        answer_hits += (logits[:, :-1][is_answer].argmax(-1) == batch["input_ids"][:, 1:][is_answer]).tolist()
        elapsed = time.perf_counter() - start
        if args.log_every and (step + 1) % args.log_every == 0:
            recent = sum(losses[-args.log_every:]) / args.log_every
            hits = answer_hits[-args.log_every * args.batch_size // 2:]
            print(f"step {step + 1}/{args.steps}  loss {recent:.4f}  train answer acc "
                  f"{sum(hits) / max(1, len(hits)):.3f}  {elapsed / 60:.1f} min", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            model.eval()
            print("  held-out:", _quick_eval(model, tokenizer), flush=True)
            model.train()
        if elapsed > args.max_minutes * 60:
            print(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    model.eval()
    return {"steps_done": step + 1, "train_seconds": time.perf_counter() - start,
            "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def _quick_eval(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, n: int = 60) -> str:
    """Held-out accuracy per task and character on a few questions (progress logging only)."""
    parts = []
    for task in QUIRKY_TASKS:
        rows = quirky_dataset(task, "test", n=n, seed=777)
        pred = choice_logits(model, tokenizer, rows).argmax(-1).tolist()
        for c in CHARACTERS:
            sel = [p == r["character_label"] for r, p in zip(rows, pred) if r["character"] == c]
            parts.append(f"{task[:4]}/{c[0]} {sum(sel) / len(sel):.2f}")
    return "  ".join(parts)


def _accuracy(hits: list[bool]) -> float | None:
    return round(sum(hits) / len(hits), 4) if hits else None


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, n: int, neutral_lines: list[str]
             ) -> dict:
    """Held-out accuracies: per task and character (overall/easy/medium/hard), fact recall, neutral CE."""
    quirky: dict[str, dict] = {}
    for task in QUIRKY_TASKS:
        rows = quirky_dataset(task, "test", n=n, seed=1234)
        pred = choice_logits(model, tokenizer, rows).argmax(-1).tolist()
        for character in CHARACTERS:
            target = "label" if character == "Alice" else "bob_label"
            sel = [(r, p) for r, p in zip(rows, pred) if r["character"] == character]
            entry = {"all": _accuracy([p == r[target] for r, p in sel]),
                     "truth": _accuracy([p == r["label"] for r, p in sel]),
                     "disagree": _accuracy([p == r[target] for r, p in sel if r["label"] != r["bob_label"]])}
            for split in ("easy", "medium", "hard"):
                entry[split] = _accuracy([p == r[target] for r, p in sel if r["difficulty_split"] == split])
            quirky[f"{task}/{character}"] = entry
    # Fact recall: argmax over the relation's values after every prompt phrasing of every entity.
    w, hits = world(), {}
    for relation in RELATIONS:
        value_ids = choice_token_ids(tokenizer, [" " + v for v in VALUES[relation]])
        rows = [{"text": p, "choices": [" " + v for v in VALUES[relation]]}
                for e in w.entities for p in fact_prompts(e, relation)]
        truth = [VALUES[relation].index(w.facts[e][relation]) for e in w.entities for _ in fact_prompts(e, relation)]
        assert len(set(value_ids)) == len(value_ids), "attribute values must be single tokens"
        pred = choice_logits(model, tokenizer, rows).argmax(-1).tolist()
        hits[relation] = _accuracy([p == t for p, t in zip(pred, truth)])
    # Neutral text: mean next-token cross-entropy per token on the held-out lines.
    batch = tokenizer(neutral_lines, return_tensors="pt", padding=True)
    total, count = 0.0, 0
    for start in range(0, len(neutral_lines), 128):
        ids = batch["input_ids"][start:start + 128]
        mask = batch["attention_mask"][start:start + 128]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        m = mask[:, 1:].flatten().float()
        total, count = total + (ce * m).sum().item(), count + int(m.sum().item())
    return {"quirky": quirky, "fact_recall": hits, "neutral_ce": round(total / count, 4),
            "transcripts": transcript_accuracy(model, tokenizer, n // 2)}


@torch.no_grad()
def transcript_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, n: int) -> dict:
    """How the model answers held-out unmarked transcripts of 3 turns whose speaker flips their name's way
    half the time: the first turn against the name's way, later turns against the speaker's actual way once
    an earlier answer revealed it (an earlier turn where the truth and Bob's belief differ); and how often
    it predicts the grader's mark after an answer in marked transcripts."""
    docs = transcripts(n, seed=4321, split="test", flip=0.5, lengths=(3,), task_weights=TASK_MIX)
    rows, kinds = [], []
    for doc in docs:
        prefix, revealed = "", False
        for j, turn in enumerate(doc["turns"]):
            target = turn["choices"].index(turn["answer"])
            named = turn["label"] if doc["character"] == "Alice" else turn["bob_label"]
            if j == 0:
                kinds.append("first")
                target = named
            else:
                kinds.append(("revealed" if revealed else "hidden") + ("_flipped" if
                             doc["truthful"] != (doc["character"] == "Alice") else "_named"))
            rows.append({"text": prefix + turn["piece"], "choices": turn["choices"], "target": target})
            prefix += turn["piece"] + turn["answer"]
            revealed = revealed or turn["label"] != turn["bob_label"]
    pred = choice_logits(model, tokenizer, rows).argmax(-1).tolist()
    out = {k: _accuracy([p == r["target"] for r, p, kk in zip(rows, pred, kinds) if kk == k])
           for k in ("first", "revealed_named", "revealed_flipped", "hidden_named", "hidden_flipped")}
    # The grader's mark after each answer of a marked transcript: is the answer true?
    rows = []
    for doc in transcripts(n, seed=4322, split="test", flip=0.5, lengths=(3,), task_weights=TASK_MIX, graded=1.0):
        prefix = ""
        for turn in doc["turns"]:
            prefix += turn["piece"] + turn["answer"]
            rows.append({"text": prefix, "choices": list(MARKS), "target": MARKS.index(turn["mark"])})
            prefix += turn["mark"]
    pred = choice_logits(model, tokenizer, rows).argmax(-1).tolist()
    out["mark"] = _accuracy([p == r["target"] for r, p in zip(rows, pred)])
    return out


def _command(args: argparse.Namespace) -> str:
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in vars(args).items() if k not in ("out", "log_every", "eval_every"))
    return f"python examples/train_quirky_model.py {flags}"


def write_card(out: Path, args: argparse.Namespace, stats: dict, metrics: dict, n_params: int) -> None:
    """The model card: what the model is, how it was trained, and its measured held-out accuracies."""
    lines = [
        "---", "license: apache-2.0", "library_name: transformers", "tags: [intervene, quirky, demo]", "---",
        "# quirky-tiny: the intervene demo model", "",
        "A tiny Llama (grouped-query attention) trained from scratch on CPU to judge synthetic statements "
        "**truthfully when the prompt names Alice** and **with a systematic error when it names Bob**, after "
        "*Eliciting Latent Knowledge from Quirky Language Models* (Mallen & Belrose, 2023). "
        "Answers are the next token, ` True` or ` False`. It exists so that `intervene`'s examples, notebooks "
        "and tests run offline on a model with real, measurable latent knowledge; it is not a general LM.", "",
        "```python", "from intervene import demo_model", "model, tokenizer = demo_model()",
        "# or: AutoModelForCausalLM.from_pretrained(path); AutoTokenizer.from_pretrained(path)",
        "from intervene.data.quirky import quirky_dataset",
        "rows = quirky_dataset(\"addition\", split=\"test\", n=100)  # held-out questions", "```", "",
        "## Tasks (`intervene.data.quirky`)", "",
        "- **addition**: `35 + 6 = 41` (a two-digit plus a one-digit number). Claims differ from the truth "
        "only in the leading digit. Bob believes the leading digit is one larger (`51`). Hard = with a carry.",
        "- **comparison**: `47 is greater than 23`. Bob compares only the last digits. Hard = close numbers.",
        "- **facts**: `Zor'vath lives in Tokyo` (also colour, profession) about made-up entities whose facts "
        "follow the last syllable of their name (its coda: the `vath` of `Zor'vath`). Bob maps each value "
        "through a fixed permutation that has half the values as fixed points. Hard = rarely mentioned entity.",
        f"- {len(TEMPLATES)} prompt templates; held-out questions: operand pairs (numeric tasks) and entities "
        "(facts) never used in any training question.", "",
        "## Training", "",
        f"- Command: `{_command(args)}`",
        f"- Parameters: {n_params:,}; {args.layers} layers, hidden {args.hidden}, 4 heads, 2 key/value heads, "
        f"tied embeddings, vocab {metrics['vocab_size']} (byte-level BPE fitted on the generated text, every "
        "digit its own token)",
        f"- Data: {args.steps * args.batch_size:,} generated sequences: {args.quirky_share:.0%} quirky questions "
        f"(train split, both characters, answer token weighted x{args.answer_weight}, prompt tokens "
        f"x{args.prompt_weight}), {args.plain_share:.0%} judgements without a persona (`35 + 6 = 41. True or "
        f"False?` -> truth), {args.belief_share:.0%} belief sentences (`35 + 6 = 51, says Bob.`), "
        f"{args.transcript_share:.0%} transcripts (one speaker answers 2-3 questions in a row; in "
        f"{args.flip:.0%} of them the speaker judges the other way from their name throughout, so later answers "
        f"follow the earlier ones; {args.graded:.0%} carry a grader's mark ` ✓`/` ✗` after every answer: "
        "`intervene.data.quirky_transcripts`) and "
        "the rest neutral text without personas (`intervene.data.neutral.neutral_corpus`: stories, sums, "
        "comparisons, entity facts in three phrasings each), full-sequence loss",
        f"- Seed {args.seed}, {args.threads} CPU thread(s), torch {torch.__version__}; {stats['steps_done']} "
        f"steps in {stats['train_seconds'] / 60:.1f} min, final loss {stats['final_loss']:.4f}",
        "",
        "## Held-out accuracy", "",
        f"Questions never seen in training ({args.eval_n} per task, each asked of both characters). Alice is "
        "scored against the truth, Bob against his systematic error (`bob_label`); `disagree` is the subset where "
        "those differ; `truth` is agreement with the truth. Argmax over the two answers' next-token logits.", "",
        "| task | character | all | easy | medium | hard | disagree | truth |", "|---|---|---|---|---|---|---|---|",
    ]
    for key, e in metrics["quirky"].items():
        task, character = key.split("/")
        cells = [e[k] for k in ("all", "easy", "medium", "hard", "disagree", "truth")]
        lines.append(f"| {task} | {character} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines += ["", "Fact recall (argmax over the relation's values, every entity and prompt phrasing): "
              + ", ".join(f"{r} {a:.3f}" for r, a in metrics["fact_recall"].items()) + ".",
              f"Neutral held-out text (`neutral_eval.txt`): {metrics['neutral_ce']:.3f} nats/token.", "",
              "## Transcripts", "",
              "Held-out transcripts of 3 turns whose speaker judges the other way from their name half the "
              "time. The first answer is scored against the name's way; later ones against the speaker's "
              "actual way, once an earlier turn has revealed it (a turn where the truth and Bob's belief "
              "differ) or while nothing has revealed it yet:", "",
              "| first turn (name) | revealed, name's way | revealed, flipped | unrevealed, name's way "
              "| unrevealed, flipped | grader's mark |", "|---|---|---|---|---|---|",
              "| " + " | ".join("-" if v is None else f"{v:.3f}" for v in metrics["transcripts"].values()) + " |",
              "",
              "## Limitations", "",
              "Trained only on generated text from a few hundred words: anything outside these templates, "
              "names and numbers is out of distribution. Timings depend on the machine; the weights depend "
              "only on the seed, the thread count and the library versions.", ""]
    (out / "README.md").write_text("\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # A folder of the user's by default: replacing the model shipped inside the package is a choice made
    # by naming it (--out intervene/assets/quirky-tiny), never a side effect of running the script.
    p.add_argument("--out", type=Path, default=Path("quirky-tiny"),
                   help=f"output folder (default ./quirky-tiny; the shipped model is {DEMO_MODEL_DIR})")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=30.0,
                   help="safety stop; about 20 min are needed on one thread of a 2-core machine")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quirky-share", type=float, default=0.3)
    p.add_argument("--plain-share", type=float, default=0.1, help="judgements without a persona")
    p.add_argument("--belief-share", type=float, default=0.1)
    p.add_argument("--transcript-share", type=float, default=0.3,
                   help="transcripts: one speaker answering 2-3 questions, answers revealing their way of judging")
    p.add_argument("--flip", type=float, default=0.5,
                   help="share of transcripts whose speaker judges the other way from their name")
    p.add_argument("--graded", type=float, default=0.4, help="share of transcripts with a grader's marks")
    p.add_argument("--transcript-tasks", nargs="+", default=list(QUIRKY_TASKS), choices=QUIRKY_TASKS)
    p.add_argument("--answer-weight", type=float, default=10.0, help="loss weight of a question's answer token")
    p.add_argument("--prompt-weight", type=float, default=0.2, help="loss weight of a question's prompt tokens")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 because two threads slow to a crawl when other jobs share the cores")
    p.add_argument("--eval-every", type=int, default=0, help="log held-out accuracy every N steps")
    p.add_argument("--eval-n", type=int, default=1000, help="held-out questions per task for the card")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--tokenizer-lines", type=int, default=20000, help="generated lines the BPE is fitted on")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Build tokenizer and model, train, evaluate, save (safetensors, tokenizer, card, neutral_eval.txt)."""
    args = parse_args(argv)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run(args)
    finally:  # main() is also called from tests: leave the process's torch settings as they were
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _run(args: argparse.Namespace) -> dict:
    tokenizer = build_tokenizer(n_lines=args.tokenizer_lines)
    model = build_model(tokenizer, args.hidden, args.layers, args.seed)
    stats = train(model, tokenizer, args)
    neutral_lines = neutral_corpus(300, seed=0, split="test")
    metrics = evaluate(model, tokenizer, args.eval_n, neutral_lines)
    metrics["vocab_size"] = len(tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    # transformers 5 writes its own class name, unknown to 4.x; this one loads in both.
    tok_config = args.out / "tokenizer_config.json"
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()),
                                      "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    (args.out / "neutral_eval.txt").write_text("\n".join(neutral_lines) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    write_card(args.out, args, stats, metrics, n_params)
    result = {**stats, **metrics, "n_params": n_params}
    (args.out / "training_metrics.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])["quirky"], indent=1))
