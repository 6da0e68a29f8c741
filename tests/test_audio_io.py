"""Audio decoding: formats, downmix, resampling, segments, and every bad-input error (message text asserted)."""

from __future__ import annotations

import av
import librosa
import numpy as np
import pytest
import soundfile as sf
from audio_fixtures import synth_voice, write_audio

from emorl_jax.audio.io import AudioError, load_audio, validate_waveform


def _tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def _peak_hz(wav: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(wav.size), n=8 * wav.size))
    return float(np.argmax(spectrum) * rate / (8 * wav.size))


# --- fixtures module -------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_synth_voice_and_mp4_keep_channels(tmp_path, channels):
    wav = synth_voice(0.5, 48000, channels=channels, seed=channels)
    assert wav.dtype == np.float32
    assert wav.shape == ((24000,) if channels == 1 else (24000, channels))
    assert 0.3 < np.abs(wav).max() < 0.9 and np.all(np.abs(wav).reshape(24000, -1).max(axis=0) > 0.1)
    path = write_audio(tmp_path / "clip.mp4", wav, 48000)
    with av.open(str(path)) as container:
        (stream,) = container.streams.audio
        assert (stream.codec_context.name, stream.rate, stream.channels) == ("aac", 48000, channels)


# --- decoding, downmix, resampling -----------------------------------------------------------------


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_lossless_16k_mono_roundtrip(tmp_path, ext):
    wav = synth_voice(1.0, 16000)
    out = load_audio(write_audio(tmp_path / f"a.{ext}", wav, 16000))
    assert out.dtype == np.float32 and out.shape == (16000,)
    np.testing.assert_allclose(out, wav, rtol=0, atol=1.0 / 32768)  # PCM16 quantisation


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_48k_stereo_silent_channel0_downmix_and_resample(tmp_path, ext):
    tone = _tone(1.0, 48000)
    stereo = np.stack([np.zeros_like(tone), tone], axis=1)  # MELD quirk: channel 0 silent
    out = load_audio(write_audio(tmp_path / f"b.{ext}", stereo, 48000))
    assert out.shape == (16000,)
    assert abs(_peak_hz(out, 16000) - 440.0) < 0.5
    expected = librosa.resample(tone / 2, orig_sr=48000, target_sr=16000, res_type="soxr_hq")
    np.testing.assert_allclose(out, expected, rtol=0, atol=5e-5)  # measured 1.3e-5 (PCM16)


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_mp4_aac_48k_decodes_downmixes_resamples(tmp_path, channels):
    tone = _tone(1.5, 48000)
    multi = np.zeros((tone.size, channels), np.float32)
    multi[:, channels - 1] = tone  # only the last channel carries sound (channel 0 silent when > 1)
    out = load_audio(write_audio(tmp_path / "c.mp4", multi, 48000))
    assert out.shape == (24000,)  # codec padding trimmed to the declared duration
    assert abs(_peak_hz(out, 16000) - 440.0) < 0.5
    expected = tone[::3] / channels
    core = slice(1600, -1600)  # AAC is lossy; compare away from the edges
    rms_err = np.sqrt(np.mean((out[core] - expected[core]) ** 2)) / np.sqrt(np.mean(expected[core] ** 2))
    assert rms_err < 0.02, rms_err  # measured 0.7 % (mono), 0.2 % (2 ch), 0.4 % (6 ch) at 128 kb/s per channel


def test_mp3_via_soundfile(tmp_path):
    tone = _tone(1.0, 16000)
    out = load_audio(write_audio(tmp_path / "d.mp3", tone, 16000))
    assert abs(out.size - 16000) <= 1152  # one MP3 frame of slack
    assert abs(_peak_hz(out, 16000) - 440.0) < 0.5


def test_mislabelled_container_falls_back_to_pyav(tmp_path):
    tone = _tone(1.0, 48000)
    path = write_audio(tmp_path / "e.mp4", tone, 48000).rename(tmp_path / "e.wav")
    out = load_audio(path)
    assert out.shape == (16000,) and abs(_peak_hz(out, 16000) - 440.0) < 0.5


def test_other_target_rate(tmp_path):
    out = load_audio(write_audio(tmp_path / "f.flac", _tone(1.0, 16000), 16000), sample_rate=24000)
    assert out.shape == (24000,) and abs(_peak_hz(out, 24000) - 440.0) < 0.5


# --- segments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["wav", "mp4"])
def test_segment_read(tmp_path, ext):
    voice = synth_voice(3.0, 16000, seed=5)
    path = write_audio(tmp_path / f"s.{ext}", voice, 16000)
    full = load_audio(path)
    seg = load_audio(path, start_s=0.5, end_s=1.75)
    assert seg.shape == (20000,)
    np.testing.assert_array_equal(seg, full[8000:28000])
    np.testing.assert_array_equal(load_audio(path, start_s=2.0), full[32000:])
    np.testing.assert_array_equal(load_audio(path, end_s=1.0), full[:16000])


def test_segment_at_48k_is_resampled(tmp_path):
    path = write_audio(tmp_path / "s48.wav", _tone(2.0, 48000), 48000)
    seg = load_audio(path, start_s=0.25, end_s=1.25)
    assert seg.shape == (16000,) and abs(_peak_hz(seg, 16000) - 440.0) < 0.5


# --- bad input ---------------------------------------------------------------------------------------


def _write_video_only_mp4(path):
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _truncate(path, keep_fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def _garbage(name):
    def make(d):
        (d / name).write_bytes(bytes(range(256)) * 8)
        return d / name

    return make


def _truncated(name, keep_fraction, channels=1):
    return lambda d: _truncate(write_audio(d / name, synth_voice(1.0, 48000, channels=channels), 48000), keep_fraction)


def _directory(d):
    (d / "adir.wav").mkdir()
    return d / "adir.wav"


CORRUPT = "unreadable or corrupt"
BAD_FILES = {
    "missing": (lambda d: d / "nope.wav", "file not found"),
    "directory": (_directory, "not a regular file"),
    "garbage_wav": (_garbage("g.wav"), CORRUPT),
    "garbage_mp4": (_garbage("g.mp4"), CORRUPT),
    "truncated_mp4": (_truncated("t.mp4", 0.5, channels=2), CORRUPT),
    "truncated_flac": (_truncated("t.flac", 0.5), CORRUPT),
    "truncated_wav_data": (_truncated("t.wav", 0.5), "truncated or corrupt WAV: header declares 96000 data bytes"),
    "truncated_wav_header": (_truncated("h.wav", 0.0003), CORRUPT),
    "no_audio_stream": (lambda d: _write_video_only_mp4(d / "v.mp4"), "no audio stream"),
    "empty_wav": (lambda d: write_audio(d / "e.wav", np.zeros(0, np.float32), 16000), "empty audio"),
    "silent_wav": (lambda d: write_audio(d / "z.wav", np.zeros(16000, np.float32), 16000), "silent audio"),
    "silent_mp4_6ch": (lambda d: write_audio(d / "z.mp4", np.zeros((48000, 6), np.float32), 48000), "silent audio"),
    "too_short": (
        lambda d: write_audio(d / "s.flac", synth_voice(0.05), 16000),
        "too short: 0.050 s < min_seconds=0.1",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_audio_error(tmp_path, case):
    make, problem = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message, message
    assert info.value.source == str(path)


def test_nan_and_inf_samples(tmp_path):
    wav = synth_voice(1.0).astype(np.float32)
    wav[100], wav[200] = np.nan, np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, wav, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: 2 NaN/Inf samples"):
        load_audio(path)


def test_too_long(tmp_path):
    path = write_audio(tmp_path / "long.wav", synth_voice(2.0), 16000)
    with pytest.raises(AudioError, match=r"long\.wav: too long: 2\.000 s > max_seconds=1\.5 s"):
        load_audio(path, max_seconds=1.5)
    assert load_audio(path, max_seconds=2.0).shape == (32000,)


@pytest.mark.parametrize(
    "start_s,end_s,problem",
    [
        (2.5, None, "outside the file (2.000 s long)"),
        (1.0, 2.5, "outside the file (2.000 s long)"),
        (-0.5, 1.0, "invalid segment"),
        (1.0, 1.0, "invalid segment"),
        (1.5, 0.5, "invalid segment"),
    ],
)
def test_segment_outside_file(tmp_path, start_s, end_s, problem):
    path = write_audio(tmp_path / "seg.flac", synth_voice(2.0), 16000)
    with pytest.raises(AudioError) as info:
        load_audio(path, start_s=start_s, end_s=end_s)
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)


def test_segment_too_short_names_min_seconds(tmp_path):
    path = write_audio(tmp_path / "seg.wav", synth_voice(2.0), 16000)
    with pytest.raises(AudioError, match="too short: 0.050 s"):
        load_audio(path, start_s=1.0, end_s=1.05)


@pytest.mark.parametrize(
    "waveform,problem",
    [
        (np.ones((10, 2), np.float32), "expected a mono waveform [samples], got shape (10, 2)"),
        (np.ones(3200, np.int16), "expected floating-point samples"),
        (np.zeros(0, np.float32), "empty audio"),
        (np.array([0.5, np.nan] * 1600, np.float32), "1600 NaN/Inf samples"),
        (np.full(3200, 5e-5, np.float32), "silent audio"),
        (np.ones(800, np.float32), "too short: 0.050 s"),
    ],
)
def test_validate_waveform_in_memory(waveform, problem):
    with pytest.raises(AudioError) as info:
        validate_waveform(waveform, 16000, source="utt42")
    assert str(info.value) == f"utt42: {info.value.problem}" and problem in str(info.value)


def test_validate_waveform_passes_good_audio():
    wav = synth_voice(1.0).astype(np.float64)
    out = validate_waveform(wav, 16000, source="mem", max_seconds=1.0)
    assert out.dtype == np.float32 and out.shape == (16000,)
