"""The paper's algorithmic toy tasks, with a reproducible train/test split and frozen test sets.

Layout (as in the reference's ``CustomDataset``): an input of ``LENGTH = 10`` digits from ``0..7``,
a vocabulary of ``VOCAB = 10`` tokens, ``P`` pad tokens (id 0, the same id as the digit 0) in front,
then the 10 answer tokens::

    sequence = [0] * P ++ input (10) ++ answer (10)          (length P + 20)
    tokens   = sequence[:-1]                                  (length P + 19, the model's input)
    targets  = sequence[1:] with the first P + 9 entries set to IGNORE (-1)

so the loss covers only the 10 answer tokens. A prefix of length P takes the place of the pads.

Tasks (``TASKS``): ``ascending``, ``descending``, ``add1``, ``add2``, ``ascending_add1`` (sort, then
+1: the paper's "↗+1") and ``histogram``. **histogram** gives, for each element, how many times it
occurs in the input (RASP's plain ``hist``). The reference calls it ``double_hist``, but RASP's
*double* histogram is different (for each element, the number of distinct tokens that share its
count); we name it for what it computes. ``mixture`` draws one of the first four tasks per example,
with nothing in the input saying which (the reference's ``random`` pretraining mode).

Differences from the reference, on purpose:

- **Stable split.** An input is in the test split when a fixed integer hash of its base-8 code is
  ``0 mod 4`` (:func:`is_test`), the same in every process. The reference used Python's salted
  ``hash()``, which changes the partition from one process to the next.
- **Frozen test sets.** :func:`test_set` is a deterministic function of ``(task, n, seed)``;
  evaluations reuse it instead of re-sampling 3,200 fresh inputs per call.
- **No out-of-vocabulary targets.** A histogram count of 10 (all ten digits equal) would be token
  10 in a vocabulary of 10. Constant inputs are never sampled (probability 8/8^10 in the reference),
  and :func:`solve` refuses any input whose answer leaves the vocabulary.

The input distribution is the reference's: each digit uniform on ``0..7``; with probability 1/2
(independently per draw) an input with more than ``LENGTH // 2`` distinct digits is rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = [
    "LENGTH",
    "N_DIGITS",
    "VOCAB",
    "IGNORE",
    "TASKS",
    "PRETRAINING_TASKS",
    "MIXTURE",
    "TaskBatch",
    "solve",
    "is_test",
    "sample_inputs",
    "make_batch",
    "batches",
    "test_set",
    "layout",
    "wilson_interval",
]

LENGTH = 10
N_DIGITS = 8
VOCAB = N_DIGITS + 2
IGNORE = -1
PAD = 0

PRETRAINING_TASKS = ("ascending", "descending", "add1", "add2")
TASKS = PRETRAINING_TASKS + ("ascending_add1", "histogram")
MIXTURE = "mixture"

_HASH_MOD = 4294967291  # the largest prime below 2**32
_HASH_MUL = (2654435761, 2246822519)


def _check_task(task: str, allow_mixture: bool = True) -> None:
    valid = TASKS + ((MIXTURE,) if allow_mixture else ())
    if task not in valid:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(valid)}.")


def solve(task: str, inputs: Int[Tensor, "batch length"]) -> Int[Tensor, "batch length"]:
    """The answer of ``task`` for each input row; raises if an answer would leave the vocabulary."""
    _check_task(task, allow_mixture=False)
    inputs = torch.as_tensor(inputs)
    if inputs.ndim != 2:
        raise ValueError(f"inputs must be [batch, length], got shape {tuple(inputs.shape)}.")
    if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= N_DIGITS):
        raise ValueError(f"input digits must lie in 0..{N_DIGITS - 1}.")
    if task == "ascending":
        out = inputs.sort(dim=1).values
    elif task == "descending":
        out = inputs.sort(dim=1, descending=True).values
    elif task == "add1":
        out = inputs + 1
    elif task == "add2":
        out = inputs + 2
    elif task == "ascending_add1":
        out = inputs.sort(dim=1).values + 1
    else:  # histogram
        out = (inputs[:, :, None] == inputs[:, None, :]).sum(-1)
    if out.numel() and int(out.max()) >= VOCAB:
        bad = int((out >= VOCAB).any(1).nonzero()[0, 0])
        raise ValueError(
            f"task {task!r} maps input {inputs[bad].tolist()} to {out[bad].tolist()}, which leaves the "
            f"vocabulary 0..{VOCAB - 1}; such inputs are not part of the task."
        )
    return out.to(torch.long)


def _code(inputs: Tensor) -> Tensor:
    """The base-8 integer of each row (< 8**10 = 2**30)."""
    weights = N_DIGITS ** torch.arange(inputs.shape[1], dtype=torch.long, device=inputs.device)
    return (inputs.to(torch.long) * weights).sum(1)


def _stable_hash(code: Tensor) -> Tensor:
    # Two rounds of multiply-mod-prime with a xor-shift between; every intermediate fits in int64.
    h = (code % _HASH_MOD) * _HASH_MUL[0] % _HASH_MOD
    h = h ^ (h >> 15)
    h = (h * _HASH_MUL[1]) % _HASH_MOD
    return h ^ (h >> 13)


def is_test(inputs: Int[Tensor, "batch length"]) -> Tensor:
    """Whether each input belongs to the test split (about 1/4 of inputs); stable across processes."""
    inputs = torch.as_tensor(inputs)
    if inputs.ndim == 1:
        inputs = inputs[None]
    return _stable_hash(_code(inputs)) % 4 == 0


def sample_inputs(
    n: int, split: str, generator: torch.Generator, max_distinct_rule: bool = True
) -> Int[Tensor, "n length"]:
    """``n`` inputs from ``split`` (``"train"`` or ``"test"``) drawn with ``generator``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    want_test = split == "test"
    out: list[Tensor] = []
    have = 0
    while have < n:
        draw = max(64, 2 * (n - have) * (4 if want_test else 2))
        x = torch.randint(0, N_DIGITS, (draw, LENGTH), generator=generator)
        keep = torch.ones(draw, dtype=torch.bool)
        if max_distinct_rule:
            distinct = (torch.nn.functional.one_hot(x, N_DIGITS).sum(1) > 0).sum(1)
            coin = torch.rand(draw, generator=generator) < 0.5
            keep &= ~(coin & (distinct > LENGTH // 2))
        keep &= (x != x[:, :1]).any(1)  # constant inputs: histogram count 10 is not a token
        keep &= is_test(x) == want_test
        x = x[keep]
        out.append(x)
        have += x.shape[0]
    return torch.cat(out)[:n]


@dataclass(frozen=True)
class TaskBatch:
    """One batch in the reference layout.

    ``inputs``/``answers`` ``[batch, 10]``; ``tokens`` ``[batch, P + 19]`` (pads, input, answer
    without its last token); ``targets`` ``[batch, P + 19]`` (``IGNORE`` except the 10 answer
    positions); ``task_ids`` index into ``TASKS``.
    """

    inputs: Tensor
    answers: Tensor
    tokens: Tensor
    targets: Tensor
    task_ids: Tensor
    n_pad: int

    def prompt(self, n_pad: int | None = None) -> Int[Tensor, "batch pads_and_length"]:
        """Pads and input: what generation starts from (``n_pad`` defaults to the batch's ``P``)."""
        n_pad = self.n_pad if n_pad is None else n_pad
        pads = torch.full((self.inputs.shape[0], n_pad), PAD, dtype=torch.long, device=self.inputs.device)
        return torch.cat([pads, self.inputs], 1)

    def to(self, device) -> "TaskBatch":
        return TaskBatch(*(t.to(device) for t in (self.inputs, self.answers, self.tokens, self.targets, self.task_ids)), self.n_pad)

    def __len__(self) -> int:
        return self.inputs.shape[0]


def layout(inputs: Tensor, answers: Tensor, n_pad: int) -> tuple[Tensor, Tensor]:
    """``(tokens, targets)`` in the reference layout for ``n_pad`` pad tokens."""
    if n_pad < 0:
        raise ValueError(f"n_pad must be >= 0, got {n_pad}.")
    B = inputs.shape[0]
    seq = torch.cat([torch.full((B, n_pad), PAD, dtype=torch.long), inputs, answers], 1)
    tokens = seq[:, :-1].clone()
    targets = seq[:, 1:].clone()
    targets[:, : n_pad + LENGTH - 1] = IGNORE
    return tokens, targets


def make_batch(task: str, n: int, n_pad: int, split: str, generator: torch.Generator) -> TaskBatch:
    """``n`` examples of ``task`` (or of the ``mixture``) from ``split``.

    Args:
        task: the task's name, or ``"mixture"``.
        n: the number of examples.
        n_pad: the number of pad tokens before each input (where a prefix goes).
        split: ``"train"`` or ``"test"``.
        generator: the random generator the inputs are drawn with.
    """
    _check_task(task)
    inputs = sample_inputs(n, split, generator)
    if task == MIXTURE:
        ids = torch.randint(0, len(PRETRAINING_TASKS), (n,), generator=generator)
        answers = torch.empty_like(inputs)
        for i, name in enumerate(PRETRAINING_TASKS):
            sel = ids == i
            if sel.any():
                answers[sel] = solve(name, inputs[sel])
    else:
        ids = torch.full((n,), TASKS.index(task), dtype=torch.long)
        answers = solve(task, inputs)
    tokens, targets = layout(inputs, answers, n_pad)
    return TaskBatch(inputs, answers, tokens, targets, ids, n_pad)


def batches(task: str, batch_size: int, n_pad: int, seed: int, generator: torch.Generator | None = None):
    """An endless stream of training batches of ``task`` (train split), reproducible from ``seed``.

    Pass ``generator`` to continue a stream whose state was saved (checkpoint resume).

    Args:
        task: the task's name, or ``"mixture"``.
        batch_size: the number of examples per batch.
        n_pad: the number of pad tokens before each input.
        seed: the seed of the stream.
        generator: a saved generator to continue from (overrides ``seed``).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    while True:
        yield make_batch(task, batch_size, n_pad, "train", g)


_SET_SALT = {name: i + 1 for i, name in enumerate(TASKS + (MIXTURE,))}


def test_set(task: str, n: int, n_pad: int, seed: int = 0) -> TaskBatch:
    """The frozen test set of ``task``: ``n`` test-split examples, a deterministic function of
    ``(task, n, seed)`` (the inputs do not depend on ``n_pad``). ``mixture`` has equal task shares."""
    _check_task(task)
    g = torch.Generator().manual_seed(1_000_003 * seed + 7919 * _SET_SALT[task])
    if task != MIXTURE:
        return make_batch(task, n, n_pad, "test", g)
    inputs = sample_inputs(n, "test", g)
    ids = torch.arange(n) % len(PRETRAINING_TASKS)
    answers = torch.empty_like(inputs)
    for i, name in enumerate(PRETRAINING_TASKS):
        answers[ids == i] = solve(name, inputs[ids == i])
    tokens, targets = layout(inputs, answers, n_pad)
    return TaskBatch(inputs, answers, tokens, targets, ids, n_pad)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion (sensible at 0% and 100%)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}.")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi
