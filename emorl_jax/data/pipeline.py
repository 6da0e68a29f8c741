"""grain input pipeline: utterances -> 16 kHz audio -> log-mel -> prompt tokens -> padded, length-bucketed batches.

Source (random access): a list of `Utterance` (audio decoded from `path` with `load_audio`), a jsonl
manifest path (`read_manifest`), or a tfds data source of `emorl_speech/<corpus>` (the stored waveform).

Stages, all but the last on a `grain.MapDataset` (so the read position is just an index):
  shard (host `shard_index` of `shard_count` takes a contiguous slice) -> shuffle(seed), reshuffled each
  epoch -> repeat(num_epochs) -> per clip: decode, log-mel of the model's audio window, prompt with the
  clip's number of audio embeddings -> windows of `bucket_window * batch_size` consecutive clips, sorted
  by prompt length and cut into batches (a seeded shuffle of the batch order when shuffling), prompts
  left-padded to a length bucket -> to_iter_dataset (threads; optional `worker_count` processes) -> one
  batch at a time.
The iterator state (`get_state`/`set_state`, JSON-serialisable) is the index of the current window, the
batches of it already taken, and the skipped-clip count; after `set_state` the next batch is exactly the
one that would have come next, whatever the worker count. Same seed, same source, same batches.

Bad clips: AudioError (its message names the file) unless `skip_bad_clips`: then the clip is left out and
counted in the iterator (`num_skipped`, `skipped`), the count is kept in its state.

Prompt lengths: with `length_buckets` (e.g. (896,)) every batch's prompts are left-padded to the smallest
bucket that holds its longest prompt, so a run compiles one program per bucket; a longer prompt is an error
naming the clip. Without, the longest prompt is rounded up to a multiple of `bucket_multiple`.

Multi-host: the trainer and the evaluator do NOT use the host sharding below (`shard_index`/`shard_count`).
Every process runs this same pipeline with shard_index=0, shard_count=1 (the same seed, shuffle, length-sorted
windows and GLOBAL batches) and feeds only its own rows to its devices (`emorl_jax.distributed.global_batch`),
so the batch at step k does not depend on the process count. The cost: every host decodes and featurizes
every clip of every global batch (not 1/num_hosts of them); host-local windows would sort different clips on
each host and break that invariance. Per clip that is the decode + 128-mel log-mel of the 30 s window + prompt:
42 ms per clip through this pipeline with 2 read threads (README "grain pipeline" row); 60 ms median for one
clip on one thread, measured on a 2-core machine shared by ~9 busy processes. A 7B GRPO step of 16 prompts thus
costs every host ~0.7-1 s of CPU, whatever the number of hosts, done ahead of the step by the prefetching
`read_threads` (or `worker_count` processes).
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import grain
import numpy as np

from emorl_jax.audio.features import SAMPLE_RATE, frames_needed, log_mel, max_frames_for, num_audio_embeddings
from emorl_jax.audio.io import AudioError, load_audio, validate_waveform
from emorl_jax.data.corpora.base import Utterance
from emorl_jax.data.manifest import read_manifest
from emorl_jax.text.prompts import encode_prompt, instruction
from emorl_jax.text.tokenizer import Tokenizer

_log = logging.getLogger(__name__)

DEFAULT_BUCKET_WINDOW = 8  # batches per length-sorting window when shuffling


class Batch(TypedDict, total=False):
    """One batch, numpy arrays with B rows (fewer in the last batch of a finite run, and, unless drop_remainder,
    where skipped clips left a window short).

    prompt_ids:     int32 [B, T] chat prompt tokens, LEFT-padded with `tokenizer.pad_id`; T is the smallest
                    of `length_buckets` >= the longest prompt, or (no buckets) the longest prompt rounded up
                    to a multiple of `bucket_multiple`.
    prompt_mask:    int32 [B, T] 1 on prompt tokens, 0 on padding.
    input_features: float32 [B, n_mels, F] log-mel of the first F frames of the audio window (100 per second):
                    F is the fewest the encoder needs for the longest clip a prompt of length T can hold
                    (`_Bucket.audio_frames`), at most the window; the full window's encoder outputs are unchanged.
    feature_mask:   int32 [B, F] 1 on frames inside the clip.
    label:          int32 [B] index of the gold emotion in `labels`.
    utt_id:         str [B] (host side only).
    target_ids:     int32 [B, N] SFT completion tokens (with `target_fn`), RIGHT-padded with `pad_id`;
                    N is a multiple of `bucket_multiple`.
    target_mask:    int32 [B, N] 1 on target tokens.
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    input_features: np.ndarray
    feature_mask: np.ndarray
    label: np.ndarray
    utt_id: np.ndarray
    target_ids: np.ndarray
    target_mask: np.ndarray


class TfdsRecords(Sequence):
    """A tfds data source of `emorl_speech/<corpus>` as (Utterance, waveform float32 [samples]) pairs.

    Utterance.path is the clip's path inside the corpus release, as stored.
    """

    def __init__(self, data_source):
        self.source = data_source
        info = data_source.dataset_info
        self.name = info.full_name
        self.label_names = tuple(info.features["label"].names)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Utterance, np.ndarray]:
        ex = self.source[index]
        text = {k: ex[k].decode() if isinstance(ex[k], bytes) else str(ex[k])
                for k in ("utt_id", "path", "speaker", "split", "corpus")}
        utt = Utterance(text["utt_id"], text["path"], self.label_names[int(ex["label"])], text["speaker"],
                        text["split"], text["corpus"])
        return utt, ex["audio"]


def as_records(source) -> Sequence:
    """The random-access records of `source`: Utterances, or (Utterance, waveform) pairs for tfds."""
    if isinstance(source, (str, os.PathLike)):
        return read_manifest(source)
    if hasattr(source, "dataset_info"):
        return TfdsRecords(source)
    if isinstance(source, Sequence) and all(isinstance(u, Utterance) for u in source):
        return source
    raise TypeError(f"source must be a sequence of Utterance, a manifest path or a tfds data source, got "
                    f"{type(source).__name__}")


class _Prepare:
    """record -> one example dict (the Batch keys, unbatched) or a (utt_id, problem) pair for a skipped clip."""

    def __init__(self, tokenizer: Tokenizer, labels: Sequence[str], mode: str, audio_window: tuple[int, float],
                 target_fn: Callable[[Utterance], str] | None, skip_bad_clips: bool, max_seconds: float | None,
                 source_name: str):
        self.tokenizer, self.labels, self.mode = tokenizer, tuple(labels), mode
        self.n_mels, self.chunk_seconds = int(audio_window[0]), float(audio_window[1])
        self.target_fn, self.skip_bad_clips, self.max_seconds = target_fn, skip_bad_clips, max_seconds
        self.source_name = source_name
        self._index = {label: i for i, label in enumerate(self.labels)}
        self._prompts: dict[int, np.ndarray] = {}  # audio embeddings -> prompt ids

    def check_label(self, utt: Utterance) -> None:
        if utt.label not in self._index:
            raise ValueError(f"{utt.utt_id} ({utt.path}): label {utt.label!r} is not in the label set {self.labels}")

    def __call__(self, record) -> dict | tuple[str, str]:
        utt, waveform = record if isinstance(record, tuple) else (record, None)
        self.check_label(utt)
        try:
            if waveform is None:
                waveform = load_audio(utt.path, sample_rate=SAMPLE_RATE, start_s=utt.start_s, end_s=utt.end_s,
                                      max_seconds=self.max_seconds)
            else:
                waveform = validate_waveform(waveform, SAMPLE_RATE, max_seconds=self.max_seconds,
                                             source=f"{self.source_name}: {utt.path} ({utt.utt_id})")
        except AudioError as err:
            if not self.skip_bad_clips:
                raise
            return utt.utt_id, str(err)
        features, feature_mask = log_mel(waveform, n_mels=self.n_mels, chunk_seconds=self.chunk_seconds)
        n_audio = num_audio_embeddings(int(feature_mask.sum()))
        if n_audio not in self._prompts:
            self._prompts[n_audio] = np.asarray(
                encode_prompt(self.tokenizer, self.mode, self.labels, [n_audio]), dtype=np.int32)
        example = {"prompt_ids": self._prompts[n_audio], "input_features": features, "feature_mask": feature_mask,
                   "label": self._index[utt.label], "utt_id": utt.utt_id, "path": utt.path}  # path: errors only
        if self.target_fn is not None:
            example["target_ids"] = np.asarray(self.tokenizer.encode(self.target_fn(utt)), dtype=np.int32)
        return example


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Bucket:
    """(window index, prepared examples) -> {"batches": [Batch], "skipped": [(utt_id, problem)]}.

    The window's examples are sorted by prompt length (stable) when it holds several batches, cut into
    batches of `batch_size` (the last one dropped if short and `drop_remainder`), and the batch order is
    shuffled with seed (seed, window index) if `shuffle`.
    """

    def __init__(self, batch_size: int, pad_id: int, bucket_multiple: int, drop_remainder: bool, shuffle: bool,
                 seed: int, length_buckets: Sequence[int], prompt_overhead: int):
        self.batch_size, self.pad_id, self.multiple = batch_size, pad_id, bucket_multiple
        self.prompt_overhead = prompt_overhead
        self.drop_remainder, self.shuffle, self.seed = drop_remainder, shuffle, seed
        self.length_buckets = tuple(sorted(int(b) for b in length_buckets))

    def prompt_length(self, examples: list[dict]) -> int:
        """The padded prompt length of a batch: its bucket, or the longest prompt rounded up to the multiple."""
        longest = max(examples, key=lambda x: len(x["prompt_ids"]))
        n = len(longest["prompt_ids"])
        if not self.length_buckets:
            return _round_up(n, self.multiple)
        for bucket in self.length_buckets:
            if n <= bucket:
                return bucket
        raise ValueError(f"{longest['utt_id']} ({longest['path']}): its prompt has {n} tokens, more "
                         f"than the largest length bucket {self.length_buckets[-1]} (data.length_buckets="
                         f"{self.length_buckets}); add a larger bucket or shorten the clip (data.max_seconds)")

    def audio_frames(self, prompt_length: int, window_frames: int) -> int:
        """The mel frames (of a `window_frames` window) kept for a batch of prompts padded to `prompt_length`:
        enough for the longest clip such a prompt can hold (`frames_needed`), so the encoder's input shape follows
        the prompt's and adds no compile."""
        most_embeddings = max(prompt_length - self.prompt_overhead, 1)
        return frames_needed(max_frames_for(most_embeddings), window_frames)

    def __call__(self, index: int, window: list) -> dict:
        examples = [x for x in window if isinstance(x, dict)]
        skipped = [x for x in window if not isinstance(x, dict)]
        if len(window) > self.batch_size:
            examples.sort(key=lambda x: len(x["prompt_ids"]))
        b = self.batch_size
        groups = [examples[i:i + b] for i in range(0, len(examples), b)]
        if groups and self.drop_remainder and len(groups[-1]) < b:
            groups.pop()
        if self.shuffle and len(groups) > 1:
            order = np.random.default_rng([self.seed, index]).permutation(len(groups))
            groups = [groups[i] for i in order]
        return {"batches": [self._collate(g) for g in groups], "skipped": skipped}

    def _collate(self, examples: list[dict]) -> Batch:
        t = self.prompt_length(examples)
        ids = np.full((len(examples), t), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(examples), t), dtype=np.int32)
        for row, x in enumerate(examples):  # left padding: prompts end where generation starts
            n = len(x["prompt_ids"])
            ids[row, t - n:], mask[row, t - n:] = x["prompt_ids"], 1
        frames = self.audio_frames(t, examples[0]["input_features"].shape[-1])
        batch = Batch(prompt_ids=ids, prompt_mask=mask,
                      input_features=np.stack([x["input_features"][:, :frames] for x in examples]),
                      feature_mask=np.stack([x["feature_mask"][:frames] for x in examples]).astype(np.int32),
                      label=np.asarray([x["label"] for x in examples], dtype=np.int32),
                      utt_id=np.asarray([x["utt_id"] for x in examples], dtype=str))
        if "target_ids" in examples[0]:
            n_max = _round_up(max(max(len(x["target_ids"]) for x in examples), 1), self.multiple)
            target = np.full((len(examples), n_max), self.pad_id, dtype=np.int32)
            target_mask = np.zeros((len(examples), n_max), dtype=np.int32)
            for row, x in enumerate(examples):
                n = len(x["target_ids"])
                target[row, :n], target_mask[row, :n] = x["target_ids"], 1
            batch["target_ids"], batch["target_mask"] = target, target_mask
        return batch


class _BatchIterator(grain.DatasetIterator):
    """Yields the batches of each window in turn.

    State: `window` (index of the window the last batch came from; -1 before the first), `next_batch` (batches
    of it already taken), the skip count. It names positions in the windows' MapDataset, so it does not
    depend on threads or worker processes: restoring reads the windows from `window` on and drops the
    batches already taken.
    """

    def __init__(self, dataset: _Batches):
        super().__init__()
        self._dataset = dataset
        self._open(0)
        self._window, self._batches, self._next = -1, [], 0
        self.num_skipped = 0
        self.skipped: dict[str, str] = {}  # utt_id -> problem (each clip once, however many epochs)

    def __next__(self) -> Batch:
        while self._next >= len(self._batches):
            window = next(self._reader[0])  # StopIteration at the end
            self._window, self._batches, self._next = self._window + 1, self._dataset.own(window), 0
            for utt_id, problem in window["skipped"]:
                _log.warning("skipped bad clip %s: %s", utt_id, problem)
                self.num_skipped += 1
                self.skipped[utt_id] = problem
        self._next += 1
        return self._batches[self._next - 1]

    def get_state(self) -> dict[str, Any]:
        return {"window": self._window, "next_batch": self._next, "num_skipped": self.num_skipped,
                "skipped": dict(self.skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        window, next_batch = int(state["window"]), int(state["next_batch"])
        self._open(max(window, 0))
        self._window, self._batches, self._next = -1, [], 0
        if window >= 0:  # re-read the current window; its skips were counted before the state was taken
            self._window, self._batches, self._next = window, self._dataset.own(next(self._reader[0])), next_batch
        self.num_skipped, self.skipped = int(state["num_skipped"]), dict(state["skipped"])

    def _open(self, start: int) -> None:
        """Read windows from index `start` on; the previous reader is closed (its threads and processes stop)."""
        if hasattr(self, "_closer"):
            self._closer()
        # Closed and released with this iterator, or at exit while modules still exist (grain's iterators
        # fail noisily when first collected during interpreter teardown).
        self._reader = [self._dataset.window_iterator(start)]
        self._closer = weakref.finalize(self, _close_reader, self._reader)

    def close(self) -> None:
        self._closer()


def _close_reader(reader: list) -> None:
    while reader:
        reader.pop().close()


class _Batches(grain.IterDataset):
    """The batches of a MapDataset of windows (each {"batches": [...], "skipped": [...]}), read with threads
    and optionally worker processes."""

    def __init__(self, windows: grain.MapDataset, read_options: grain.ReadOptions, worker_count: int):
        super().__init__(windows)
        self._windows, self._read_options, self._worker_count = windows, read_options, worker_count

    def window_iterator(self, start: int) -> grain.DatasetIterator:
        """An iterator over the windows from index `start` on."""
        ds = self._windows[start:].to_iter_dataset(self._read_options)
        if self._worker_count > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count,
                                                             per_worker_buffer_size=1))
        return iter(ds)

    def own(self, window: dict) -> list[Batch]:
        """The window's batches; copied out of the workers' shared memory (freed at once, not at exit)."""
        if self._worker_count == 0:
            return window["batches"]
        return [{k: np.array(v) for k, v in batch.items()} for batch in window["batches"]]

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self)

    def __str__(self) -> str:
        return f"BatchesIterDataset(worker_count={self._worker_count})"


def make_dataset(
    source,
    *,
    tokenizer: Tokenizer,
    labels: Sequence[str],
    mode: str,
    batch_size: int,
    audio_window: tuple[int, float] = (128, 30.0),
    seed: int = 0,
    shuffle: bool = False,
    num_epochs: int | None = 1,
    bucket_multiple: int = 32,
    bucket_window: int | None = None,
    target_fn: Callable[[Utterance], str] | None = None,
    skip_bad_clips: bool = False,
    max_seconds: float | None = None,
    drop_remainder: bool = False,
    worker_count: int = 0,
    read_threads: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
    length_buckets: Sequence[int] = (),
) -> grain.IterDataset:
    """A grain dataset of `Batch`es; `iter()` it (or wrap it in `ResumableIterator`).

    audio_window: (n_mels, chunk_seconds) of the model (tiny: (80, 4.0); Qwen2-Audio-7B: (128, 30.0)); clips
      longer than the window are truncated by the features, as Whisper does.
    num_epochs: passes over the (shard of the) source; None = forever.
    bucket_window: batches per length-sorting window; default DEFAULT_BUCKET_WINDOW when shuffling, else 1
      (batches in source order: with shuffle=False, num_epochs=1, drop_remainder=False every utterance comes
      once, in order, the last batch possibly short).
    target_fn: Utterance -> SFT completion text (tokenized into target_ids).
    max_seconds: clips longer than this are bad clips (AudioError "too long"); None = no limit.
    worker_count: grain worker processes (0 = threads of this process only).
    shard_index, shard_count: this host's contiguous slice of the source; default jax.process_index() and
      jax.process_count(). The trainer and the evaluator pass 0 and 1: every host reads the global batches
      (see the module docstring).
    length_buckets: prompt lengths to pad to (the smallest that holds a batch's longest prompt); a longer
      prompt raises ValueError naming the clip. () = round up to `bucket_multiple`. SFT targets always
      round up to `bucket_multiple`.
    """
    records = as_records(source)
    if batch_size < 1 or bucket_multiple < 1:
        raise ValueError(f"batch_size and bucket_multiple must be >= 1, got {batch_size} and {bucket_multiple}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    start, stop = len(records) * shard_index // shard_count, len(records) * (shard_index + 1) // shard_count
    if stop <= start:
        raise ValueError(f"shard {shard_index} of {shard_count} of a source of {len(records)} records is empty")
    if bucket_window is None:
        bucket_window = DEFAULT_BUCKET_WINDOW if shuffle else 1
    if any(int(b) < 1 for b in length_buckets):
        raise ValueError(f"length_buckets must be positive prompt lengths, got {tuple(length_buckets)}")

    instruction(mode, labels)  # checks mode and labels
    prepare = _Prepare(tokenizer, labels, mode, audio_window, target_fn, skip_bad_clips, max_seconds,
                       getattr(records, "name", "utterances"))
    if not isinstance(records, TfdsRecords):  # fail now, not mid-run (tfds examples are checked when read)
        for utt in records:
            prepare.check_label(utt)
    ds = grain.MapDataset.source(records)[start:stop]
    if shuffle:
        ds = ds.shuffle(seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(prepare)
    ds = ds.batch(bucket_window * batch_size, batch_fn=list)
    overhead = len(encode_prompt(tokenizer, mode, labels, [1])) - 1  # prompt tokens besides the audio slots
    ds = ds.map_with_index(_Bucket(batch_size, tokenizer.pad_id, bucket_multiple, drop_remainder, shuffle, seed,
                                   length_buckets, overhead))
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, read_threads))
    return _Batches(ds, read_options, worker_count)


class ResumableIterator:
    """An iterator over a `make_dataset` dataset whose position can be saved and restored (as JSON).

    `state` (from `get_state_json()` or `get_state()`) restores a saved position: the next batch is the one
    that would have come next. `num_skipped`/`skipped` count the bad clips left out so far.
    """

    def __init__(self, dataset: grain.IterDataset, state: str | dict | None = None):
        self._it = iter(dataset)
        if state is not None:
            self.set_state(state)

    def __iter__(self) -> ResumableIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return self._it.get_state()

    def get_state_json(self) -> str:
        return json.dumps(self._it.get_state(), sort_keys=True)

    def set_state(self, state: str | dict) -> None:
        self._it.set_state(json.loads(state) if isinstance(state, str) else state)

    @property
    def num_skipped(self) -> int:
        return self._it.num_skipped

    @property
    def skipped(self) -> dict[str, str]:
        return dict(self._it.skipped)

    def close(self) -> None:
        """Stops the worker processes, if any."""
        self._it.close()
