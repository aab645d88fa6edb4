"""Arithmetic tasks for the tiny fidelity model (issue 6): generator, splits, scorer, tokenizer.

Problems are written from templates, one character per token:

| task | prompt | answer |
|---|---|---|
| `add` | `482+39=` | `521` |
| `sub` | `37-482=` | `-445` |
| `mul` | `482*7=` | `3374` |
| `steps` (two steps, worked) | `(48+39)*7=` | `48+39=87;87*7=609` |

Operands have 1 to 3 digits (the digit count is drawn first, so short numbers are common);
`mul` multiplies by one digit; `steps` adds two numbers of 1-2 digits and multiplies by one
digit, writing the intermediate sum. Every sequence (prompt + answer + one eos) fits one block
of 32 tokens.

Splits are disjoint by construction: a problem belongs to the split chosen by a hash of its
prompt (90% train, 5% validation, 5% test), so training can draw fresh problems forever without
ever seeing a held-out one. Everything is deterministic for a seed.

Scoring is exact match of the final answer (the text after the last `=` of the answer), as
GSM8K-style benchmarks score; a worked answer with a wrong step but the right final number
counts as right, one with the right steps and a wrong final number does not.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterable, List, Sequence

TASKS = ("add", "sub", "mul", "steps")
SPLITS = ("train", "validation", "test")
CHARS = "0123456789+-*=();"
EOS, PAD, MASK = "<|eos|>", "<|pad|>", "<|mask|>"
SPECIALS = (EOS, PAD, MASK)
MAX_SEQUENCE = 32  # prompt + answer + eos, in tokens: one block

# Percent of the hash space owned by each split: [0, 90) train, [90, 95) validation, rest test.
_SPLIT_BOUNDS = {"train": (0, 90), "validation": (90, 95), "test": (95, 100)}


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def make_problem(rng: random.Random, task: str) -> Problem:
    """One problem of `task` drawn from `rng`."""
    if task == "add":
        a, b = _number(rng, 3), _number(rng, 3)
        return Problem(task, f"{a}+{b}=", str(a + b))
    if task == "sub":
        a, b = _number(rng, 3), _number(rng, 3)
        return Problem(task, f"{a}-{b}=", str(a - b))
    if task == "mul":
        a, b = _number(rng, 3), _number(rng, 1)
        return Problem(task, f"{a}*{b}=", str(a * b))
    if task == "steps":
        a, b, c = _number(rng, 2), _number(rng, 2), _number(rng, 1)
        s = a + b
        return Problem(task, f"({a}+{b})*{c}=", f"{a}+{b}={s};{s}*{c}={s * c}")
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def split_of(prompt: str) -> str:
    """The split that owns `prompt` (a fixed hash, independent of any seed)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little") % 100
    for split, (lo, hi) in _SPLIT_BOUNDS.items():
        if lo <= bucket < hi:
            return split
    raise AssertionError("unreachable")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def problem_stream(split: str, seed: int, tasks: Sequence[str] = TASKS):
    """An endless, deterministic stream of `split` problems, tasks drawn uniformly.

    Duplicates are allowed (used for training, where fresh draws repeat small problems).
    """
    _check_split(split)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks must be drawn from {TASKS}, got {t!r}")
    rng = random.Random(f"{seed}/{split}")
    while True:
        p = make_problem(rng, rng.choice(tuple(tasks)))
        if split_of(p.prompt) == split:
            yield p


def sample_problems(split: str, n: int, seed: int, tasks: Sequence[str] = TASKS) -> List[Problem]:
    """`n` distinct problems of `split` (by prompt), the same list for the same arguments."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    out, seen = [], set()
    for p in problem_stream(split, seed, tasks):
        if len(out) == n:
            break
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def final_answer(text: str) -> str:
    """The final result written in an answer: the text after its last '=' (stripped)."""
    return text.rsplit("=", 1)[-1].strip()


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction's final answer equals the reference's final answer."""
    return final_answer(prediction) == final_answer(answer)


def accuracy(predictions: Iterable[str], problems: Sequence[Problem]) -> float:
    """Fraction of exact matches; predictions and problems pair up in order."""
    predictions = list(predictions)
    if len(predictions) != len(problems):
        raise ValueError(
            f"predictions ({len(predictions)}) and problems ({len(problems)}) must pair up"
        )
    if not problems:
        return 0.0
    return sum(exact_match(p, q.answer) for p, q in zip(predictions, problems)) / len(problems)


# ---------------------------------------------------------------------------------------------
# Tokenizer: one token per character, saved in the `tokenizers` library's tokenizer.json format.
# ---------------------------------------------------------------------------------------------

def token_ids() -> dict:
    """The fixed vocabulary: CHARS in order, then eos, pad, mask."""
    vocab = {c: i for i, c in enumerate(CHARS)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    return vocab


def save_tokenizer(directory: str) -> str:
    """Write tokenizer.json (and a tokenizer_config.json naming the specials) into `directory`."""
    import json
    import os

    from .tiny import build_tokenizer

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    # One token per character of CHARS; WordLevel needs an unknown token, and encode() below
    # rejects unknown characters before it is ever used.
    build_tokenizer(SPECIALS, token_ids(), unknown=PAD).save(path)
    # "dmoe_task": the dmoe CLI feeds raw problems, no chat template (tiny.is_arithmetic_model)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS,
              "pad_token": PAD, "mask_token": MASK, "model_max_length": 4096,
              "dmoe_task": "arithmetic"}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


def encode(text: str) -> List[int]:
    """Token ids of plain task text; unknown characters are a ValueError."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    vocab = token_ids()
    bad = sorted(set(text) - set(CHARS))
    if bad:
        raise ValueError(f"text holds characters outside the task alphabet {CHARS!r}: {bad}")
    return [vocab[c] for c in text]


def decode(ids: Iterable[int]) -> str:
    """Text of ids up to the first eos; pad and mask are dropped."""
    inverse = {i: s for s, i in token_ids().items()}
    out = []
    for i in ids:
        s = inverse.get(int(i), "")
        if s == EOS:
            break
        if s not in SPECIALS:
            out.append(s)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Solving problems with a model: block-diffusion decoding through dmoe_triton.generate().
# ---------------------------------------------------------------------------------------------

def solve(model, problems: Sequence[Problem], batch_size: int = 256, progress=None,
          cuda_graph=None):
    """Decode every problem's answer with `generate` (LLaDA2 defaults: block 32, 32 steps,
    threshold 0.95, argmax). Each batch generates up to the end of the prompts' block, which is
    where the model learned to stop. Returns (answers as text, list of GenerationStats).

    `progress`, if given, is called with the number of problems just finished; `cuda_graph`
    goes to `generate`.
    """
    from .decoding import generate

    answers, stats = [], []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [encode(p.prompt) for p in chunk]
        longest = max(len(p) for p in prompts)
        gen_length = max(1, MAX_SEQUENCE - longest)
        result = generate(model, prompts, gen_length=gen_length, block_length=MAX_SEQUENCE,
                          steps=32, threshold=0.95, cuda_graph=cuda_graph)
        answers += [decode(t) for t in result.tokens]
        stats.append(result.stats)
        if progress is not None:
            progress(len(chunk))
    return answers, stats


def mean_unique_experts(stats) -> float:
    """Distinct experts per block, averaged over MoE layers, denoising forwards and sequences."""
    return mean_stat(stats, "unique_experts")


def mean_stat(stats, name: str) -> float:
    """A per-block GenerationStats field ([forwards, layers, batch]: unique_experts,
    max_expert_load, routed_pairs, ...) averaged over MoE layers, denoising forwards and
    sequences (NaN where none was recorded)."""
    import torch

    values = [getattr(s, name).flatten() for s in stats if getattr(s, name) is not None]
    if not values:
        return float("nan")
    return float(torch.nanmean(torch.cat(values).float()))
