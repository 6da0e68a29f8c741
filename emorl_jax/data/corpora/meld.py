"""MELD (MELD.Raw): one Utterance per row of the split's CSV whose clip `dia{D}_utt{U}.mp4` exists.

Layout (DATASETS.md), relative to `root` = the MELD.Raw folder:
  train: train/train_sent_emo.csv + train/train_splits/
  dev:   dev_sent_emo.csv + dev_splits_complete/
  test:  test_sent_emo.csv + output_repeated_splits_test/
(the CSV or clip folder is also found one level up or down, e.g. train_splits/ or dev/dev_sent_emo.csv,
as other extractions place them). CSVs are read with the csv module (UTF-8, CRLF, curly quotes,
quoted commas); every row is checked (column count, emotion, sentiment, integer ids, h:mm:ss,ms or
hh:mm:ss,ms times) and a bad row raises CorpusError naming the file and line. Clips are whole
utterances, so start_s/end_s stay None; audio is 48 kHz with 1, 2 or 6 channels (the decoder averages
them). utt_id is "{split}_dia{D}_utt{U}" (unique over the three splits); speaker is the CSV's Speaker
(e.g. "All"); label via emotions.CORPUS_LABEL_MAPS["meld"].

Known release faults: the dev clip dia110_utt7 is missing (skipped and reported); the train clip
dia125_utt3 is corrupt (listed; the audio decoder rejects it). Any other missing clip raises
CorpusError unless skip_missing=True (then skipped and reported). mp4 files without a CSV row are
ignored (and counted).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path

from emorl_jax.data.corpora import ReadReport, corpus_root
from emorl_jax.data.corpora.base import CorpusError, Utterance
from emorl_jax.data.emotions import CORPUS_LABEL_MAPS

CORPUS = "meld"
SPLITS = ("train", "dev", "test")
# split -> (CSV candidates, clip-folder candidates); the first of each is DATASETS.md's layout.
LAYOUT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "train": (("train/train_sent_emo.csv", "train_sent_emo.csv"), ("train/train_splits", "train_splits")),
    "dev": (("dev_sent_emo.csv", "dev/dev_sent_emo.csv"), ("dev_splits_complete", "dev/dev_splits_complete")),
    "test": (("test_sent_emo.csv", "test/test_sent_emo.csv"),
             ("output_repeated_splits_test", "test/output_repeated_splits_test")),
}
COLUMNS = ("Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
           "Episode", "StartTime", "EndTime")
SENTIMENTS = frozenset({"positive", "neutral", "negative"})
KNOWN_MISSING = {"dev": frozenset({"dia110_utt7"})}
MISSING_KNOWN = "missing clip (known release fault)"
MISSING = "missing clip"
NO_ROW = "mp4 without a CSV row"
_TIME = re.compile(r"\d{1,2}:\d{2}:\d{2},\d{3}")


def read(root: str | os.PathLike, *, split: str | Sequence[str] | None = None,
         skip_missing: bool = False) -> tuple[list[Utterance], ReadReport]:
    """Utterances of `split` ("train", "dev", "test", several, or None = all three in that order)."""
    splits = SPLITS if split is None else (split,) if isinstance(split, str) else tuple(split)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"MELD split must be one or more of {SPLITS}, got {split!r}")
    root = corpus_root(root, CORPUS)
    report = ReadReport(CORPUS, str(root))
    records: list[Utterance] = []
    for name in splits:
        records += _read_split(root, name, skip_missing, report)
    report.kept = len(records)
    return records, report


def _find(root: Path, candidates: tuple[str, ...], what: str, is_dir: bool) -> Path:
    for rel in candidates:
        path = root / rel
        if path.is_dir() if is_dir else path.is_file():
            return path
    raise CorpusError(f"{root}: MELD {what} not found (looked for {', '.join(candidates)})")


def _read_split(root: Path, split: str, skip_missing: bool, report: ReadReport) -> list[Utterance]:
    csv_names, dir_names = LAYOUT[split]
    csv_path = _find(root, csv_names, f"{split} CSV", is_dir=False)
    clip_dir = _find(root, dir_names, f"{split} clip folder", is_dir=True)
    clips = {name for name in os.listdir(clip_dir) if name.lower().endswith(".mp4")}
    records, missing, seen = [], [], {}
    for line, row in _rows(csv_path):
        stem = f"dia{row['Dialogue_ID']}_utt{row['Utterance_ID']}"
        if stem in seen:
            raise CorpusError(f"{csv_path}:{line}: second row for {stem} (first at line {seen[stem]})")
        seen[stem] = line
        utt_id = f"{split}_{stem}"
        if f"{stem}.mp4" not in clips:
            if stem in KNOWN_MISSING.get(split, ()):
                report.skip(MISSING_KNOWN, utt_id)
            elif skip_missing:
                report.skip(MISSING, utt_id)
            else:
                missing.append(f"{stem}.mp4 (line {line})")
            continue
        label = CORPUS_LABEL_MAPS[CORPUS][row["Emotion"]]
        records.append(Utterance(utt_id, str(clip_dir / f"{stem}.mp4"), label, row["Speaker"], split, CORPUS))
    if missing:
        raise CorpusError(f"{csv_path}: {len(missing)} clip(s) missing from {clip_dir}: {', '.join(missing[:10])}"
                          f"{' ...' if len(missing) > 10 else ''} (pass skip_missing=True to skip them)")
    for name in sorted(clips - {f"{stem}.mp4" for stem in seen}):
        report.ignore(NO_ROW, f"{split}/{name}")
    return records


def _rows(csv_path: Path):
    """(line number, row dict) for each data row, checked; the line is where the row ends."""
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            absent = [c for c in COLUMNS if c not in header]
            if absent:
                raise CorpusError(f"{csv_path}:1: missing column(s) {absent} (header: {header})")
            for fields in reader:
                if not fields:
                    continue
                line = reader.line_num
                if len(fields) != len(header):
                    raise CorpusError(f"{csv_path}:{line}: {len(fields)} fields, expected {len(header)}")
                row = {c: fields[header.index(c)].strip() for c in COLUMNS}
                yield line, _check(row, f"{csv_path}:{line}")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{csv_path}: not UTF-8 text ({err})") from None
    except csv.Error as err:
        raise CorpusError(f"{csv_path}: malformed CSV ({err})") from None


def _check(row: dict[str, str], where: str) -> dict[str, str]:
    if row["Emotion"] not in CORPUS_LABEL_MAPS[CORPUS]:
        raise CorpusError(f"{where}: unknown emotion {row['Emotion']!r} "
                          f"(expected one of {sorted(CORPUS_LABEL_MAPS[CORPUS])})")
    if row["Sentiment"] not in SENTIMENTS:
        raise CorpusError(f"{where}: unknown sentiment {row['Sentiment']!r} (expected one of {sorted(SENTIMENTS)})")
    for key in ("Dialogue_ID", "Utterance_ID"):
        if not (row[key].isascii() and row[key].isdigit()):
            raise CorpusError(f"{where}: {key} {row[key]!r} is not a non-negative integer")
        row[key] = str(int(row[key]))
    for key in ("StartTime", "EndTime"):
        if not _TIME.fullmatch(row[key]):
            raise CorpusError(f"{where}: {key} {row[key]!r} is not a h:mm:ss,ms time")
    return row
