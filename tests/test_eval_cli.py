"""`python -m emorl_jax.eval` end to end on the miniature IEMOCAP and MELD releases with a tiny random model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from corpus_fixtures import make_iemocap, make_meld
from flax import nnx

from emorl_jax import checkpoint
from emorl_jax.config import TINY
from emorl_jax.data import emotions
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.text.prompts import build_prompt, instruction
from emorl_jax.text.tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny model saved with checkpoint.save, its SentencePiece tokenizer beside it."""
    ckpt = tmp_path_factory.mktemp("ckpt") / "model"
    ckpt.mkdir()
    texts = [build_prompt(instruction("esr", emotions.label_set(name)), num_audio_tokens=[1])
             for name in ("meld", "iemocap4")]
    tok = train_sentencepiece(texts * 4, ckpt / "tokenizer.model", vocab_size=400)
    cfg = TINY.replace(text=dataclasses.replace(TINY.text, vocab_size=tok.vocab_size),
                       audio_token_index=tok.audio_token_id)
    checkpoint.save(AudioLM(cfg, rngs=nnx.Rngs(0)), ckpt)
    return ckpt


def _eval(ckpt, out, *args):
    cmd = [sys.executable, "-m", "emorl_jax.eval", f"--config={ROOT / 'configs/tiny_synthetic.py'}",
           f"--checkpoint={ckpt}", f"--out={out}", "--config.rl.max_new_tokens=6",
           "--config.train.eval_batch_size=4", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout


def _check_outputs(directory: Path, n: int, labels):
    predictions = [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == n and len({p["utt_id"] for p in predictions}) == n
    assert {p["gold"] for p in predictions} <= set(labels)
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["n"] == n and 0.0 <= metrics["ua"] <= 1.0
    assert len(metrics["confusion"]) == len(labels) and len(metrics["confusion"][0]) == len(labels) + 1
    assert (directory / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_iemocap_all_folds(tmp_path, tiny_checkpoint):
    expected = make_iemocap(tmp_path)["4class"]
    out = tmp_path / "out"
    stdout = _eval(tiny_checkpoint, out, "--dataset=iemocap", f"--data_dir={expected.root}")
    labels = emotions.label_set("iemocap4")
    for k in range(1, 6):
        n = sum(u.split == f"Session{k}" for u in expected.records)
        _check_outputs(out / f"iemocap_fold{k}", n, labels)
        assert f"iemocap_fold{k}" in stdout
    assert "mean of folds" in stdout and (out / "summary.txt").exists()


def test_eval_meld_test_split(tmp_path, tiny_checkpoint):
    expected = make_meld(tmp_path)["test"]
    out = tmp_path / "out"
    stdout = _eval(tiny_checkpoint, out, "--dataset=meld", f"--data_dir={expected.root}", "--split=test")
    _check_outputs(out / "meld_test", len(expected.records), emotions.label_set("meld"))
    assert "meld_test" in stdout
