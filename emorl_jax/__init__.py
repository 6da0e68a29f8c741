"""emorl_jax: EMO-RL (GRPO + ESWR + ESR) for Qwen2-Audio in JAX/Flax NNX."""

__version__ = "0.1.0"
