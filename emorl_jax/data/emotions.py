"""The common emotion label space, per-corpus label maps, answer normalisation, and emotion similarity.

Labels. Every reader maps its corpus's raw labels into one space, `LABELS` (DATASETS.md: joy→happy,
sadness→sad, anger→angry, exc→happy, ps→surprise); `label_set(name)` gives the labels a task is scored
on, in a fixed order (the order of the model's answer options, metrics and confusion matrices).

Similarity S(i, j) in [0, 1], S(i, i) = 1, symmetric; ESWR (DESIGN.md §5) pays α·S for a wrong answer
when S > γ.

* "plutchik" (the paper's, DESIGN.md §5): Plutchik's wheel with joy 0°, trust 45°, fear 90°, surprise
  135°, sadness 180°, disgust 225°, anger 270°, anticipation 315° (happy→joy, sad→sadness,
  angry→anger); S = ½·(cos θ_ij + 1) for the angle θ_ij between two labels; S = ½ when exactly one of
  the two is neutral. Values: 45° apart 0.854, 90° 0.5, 135° 0.146, 180° 0. Consequence (DESIGN.md
  §5): with γ = 0.7 only 45° neighbours (fear/surprise, surprise/sad, sad/disgust, disgust/angry, and
  happy with trust/anticipation) earn partial credit; neutral (½) never does. On IEMOCAP-4
  (neutral/happy/sad/angry: 180° and 90° apart, or ½ with neutral) ESWR therefore equals exact match.
  Labels off the wheel (frustrated, excited, other) have no Plutchik similarity.

* "circumplex" (our extension): Russell's (1980) circumplex places affect in a valence × arousal plane.
  Russell's own 28-word scaling has no disgust or surprise, so the coordinates are the mean valence
  (V.Mean.Sum) and arousal (A.Mean.Sum) ratings of each label word, on 1-9 scales, from the published
  norms of Warriner, Kuperman & Brysbaert (2013), "Norms of valence, arousal, and dominance for 13,915
  English lemmas", Behavior Research Methods 45:1191-1207 (file Ratings_Warriner_et_al.csv):

      word        valence  arousal        word        valence  arousal
      neutral       5.50     3.45         disgust       3.32     5.00
      happy         8.47     6.05         surprise      7.44     6.57
      sad           2.10     3.49         excited       8.11     6.43
      angry         2.53     6.20         frustrated    2.55     5.40
      fear          2.93     6.14

  S = 1 − d/d_max with d the Euclidean distance of the two points and d_max = 8·√2, the diagonal of
  the 1-9 rating square (a fixed scale, so a pair's similarity does not depend on the label set).
  "neutral" is the rated word, not the scale centre (5, 5). "other" has no coordinates.
  This space is more lenient than Plutchik's: with γ = 0.7 eight of the 21 pairs of `LABELS` earn
  partial credit: every pair of sad, angry, fear, disgust (angry/fear 0.96, fear/disgust 0.89,
  angry/disgust 0.87, sad/disgust 0.83, sad/angry 0.76, sad/fear 0.76), happy/surprise (0.90) and
  neutral/disgust (0.76); neutral/sad (0.699) just misses.

* a user matrix: a mapping {"labels": [...], "matrix": [[...]]} or the path of a JSON file holding one,
  validated (labels unique and all present, square, diagonal 1, off-diagonal in [0, 1], symmetric).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from emorl_jax.errors import ConfigError

LABELS: tuple[str, ...] = ("neutral", "happy", "sad", "angry", "fear", "disgust", "surprise")

_LABEL_SETS: dict[str, tuple[str, ...]] = {
    # MELD's own order (neutral, joy, sadness, anger, surprise, fear, disgust) in the common space.
    "meld": ("neutral", "happy", "sad", "angry", "surprise", "fear", "disgust"),
    "synthetic": ("neutral", "happy", "sad", "angry", "surprise", "fear", "disgust"),
    "iemocap4": ("neutral", "happy", "sad", "angry"),
    "cross4": ("neutral", "happy", "sad", "angry"),
    "ravdess": LABELS,  # calm is dropped or folded into neutral by the reader
    "savee": LABELS,
    "tess": LABELS,
    "cremad": ("neutral", "happy", "sad", "angry", "fear", "disgust"),
    # IEMOCAP's ten categories (xxx = no majority is dropped); excited stays apart from happy.
    "iemocap_full": ("neutral", "happy", "sad", "angry", "fear", "disgust", "surprise", "frustrated", "excited",
                     "other"),
}
ALL_LABELS: frozenset[str] = frozenset(label for labels in _LABEL_SETS.values() for label in labels)

# Raw corpus label -> common label; None = not used by that protocol (the reader counts it as skipped).
CORPUS_LABEL_MAPS: dict[str, dict[str, str | None]] = {
    "meld": {"neutral": "neutral", "joy": "happy", "sadness": "sad", "anger": "angry", "surprise": "surprise",
             "fear": "fear", "disgust": "disgust"},
    # IEMOCAP 4-class protocol: neu, hap+exc, ang, sad.
    "iemocap4": {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry", "fru": None,
                 "sur": None, "fea": None, "dis": None, "oth": None, "xxx": None},
    "iemocap_full": {"neu": "neutral", "hap": "happy", "exc": "excited", "sad": "sad", "ang": "angry",
                     "fru": "frustrated", "sur": "surprise", "fea": "fear", "dis": "disgust", "oth": "other",
                     "xxx": None},
    # RAVDESS emotion field; "02" (calm) is dropped or folded into neutral by the reader's `calm` option.
    "ravdess": {"01": "neutral", "02": None, "03": "happy", "04": "sad", "05": "angry", "06": "fear",
                "07": "disgust", "08": "surprise"},
    "savee": {"a": "angry", "d": "disgust", "f": "fear", "h": "happy", "n": "neutral", "sa": "sad",
              "su": "surprise"},
    "cremad": {"ANG": "angry", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"},
    "tess": {"angry": "angry", "disgust": "disgust", "fear": "fear", "happy": "happy", "neutral": "neutral",
             "ps": "surprise", "sad": "sad"},
}

# Answer words (after lower-casing and replacing non-letters by spaces) -> label.
_SYNONYMS: dict[str, str] = {
    "neutral": "neutral", "neu": "neutral", "neutrality": "neutral",
    "happy": "happy", "happiness": "happy", "hap": "happy", "joy": "happy", "joyful": "happy",
    "joyous": "happy",
    "sad": "sad", "sadness": "sad",
    "angry": "angry", "anger": "angry", "ang": "angry", "mad": "angry",
    "fear": "fear", "fearful": "fear", "fea": "fear", "afraid": "fear", "scared": "fear",
    "frightened": "fear",
    "disgust": "disgust", "disgusted": "disgust", "dis": "disgust",
    "surprise": "surprise", "surprised": "surprise", "sur": "surprise", "ps": "surprise",
    "pleasant surprise": "surprise", "pleasantly surprised": "surprise",
    "frustrated": "frustrated", "frustration": "frustrated", "fru": "frustrated",
    "excited": "excited", "excitement": "excited", "exc": "excited",
    "other": "other", "oth": "other",
}

PLUTCHIK_ANGLES_DEG: dict[str, float] = {
    "happy": 0.0, "trust": 45.0, "fear": 90.0, "surprise": 135.0, "sad": 180.0, "disgust": 225.0,
    "angry": 270.0, "anticipation": 315.0,
}
# (valence, arousal) on 1-9 scales: Warriner, Kuperman & Brysbaert (2013), V.Mean.Sum and A.Mean.Sum.
CIRCUMPLEX_VA: dict[str, tuple[float, float]] = {
    "neutral": (5.50, 3.45), "happy": (8.47, 6.05), "sad": (2.10, 3.49), "angry": (2.53, 6.20),
    "fear": (2.93, 6.14), "disgust": (3.32, 5.00), "surprise": (7.44, 6.57), "excited": (8.11, 6.43),
    "frustrated": (2.55, 5.40),
}
CIRCUMPLEX_D_MAX = 8.0 * math.sqrt(2.0)  # diagonal of the 1-9 valence x arousal square
_NEUTRAL = "neutral"


# The label set each corpus is evaluated on by default (`python -m emorl_jax.eval --dataset=...`, notebook 2).
DATASET_LABEL_SETS: dict[str, str] = {
    "meld": "meld", "iemocap": "iemocap4", "synthetic": "synthetic", "ravdess": "cross4", "savee": "cross4",
    "cremad": "cross4", "tess": "cross4",
}


def label_set(name: str) -> tuple[str, ...]:
    """The ordered labels of a task: meld, synthetic, iemocap4, cross4, ravdess, savee, tess, cremad, iemocap_full."""
    if name not in _LABEL_SETS:
        raise ConfigError(f"unknown label set {name!r}; known: {', '.join(_LABEL_SETS)}")
    return _LABEL_SETS[name]


def normalize_label(text: str, labels: Sequence[str]) -> str | None:
    """The label of `labels` that `text` names (case, whitespace and punctuation ignored), else None.

    Synonyms and corpus abbreviations map to their label (joy→happy, anger→angry, scared→fear, ps→surprise,
    neu→neutral, ...); exc/excited mean "excited" when it is in `labels`, else happy (the IEMOCAP-4
    merge). Anything else, including several words and labels outside `labels`, gives None.
    """
    key = " ".join(re.sub(r"[^a-z]+", " ", str(text).lower()).split())
    label = _SYNONYMS.get(key)
    if label == "excited" and label not in labels:
        label = "happy"
    return label if label in labels else None


def similarity_matrix(labels: Sequence[str], kind: str | os.PathLike | Mapping = "plutchik") -> np.ndarray:
    """S[i, j] float64 [L, L] for `labels` in order: "plutchik", "circumplex", a JSON path or a mapping.

    Raises ValueError naming the problem: a label with no position in the chosen space, an unknown
    kind, or a user matrix that breaks a rule (see the module docstring).
    """
    labels = _check_labels(labels)
    if isinstance(kind, Mapping):
        return _user_matrix(kind, labels, source="similarity mapping")
    if isinstance(kind, str) and kind in ("plutchik", "circumplex"):
        defined = (_NEUTRAL, *PLUTCHIK_ANGLES_DEG) if kind == "plutchik" else tuple(CIRCUMPLEX_VA)
        for label in labels:
            if label not in defined:
                space = "position on Plutchik's wheel" if kind == "plutchik" else "valence/arousal coordinates"
                raise ConfigError(f"label {label!r} has no {space} (defined: {', '.join(defined)})")
        fn = _plutchik if kind == "plutchik" else _circumplex
        matrix = np.array([[1.0 if a == b else fn(a, b) for b in labels] for a in labels], dtype=np.float64)
        return _validate(list(labels), matrix, labels, source=kind)
    path = Path(kind)
    if not path.is_file():
        raise ConfigError(f"unknown similarity {str(kind)!r}: use 'plutchik', 'circumplex', the path of a JSON "
                         "file, or a mapping {'labels': [...], 'matrix': [[...]]}")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{path}: expected a JSON object with 'labels' and 'matrix'")
    return _user_matrix(spec, labels, source=str(path))


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    labels = tuple(labels)
    if not labels or not all(isinstance(x, str) for x in labels):
        raise ConfigError(f"labels must be a non-empty sequence of strings, got {labels!r}")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"labels must be unique, got {list(labels)}")
    return labels


def _plutchik(a: str, b: str) -> float:
    if _NEUTRAL in (a, b):
        return 0.5
    return 0.5 * (math.cos(math.radians(PLUTCHIK_ANGLES_DEG[a] - PLUTCHIK_ANGLES_DEG[b])) + 1.0)


def _circumplex(a: str, b: str) -> float:
    (va, aa), (vb, ab) = CIRCUMPLEX_VA[a], CIRCUMPLEX_VA[b]
    return 1.0 - math.hypot(va - vb, aa - ab) / CIRCUMPLEX_D_MAX


def _user_matrix(spec: Mapping, labels: tuple[str, ...], source: str) -> np.ndarray:
    have, rows = spec.get("labels"), spec.get("matrix")
    if not isinstance(have, list) or not isinstance(rows, list):
        raise ConfigError(f"{source}: expected 'labels' (a list of names) and 'matrix' (a list of rows)")
    try:
        matrix = np.array(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: matrix must be a list of equally long rows of numbers") from None
    return _validate(have, matrix, labels, source)


def _validate(have: list, matrix: np.ndarray, labels: tuple[str, ...], source: str) -> np.ndarray:
    """Check the rules on the full (have x have) matrix, then return it re-ordered to `labels`."""
    if not all(isinstance(x, str) for x in have) or len(set(have)) != len(have):
        raise ConfigError(f"{source}: labels must be unique strings, got {have!r}")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ConfigError(f"{source}: matrix must be square, got shape {matrix.shape}")
    if matrix.shape[0] != len(have):
        raise ConfigError(f"{source}: {len(have)} labels but a {matrix.shape[0]}x{matrix.shape[1]} matrix")
    missing = [x for x in labels if x not in have]
    if missing:
        raise ConfigError(f"{source}: labels {missing} are missing (it has {have})")
    if not np.all(np.isfinite(matrix)):
        raise ConfigError(f"{source}: matrix has NaN or infinite entries")
    for i, a in enumerate(have):
        if abs(matrix[i, i] - 1.0) > 1e-9:
            raise ConfigError(f"{source}: the diagonal must be 1, but S({a}, {a}) = {matrix[i, i]:g}")
        for j, b in enumerate(have):
            if i != j and not 0.0 <= matrix[i, j] <= 1.0:
                raise ConfigError(f"{source}: S({a}, {b}) = {matrix[i, j]:g} is outside [0, 1]")
            if abs(matrix[i, j] - matrix[j, i]) > 1e-9:
                raise ConfigError(f"{source}: matrix is not symmetric: S({a}, {b}) = {matrix[i, j]:g} but "
                                 f"S({b}, {a}) = {matrix[j, i]:g}")
    index = [have.index(x) for x in labels]
    return matrix[np.ix_(index, index)].copy()
