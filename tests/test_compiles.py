"""The GRPO stage of the 7B config (shrunk to tiny widths; 30 s audio window, bf16 compute, remat) compiles a
small, fixed set of programs: over 8 steps on clips of 1-30 s, each program compiles at most once per prompt
bucket, nothing else compiles (no eager ops on device arrays), and the compiled steps take batches sharded over
('data', 'fsdp')."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import jax
import numpy as np

from audio_fixtures import synth_voice, write_audio
from emorl_jax.config import load_run_config
from emorl_jax.data.corpora.base import Utterance
from emorl_jax.data.manifest import write_manifest
from emorl_jax.sharding import batch_sharding

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("neutral", "happy", "sad", "angry")
BUCKETS = (512, 1152)  # the tiny tokenizer spends ~314 tokens on the template and ESR instruction
PROGRAMS = {"keys", "rollout_weights", "sample", "logps", "grpo_update", "advantages"}


def _corpus(root: Path) -> Path:
    """16 training clips of 1 to 30 s (two bucket sizes of prompt), 4 test clips."""
    utts = []
    for i, seconds in enumerate([*np.linspace(1.0, 30.0, 16), 2.0, 3.0, 4.0, 5.0]):
        path = write_audio(root / f"clip{i:02d}.wav", synth_voice(float(seconds), f0=120 + 7 * i, seed=i), 16000)
        utts.append(Utterance(f"u{i:02d}", str(path), LABELS[i % 4], f"s{i % 3}", "train" if i < 16 else "test",
                              "manifest"))
    return write_manifest(root, utts)


def _config(manifest: Path):
    shrink = {"text.hidden_size": 64, "text.intermediate_size": 128, "text.num_hidden_layers": 2,
              "text.num_attention_heads": 4, "text.num_key_value_heads": 2, "text.initializer_range": 0.1,
              "audio.d_model": 64, "audio.encoder_layers": 2, "audio.encoder_attention_heads": 4,
              "audio.encoder_ffn_dim": 128, "audio.init_std": 0.1}
    overrides = [f"model.{k}={v}" for k, v in shrink.items()] + [
        "data.dataset=manifest", f"data.data_dir={manifest}", "data.labels=iemocap4", "data.fold=0",
        f"data.length_buckets={BUCKETS}", "tokenizer.vocab_size=400", "mesh.shape=(1,2,4)",
        "rl.steps=8", "rl.batch_size=4", "rl.micro_batches=2", "rl.group_size=2", "rl.max_new_tokens=6",
        "rl.learning_rate=1e-4", "train.checkpoint_every=4", "mesh.activation_constraints=False"]
    return load_run_config(ROOT / "configs/qwen2_audio_7b_iemocap.py", *overrides)


class _Compiles(logging.Handler):
    """Collects the names in JAX's "Compiling <name> with global shapes" log lines."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def emit(self, record):
        match = re.match(r"Compiling (\S+) with global shapes", record.getMessage())
        if match:
            self.names.append(match.group(1))


def test_grpo_compiles_each_program_once_per_bucket(tmp_path):
    from emorl_jax.train import Trainer

    trainer = Trainer(_config(_corpus(tmp_path / "corpus")), tmp_path / "run")
    handler = _Compiles()
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        # Without jax.set_mesh (mesh.activation_constraints=false, as the CLI tests run): XLA:CPU can deadlock
        # running updates compiled with activation constraints on a fake multi-device mesh (README, Tests).
        trainer.sft()  # sft.steps = 0: the GRPO start is the initial model
        trainer.grpo()
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(handler)

    programs = {name: p for name, p in trainer.programs.items()}
    assert programs["update"].compiles >= 1
    # The sample program's arguments end with (prompt_ids [B/M, T], prompt_mask, features, feature_mask, keys).
    seen = {sig[1][-5][0][1] for sig in programs["sample"].compiled}  # the prompt buckets GRPO used
    assert seen <= set(BUCKETS) and len(seen) >= 1
    for name, program in programs.items():
        per_bucket = 1 if name in ("keys", "advantages", "rollout_weights") else len(seen)
        assert program.compiles <= per_bucket, (name, program.compiles, seen)
    # JAX's own log agrees, and nothing else compiled: no eager op ran on a device array during 8 steps.
    counts = {name: handler.names.count(f"jit({name})") for name in PROGRAMS}
    assert counts == {"keys": 1, "advantages": 1, "rollout_weights": 1, "sample": len(seen), "logps": len(seen),
                      "grpo_update": len(seen)}, handler.names
    # Besides them, only the stage's set-up compiles, at most once each: the reference copy, the fresh train state,
    # and the scalar optax creates when it maps the optimizer state onto the params' shardings (compiled already if
    # an earlier test in the process made the same scalar).
    others = [n for n in handler.names if n.removeprefix("jit(").removesuffix(")") not in PROGRAMS]
    assert len(others) == len(set(others)), others
    assert {"jit(cast_to_compute_dtype_copy)", "jit(fresh_train_state)"} <= set(others) <= {
        "jit(cast_to_compute_dtype_copy)", "jit(convert_element_type)", "jit(fresh_train_state)"}, others

    # The compiled update takes the batch sharded over ('data', 'fsdp') and the state sharded like the params.
    update = next(iter(programs["update"].compiled.values()))
    state_in, _, batch_in = update.input_shardings[0]
    rank = {"advantages": 1, "weights": 1, "input_features": 3}
    for name, s in batch_in.items():
        ndim = rank.get(name, 2)
        assert s.is_equivalent_to(batch_sharding(trainer.mesh, ndim), ndim), (name, s)
    # The sampler's weights: the params in bf16 (the 7B config's compute dtype), sharded like them.
    cast = next(iter(programs["rollout_weights"].compiled.values()))
    params_in = cast.input_shardings[0][0]
    outs = jax.tree.leaves(cast.out_info)
    nbytes = lambda o: o.size * o.dtype.itemsize
    bf16 = sum(nbytes(o) for o in outs if o.dtype == jax.numpy.bfloat16)
    assert bf16 > 0.95 * sum(map(nbytes, outs))  # all but the encoder's LayerNorm params (read in fp32)
    for o, s_in, s_out in zip(outs, jax.tree.leaves(params_in), jax.tree.leaves(cast.output_shardings)):
        assert s_out.is_equivalent_to(s_in, o.ndim)
    mu = jax.tree.leaves(state_in.opt_state[1][0].mu)
    assert any(not s.is_fully_replicated for s in mu)
    report = json.loads((tmp_path / "run" / "memory.json").read_text())
    assert report["devices"] == 8 and report["replicated_bytes"] < report["per_device_bytes"]["params"]
    assert set(report["per_device_bytes"]) == {"params", "optimizer", "reference", "frozen"}
    assert report["per_device_bytes"]["optimizer"] > report["per_device_bytes"]["params"]  # mu + nu, sharded alike
    for name in ("sample", "logps", "update"):
        assert set(report["steps"][name]) == {"argument", "output", "alias", "temp"}
        assert report["steps"][name]["argument"] > 0
