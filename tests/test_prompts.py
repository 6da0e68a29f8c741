"""The chat prompt against transformers' Qwen2AudioProcessor (local tiny tokenizer, real chat template)."""

from __future__ import annotations

import numpy as np
import pytest

from emorl_jax.audio.features import num_audio_embeddings
from emorl_jax.text.prompts import (
    MODES, SYSTEM_PROMPT, build_prompt, encode_prompt, format_target, instruction)
from emorl_jax.text.tokenizer import train_byte_level_bpe, train_sentencepiece

# `chat_template` of Qwen/Qwen2-Audio-7B-Instruct's tokenizer_config.json (main branch).
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and "
    "message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if 'audio' in content or 'audio_url' in "
    "content %}{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")
LABELS = ["neutral", "happy", "sad", "angry"]
TEXTS = [instruction(m, LABELS) for m in MODES] + [
    "Describe the speaker's emotion. It's 3 o'clock; they sound <think>-ish.",
    format_target("sad", "esr", content="c", acoustics="a", summary="s")]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return train_byte_level_bpe(TEXTS * 3, tmp_path_factory.mktemp("hf"), vocab_size=400)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return train_sentencepiece(TEXTS * 3, tmp_path_factory.mktemp("sp") / "sp.model", vocab_size=400)


@pytest.fixture(scope="module", params=["hub", "transformers_default"])
def processor(request, hf):
    from transformers import Qwen2AudioProcessor, Qwen2TokenizerFast, WhisperFeatureExtractor

    tokenizer = Qwen2TokenizerFast(tokenizer_file=str(hf.path))
    template = QWEN2_AUDIO_CHAT_TEMPLATE if request.param == "hub" else None  # None: the class default
    return Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128),
                               tokenizer=tokenizer, chat_template=template)


def _conversation(text, num_clips):
    audio = [{"type": "audio", "audio_url": f"clip{k}.wav"} for k in range(num_clips)]
    return [{"role": "user", "content": [*audio, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("frames, expected",
                         [(3, 1), (6, 1), (7, 2), (10, 2), (11, 3), (100, 25), (2999, 750), (3000, 750)])
def test_num_audio_embeddings(frames, expected):
    assert num_audio_embeddings(frames) == expected


def test_a_clip_too_short_for_one_embedding_is_rejected():
    assert num_audio_embeddings(2) == 0  # transformers' formula
    with pytest.raises(ValueError, match="every clip needs >= 1 audio token"):
        build_prompt("x", num_audio_tokens=[num_audio_embeddings(2)])


@pytest.mark.parametrize("num_clips", [0, 1, 2, 3])
def test_prompt_string_is_the_chat_template(processor, num_clips):
    text = instruction("esr", LABELS)
    rendered = processor.apply_chat_template(_conversation(text, num_clips), add_generation_prompt=True,
                                             tokenize=False)
    assert build_prompt(text, num_audio_tokens=[1] * num_clips) == rendered
    assert rendered.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seconds", [[1.0], [2.37, 0.4113]])
def test_prompt_ids_match_processor(processor, hf, mode, seconds):
    """Our ids equal the processor's input_ids, whose <|AUDIO|> expansion comes from real Whisper features."""
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(round(s * 16000)).astype(np.float32) for s in seconds]
    text = processor.apply_chat_template(_conversation(instruction(mode, LABELS), len(clips)),
                                         add_generation_prompt=True, tokenize=False)
    out = processor(text=text, audio=clips, sampling_rate=16000, return_tensors="np")
    frames = out["feature_attention_mask"].sum(-1).tolist()
    assert frames == [-(-len(c) // 160) for c in clips]  # Whisper: one valid frame per started 10 ms hop
    counts = [num_audio_embeddings(f) for f in frames]
    ids = encode_prompt(hf, mode, LABELS, counts)
    assert ids == out["input_ids"][0].tolist()
    assert ids.count(hf.audio_token_id) == sum(counts) and len(set(counts)) == len(counts)


def test_prompt_and_target_tokenize_independently(hf, sp):
    """encode(prompt + target) == encode(prompt) + encode(target): the SFT loss mask can be cut at the join."""
    prompt = build_prompt(instruction("esr", LABELS), num_audio_tokens=[5, 3])
    target = format_target("angry", "esr", content="I said stop!", acoustics="loud, fast", summary="hot anger")
    for tok in (hf, sp):
        assert tok.encode(prompt + target) == tok.encode(prompt) + tok.encode(target)
        assert tok.decode(tok.encode(prompt + target)) == prompt + target
        assert tok.encode(target)[-1] == tok.eos_ids[0]


def test_encode_prompt_with_sentencepiece(sp):
    ids = encode_prompt(sp, "ir", LABELS, [4, 9])
    assert ids.count(sp.audio_token_id) == 13
    assert sp.decode(ids) == build_prompt(instruction("ir", LABELS), num_audio_tokens=[4, 9])


def test_encode_prompt_checks_audio_tokens_are_atomic(sp):
    class SplitsAudio:  # a tokenizer that loses <|AUDIO|> (e.g. a vocabulary without it as one piece)
        audio_token_id = sp.audio_token_id

        def encode(self, text):
            return [i for i in sp.encode(text) if i != sp.audio_token_id]

    with pytest.raises(ValueError, match=r"prompt holds 0 audio token ids, expected 3: .* <\|AUDIO\|> atomic"):
        encode_prompt(SplitsAudio(), "ir", LABELS, [3])


def test_build_prompt_rejects_empty_clip():
    with pytest.raises(ValueError, match=r"every clip needs >= 1 audio token, got \[4, 0\]"):
        build_prompt("x", num_audio_tokens=[4, 0])


def test_instructions():
    for mode in MODES:
        text = instruction(mode, LABELS)
        assert "neutral, happy, sad, angry" in text and "<answer>" in text
        assert ("<think>" in text) == (mode != "ir")
        assert ("<content>" in text and "<acoustics>" in text and "<summary>" in text) == (mode == "esr")
    with pytest.raises(ValueError, match="unknown prompting mode 'cot'"):
        instruction("cot", LABELS)
    with pytest.raises(ValueError, match="labels must be non-empty and distinct"):
        instruction("ir", ["sad", "sad"])


def test_format_target():
    assert format_target("sad", "ir") == "<answer>sad</answer><|im_end|>"
    assert format_target("sad", "eur", think="Low and slow.") == (
        "<think>Low and slow.</think><answer>sad</answer><|im_end|>")
    assert format_target("angry", "esr", content="Stop it!", acoustics="loud", summary="anger") == (
        "<think><content>Stop it!</content><acoustics>loud</acoustics><summary>anger</summary></think>"
        "<answer>angry</answer><|im_end|>")


@pytest.mark.parametrize("args, kwargs, message", [
    (("sad", "esr"), {"content": "c", "acoustics": "a"}, "mode 'esr': summary must be a non-empty string"),
    (("sad", "eur"), {"think": "  "}, "mode 'eur': think must be a non-empty string"),
    (("sad", "ir"), {"think": "x"}, r"mode 'ir' takes no \['think'\]"),
    (("sad", "eur"), {"think": "a</think><answer>happy"}, "think must not contain format tags"),
    (("", "ir"), {}, "answer must be a non-empty string"),
    (("sad", "cot"), {}, "unknown prompting mode 'cot'"),
])
def test_format_target_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        format_target(*args, **kwargs)
