"""Two GRPO update steps of the tiny model on one global 8-device CPU mesh, run by tests/test_multiprocess.py.

    python tests/multiprocess_worker.py --out DIR                       # one process, 8 fake CPU devices
    python tests/multiprocess_worker.py --out DIR --port P --process 0  # one of two processes, 4 devices each

Every process builds the same model and the same global batch, feeds only its own rows
(`jax.make_array_from_process_local_data`) and writes `DIR/losses_<process>.json`; process 0 also writes the
final params, gathered to the host, as `DIR/params.npz` (keys are the params' paths).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--port", type=int, default=0, help="coordinator port; 0 = single process")
    p.add_argument("--process", type=int, default=0)
    return p.parse_args()


START = time.perf_counter()
ARGS = parse_args()
NUM_PROCESSES = 2 if ARGS.port else 1
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_devices import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = xla_flags(8 // NUM_PROCESSES)
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

if NUM_PROCESSES > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{ARGS.port}", num_processes=NUM_PROCESSES,
                               process_id=ARGS.process, initialization_timeout=60)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from emorl_jax.config import TINY  # noqa: E402
from emorl_jax.models.audio_lm import AudioLM  # noqa: E402
from emorl_jax.models.lora import split_trainable  # noqa: E402
from emorl_jax.distributed import global_batch as to_global  # noqa: E402
from emorl_jax.rl.steps import init_train_state, make_grpo_update  # noqa: E402
from emorl_jax.sharding import make_mesh, param_shardings  # noqa: E402

G, PROMPTS, N, MICRO, STEPS = 2, 8, 6, 2, 2


def global_batch(seed=0) -> dict[str, np.ndarray]:
    """The same synthetic batch in every process: 8 prompts with one full 4 s clip each, G=2 completions of 6
    tokens, and old/ref log-probs near the random model's (about -log 512), so some ratios clip."""
    rng = np.random.default_rng(seed)
    frames, n_audio = TINY.audio.num_frames, TINY.audio.num_embeddings
    ids = np.array([[11 + i, *[TINY.audio_token_index] * n_audio, 20 + i] for i in range(PROMPTS)], np.int32)
    rows = PROMPTS * G
    old = (-np.log(TINY.text.vocab_size) + rng.normal(0, 0.2, (rows, N))).astype(np.float32)
    return {
        "prompt_ids": ids, "prompt_mask": np.ones_like(ids),
        "input_features": rng.normal(size=(PROMPTS, TINY.audio.num_mel_bins, frames)).astype(np.float32),
        "feature_mask": np.ones((PROMPTS, frames), np.int32),
        "completions": rng.integers(10, 500, (rows, N)).astype(np.int32),
        "completion_mask": (np.arange(N)[None] < rng.integers(1, N + 1, (rows, 1))).astype(np.int32),
        "advantages": rng.normal(size=rows).astype(np.float32),
        "weights": (rng.random(rows) > 0.2).astype(np.float32),
        "old_logps": old,
        "ref_logps": (old + rng.normal(0, 0.1, (rows, N))).astype(np.float32),
    }


def main() -> None:
    mesh = make_mesh((2, 2, 2))
    graphdef, params, frozen = split_trainable(AudioLM(TINY, rngs=nnx.Rngs(0)), lora=False)
    shardings = param_shardings(params, mesh)
    params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x)[i]),
                          params, shardings)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))
    state, state_shardings = init_train_state(tx, params, mesh)
    update = make_grpo_update(graphdef, tx, group_size=G, clip_eps=0.2, beta=0.04, normalization="sequence",
                              state_shardings=state_shardings, micro_batches=MICRO)
    batch = to_global(global_batch(), mesh)  # each process feeds only its own rows
    losses = []
    for _ in range(STEPS):
        state, metrics = update(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    ARGS.out.mkdir(parents=True, exist_ok=True)
    (ARGS.out / f"losses_{jax.process_index()}.json").write_text(json.dumps(
        {"losses": losses, "devices": jax.device_count(), "local_devices": jax.local_device_count(),
         "processes": jax.process_count(), "seconds": round(time.perf_counter() - START, 1)}))
    full = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(full)}
        np.savez(ARGS.out / "params.npz", **flat)
    if NUM_PROCESSES > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
