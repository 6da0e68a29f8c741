"""Hugging Face Hub ids (`org/name[@revision]`) for weights and tokenizers, from a local HF cache, offline."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx
from hf_tiny import make_hf_model, save_hf

from emorl_jax import checkpoint
from emorl_jax.run_setup import checkpoint_tokenizer, hub
from emorl_jax.errors import TokenizerError, UserError
from emorl_jax.text.tokenizer import CHAT_SPECIALS, HFTokenizer, load_tokenizer, train_byte_level_bpe

REPO = "org/name"
MAIN, OTHER = "a" * 40, "b" * 40  # commit hashes: refs/main -> MAIN, refs/v1 (a tag) -> OTHER


def _add_snapshot(repo_dir: Path, commit: str, files: Path, refs: tuple[str, ...]) -> Path:
    """Lay out `files` as huggingface_hub caches them: content-addressed blobs/, snapshots/<commit>/ of
    relative symlinks into blobs/, and refs/<ref> holding the commit hash (no newline)."""
    snapshot = repo_dir / "snapshots" / commit
    for f in sorted(files.iterdir()):
        blob = repo_dir / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        (snapshot / f.name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An HF hub cache holding org/name at two commits (two different tiny random models, one tokenizer)."""
    root = tmp_path_factory.mktemp("hf_home")
    cache = root / "hub"
    snapshots = {}
    for commit, seed, refs in ((MAIN, 0, ("main",)), (OTHER, 1, ("v1",))):
        files = root / f"staging_{seed}"
        save_hf(make_hf_model(seed=seed), files)
        train_byte_level_bpe(["the speaker sounds angry", "a calm and happy voice"] * 8, files, vocab_size=300)
        snapshots[commit] = _add_snapshot(cache / "models--org--name", commit, files, refs)
    return SimpleNamespace(home=root, hub=cache, snapshots=snapshots)


def _no_network(*args, **kwargs):
    raise RuntimeError("a test tried to open a network connection")


@pytest.fixture(autouse=True)
def offline_env(cache, monkeypatch):
    """The HF variables set after huggingface_hub's import (resolve reads them per call); no sockets."""
    monkeypatch.setenv("HF_HOME", str(cache.home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache.hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _assert_same_params(a, b):
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_local_paths_and_urls_pass_through(tmp_path, monkeypatch):
    assert hub.resolve(tmp_path, what="checkpoint") == tmp_path
    assert isinstance(hub.resolve(str(tmp_path), what="tokenizer"), Path)
    url = "gs://bucket/ckpt"
    assert hub.resolve(url, what="checkpoint") is url
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # a local directory wins over the Hub id spelled the same
    assert hub.resolve(REPO, what="checkpoint") == Path(REPO)


def test_from_hf_with_hub_id_matches_snapshot_dir(cache):
    by_id = checkpoint.from_hf(REPO, dtype="float32")
    _assert_same_params(by_id, checkpoint.from_hf(cache.snapshots[MAIN], dtype="float32"))
    for revision in ("v1", OTHER):  # a tag and a commit pick the other snapshot
        assert hub.resolve(f"{REPO}@{revision}", what="checkpoint") == cache.snapshots[OTHER]
    other = checkpoint.from_hf(f"{REPO}@v1", dtype="float32")
    _assert_same_params(other, checkpoint.from_hf(cache.snapshots[OTHER], dtype="float32"))
    assert not np.array_equal(_params(other)[0], _params(by_id)[0])


def test_load_tokenizer_with_hub_id(cache):
    tok = load_tokenizer(REPO)
    assert isinstance(tok, HFTokenizer) and tok.path == cache.snapshots[MAIN] / "tokenizer.json"
    assert tok.token_to_id(CHAT_SPECIALS[0]) == load_tokenizer(cache.snapshots[MAIN]).token_to_id(CHAT_SPECIALS[0])


def test_eval_resolves_hub_checkpoint_and_its_tokenizer(cache):
    """What `python -m emorl_jax.eval --checkpoint=org/name[@rev]` reads: the snapshot's model and tokenizer."""
    tok = checkpoint_tokenizer(f"{REPO}@v1")  # tokenizer.json of the resolved snapshot
    assert tok.path == cache.snapshots[OTHER] / "tokenizer.json"
    assert checkpoint.model_config(REPO) == checkpoint.load(REPO, dtype="float32").cfg
    _assert_same_params(checkpoint.load(REPO, dtype="float32"),
                        checkpoint.from_hf(cache.snapshots[MAIN], dtype="float32"))


def test_only_weights_json_and_tokenizer_files_are_fetched(cache, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects

    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download",
                        lambda repo_id, **kw: calls.append((repo_id, kw)) or str(cache.snapshots[MAIN]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", "/elsewhere/hub")
    assert hub.resolve(f"{REPO}@refs/pr/1", what="checkpoint") == cache.snapshots[MAIN]
    hub.resolve(REPO, what="tokenizer")
    (repo, weights), (_, tokenizer) = calls
    assert repo == REPO and weights["revision"] == "refs/pr/1" and tokenizer["revision"] is None
    assert weights["cache_dir"] == Path("/elsewhere/hub") and weights["local_files_only"] is False
    repo_files = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                  "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                  "merges.txt", "special_tokens_map.json", "chat_template.jinja", "spm.model",
                  "pytorch_model.bin", "model.pt", "flax_model.msgpack", "tf_model.h5", "model.ckpt", "model.onnx",
                  "README.md", ".gitattributes"]
    kept = set(filter_repo_objects(repo_files, allow_patterns=weights["allow_patterns"]))
    assert kept == set(repo_files[:11])
    kept = set(filter_repo_objects(repo_files, allow_patterns=tokenizer["allow_patterns"]))
    assert kept == set(repo_files[4:11])  # no weights for a tokenizer


def test_hub_errors_are_one_line_user_errors(cache, tmp_path, monkeypatch):
    def error(name, what="checkpoint", cls=checkpoint.CheckpointError):
        with pytest.raises(cls) as info:
            hub.resolve(name, what=what)
        message = str(info.value)
        assert isinstance(info.value, UserError) and "\n" not in message and message.startswith(f"{name}: ")
        return message

    assert "Hub repo org/missing is not in the cache" in error("org/missing") and "HF_HUB_OFFLINE" in error(
        "org/missing")
    assert "revision 'nope' of Hub repo org/name is not in the cache" in error(f"{REPO}@nope")
    assert "tokenizer file or directory not found" in error(str(tmp_path / "nowhere"), "tokenizer", TokenizerError)
    assert "checkpoint file or directory not found" in error("not an id")

    from huggingface_hub import errors as hf_errors

    def raising(cls):
        exc = cls.__new__(cls)
        Exception.__init__(exc, "404 Client Error")
        monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: (_ for _ in ()).throw(exc))

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    raising(hf_errors.RepositoryNotFoundError)
    assert "no model repo org/typo on the Hugging Face Hub" in error("org/typo")
    raising(hf_errors.RevisionNotFoundError)
    assert "revision 'v9' not found in Hub repo org/name" in error(f"{REPO}@v9", "tokenizer", TokenizerError)


def test_convert_cli_takes_a_hub_id(cache, tmp_path):
    env = {**os.environ, "HF_HOME": str(cache.home), "HF_HUB_CACHE": str(cache.hub), "HF_HUB_OFFLINE": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: any HTTP attempt fails at once
    out = tmp_path / "orbax"
    run = subprocess.run([sys.executable, "-m", "emorl_jax.convert", f"--hf_dir={REPO}@v1", f"--out={out}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same_params(checkpoint.restore(out, dtype="float32"),
                        checkpoint.from_hf(cache.snapshots[OTHER], dtype="float32"))
