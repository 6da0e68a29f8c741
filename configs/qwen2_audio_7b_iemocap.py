"""EMO-RL on IEMOCAP (4 classes, leave-one-session-out): GRPO of Qwen2-Audio-7B-Instruct with ESR + ESWR.

Values marked (paper) are reported for EMO-RL (second-hand; launch/README.md lists them); every other value is ours.
Run one fold per job, fold k tests on Session k; report each fold and the mean of the five:

  python -m emorl_jax.train --config=configs/qwen2_audio_7b_iemocap.py --workdir=runs/iemocap_f1 \
    --config.data.fold=1 --config.data.data_dir=/data/IEMOCAP_full_release \
    --config.init.checkpoint=/ckpt/qwen2_audio_7b --config.tokenizer.path=/models/Qwen2-Audio-7B-Instruct

Start from Qwen2-Audio-7B-Instruct: `--config.init.hf_dir=Qwen/Qwen2-Audio-7B-Instruct` (a Hub id, fetched once
into the HF cache, or a local snapshot directory) reads its safetensors, or convert it once (`python -m
emorl_jax.convert`) and pass `--config.init.checkpoint=DIR`. `tokenizer.path` names the same id or snapshot (its
tokenizer.json). launch/ has TPU and GPU scripts.

The shared GRPO settings (paper values marked) are in `emorl_jax.config.qwen2_audio_7b_run_config`.
"""

from emorl_jax.config import qwen2_audio_7b_run_config


def get_config():
    c = qwen2_audio_7b_run_config()
    c.data.dataset = "iemocap"
    c.data.labels = "iemocap4"    # neu, hap (+exc), ang, sad: the standard 4-class protocol
    c.data.fold = 1               # leave-one-session-out fold 1..5: --config.data.fold=N
    c.data.train_split = "train"  # sessions other than the fold's
    c.data.eval_split = "test"    # the fold's session
    c.data.max_seconds = 0.0      # no limit: the few turns over 30 s are cut to the 30 s window (as HF does)
    c.data.skip_bad_clips = False  # IEMOCAP has no known broken wav: fail loudly on one

    c.rl.steps = 275             # about one epoch of a fold's ~4400 training utterances (ours)
    # no two IEMOCAP-4 labels are 45 degrees apart on Plutchik's wheel, so here ESWR equals exact match
    return c
