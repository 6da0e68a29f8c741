"""Speech-emotion-recognition metrics, the confusion-matrix plot and a printed summary table.

Predictions that could not be parsed are `None`: they count as wrong for every class (a false negative of
the gold class, a false positive of none) and are reported as `invalid_rate` and as the extra "invalid"
column of the confusion matrix, never mapped to a label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from etils import epath

from emorl_jax.paths import as_path

INVALID = "invalid"


def compute_metrics(golds: Sequence[str], preds: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Metrics of predictions against gold labels.

    golds: gold labels, each in `labels`; preds: predicted labels in `labels`, or None for an invalid output.
    Returns (fractions in [0, 1]):
      "n", "wa" (accuracy), "ua" (mean recall over the labels present in golds), "weighted_f1" (F1 per label
      weighted by gold support), "macro_f1" (mean F1 over the labels present in golds), "per_class_recall"
      {label: recall} for the labels present in golds, "invalid_rate", "labels" (row order), and "confusion":
      a len(labels) x (len(labels) + 1) list of counts, rows gold, columns predicted, last column "invalid".
    """
    labels = list(labels)
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be non-empty and distinct, got {labels}")
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold labels but {len(preds)} predictions")
    if not golds:
        raise ValueError("no examples to score")
    index = {label: i for i, label in enumerate(labels)}
    for name, values, allow_none in (("gold", golds, False), ("prediction", preds, True)):
        for k, v in enumerate(values):
            if v not in index and not (allow_none and v is None):
                raise ValueError(f"{name} {v!r} at index {k} is not one of {labels}"
                                 + (" (pass None for an invalid output)" if allow_none else ""))
    num = len(labels)
    confusion = np.zeros((num, num + 1), dtype=np.int64)
    np.add.at(confusion, ([index[g] for g in golds], [num if p is None else index[p] for p in preds]), 1)

    tp = np.diag(confusion[:, :num]).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion[:, :num].sum(axis=0).astype(np.float64)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(num), where=present)
    f1_denominator = support + predicted
    f1 = np.divide(2.0 * tp, f1_denominator, out=np.zeros(num), where=f1_denominator > 0)
    n = len(golds)
    return {
        "n": n,
        "wa": float(tp.sum() / n),
        "ua": float(recall[present].mean()),
        "weighted_f1": float((f1 * support).sum() / support.sum()),
        "macro_f1": float(f1[present].mean()),
        "per_class_recall": {label: float(recall[i]) for i, label in enumerate(labels) if present[i]},
        "invalid_rate": float(confusion[:, num].sum() / n),
        "labels": labels,
        "confusion": confusion.tolist(),
    }


def plot_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, *,
                   title: str | None = None) -> epath.Path:
    """Write the confusion matrix (counts; colour = row-normalised) as a PNG at `path`.

    `confusion` is len(labels) rows of len(labels) columns, or len(labels) + 1 with the "invalid" column last.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.int64)
    num = len(labels)
    if counts.ndim != 2 or counts.shape[0] != num or counts.shape[1] not in (num, num + 1):
        raise ValueError(f"confusion of shape {counts.shape} does not fit {num} labels "
                         f"(expected ({num}, {num}) or ({num}, {num + 1}))")
    columns = list(labels) + ([INVALID] if counts.shape[1] == num + 1 else [])
    rows = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)

    size = 1.0 + 0.7 * len(columns)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of gold row")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(num), list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if title:
        ax.set_title(title)
    for (r, c), value in np.ndenumerate(counts):
        ax.text(c, r, str(value), ha="center", va="center", color="white" if fractions[r, c] > 0.5 else "black")
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: `path` may be remote (gs://...)
        fig.savefig(f, format="png", dpi=100)
    return path


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of `rows` (e.g. compute_metrics results with a "name" key added).

    Nested mappings are flattened to "key.subkey" columns (per_class_recall.happy); lists (the confusion
    matrix) are left out. `columns` defaults to every key in first-seen order. Floats print with 4 decimals,
    missing values as "-".
    """
    flat = [_flatten(row) for row in rows]
    if columns is None:
        columns = list(dict.fromkeys(key for row in flat for key in row))
    cells = [[_cell(row.get(col)) for col in columns] for row in flat]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip()
              for r in cells]
    return "\n".join(lines)


def _flatten(row: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, (list, tuple, np.ndarray)):
            flat[f"{prefix}{key}"] = value
    return flat


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
