"""Log-mel features against transformers' WhisperFeatureExtractor (the oracle) and Qwen2-Audio lengths."""

from __future__ import annotations

import numpy as np
import pytest
from audio_fixtures import synth_voice

from emorl_jax.audio.features import log_mel, log_mel_batch, num_audio_embeddings

SR = 16000
FEATURE_ATOL = 1e-4  # measured max |ours - theirs| ≈ 2.4e-5 (their torch STFT runs in float32)


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    return {
        "tone": (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32),
        "noise": (0.1 * rng.standard_normal(5 * SR)).astype(np.float32),
        "voice": synth_voice(3.3, SR, f0=180.0, seed=1),
        "short_unaligned": synth_voice(1.2, SR, seed=2)[: SR + 161],  # not a multiple of the hop
        "longer_than_30s": synth_voice(31.0, SR, seed=3),
        "quiet_float64": 1e-3 * synth_voice(2.0, SR, seed=4).astype(np.float64),
    }


SIGNALS = _signals()


@pytest.fixture(scope="module")
def whisper():
    transformers = pytest.importorskip("transformers")
    cache = {}

    def extract(waveforms, n_mels, chunk_seconds):
        key = (n_mels, chunk_seconds)
        if key not in cache:
            cache[key] = transformers.WhisperFeatureExtractor(
                feature_size=n_mels, sampling_rate=SR, hop_length=160, chunk_length=chunk_seconds, n_fft=400
            )
        out = cache[key](
            waveforms, sampling_rate=SR, padding="max_length", return_attention_mask=True, return_tensors="np"
        )
        return out["input_features"], out["attention_mask"]

    return extract


@pytest.mark.parametrize("n_mels,chunk_seconds", [(128, 30), (80, 4)])
@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_matches_whisper_feature_extractor(whisper, name, n_mels, chunk_seconds):
    wav = SIGNALS[name]
    ref_feat, ref_mask = whisper(wav, n_mels, chunk_seconds)
    feat, mask = log_mel(wav, n_mels=n_mels, chunk_seconds=float(chunk_seconds))
    frames = chunk_seconds * 100
    assert feat.shape == (n_mels, frames) and feat.dtype == np.float32
    assert mask.shape == (frames,) and mask.dtype == np.int32
    np.testing.assert_allclose(feat, ref_feat[0], rtol=0, atol=FEATURE_ATOL)
    np.testing.assert_array_equal(mask, ref_mask[0])
    expected_valid = min(frames, -(-wav.size // 160))
    assert mask.sum() == expected_valid


def test_batch_matches_batched_whisper_and_single(whisper):
    waves = [SIGNALS["voice"], SIGNALS["short_unaligned"], SIGNALS["noise"]]
    ref_feat, ref_mask = whisper(waves, 80, 4)
    feat, mask = log_mel_batch(waves, n_mels=80, chunk_seconds=4.0)
    assert feat.shape == (3, 80, 400) and mask.shape == (3, 400)
    np.testing.assert_allclose(feat, ref_feat, rtol=0, atol=FEATURE_ATOL)
    np.testing.assert_array_equal(mask, ref_mask)
    for b, wav in enumerate(waves):
        single_feat, single_mask = log_mel(wav, n_mels=80, chunk_seconds=4.0)
        np.testing.assert_array_equal(feat[b], single_feat)  # the max − 8 floor is per waveform
        np.testing.assert_array_equal(mask[b], single_mask)


def test_mel_filters_equal_transformers():
    audio_utils = pytest.importorskip("transformers.audio_utils")
    from emorl_jax.audio.features import _mel_filters

    for n_mels in (80, 128):
        theirs = audio_utils.mel_filter_bank(
            num_frequency_bins=201,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=8000.0,
            sampling_rate=SR,
            norm="slaney",
            mel_scale="slaney",
        )
        np.testing.assert_allclose(_mel_filters(n_mels), theirs.T, rtol=0, atol=1e-12)


def test_longer_waveform_is_truncated_to_the_window():
    wav = SIGNALS["voice"]
    long_feat, long_mask = log_mel(np.concatenate([wav, wav]), n_mels=80, chunk_seconds=3.0)
    cut_feat, cut_mask = log_mel(np.concatenate([wav, wav])[: 3 * SR], n_mels=80, chunk_seconds=3.0)
    np.testing.assert_array_equal(long_feat, cut_feat)
    np.testing.assert_array_equal(long_mask, cut_mask)
    assert long_mask.all() and long_feat.shape == (80, 300)


def test_num_audio_embeddings_matches_qwen2_audio():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.qwen2_audio.modeling_qwen2_audio")
    lengths = torch.arange(1, 3001)
    _, theirs = modeling.Qwen2AudioEncoder._get_feat_extract_output_lengths(None, lengths)
    ours = [num_audio_embeddings(n) for n in range(1, 3001)]
    assert ours == theirs.tolist()
    assert num_audio_embeddings(3000) == 750 and num_audio_embeddings(400) == 100


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: log_mel(np.zeros((2, 100), np.float32)), "non-empty mono"),
        (lambda: log_mel(np.zeros(0, np.float32)), "non-empty mono"),
        (lambda: log_mel(np.array([0.1, np.nan], np.float32)), "NaN/Inf"),
        (lambda: log_mel(np.ones(100, np.float32), sample_rate=8000), "16000 Hz"),
        (lambda: log_mel(np.ones(100, np.float32), chunk_seconds=0.0), "chunk_seconds"),
        (lambda: log_mel_batch([]), "empty batch"),
        (lambda: num_audio_embeddings(0), "num_frames"),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
