"""IEMOCAP (IEMOCAP_full_release): utterance labels from SessionN/dialog/EmoEvaluation/*.txt.

Only the top-level .txt files of EmoEvaluation/ are read (Attribute/, Categorical/, Self-evaluation/
are not). In them, a line starting with "[" is an utterance line and must read
`[start - end]<TAB>turn name<TAB>label<TAB>[V, A, D]` (else CorpusError with file and line); "%"
header lines, blank lines and annotator lines ("C-E2:\tNeutral;\t()", "A-E3:\tval 3; ...") are skipped;
any other line is an error. Audio: SessionN/sentences/wav/<dialog>/<turn>.wav with <dialog> the turn
name minus its last 5 characters (Ses01F_script01_1_F000 -> Ses01F_script01_1), 16 kHz mono; a missing
wav raises CorpusError unless skip_missing=True (then skipped and reported).

protocol "4class" keeps neu/hap/exc/ang/sad with exc -> happy (label set "iemocap4"); "full" keeps the
ten categories with exc -> "excited" (label set "iemocap_full"); other labels (fru, sur, ..., and xxx =
no majority) are skipped and reported. split = "SessionN"; speaker = session + the turn's gender
("Ses01F_impro01_M000" -> "Ses01M"); utt_id = the turn name. Wavs are whole turns: start_s/end_s None.
`iemocap_fold(records, k)` gives leave-one-session-out fold k (tests on Session k).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from emorl_jax.data.corpora import ReadReport, corpus_root
from emorl_jax.data.corpora.base import CorpusError, Utterance
from emorl_jax.data.emotions import CORPUS_LABEL_MAPS

CORPUS = "iemocap"
SESSIONS = (1, 2, 3, 4, 5)
PROTOCOLS = {"4class": "iemocap4", "full": "iemocap_full"}  # protocol -> CORPUS_LABEL_MAPS key
MISSING = "missing wav"
_UTTERANCE = re.compile(
    r"\[(?P<start>\d+(?:\.\d+)?) - (?P<end>\d+(?:\.\d+)?)\]\t(?P<name>Ses0[1-5][FM]_\S+_[FM]\d{3})\t"
    r"(?P<label>[a-z]+)\t\[\s*-?\d+(?:\.\d+)?,\s*-?\d+(?:\.\d+)?,\s*-?\d+(?:\.\d+)?\s*\]")
_ANNOTATOR = re.compile(r"[A-Z]+-[A-Z0-9]+:")


def not_used(label: str, protocol: str) -> str:
    """The report reason for an utterance whose label `protocol` does not use."""
    return f"label {label!r} not used by the {protocol} protocol"


def read(root: str | os.PathLike, *, protocol: str = "4class", sessions: Sequence[int] = SESSIONS,
         skip_missing: bool = False) -> tuple[list[Utterance], ReadReport]:
    """Utterances of `sessions` in session, file-name and line order."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"IEMOCAP protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if not sessions or any(s not in SESSIONS for s in sessions):
        raise ValueError(f"IEMOCAP sessions must be among {SESSIONS}, got {sessions!r}")
    root = corpus_root(root, CORPUS)
    report = ReadReport(CORPUS, str(root))
    records: list[Utterance] = []
    missing: list[str] = []
    seen: dict[str, str] = {}
    for session in sessions:
        folder = root / f"Session{session}" / "dialog" / "EmoEvaluation"
        files = sorted(p for p in folder.glob("*.txt") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise CorpusError(f"{folder}: no EmoEvaluation .txt files (is {root} IEMOCAP_full_release?)")
        for txt in files:
            for where, name, raw in _utterances(txt, session):
                if name in seen:
                    raise CorpusError(f"{where}: {name} already labelled at {seen[name]}")
                seen[name] = where
                label = CORPUS_LABEL_MAPS[PROTOCOLS[protocol]][raw]
                if label is None:
                    report.skip(not_used(raw, protocol), name)
                    continue
                wav = root / f"Session{session}" / "sentences" / "wav" / name[:-5] / f"{name}.wav"
                if not wav.is_file():
                    if not skip_missing:
                        missing.append(f"{wav} (labelled at {where})")
                    report.skip(MISSING, name)
                    continue
                speaker = name[:5] + name[-4]
                records.append(Utterance(name, str(wav), label, speaker, f"Session{session}", CORPUS))
    if missing:
        raise CorpusError(f"{root}: {len(missing)} labelled wav(s) missing: {', '.join(missing[:10])}"
                          f"{' ...' if len(missing) > 10 else ''} (pass skip_missing=True to skip them)")
    report.kept = len(records)
    return records, report


def _utterances(txt: Path, session: int):
    """(file:line, turn name, raw label) for each utterance line of one EmoEvaluation file."""
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise CorpusError(f"{txt}: not UTF-8 text ({err})") from None
    labels = CORPUS_LABEL_MAPS["iemocap_full"]
    for number, line in enumerate(lines, start=1):
        where = f"{txt}:{number}"
        text = line.strip()
        if not text or text.startswith("%") or _ANNOTATOR.match(text):
            continue
        if not text.startswith("["):
            raise CorpusError(f"{where}: unrecognised line {line!r}")
        match = _UTTERANCE.fullmatch(text)
        if not match:
            raise CorpusError(f"{where}: malformed utterance line {line!r} (expected "
                              "'[start - end]<TAB>turn<TAB>label<TAB>[V, A, D]')")
        name, raw = match["name"], match["label"]
        if raw not in labels:
            raise CorpusError(f"{where}: unknown label {raw!r} (expected one of {sorted(labels)})")
        if not name.startswith(f"Ses0{session}"):
            raise CorpusError(f"{where}: turn {name} does not belong to Session{session}")
        if float(match["end"]) < float(match["start"]):
            raise CorpusError(f"{where}: end time {match['end']} before start time {match['start']}")
        yield where, name, raw


def iemocap_fold(records: Sequence[Utterance], k: int) -> tuple[list[Utterance], list[Utterance]]:
    """Leave-one-session-out fold k (1-5): (train = the other sessions, test = Session k)."""
    if k not in SESSIONS:
        raise ValueError(f"IEMOCAP fold must be one of {SESSIONS}, got {k!r}")
    test = [u for u in records if u.split == f"Session{k}"]
    if not test:
        raise ValueError(f"no utterances of Session{k} among the {len(records)} records")
    return [u for u in records if u.split != f"Session{k}"], test
