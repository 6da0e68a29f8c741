"""What a training or evaluation run sets up from its config: the utterances, the tokenizer, the model, and
the grain pipelines over them.

Multi-host input: every process builds the SAME pipelines (all records, same seed, GLOBAL batch sizes), so
each yields the whole global batch of every step, identical on every process, and feeds its devices only its
own rows (`emorl_jax.distributed.global_batch`). The batches therefore do not depend on the number of
processes (a 2-host run equals the 1-host run, and a checkpoint's data-iterator state restores on any host
count). The price is that every host decodes and featurizes every clip, not 1/num_hosts of them (see
`emorl_jax.data.pipeline`); the pipeline's own host sharding of records (`shard_index`) is not used.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import jax
from flax import nnx

from emorl_jax import checkpoint, hub
from emorl_jax.config import AudioLMConfig, from_config_dict
from emorl_jax.data import emotions, pipeline
from emorl_jax.data.corpora import load_corpus, synthetic
from emorl_jax.data.corpora.base import Utterance
from emorl_jax.data.manifest import read_manifest
from emorl_jax.errors import ConfigError, TokenizerError
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.paths import as_path, cache_dir, is_remote, local_copy, upload
from emorl_jax.text.prompts import build_prompt, format_target, instruction
from emorl_jax.text.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece


@dataclasses.dataclass
class RunData:
    """The run's utterances (train and held-out), label set and SFT target texts."""

    labels: tuple[str, ...]
    train: list[Utterance]
    eval: list[Utterance]
    targets: dict[str, str]  # utt_id -> SFT target completion (prompt mode's format)
    mode: str
    audio_window: tuple[int, float]  # (mel bins, seconds) of the model's audio window
    bucket_multiple: int
    skip_bad_clips: bool
    worker_count: int
    max_seconds: float
    length_buckets: tuple[int, ...] = ()  # prompt lengths batches are padded to; () = round to bucket_multiple

    def _dataset(self, records, tokenizer, batch_size, *, train: bool, seed: int, with_targets: bool):
        return pipeline.make_dataset(
            records, tokenizer=tokenizer, labels=self.labels, mode=self.mode, batch_size=batch_size,
            audio_window=self.audio_window, seed=seed, shuffle=train, num_epochs=None if train else 1,
            bucket_multiple=self.bucket_multiple, drop_remainder=train,
            target_fn=(lambda u: self.targets[u.utt_id]) if with_targets else None,
            skip_bad_clips=self.skip_bad_clips, worker_count=self.worker_count, max_seconds=self.max_seconds or None,
            length_buckets=self.length_buckets,
            shard_index=0, shard_count=1)  # every process reads the global batches (module docstring)

    def train_iterator(self, tokenizer: Tokenizer, batch_size: int, *, seed: int, with_targets: bool,
                       state: str | None = None):
        """An endless shuffled iterator; `state` (from `get_state_json()`) resumes it exactly."""
        if not self.train:
            raise ConfigError("data.train_split: this run has no training utterances")
        return pipeline.ResumableIterator(
            self._dataset(self.train, tokenizer, batch_size, train=True, seed=seed, with_targets=with_targets),
            state)

    def eval_batches(self, tokenizer: Tokenizer, batch_size: int):
        """Every held-out utterance once, in order."""
        return iter(self._dataset(self.eval, tokenizer, batch_size, train=False, seed=0, with_targets=False))


def sft_target(label: str, mode: str, description: dict[str, str] | None) -> str:
    """An SFT completion that describes what the clip sounds like (synthetic corpus: its sampled prosody)."""
    acoustics = ("; ".join(f"{k.replace('_', ' ')} {v}" for k, v in description.items()) if description
                 else "not described")
    content = "No intelligible words; only the voice carries the emotion."
    summary = f"Together these cues sound {label}."
    if mode == "ir":
        return format_target(label, mode)
    if mode == "eur":
        return format_target(label, mode, think=f"{acoustics}. {summary}")
    return format_target(label, mode, content=content, acoustics=acoustics, summary=summary)


def _records(config, workdir: str | os.PathLike) -> tuple[tuple[str, ...], list[Utterance], list[Utterance], dict]:
    d = config.data
    name = d.dataset
    labels = emotions.label_set(d.labels)
    descriptions: dict = {}
    if name == "synthetic":
        root = _synthetic_root(d, workdir)
        make_synthetic_corpus(d, root)
        records = synthetic.read(root)
        descriptions = synthetic.descriptions(root)
        train = [u for u in records if u.split == d.train_split]
        held_out = [u for u in records if u.split == d.eval_split]
    elif name == "manifest":
        records = read_manifest(d.data_dir)
        train = [u for u in records if u.split == d.train_split]
        held_out = [u for u in records if u.split == d.eval_split]
    elif name == "iemocap":
        records = load_corpus("iemocap", d.data_dir)
        test_session = f"Session{d.fold}" if d.fold else d.eval_split
        train = [u for u in records if u.split != test_session]
        held_out = [u for u in records if u.split == test_session]
    elif name == "meld":
        train = load_corpus("meld", d.data_dir, split=d.train_split)
        held_out = load_corpus("meld", d.data_dir, split=d.eval_split)
    else:  # cross-corpus sets: evaluation only, on the utterances whose emotion is in the label set
        every = load_corpus(name, d.data_dir)
        train, held_out = [], [u for u in every if u.label in labels]
        print(f"{name}: evaluating {len(held_out)} of {len(every)} utterances (labels {', '.join(labels)})")
    unknown = sorted({u.label for u in train + held_out} - set(labels))
    if unknown:
        raise ConfigError(f"data.labels={d.labels!r} has no label(s) {unknown} that {name} uses")
    return labels, train, held_out, descriptions


def make_synthetic_corpus(d, root: Path) -> None:
    """Writes the synthetic corpus the `data` config section `d` describes into `root`, unless one is there."""
    if d.synthetic_priors not in synthetic.PRIORS:
        raise ConfigError(f"data.synthetic_priors={d.synthetic_priors!r}: known priors are "
                          f"{', '.join(synthetic.PRIORS)}")
    _make_once(lambda: (root / "manifest.jsonl").exists(),
               lambda: synthetic.generate(root, n_per_class=d.synthetic_per_class, speakers=d.synthetic_speakers,
                                          seed=d.synthetic_seed, class_priors=synthetic.PRIORS[d.synthetic_priors]),
               name=f"synthetic corpus {root}")


def _synthetic_root(d, workdir: str | os.PathLike) -> Path:
    """`data.data_dir`, else `<workdir>/data`; under a remote workdir (wav files are written and read locally) a
    local cache folder named by the generator's parameters, which determine the corpus (`paths.cache_dir()`; clear
    it if the generator changes)."""
    if d.data_dir:
        if is_remote(d.data_dir):
            raise ConfigError(f"data.data_dir={d.data_dir}: the synthetic corpus is written and read on local disk; "
                             "give a local folder (or none)")
        return Path(d.data_dir)
    if not is_remote(workdir):
        return Path(workdir) / "data"
    return (cache_dir() / "synthetic"
            / f"{d.synthetic_priors}_n{d.synthetic_per_class}_s{d.synthetic_speakers}_seed{d.synthetic_seed}")


def _make_once(exists, make, *, name: str) -> None:
    """Makes a file the run derives deterministically (the synthetic corpus, a trained tokenizer) unless it
    `exists()`. With several processes, process 0 makes it first while the others wait, so that processes
    sharing a disk do not write it at once; a process that still does not see it (a host-local disk) then
    makes its own, identical copy. Every process must call it."""
    if jax.process_count() == 1:
        if not exists():
            make()
        return
    from jax.experimental import multihost_utils

    if jax.process_index() == 0 and not exists():
        make()
    multihost_utils.sync_global_devices(f"emorl_jax: {name}")
    if not exists():
        make()


def prepare_data(config, workdir: str | Path) -> RunData:
    labels, train, held_out, descriptions = _records(config, workdir)
    model = from_config_dict(config.model)
    return RunData(
        labels=labels, train=train, eval=held_out,
        targets={u.utt_id: sft_target(u.label, config.prompt_mode, descriptions.get(u.utt_id)) for u in train},
        mode=config.prompt_mode,
        audio_window=(model.audio.num_mel_bins, model.audio.num_frames / 100.0),
        bucket_multiple=config.data.bucket_multiple, skip_bad_clips=config.data.skip_bad_clips,
        worker_count=config.data.worker_count, max_seconds=config.data.max_seconds,
        length_buckets=tuple(int(b) for b in config.data.get("length_buckets", ())))


def prepare_tokenizer(config, workdir: str | Path, data: RunData) -> Tokenizer:
    """The configured tokenizer, the one of the run GRPO starts from (`sft.from_run`), or a SentencePiece model
    trained on the run's prompts and targets (saved as `<workdir>/tokenizer.model` and reused on resume)."""
    if config.tokenizer.path:
        return load_tokenizer(config.tokenizer.path)
    if config.sft.from_run:
        return load_tokenizer(local_copy(as_path(config.sft.from_run) / "tokenizer.model"))
    if config.init.hf_dir or config.init.checkpoint:
        raise ConfigError("tokenizer.path: a pretrained model needs its own tokenizer; set it (e.g. the HF snapshot "
                          "or Hub id)")
    path = as_path(workdir) / "tokenizer.model"  # remote: trained to a local file and copied (SentencePiece is local)
    texts = [build_prompt(instruction(data.mode, data.labels), num_audio_tokens=[1]), *data.targets.values(),
             *data.labels]
    _make_once(path.exists, lambda: _train_tokenizer(texts, path, config.tokenizer.vocab_size),
               name=f"tokenizer {path}")
    return load_tokenizer(local_copy(path))


def _train_tokenizer(texts: list[str], path, vocab_size: int) -> None:
    """Trains the run's SentencePiece model into `path`, through a local temporary file when `path` is remote."""
    if not is_remote(path):
        train_sentencepiece(texts, path, vocab_size=vocab_size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / path.name
        train_sentencepiece(texts, local, vocab_size=vocab_size)
        upload(local, path)


def build_model(config, tokenizer: Tokenizer, mesh: jax.sharding.Mesh) -> AudioLM:
    """From a HF snapshot, an orbax checkpoint (the tokenizer checked against its config before minutes of reading
    7B weights), or (tiny models) a random init sized to the tokenizer."""
    init = config.init
    run = dict(dtype=config.model.dtype, remat=config.model.remat, attention=config.model.attention)
    if init.hf_dir or init.checkpoint:
        check_tokenizer_fits(checkpoint.model_config(init.hf_dir or init.checkpoint), tokenizer)
    if init.hf_dir:
        model = checkpoint.from_hf(init.hf_dir, param_dtype=config.model.param_dtype, mesh=mesh, **run)
    elif init.checkpoint:
        model = checkpoint.restore(init.checkpoint, mesh=mesh, **run)
    else:
        cfg = from_config_dict(config.model)
        if cfg.text.hidden_size >= 1024:
            raise ConfigError("init: refusing to start a large model from random weights; set init.hf_dir (a HF "
                              "snapshot or Hub id, e.g. Qwen/Qwen2-Audio-7B-Instruct) or init.checkpoint (orbax, from "
                              "`python -m emorl_jax.convert`)")
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tokenizer.vocab_size),
                          audio_token_index=tokenizer.audio_token_id)
        model = AudioLM(cfg, rngs=nnx.Rngs(init.seed))
    return model


def checkpoint_tokenizer(ckpt: str | os.PathLike, explicit: str = "") -> Tokenizer:
    """`explicit` (a path or Hub id) if given, else the checkpoint's own tokenizer: tokenizer.model, tokenizer.json
    or vocab.json + merges.txt in it (a HF directory or Hub snapshot), or tokenizer.model beside it."""
    if explicit:
        return load_tokenizer(explicit)
    ckpt = as_path(hub.resolve(ckpt, what="checkpoint"))
    for candidate in (ckpt / "tokenizer.model", ckpt / "tokenizer.json", ckpt / "vocab.json",
                      ckpt.parent / "tokenizer.model"):
        if candidate.exists():
            if candidate.name == "vocab.json":
                return load_tokenizer(ckpt)  # vocab.json + merges.txt
            return load_tokenizer(local_copy(candidate))  # a gs:// checkpoint's file copied here first
    raise TokenizerError(f"{ckpt}: no tokenizer in or beside the checkpoint (tokenizer.model, tokenizer.json): "
                         "pass --tokenizer or set tokenizer.path")


def check_tokenizer_fits(cfg: AudioLMConfig, tokenizer: Tokenizer) -> None:
    """Raises TokenizerError unless the tokenizer's ids fit the model: every id has an embedding and <|AUDIO|> is
    the model's audio token (a mismatched pair decodes nothing but garbage, so fail before decoding)."""
    where = getattr(tokenizer, "path", "tokenizer")
    if tokenizer.vocab_size > cfg.text.vocab_size:
        raise TokenizerError(f"{where}: {tokenizer.vocab_size} tokens, but the model has only {cfg.text.vocab_size} "
                             "embeddings (not this model's tokenizer?)")
    if cfg.audio_token_index != tokenizer.audio_token_id:
        raise TokenizerError(f"{where}: <|AUDIO|> is id {tokenizer.audio_token_id}, but the model's "
                             f"audio_token_index is {cfg.audio_token_index} (not this model's tokenizer?)")

