"""One tensorflow-datasets builder for every corpus: `emorl_speech/<corpus>` (meld, iemocap, ravdess, ...).

Each config reads a manually extracted release (`manual_dir`) with our corpus reader
(`emorl_jax.data.corpora`), decodes every clip to 16 kHz mono with `load_audio`, and writes array_record
files whose examples hold

    audio    float32 [samples] 16 kHz mono waveform (a Tensor feature: tfds's Audio feature needs TensorFlow)
    label    ClassLabel over the config's label set (`emotions.label_set`)
    utt_id, speaker, split, path (relative to manual_dir), corpus: text

Splits: MELD train/dev/test, IEMOCAP session1..session5, the cross-corpus sets one split "full" (their
`speaker` feature gives speaker folds). Examples keep the reader's order (no tfds shuffling). Read it back
without TensorFlow: `tfds.data_source("emorl_speech/meld", data_dir=...)`.

A clip that fails to decode raises AudioError naming the file, unless the builder is made with
skip_bad_clips=True: then it is skipped, logged and counted. Everything left out (reader skips such as
MELD's missing dev clip, and bad clips) is logged and stored in the dataset info metadata: `skipped`
{reason: [utt_id or "utt_id (file: problem)"]}, `ignored`, `num_skipped`, `num_bad_clips`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from emorl_jax.audio.io import AudioError, load_audio
from emorl_jax.data.corpora import read_corpus
from emorl_jax.data.corpora.base import Utterance
from emorl_jax.data.emotions import label_set

SAMPLE_RATE = 16000
BAD_AUDIO = "bad audio"
FULL_SPLIT = "full"
DECODE_CHUNK = 32  # clips decoded concurrently (threads), bounding the waveforms held in memory

_log = logging.getLogger(__name__)

LAYOUTS = {
    "meld": "MELD.Raw extracted with its inner archives: train/train_sent_emo.csv + train/train_splits/, "
            "dev_sent_emo.csv + dev_splits_complete/, test_sent_emo.csv + output_repeated_splits_test/",
    "iemocap": "IEMOCAP_full_release: Session1..Session5, each with dialog/EmoEvaluation/*.txt and "
               "sentences/wav/<dialog>/<utterance>.wav",
    "ravdess": "the RAVDESS speech audio: Actor_01..Actor_24/03-01-EE-II-SS-RR-AA.wav",
    "savee": "SAVEE: AudioData/<DC|JE|JK|KL>/<code><nn>.wav (or flat <speaker>_<code><nn>.wav)",
    "cremad": "CREMA-D: AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav",
    "tess": "TESS Toronto emotional speech set: <OAF|YAF>_<word>_<emotion>.wav, flat or in per-emotion folders",
}


@dataclasses.dataclass
class CorpusConfig(tfds.core.BuilderConfig):
    """A corpus: reader name and options, the label set of its ClassLabel, and split naming.

    official_splits: True = one tfds split per `Utterance.split` (lower-cased: "session1"); False = one
    split "full". Other `reader_options` (e.g. RAVDESS calm="neutral") make another dataset: see
    `corpus_config`.
    """

    corpus: str = ""
    labels: str = ""  # emotions.label_set name
    reader_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    official_splits: bool = False


CONFIGS = (
    CorpusConfig(name="meld", corpus="meld", labels="meld", official_splits=True,
                 description="MELD, 7 emotions; splits train/dev/test."),
    CorpusConfig(name="iemocap", corpus="iemocap", labels="iemocap4", reader_options={"protocol": "4class"},
                 official_splits=True, description="IEMOCAP 4-class (exc -> happy); splits session1..session5."),
    CorpusConfig(name="iemocap_full", corpus="iemocap", labels="iemocap_full", reader_options={"protocol": "full"},
                 official_splits=True, description="IEMOCAP, ten categories; splits session1..session5."),
    CorpusConfig(name="ravdess", corpus="ravdess", labels="ravdess", reader_options={"calm": "drop"},
                 description="RAVDESS speech, calm dropped; split full."),
    CorpusConfig(name="savee", corpus="savee", labels="savee", description="SAVEE; split full."),
    CorpusConfig(name="cremad", corpus="cremad", labels="cremad", description="CREMA-D; split full."),
    CorpusConfig(name="tess", corpus="tess", labels="tess", description="TESS (ps -> surprise); split full."),
)


class EmorlSpeech(tfds.core.GeneratorBasedBuilder):
    """Emotional-speech corpora as 16 kHz waveforms with emotion labels; one config per corpus."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = list(CONFIGS)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "These corpora are licensed and must be downloaded by hand. Point `manual_dir` "
        "(tfds.download.DownloadConfig(manual_dir=...), or `build(..., manual_dir=...)`) at the extracted "
        "release of the config's corpus:\n" + "\n".join(f"  {name}: {text}" for name, text in LAYOUTS.items()))

    def __init__(self, *, skip_bad_clips: bool = False, **kwargs):
        """`skip_bad_clips`: skip (log and count) clips that fail to decode instead of raising AudioError."""
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self.skip_bad_clips = skip_bad_clips

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict({
                "audio": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                "label": tfds.features.ClassLabel(names=label_set(self.builder_config.labels)),
                "utt_id": text, "speaker": text, "split": text, "path": text, "corpus": text,
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # keep the reader's order
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        root = Path(dl_manager.manual_dir)
        records, report = read_corpus(config.corpus, root, **config.reader_options)
        _log.log(logging.WARNING if report.n_skipped else logging.INFO, "%s", report.summary())
        metadata = self.info.metadata
        metadata.update(corpus=config.corpus, labels=config.labels, reader_options=dict(config.reader_options),
                        skip_bad_clips=self.skip_bad_clips, skipped={k: list(v) for k, v in report.skipped.items()},
                        ignored={k: list(v) for k, v in report.ignored.items()}, num_skipped=report.n_skipped,
                        num_bad_clips=0)
        splits: dict[str, list[Utterance]] = {}
        for utt in records:
            splits.setdefault(utt.split.lower() if config.official_splits else FULL_SPLIT, []).append(utt)
        return {name: self._generate_examples(utts, root) for name, utts in splits.items()}

    def _generate_examples(self, records: Sequence[Utterance], root: Path) -> Iterator[tuple[str, dict]]:
        metadata, bad = self.info.metadata, 0
        for utt, audio in _decoded(records):
            if isinstance(audio, AudioError):
                if not self.skip_bad_clips:
                    raise audio
                _log.warning("%s: skipping bad clip %s", self.name, audio)
                metadata["skipped"].setdefault(BAD_AUDIO, []).append(f"{utt.utt_id} ({audio})")
                metadata["num_bad_clips"] += 1
                metadata["num_skipped"] += 1
                bad += 1
                continue
            yield utt.utt_id, {
                "audio": audio, "label": utt.label, "utt_id": utt.utt_id, "speaker": utt.speaker,
                "split": utt.split, "path": os.path.relpath(utt.path, root), "corpus": utt.corpus,
            }
        _log.log(logging.WARNING if bad else logging.INFO, "%s/%s %s: %d of %d clips written, %d bad clip(s) "
                 "skipped (%d utterances skipped in all so far)", self.name, self.builder_config.name, records[0].split,
                 len(records) - bad, len(records), bad, metadata["num_skipped"])


def _decoded(records: Sequence[Utterance]) -> Iterator[tuple[Utterance, np.ndarray | AudioError]]:
    """(record, 16 kHz waveform or the AudioError it raised), in order; DECODE_CHUNK clips decoded at a time."""

    def decode(utt: Utterance) -> np.ndarray | AudioError:
        try:
            return load_audio(utt.path, sample_rate=SAMPLE_RATE, start_s=utt.start_s, end_s=utt.end_s)
        except AudioError as err:
            return err

    with ThreadPoolExecutor(max_workers=min(DECODE_CHUNK, os.cpu_count() or 1)) as pool:
        for start in range(0, len(records), DECODE_CHUNK):
            chunk = records[start:start + DECODE_CHUNK]
            yield from zip(chunk, pool.map(decode, chunk))


def corpus_config(corpus: str, name: str, **reader_options) -> CorpusConfig:
    """A variant of the stock config `corpus` with other reader options, under a new config `name`, e.g.
    `corpus_config("ravdess", "ravdess_calm_neutral", calm="neutral")`."""
    stock = {c.name: c for c in CONFIGS}
    if corpus not in stock:
        raise ValueError(f"unknown corpus config {corpus!r}; known: {', '.join(stock)}")
    if name in stock:
        raise ValueError(f"config name {name!r} is a stock config; give the variant a new name")
    base = stock[corpus]
    return dataclasses.replace(base, name=name, description=f"{base.description} Reader options: {reader_options}.",
                               reader_options={**base.reader_options, **reader_options})


def build(config: str | CorpusConfig, *, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
          skip_bad_clips: bool = False) -> EmorlSpeech:
    """Prepare `emorl_speech/<config>` (a stock config name or a `corpus_config`) in `data_dir` from the
    extracted release in `manual_dir`; returns the builder (`.info.metadata` says what was skipped).
    Read it with `tfds.data_source`. An already prepared dataset is reused as it is."""
    builder = EmorlSpeech(config=config, data_dir=os.fspath(data_dir), skip_bad_clips=skip_bad_clips)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder
