"""Tiny random Qwen2-Audio checkpoints written with transformers' save_pretrained (tests only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MEL, POSITIONS, AUDIO_TOKEN, VOCAB = 16, 50, 97, 100  # 100 mel frames per window -> 25 audio embeddings


def hf_config(*, layers=2, heads=4, kv_heads=1, tied=False, enc_layers=2):
    from transformers import Qwen2AudioConfig

    return Qwen2AudioConfig(
        audio_config=dict(d_model=32, encoder_layers=enc_layers, encoder_attention_heads=4, encoder_ffn_dim=64,
                          num_mel_bins=MEL, max_source_positions=POSITIONS),
        text_config=dict(model_type="qwen2", hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=48, vocab_size=VOCAB,
                         max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                         tie_word_embeddings=tied),
        audio_token_index=AUDIO_TOKEN, tie_word_embeddings=tied)


def make_hf_model(seed=0, std=0.1, **kw):
    """A random HF model whose weights are N(0, std) (larger than the default init, so logits are not ~0)."""
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(hf_config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
        if kw.get("tied"):  # transformers' Qwen2-Audio keeps a separate lm_head even when the config ties them
            model.lm_head.weight.copy_(model.model.language_model.embed_tokens.weight)
    return model


def save_hf(model, directory: Path, **kw) -> Path:
    model.save_pretrained(directory, **kw)
    return directory


def audio_inputs(valid_frames, seed=0):
    """Mel features [N, MEL, 2*POSITIONS] and the frame mask [N, 2*POSITIONS] for clips of these lengths."""
    rng = np.random.default_rng(seed)
    frames = 2 * POSITIONS
    feats = rng.normal(size=(len(valid_frames), MEL, frames)).astype(np.float32)
    mask = (np.arange(frames)[None, :] < np.asarray(valid_frames)[:, None]).astype(np.int32)
    return feats, mask


def num_embeddings(valid_frames: int) -> int:
    after_conv = (valid_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1
