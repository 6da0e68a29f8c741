"""Greedy evaluation of a model on batches of prompts: decode, parse answers, score, write the outputs.

Used by `python -m emorl_jax.eval` and by the trainer's before/after evaluations.

Multi-process: give the evaluator the mesh. Every process then reads the same global batches (run_setup), feeds
its own rows (`distributed.global_batch`), gathers every rollout (`distributed.to_host`) and computes the same
predictions and metrics; only process 0 should write them (`write_outputs` callers check jax.process_index()).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from emorl_jax import distributed
from emorl_jax.metrics import compute_metrics, format_table, plot_confusion
from emorl_jax.rl.rewards import parse_completion
from emorl_jax.rl.sampler import SamplingParams, make_sampler, rollout_keys
from emorl_jax.rl.steps import cast_to_compute_dtype
from emorl_jax.sharding import BATCH_AXES, replicated

PROMPT_KEYS = ("prompt_ids", "prompt_mask", "input_features", "feature_mask")


def _pad_rows(batch: dict, rows: int) -> dict:
    """Repeats the last row so every batch has `rows` rows (one compiled shape); padding rows are dropped later."""
    n = len(batch["prompt_ids"])
    if n == rows:
        return batch
    return {k: np.concatenate([v, np.repeat(v[-1:], rows - n, axis=0)]) for k, v in batch.items()}


class GreedyEvaluator:
    """Decodes greedily (the sampler at temperature 0, one rollout per prompt) and parses each answer."""

    def __init__(self, graphdef, tokenizer, *, labels: Sequence[str], mode: str, max_new_tokens: int,
                 batch_size: int, mesh: jax.sharding.Mesh | None = None):
        """mesh: feed every batch as global arrays sharded over ('data', 'fsdp') of `mesh` (needed with several
        processes; batches are padded to a multiple of data x fsdp rows). None: plain host arrays (one process)."""
        self.tokenizer, self.labels, self.mode, self.batch_size = tokenizer, tuple(labels), mode, batch_size
        self.mesh = mesh
        shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
        self._rows = -(-batch_size // shards) * shards  # rows of every compiled batch
        self.sample = make_sampler(graphdef, group_size=1, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                                   params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
        # the first state (the params) in the compute dtype, once per evaluation: every decode step then reads bf16
        # weights instead of casting fp32 ones (same outputs; the copy is sharded like the params)
        self._compute_copy = jax.jit(lambda states: (cast_to_compute_dtype(graphdef, *states), *states[1:]))
        self._keys = None

    def _rollout_keys(self) -> jax.Array:
        """The (unused by greedy decoding) rollout keys; replicated global keys on a mesh."""
        if self._keys is None:
            make = lambda: rollout_keys(jax.random.key(0), self._rows, 1)
            if self.mesh is None:
                self._keys = make()
            else:
                self._keys = jax.jit(make, out_shardings=replicated(self.mesh))()
        return self._keys

    def predict(self, states: tuple, batches: Iterable[dict], *, progress: str = "", total: int | None = None
                ) -> list[dict]:
        """One record per utterance: utt_id, gold, pred (None if unparseable), well_formed, completion.
        `progress`: a tqdm bar with this title over the `total` utterances (process 0 only); "" = none."""
        out = []
        keys, states = self._rollout_keys(), self._compute_copy(tuple(states))
        with tqdm(total=total, desc=progress, unit="clip", disable=not progress or jax.process_index() != 0) as bar:
            for batch in batches:
                n = len(batch["prompt_ids"])
                arrays = _pad_rows({k: batch[k] for k in PROMPT_KEYS}, self._rows)
                if self.mesh is not None:
                    arrays = distributed.global_batch(arrays, self.mesh)
                roll = self.sample(states, *(arrays[k] for k in PROMPT_KEYS), keys)
                tokens, mask, truncated = distributed.to_host((roll.tokens, roll.mask, roll.truncated))
                for i in range(n):
                    text = self.tokenizer.decode(tokens[i][mask[i].astype(bool)], skip_special_tokens=True)
                    parsed = parse_completion(text, self.labels, mode=self.mode)
                    out.append({"utt_id": str(batch["utt_id"][i]), "gold": self.labels[int(batch["label"][i])],
                                "pred": parsed.answer, "well_formed": bool(parsed.well_formed), "completion": text,
                                "truncated": bool(truncated[i])})
                bar.update(n)
        return out

    def evaluate(self, states: tuple, batches: Iterable[dict], *, progress: str = "", total: int | None = None
                 ) -> tuple[list[dict], dict]:
        """(predictions, metrics): `predict`, then WA/UA/F1/per-class recall/confusion and the format rate."""
        predictions = self.predict(states, batches, progress=progress, total=total)
        metrics = compute_metrics([p["gold"] for p in predictions], [p["pred"] for p in predictions], self.labels)
        metrics["format_rate"] = float(np.mean([p["well_formed"] for p in predictions])) if predictions else 0.0
        return predictions, metrics


def write_outputs(out_dir: str | Path, predictions: list[dict], metrics: dict, labels: Sequence[str],
                  title: str = "") -> None:
    """predictions.jsonl, metrics.json and confusion.png under `out_dir` (local or `gs://...`)."""
    from emorl_jax.paths import as_path

    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_confusion(metrics["confusion"], list(labels), out_dir / "confusion.png", title=title or None)


def summary_table(rows: dict[str, dict]) -> str:
    """A printable table of the headline metrics, one row per named evaluation."""
    keys = ("n", "wa", "ua", "weighted_f1", "macro_f1", "invalid_rate", "format_rate")
    return format_table([{"run": name, **{k: m[k] for k in keys if k in m}} for name, m in rows.items()])
