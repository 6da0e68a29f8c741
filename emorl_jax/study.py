"""`python -m emorl_jax.study`: the paper's two ablations, accuracy reward x reasoning format, over seeds.

  python -m emorl_jax.study --config=tiny_synthetic --out=studies/ablation --jobs=2 \
      --corpora=balanced,meld --modes=ir,eur,esr --rewards=binary,eswr_a1,eswr_a0.5,eswr_a1_decay --seeds=0,1,2

For every corpus, prompt mode and seed one SFT run (`rl.steps=0`, `init.seed` = `train.seed` = seed) is the
start that every GRPO run of that mode and seed branches from (`sft.from_run`), one GRPO run per reward. Each
run is `python -m emorl_jax.train` in its own workdir `<out>/<corpus>/<mode>/seed<k>/<reward or sft>`, so a
rerun of the study resumes: finished runs (with `summary.txt`) are skipped, interrupted ones resume from their
checkpoints. Up to `--jobs` runs go at once. Results, rewritten after every run:
  results.csv  one row per finished run (SFT rows have reward "sft"): metrics of its last evaluation
  summary.md   mean +- 95% CI (Student t over seeds) per cell, and GRPO-minus-binary differences paired by seed
  ua.png       UA per cell: bars at the mean, the 95% CI, a dot per seed
Corpora are the synthetic generator with `data.synthetic_priors` balanced or meld (MELD's class priors per split),
written once per corpus to `<out>/<corpus>/data`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emorl_jax.errors import ConfigError

# Accuracy-reward variants: name -> config overrides.
REWARDS: dict[str, tuple[str, ...]] = {
    "binary": ("reward.accuracy=binary",),
    "eswr_a1": ("reward.accuracy=eswr", "reward.alpha=1.0", "reward.alpha_schedule=constant"),
    "eswr_a0.5": ("reward.accuracy=eswr", "reward.alpha=0.5", "reward.alpha_schedule=constant"),
    "eswr_a1_decay": ("reward.accuracy=eswr", "reward.alpha=1.0", "reward.alpha_schedule=linear_decay"),
}
MODES = ("ir", "eur", "esr")
CORPORA = ("balanced", "meld")
METRICS = ("ua", "wa", "macro_f1", "weighted_f1", "invalid_rate", "format_rate")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the grid: reward "sft" for the shared SFT start of (corpus, mode, seed)."""

    corpus: str
    mode: str
    seed: int
    reward: str

    def workdir(self, out: Path) -> Path:
        return out / self.corpus / self.mode / f"seed{self.seed}" / self.reward

    def sft(self) -> Run:
        return dataclasses.replace(self, reward="sft")


def grid(corpora: Sequence[str], modes: Sequence[str], rewards: Sequence[str], seeds: Sequence[int]) -> list[Run]:
    """Every run of the study: the SFT runs first, then the GRPO runs, corpus by corpus."""
    for name, values, known in (("corpora", corpora, CORPORA), ("modes", modes, MODES),
                                ("rewards", rewards, tuple(REWARDS))):
        unknown = [v for v in values if v not in known]
        if unknown or not values:
            raise ConfigError(f"--{name}={','.join(values)}: choose from {', '.join(known)}")
    sft = [Run(c, m, s, "sft") for c in corpora for m in modes for s in seeds]
    return sft + [dataclasses.replace(r, reward=reward) for r in sft for reward in rewards]


def overrides(run: Run, out: Path, common: Sequence[str]) -> list[str]:
    """The `--config.key=value` flags of one run: the shared corpus, its mode and seed, then `common` (the
    user's), then what makes it an SFT start or a GRPO branch."""
    values = [f"data.synthetic_priors={run.corpus}", f"data.data_dir={out / run.corpus / 'data'}",
              f"prompt_mode={run.mode}", f"init.seed={run.seed}", f"train.seed={run.seed}", *common]
    if run.reward == "sft":
        values.append("rl.steps=0")
    else:
        values += [f"sft.from_run={run.sft().workdir(out)}", *REWARDS[run.reward]]
    return [f"--config.{v}" for v in values]


class Study:
    """Runs a grid of `Run`s as subprocesses, `jobs` at a time, and writes the results after each."""

    def __init__(self, config: str, out: str | os.PathLike, runs: Sequence[Run], *, common: Sequence[str] = (),
                 jobs: int = 1, env: dict | None = None):
        from emorl_jax.config import config_path

        # absolute: the runs record their corpus and SFT start paths, valid from any working directory
        self.config, self.out, self.runs = str(config_path(config)), Path(out).absolute(), list(runs)
        self.common, self.jobs, self.env = list(common), jobs, env
        self.failed: list[tuple[Run, str]] = []
        self._lock = threading.Lock()

    def run(self) -> bool:
        """Runs every unfinished run; True when all finished."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._make_corpora()
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:  # FIFO: every SFT starts before its GRPO
            started: dict[Run, concurrent.futures.Future] = {}
            for run in self.runs:
                needs = started.get(run.sft()) if run.reward != "sft" else None
                started[run] = pool.submit(self._run_one, run, needs)
            concurrent.futures.wait(started.values())
        self.write_results()
        for run, why in self.failed:
            print(f"failed: {run.workdir(self.out)}: {why}")
        return not self.failed

    def _make_corpora(self) -> None:
        from emorl_jax.config import load_run_config
        from emorl_jax.run_setup import make_synthetic_corpus

        for corpus in dict.fromkeys(r.corpus for r in self.runs):
            config = load_run_config(self.config, *self.common, f"data.synthetic_priors={corpus}")
            if config.data.dataset != "synthetic":
                raise ConfigError(f"{self.config}: data.dataset={config.data.dataset!r}; the study runs on the "
                                  "synthetic corpus")
            make_synthetic_corpus(config.data, self.out / corpus / "data")

    def _run_one(self, run: Run, needs: concurrent.futures.Future | None) -> bool:
        workdir = run.workdir(self.out)
        if needs is not None and not needs.result():
            self._fail(run, f"its SFT start {run.sft().workdir(self.out)} failed")
            return False
        if (workdir / "summary.txt").exists():
            return True
        if needs is not None:  # the SFT run's evaluation is this run's "before GRPO" evaluation: copy, not redo
            before = run.sft().workdir(self.out) / "eval" / "before_grpo"
            if before.is_dir() and not (workdir / "eval" / "before_grpo").exists():
                shutil.copytree(before, workdir / "eval" / "before_grpo")
        command = [sys.executable, "-m", "emorl_jax.train", f"--config={self.config}", f"--workdir={workdir}",
                   *overrides(run, self.out, self.common)]
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"start  {workdir}", flush=True)
        with open(workdir / "study.log", "a") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=self.env).returncode
        seconds = time.perf_counter() - start
        if code != 0:
            self._fail(run, f"exit status {code}; see {workdir / 'study.log'}")
            return False
        (workdir / "study_seconds.txt").write_text(f"{seconds:.1f}\n")
        print(f"done   {workdir} ({seconds:.0f} s)", flush=True)
        self.write_results()
        return True

    def _fail(self, run: Run, why: str) -> None:
        with self._lock:
            self.failed.append((run, why))
        print(f"failed {run.workdir(self.out)}: {why}", flush=True)

    def write_results(self) -> list[dict]:
        """results.csv, summary.md and ua.png from every finished run of the grid."""
        with self._lock:
            rows = [row for run in self.runs if (row := result_row(run, self.out)) is not None]
            if rows:
                write_csv(rows, self.out / "results.csv")
                (self.out / "summary.md").write_text(summary_markdown(rows))
                plot_ua(rows, self.out / "ua.png")
            return rows


def result_row(run: Run, out: Path) -> dict | None:
    """The results.csv row of a finished run (None if unfinished): its last evaluation's metrics."""
    workdir = run.workdir(out)
    metrics_path = workdir / "eval" / ("before_grpo" if run.reward == "sft" else "after_grpo") / "metrics.json"
    if not (workdir / "summary.txt").exists() or not metrics_path.exists():
        return None
    m = json.loads(metrics_path.read_text())
    seconds = workdir / "study_seconds.txt"
    row = {"corpus": run.corpus, "prompt_mode": run.mode, "reward": run.reward, "seed": run.seed,
           **{k: m.get(k) for k in METRICS}, "n": m["n"],
           **{f"recall_{label}": recall for label, recall in m["per_class_recall"].items()},
           "seconds": float(seconds.read_text()) if seconds.exists() else None,
           "workdir": str(workdir.relative_to(out))}
    return row


def write_csv(rows: Sequence[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else round(v, 4) if isinstance(v, float) else v)
                          for k, v in row.items()} for row in rows)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t confidence interval); the half-width is nan for one value."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def _cell(values: Sequence[float]) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}") + f" (n={len(values)})"


def _order(rows: Sequence[dict], key: str, known: Sequence[str]) -> list[str]:
    present = {row[key] for row in rows}
    return [k for k in known if k in present]


def summary_markdown(rows: Sequence[dict]) -> str:
    """Per corpus: a table of mean ± 95% CI over seeds per (mode, reward) for UA, WA, macro-F1 and the invalid
    rate, then each ESWR variant's UA minus binary's, paired by seed (same SFT start)."""
    lines = ["# Ablation: accuracy reward x prompt mode", "",
             "Mean ± half-width of the 95% Student-t interval over seeds; n = seeds. Reward `sft` is the SFT "
             "start that the GRPO runs of its mode and seed branch from.", ""]
    rewards = ("sft", *REWARDS)
    for corpus in _order(rows, "corpus", CORPORA):
        mine = [r for r in rows if r["corpus"] == corpus]
        lines += [f"## Corpus: {corpus}", "", "| mode | reward | UA | WA | macro-F1 | invalid |",
                  "|---|---|---|---|---|---|"]
        for mode in _order(mine, "prompt_mode", MODES):
            for reward in _order(mine, "reward", rewards):
                cell = [r for r in mine if r["prompt_mode"] == mode and r["reward"] == reward]
                if cell:
                    lines.append(f"| {mode} | {reward} | " + " | ".join(
                        _cell([r[k] for r in cell]) for k in ("ua", "wa", "macro_f1", "invalid_rate")) + " |")
        paired = []
        for mode in _order(mine, "prompt_mode", MODES):
            binary = {r["seed"]: r["ua"] for r in mine if r["prompt_mode"] == mode and r["reward"] == "binary"}
            for reward in _order(mine, "reward", [k for k in REWARDS if k != "binary"]):
                other = {r["seed"]: r["ua"] for r in mine if r["prompt_mode"] == mode and r["reward"] == reward}
                seeds = sorted(set(binary) & set(other))
                if seeds:
                    paired.append(f"| {mode} | {reward} − binary | "
                                  f"{_cell([other[s] - binary[s] for s in seeds])} |")
        if paired:
            lines += ["", "UA difference from the binary reward, paired by seed:", "",
                      "| mode | difference | UA |", "|---|---|---|", *paired]
        lines.append("")
    return "\n".join(lines)


def plot_ua(rows: Sequence[dict], path: Path) -> None:
    """UA per (mode, reward) cell, one panel per corpus: bar = mean, error bar = 95% CI, dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = _order(rows, "corpus", CORPORA)
    rewards = _order(rows, "reward", ("sft", *REWARDS))
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 3.6), squeeze=False)
    width = 0.8 / len(rewards)
    for ax, corpus in zip(axes[0], corpora):
        modes = _order([r for r in rows if r["corpus"] == corpus], "prompt_mode", MODES)
        for k, reward in enumerate(rewards):
            for x, mode in enumerate(modes):
                ua = [r["ua"] for r in rows if (r["corpus"], r["prompt_mode"], r["reward"]) == (corpus, mode, reward)]
                if not ua:
                    continue
                mean, half = mean_ci(ua)
                pos = x - 0.4 + width * (k + 0.5)
                ax.bar(pos, mean, width * 0.9, color=f"C{k}", label=reward if x == 0 else None,
                       yerr=None if math.isnan(half) else half, capsize=2)
                ax.plot([pos] * len(ua), ua, "k.", markersize=3)
        ax.set_xticks(range(len(modes)), [m.upper() for m in modes])
        ax.set_title(f"{corpus} corpus")
        ax.set_ylabel("UA (test)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    runs = grid(f.corpora, f.modes, f.rewards, [int(s) for s in f.seeds])
    study = Study(f.config, f.out, runs, common=f.set, jobs=f.jobs)
    print(f"{len(runs)} runs ({sum(r.reward == 'sft' for r in runs)} SFT) in {study.out}, {f.jobs} at a time")
    if not study.run():
        sys.exit(1)
    print((study.out / "summary.md").read_text())


if __name__ == "__main__":
    from absl import flags

    from emorl_jax import cli

    flags.DEFINE_string("config", "tiny_synthetic", "the run config every run starts from (a path or bundled name)")
    flags.DEFINE_string("out", None, "the study directory (results.csv, summary.md, ua.png, one folder per run)",
                        required=True)
    flags.DEFINE_list("corpora", ["balanced"], f"synthetic corpus priors: {', '.join(CORPORA)}")
    flags.DEFINE_list("modes", list(MODES), f"prompt modes: {', '.join(MODES)}")
    flags.DEFINE_list("rewards", list(REWARDS), f"accuracy rewards: {', '.join(REWARDS)}")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (init.seed and train.seed of each run)")
    flags.DEFINE_integer("jobs", 1, "runs at once")
    flags.DEFINE_multi_string("set", [], "a config override for every run, key=value (repeatable)")
    cli.run(main)
