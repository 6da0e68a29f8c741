"""Corpus readers: one module per corpus, each reading the official on-disk release (DATASETS.md).

Convention: every reader module has `read(root, **options) -> (records, report)`, where `records` is a
list of `Utterance` (labels in the common label space of `emorl_jax.data.emotions`) and `report` is a
`ReadReport` saying what was left out and why. `read_corpus(name, root, **options)` dispatches by
name; `load_corpus` returns the records only and logs the report (a warning when anything was
skipped). A new corpus (e.g. "synthetic") registers by adding its module to `_READERS`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from emorl_jax.data.corpora.base import CorpusError, Utterance

_READERS: dict[str, str] = {
    "meld": "emorl_jax.data.corpora.meld",
    "iemocap": "emorl_jax.data.corpora.iemocap",
    "ravdess": "emorl_jax.data.corpora.ravdess",
    "savee": "emorl_jax.data.corpora.savee",
    "cremad": "emorl_jax.data.corpora.cremad",
    "tess": "emorl_jax.data.corpora.tess",
}
CORPUS_NAMES: tuple[str, ...] = tuple(_READERS)
HIDDEN = "hidden or macOS metadata file"

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReadReport:
    """What a reader left out. `skipped`: labelled utterances not returned; `ignored`: files that are
    not utterances of the corpus (no label row, another modality, duplicates). Both map a reason to
    the utterance ids or file names concerned, in reading order."""

    corpus: str
    root: str
    kept: int = 0
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    ignored: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, item: str) -> None:
        self.skipped.setdefault(reason, []).append(item)

    def ignore(self, reason: str, item: str) -> None:
        self.ignored.setdefault(reason, []).append(item)

    @property
    def n_skipped(self) -> int:
        return sum(map(len, self.skipped.values()))

    def summary(self) -> str:
        """One line, e.g. "meld (/data/MELD.Raw): 3 utterances; skipped 1 (missing clip: dev_dia110_utt7)"."""

        def part(verb: str, groups: dict[str, list[str]]) -> str:
            def items(ids: list[str]) -> str:
                return ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")

            reasons = "; ".join(f"{reason}: {items(ids)}" for reason, ids in groups.items())
            return f"; {verb} {sum(map(len, groups.values()))} ({reasons})" if groups else ""

        return (f"{self.corpus} ({self.root}): {self.kept} utterances"
                + part("skipped", self.skipped) + part("ignored", self.ignored))


def read_corpus(name: str, root: str | os.PathLike, **options) -> tuple[list[Utterance], ReadReport]:
    """The records and report of corpus `name` (one of CORPUS_NAMES) read from its release folder."""
    if name not in _READERS:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(_READERS)}")
    return importlib.import_module(_READERS[name]).read(root, **options)


def load_corpus(name: str, root: str | os.PathLike, **options) -> list[Utterance]:
    """`read_corpus` without the report, which is logged (as a warning when anything was skipped)."""
    records, report = read_corpus(name, root, **options)
    _log.log(logging.WARNING if report.n_skipped else logging.INFO, "%s", report.summary())
    return records


def corpus_root(root: str | os.PathLike, corpus: str) -> Path:
    """`root` as a Path, or CorpusError if it is not a folder."""
    path = Path(root)
    if not path.is_dir():
        raise CorpusError(f"{path}: {corpus} corpus folder not found")
    return path


def audio_files(root: Path, suffix: str, report: ReadReport) -> Iterator[Path]:
    """Files under `root` (recursively, sorted) whose name ends in `suffix` (any case); hidden files and
    __MACOSX folders are counted in the report as ignored and not yielded."""
    found = False
    for path in sorted(root.rglob("*")):
        if not path.name.lower().endswith(suffix) or not path.is_file():
            continue
        found = True
        parts = path.relative_to(root).parts
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            report.ignore(HIDDEN, str(path))
            continue
        yield path
    if not found:
        raise CorpusError(f"{root}: no {suffix} files found (is this the {report.corpus} release folder?)")
