"""The record every corpus reader yields, and the errors they raise."""

from __future__ import annotations

import dataclasses

from emorl_jax.errors import UserError


class CorpusError(UserError, ValueError):
    """A corpus file is missing or malformed; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One labelled speech clip.

    utt_id:  corpus-unique name (e.g. "dia0_utt0", "Ses01F_impro01_F000").
    path:    absolute path of the audio (wav/flac/mp3/mp4) file.
    label:   emotion in the common label space of `emorl_jax.data.emotions` (e.g. "happy").
    speaker: speaker id as the corpus names it.
    split:   "train"/"dev"/"test" for corpora with official splits, else the session/actor group
             used for cross-validation folds (e.g. "Session1").
    corpus:  "meld", "iemocap", "ravdess", "savee", "cremad", "tess" or "synthetic".
    start_s, end_s: optional segment of `path` in seconds (None = whole file).
    """

    utt_id: str
    path: str
    label: str
    speaker: str
    split: str
    corpus: str
    start_s: float | None = None
    end_s: float | None = None
