"""A tiny random Qwen2-Audio-shaped model for tests and CPU runs (4 s audio window, 2+2 layers)."""

import ml_collections

from emorl_jax.config import TINY, model_config_dict


def get_config():
    config = ml_collections.ConfigDict()
    config.model = model_config_dict(TINY)
    config.mesh = ml_collections.ConfigDict({"shape": (1, -1, 1)})
    return config
