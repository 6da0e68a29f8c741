"""The synthetic emotional-speech corpus: determinism, valid audio, manifest, descriptions, learnability."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import scipy.signal
import soundfile as sf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from emorl_jax.data.corpora import synthetic
from emorl_jax.data.corpora.base import CorpusError

LABELS = list(synthetic.LABELS)
NEIGHBOURS = [("fear", "surprise"), ("surprise", "sad"), ("sad", "disgust"), ("disgust", "angry")]
NON_NEIGHBOURS = [p for p in itertools.combinations(LABELS, 2) if p not in NEIGHBOURS and p[::-1] not in NEIGHBOURS]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, synthetic.generate(out, n_per_class=60, seed=0)


def test_neighbours_are_the_closest_class_pairs():
    """In SPREAD units the four Plutchik neighbour pairs are the nearest, others >= 1.25x farther."""
    means = {c: (np.array(m) - synthetic.CLASS_MEANS["neutral"]) / synthetic.SPREAD
             for c, m in synthetic.CLASS_MEANS.items()}
    no_voice_quality = [i for i, p in enumerate(synthetic.PARAMS) if p not in ("jitter_pct", "shimmer_pct")]
    for dims in (slice(None), no_voice_quality):
        dist = {p: np.linalg.norm(means[p[0]][dims] - means[p[1]][dims]) for p in itertools.combinations(LABELS, 2)}
        near = max(dist[p] if p in dist else dist[p[::-1]] for p in NEIGHBOURS)
        far = min(dist[p] for p in NON_NEIGHBOURS)
        assert far > 1.25 * near, (far, near)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kwargs = dict(n_per_class=10, speakers=10)
    a = synthetic.generate(tmp_path / "a", seed=3, **kwargs)
    b = synthetic.generate(tmp_path / "b", seed=3, **kwargs)
    c = synthetic.generate(tmp_path / "c", seed=4, **kwargs)
    assert [u.utt_id for u in a] == [u.utt_id for u in b]
    for u, v in zip(a, b):
        assert Path(u.path).read_bytes() == Path(v.path).read_bytes()
    assert (tmp_path / "a/manifest.jsonl").read_bytes() == (tmp_path / "b/manifest.jsonl").read_bytes()
    differing = sum(not np.array_equal(sf.read(u.path)[0], sf.read(w.path)[0]) for u, w in zip(a, c)
                    if u.utt_id == w.utt_id)
    assert differing == sum(u.utt_id == w.utt_id for u, w in zip(a, c)) > 0


def test_clips_are_valid_audio(corpus):
    out, utts = corpus
    assert len(utts) == 7 * 60
    for u in utts:
        info = sf.info(u.path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        x, _ = sf.read(u.path, dtype="float64")
        assert np.all(np.isfinite(x)) and np.max(np.abs(x)) <= 1.0
        assert np.sqrt(np.mean(x**2)) > 1e-3, u.path
        assert 1.0 - 1 / 16000 <= len(x) / 16000 <= 2.5 + 1 / 16000


def test_manifest_splits_and_balance(corpus, tmp_path):
    out, utts = corpus
    assert synthetic.read(out) == utts
    counts = {(u.split, u.label): 0 for u in utts}
    for u in utts:
        counts[(u.split, u.label)] += 1
        assert Path(u.path) == out / u.split / f"{u.utt_id}.wav" and u.corpus == "synthetic"
    # 10 speakers -> 7/1/2 held-out speakers; each says 6 clips per class.
    assert counts == {(s, c): n for s, n in (("train", 42), ("dev", 6), ("test", 12)) for c in LABELS}
    by_split = {s: {u.speaker for u in utts if u.split == s} for s in ("train", "dev", "test")}
    assert [len(v) for v in by_split.values()] == [7, 1, 2] and len(set.union(*by_split.values())) == 10
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert records[0]["path"] == f"{utts[0].split}/{utts[0].utt_id}.wav"
    assert records[0]["start_s"] is None and set(records[0]["params"]) >= set(synthetic.PARAMS)

    by_utt = synthetic.generate(tmp_path, n_per_class=20, speakers=4, split_by="utterance")
    per_class = {(u.split, u.label): 0 for u in by_utt}
    for u in by_utt:
        per_class[(u.split, u.label)] += 1
    assert per_class == {(s, c): n for s, n in (("train", 14), ("dev", 2), ("test", 4)) for c in LABELS}


def test_meld_priors_keep_split_sizes_and_speakers(tmp_path):
    """MELD-like corpus: each split keeps its balanced clip count, divided by MELD's priors for that split."""
    utts = synthetic.generate(tmp_path, n_per_class=20, speakers=10, class_priors=synthetic.MELD_PRIORS,
                              max_seconds=1.0)
    balanced = {"train": 7 * 14, "dev": 7 * 2, "test": 7 * 4}  # 10 speakers -> 7/1/2, each 2 clips per class
    for split, total in balanced.items():
        priors = np.asarray(synthetic.MELD_PRIORS[split], dtype=np.float64)
        counts = [sum(u.split == split and u.label == c for u in utts) for c in LABELS]
        assert counts == list(np.maximum(1, np.round(total * priors / priors.sum())).astype(int)), split
    # train: neutral 46 of 98 (MELD 4710 of 9989), fear 3 (268); test: neutral 13 of 28, fear 1 (50 of 2610)
    train = [sum(u.split == "train" and u.label == c for u in utts) for c in LABELS]
    assert train == [46, 17, 7, 11, 12, 3, 3]
    held_out = {u.speaker for u in utts if u.split == "test"}
    assert held_out.isdisjoint(u.speaker for u in utts if u.split == "train")
    assert len({u.utt_id for u in utts}) == len(utts) and synthetic.read(tmp_path) == utts
    with pytest.raises(ValueError, match="must name exactly the splits"):
        synthetic.generate(tmp_path / "bad", n_per_class=20, speakers=10, class_priors={"train": (1,) * 7})


def test_descriptions_come_from_parameters(corpus):
    out, utts = corpus
    words = synthetic.descriptions(out)
    records = {r["utt_id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    for u in utts:
        params = records[u.utt_id]["params"]
        assert words[u.utt_id] == synthetic.describe({k: params[k] for k in synthetic.PARAMS}, params["snr_db"])
    neutral = [words[u.utt_id]["pitch"] for u in utts if u.label == "neutral"]
    assert len(set(neutral)) > 2  # words follow each clip's draw, not its label
    base = dict(zip(synthetic.PARAMS, synthetic.CLASS_MEANS["neutral"]))
    loud_high = synthetic.describe({**base, "pitch_st": 3.0, "pitch_slope_st": 2.0, "energy_db": 5.0,
                                    "rate_syl_s": 6.0, "tilt_db_oct": -5.0, "jitter_pct": 2.0}, 12.0)
    assert loud_high == {"pitch": "high, rising", "pitch_range": "narrow", "energy": "loud", "emphasis": "moderate",
                         "rate": "fast", "pauses": "some", "voice": "tense", "steadiness": "shaky",
                         "background": "noisy"}
    assert synthetic.describe(base, 25.0)["pitch"] == "mid, level"


def test_pitch_and_level_match_their_parameters():
    """librosa.yin recovers the synthesised f0 (flat contour) to 1 %; energy_db scales the RMS exactly."""
    speaker = synthetic.Speaker("X", f0_hz=150.0, formant_scale=1.0, rate_scale=1.0, gain_db=0.0)
    flat = {**dict(zip(synthetic.PARAMS, synthetic.CLASS_MEANS["neutral"])), "pitch_st": 4.0,
            "pitch_range_st": 0.0, "pitch_slope_st": 0.0, "jitter_pct": 0.0, "shimmer_pct": 0.0, "pause_frac": 0.0}
    x = synthetic.synthesize(flat, speaker, 1.5, 60.0, np.random.default_rng(0))
    assert x.dtype == np.float32 and x.shape == (24000,)
    rms = librosa.feature.rms(y=x, frame_length=1024, hop_length=256)[0]
    f0 = librosa.yin(x, fmin=60, fmax=500, sr=16000, frame_length=1024, hop_length=256)
    voiced = rms[: len(f0)] > 0.5 * rms.max()
    assert np.median(f0[voiced]) == pytest.approx(150.0 * 2 ** (4 / 12), rel=0.01)
    louder = synthetic.synthesize({**flat, "energy_db": 6.0}, speaker, 1.5, 60.0, np.random.default_rng(0))
    assert np.sqrt(np.mean(louder.astype(np.float64) ** 2) / np.mean(x.astype(np.float64) ** 2)) == pytest.approx(
        10 ** (6 / 20), rel=1e-5)


def test_noise_is_pink_at_the_requested_snr():
    """Same draws at SNR 10 and 80 dB differ by the noise alone: RMS from the SNR, Welch slope -3 dB/octave."""
    speaker = synthetic.Speaker("X", f0_hz=150.0, formant_scale=1.0, rate_scale=1.0, gain_db=0.0)
    neutral = dict(zip(synthetic.PARAMS, synthetic.CLASS_MEANS["neutral"]))
    noisy, clean = (synthetic.synthesize(neutral, speaker, 2.0, snr, np.random.default_rng(1)).astype(np.float64)
                    for snr in (10.0, 80.0))
    noise = noisy - clean
    speech_rms = 10 ** (-30 / 20)  # a neutral clip's level over its syllables, gain 0 dB
    assert np.sqrt(np.mean(noise**2)) == pytest.approx(speech_rms * (10 ** (-10 / 20) - 10 ** (-80 / 20)), rel=1e-5)
    freqs, power = scipy.signal.welch(noise, fs=16000, nperseg=2048)
    band = (freqs >= 200) & (freqs <= 6000)
    slope = np.polyfit(np.log2(freqs[band]), 10 * np.log10(power[band]), 1)[0]
    assert slope == pytest.approx(-3.0, abs=0.25)


def _features(path: str) -> list[float]:
    """Prosodic statistics of one clip: log-f0 level/spread/range/slope, level, pauses, ZCR, centroid, length."""
    y, sr = sf.read(path, dtype="float32")
    hop = 256
    db = 20 * np.log10(librosa.feature.rms(y=y, frame_length=512, hop_length=hop)[0] + 1e-8)
    f0 = np.log2(librosa.yin(y, fmin=60, fmax=500, sr=sr, frame_length=1024, hop_length=hop))
    m = min(len(f0), len(db))
    active = db[:m] > db.max() - 20
    pitch, times = f0[:m][active], np.arange(m)[active] * hop / sr
    zcr = librosa.feature.zero_crossing_rate(y, frame_length=512, hop_length=hop)[0][:m][active]
    centroid = librosa.feature.spectral_centroid(y=y, sr=sr, n_fft=512, hop_length=hop)[0][:m][active]
    return [np.median(pitch), np.std(pitch), np.percentile(pitch, 90) - np.percentile(pitch, 10),
            np.polyfit(times, pitch, 1)[0] * len(y) / sr, db[:m][active].mean(), db[:m][active].std(), db.max(),
            active.mean(), zcr.mean(), np.log(centroid.mean()), len(y) / sr]


def test_classes_are_learnable_but_ambiguous_along_plutchik_neighbours(corpus):
    """Logistic regression on speaker-normalised prosodic features: train split -> held-out speakers.

    Measured (seed 0): balanced accuracy 0.73 (chance 1/7); mean symmetric confusion 0.29 over the
    neighbour pairs vs 0.04 over the others (seeds 0-4: 0.51-0.73, and 0.25-0.42 vs 0.04-0.12).
    """
    _, utts = corpus
    x = np.array([_features(u.path) for u in utts])
    speakers = np.array([u.speaker for u in utts])
    for s in set(speakers):  # per-speaker z-scoring, the usual SER normalisation
        x[speakers == s] = (x[speakers == s] - x[speakers == s].mean(0)) / x[speakers == s].std(0)
    y = np.array([u.label for u in utts])
    split = np.array([u.split for u in utts])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    pred = model.fit(x[split == "train"], y[split == "train"]).predict(x[split == "test"])
    accuracy = balanced_accuracy_score(y[split == "test"], pred)
    assert 0.4 < accuracy < 0.9, accuracy
    rates = confusion_matrix(y[split == "test"], pred, labels=LABELS, normalize="true")
    mixed = rates + rates.T

    def pair(a, b):
        return mixed[LABELS.index(a), LABELS.index(b)]

    near = [pair(*p) for p in NEIGHBOURS]
    far = [pair(*p) for p in NON_NEIGHBOURS]
    assert np.mean(near) > 2 * np.mean(far), (near, np.mean(far))
    assert min(near) > pair("happy", "sad"), (near, pair("happy", "sad"))


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="splits \\['dev'\\] would be empty with 4 speakers"):
        synthetic.generate(tmp_path, n_per_class=4, speakers=4)
    with pytest.raises(ValueError, match="fractions must be positive and sum to 1"):
        synthetic.generate(tmp_path, splits=(("train", 0.5), ("test", 0.4)))
    with pytest.raises(ValueError, match="min_seconds <= max_seconds"):
        synthetic.generate(tmp_path, min_seconds=3.0, max_seconds=2.0)
    with pytest.raises(ValueError, match="split_by must be"):
        synthetic.generate(tmp_path, split_by="session")
    with pytest.raises(ValueError, match="unknown label 'joy'"):
        synthetic.sample_prosody("joy", np.random.default_rng(0))


def test_read_rejects_broken_manifests(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    with pytest.raises(CorpusError, match=f"{manifest}: manifest not found"):
        synthetic.read(tmp_path)
    synthetic.generate(tmp_path, n_per_class=1, speakers=1, splits=(("train", 1.0),))
    lines = manifest.read_text().splitlines()
    manifest.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(CorpusError, match=f"{manifest}:2: not valid JSON"):
        synthetic.read(tmp_path)
    manifest.write_text(lines[0].replace('"label": "neutral"', '"label": "calm"') + "\n")
    with pytest.raises(CorpusError, match=f"{manifest}:1: unknown label 'calm'"):
        synthetic.descriptions(tmp_path)
    (tmp_path / json.loads(lines[1])["path"]).unlink()
    manifest.write_text(lines[1] + "\n")
    with pytest.raises(CorpusError, match=f"{manifest}:1: audio file .* not found"):
        synthetic.read(tmp_path)
