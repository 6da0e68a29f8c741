"""The label space, answer normalisation and the emotion similarity matrices (values checked by hand)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from emorl_jax.data import emotions
from emorl_jax.data.corpora import synthetic
from emorl_jax.data.emotions import label_set, normalize_label, similarity_matrix

MELD = ("neutral", "happy", "sad", "angry", "surprise", "fear", "disgust")
NEIGHBOUR = 0.5 * (math.cos(math.radians(45)) + 1)  # 0.8535533905932737


def test_label_sets():
    assert emotions.LABELS == ("neutral", "happy", "sad", "angry", "fear", "disgust", "surprise")
    assert label_set("meld") == MELD == label_set("synthetic") == synthetic.LABELS
    assert label_set("iemocap4") == label_set("cross4") == ("neutral", "happy", "sad", "angry")
    assert set(label_set("ravdess")) == set(label_set("savee")) == set(label_set("tess")) == set(emotions.LABELS)
    assert label_set("cremad") == ("neutral", "happy", "sad", "angry", "fear", "disgust")
    assert {"frustrated", "excited", "other"} < set(label_set("iemocap_full")) and len(label_set("iemocap_full")) == 10
    with pytest.raises(ValueError, match="unknown label set 'iemocap'; known: meld, synthetic, iemocap4, cross4"):
        label_set("iemocap")


def test_corpus_label_maps_land_in_the_label_sets():
    for corpus, labels in [("meld", "meld"), ("iemocap4", "iemocap4"), ("iemocap_full", "iemocap_full"),
                           ("ravdess", "ravdess"), ("savee", "savee"), ("cremad", "cremad"), ("tess", "tess")]:
        mapped = {v for v in emotions.CORPUS_LABEL_MAPS[corpus].values() if v is not None}
        assert mapped == set(label_set(labels)) or corpus == "ravdess" and mapped == set(emotions.LABELS), corpus
    assert emotions.CORPUS_LABEL_MAPS["iemocap4"]["exc"] == "happy"
    assert emotions.CORPUS_LABEL_MAPS["tess"]["ps"] == "surprise"
    assert emotions.CORPUS_LABEL_MAPS["savee"]["sa"] == "sad" and "s" not in emotions.CORPUS_LABEL_MAPS["savee"]


@pytest.mark.parametrize("text, labels, want", [
    ("happy", MELD, "happy"), ("  HAPPY.  ", MELD, "happy"), ("'Joy'", MELD, "happy"), ("happiness!", MELD, "happy"),
    ("Sadness", MELD, "sad"), ("anger", MELD, "angry"), ("mad", MELD, "angry"), ("Scared", MELD, "fear"),
    ("afraid", MELD, "fear"), ("fearful", MELD, "fear"), ("disgusted", MELD, "disgust"),
    ("Surprised!", MELD, "surprise"), ("pleasant   surprise", MELD, "surprise"), ("neu", MELD, "neutral"),
    ("exc", MELD, "happy"), ("Excited", label_set("iemocap4"), "happy"),
    ("excited", label_set("iemocap_full"), "excited"), ("frustration", label_set("iemocap_full"), "frustrated"),
    ("fear", label_set("iemocap4"), None), ("frustrated", MELD, None), ("calm", MELD, None), ("", MELD, None),
    ("happy sad", MELD, None), ("I think happy", MELD, None), ("hapy", MELD, None), ("sadd", MELD, None),
])
def test_normalize_label(text, labels, want):
    assert normalize_label(text, labels) == want


def test_plutchik_by_hand():
    s = similarity_matrix(MELD)
    at = {(a, b): s[i, j] for (i, a), (j, b) in itertools.product(enumerate(MELD), repeat=2)}
    assert s.dtype == np.float64 and s.shape == (7, 7)
    assert at["happy", "happy"] == 1.0 and at["neutral", "neutral"] == 1.0
    assert abs(at["fear", "surprise"] - 0.8535533905932737) < 1e-15
    assert abs(at["happy", "sad"]) < 1e-15 and abs(at["fear", "angry"]) < 1e-15  # 180 degrees apart
    assert abs(at["happy", "fear"] - 0.5) < 1e-15 and abs(at["happy", "angry"] - 0.5) < 1e-15  # 90 degrees
    assert abs(at["happy", "surprise"] - (1 - math.sqrt(0.5)) / 2) < 1e-15  # 135 degrees: 0.1464
    for x in MELD[1:]:
        assert at["neutral", x] == at[x, "neutral"] == 0.5
    # DESIGN §5: with gamma = 0.7 exactly the four 45-degree neighbour pairs earn partial credit
    credited = {frozenset((a, b)) for (a, b), v in at.items() if a != b and v > 0.7}
    assert credited == {frozenset(p) for p in [("fear", "surprise"), ("surprise", "sad"), ("sad", "disgust"),
                                                ("disgust", "angry")]}
    assert all(abs(at[tuple(p)] - NEIGHBOUR) < 1e-15 for p in map(sorted, credited))
    four = similarity_matrix(label_set("iemocap4"))
    assert np.all(four[~np.eye(4, dtype=bool)] <= 0.5)  # ESWR = exact match on IEMOCAP-4
    wheel = similarity_matrix(("happy", "trust", "anticipation"))
    assert abs(wheel[0, 1] - NEIGHBOUR) < 1e-15 and abs(wheel[1, 2] - 0.5) < 1e-15


def test_circumplex_values():
    va = {"neutral": (5.50, 3.45), "happy": (8.47, 6.05), "sad": (2.10, 3.49), "angry": (2.53, 6.20),
          "fear": (2.93, 6.14), "disgust": (3.32, 5.00), "surprise": (7.44, 6.57)}  # Warriner et al. 2013
    s = similarity_matrix(MELD, "circumplex")
    for (i, a), (j, b) in itertools.product(enumerate(MELD), repeat=2):
        d = math.hypot(va[a][0] - va[b][0], va[a][1] - va[b][1])
        assert abs(s[i, j] - (1 - d / (8 * math.sqrt(2)))) < 1e-12
    assert np.array_equal(s, s.T) and np.all(np.diag(s) == 1) and s.min() >= 0 and s.max() <= 1
    assert abs(s[MELD.index("angry"), MELD.index("fear")] - 0.96425) < 1e-5
    perm = ("surprise", "neutral", "fear")
    sub = similarity_matrix(perm, "circumplex")
    idx = [MELD.index(x) for x in perm]
    assert np.array_equal(sub, s[np.ix_(idx, idx)])
    full = [x for x in label_set("iemocap_full") if x != "other"]
    assert similarity_matrix(full, "circumplex").shape == (9, 9)


@pytest.mark.parametrize("kind, labels, message", [
    ("plutchik", label_set("iemocap_full"), "label 'frustrated' has no position on Plutchik's wheel"),
    ("plutchik", ("neutral", "frustrated"), "label 'frustrated' has no position on Plutchik's wheel"),
    ("circumplex", label_set("iemocap_full"), "label 'other' has no valence/arousal coordinates"),
    ("russell", MELD, "unknown similarity 'russell': use 'plutchik', 'circumplex'"),
    ("plutchik", ("sad", "sad"), "labels must be unique"),
    ("plutchik", (), "labels must be a non-empty sequence"),
])
def test_bad_kind_or_labels(kind, labels, message):
    with pytest.raises(ValueError, match=message):
        similarity_matrix(labels, kind)


def test_user_matrix_mapping_and_file(tmp_path):
    spec = {"labels": ["sad", "happy", "neutral"], "matrix": [[1, 0.1, 0.4], [0.1, 1, 0.3], [0.4, 0.3, 1]]}
    s = similarity_matrix(("neutral", "happy"), spec)
    assert s.dtype == np.float64 and s.tolist() == [[1.0, 0.3], [0.3, 1.0]]
    path = tmp_path / "sim.json"
    path.write_text(json.dumps(spec))
    assert similarity_matrix(("happy", "sad", "neutral"), path).tolist() == [[1, 0.1, 0.3], [0.1, 1, 0.4],
                                                                             [0.3, 0.4, 1]]
    assert similarity_matrix(("happy",), str(path)).tolist() == [[1.0]]


@pytest.mark.parametrize("spec, message", [
    ({"labels": ["a", "b"]}, "expected 'labels' \\(a list of names\\) and 'matrix'"),
    ({"labels": ["a", "b"], "matrix": [[1, 0.2, 0.1], [0.2, 1, 0.1]]}, r"matrix must be square, got shape \(2, 3\)"),
    ({"labels": ["a", "b"], "matrix": [[1, 0.2], [0.2]]}, "matrix must be a list of equally long rows"),
    ({"labels": ["a", "b", "c"], "matrix": [[1, 0.2], [0.2, 1]]}, "3 labels but a 2x2 matrix"),
    ({"labels": ["a", "a"], "matrix": [[1, 0.2], [0.2, 1]]}, "labels must be unique strings"),
    ({"labels": ["a", "c"], "matrix": [[1, 0.2], [0.2, 1]]}, r"labels \['b'\] are missing"),
    ({"labels": ["a", "b"], "matrix": [[1, 0.2], [0.2, 0.9]]}, r"the diagonal must be 1, but S\(b, b\) = 0.9"),
    ({"labels": ["a", "b"], "matrix": [[1, 1.2], [1.2, 1]]}, r"S\(a, b\) = 1.2 is outside \[0, 1\]"),
    ({"labels": ["a", "b"], "matrix": [[1, -0.1], [-0.1, 1]]}, r"S\(a, b\) = -0.1 is outside \[0, 1\]"),
    ({"labels": ["a", "b"], "matrix": [[1, 0.2], [0.3, 1]]},
     r"matrix is not symmetric: S\(a, b\) = 0.2 but S\(b, a\) = 0.3"),
    ({"labels": ["a", "b"], "matrix": [[1, float("nan")], [float("nan"), 1]]}, "matrix has NaN or infinite entries"),
    ({"labels": ["a", "b"], "matrix": [[1, "x"], ["x", 1]]}, "matrix must be a list of equally long rows of numbers"),
])
def test_bad_user_matrix(tmp_path, spec, message):
    with pytest.raises(ValueError, match=f"similarity mapping: {message}"):
        similarity_matrix(("a", "b"), spec)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        similarity_matrix(("a", "b"), path)


def test_bad_json_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{labels: [}")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        similarity_matrix(("a",), path)
    path.write_text("[[1.0]]")
    with pytest.raises(ValueError, match=f"{path}: expected a JSON object with 'labels' and 'matrix'"):
        similarity_matrix(("a",), path)
