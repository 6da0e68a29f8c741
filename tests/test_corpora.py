"""Corpus readers on miniature release copies (tests/corpus_fixtures.py), the registry, and the manifest."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from corpus_fixtures import make_cremad, make_iemocap, make_meld, make_ravdess, make_savee, make_tess

from emorl_jax.audio.io import AudioError, load_audio
from emorl_jax.data.corpora import (CORPUS_NAMES, HIDDEN, cremad, iemocap, load_corpus, meld, ravdess, read_corpus,
                                    savee, tess)
from emorl_jax.data.corpora.base import CorpusError, Utterance
from emorl_jax.data.corpora.iemocap import iemocap_fold
from emorl_jax.data.manifest import read_manifest, write_manifest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every fixture corpus, built once; tests that change files work on a copy (`copy`)."""
    tmp = tmp_path_factory.mktemp("corpora")
    return {"meld": make_meld(tmp), "iemocap": make_iemocap(tmp), "ravdess": make_ravdess(tmp),
            "savee": make_savee(tmp), "savee_flat": make_savee(tmp, flat=True), "cremad": make_cremad(tmp),
            "tess": make_tess(tmp), "tess_flat": make_tess(tmp, nested=False)}


def copy(expected, tmp_path: Path) -> Path:
    root = tmp_path / expected.root.name
    shutil.copytree(expected.root, root)
    return root


def check(result, expected) -> None:
    records, report = result
    assert records == expected.records
    assert report.skipped == expected.skipped
    assert report.ignored == expected.ignored
    assert report.kept == len(records)


# ---------------------------------------------------------------------------------------------- MELD
def test_meld_fixture_has_the_release_quirks(built):
    raw = (built["meld"]["train"].root / "train/train_sent_emo.csv").read_bytes()
    assert raw.count(b"\r\n") == 7 and b"\n" not in raw.replace(b"\r\n", b"")
    assert "’".encode() in raw and b'"0:20:57,256"' in raw and b'"00:04:12,100"' in raw
    assert b"\xef\xbb\xbf" not in raw[:3]  # no BOM


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_meld_split(built, split):
    expected = built["meld"][split]
    check(meld.read(expected.root, split=split), expected)


def test_meld_counts_by_hand(built):
    records, report = meld.read(built["meld"]["train"].root)
    by_split = {s: [u for u in records if u.split == s] for s in ("train", "dev", "test")}
    assert [len(v) for v in by_split.values()] == [6, 3, 4]
    assert [u.label for u in by_split["train"]] == ["sad", "surprise", "happy", "angry", "fear", "neutral"]
    assert [u.utt_id for u in by_split["dev"]] == ["dev_dia0_utt0", "dev_dia0_utt1", "dev_dia110_utt8"]
    assert by_split["train"][2].speaker == "All"
    assert len({u.utt_id for u in records}) == 13
    assert report.skipped == {meld.MISSING_KNOWN: ["dev_dia110_utt7"]}
    assert report.ignored == {meld.NO_ROW: ["train/dia999_utt0.mp4"]}


def test_meld_load_corpus_reports_skipped_clip(built, caplog):
    root = built["meld"]["dev"].root
    with caplog.at_level(logging.INFO):
        records = load_corpus("meld", root, split="dev")
    assert records == built["meld"]["dev"].records
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "3 utterances; skipped 1 (missing clip (known release fault): dev_dia110_utt7)" \
        in warning[0].getMessage()


def test_meld_clips_decode_as_the_reader_promises(built):
    train = {u.utt_id: u for u in built["meld"]["train"].records}
    with pytest.raises(AudioError, match="dia125_utt3.mp4"):
        load_audio(train["train_dia125_utt3"].path)
    wave = load_audio(train["train_dia3_utt0"].path)  # 6 channels, channel 0 silent: the average is not
    assert wave.shape == (16000,) and 0.05 < float(np.sqrt(np.mean(wave**2))) < 0.5


def test_meld_missing_clip(built, tmp_path):
    root = copy(built["meld"]["test"], tmp_path)
    (root / "output_repeated_splits_test/dia0_utt1.mp4").unlink()
    with pytest.raises(CorpusError, match=r"test_sent_emo.csv: 1 clip\(s\) missing .*dia0_utt1.mp4 \(line 3\)"):
        meld.read(root, split="test")
    records, report = meld.read(root, split="test", skip_missing=True)
    assert [u.utt_id for u in records] == ["test_dia0_utt0", "test_dia1_utt0", "test_dia1_utt2"]
    assert report.skipped == {meld.MISSING: ["test_dia0_utt1"]}


@pytest.mark.parametrize("row, message", [
    ('2,"Hi",Monica,anger,negative,0,1,5,9,"0:00:11,100"', "test_sent_emo.csv:3: 10 fields, expected 11"),
    ('2,"Hi",Monica,happiness,positive,0,1,5,9,"0:00:11,100","0:00:13,000"',
     "test_sent_emo.csv:3: unknown emotion 'happiness'"),
    ('2,"Hi",Monica,anger,negative,0,x1,5,9,"0:00:11,100","0:00:13,000"',
     "test_sent_emo.csv:3: Utterance_ID 'x1' is not a non-negative integer"),
    ('2,"Hi",Monica,anger,angry,0,1,5,9,"0:00:11,100","0:00:13,000"',
     "test_sent_emo.csv:3: unknown sentiment 'angry'"),
    ('2,"Hi",Monica,anger,negative,0,1,5,9,"0:00:11.100","0:00:13,000"',
     r"test_sent_emo.csv:3: StartTime '0:00:11.100' is not a h:mm:ss,ms time"),
    ('2,"Hi",Monica,anger,negative,0,0,5,9,"0:00:11,100","0:00:13,000"',
     r"test_sent_emo.csv:3: second row for dia0_utt0 \(first at line 2\)"),
])
def test_meld_malformed_row(built, tmp_path, row, message):
    root = copy(built["meld"]["test"], tmp_path)
    path = root / "test_sent_emo.csv"
    lines = path.read_bytes().decode().split("\r\n")
    lines[2] = row
    path.write_bytes("\r\n".join(lines).encode())
    with pytest.raises(CorpusError, match=message):
        meld.read(root, split="test")


def test_meld_bad_header_and_layout(built, tmp_path):
    root = copy(built["meld"]["test"], tmp_path)
    path = root / "test_sent_emo.csv"
    path.write_bytes(path.read_bytes().replace(b"Dialogue_ID", b"Dialog"))
    with pytest.raises(CorpusError, match=r"test_sent_emo.csv:1: missing column\(s\) \['Dialogue_ID'\]"):
        meld.read(root, split="test")
    with pytest.raises(CorpusError, match="MELD dev clip folder not found"):
        shutil.rmtree(root / "dev_splits_complete")
        meld.read(root, split="dev")
    with pytest.raises(ValueError, match="MELD split must be"):
        meld.read(root, split="validation")


def test_meld_alternative_layout(built, tmp_path):
    """train_splits/ and train_sent_emo.csv directly under MELD.Raw (as some extractions place them)."""
    root = copy(built["meld"]["train"], tmp_path)
    (root / "train/train_sent_emo.csv").rename(root / "train_sent_emo.csv")
    (root / "train/train_splits").rename(root / "train_splits")
    records, _ = meld.read(root, split="train")
    assert [u.utt_id for u in records] == [u.utt_id for u in built["meld"]["train"].records]
    assert records[0].path == str(root / "train_splits/dia0_utt0.mp4")


# ------------------------------------------------------------------------------------------- IEMOCAP
@pytest.mark.parametrize("protocol", ["4class", "full"])
def test_iemocap_protocols(built, protocol):
    expected = built["iemocap"][protocol]
    check(iemocap.read(expected.root, protocol=protocol), expected)


def test_iemocap_counts_by_hand(built):
    records, report = iemocap.read(built["iemocap"]["4class"].root)
    # per session: impro neu/hap/ang/exc = 4, plus the scripted sad, neu, ang among its first N labels
    assert [sum(u.split == f"Session{k}" for u in records) for k in range(1, 6)] == [5, 5, 6, 6, 7]
    assert {u.label for u in records} == {"neutral", "happy", "sad", "angry"}
    assert sum(u.label == "happy" for u in records) == 10  # hap + exc in each session
    assert {k: len(v) for k, v in report.skipped.items()} == {
        iemocap.not_used("xxx", "4class"): 5, iemocap.not_used("fru", "4class"): 5,
        iemocap.not_used("oth", "4class"): 4, iemocap.not_used("sur", "4class"): 2}
    first = records[0]
    assert (first.utt_id, first.speaker, first.split) == ("Ses01F_impro01_F000", "Ses01F", "Session1")
    assert records[1].speaker == "Ses01M"
    scripted = next(u for u in records if "script" in u.utt_id)
    assert scripted.utt_id == "Ses01M_script01_1_F000"
    assert scripted.path.endswith("Session1/sentences/wav/Ses01M_script01_1/Ses01M_script01_1_F000.wav")
    full, _ = iemocap.read(built["iemocap"]["full"].root, protocol="full")
    assert sum(u.label == "excited" for u in full) == 5 and sum(u.label == "frustrated" for u in full) == 5


def test_iemocap_folds(built):
    records, _ = iemocap.read(built["iemocap"]["4class"].root)
    for k, size in zip(range(1, 6), [5, 5, 6, 6, 7]):
        train, test = iemocap_fold(records, k)
        assert len(test) == size and len(train) == 29 - size
        assert {u.split for u in test} == {f"Session{k}"} and f"Session{k}" not in {u.split for u in train}
    with pytest.raises(ValueError, match="fold must be one of"):
        iemocap_fold(records, 6)
    only2, _ = iemocap.read(built["iemocap"]["4class"].root, sessions=(2,))
    assert only2 == [u for u in records if u.split == "Session2"]
    with pytest.raises(ValueError, match="no utterances of Session1"):
        iemocap_fold(only2, 1)


@pytest.mark.parametrize("old, new, message", [
    ("[0.2901 - 2.2357]\tSes01F_impro01_F000\tneu", "[0.2901 - 2.2357] Ses01F_impro01_F000 neu",
     "Ses01F_impro01.txt:3: malformed utterance line"),
    ("\tSes01F_impro01_M000\thap\t", "\tSes01F_impro01_M000\thappy\t", "Ses01F_impro01.txt:10: unknown label 'happy'"),
    ("\tSes01F_impro01_M000\thap\t[2.5000, 3.0000, 2.5000]", "\tSes01F_impro01_M000\thap\t[2.5000, 3.0000]",
     "Ses01F_impro01.txt:10: malformed utterance line"),
    ("C-E2:\tNeutral;\t()\n", "Neutral;\t()\n", "Ses01F_impro01.txt:4: unrecognised line"),
    ("\tSes01F_impro01_F000\t", "\tSes02F_impro01_F000\t", "Ses01F_impro01.txt:3: turn Ses02F_impro01_F000 does not"),
])
def test_iemocap_malformed_line(built, tmp_path, old, new, message):
    root = copy(built["iemocap"]["4class"], tmp_path)
    path = root / "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(CorpusError, match=message):
        iemocap.read(root)


def test_iemocap_missing_wav(built, tmp_path):
    root = copy(built["iemocap"]["4class"], tmp_path)
    (root / "Session3/sentences/wav/Ses03F_impro01/Ses03F_impro01_M001.wav").unlink()
    with pytest.raises(CorpusError, match=r"1 labelled wav\(s\) missing: .*Ses03F_impro01_M001.wav"):
        iemocap.read(root)
    records, report = iemocap.read(root, skip_missing=True)
    assert len(records) == 28 and report.skipped[iemocap.MISSING] == ["Ses03F_impro01_M001"]
    with pytest.raises(CorpusError, match="no EmoEvaluation .txt files"):
        iemocap.read(tmp_path)
    with pytest.raises(ValueError, match="protocol must be one of"):
        iemocap.read(root, protocol="5class")


# -------------------------------------------------------------------------- cross-corpus (file names)
@pytest.mark.parametrize("calm", ["drop", "neutral"])
def test_ravdess(built, calm):
    expected = built["ravdess"][calm]
    check(ravdess.read(expected.root, calm=calm), expected)
    counts = expected.counts()
    assert len(expected.records) == (14 if calm == "drop" else 16)
    assert counts["neutral"] == (2 if calm == "drop" else 4) and counts["surprise"] == 2


@pytest.mark.parametrize("name", ["savee", "savee_flat"])
def test_savee(built, name):
    expected = built[name]
    check(savee.read(expected.root), expected)
    by_id = {u.utt_id: u.label for u in expected.records}
    assert len(by_id) == 32 and by_id["JE_sa01"] == "sad" and by_id["KL_su01"] == "surprise"


def test_cremad(built):
    check(cremad.read(built["cremad"].root), built["cremad"])
    assert built["cremad"].counts() == {"angry": 2, "happy": 1, "sad": 1, "neutral": 1, "fear": 1, "disgust": 1}


@pytest.mark.parametrize("name", ["tess", "tess_flat"])
def test_tess(built, name):
    expected = built[name]
    check(tess.read(expected.root), expected)
    assert len(expected.records) == 21 and expected.counts()["surprise"] == 3


@pytest.mark.parametrize("corpus, reader, bad, message", [
    ("ravdess", ravdess, "Actor_01/03-01-09-01-01-01-01.wav", "not a RAVDESS file name"),
    ("savee", savee, "AudioData/JE/s01.wav", "not a SAVEE file"),
    ("savee", savee, "AudioData/XX/a01.wav", "not a SAVEE file"),
    ("cremad", cremad, "AudioWAV/1001_DFA_ANGRY_XX.wav", "not a CREMA-D file name"),
    ("tess", tess, "TESS Toronto emotional speech set data/OAF_angry/OAF_back_furious.wav", "not a TESS file name"),
])
def test_unparsed_file_name(built, tmp_path, corpus, reader, bad, message):
    expected = built[corpus]["drop"] if corpus == "ravdess" else built[corpus]
    root = copy(expected, tmp_path)
    (root / bad).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(expected.records[0].path, root / bad)
    with pytest.raises(CorpusError, match=f"{root / bad}: {message}"):
        reader.read(root)
    records, report = reader.read(root, skip_unparsed=True)
    assert len(records) == len(expected.records)
    assert report.skipped[reader.UNPARSED] == [str(root / bad)]


@pytest.mark.parametrize("corpus, reader", [("tess", tess), ("cremad", cremad), ("ravdess", ravdess),
                                            ("savee", savee)])
def test_second_copy_is_ignored(built, tmp_path, corpus, reader):
    expected = built[corpus]["drop"] if corpus == "ravdess" else built[corpus]
    root = copy(expected, tmp_path)
    shutil.copytree(root, tmp_path / "second_copy")
    shutil.move(tmp_path / "second_copy", root / "zz_second_copy")
    records, report = reader.read(root)
    assert [u.utt_id for u in records] == [u.utt_id for u in expected.records]
    second = [str(p) for p in sorted((root / "zz_second_copy").rglob("*.wav")) if "__MACOSX" not in p.parts]
    assert report.ignored[reader.DUPLICATE] == second


def test_registry(built, tmp_path):
    assert CORPUS_NAMES == ("meld", "iemocap", "ravdess", "savee", "cremad", "tess")
    records, report = read_corpus("tess", built["tess"].root)
    assert records == built["tess"].records and report.corpus == "tess"
    with pytest.raises(ValueError, match="unknown corpus 'emodb'; known: meld, iemocap"):
        read_corpus("emodb", tmp_path)
    with pytest.raises(CorpusError, match="nowhere: cremad corpus folder not found"):
        load_corpus("cremad", tmp_path / "nowhere")
    with pytest.raises(CorpusError, match="no .wav files found"):
        load_corpus("tess", tmp_path)
    records, report = read_corpus("ravdess", built["ravdess"]["drop"].root)
    assert HIDDEN in report.ignored and "calm (dropped): 03-01-02-02-02-01-01, 03-01-02-02-02-02-02" in \
        report.summary()


# ------------------------------------------------------------------------------------------ manifest
def test_manifest_round_trip(built, tmp_path):
    root = copy(built["cremad"], tmp_path / "data")
    records, _ = cremad.read(root)
    records.append(Utterance("seg", records[0].path, "sad", "1001", "test", "cremad", start_s=0.1, end_s=0.3))
    outside = tmp_path / "elsewhere.wav"
    shutil.copyfile(records[0].path, outside)
    records.append(Utterance("far", str(outside), "happy", "x", "test", "cremad"))
    path = write_manifest(tmp_path / "data", records)
    assert path == tmp_path / "data/manifest.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["path"] == "CREMA-D/AudioWAV/1001_DFA_ANG_XX.wav" and lines[-1]["path"] == str(outside)
    assert read_manifest(path) == records
    shutil.move(tmp_path / "data", tmp_path / "moved")  # relative paths follow the folder
    moved = read_manifest(tmp_path / "moved")
    assert [u.path for u in moved[:-1]] == [r.path.replace("/data/", "/moved/") for r in records[:-1]]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"utt_id": "a", "path": "a.wav", "label": "sad", "speaker": "s", "split": "test"}',
     r"missing key\(s\) \['corpus'\]"),
    ('{"utt_id": "a", "path": "a.wav", "label": "calm", "speaker": "s", "split": "test", "corpus": "c"}',
     "unknown label 'calm'"),
    ('{"utt_id": "a", "path": "b.wav", "label": "sad", "speaker": "s", "split": "test", "corpus": "c"}',
     "audio file .*b.wav not found"),
    ('{"utt_id": "a", "path": "a.wav", "label": "sad", "speaker": 3, "split": "test", "corpus": "c"}',
     "speaker must be a non-empty string, got 3"),
    ('{"utt_id": "a", "path": "a.wav", "label": "sad", "speaker": "s", "split": "t", "corpus": "c", "end_s": "1"}',
     "end_s must be a non-negative number or null, got '1'"),
    ('{"utt_id": "r", "path": "a.wav", "label": "sad", "speaker": "s", "split": "t", "corpus": "c"}',
     r"duplicate utt_id 'r' \(first at line 1\)"),
])
def test_manifest_errors(tmp_path, line, message):
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    path = tmp_path / "m.jsonl"
    first = '{"utt_id": "r", "path": "a.wav", "label": "sad", "speaker": "s", "split": "t", "corpus": "c"}'
    path.write_text(first + "\n\n" + line + "\n")
    with pytest.raises(CorpusError, match=f"{path}:3: {message}"):
        read_manifest(path)
    with pytest.raises(CorpusError, match="manifest not found"):
        read_manifest(tmp_path / "none.jsonl")
