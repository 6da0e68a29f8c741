"""AudioLM = audio encoder + projector + Qwen2 decoder; audio embeddings fill the `<|AUDIO|>` slots.

The prompt must already hold one `<|AUDIO|>` token per audio embedding (as transformers' Qwen2AudioProcessor
expands them): clip i with n valid mel frames fills `conv_output_lengths(n)[1]` slots, clips in row-major order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emorl_jax.config import AudioLMConfig
from emorl_jax.audio.features import frames_needed
from emorl_jax.models.audio_encoder import AudioEncoder, conv_output_lengths
from emorl_jax.models.layers import Dense
from emorl_jax.models.qwen2 import KVCache, Qwen2Model
from emorl_jax.sharding import constrain


class Projector(nnx.Module):
    def __init__(self, cfg: AudioLMConfig, *, rngs: nnx.Rngs):
        self.linear = Dense(cfg.audio.d_model, cfg.text.hidden_size, axes=(None, "embed"), use_bias=True,
                            dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs,
                            init_std=cfg.text.initializer_range)

    def __call__(self, x):
        return self.linear(x)


def check_audio_slots(input_ids, feature_attention_mask, audio_token_index: int, window: int) -> None:
    """Host-side checks: the prompt holds exactly as many `<|AUDIO|>` slots as the clips yield, and the features
    keep the frames the encoder reads (`frames_needed`; `window` = the full window's frames)."""
    slots = int((np.asarray(input_ids) == audio_token_index).sum())
    frames = np.zeros((0, 0)) if feature_attention_mask is None else np.asarray(feature_attention_mask)
    valid = frames.sum(-1).astype(int)
    embeddings = int(conv_output_lengths(valid)[1].sum()) if len(valid) else 0
    if slots != embeddings:
        raise ValueError(f"the prompt has {slots} <|AUDIO|> tokens but the {len(valid)} audio clip(s) yield "
                         f"{embeddings} audio embeddings; expand each clip's placeholder to its embedding count")
    need = frames_needed(int(valid.max()), window) if len(valid) else 0
    if frames.shape[1] < need:
        raise ValueError(f"the audio features keep {frames.shape[1]} mel frames but a clip has {valid.max()} valid "
                         f"frames: keep at least {need} (frames_needed)")


class AudioLM(nnx.Module):
    """Qwen2AudioForConditionalGeneration in Flax NNX (HF attribute names: audio_tower, multi_modal_projector,
    language_model, lm_head)."""

    def __init__(self, cfg: AudioLMConfig, *, rngs: nnx.Rngs):
        self.audio_tower = AudioEncoder(cfg, rngs=rngs)
        self.multi_modal_projector = Projector(cfg, rngs=rngs)
        self.language_model = Qwen2Model(cfg, rngs=rngs)
        self.lm_head = None if cfg.text.tie_word_embeddings else Dense(
            cfg.text.hidden_size, cfg.text.vocab_size, axes=("embed", "vocab"), use_bias=False,
            dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs, init_std=cfg.text.initializer_range)
        self.cfg = cfg

    def encode_audio(self, input_features: jax.Array, feature_attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """input_features [N, mel, frames], feature_attention_mask [N, frames] -> (embeddings [N, A, d_text],
        valid counts [N])."""
        num_frames = feature_attention_mask.astype(jnp.int32).sum(-1)
        hidden = self.audio_tower(input_features, num_frames)
        return self.multi_modal_projector(hidden), conv_output_lengths(num_frames)[1]

    def embed(self, input_ids: jax.Array, input_features=None, feature_attention_mask=None) -> jax.Array:
        """Token embeddings [B, T, d] with the audio slots filled by the clips' embeddings."""
        embeds = self.language_model.embed_tokens(input_ids)
        if input_features is None:
            return embeds
        if not isinstance(input_ids, jax.core.Tracer):
            check_audio_slots(input_ids, feature_attention_mask, self.cfg.audio_token_index,
                              self.cfg.audio.num_frames)
        audio, counts = self.encode_audio(input_features, feature_attention_mask)
        b, t, d = embeds.shape
        is_audio = (input_ids == self.cfg.audio_token_index).reshape(-1)
        ordinal = jnp.cumsum(is_audio) - 1  # k-th audio slot in row-major order
        ends = jnp.cumsum(counts)
        clip = jnp.clip(jnp.searchsorted(ends, ordinal, side="right"), 0, audio.shape[0] - 1)
        offset = jnp.clip(ordinal - (ends - counts)[clip], 0, audio.shape[1] - 1)
        filled = audio[clip, offset].astype(embeds.dtype)
        return jnp.where(is_audio[:, None], filled, embeds.reshape(b * t, d)).reshape(b, t, d)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., d] -> logits [..., vocab] in fp32: operands in the compute dtype, the product accumulated
        and returned in fp32 (no rounding to a bf16 compute dtype). Leading axes are (batch, length...)."""
        head = self.language_model.embed_tokens.attend if self.lm_head is None else self.lm_head
        out = head(hidden, out_dtype=jnp.float32)
        lead = ("batch", *("length",) * (out.ndim - 2))[: out.ndim - 1]
        return constrain(out, (*lead, "vocab"))

    def hidden_states(self, input_ids, input_features=None, feature_attention_mask=None, attention_mask=None,
                      positions=None, cache: KVCache | None = None):
        """Final-norm hidden states [B, T, d] (and the updated cache)."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if positions is None:  # transformers' default: positions count slots, padding included
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        embeds = self.embed(input_ids, input_features, feature_attention_mask)
        return self.language_model(embeds, positions, attention_mask, cache)

    def prefill(self, input_ids, input_features, feature_attention_mask, attention_mask, positions):
        """A prompt's final-norm hidden states [B, T, d] and its keys/values as a T-slot KVCache
        (`Qwen2Model.prefill`)."""
        embeds = self.embed(input_ids, input_features, feature_attention_mask)
        return self.language_model.prefill(embeds, positions, attention_mask)

    def __call__(self, input_ids, input_features=None, feature_attention_mask=None, attention_mask=None,
                 positions=None, cache: KVCache | None = None):
        """Logits [B, T, vocab] (fp32) as Qwen2AudioForConditionalGeneration returns them; with a cache,
        (logits, updated cache)."""
        hidden, new_cache = self.hidden_states(input_ids, input_features, feature_attention_mask, attention_mask,
                                               positions, cache)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)
