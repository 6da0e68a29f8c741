"""A plain JSON-lines manifest of Utterances, for users who do not want tfds.

One JSON object per line with the Utterance fields: utt_id, path, label, speaker, split, corpus and,
optionally, start_s/end_s (seconds or null). Extra keys are allowed and ignored. Relative paths are
resolved against the manifest's folder; `write_manifest` stores paths under that folder relative to
it (so the folder can be moved) and others absolute. `read_manifest` also reads a remote manifest
(`gs://bucket/manifest.jsonl`, through etils.epath); the audio files themselves must be local, so such a
manifest lists absolute local paths (copy the audio to each host first).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from emorl_jax.data.corpora.base import CorpusError, Utterance
from emorl_jax.data.emotions import ALL_LABELS
from emorl_jax.paths import as_path, is_remote

REQUIRED = ("utt_id", "path", "label", "speaker", "split", "corpus")
OPTIONAL = ("start_s", "end_s")
FILENAME = "manifest.jsonl"


def write_manifest(path: str | os.PathLike, records: Iterable[Utterance]) -> Path:
    """Write `records` to `path` (a .jsonl file, or a folder to hold manifest.jsonl); returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    base = Path(os.path.abspath(path.parent))
    lines = []
    for utt in records:
        record = dataclasses.asdict(utt)
        audio = Path(os.path.normpath(os.path.abspath(utt.path)))
        record["path"] = audio.relative_to(base).as_posix() if audio.is_relative_to(base) else str(audio)
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    """The Utterances of a manifest (a .jsonl file, or a folder holding manifest.jsonl; local or remote),
    absolute paths.

    Raises CorpusError "<file>:<line>: <problem>" for bad JSON, a missing key, a wrong type, an unknown
    label, a duplicate utt_id, or an audio file that does not exist or is not local.
    """
    path = as_path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CorpusError(f"{path}: manifest not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not UTF-8 text ({err})") from None
    records, seen = [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        utt = _parse(line, where, path.parent)
        if utt.utt_id in seen:
            raise CorpusError(f"{where}: duplicate utt_id {utt.utt_id!r} (first at line {seen[utt.utt_id]})")
        seen[utt.utt_id] = number
        records.append(utt)
    if not records:
        raise CorpusError(f"{path}: manifest has no records")
    return records


def _parse(line: str, where: str, base: os.PathLike) -> Utterance:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise CorpusError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise CorpusError(f"{where}: missing key(s) {missing}")
    for key in REQUIRED:
        if not isinstance(record[key], str) or not record[key]:
            raise CorpusError(f"{where}: {key} must be a non-empty string, got {record[key]!r}")
    for key in OPTIONAL:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise CorpusError(f"{where}: {key} must be a non-negative number or null, got {value!r}")
    if record["label"] not in ALL_LABELS:
        raise CorpusError(f"{where}: unknown label {record['label']!r} (known: {', '.join(sorted(ALL_LABELS))})")
    audio = base / record["path"]
    if is_remote(record["path"]) or is_remote(audio):
        raise CorpusError(f"{where}: audio {record['path']!r} is not a local file (audio is read from local disk "
                          "only: copy it to this machine; a remote manifest lists absolute local paths)")
    if not audio.is_file():
        raise CorpusError(f"{where}: audio file {audio} not found")
    start, end = record.get("start_s"), record.get("end_s")
    if start is not None and end is not None and end <= start:
        raise CorpusError(f"{where}: end_s {end} is not after start_s {start}")
    return Utterance(record["utt_id"], os.path.normpath(os.path.abspath(audio)), record["label"], record["speaker"],
                     record["split"], record["corpus"], None if start is None else float(start),
                     None if end is None else float(end))
