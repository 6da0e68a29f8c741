"""Local or remote (`gs://`, `s3://`, ...) paths through one API, `etils.epath`.

Without TensorFlow, epath serves `gs://` with fsspec, which needs `gcsfs` at run time (the `gcs` extra). orbax
reads and writes checkpoints at such paths itself (epath for metadata, tensorstore for arrays). What only works
on local files (wav decoding, SentencePiece) goes through a local copy or the local cache (`cache_dir`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL path (`gs://bucket/x`); False for a local one."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` (str, pathlib or epath) as an `epath.Path`; local paths absolute (orbax needs them so)."""
    p = epath.Path(path)
    return p if is_remote(p) else p.absolute()


def cache_dir() -> Path:
    """The local cache of derived files (`$EMORL_JAX_CACHE`, else `$XDG_CACHE_HOME/emorl_jax`, else
    ~/.cache/emorl_jax)."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "emorl_jax")
    return Path(os.environ.get("EMORL_JAX_CACHE") or default).expanduser()


def local_copy(path: str | os.PathLike) -> Path:
    """`path` itself when local; else a fresh local copy of the remote file, in a temporary folder."""
    if not is_remote(path):
        return Path(path)
    src = epath.Path(path)
    local = Path(tempfile.mkdtemp(prefix="emorl_jax_")) / src.name
    with src.open("rb") as f, local.open("wb") as out:
        shutil.copyfileobj(f, out)
    return local


def upload(local: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies the local file `local` to `dst` (local or remote), replacing it."""
    dst = epath.Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(local, "rb") as f, dst.open("wb") as out:
        shutil.copyfileobj(f, out)
