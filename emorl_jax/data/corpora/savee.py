"""SAVEE: labels from file names, `AudioData/<DC|JE|JK|KL>/<code><nn>.wav` or flat `JE_sa01.wav`.

Emotion codes a, d, f, h, n, sa, su are matched with `^[a-z]+` so that "sa"/"su" are not "s"
(emotions.CORPUS_LABEL_MAPS["savee"]). In the AudioData layout the speaker is the parent folder; in
the flat layout it is the name's prefix. Files are found anywhere under `root`. A .wav whose name does
not parse (or whose folder is not a speaker) raises CorpusError naming it, or is skipped and reported
with skip_unparsed=True; a second file for the same utterance (both layouts extracted) is ignored and
counted. utt_id = "<speaker>_<code><nn>"; speaker = split = the speaker.
"""

from __future__ import annotations

import os
import re

from emorl_jax.data.corpora import ReadReport, audio_files, corpus_root
from emorl_jax.data.corpora.base import CorpusError, Utterance
from emorl_jax.data.emotions import CORPUS_LABEL_MAPS

CORPUS = "savee"
SPEAKERS = ("DC", "JE", "JK", "KL")
UNPARSED = "file name does not parse"
DUPLICATE = "duplicate of an earlier utterance"
_NESTED = re.compile(r"(?P<code>[a-z]+)(?P<number>\d{2})\.wav")
_FLAT = re.compile(r"(?P<speaker>DC|JE|JK|KL)_(?P<code>[a-z]+)(?P<number>\d{2})\.wav")


def read(root: str | os.PathLike, *, skip_unparsed: bool = False) -> tuple[list[Utterance], ReadReport]:
    """Utterances of every wav under `root`, in path order."""
    root = corpus_root(root, CORPUS)
    report = ReadReport(CORPUS, str(root))
    codes = CORPUS_LABEL_MAPS[CORPUS]
    records, seen = [], set()
    for path in audio_files(root, ".wav", report):
        match = _FLAT.fullmatch(path.name) or _NESTED.fullmatch(path.name)
        speaker = (match.groupdict().get("speaker") or path.parent.name) if match else None
        if not match or match["code"] not in codes or speaker not in SPEAKERS:
            if not skip_unparsed:
                raise CorpusError(f"{path}: not a SAVEE file (AudioData/<DC|JE|JK|KL>/<code><nn>.wav or "
                                  f"<speaker>_<code><nn>.wav with code one of {', '.join(codes)})")
            report.skip(UNPARSED, str(path))
            continue
        utt_id = f"{speaker}_{match['code']}{match['number']}"
        if utt_id in seen:
            report.ignore(DUPLICATE, str(path))
            continue
        seen.add(utt_id)
        records.append(Utterance(utt_id, str(path), codes[match["code"]], speaker, speaker, CORPUS))
    report.kept = len(records)
    return records, report
