"""Metrics against scikit-learn, the confusion PNG and the summary table.

The sklearn oracle sees an invalid prediction (None) as an extra class "invalid" that is not in `labels`:
it is then a false negative of the gold class and a false positive of no scored label, which is how
`compute_metrics` counts it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from emorl_jax.metrics import compute_metrics, format_table, plot_confusion

TOL = 1e-12
POOL = ["neutral", "happy", "sad", "angry", "fear", "disgust", "surprise"]


def _oracle(golds, preds, labels):
    y_pred = ["invalid" if p is None else p for p in preds]
    present = [label for label in labels if label in golds]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning, "y_pred contains classes not in y_true"
        return {
            "wa": skm.accuracy_score(golds, y_pred),
            "ua": skm.balanced_accuracy_score(golds, y_pred),
            "weighted_f1": skm.f1_score(golds, y_pred, labels=labels, average="weighted", zero_division=0),
            "macro_f1": skm.f1_score(golds, y_pred, labels=present, average="macro", zero_division=0),
            "recall": dict(zip(present, skm.recall_score(golds, y_pred, labels=present, average=None,
                                                         zero_division=0))),
            "confusion": skm.confusion_matrix(golds, y_pred, labels=[*labels, "invalid"])[:len(labels)],
        }


def _random_case(rng):
    labels = list(rng.permutation(POOL)[: rng.integers(2, len(POOL) + 1)])
    n = int(rng.integers(1, 60))
    gold_pool = labels[: rng.integers(1, len(labels) + 1)]          # some labels may never be gold
    pred_pool = [*labels[: rng.integers(1, len(labels) + 1)], None]  # some never predicted; invalid outputs
    golds = [str(g) for g in rng.choice(gold_pool, n)]
    preds = [pred_pool[i] for i in rng.integers(0, len(pred_pool), n)]
    if rng.random() < 0.5:  # make many predictions correct so the F1s are not all ~0
        preds = [g if rng.random() < 0.6 else p for g, p in zip(golds, preds)]
    return golds, preds, labels


def test_matches_sklearn_on_random_cases():
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(200):
        golds, preds, labels = _random_case(rng)
        got, want = compute_metrics(golds, preds, labels), _oracle(golds, preds, labels)
        for key in ("wa", "ua", "weighted_f1", "macro_f1"):
            worst = max(worst, abs(got[key] - want[key]))
            assert got[key] == pytest.approx(want[key], abs=TOL), key
        assert list(got["per_class_recall"]) == list(want["recall"])
        for label, r in want["recall"].items():
            assert got["per_class_recall"][label] == pytest.approx(r, abs=TOL)
        np.testing.assert_array_equal(np.asarray(got["confusion"]), want["confusion"])
        assert got["invalid_rate"] == pytest.approx(sum(p is None for p in preds) / len(preds), abs=TOL)
        assert got["n"] == len(golds) and got["labels"] == labels
    assert worst <= TOL


def test_hand_computed_example():
    labels = ["neutral", "happy", "sad", "angry"]  # "angry" never gold, "sad" never predicted
    golds = ["neutral", "neutral", "happy", "happy", "sad", "sad"]
    preds = ["neutral", "happy", "happy", None, "angry", None]
    m = compute_metrics(golds, preds, labels)
    assert m["wa"] == pytest.approx(2 / 6, abs=TOL)
    assert m["per_class_recall"] == {"neutral": 0.5, "happy": 0.5, "sad": 0.0}
    assert m["ua"] == pytest.approx(1 / 3, abs=TOL)
    # F1: neutral 2*1/(2+1) = 2/3, happy 2*1/(2+2) = 1/2, sad 0, angry 0 (no gold support).
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3, abs=TOL)
    assert m["weighted_f1"] == pytest.approx((2 * 2 / 3 + 2 * 1 / 2) / 6, abs=TOL)
    assert m["invalid_rate"] == pytest.approx(2 / 6, abs=TOL)
    assert m["confusion"] == [[1, 1, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]


def test_all_invalid_scores_zero():
    m = compute_metrics(["sad", "happy"], [None, None], ["happy", "sad"])
    assert (m["wa"], m["ua"], m["weighted_f1"], m["macro_f1"], m["invalid_rate"]) == (0.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("golds, preds, labels, message", [
    (["happy"], ["happy", "sad"], ["happy", "sad"], "1 gold labels but 2 predictions"),
    ([], [], ["happy"], "no examples"),
    (["happy"], ["joy"], ["happy", "sad"], "prediction 'joy' at index 0 is not one of"),
    (["joy"], ["happy"], ["happy", "sad"], "gold 'joy' at index 0 is not one of"),
    (["happy"], ["happy"], ["happy", "happy"], "distinct"),
])
def test_bad_input(golds, preds, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(golds, preds, labels)


@pytest.mark.parametrize("with_invalid", [True, False])
def test_plot_confusion_writes_png(tmp_path, with_invalid):
    from PIL import Image

    labels = ["neutral", "happy", "sad", "angry"]
    confusion = compute_metrics(["happy", "sad", "sad", "angry"], ["happy", None, "sad", "neutral"],
                                labels)["confusion"]
    if not with_invalid:
        confusion = [row[:-1] for row in confusion]
    path = plot_confusion(confusion, labels, tmp_path / "plots" / "cm.png", title="fold 1")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_plot_confusion_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(2, 4\) does not fit 2 labels"):
        plot_confusion([[1, 0, 0, 0], [0, 1, 0, 0]], ["a", "b"], tmp_path / "x.png")


def test_format_table():
    rows = [{"name": "fold1", "n": 4, "wa": 0.5, "per_class_recall": {"happy": 1.0, "sad": 0.25},
             "confusion": [[1, 0], [0, 1]]},
            {"name": "mean", "wa": 0.625, "per_class_recall": {"happy": 0.75}}]
    assert format_table(rows) == (
        "name   n  wa      per_class_recall.happy  per_class_recall.sad\n"
        "-----  -  ------  ----------------------  --------------------\n"
        "fold1  4  0.5000                  1.0000                0.2500\n"
        "mean   -  0.6250                  0.7500  -")
    assert format_table(rows, columns=["name", "wa"]) == (
        "name   wa\n-----  ------\nfold1  0.5000\nmean   0.6250")
