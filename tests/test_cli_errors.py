"""User errors reach the user as one line, `error: <what>: <problem>`, with exit status 2; `--verbose` (or
EMORL_VERBOSE=1) adds the traceback; a bug keeps its traceback. Checked on the wrapper and on the real CLIs:
a missing corpus folder (train), a corrupt clip decoded in a grain worker process and a tokenizer that does not
fit the model (eval)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from audio_fixtures import synth_voice, write_audio
from flax import nnx

from emorl_jax import checkpoint
from emorl_jax.config import TINY
from emorl_jax.data import emotions
from emorl_jax.data.corpora.base import Utterance
from emorl_jax.data.manifest import write_manifest
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.text.prompts import build_prompt, instruction
from emorl_jax.text.tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
CONFIG = f"--config={ROOT / 'configs/tiny_synthetic.py'}"


def _run(args, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "", **env}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


_WRAPPED = textwrap.dedent("""
    import sys
    from emorl_jax import cli
    from emorl_jax.data.corpora.base import CorpusError

    def main(argv):
        if sys.argv[-1] == "bug":
            raise RuntimeError("a bug: index 3 out of range")
        try:
            raise CorpusError("/data/MELD/train_sent_emo.csv:7: unknown emotion 'happyy'")
        except CorpusError as e:  # a library re-raising (grain, jax) must not hide the user error
            raise RuntimeError("pipeline failed") from e

    cli.run(main)
""")


@pytest.mark.parametrize("how", ["plain", "verbose_flag", "verbose_env", "bug"])
def test_wrapper_prints_user_errors_in_one_line(how):
    args = ["-c", _WRAPPED]
    env = {}
    if how == "verbose_flag":
        args.append("--verbose")
    if how == "verbose_env":
        env["EMORL_VERBOSE"] = "1"
    if how == "bug":
        args.append("bug")
    out = _run(args, **env)
    if how == "plain":
        assert out.returncode == 2
        assert out.stderr == "error: /data/MELD/train_sent_emo.csv:7: unknown emotion 'happyy'\n"
    else:
        assert out.returncode == 1 and "Traceback" in out.stderr
        assert ("a bug: index 3" if how == "bug" else "unknown emotion 'happyy'") in out.stderr


def test_train_missing_corpus_folder(tmp_path):
    missing = tmp_path / "MELD.Raw"
    out = _run(["-m", "emorl_jax.train", "--config=tiny_synthetic", f"--workdir={tmp_path / 'run'}",  # bundled
                "--config.data.dataset=meld", f"--config.data.data_dir={missing}", "--config.data.labels=meld"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [f"error: {missing}: meld corpus folder not found"]


def test_unknown_config_name(tmp_path):
    out = _run(["-m", "emorl_jax.train", "--config=tiny_synthtic", f"--workdir={tmp_path}"])
    assert out.returncode == 2
    assert out.stderr.startswith("error: tiny_synthtic: no such config file, nor a bundled config (")
    assert "tiny_synthetic" in out.stderr and out.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny model (orbax) with its SentencePiece tokenizer beside it, and a bigger tokenizer that does
    not fit it."""
    root = tmp_path_factory.mktemp("model")
    texts = [build_prompt(instruction("esr", emotions.label_set("meld")), num_audio_tokens=[1])] * 4
    tok = train_sentencepiece(texts, root / "tokenizer.model", vocab_size=400)
    cfg = TINY.replace(text=dataclasses.replace(TINY.text, vocab_size=tok.vocab_size),
                       audio_token_index=tok.audio_token_id)
    checkpoint.save(AudioLM(cfg, rngs=nnx.Rngs(0)), root / "model")
    words = " ".join(f"w{i}x{i * 7 % 13}" for i in range(3000))
    big = train_sentencepiece([*texts, words], root / "big.model", vocab_size=800)
    assert big.vocab_size > tok.vocab_size
    return root


def _manifest(tmp_path: Path, corrupt: bool) -> Path:
    records = []
    for i, label in enumerate(("happy", "sad", "angry", "neutral")):
        path = write_audio(tmp_path / f"clip{i}.wav", synth_voice(1.0, 16000, seed=i), 16000)
        records.append(Utterance(utt_id=f"u{i}", path=str(path), label=label, speaker="s0", split="test",
                                 corpus="manifest"))
    if corrupt:
        (tmp_path / "clip2.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(np.arange(200, dtype=np.uint8)))
    return write_manifest(tmp_path / "manifest.jsonl", records)


def _eval(model_dir: Path, manifest: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return _run(["-m", "emorl_jax.eval", CONFIG, f"--checkpoint={model_dir / 'model'}", "--dataset=manifest",
                 f"--data_dir={manifest}", "--labels=meld", f"--out={out}", "--config.rl.max_new_tokens=4",
                 "--config.train.eval_batch_size=4", *extra])


def test_eval_corrupt_clip_from_a_worker_process(tmp_path, model_dir):
    manifest = _manifest(tmp_path, corrupt=True)
    out = _eval(model_dir, manifest, tmp_path / "out", f"--tokenizer={model_dir / 'tokenizer.model'}",
                "--config.data.worker_count=1")
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith(f"error: {tmp_path / 'clip2.wav'}: unreadable or corrupt audio file"), out.stderr[-3000:]
    assert "Traceback" not in out.stderr


def test_eval_refuses_a_tokenizer_that_does_not_fit(tmp_path, model_dir):
    manifest = _manifest(tmp_path, corrupt=False)
    out = _eval(model_dir, manifest, tmp_path / "out", f"--tokenizer={model_dir / 'big.model'}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        f"error: {model_dir / 'big.model'}: 800 tokens, but the model has only 400 embeddings "
        "(not this model's tokenizer?)"]
    assert not (tmp_path / "out").exists()  # refused before decoding anything


def test_eval_max_examples_and_recall_summary(tmp_path, model_dir):
    manifest = _manifest(tmp_path, corrupt=False)
    out = _eval(model_dir, manifest, tmp_path / "out", f"--tokenizer={model_dir / 'tokenizer.model'}",
                "--max_examples=3")
    assert out.returncode == 0, out.stderr[-3000:]
    predictions = (tmp_path / "out" / "manifest_test" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 3
    png = tmp_path / "out" / "manifest_test" / "confusion.png"
    assert "manifest_test: recall neutral " in out.stdout and f"confusion matrix {png}" in out.stdout
    assert "manifest_test: 100%" in out.stderr  # the progress bar reached the end
