"""TESS: labels from file names `OAF_back_angry.wav` (speaker_word_emotion), nested or flat.

The release is distributed both flat and nested in one folder per speaker and emotion, whose names
vary in case and spelling (OAF_angry/, OAF_Fear/, OAF_Pleasant_surprise/, YAF_pleasant_surprised/,
often inside a "TESS Toronto emotional speech set data" folder); folders are ignored and every .wav
under `root` is read by its name. Emotion tokens (any case) angry, disgust, fear, happy, neutral, ps
(pleasant surprise -> surprise), sad: emotions.CORPUS_LABEL_MAPS["tess"]. A .wav whose name does not
parse raises CorpusError naming it, or is skipped and reported with skip_unparsed=True; a second file
with an earlier file's name (some downloads hold the set twice) is ignored and counted.
utt_id = the stem; speaker = split = OAF or YAF.
"""

from __future__ import annotations

import os
import re

from emorl_jax.data.corpora import ReadReport, audio_files, corpus_root
from emorl_jax.data.corpora.base import CorpusError, Utterance
from emorl_jax.data.emotions import CORPUS_LABEL_MAPS

CORPUS = "tess"
UNPARSED = "file name does not parse"
DUPLICATE = "duplicate of an earlier file name"
_NAME = re.compile(r"(?P<speaker>OAF|YAF)_(?P<word>[A-Za-z]+)_(?P<emotion>[A-Za-z]+)\.wav")


def read(root: str | os.PathLike, *, skip_unparsed: bool = False) -> tuple[list[Utterance], ReadReport]:
    """Utterances of every wav under `root`, in path order."""
    root = corpus_root(root, CORPUS)
    report = ReadReport(CORPUS, str(root))
    emotions = CORPUS_LABEL_MAPS[CORPUS]
    records, seen = [], set()
    for path in audio_files(root, ".wav", report):
        match = _NAME.fullmatch(path.name)
        if not match or match["emotion"].lower() not in emotions:
            if not skip_unparsed:
                raise CorpusError(f"{path}: not a TESS file name (OAF|YAF_word_emotion.wav with emotion one of "
                                  f"{', '.join(emotions)})")
            report.skip(UNPARSED, str(path))
            continue
        if path.stem in seen:
            report.ignore(DUPLICATE, str(path))
            continue
        seen.add(path.stem)
        label = emotions[match["emotion"].lower()]
        records.append(Utterance(path.stem, str(path), label, match["speaker"], match["speaker"], CORPUS))
    report.kept = len(records)
    return records, report
