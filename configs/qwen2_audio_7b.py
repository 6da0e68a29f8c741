"""Qwen2-Audio-7B-Instruct model shape (values from its published config.json) on a TPU/GPU mesh.

Usage: --config=configs/qwen2_audio_7b.py ; run configs (IEMOCAP, MELD) build on this shape.
"""

import ml_collections

from emorl_jax.config import QWEN2_AUDIO_7B, model_config_dict


def get_config():
    config = ml_collections.ConfigDict()
    config.model = model_config_dict(QWEN2_AUDIO_7B)  # bf16 compute, fp32 params by default
    config.mesh = ml_collections.ConfigDict({"shape": (1, -1, 1)})  # (data, fsdp, tensor); -1 = the rest
    return config
