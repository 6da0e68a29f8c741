"""`python -m emorl_jax.eval --config=configs/X.py --checkpoint=DIR --dataset=NAME --data_dir=DIR
[--fold=N | --split=test] [--out=DIR]`

Greedy decoding (batched, jitted, on the mesh) of the held-out utterances, answer parsing, and metrics. Writes
predictions.jsonl, metrics.json and confusion.png per evaluation and prints a summary table. IEMOCAP without
--fold evaluates all five leave-one-session-out folds (a `{fold}` in --checkpoint picks each fold's model) and
reports each fold and their mean. --checkpoint is an orbax model (`python -m emorl_jax.convert`, or a training
run's `<workdir>/final`), a Hugging Face Qwen2-Audio directory, or a Hub id `org/name[@revision]`. A tokenizer
that does not fit the model is refused before any weight is read; `--max_examples=N` evaluates a fixed random
subset.
"""

from __future__ import annotations

import random
from pathlib import Path

import jax
import numpy as np
from absl import flags
from etils import epath
from flax import nnx
from ml_collections import config_flags

from emorl_jax import checkpoint, cli, distributed, hub
from emorl_jax.data import emotions
from emorl_jax.errors import ConfigError
from emorl_jax.evaluation import GreedyEvaluator, summary_table, write_outputs
from emorl_jax.paths import as_path
from emorl_jax.run_setup import check_tokenizer_fits, checkpoint_tokenizer, prepare_data
from emorl_jax.sharding import make_mesh

DATASETS = ("meld", "iemocap", "ravdess", "savee", "cremad", "tess", "synthetic", "manifest")

_CONFIG = config_flags.DEFINE_config_file("config", None, "the run config the model was trained with")
flags.DEFINE_string("checkpoint", None, "orbax model dir, HF dir, or Hub id org/name[@revision]; may contain {fold}",
                    required=True)
flags.DEFINE_enum("dataset", None, DATASETS, "corpus to evaluate on", required=True)
flags.DEFINE_string("data_dir", "", "corpus root (release layout), manifest path, or synthetic corpus dir")
flags.DEFINE_integer("fold", None, "IEMOCAP leave-one-session-out fold (1-5); all five when omitted")
flags.DEFINE_string("split", "test", "split to evaluate (MELD: train/dev/test; manifest/synthetic: its splits)")
flags.DEFINE_string("tokenizer", "", "tokenizer path or Hub id (default: tokenizer.path, or the checkpoint's own)")
flags.DEFINE_string("labels", "", "label set name (default: by dataset)")
flags.DEFINE_integer("max_examples", 0, "evaluate a fixed random subset of this many utterances (0 = all)")
flags.DEFINE_string("out", "", "output directory (default: <checkpoint>/eval)")
distributed.define_flags()
FLAGS = flags.FLAGS


def evaluate_one(config, ckpt: Path, out_dir: Path, title: str) -> dict:
    """Evaluates one checkpoint on the config's held-out split; writes the outputs under `out_dir`."""
    mesh = make_mesh(tuple(config.mesh.shape))
    ckpt = hub.resolve(ckpt, what="checkpoint")  # a Hub id: its snapshot in the HF cache
    tokenizer = checkpoint_tokenizer(ckpt, FLAGS.tokenizer or config.tokenizer.path)
    check_tokenizer_fits(checkpoint.model_config(ckpt), tokenizer)  # before minutes of reading 7B weights
    model = checkpoint.load(ckpt, mesh=mesh, dtype=config.model.dtype, attention=config.model.attention)
    data = prepare_data(config, out_dir)
    data.audio_window = (model.cfg.audio.num_mel_bins, model.cfg.audio.num_frames / 100.0)  # the checkpoint's
    if not data.eval:
        raise ConfigError(f"{config.data.dataset}: no utterances in split {config.data.eval_split!r}")
    if FLAGS.max_examples and FLAGS.max_examples < len(data.eval):  # a spread-out subset, in corpus order
        keep = sorted(random.Random(0).sample(range(len(data.eval)), FLAGS.max_examples))
        data.eval = [data.eval[i] for i in keep]
    graphdef, state = nnx.split(model)
    # Every process reads every held-out batch, feeds its own rows and gets every prediction; process 0 writes.
    evaluator = GreedyEvaluator(graphdef, tokenizer, labels=data.labels, mode=config.prompt_mode,
                                max_new_tokens=config.rl.max_new_tokens, batch_size=config.train.eval_batch_size,
                                mesh=mesh)
    predictions, metrics = evaluator.evaluate((state,), data.eval_batches(tokenizer, config.train.eval_batch_size),
                                              progress=title, total=len(data.eval))
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
    config.data.labels = FLAGS.labels or emotions.DATASET_LABEL_SETS.get(FLAGS.dataset, config.data.labels)
    emotions.label_set(config.data.labels)  # fail early on an unknown name
    out_root = as_path(FLAGS.out or epath.Path(FLAGS.checkpoint.replace("{fold}", "all")) / "eval")  # gs:// too
    folds = [FLAGS.fold] if FLAGS.fold or FLAGS.dataset != "iemocap" else [1, 2, 3, 4, 5]
    results = {}
    for fold in folds:
        config.data.fold = fold or 0
        name = f"{FLAGS.dataset}_fold{fold}" if fold else f"{FLAGS.dataset}_{FLAGS.split}"
        ckpt = epath.Path(FLAGS.checkpoint.replace("{fold}", str(fold or "")))  # a dir, gs:// dir or Hub id
        results[name] = evaluate_one(config, ckpt, out_root / name, title=name)
    if len(results) > 1:
        keys = ("n", "wa", "ua", "weighted_f1", "macro_f1", "invalid_rate", "format_rate")
        results["mean of folds"] = {k: float(np.mean([m[k] for m in results.values()])) for k in keys}
    table = summary_table(results)
    if jax.process_index() == 0:
        (out_root / "summary.txt").write_text(table + "\n")
        print(table)
        for name, m in results.items():
            if "per_class_recall" in m:
                recall = ", ".join(f"{label} {r:.3f}" for label, r in m["per_class_recall"].items())
                print(f"{name}: recall {recall}; confusion matrix {out_root / name / 'confusion.png'}")


if __name__ == "__main__":
    cli.run(main)
