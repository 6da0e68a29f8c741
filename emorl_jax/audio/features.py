"""Whisper-compatible log-mel features in numpy (the input of Qwen2-Audio's audio encoder).

Matches transformers' `WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000,
hop_length=160, chunk_length=chunk_seconds, n_fft=400)` called with `padding="max_length",
return_attention_mask=True`: each waveform is zero-padded or TRUNCATED to the window
(`chunk_seconds` of audio; samples beyond it are dropped, as Whisper does), then a periodic-Hann,
reflect-centred STFT (n_fft 400 = 25 ms, hop 160 = 10 ms), power spectrum, Slaney mel filters
(0–8 kHz), last frame dropped, log10(max(x, 1e-10)), floor at (per-waveform max − 8), (x + 4) / 4.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
F_MAX = 8000.0


def log_mel(
    waveform: np.ndarray,
    *,
    n_mels: int = 128,
    chunk_seconds: float = 30.0,
    sample_rate: int = SAMPLE_RATE,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel of one mono waveform [samples] at 16 kHz.

    Returns (features float32 [n_mels, frames], mask int32 [frames]) with frames = chunk_seconds·100
    (3000 for 30 s). mask[t] = 1 where frame t starts inside the (untruncated part of the) waveform,
    i.e. the first ceil(min(samples, window) / 160) frames. Longer waveforms are truncated to the window.
    """
    features, mask = log_mel_batch([waveform], n_mels=n_mels, chunk_seconds=chunk_seconds, sample_rate=sample_rate)
    return features[0], mask[0]


def log_mel_batch(
    waveforms: Sequence[np.ndarray],
    *,
    n_mels: int = 128,
    chunk_seconds: float = 30.0,
    sample_rate: int = SAMPLE_RATE,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel of B mono waveforms (each [samples_b] at 16 kHz, any lengths).

    Returns (features float32 [B, n_mels, frames], mask int32 [B, frames]); see `log_mel`. The
    max − 8 floor is per waveform, as in the reference.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"log_mel: features are defined for {SAMPLE_RATE} Hz audio, got sample_rate={sample_rate}")
    window_samples = chunk_seconds * sample_rate
    if chunk_seconds <= 0 or window_samples != int(window_samples):
        raise ValueError(f"log_mel: chunk_seconds={chunk_seconds} must be positive and a whole number of samples")
    window_samples = int(window_samples)
    if len(waveforms) == 0:
        raise ValueError("log_mel: empty batch")

    batch = np.zeros((len(waveforms), window_samples), dtype=np.float64)
    lengths = np.empty(len(waveforms), dtype=np.int64)
    for b, wav in enumerate(waveforms):
        wav = np.asarray(wav)
        if wav.ndim != 1 or wav.size == 0:
            raise ValueError(f"log_mel: waveform {b} must be a non-empty mono [samples] array, got shape {wav.shape}")
        if not np.all(np.isfinite(wav)):
            raise ValueError(f"log_mel: waveform {b} has NaN/Inf samples")
        lengths[b] = min(wav.size, window_samples)
        # The reference casts to float32 before the STFT; do the same so results agree bit-for-bit in the input.
        batch[b, : lengths[b]] = wav[: lengths[b]].astype(np.float32)

    half = N_FFT // 2
    padded = np.pad(batch, ((0, 0), (half, half)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=1)[:, ::HOP_LENGTH]  # [B, T+1, n_fft]
    frames = frames[:, :-1]  # the reference drops the last STFT frame
    power = np.abs(np.fft.rfft(frames * _hann(), axis=-1)) ** 2  # [B, T, 1 + n_fft/2]
    mel = np.einsum("mf,btf->bmt", _mel_filters(n_mels), power)  # [B, n_mels, T]
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
    features = ((log_spec + 4.0) / 4.0).astype(np.float32)

    num_frames = features.shape[-1]
    valid = -(-lengths // HOP_LENGTH)  # ceil(len / hop): frames whose start sample is real audio
    mask = (np.arange(num_frames)[None, :] < valid[:, None]).astype(np.int32)
    return features, mask


def num_audio_embeddings(num_frames: int) -> int:
    """Audio embeddings Qwen2-Audio's encoder yields for `num_frames` valid mel frames.

    conv2 (stride 2) then avg-pool (stride 2): 3000 frames → 1500 → 750. Same formula as
    transformers' `Qwen2AudioEncoder._get_feat_extract_output_lengths` / Qwen2AudioProcessor.
    """
    if num_frames < 1:
        raise ValueError(f"num_audio_embeddings: num_frames must be >= 1, got {num_frames}")
    length = (num_frames - 1) // 2 + 1
    return (length - 2) // 2 + 1


def frames_needed(max_valid_frames: int, window: int) -> int:
    """The mel frames an encoder input must keep (of a `window`-frame window) for clips of up to
    `max_valid_frames` valid frames to give the full window's outputs: the encoder's conv1 and stride-2 conv2
    read up to 2 frames past a clip's last valid frame."""
    return min(window, max_valid_frames + 2)


def max_frames_for(num_embeddings: int) -> int:
    """The most valid mel frames a clip can have and still yield at most `num_embeddings` audio embeddings."""
    return 4 * num_embeddings + 2


@functools.cache
def _hann() -> np.ndarray:
    """Periodic Hann window [n_fft] (torch.hann_window's default)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)


@functools.cache
def _mel_filters(n_mels: int) -> np.ndarray:
    """Slaney-scale, Slaney-normalised mel filters [n_mels, 1 + n_fft/2] over 0–8 kHz (float64)."""
    import librosa  # here, not at the top: the model imports this module's frame arithmetic, not librosa

    return librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels, fmin=0.0, fmax=F_MAX, htk=False, norm="slaney", dtype=np.float64
    )
