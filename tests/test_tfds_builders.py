"""The `emorl_speech` tfds builder on the miniature corpus releases, read back with `tfds.data_source`
(no TensorFlow), and the grain pipeline on a tfds source."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from corpus_fixtures import make_cremad, make_iemocap, make_meld, make_ravdess, make_savee, make_tess

from emorl_jax.audio.io import AudioError, load_audio
from emorl_jax.data.corpora import meld as meld_reader
from emorl_jax.data.emotions import label_set
from emorl_jax.data.pipeline import make_dataset
from emorl_jax.data.tfds_builders import BAD_AUDIO, FULL_SPLIT, build, corpus_config
from emorl_jax.text.prompts import MODES, build_prompt, instruction
from emorl_jax.text.tokenizer import train_sentencepiece


def _read_split(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


def _assert_matches(examples: list[dict], records, labels, root) -> None:
    """Examples equal the reader's records, in order, with the waveform load_audio gives."""
    assert [ex["utt_id"].decode() for ex in examples] == [u.utt_id for u in records]
    for ex, utt in zip(examples, records):
        assert labels[ex["label"]] == utt.label
        assert (ex["speaker"].decode(), ex["split"].decode(), ex["corpus"].decode()) == (
            utt.speaker, utt.split, utt.corpus)
        assert root / ex["path"].decode() == type(root)(utt.path)
        assert ex["audio"].dtype == np.float32
        np.testing.assert_array_equal(ex["audio"], load_audio(utt.path))


@pytest.fixture(scope="module")
def meld(tmp_path_factory):
    return make_meld(tmp_path_factory.mktemp("meld"))


def test_meld_corrupt_clip_fails_naming_it(meld, tmp_path):
    with pytest.raises(AudioError, match=r"train_splits/dia125_utt3\.mp4: unreadable or corrupt audio file"):
        build("meld", manual_dir=meld["train"].root, data_dir=tmp_path)
    assert not (tmp_path / "emorl_speech" / "meld" / "1.0.0").exists()


def test_meld_skips_and_reports_bad_clips(meld, tmp_path, caplog):
    root = meld["train"].root
    with caplog.at_level(logging.WARNING):
        build("meld", manual_dir=root, data_dir=tmp_path, skip_bad_clips=True)
    log = caplog.text
    assert "skipped 1 (missing clip (known release fault): dev_dia110_utt7)" in log
    assert "skipping bad clip" in log and "dia125_utt3.mp4: unreadable or corrupt audio file" in log
    assert "emorl_speech/meld train: 5 of 6 clips written, 1 bad clip(s) skipped" in log

    sources = tfds.data_source("emorl_speech/meld", data_dir=tmp_path)
    assert set(sources) == {"train", "dev", "test"}
    labels = sources["train"].dataset_info.features["label"].names
    assert tuple(labels) == label_set("meld")
    for split in ("train", "dev", "test"):
        expected = [u for u in meld[split].records if u.utt_id != "train_dia125_utt3"]
        _assert_matches(_read_split(sources[split]), expected, labels, root)
    assert [len(sources[s]) for s in ("train", "dev", "test")] == [5, 3, 4]

    metadata = sources["train"].dataset_info.metadata
    bad = metadata["skipped"][BAD_AUDIO]
    assert metadata["skipped"][meld_reader.MISSING_KNOWN] == ["dev_dia110_utt7"]
    assert len(bad) == 1 and bad[0].startswith("train_dia125_utt3 (") and "dia125_utt3.mp4: unreadable" in bad[0]
    assert (metadata["num_skipped"], metadata["num_bad_clips"]) == (2, 1)
    assert metadata["ignored"] == meld["train"].ignored
    assert "tensorflow" not in sys.modules


def test_read_back_in_a_process_without_tensorflow_or_our_code(meld, tmp_path):
    build("meld", manual_dir=meld["train"].root, data_dir=tmp_path, skip_bad_clips=True)
    code = ("import sys, tensorflow_datasets as tfds\n"
            f"s = tfds.data_source('emorl_speech/meld', data_dir={str(tmp_path)!r})\n"
            "ex = s['dev'][2]\n"
            "print(len(s['train']), len(s['dev']), len(s['test']), ex['utt_id'].decode(), ex['audio'].shape[0])\n"
            "assert 'tensorflow' not in sys.modules and 'emorl_jax' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["5", "3", "4", "dev_dia110_utt8", "16000"]


@pytest.fixture(scope="module")
def iemocap(tmp_path_factory):
    expected = make_iemocap(tmp_path_factory.mktemp("iemocap"))["4class"]
    data_dir = tmp_path_factory.mktemp("iemocap_tfds")
    build("iemocap", manual_dir=expected.root, data_dir=data_dir)
    return expected, tfds.data_source("emorl_speech/iemocap", data_dir=data_dir)


def test_iemocap_sessions(iemocap):
    expected, sources = iemocap
    assert sorted(sources) == [f"session{k}" for k in range(1, 6)]
    labels = sources["session1"].dataset_info.features["label"].names
    assert tuple(labels) == label_set("iemocap4")
    for k in range(1, 6):
        _assert_matches(_read_split(sources[f"session{k}"]),
                        [u for u in expected.records if u.split == f"Session{k}"], labels, expected.root)
    metadata = sources["session1"].dataset_info.metadata
    assert metadata["skipped"] == expected.skipped
    assert metadata["num_bad_clips"] == 0


@pytest.mark.parametrize("make, corpus", [(make_ravdess, "ravdess"), (make_savee, "savee"),
                                          (make_cremad, "cremad"), (make_tess, "tess")])
def test_cross_corpus_sets(make, corpus, tmp_path):
    expected = make(tmp_path / "release")
    expected = expected["drop"] if isinstance(expected, dict) else expected
    build(corpus, manual_dir=expected.root, data_dir=tmp_path / "tfds")
    sources = tfds.data_source(f"emorl_speech/{corpus}", data_dir=tmp_path / "tfds")
    assert list(sources) == [FULL_SPLIT]
    labels = sources[FULL_SPLIT].dataset_info.features["label"].names
    assert tuple(labels) == label_set(corpus)
    _assert_matches(_read_split(sources[FULL_SPLIT]), expected.records, labels, expected.root)


def test_config_variant(tmp_path):
    expected = make_ravdess(tmp_path / "release")["neutral"]
    build(corpus_config("ravdess", "ravdess_calm_neutral", calm="neutral"), manual_dir=expected.root,
          data_dir=tmp_path / "tfds")
    source = tfds.data_source("emorl_speech/ravdess_calm_neutral", data_dir=tmp_path / "tfds")[FULL_SPLIT]
    _assert_matches(_read_split(source), expected.records, source.dataset_info.features["label"].names,
                    expected.root)
    assert source.dataset_info.metadata["reader_options"] == {"calm": "neutral"}
    with pytest.raises(ValueError, match="config name 'ravdess' is a stock config"):
        corpus_config("ravdess", "ravdess", calm="neutral")
    with pytest.raises(ValueError, match="unknown corpus config 'emodb'"):
        corpus_config("emodb", "emodb2")


def test_missing_manual_dir_shows_instructions(tmp_path):
    with pytest.raises(AssertionError, match=r"(?s)does not exist or is empty.*meld: MELD\.Raw extracted"):
        build("meld", manual_dir=tmp_path / "absent", data_dir=tmp_path / "tfds")


def test_pipeline_reads_a_tfds_source_like_the_files(iemocap, tmp_path):
    expected, sources = iemocap
    labels = label_set("iemocap4")
    tok = train_sentencepiece([build_prompt(instruction(m, labels), num_audio_tokens=[1]) for m in MODES] * 3,
                              tmp_path / "sp.model", vocab_size=400)
    options = dict(tokenizer=tok, labels=labels, mode="ir", batch_size=3, audio_window=(80, 4.0),
                   bucket_multiple=8, shard_index=0, shard_count=1)
    from_tfds = list(make_dataset(sources["session3"], **options))
    from_files = list(make_dataset([u for u in expected.records if u.split == "Session3"], **options))
    assert len(from_tfds) == len(from_files) > 0
    for a, b in zip(from_tfds, from_files):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
