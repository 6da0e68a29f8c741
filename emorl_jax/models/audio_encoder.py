"""Qwen2-Audio audio tower: conv stem, learned positions, pre-LN blocks, avg-pool(2), final LayerNorm.

Matches transformers' `Qwen2AudioEncoder` as `Qwen2AudioModel` calls it, which runs every clip as a full window
of `2 * max_source_positions` mel frames and masks attention to each clip's valid positions. Ours also takes
the first F frames of the window (`audio.features.frames_needed`: the batch's longest clip + the 2 frames its conv
stem reads past it): the valid outputs are the same, at the cost of F frames instead of the window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emorl_jax.config import AudioLMConfig
from emorl_jax.models.attention import Mask, attend
from emorl_jax.models.layers import Dense, LayerNorm, param, scan_layers, stack_layers
from emorl_jax.sharding import constrain

HIDDEN = ("batch", "length", "embed")  # logical axes of the hidden states [N, S, d]


def conv_output_lengths(num_frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Valid lengths after conv2 (stride 2) and after the avg-pool: the audio embeddings per clip."""
    after_conv = (num_frames - 1) // 2 + 1
    return after_conv, (after_conv - 2) // 2 + 1


class Conv1d(nnx.Module):
    """torch.nn.Conv1d(k=3, padding=1) on [B, T, C] inputs; kernel [k, in, out]."""

    def __init__(self, din: int, dout: int, *, stride: int, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = param(nnx.initializers.lecun_normal()(rngs.params(), (3, din, dout), param_dtype),
                            (None, None, "embed"))
        self.bias = param(jnp.zeros((dout,), param_dtype), (None,))
        self.stride, self.dtype = stride, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride,), [(1, 1)],
            dimension_numbers=("NWC", "WIO", "NWC"))
        return y + self.bias[...].astype(self.dtype)


class EncoderAttention(nnx.Module):
    def __init__(self, cfg: AudioLMConfig, *, rngs: nnx.Rngs):
        d, kw = cfg.audio.d_model, dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs,
                                        init_std=cfg.audio.init_std)
        self.q_proj = Dense(d, d, axes=("embed", "heads"), use_bias=True, **kw)
        self.k_proj = Dense(d, d, axes=("embed", "heads"), use_bias=False, **kw)
        self.v_proj = Dense(d, d, axes=("embed", "heads"), use_bias=True, **kw)
        self.out_proj = Dense(d, d, axes=("heads", "embed"), use_bias=True, **kw)
        self.num_heads, self.implementation = cfg.audio.encoder_attention_heads, cfg.attention

    def __call__(self, x: jax.Array, mask: Mask) -> jax.Array:
        """x [N, S, d], mask: bidirectional over each clip's valid positions (`attention.Mask.full`) -> [N, S, d]."""
        n, s, d = x.shape
        head_dim = d // self.num_heads
        split = lambda t: constrain(t.reshape(n, s, self.num_heads, head_dim), ("batch", "length", "heads", None))
        q = split(self.q_proj(x) * head_dim**-0.5)  # HF scales q before the product
        out = attend(q, split(self.k_proj(x)), split(self.v_proj(x)), mask, scale=1.0,
                     implementation=self.implementation)
        out = constrain(out, ("batch", "length", "heads", None))
        return self.out_proj(out.reshape(n, s, d))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: AudioLMConfig, *, rngs: nnx.Rngs):
        a = cfg.audio
        norm = dict(eps=a.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        dense = dict(use_bias=True, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs,
                     init_std=a.init_std)
        self.self_attn_layer_norm = LayerNorm(a.d_model, **norm)
        self.self_attn = EncoderAttention(cfg, rngs=rngs)
        self.final_layer_norm = LayerNorm(a.d_model, **norm)
        self.fc1 = Dense(a.d_model, a.encoder_ffn_dim, axes=("embed", "mlp"), **dense)
        self.fc2 = Dense(a.encoder_ffn_dim, a.d_model, axes=("mlp", "embed"), **dense)

    def __call__(self, x: jax.Array, mask: Mask) -> jax.Array:
        """x [N, S, d] -> [N, S, d]; see `EncoderAttention`."""
        x = constrain(x, HIDDEN)
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        h = constrain(jax.nn.gelu(self.fc1(self.final_layer_norm(x)), approximate=False), ("batch", "length", "mlp"))
        return constrain(x + self.fc2(h), HIDDEN)


class AudioEncoder(nnx.Module):
    """input_features [N, mel, F] (the first F <= 2*P frames of each clip's window, F >= `frames_needed`) + valid
    frames [N] -> hidden [N, S//2, d_model], S = (F - 1)//2 + 1 positions after conv2 (P = max_source_positions;
    the full window gives P//2)."""

    def __init__(self, cfg: AudioLMConfig, *, rngs: nnx.Rngs):
        a = cfg.audio
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)
        self.conv1 = Conv1d(a.num_mel_bins, a.d_model, stride=1, **kw)
        self.conv2 = Conv1d(a.d_model, a.d_model, stride=2, **kw)
        self.embed_positions = param(jnp.zeros((a.max_source_positions, a.d_model), cfg.params_dtype), (None, "embed"))
        self.layers = stack_layers(lambda: EncoderLayer(cfg, rngs=rngs), a.encoder_layers)
        self.layer_norm = LayerNorm(a.d_model, eps=a.layer_norm_eps, dtype=cfg.compute_dtype,
                                    param_dtype=cfg.params_dtype)
        self.cfg = cfg

    def __call__(self, input_features: jax.Array, num_frames: jax.Array) -> jax.Array:
        a = self.cfg.audio
        shape = input_features.shape
        if len(shape) != 3 or shape[1] != a.num_mel_bins or shape[2] > a.num_frames:
            raise ValueError(f"input_features must be [clips, {a.num_mel_bins}, frames <= {a.num_frames}] (the "
                             f"audio window or its first frames), got {tuple(input_features.shape)}")
        x = jnp.swapaxes(input_features, 1, 2)  # [N, frames, mel]
        x = jax.nn.gelu(self.conv1(x), approximate=False)
        x = jax.nn.gelu(self.conv2(x), approximate=False)
        x = x + self.embed_positions[: x.shape[1]].astype(x.dtype)
        after_conv, _ = conv_output_lengths(num_frames)
        mask = Mask.full(jnp.arange(x.shape[1])[None, :] < after_conv[:, None])
        x, _ = scan_layers(self.layers, lambda layer, h, _: (layer(h, mask), None), x, remat=self.cfg.remat)
        n, s, d = x.shape
        x = x[:, : s // 2 * 2].reshape(n, s // 2, 2, d).mean(2)  # AvgPool1d(2, stride 2)
        return self.layer_norm(x)
