"""`python -m emorl_jax.eval --config=configs/X.py --checkpoint=DIR --dataset=NAME --data_dir=DIR
[--fold=N | --split=test] [--out=DIR]`

Greedy decoding (batched, jitted, on the mesh) of the held-out utterances, answer parsing, and metrics. Writes
predictions.jsonl, metrics.json and confusion.png per evaluation and prints a summary table. IEMOCAP without
--fold evaluates all five leave-one-session-out folds (a `{fold}` in --checkpoint picks each fold's model) and
reports each fold and their mean. --checkpoint is an orbax model (`python -m emorl_jax.convert`, or a training
run's `<workdir>/final`) or a Hugging Face Qwen2-Audio directory.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from emorl_jax import checkpoint, distributed
from emorl_jax.data import emotions
from emorl_jax.evaluation import GreedyEvaluator, summary_table, write_outputs
from emorl_jax.run_setup import prepare_data
from emorl_jax.sharding import make_mesh
from emorl_jax.text.tokenizer import load_tokenizer

DATASETS = ("meld", "iemocap", "ravdess", "savee", "cremad", "tess", "synthetic", "manifest")
DEFAULT_LABELS = {"meld": "meld", "iemocap": "iemocap4", "synthetic": "synthetic", "ravdess": "cross4",
                  "savee": "cross4", "cremad": "cross4", "tess": "cross4"}

_CONFIG = config_flags.DEFINE_config_file("config", None, "the run config the model was trained with")
flags.DEFINE_string("checkpoint", None, "orbax model dir or HF dir; may contain {fold}", required=True)
flags.DEFINE_enum("dataset", None, DATASETS, "corpus to evaluate on", required=True)
flags.DEFINE_string("data_dir", "", "corpus root (release layout), manifest path, or synthetic corpus dir")
flags.DEFINE_integer("fold", None, "IEMOCAP leave-one-session-out fold (1-5); all five when omitted")
flags.DEFINE_string("split", "test", "split to evaluate (MELD: train/dev/test; manifest/synthetic: its splits)")
flags.DEFINE_string("tokenizer", "", "tokenizer path (default: config, or tokenizer.model beside the checkpoint)")
flags.DEFINE_string("labels", "", "label set name (default: by dataset)")
flags.DEFINE_string("out", "", "output directory (default: <checkpoint>/eval)")
distributed.define_flags()
FLAGS = flags.FLAGS


def _load_model(path: Path, mesh, dtype: str):
    if (path / "model_config.json").exists():
        return checkpoint.restore(path, mesh=mesh, dtype=dtype)
    if (path / "config.json").exists():
        return checkpoint.from_hf(path, dtype=dtype, mesh=mesh)
    raise FileNotFoundError(f"{path}: neither an orbax model (model_config.json) nor a HF directory (config.json)")


def _tokenizer(config, ckpt: Path):
    for candidate in (FLAGS.tokenizer, config.tokenizer.path, ckpt / "tokenizer.model",
                      ckpt.parent / "tokenizer.model"):
        if candidate and Path(candidate).exists():
            return load_tokenizer(candidate)
    raise FileNotFoundError(f"no tokenizer: pass --tokenizer, set tokenizer.path, or put tokenizer.model beside "
                            f"{ckpt}")


def evaluate_one(config, ckpt: Path, out_dir: Path, title: str) -> dict:
    """Evaluates one checkpoint on the config's held-out split; writes the outputs under `out_dir`."""
    mesh = make_mesh(tuple(config.mesh.shape))
    tokenizer = _tokenizer(config, ckpt)
    model = _load_model(ckpt, mesh, config.model.dtype)
    data = prepare_data(config, out_dir)
    data.audio_window = (model.cfg.audio.num_mel_bins, model.cfg.audio.num_frames / 100.0)  # the checkpoint's
    if not data.eval:
        raise ValueError(f"{config.data.dataset}: no utterances in split {config.data.eval_split!r}")
    graphdef, state = nnx.split(model)
    # Every process reads every held-out batch, feeds its own rows and gets every prediction; process 0 writes.
    evaluator = GreedyEvaluator(graphdef, tokenizer, labels=data.labels, mode=config.prompt_mode,
                                max_new_tokens=config.rl.max_new_tokens, batch_size=config.train.eval_batch_size,
                                mesh=mesh)
    predictions, metrics = evaluator.evaluate((state,), data.eval_batches(tokenizer, config.train.eval_batch_size))
    if jax.process_index() == 0:
        write_outputs(out_dir, predictions, metrics, data.labels, title=title)
    return metrics


def main(argv):
    del argv
    distributed.initialize_from_flags()
    config = _CONFIG.value.copy_and_resolve_references()
    config.data.dataset = FLAGS.dataset
    config.data.data_dir = FLAGS.data_dir
    config.data.eval_split = FLAGS.split
    config.data.labels = FLAGS.labels or DEFAULT_LABELS.get(FLAGS.dataset, config.data.labels)
    emotions.label_set(config.data.labels)  # fail early on an unknown name
    out_root = Path(FLAGS.out or Path(FLAGS.checkpoint.replace("{fold}", "all")) / "eval")
    folds = [FLAGS.fold] if FLAGS.fold or FLAGS.dataset != "iemocap" else [1, 2, 3, 4, 5]
    results = {}
    for fold in folds:
        config.data.fold = fold or 0
        name = f"{FLAGS.dataset}_fold{fold}" if fold else f"{FLAGS.dataset}_{FLAGS.split}"
        ckpt = Path(FLAGS.checkpoint.replace("{fold}", str(fold or "")))
        results[name] = evaluate_one(config, ckpt, out_root / name, title=name)
    if len(results) > 1:
        keys = ("n", "wa", "ua", "weighted_f1", "macro_f1", "invalid_rate", "format_rate")
        results["mean of folds"] = {k: float(np.mean([m[k] for m in results.values()])) for k in keys}
    table = summary_table(results)
    if jax.process_index() == 0:
        (out_root / "summary.txt").write_text(table + "\n")
        print(table)


if __name__ == "__main__":
    app.run(main)
