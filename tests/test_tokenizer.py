"""Tokenizer backends: HF byte-level BPE against transformers' Qwen2 tokenizers, SentencePiece training."""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emorl_jax.errors import TokenizerError
from emorl_jax.text.tokenizer import (
    CHAT_SPECIALS, ESR_TAGS, SPECIAL_TOKENS, HFTokenizer, SentencePieceTokenizer, Tokenizer, TokenNotFoundError,
    load_tokenizer, train_byte_level_bpe, train_sentencepiece)

CORPUS = [
    "Hello world, the speaker sounds angry and loud!",
    "I can't believe it's already 2024... really? We'll see, they're late.",
    "She said: \"I'm so happy for you\" and smiled; the pitch rose quickly.",
    "The voice is low, slow and trembling, which suggests sadness or fear.",
    "Ünïcödé tëxt, 感情认识, emojis 😀😢 and\ttabs\nnew lines  double  spaces.",
    "<think><content>words</content><acoustics>pitch</acoustics><summary>both</summary></think>",
] * 4
MIXED = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Audio 1: <|audio_bos|><|AUDIO|><|AUDIO|><|AUDIO|><|audio_eos|>\nWhat's the emotion?<|im_end|>\n"
    "<|im_start|>assistant\n<think>It's loud</think><answer>angry</answer><|im_end|><|endoftext|>",
    "no specials at all: 12345 67.8 I'M WE'LL  spaced   out\r\n\n\ttab",
    "glued<|AUDIO|>text<|im_end|>more<|im_start|><|im_start|>",
    "Ünïcödé 感情 😀 ÅÄÖ ñ",
    "",
    " leading space and trailing  ",
]
REAL_QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    train_byte_level_bpe(CORPUS, directory, vocab_size=400)
    return directory


@pytest.fixture(scope="module")
def hf(hf_dir):
    return HFTokenizer(hf_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def oracles(hf_dir):
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    file = str(hf_dir / "tokenizer.json")
    return [PreTrainedTokenizerFast(tokenizer_file=file), Qwen2TokenizerFast(tokenizer_file=file)]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    train_sentencepiece(CORPUS, path, vocab_size=360)
    return path


@pytest.fixture(scope="module")
def sp(spm_path):
    return SentencePieceTokenizer(spm_path)


def _vocab_merges_dir(hf, directory, *, drop=()):
    """A snapshot without tokenizer.json: vocab.json + merges.txt + tokenizer_config.json."""
    directory.mkdir()
    hf._tok.model.save(str(directory))
    decoder = {str(hf.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
               for t in CHAT_SPECIALS if t not in drop}
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": decoder, "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>"}))
    return directory


def test_hf_specials_and_protocol(hf):
    assert isinstance(hf, Tokenizer)
    base = hf.vocab_size - len(CHAT_SPECIALS)
    assert [hf.token_to_id(t) for t in CHAT_SPECIALS] == list(range(base, hf.vocab_size))
    assert hf.eos_ids == (hf.token_to_id("<|im_end|>"), hf.token_to_id("<|endoftext|>"))
    assert hf.pad_id == hf.token_to_id("<|endoftext|>")
    assert hf.audio_token_id == hf.token_to_id("<|AUDIO|>")
    with pytest.raises(KeyError) as info:
        hf.token_to_id("<|not_there|>")
    assert isinstance(info.value, TokenNotFoundError)
    assert str(info.value) == f"{hf.path}: token '<|not_there|>' is not in the vocabulary"


@pytest.mark.parametrize("text", MIXED)
def test_hf_matches_transformers(hf, oracles, text):
    ids = hf.encode(text)
    for oracle in oracles:
        assert ids == oracle(text)["input_ids"]
        assert hf.decode(ids) == oracle.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True)
    assert hf.decode(ids) == text
    for token in CHAT_SPECIALS:
        assert ids.count(hf.token_to_id(token)) == text.count(token)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TOKENS)), max_size=8).map("".join))
def test_hf_property_matches_transformers(hf, oracles, text):
    ids = hf.encode(text)
    assert ids == oracles[1](text)["input_ids"]
    assert hf.decode(ids) == unicodedata.normalize("NFC", text)  # Qwen2 normalises to NFC


def test_hf_skip_special_tokens_keeps_esr_tags(hf):
    ids = hf.encode("<|im_start|>assistant\n<think>x</think><answer>sad</answer><|im_end|>")
    assert hf.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think><answer>sad</answer>"


def test_hf_from_vocab_and_merges_matches_transformers(hf, tmp_path):
    from transformers import Qwen2Tokenizer

    directory = _vocab_merges_dir(hf, tmp_path / "snapshot")
    rebuilt = load_tokenizer(directory)
    oracle = Qwen2Tokenizer.from_pretrained(str(directory))
    assert isinstance(rebuilt, HFTokenizer) and rebuilt.vocab_size == hf.vocab_size
    for text in MIXED:
        assert rebuilt.encode(text) == hf.encode(text) == oracle(text)["input_ids"]
        assert rebuilt.decode(hf.encode(text), skip_special_tokens=True) == oracle.decode(
            hf.encode(text), skip_special_tokens=True)
    assert (rebuilt.eos_ids, rebuilt.pad_id, rebuilt.audio_token_id) == (hf.eos_ids, hf.pad_id, hf.audio_token_id)


def test_hf_pad_token_from_config(hf_dir, tmp_path):
    directory = tmp_path / "pad"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (directory / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|im_end|>"}}))
    tok = HFTokenizer(directory)
    assert tok.pad_id == tok.token_to_id("<|im_end|>")


def test_hf_errors(hf, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        HFTokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"{bad}: not a valid tokenizer.json"):
        HFTokenizer(bad)
    no_audio = tmp_path / "no_audio"
    specials = tuple(t for t in CHAT_SPECIALS if t != "<|AUDIO|>")
    with pytest.raises(ValueError, match=rf"{no_audio}/tokenizer.json: required special token '<\|AUDIO\|>' is not"):
        train_byte_level_bpe(CORPUS, no_audio, vocab_size=300, special_tokens=specials)
    gap = _vocab_merges_dir(hf, tmp_path / "gap", drop=("<|im_start|>",))
    with pytest.raises(ValueError, match=r"added token '<\|im_end\|>' should have id \d+ but gets \d+"):
        HFTokenizer(gap)
    (gap / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer_config.json: vocab.json \\+ merges.txt need this file"):
        HFTokenizer(gap)


def test_sentencepiece_training_is_deterministic(spm_path, tmp_path):
    again = train_sentencepiece(CORPUS, tmp_path / "again.model", vocab_size=360)
    assert again.path.read_bytes() == spm_path.read_bytes()


def test_sentencepiece_specials_are_atomic(sp):
    assert isinstance(sp, Tokenizer) and sp.vocab_size == 360
    assert [sp.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(1, len(SPECIAL_TOKENS) + 1))
    for token in SPECIAL_TOKENS:
        assert sp.encode(token) == [sp.token_to_id(token)]
        ids = sp.encode(f"x{token}{token}y z")
        assert ids.count(sp.token_to_id(token)) == 2
    assert sp.eos_ids == (3, 1) and sp.pad_id == 1 and sp.audio_token_id == 4


@pytest.mark.parametrize("text", MIXED)
def test_sentencepiece_round_trip(sp, text):
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    expected = text
    for token in CHAT_SPECIALS:
        expected = expected.replace(token, "")
    assert sp.decode(ids, skip_special_tokens=True) == expected  # ESR tags stay


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(st.characters(exclude_characters="\u2581"), max_size=12),
                          st.sampled_from(SPECIAL_TOKENS)), max_size=8).map("".join))
def test_sentencepiece_property_round_trip(sp, text):
    # U+2581 is SentencePiece's own space marker: it decodes to " ", the one character that does not round-trip.
    assert sp.decode(sp.encode(text)) == text


def test_sentencepiece_errors(sp, tmp_path):
    with pytest.raises(ValueError, match="SentencePiece training failed"):
        train_sentencepiece(CORPUS, tmp_path / "small.model", vocab_size=100)
    with pytest.raises(ValueError, match=r"must include the chat/audio specials; missing \['<\|im_start"):
        train_sentencepiece(CORPUS, tmp_path / "x.model", vocab_size=360, special_tokens=("<|endoftext|>",))
    with pytest.raises(TokenizerError, match="missing.model: SentencePiece model file not found"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model: not a valid SentencePiece model"):
        SentencePieceTokenizer(junk)
    with pytest.raises(KeyError, match="is not a single piece"):
        sp.token_to_id("<|nope|>")
    import sentencepiece as spm

    control = tmp_path / "control.model"  # specials as control symbols: never matched in text
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(control.with_suffix("")),
                                   vocab_size=360, model_type="bpe", control_symbols=list(CHAT_SPECIALS),
                                   byte_fallback=True, num_threads=1, minloglevel=2)
    with pytest.raises(ValueError, match=r"control.model: special token '<\|endoftext\|>' is not a user-defined"):
        SentencePieceTokenizer(control)
    chat_only = train_sentencepiece(CORPUS, tmp_path / "chat.model", vocab_size=360, special_tokens=CHAT_SPECIALS)
    assert len(chat_only.encode("<think>")) > 1 and ESR_TAGS[0] not in CHAT_SPECIALS


def test_load_tokenizer_dispatch(spm_path, hf_dir, tmp_path):
    assert isinstance(load_tokenizer(spm_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(spm_path.parent), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(load_tokenizer(hf_dir / "tokenizer.json"), HFTokenizer)
    with pytest.raises(TokenizerError, match="expected tokenizer.json, vocab.json \\+ merges.txt, or one"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="nowhere: tokenizer file or directory not found"):
        load_tokenizer(tmp_path / "nowhere")
