"""notebooks/small_scale_reproduction.ipynb runs top to bottom, headless, in its quick mode (a few steps per
stage), and leaves the outputs of every stage: evaluations before and after GRPO and the binary ablation."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "small_scale_reproduction.ipynb"


def test_notebook_runs_headless(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.setenv("EMORL_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("EMORL_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("MPLBACKEND", "agg")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as in Colab
    # conftest's persistent compilation cache reaches the kernel: the ablation's Trainer reads the first one's programs
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
                   ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "after GRPO (binary)" in text and "after GRPO (ESWR)" in text
    for run, name in ((workdir, "before_grpo"), (workdir, "after_grpo"), (tmp_path / "run_binary", "after_grpo")):
        metrics = json.loads((run / "eval" / name / "metrics.json").read_text())
        assert 0.0 <= metrics["ua"] <= 1.0 and (run / "eval" / name / "confusion.png").exists()
    rows = [json.loads(line) for line in (tmp_path / "run_binary" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "grpo" and "reward_accuracy" in r for r in rows)  # the binary reward ran
    assert not any(r["stage"] == "sft" for r in rows)  # ... from the first run's SFT checkpoint
