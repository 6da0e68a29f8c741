"""CREMA-D: labels from file names `AudioWAV/1001_DFA_ANG_XX.wav` (actor_sentence_emotion_level).

Emotions ANG, DIS, FEA, HAP, NEU, SAD (emotions.CORPUS_LABEL_MAPS["cremad"]); levels LO, MD, HI, XX;
the twelve sentence codes of the release. Only .wav files are read (the release's AudioMP3/ copy is
not), from anywhere under `root`. A .wav whose name does not parse raises CorpusError naming it, or is
skipped and reported with skip_unparsed=True; a second file with an earlier file's name is ignored and
counted. utt_id = the stem; speaker = split = the actor id ("1001"). Audio is 16 kHz mono.
"""

from __future__ import annotations

import os
import re

from emorl_jax.data.corpora import ReadReport, audio_files, corpus_root
from emorl_jax.data.corpora.base import CorpusError, Utterance
from emorl_jax.data.emotions import CORPUS_LABEL_MAPS

CORPUS = "cremad"
SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
UNPARSED = "file name does not parse"
DUPLICATE = "duplicate of an earlier file name"
_NAME = re.compile(rf"(?P<actor>1\d{{3}})_(?:{'|'.join(SENTENCES)})_(?P<emotion>ANG|DIS|FEA|HAP|NEU|SAD)_"
                   r"(?:LO|MD|HI|XX)\.wav")


def read(root: str | os.PathLike, *, skip_unparsed: bool = False) -> tuple[list[Utterance], ReadReport]:
    """Utterances of every wav under `root`, in path order."""
    root = corpus_root(root, CORPUS)
    report = ReadReport(CORPUS, str(root))
    records, seen = [], set()
    for path in audio_files(root, ".wav", report):
        match = _NAME.fullmatch(path.name)
        if not match:
            if not skip_unparsed:
                raise CorpusError(f"{path}: not a CREMA-D file name (actor_sentence_emotion_level.wav, e.g. "
                                  "1001_DFA_ANG_XX.wav)")
            report.skip(UNPARSED, str(path))
            continue
        if path.stem in seen:
            report.ignore(DUPLICATE, str(path))
            continue
        seen.add(path.stem)
        label = CORPUS_LABEL_MAPS[CORPUS][match["emotion"]]
        records.append(Utterance(path.stem, str(path), label, match["actor"], match["actor"], CORPUS))
    report.kept = len(records)
    return records, report
