"""The notebooks run top to bottom, headless, in their quick mode, on one CPU device as in Colab, with the checkout's
package importable (so their install cells skip the install):

- small_scale_reproduction.ipynb (a few steps per stage) leaves the outputs of every stage: evaluations before and
  after GRPO and the binary ablation;
- evaluate_and_inspect.ipynb evaluates a tiny random HF-format model given by Hub id, resolved offline from a
  Hugging Face cache the test writes, and shows recall, the confusion matrix, ESR blocks with rewards, and audio.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import nbformat
from flax import nnx
from nbclient import NotebookClient

from emorl_jax import checkpoint
from emorl_jax.config import TINY
from emorl_jax.data import emotions
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.text.prompts import build_prompt, format_target, instruction
from emorl_jax.text.tokenizer import train_byte_level_bpe

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK = NOTEBOOKS / "small_scale_reproduction.ipynb"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _run(path: Path, monkeypatch) -> list:
    """Executes the notebook in quick mode; returns its code cells' outputs (asserting none is an error)."""
    monkeypatch.setenv("EMORL_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as in Colab
    # conftest's persistent compilation cache reaches the kernel: programs compiled by other tests are read back
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    return outputs


def test_notebook_runs_headless(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.setenv("EMORL_NOTEBOOK_WORKDIR", str(workdir))
    outputs = _run(NOTEBOOK, monkeypatch)
    text = "".join(o.get("text", "") for o in outputs)
    assert "CPU runtime: 1 x cpu" in text and "mesh.shape=(1,1,1)" in text
    assert "after GRPO (binary)" in text and "after GRPO (ESWR)" in text
    for run, name in ((workdir, "before_grpo"), (workdir, "after_grpo"), (tmp_path / "run_binary", "after_grpo")):
        metrics = json.loads((run / "eval" / name / "metrics.json").read_text())
        assert 0.0 <= metrics["ua"] <= 1.0 and (run / "eval" / name / "confusion.png").exists()
    rows = [json.loads(line) for line in (tmp_path / "run_binary" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "grpo" and "reward_accuracy" in r for r in rows)  # the binary reward ran
    assert not any(r["stage"] == "sft" for r in rows)  # ... from the first run's SFT checkpoint


def _hub_cache(cache: Path, repo: str) -> Path:
    """A tiny random Qwen2-Audio in HF format and a byte-level BPE tokenizer.json that fits it, as the snapshot of
    `repo` in a Hugging Face cache (`<cache>/models--org--name/{refs/main, snapshots/<commit>/}`)."""
    entry = cache / ("models--" + repo.replace("/", "--"))
    snapshot = entry / "snapshots" / COMMIT
    labels = emotions.label_set("synthetic")
    texts = [build_prompt(instruction("esr", labels), num_audio_tokens=[1]),
             *(format_target(label, "esr", content="c", acoustics="a", summary="s") for label in labels)]
    tokenizer = train_byte_level_bpe(texts * 4, snapshot, vocab_size=400)
    cfg = TINY.replace(text=dataclasses.replace(TINY.text, vocab_size=tokenizer.vocab_size),
                       audio_token_index=tokenizer.audio_token_id)
    checkpoint.to_hf(AudioLM(cfg, rngs=nnx.Rngs(0)), snapshot)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_evaluate_and_inspect_notebook(tmp_path, monkeypatch):
    snapshot = _hub_cache(tmp_path / "hf", "emorl-test/tiny-qwen2-audio")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in snapshot.iterdir()}
    out = tmp_path / "out"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("EMORL_NOTEBOOK_CHECKPOINT", "emorl-test/tiny-qwen2-audio")  # its tokenizer too
    monkeypatch.setenv("EMORL_NOTEBOOK_CONFIG", "tiny_synthetic")
    monkeypatch.setenv("EMORL_NOTEBOOK_DATA_DIR", str(tmp_path / "synthetic"))
    monkeypatch.setenv("EMORL_NOTEBOOK_OUT", str(out))
    outputs = _run(NOTEBOOKS / "evaluate_and_inspect.ipynb", monkeypatch)
    text = "".join(o.get("text", "") for o in outputs)
    assert "CPU runtime: 1 x cpu" in text and "emorl-test/tiny-qwen2-audio" in text
    assert "per-class recall" in text and "confusion matrix" in text
    metrics = json.loads((out / "metrics.json").read_text())
    labels = emotions.label_set("synthetic")
    assert metrics["n"] == 2 * len(labels) and set(metrics["per_class_recall"]) == set(labels)
    assert (out / "confusion.png").exists() and len((out / "predictions.jsonl").read_text().splitlines()) == 14
    for label in labels:  # the printed recall table and confusion rows
        assert f"\n{label} " in text
    assert text.count("rewards: ESWR ") == 2 and text.count("<acoustics> ") == 2 and "<answer> " in text
    shown = [o.get("data", {}) for o in outputs if o.output_type == "display_data"]
    assert sum("<audio" in d.get("text/html", "") for d in shown) == 2  # a player per inspected answer
    assert sum("image/png" in d for d in shown) == 1  # the confusion matrix
