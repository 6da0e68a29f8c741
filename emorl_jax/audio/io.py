"""Decode audio files to validated 16 kHz mono float32 waveforms.

wav/flac/mp3/ogg are read with soundfile; mp4/m4a and any other container (and whatever soundfile
refuses) with PyAV, which bundles its own FFmpeg (no system ffmpeg needed). All channels are averaged
(MELD clips can have a silent channel 0), then the waveform is checked and resampled with librosa.
Every failure raises `AudioError` whose message starts with the file name and states the problem.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import av
import librosa
import numpy as np
import soundfile as sf

from emorl_jax.errors import UserError

SOUNDFILE_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg"})
# Segment ends may overrun the decoded length by this much (timestamp rounding, codec padding).
SEGMENT_END_TOLERANCE_S = 0.05
# Peak |amplitude| at or below this (-80 dBFS, a few 16-bit LSBs) counts as silence.
SILENCE_PEAK = 1e-4
RESAMPLE_TYPE = "soxr_hq"


class AudioError(UserError, ValueError):
    """A file (or in-memory waveform) that cannot be used as audio; message is '<source>: <problem>'."""

    def __init__(self, source: str | os.PathLike, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")

    def __reduce__(self):  # rebuilt from (source, problem) when a grain worker process sends it back
        return type(self), (self.source, self.problem)


def load_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = 16000,
    start_s: float | None = None,
    end_s: float | None = None,
    min_seconds: float = 0.1,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode `path` (optionally the segment [start_s, end_s) in seconds) to mono float32 [samples].

    Channels are averaged; the result is resampled to `sample_rate` Hz (librosa, soxr high quality).
    `min_seconds`/`max_seconds` bound the segment's duration. Raises AudioError for a missing file, an
    unreadable or corrupt file, no audio stream, a segment outside the file, and every check of
    `validate_waveform` (empty, NaN/Inf, silent, too short, too long).
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "file not found")
    if not path.is_file():
        raise AudioError(path, "not a regular file")
    channels, native_rate = _decode(path)
    channels = _segment(channels, native_rate, start_s, end_s, source=path)
    mono = channels.mean(axis=0, dtype=np.float64).astype(np.float32)
    mono = validate_waveform(mono, native_rate, source=str(path), min_seconds=min_seconds, max_seconds=max_seconds)
    if native_rate != sample_rate:
        mono = librosa.resample(mono, orig_sr=native_rate, target_sr=sample_rate, res_type=RESAMPLE_TYPE)
    return np.ascontiguousarray(mono, dtype=np.float32)


def validate_waveform(
    waveform: np.ndarray,
    sample_rate: int,
    *,
    source: str,
    min_seconds: float = 0.1,
    max_seconds: float | None = None,
    silence_peak: float = SILENCE_PEAK,
) -> np.ndarray:
    """Check a mono waveform [samples] at `sample_rate` Hz; return it as float32.

    Raises AudioError('<source>: <problem>') if it is not 1-D, empty, has NaN/Inf samples, is silent
    (peak |x| <= silence_peak), or lasts less than `min_seconds` / more than `max_seconds` (if set).
    """
    wav = np.asarray(waveform)
    if wav.ndim != 1:
        raise AudioError(source, f"expected a mono waveform [samples], got shape {wav.shape}")
    if not np.issubdtype(wav.dtype, np.floating):
        raise AudioError(source, f"expected floating-point samples, got dtype {wav.dtype}")
    if sample_rate <= 0:
        raise AudioError(source, f"invalid sample rate {sample_rate}")
    if wav.size == 0:
        raise AudioError(source, "empty audio (no samples)")
    if not np.all(np.isfinite(wav)):
        bad = int(np.count_nonzero(~np.isfinite(wav)))
        raise AudioError(source, f"{bad} NaN/Inf samples")
    peak = float(np.max(np.abs(wav)))
    if peak <= silence_peak:
        raise AudioError(source, f"silent audio (peak amplitude {peak:.3g} <= {silence_peak:g})")
    seconds = wav.size / sample_rate
    if seconds < min_seconds:
        raise AudioError(source, f"too short: {seconds:.3f} s < min_seconds={min_seconds} s")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(source, f"too long: {seconds:.3f} s > max_seconds={max_seconds} s")
    return wav.astype(np.float32, copy=False)


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """Whole file as float32 [channels, samples] and its sample rate."""
    if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
        try:
            data, rate = sf.read(path, dtype="float32", always_2d=True)
        except sf.SoundFileError:
            pass  # e.g. a mislabelled container: let FFmpeg try
        else:
            _check_wav_length(path)
            return np.ascontiguousarray(data.T), int(rate)
    return _decode_pyav(path)


def _decode_pyav(path: Path) -> tuple[np.ndarray, int]:
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioError(path, "no audio stream in the container")
            stream = container.streams.audio[0]
            # Planar float keeps rate and layout: each frame becomes [channels, samples].
            resampler = av.AudioResampler(format="fltp")
            chunks = [out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray() for out in resampler.resample(None)]
            rate = stream.rate
            declared = (
                round(float(stream.duration * stream.time_base) * rate)
                if stream.duration is not None and stream.time_base is not None
                else None
            )
    except (av.FFmpegError, OSError) as exc:
        raise AudioError(path, f"unreadable or corrupt audio file ({exc})") from exc
    if not chunks:
        raise AudioError(path, "empty audio (the audio stream has no samples)")
    data = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    if declared and data.shape[1] > declared:
        data = data[:, :declared]  # drop the codec's padding of the last frame (AAC: 1024-sample frames)
    return data, int(rate)


def _check_wav_length(path: Path) -> None:
    """Raise AudioError if a RIFF/WAVE file's data chunk is shorter than its header declares.

    libsndfile silently returns the available part of a truncated WAV; this catches it.
    """
    if path.suffix.lower() != ".wav":
        return
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(12)[:4] != b"RIFF":
            return  # RF64/other variants: trust the decoder
        while True:
            header = f.read(8)
            if len(header) < 8:
                return
            chunk_id, chunk_size = struct.unpack("<4sI", header)
            if chunk_id == b"data":
                available = size - f.tell()
                if chunk_size not in (0, 0xFFFFFFFF) and chunk_size > available:
                    raise AudioError(
                        path,
                        f"truncated or corrupt WAV: header declares {chunk_size} data bytes, file holds {available}",
                    )
                return
            f.seek(chunk_size + (chunk_size & 1), os.SEEK_CUR)


def _segment(
    channels: np.ndarray, rate: int, start_s: float | None, end_s: float | None, *, source: Path
) -> np.ndarray:
    """Slice [channels, samples] to [start_s, end_s) seconds; None means the file's start/end."""
    if start_s is None and end_s is None:
        return channels
    duration = channels.shape[1] / rate
    start = 0.0 if start_s is None else float(start_s)
    end = duration if end_s is None else float(end_s)
    if not (np.isfinite(start) and np.isfinite(end)) or start < 0 or (end_s is not None and end <= start):
        raise AudioError(source, f"invalid segment [{start_s}, {end_s}) s")
    if start >= duration or end > duration + SEGMENT_END_TOLERANCE_S:
        raise AudioError(source, f"segment [{start:.3f}, {end:.3f}) s outside the file ({duration:.3f} s long)")
    return channels[:, int(round(start * rate)) : min(int(round(end * rate)), channels.shape[1])]
