"""Tokenizers: one `Tokenizer` protocol, a SentencePiece backend (tiny models) and a Hugging Face backend.

Every backend turns the chat/audio special tokens written in the text (`<|im_start|>`, `<|AUDIO|>`, ...)
into their single ids, so prompts are plain strings (see `emorl_jax.text.prompts`).

- `HFTokenizer`: Qwen2's byte-level BPE from a `tokenizer.json` (what Qwen/Qwen2-Audio-7B-Instruct ships,
  with `vocab.json` + `merges.txt` + `tokenizer_config.json` beside it), or from `vocab.json` + `merges.txt`
  (snapshots without tokenizer.json), rebuilt with Qwen2's normalizer / pre-tokenizer / decoder and the
  added tokens of `tokenizer_config.json` (`added_tokens_decoder`).
- `SentencePieceTokenizer`: a small SentencePiece model trained by `train_sentencepiece`. Our choice for
  tiny models: the ESR tags (`<think>`, `<answer>`, ...) are single pieces there too, so a tiny model emits
  a tag in one step; with the real Qwen tokenizer they are ordinary text of several tokens.
- `train_byte_level_bpe`: a small tokenizer with exactly Qwen2's pipeline (tests, tiny models that want the
  Qwen code path).

Decoding with `skip_special_tokens=True` drops the chat/audio specials only; the ESR tags stay in the text,
since the rewards parse them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from emorl_jax import hub
from emorl_jax.errors import TokenizerError

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"
# Qwen2-Audio's chat and audio specials, in Qwen2-Audio's id order (151643 ... 151648).
CHAT_SPECIALS = (ENDOFTEXT, IM_START, IM_END, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)
ESR_TAGS = ("<think>", "</think>", "<content>", "</content>", "<acoustics>", "</acoustics>",
            "<summary>", "</summary>", "<answer>", "</answer>")
SPECIAL_TOKENS = CHAT_SPECIALS + ESR_TAGS  # single pieces in our SentencePiece models

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer, tokenizer.json of Qwen2 checkpoints).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


class TokenNotFoundError(KeyError):
    """A token is not in the vocabulary (str() is the plain message, unlike KeyError's repr)."""

    def __str__(self) -> str:
        return str(self.args[0])


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> ids. `eos_ids` end a completion (Qwen2-Audio: `<|im_end|>`, `<|endoftext|>`)."""

    vocab_size: int
    eos_ids: tuple[int, ...]
    pad_id: int
    audio_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str: ...

    def token_to_id(self, token: str) -> int: ...


def _special_ids(tok: Tokenizer, source: Path, pad_token: str) -> None:
    """Set eos_ids / pad_id / audio_token_id on `tok`; a missing required token names `source`."""
    ids = {}
    for token in dict.fromkeys((*CHAT_SPECIALS, pad_token)):
        try:
            ids[token] = tok.token_to_id(token)
        except TokenNotFoundError:
            raise TokenizerError(f"{source}: required special token {token!r} is not in the vocabulary") from None
    tok.eos_ids = (ids[IM_END], ids[ENDOFTEXT])
    tok.pad_id = ids[pad_token]
    tok.audio_token_id = ids[AUDIO_TOKEN]


def _ids(ids: Iterable[int]) -> list[int]:
    return [int(i) for i in ids]


class SentencePieceTokenizer:
    """A SentencePiece model whose chat/audio specials are user-defined (atomic) pieces; pad = `<|endoftext|>`."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: SentencePiece model file not found")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with its own text
            raise TokenizerError(f"{self.path}: not a valid SentencePiece model ({e})") from e
        self.vocab_size = self._sp.get_piece_size()
        _special_ids(self, self.path, ENDOFTEXT)
        self._skip = frozenset(self.token_to_id(t) for t in CHAT_SPECIALS)
        for token in CHAT_SPECIALS:
            if self.encode(token) != [self.token_to_id(token)]:
                raise TokenizerError(f"{self.path}: special token {token!r} is not a user-defined piece, so text "
                                 "does not encode it as its single id")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        ids = _ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skip]
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int:
        i = self._sp.piece_to_id(token)
        if self._sp.id_to_piece(i) != token:  # unknown pieces map to the unk id
            raise TokenNotFoundError(f"{self.path}: token {token!r} is not a single piece of the vocabulary")
        return i


def train_sentencepiece(texts: Iterable[str], out_path: str | Path, *, vocab_size: int,
                        special_tokens: Sequence[str] = SPECIAL_TOKENS) -> SentencePieceTokenizer:
    """Train a BPE SentencePiece model on in-memory `texts`, write it to `out_path`, and load it.

    `special_tokens` become user-defined pieces (each always one id, matched anywhere in the text; they
    take ids 1..len(special_tokens), 0 is unk). Byte fallback (256 byte pieces) encodes any text, and the
    identity normalisation without dummy prefix or whitespace folding makes decode(encode(t)) == t (for text
    without U+2581, SentencePiece's own space marker, which decodes to a space). `vocab_size` is an upper
    bound: a text too small to fill it gets fewer pieces instead of an error.
    Single-threaded without sampling, so the same input gives the same model bytes.
    """
    import sentencepiece as spm

    out_path = Path(out_path)
    texts = list(texts)
    missing = [t for t in CHAT_SPECIALS if t not in special_tokens]
    if missing:
        raise ValueError(f"{out_path}: special_tokens must include the chat/audio specials; missing {missing}")
    if not texts:
        raise ValueError(f"{out_path}: no training text given")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            user_defined_symbols=list(special_tokens), byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, max_sentence_length=1 << 20, minloglevel=2, hard_vocab_limit=False)
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars" / "too high"
        raise TokenizerError(f"{out_path}: SentencePiece training failed: {e}") from e
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(out_path)


def _qwen2_pipeline(tok):
    """Give a `tokenizers.Tokenizer` Qwen2's normalizer, pre-tokenizer and decoder (as transformers builds it)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read JSON ({e})") from e


def _token_content(value) -> str | None:
    """A token entry of tokenizer_config.json / special_tokens_map.json: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _added_tokens(directory: Path) -> list[tuple[int, dict]]:
    """(id, AddedToken fields) from tokenizer_config.json's `added_tokens_decoder`, sorted by id."""
    config = directory / "tokenizer_config.json"
    cfg = _read_json(config) if config.is_file() else {}
    if "added_tokens_decoder" not in cfg:
        raise TokenizerError(f"{config}: vocab.json + merges.txt need this file with `added_tokens_decoder` "
                         "(the special tokens and their ids)")
    return sorted((int(i), dict(v)) for i, v in cfg["added_tokens_decoder"].items())


def _from_vocab_merges(directory: Path):
    """Rebuild Qwen2's fast tokenizer from vocab.json + merges.txt + the added tokens beside them."""
    from tokenizers import AddedToken, Tokenizer as HFTok
    from tokenizers.models import BPE

    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    try:
        tok = _qwen2_pipeline(HFTok(BPE.from_file(str(vocab), str(merges))))
    except Exception as e:
        raise TokenizerError(f"{directory}: cannot build a BPE tokenizer from vocab.json + merges.txt ({e})") from e
    fields = ("single_word", "lstrip", "rstrip", "normalized", "special")
    entries = [(i, e) for i, e in _added_tokens(directory) if tok.token_to_id(e["content"]) != i]
    tok.add_tokens([AddedToken(e["content"], **{k: bool(e[k]) for k in fields if k in e}) for _, e in entries])
    for expected, entry in entries:
        if (got := tok.token_to_id(entry["content"])) != expected:
            raise TokenizerError(f"{directory}: added token {entry['content']!r} should have id {expected} but gets "
                             f"{got} (added ids must continue vocab.json without gaps)")
    return tok


class HFTokenizer:
    """Hugging Face `tokenizers` backend (Qwen2 byte-level BPE).

    `path`: a tokenizer.json file, or a directory with tokenizer.json or vocab.json + merges.txt.
    The pad token comes from tokenizer_config.json / special_tokens_map.json beside it when present,
    else `<|endoftext|>` (Qwen2's). `vocab_size` counts the added tokens; a model's embedding table may be
    larger (Qwen2-Audio-7B-Instruct: 156032 rows).
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTok

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = directory / "tokenizer.json" if path.is_dir() else path
        if file.is_file():
            try:
                self._tok = HFTok.from_file(str(file))
            except Exception as e:
                raise TokenizerError(f"{file}: not a valid tokenizer.json ({e})") from e
            self.path = file
        elif path.is_dir() and (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            self._tok, self.path = _from_vocab_merges(directory), directory
        else:
            raise TokenizerError(f"{path}: no tokenizer.json (nor vocab.json + merges.txt) found")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        _special_ids(self, self.path, self._pad_token(directory))

    @staticmethod
    def _pad_token(directory: Path) -> str:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (f := directory / name).is_file() and (pad := _token_content(_read_json(f).get("pad_token"))):
                return pad
        return ENDOFTEXT

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenNotFoundError(f"{self.path}: token {token!r} is not in the vocabulary")
        return i


def train_byte_level_bpe(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int,
                         special_tokens: Sequence[str] = CHAT_SPECIALS) -> HFTokenizer:
    """Train a byte-level BPE with Qwen2's exact pipeline; write `out_dir/tokenizer.json` and load it.

    The 256 byte symbols are always in the vocabulary, so any text encodes. `special_tokens` are added
    after the learned vocabulary, as Qwen2 does (marked special: dropped by skip_special_tokens).
    """
    from tokenizers import AddedToken, Tokenizer as HFTok, pre_tokenizers, trainers
    from tokenizers.models import BPE

    out_dir = Path(out_dir)
    tok = _qwen2_pipeline(HFTok(BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return HFTokenizer(out_dir / "tokenizer.json")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Pick the backend by file: `*.model` → SentencePiece; tokenizer.json / vocab.json + merges.txt → HF.

    `path`: a file, a directory, or a Hub id `org/name[@revision]` (its tokenizer files are fetched into the
    Hugging Face cache, see `emorl_jax.hub`). A directory is searched for tokenizer.json, then vocab.json +
    merges.txt, then a single `*.model`. Raises `TokenizerError` for a missing or invalid tokenizer.
    """
    path = Path(hub.resolve(path, what="tokenizer"))
    if path.is_file():
        return SentencePieceTokenizer(path) if path.suffix == ".model" else HFTokenizer(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: tokenizer file or directory not found")
    if (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
        return HFTokenizer(path)
    models = sorted(path.glob("*.model"))
    if len(models) == 1:
        return SentencePieceTokenizer(models[0])
    raise TokenizerError(f"{path}: expected tokenizer.json, vocab.json + merges.txt, or one *.model file; "
                            f"found {len(models)} *.model files and no tokenizer.json")
