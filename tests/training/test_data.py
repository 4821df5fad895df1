"""The offline datasets: counts and labels of the real files, and the seeded split."""

import subprocess
import sys

import pytest

from loralens.errors import LoralensError
from loralens.training import data
from loralens.training.data import TextDataset, load_task, split


@pytest.fixture(scope="module")
def rt() -> TextDataset:
    return data.load_rt_polarity()


def test_rt_polarity_counts_and_labels(rt):
    assert (rt.name, rt.num_labels, rt.metric) == ("rt-polarity", 2, "accuracy")
    assert len(rt) == len(rt.labels) == 12_752  # 12,808 fresh/rotten rows, 56 duplicates
    assert len(set(rt.texts)) == len(rt)
    assert set(rt.labels) == {0, 1}
    assert all(isinstance(y, int) for y in rt.labels)
    assert 0.57 < sum(rt.labels) / len(rt) < 0.59  # about 58 % fresh
    assert all(t == t.strip() and t for t in rt.texts)
    assert rt.texts[0] == "A three-hour cinema master class."
    assert rt.labels[0] == 1


def test_vader_rating_is_the_lexicon_mean():
    ds = data.load_vader_rating()
    assert (ds.name, ds.num_labels, ds.metric) == ("vader-rating", 1, "pearson")
    assert len(ds) == 7_506  # 7,520 lines, 14 tokens listed twice (the later line wins, as in vaderSentiment)
    assert len(set(ds.texts)) == len(ds)
    assert all(isinstance(y, float) and -4.0 <= y <= 4.0 for y in ds.labels)
    rating = dict(zip(ds.texts, ds.labels, strict=True))
    assert rating["$:"] == -1.5  # first line of the file
    assert rating["lol"] == 1.8  # listed as 2.9, then as 1.8
    assert min(ds.labels) == -3.9 and max(ds.labels) == 3.4


def test_vader_polarity_is_the_sign_of_the_rating():
    rating, polarity = data.load_vader_rating(), data.load_vader_polarity()
    assert (polarity.num_labels, polarity.metric) == (2, "accuracy")
    assert polarity.texts == rating.texts  # no token is rated exactly 0
    assert polarity.labels == tuple(int(v > 0) for v in rating.labels)
    assert 0.43 < sum(polarity.labels) / len(polarity) < 0.46


def test_load_task_names():
    assert set(data.TASKS) == {"rt-polarity", "vader-rating", "vader-polarity"}
    assert load_task("vader-polarity") == data.load_vader_polarity()


def test_unknown_task_lists_the_valid_names():
    expected = r"unknown task 'sst2'; valid tasks: rt-polarity, vader-rating, vader-polarity"
    with pytest.raises(LoralensError, match=expected):
        load_task("sst2")


def test_missing_data_package_says_what_to_install():
    with pytest.raises(LoralensError, match=r"pip install --no-deps no-such-data-package"):
        data._package_file("no-such-data-package", "x.txt")


def test_split_is_deterministic_disjoint_and_complete(rt):
    train, test = split(rt, test_fraction=0.1, seed=0)
    again_train, again_test = split(rt, test_fraction=0.1, seed=0)
    assert (train, test) == (again_train, again_test)
    assert len(test) == round(0.1 * len(rt)) == 1275
    assert len(train) + len(test) == len(rt)
    assert set(train.texts).isdisjoint(test.texts)
    assert set(train.texts) | set(test.texts) == set(rt.texts)
    label = dict(zip(rt.texts, rt.labels, strict=True))  # texts are unique, so pairs must survive
    assert all(label[t] == y for part in (train, test) for t, y in zip(part.texts, part.labels, strict=True))
    assert (train.name, train.num_labels, train.metric) == (rt.name, rt.num_labels, rt.metric)
    other_train, other_test = split(rt, test_fraction=0.1, seed=1)
    assert other_test.texts != test.texts
    assert sorted(other_train.texts + other_test.texts) == sorted(rt.texts)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fractions(rt, fraction):
    with pytest.raises(LoralensError, match="test_fraction must be in"):
        split(rt, test_fraction=fraction)


def test_split_needs_two_examples():
    tiny = TextDataset("tiny", ("a",), (1,), 2, "accuracy")
    with pytest.raises(LoralensError, match="too few to split"):
        split(tiny)


def test_dataset_validates_itself():
    with pytest.raises(LoralensError, match="2 texts but 1 labels"):
        TextDataset("x", ("a", "b"), (1,), 2, "accuracy")
    with pytest.raises(LoralensError, match="num_labels=1 does not fit metric 'accuracy'"):
        TextDataset("x", ("a",), (1.0,), 1, "accuracy")
    with pytest.raises(LoralensError, match="metric 'f1'"):
        TextDataset("x", ("a",), (1,), 2, "f1")


def test_importing_training_stays_light():
    code = (
        "import sys, loralens.training\n"
        "heavy = [m for m in ('transformers', 'peft', 'scattertext', 'vaderSentiment') if m in sys.modules]\n"
        "print(heavy)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
