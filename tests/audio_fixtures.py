"""Synthesized audio for miniature corpora: a voiced tone generator and a writer by file extension.

Import from tests with `from audio_fixtures import synth_voice, write_audio` (pytest puts tests/ on
sys.path). Audio only, no downloads.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import soundfile as sf

_AV_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 8: "7.1"}


def synth_voice(
    seconds: float,
    sample_rate: int = 16000,
    f0: float = 150.0,
    seed: int = 0,
    channels: int = 1,
) -> np.ndarray:
    """A harmonic voiced tone with vibrato, a syllable-rate envelope and a little noise; never silent.

    Returns float32 [samples] when channels == 1, else [samples, channels] (each channel a slightly
    different gain of the same voice plus independent noise). Peak amplitude is below 0.9.
    """
    if seconds <= 0 or sample_rate <= 0 or channels < 1:
        raise ValueError(f"synth_voice: bad arguments seconds={seconds} sample_rate={sample_rate} channels={channels}")
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * sample_rate)))
    t = np.arange(n) / sample_rate
    # Pitch with 5 Hz vibrato (±3 %), integrated to a phase.
    f_inst = f0 * (1.0 + 0.03 * np.sin(2 * np.pi * 5.0 * t))
    phase = 2 * np.pi * np.cumsum(f_inst) / sample_rate
    nyquist = sample_rate / 2
    voice = np.zeros(n)
    for k in range(1, 16):
        if k * f0 * 1.03 >= nyquist:
            break
        voice += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k
    # Syllable-like amplitude envelope (4 Hz), floored so the signal never goes silent.
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi)) ** 2
    voice *= envelope / np.max(np.abs(voice) + 1e-12)
    out = np.empty((n, channels))
    for c in range(channels):
        gain = 0.6 if channels == 1 else 0.45 + 0.15 * c / channels
        out[:, c] = gain * voice + 0.01 * rng.standard_normal(n)
    out = out.astype(np.float32)
    return out[:, 0] if channels == 1 else out


def write_audio(path: str | Path, waveform: np.ndarray, sample_rate: int) -> Path:
    """Write float waveform [samples] or [samples, channels] (values in [-1, 1]) by extension.

    .wav (PCM16), .flac (PCM16) and .mp3 via soundfile; .mp4/.m4a as an AAC track in an MP4 container
    via PyAV, keeping the channel count (1, 2 or 6 channels as in MELD). Creates parent folders.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = np.asarray(waveform, dtype=np.float32)
    if wav.ndim == 1:
        wav = wav[:, None]
    if wav.ndim != 2:
        raise ValueError(f"write_audio {path}: waveform must be [samples] or [samples, channels], got {wav.shape}")
    ext = path.suffix.lower()
    if ext in (".wav", ".flac"):
        sf.write(path, wav, sample_rate, subtype="PCM_16")
    elif ext == ".mp3":
        sf.write(path, wav, sample_rate, format="MP3")
    elif ext in (".mp4", ".m4a"):
        _write_aac_mp4(path, wav, sample_rate)
    else:
        raise ValueError(f"write_audio {path}: unsupported extension {ext!r}")
    return path


def _write_aac_mp4(path: Path, wav: np.ndarray, sample_rate: int) -> None:
    """Encode [samples, channels] float32 as AAC (planar float) in an MP4 container."""
    channels = wav.shape[1]
    if wav.shape[0] == 0:
        raise ValueError(f"write_audio {path}: PyAV writes no file for an empty AAC track")
    if channels not in _AV_LAYOUTS:
        raise ValueError(f"write_audio {path}: no channel layout for {channels} channels")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate, layout=_AV_LAYOUTS[channels])
        stream.bit_rate = 128000 * channels  # the native AAC encoder distorts mono at 64 kb/s
        frame_size = 1024
        planar = np.ascontiguousarray(wav.T)
        for start in range(0, planar.shape[1], frame_size):
            chunk = np.ascontiguousarray(planar[:, start : start + frame_size])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=_AV_LAYOUTS[channels])
            frame.sample_rate = sample_rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
