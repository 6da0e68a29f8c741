"""EMO-RL on MELD (7 labels, train/test): GRPO of Qwen2-Audio-7B-Instruct with ESR + ESWR.

Values marked (paper) are reported for EMO-RL (second-hand; launch/README.md lists them); every other value is ours.

  python -m emorl_jax.train --config=configs/qwen2_audio_7b_meld.py --workdir=runs/meld \
    --config.data.data_dir=/data/MELD.Raw \
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
    c.data.dataset = "meld"
    c.data.labels = "meld"        # neutral, joy, sadness, anger, surprise, fear, disgust
    c.data.fold = 0               # not a cross-validated corpus
    c.data.train_split = "train"  # 9989 utterances
    c.data.eval_split = "test"    # 2610 utterances ("dev" for model selection)
    c.data.max_seconds = 30.0     # Qwen2-Audio's audio window (30 s); two test clips are minutes long
    c.data.skip_bad_clips = True  # MELD ships a corrupt train clip (dia125_utt3): skip it, counted and reported

    c.rl.steps = 625             # about one epoch of MELD's 9989 training utterances (ours)
    return c
