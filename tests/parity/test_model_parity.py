"""AudioLM (JAX, converted with checkpoint.from_hf) against transformers' Qwen2AudioForConditionalGeneration."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from emorl_jax import checkpoint  # noqa: E402
from emorl_jax.audio.features import frames_needed  # noqa: E402
from hf_tiny import AUDIO_TOKEN, audio_inputs, make_hf_model, num_embeddings, save_hf  # noqa: E402

LOGITS_ATOL = 1e-4  # fp32, absolute (logits are O(1) with std-0.1 weights)
ENCODER_ATOL = 1e-5


def prompt(rng, clips, pad_left=0, pad_right=0, text=4):
    """Token ids with each clip's expanded <|AUDIO|> run between text tokens, and its attention mask."""
    ids = list(rng.integers(0, 90, text))
    for n in clips:
        ids += [AUDIO_TOKEN] * n + list(rng.integers(0, 90, text))
    ids = [0] * pad_left + ids + [0] * pad_right
    mask = [0] * pad_left + [1] * (len(ids) - pad_left - pad_right) + [0] * pad_right
    return ids, mask


def run_both(tmp_path, hf_kwargs, rows, valid_frames, positions=False):
    hf = make_hf_model(**hf_kwargs)
    ours = checkpoint.from_hf(save_hf(hf, tmp_path / "hf"), dtype="float32")
    ids = np.array([r[0] for r in rows])
    mask = np.array([r[1] for r in rows])
    kw_t = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    kw_j = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    if valid_frames:
        feats, fmask = audio_inputs(valid_frames)
        kw_t.update(input_features=torch.tensor(feats), feature_attention_mask=torch.tensor(fmask))
        kw_j.update(input_features=jnp.asarray(feats), feature_attention_mask=jnp.asarray(fmask))
    if positions:
        pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
        kw_t["position_ids"] = torch.tensor(pos)
        kw_j["positions"] = jnp.asarray(pos)
    with torch.no_grad():
        expected = hf(**kw_t).logits.numpy()
    got = np.asarray(ours(**kw_j))
    real = mask.astype(bool)
    return np.abs(got[real] - expected[real]).max()


CASES = {
    # name: (hf kwargs, clips' valid frames per row, padding)
    "gqa4_untied_one_clip": (dict(layers=2, heads=4, kv_heads=1), [[100]], None),
    "gqa1_tied_one_clip": (dict(layers=1, heads=4, kv_heads=4, tied=True), [[100]], None),
    "gqa4_3layers_two_clips": (dict(layers=3, heads=4, kv_heads=1, enc_layers=3), [[100, 100]], None),
    "short_clip": (dict(layers=2, heads=4, kv_heads=2), [[60]], None),
    "two_rows_left_pad": (dict(layers=2), [[100], [60]], "left"),
    "two_rows_right_pad": (dict(layers=2), [[100], [37]], "right"),
}


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(tmp_path, name):
    hf_kwargs, clip_rows, pad = CASES[name]
    rng = np.random.default_rng(1)
    lengths = [sum(num_embeddings(f) for f in row) + 4 * (len(row) + 1) for row in clip_rows]
    rows = []
    for row, length in zip(clip_rows, lengths):
        extra = max(lengths) - length
        rows.append(prompt(rng, [num_embeddings(f) for f in row],
                           pad_left=extra if pad == "left" else 0, pad_right=extra if pad == "right" else 0))
    frames = [f for row in clip_rows for f in row]
    err = run_both(tmp_path, hf_kwargs, rows, frames)
    assert err < LOGITS_ATOL, f"max |logits diff| {err:.3g}"


def test_left_padding_with_position_ids(tmp_path):
    rng = np.random.default_rng(2)
    pad = num_embeddings(100) - num_embeddings(60)
    rows = [prompt(rng, [num_embeddings(100)]), prompt(rng, [num_embeddings(60)], pad_left=pad)]
    err = run_both(tmp_path, dict(layers=2), rows, [100, 60], positions=True)
    assert err < LOGITS_ATOL, err


def test_text_only_prompt(tmp_path):
    rng = np.random.default_rng(3)
    rows = [(list(rng.integers(0, 90, 11)), [1] * 11), ([0, 0] + list(rng.integers(0, 90, 9)), [0, 0] + [1] * 9)]
    err = run_both(tmp_path, dict(layers=2, tied=True), rows, [])
    assert err < LOGITS_ATOL, err


def test_encoder_output_matches(tmp_path):
    hf = make_hf_model(layers=1, enc_layers=2)
    ours = checkpoint.from_hf(save_hf(hf, tmp_path / "hf"), dtype="float32")
    valid = [100, 60, 23]
    feats, fmask = audio_inputs(valid)
    after_conv = (np.array(valid) - 1) // 2 + 1
    s = 50
    bias = np.where(np.arange(s)[None, None, None, :] < after_conv[:, None, None, None], 0.0,
                    np.finfo(np.float32).min).astype(np.float32)
    bias = np.broadcast_to(bias, (len(valid), 1, s, s)).copy()
    with torch.no_grad():
        out = hf.model.audio_tower(torch.tensor(feats), attention_mask=torch.tensor(bias))
    expected = out.last_hidden_state.numpy()
    embeddings = (after_conv - 2) // 2 + 1  # each clip's outputs; positions past them are never read
    got = np.asarray(ours.audio_tower(jnp.asarray(feats), jnp.asarray(fmask.sum(-1))))
    err = max(np.abs(got[i, :n] - expected[i, :n]).max() for i, n in enumerate(embeddings))
    assert err < ENCODER_ATOL, f"max |encoder diff| {err:.3g}"
    # bucketed: the first frames_needed frames of the window give the same outputs at a fraction of the cost
    frames = frames_needed(60, feats.shape[-1])
    assert frames == 62
    short = np.asarray(ours.audio_tower(jnp.asarray(feats[1:, :, :frames]), jnp.asarray(fmask[1:].sum(-1))))
    assert short.shape == (2, 15, expected.shape[-1])
    err = max(np.abs(short[i, :n] - expected[1 + i, :n]).max() for i, n in enumerate(embeddings[1:]))
    assert err < ENCODER_ATOL, f"max |bucketed encoder diff| {err:.3g}"
