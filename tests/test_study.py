"""The study runner on a 2-run grid (one SFT start, two GRPO branches), and its summary statistics."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from cpu_devices import xla_flags

from emorl_jax import study

ROOT = Path(__file__).resolve().parents[1]
FAST = ["sft.steps=3", "rl.steps=2", "sft.batch_size=4", "rl.batch_size=2", "rl.group_size=2",
        "rl.max_new_tokens=12", "train.eval_batch_size=8", "mesh.activation_constraints=false",
        "data.synthetic_per_class=10", "data.synthetic_speakers=10", "data.eval_split=dev",
        "tokenizer.vocab_size=400"]


def test_mean_ci_by_hand():
    mean, half = study.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302652729911275 / 3 ** 0.5, rel=1e-9)  # t(0.975, 2) * 1 / sqrt 3
    assert study.mean_ci([0.5])[0] == 0.5


def test_summary_pairs_rewards_by_seed():
    rows = [{"corpus": "balanced", "prompt_mode": "esr", "reward": reward, "seed": seed, "ua": ua, "wa": ua,
             "macro_f1": ua, "invalid_rate": 0.0}
            for reward, uas in (("binary", (0.40, 0.50)), ("eswr_a0.5", (0.45, 0.52))) for seed, ua in enumerate(uas)]
    text = study.summary_markdown(rows)
    assert "| esr | binary | 0.450 ± 0.635 (n=2) |" in text  # t(0.975, 1) = 12.706; sd 0.0707 / sqrt 2
    assert "| esr | eswr_a0.5 − binary | 0.035 ± 0.191 (n=2) |" in text  # differences 0.05, 0.02


def test_grid_validates_names():
    runs = study.grid(["balanced"], ["ir", "esr"], ["binary"], [0, 1])
    assert [r.reward for r in runs] == ["sft"] * 4 + ["binary"] * 4
    with pytest.raises(study.ConfigError, match="--rewards=eswr: choose from"):
        study.grid(["balanced"], ["ir"], ["eswr"], [0])


def test_two_run_grid_branches_from_one_sft_and_resumes(tmp_path, capsys):
    runs = study.grid(["meld"], ["ir"], ["binary", "eswr_a1_decay"], [0])
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    assert study.Study("tiny_synthetic", tmp_path, runs, common=FAST, jobs=2, env=env).run(), capsys.readouterr()
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["reward"], r["prompt_mode"], r["corpus"], r["seed"]) for r in rows] == [
        ("sft", "ir", "meld", "0"), ("binary", "ir", "meld", "0"), ("eswr_a1_decay", "ir", "meld", "0")]
    for row, run in zip(rows, runs):
        workdir = tmp_path / row["workdir"]
        assert workdir == run.workdir(tmp_path)
        name = "before_grpo" if run.reward == "sft" else "after_grpo"
        metrics = json.loads((workdir / "eval" / name / "metrics.json").read_text())
        assert float(row["ua"]) == pytest.approx(metrics["ua"], abs=1e-4)
        assert float(row["invalid_rate"]) == pytest.approx(metrics["invalid_rate"], abs=1e-4)
        assert {k for k in row if k.startswith("recall_")} == {f"recall_{k}" for k in metrics["per_class_recall"]}
    sft = runs[0].workdir(tmp_path)
    assert not (sft / "params_final").exists() and (sft / "grpo_start").exists()  # rl.steps=0: SFT only
    for run in runs[1:]:
        config = json.loads((run.workdir(tmp_path) / "config.json").read_text())["config"]
        assert config["sft"]["from_run"] == str(sft) and config["data"]["synthetic_priors"] == "meld"
        assert config["reward"]["alpha_schedule"] == ("linear_decay" if run.reward == "eswr_a1_decay" else "constant")
        assert "constant answers under the training priors" in (run.workdir(tmp_path) / "study.log").read_text()
    # MELD-like data: neutral is the largest class of the train split
    manifest = [json.loads(line) for line in (tmp_path / "meld" / "data" / "manifest.jsonl").read_text().splitlines()]
    train = [r["label"] for r in manifest if r["split"] == "train"]
    assert max(set(train), key=train.count) == "neutral"
    summary = (tmp_path / "summary.md").read_text()
    assert "| ir | eswr_a1_decay − binary |" in summary and (tmp_path / "ua.png").stat().st_size > 1000
    capsys.readouterr()
    assert study.Study("tiny_synthetic", tmp_path, runs, common=FAST, jobs=2, env=env).run()  # all finished: no run
    assert "start" not in capsys.readouterr().out
