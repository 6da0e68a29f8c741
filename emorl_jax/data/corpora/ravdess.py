"""RAVDESS: labels from file names `Actor_XX/03-01-05-01-02-01-12.wav` found anywhere under `root`.

Fields: modality (01 audio-video, 02 video, 03 audio) - vocal channel (01 speech, 02 song) - emotion
(01 neutral, 02 calm, 03 happy, 04 sad, 05 angry, 06 fearful, 07 disgust, 08 surprised) - intensity
(01, 02) - statement (01, 02) - repetition (01, 02) - actor (01-24). Only audio-only speech (03-01) is
read; other wavs are ignored and counted. Calm: `calm="drop"` (default; skipped and reported) or
`calm="neutral"` (folded into neutral). A .wav whose name does not parse raises CorpusError naming it,
or is skipped and reported with skip_unparsed=True; a second file with an earlier file's name (a
second extracted copy) is ignored and counted. speaker = split = "Actor_XX"; utt_id = the stem.
"""

from __future__ import annotations

import os
import re

from emorl_jax.data.corpora import ReadReport, audio_files, corpus_root
from emorl_jax.data.corpora.base import CorpusError, Utterance
from emorl_jax.data.emotions import CORPUS_LABEL_MAPS

CORPUS = "ravdess"
CALM = "02"
CALM_DROPPED = "calm (dropped)"
NOT_SPEECH = "not audio-only speech (modality 03, channel 01)"
UNPARSED = "file name does not parse"
DUPLICATE = "duplicate of an earlier file name"
_NAME = re.compile(r"(?P<modality>0[123])-(?P<channel>0[12])-(?P<emotion>0[1-8])-0[12]-0[12]-0[12]-"
                   r"(?P<actor>0[1-9]|1\d|2[0-4])\.wav", re.IGNORECASE)


def read(root: str | os.PathLike, *, calm: str = "drop",
         skip_unparsed: bool = False) -> tuple[list[Utterance], ReadReport]:
    """Utterances of every speech wav under `root`, in path order."""
    if calm not in ("drop", "neutral"):
        raise ValueError(f"calm must be 'drop' or 'neutral', got {calm!r}")
    root = corpus_root(root, CORPUS)
    report = ReadReport(CORPUS, str(root))
    records, seen = [], set()
    for path in audio_files(root, ".wav", report):
        match = _NAME.fullmatch(path.name)
        if not match:
            if not skip_unparsed:
                raise CorpusError(f"{path}: not a RAVDESS file name (modality-channel-emotion-intensity-"
                                  "statement-repetition-actor.wav, e.g. 03-01-05-01-02-01-12.wav)")
            report.skip(UNPARSED, str(path))
            continue
        if path.stem in seen:
            report.ignore(DUPLICATE, str(path))
            continue
        seen.add(path.stem)
        if (match["modality"], match["channel"]) != ("03", "01"):
            report.ignore(NOT_SPEECH, path.name)
            continue
        if match["emotion"] == CALM and calm == "drop":
            report.skip(CALM_DROPPED, path.stem)
            continue
        label = "neutral" if match["emotion"] == CALM else CORPUS_LABEL_MAPS[CORPUS][match["emotion"]]
        actor = f"Actor_{match['actor']}"
        records.append(Utterance(path.stem, str(path), label, actor, actor, CORPUS))
    report.kept = len(records)
    return records, report
