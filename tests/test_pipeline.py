"""The grain input pipeline on synthesized wav clips: batch layout, prompts, bucketing, determinism, resuming,
host sharding and bad clips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
from audio_fixtures import synth_voice, write_audio

from emorl_jax.audio.features import log_mel, num_audio_embeddings
from emorl_jax.audio.io import AudioError, load_audio
from emorl_jax.data.corpora.base import Utterance
from emorl_jax.data.manifest import write_manifest
from emorl_jax.data.pipeline import ResumableIterator, make_dataset
from emorl_jax.text.prompts import MODES, build_prompt, encode_prompt, format_target, instruction
from emorl_jax.text.tokenizer import train_sentencepiece

LABELS = ("neutral", "happy", "sad", "angry")
TINY = (80, 4.0)  # tiny model's audio window: 80 mels x 4 s
# Clip durations (s) at 16 kHz; the 5.0 s clip overruns the 4 s window.
SECONDS = (0.25, 3.6, 0.9, 2.2, 0.5, 5.0, 1.4, 3.1, 0.7, 2.7, 1.9, 0.35, 1.1, 2.4)
MULTIPLE = 16


def _target(utt: Utterance) -> str:
    return format_target(utt.label, "eur", think=f"clip {utt.utt_id} sounds {utt.label}")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Utterance]:
    root = tmp_path_factory.mktemp("clips")
    records = []
    for i, seconds in enumerate(SECONDS):
        path = write_audio(root / f"clip{i:02d}.wav", synth_voice(seconds, seed=i, f0=110.0 + 9 * i), 16000)
        records.append(Utterance(f"clip{i:02d}", str(path), LABELS[i % 4], f"spk{i % 3}", "train", "test"))
    return records


@pytest.fixture(scope="module")
def bad_clip(tmp_path_factory) -> Utterance:
    path = tmp_path_factory.mktemp("bad") / "broken.wav"
    path.write_bytes(b"RIFF" + np.random.default_rng(0).bytes(2000))
    return Utterance("broken", str(path), "sad", "spk9", "train", "test")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [build_prompt(instruction(m, LABELS), num_audio_tokens=[1]) for m in MODES]
    texts += [format_target(label, "eur", think=f"clip clip07 sounds {label}") for label in LABELS]
    return train_sentencepiece(texts * 3, tmp_path_factory.mktemp("tok") / "sp.model", vocab_size=400)


def _dataset(records, tok, **kw):
    options = dict(tokenizer=tok, labels=LABELS, mode="esr", batch_size=4, audio_window=TINY, seed=0,
                   bucket_multiple=MULTIPLE, shard_index=0, shard_count=1)
    return make_dataset(records, **{**options, **kw})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _embeddings_oracle(path: str, window_seconds: float) -> int:
    """Audio embeddings of a 16 kHz file: valid frames ceil(min(samples, window) / 160) (WhisperFeatureExtractor's
    attention mask), then transformers' Qwen2AudioEncoder._get_feat_extract_output_lengths."""
    frames = math.ceil(min(sf.info(path).frames, int(window_seconds * 16000)) / 160)
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def test_eval_batches_hold_every_utterance_once_in_order(clips, tok):
    batches = list(_dataset(clips, tok))
    assert [len(b["label"]) for b in batches] == [4, 4, 4, 2]
    assert [u for b in batches for u in b["utt_id"]] == [u.utt_id for u in clips]


def test_batch_layout_prompts_and_features(clips, tok):
    by_id = {u.utt_id: u for u in clips}
    batches = list(_dataset(clips, tok))
    for batch in batches:
        b, t = batch["prompt_ids"].shape
        assert {k: v.dtype for k, v in batch.items() if k != "utt_id"} == {
            "prompt_ids": np.int32, "prompt_mask": np.int32, "input_features": np.float32,
            "feature_mask": np.int32, "label": np.int32}
        assert batch["utt_id"].dtype.kind == "U"
        assert batch["prompt_mask"].shape == (b, t) and batch["label"].shape == (b,)
        # the encoder's frames follow the prompt bucket: the most a prompt of t tokens can need (4 frames per
        # audio embedding + the 2 its conv stem reads past a clip), at most the 400-frame window
        overhead = len(encode_prompt(tok, "esr", LABELS, [1])) - 1
        frames = min(400, 4 * (t - overhead) + 4)
        assert batch["input_features"].shape == (b, 80, frames) and batch["feature_mask"].shape == (b, frames)
        assert frames == 400 or frames >= batch["feature_mask"].sum(1).max() + 2
        lengths = batch["prompt_mask"].sum(1)
        assert t % MULTIPLE == 0 and t - MULTIPLE < lengths.max() <= t
        for row, utt_id in enumerate(batch["utt_id"]):
            utt, n = by_id[utt_id], lengths[row]
            mask, ids = batch["prompt_mask"][row], batch["prompt_ids"][row]
            np.testing.assert_array_equal(mask, np.r_[np.zeros(t - n), np.ones(n)])  # left padded
            assert np.all(ids[: t - n] == tok.pad_id)
            emb = _embeddings_oracle(utt.path, 4.0)
            assert int(np.sum(ids == tok.audio_token_id)) == emb
            assert ids[t - n:].tolist() == encode_prompt(tok, "esr", LABELS, [emb])
            features, feature_mask = log_mel(load_audio(utt.path), n_mels=80, chunk_seconds=4.0)
            np.testing.assert_array_equal(batch["input_features"][row], features[:, :frames])
            np.testing.assert_array_equal(batch["feature_mask"][row], feature_mask[:frames])
            assert feature_mask[frames:].sum() == 0  # no valid frame dropped
            assert batch["label"][row] == LABELS.index(utt.label)
    long_row = [u for b in batches for u in b["utt_id"]].index("clip05")  # 5 s clip: truncated to 4 s
    assert _embeddings_oracle(clips[5].path, 4.0) == 100
    assert batches[long_row // 4]["feature_mask"][long_row % 4].sum() == 400


def test_qwen2_audio_window(clips, tok):
    batch = next(iter(_dataset(clips[5:7], tok, audio_window=(128, 30.0), batch_size=2)))
    t, overhead = batch["prompt_ids"].shape[1], len(encode_prompt(tok, "esr", LABELS, [1])) - 1
    frames = 4 * (t - overhead) + 4  # the first frames of the 30 s window a prompt of t tokens can need
    assert 502 <= frames < 3000
    assert batch["input_features"].shape == (2, 128, frames) and batch["feature_mask"].shape == (2, frames)
    assert batch["feature_mask"].sum(1).tolist() == [500, 140]  # 5.0 s and 1.4 s, nothing truncated
    counts = (batch["prompt_ids"] == tok.audio_token_id).sum(1)
    assert counts.tolist() == [_embeddings_oracle(u.path, 30.0) for u in clips[5:7]] == [125, 35]


def test_sft_targets_right_padded(clips, tok):
    for batch in _dataset(clips, tok, target_fn=_target):
        n = batch["target_ids"].shape[1]
        assert n % MULTIPLE == 0 and batch["target_ids"].dtype == batch["target_mask"].dtype == np.int32
        for row, utt_id in enumerate(batch["utt_id"]):
            expected = tok.encode(_target(next(u for u in clips if u.utt_id == utt_id)))
            k = len(expected)
            assert batch["target_ids"][row, :k].tolist() == expected
            assert np.all(batch["target_ids"][row, k:] == tok.pad_id)
            np.testing.assert_array_equal(batch["target_mask"][row], np.r_[np.ones(k), np.zeros(n - k)])


def test_length_buckets_and_epochs(clips, tok):
    # 12 clips, windows of 2 batches of 3: two windows per epoch.
    ds = _dataset(clips[:12], tok, batch_size=3, shuffle=True, seed=5, bucket_window=2, num_epochs=2,
                  drop_remainder=True)
    batches = list(ds)
    assert len(batches) == 8 and all(len(b["label"]) == 3 for b in batches)
    epochs = [[u for b in batches[e * 4:(e + 1) * 4] for u in b["utt_id"]] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == [u.utt_id for u in clips[:12]]
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    for w in range(4):  # each window is split by prompt length: one batch's prompts are all shorter
        a, b = (batches[2 * w + i]["prompt_mask"].sum(1) for i in range(2))
        assert a.max() <= b.min() or b.max() <= a.min()
    unsorted = _dataset(clips[:12], tok, batch_size=3, shuffle=True, seed=5, bucket_window=1, num_epochs=1)
    lengths = [b["prompt_mask"].sum(1) for b in unsorted]
    assert any(x.max() > y.min() and y.max() > x.min() for x in lengths for y in lengths if x is not y)


def test_same_seed_same_batches(clips, tok):
    def first(seed):
        return _take(iter(_dataset(clips, tok, shuffle=True, seed=seed, num_epochs=None, target_fn=_target)), 5)

    a, b, c = first(3), first(3), first(4)
    _assert_same_batches(a, b)
    assert [list(x["utt_id"]) for x in a] != [list(x["utt_id"]) for x in c]


@pytest.mark.parametrize("taken", [0, 1, 2, 5])
def test_restored_state_gives_the_next_batches(clips, tok, taken):
    def dataset():
        return _dataset(clips, tok, batch_size=3, shuffle=True, seed=1, bucket_window=2, num_epochs=None,
                        drop_remainder=True)

    reference = _take(iter(dataset()), 9)
    first = ResumableIterator(dataset())
    _take(first, taken)
    state = first.get_state_json()
    json.loads(state)  # plain JSON
    resumed = ResumableIterator(dataset(), state)
    _assert_same_batches(_take(resumed, 9 - taken), reference[taken:])


def test_worker_processes_give_the_same_batches_and_portable_state(clips, tok):
    def dataset(workers):
        return _dataset(clips, tok, batch_size=3, shuffle=True, seed=2, bucket_window=2, num_epochs=None,
                        worker_count=workers)

    reference = _take(iter(dataset(0)), 6)
    it = ResumableIterator(dataset(1))
    try:
        _assert_same_batches(_take(it, 3), reference[:3])
        state = it.get_state_json()
    finally:
        it.close()
    _assert_same_batches(_take(ResumableIterator(dataset(0), state), 3), reference[3:])


def test_two_hosts_read_disjoint_halves(clips, tok):
    hosts = [[u for b in _dataset(clips, tok, shard_index=i, shard_count=2) for u in b["utt_id"]] for i in (0, 1)]
    assert hosts == [[u.utt_id for u in clips[:7]], [u.utt_id for u in clips[7:]]]
    shuffled = [{u for b in _take(iter(_dataset(clips, tok, shard_index=i, shard_count=2, batch_size=7,
                                                 shuffle=True, bucket_window=1, num_epochs=None)), 1)
                 for u in b["utt_id"]} for i in (0, 1)]
    assert shuffled == [set(hosts[0]), set(hosts[1])]
    with pytest.raises(ValueError, match="shard 0 of 2 of a source of 1 records is empty"):
        _dataset(clips[:1], tok, shard_index=0, shard_count=2)


def test_bad_clip_raises_naming_the_file(clips, tok, bad_clip):
    with pytest.raises(AudioError, match=r"broken\.wav: "):
        list(_dataset([*clips[:5], bad_clip, *clips[5:]], tok))


def test_skip_bad_clips_counts_them(clips, tok, bad_clip):
    records = [*clips[:5], bad_clip, *clips[5:]]  # windows of 4: the second holds clip04, broken, clip05, clip06

    def iterator(state=None):
        return ResumableIterator(_dataset(records, tok, skip_bad_clips=True, max_seconds=4.5), state)

    it = iterator()
    batches = [next(it)]
    before = it.get_state()
    batches.append(next(it))
    assert list(batches[1]["utt_id"]) == ["clip04", "clip06"]  # a short batch where clips were skipped
    assert it.num_skipped == 2
    after = it.get_state()
    batches += list(it)
    ids = [u for b in batches for u in b["utt_id"]]
    assert ids == [u.utt_id for u in clips if u.utt_id != "clip05"]  # the 5 s clip is over max_seconds
    assert it.num_skipped == 2 and set(it.skipped) == {"broken", "clip05"}
    assert "broken.wav: unreadable or corrupt audio file" in it.skipped["broken"]
    assert "clip05.wav: too long: 5.000 s > max_seconds=4.5 s" in it.skipped["clip05"]
    for state, taken, counted in ((before, 1, 0), (after, 2, 2)):
        resumed = iterator(state)
        assert resumed.num_skipped == counted
        _assert_same_batches(list(resumed), batches[taken:])
        assert resumed.num_skipped == 2  # each skip counted once


def test_manifest_source_equals_records(clips, tok, tmp_path):
    path = write_manifest(tmp_path / "manifest.jsonl", clips)
    _assert_same_batches(list(_dataset(str(path), tok)), list(_dataset(clips, tok)))


def test_bad_arguments(clips, tok):
    odd = Utterance("odd", clips[0].path, "surprise", "spk0", "train", "test")
    with pytest.raises(ValueError, match=r"odd \(.*clip00\.wav\): label 'surprise' is not in the label set"):
        _dataset([*clips, odd], tok)
    with pytest.raises(TypeError, match="source must be a sequence of Utterance"):
        _dataset(42, tok)
    with pytest.raises(ValueError, match="num_epochs must be >= 1 or None"):
        _dataset(clips, tok, num_epochs=0)
    with pytest.raises(ValueError, match="unknown prompting mode 'cot'"):
        _dataset(clips, tok, mode="cot")


def _prompt_lengths(clips, tok, window_seconds=4.0) -> dict[str, int]:
    return {u.utt_id: len(encode_prompt(tok, "esr", LABELS, [_embeddings_oracle(u.path, window_seconds)]))
            for u in clips}


def test_prompts_padded_to_the_smallest_length_bucket(clips, tok):
    lengths = _prompt_lengths(clips, tok)
    plain = list(_dataset(clips, tok, target_fn=_target, batch_size=2))
    short = min(max(lengths[u] for u in b["utt_id"]) for b in plain)  # the shortest batch's longest prompt
    longest = max(lengths.values())
    buckets = (longest + 3, short)  # any order; neither a multiple of bucket_multiple
    bucketed = list(_dataset(clips, tok, target_fn=_target, batch_size=2, length_buckets=buckets))
    assert len(plain) == len(bucketed)
    widths = set()
    for a, b in zip(plain, bucketed):
        need = max(lengths[u] for u in b["utt_id"])
        t = b["prompt_ids"].shape[1]
        assert t == (short if need <= short else longest + 3)
        widths.add(t)
        n = b["prompt_mask"].sum(1)
        np.testing.assert_array_equal(n, a["prompt_mask"].sum(1))
        for row, k in enumerate(n):  # the same prompt, left-padded to the bucket
            assert b["prompt_ids"][row, t - k:].tolist() == a["prompt_ids"][row, -k:].tolist()
            assert np.all(b["prompt_ids"][row, :t - k] == tok.pad_id) and b["prompt_mask"][row, :t - k].sum() == 0
        frames = min(a["feature_mask"].shape[1], b["feature_mask"].shape[1])  # each follows its prompt length
        for key in ("input_features", "feature_mask"):
            np.testing.assert_array_equal(a[key][..., :frames], b[key][..., :frames], err_msg=key)
        assert a["feature_mask"][:, frames:].sum() == b["feature_mask"][:, frames:].sum() == 0
        for key in ("label", "utt_id", "target_ids", "target_mask"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # SFT targets still round to the multiple
        assert b["target_ids"].shape[1] % MULTIPLE == 0
    assert widths == {short, longest + 3}


def test_prompt_longer_than_the_largest_bucket_names_the_clip(clips, tok):
    lengths = _prompt_lengths(clips, tok)
    longest = max(lengths, key=lengths.get)
    assert longest == "clip05"  # the 5 s clip fills the 4 s window
    bucket = lengths["clip05"] - 1
    with pytest.raises(ValueError, match=rf"clip05 \(.*clip05\.wav\): its prompt has {lengths['clip05']} tokens, "
                                         rf"more than the largest length bucket {bucket}"):
        list(_dataset(clips, tok, length_buckets=(64, bucket)))
    with pytest.raises(ValueError, match="length_buckets must be positive"):
        _dataset(clips, tok, length_buckets=(0, 256))


def test_run_data_reads_the_global_batches_on_every_process(clips, tok, monkeypatch):
    """RunData's pipelines ignore the process index/count: every process gets the same global batches."""
    from emorl_jax.run_setup import RunData

    def data(buckets=()):
        return RunData(labels=LABELS, train=list(clips), eval=list(clips),
                       targets={u.utt_id: _target(u) for u in clips}, mode="esr", audio_window=TINY,
                       bucket_multiple=MULTIPLE, skip_bad_clips=False, worker_count=0, max_seconds=0.0,
                       length_buckets=buckets)

    def read(d):
        it = d.train_iterator(tok, 3, seed=4, with_targets=True)
        return list(d.eval_batches(tok, 4)) + _take(it, 4)

    single = read(data())
    assert [u for b in single[:4] for u in b["utt_id"]] == [u.utt_id for u in clips]
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    _assert_same_batches(read(data()), single)
    wide = read(data((512,)))
    assert all(b["prompt_ids"].shape[1] == 512 for b in wide)


@pytest.mark.parametrize("labels", ["meld", "iemocap4"])
def test_7b_length_bucket_holds_a_full_30s_prompt(labels):
    """The 7B config's largest bucket holds the prompt of a 30 s clip (750 <|AUDIO|>) in Qwen2 tokens: special
    tokens count one each; the rest is at least one token per Qwen2 pre-tokenizer piece and (a generous upper
    bound) one per letter piece of up to 6 letters, two for longer words, and one per byte of punctuation."""
    import regex

    from emorl_jax.config import qwen2_audio_7b_run_config
    from emorl_jax.data import emotions
    from emorl_jax.text.tokenizer import CHAT_SPECIALS, QWEN2_PRETOKENIZE_REGEX

    buckets = qwen2_audio_7b_run_config().data.length_buckets
    assert all(b % 128 == 0 for b in buckets)
    prompt = build_prompt(instruction("esr", emotions.label_set(labels)), num_audio_tokens=[750])
    specials = regex.compile("|".join(regex.escape(t) for t in CHAT_SPECIALS))
    n_special = len(specials.findall(prompt))
    pieces = [p for text in specials.split(prompt) for p in regex.findall(QWEN2_PRETOKENIZE_REGEX, text)]
    letters = [p for p in pieces if regex.search(r"\p{L}", p)]
    lower = n_special + len(pieces)
    upper = n_special + sum(1 if len(p.strip()) <= 6 else 2 for p in letters) + sum(
        len(p.encode()) for p in pieces if p not in letters)
    assert n_special == 757 and 896 < lower <= upper <= max(buckets), (lower, upper)
    # the short bucket holds a 6.5 s clip (162 audio embeddings) even at the upper count
    assert upper - 750 + num_audio_embeddings(650) <= min(buckets) < lower - 750 + num_audio_embeddings(1000)
