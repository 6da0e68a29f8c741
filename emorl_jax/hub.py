"""Hugging Face Hub ids wherever a weights or tokenizer path is taken.

  resolve("/models/Qwen2-Audio-7B-Instruct", what="checkpoint")   # an existing local path: Path, unchanged
  resolve("Qwen/Qwen2-Audio-7B-Instruct", what="checkpoint")      # a Hub id: its snapshot directory in the cache
  resolve("Qwen/Qwen2-Audio-7B-Instruct@<branch|tag|commit>", what="tokenizer")
  resolve("gs://bucket/ckpt", what="checkpoint")                  # a URL: returned as given (str stays str)

A local path wins over a Hub id of the same spelling. A Hub id is fetched with `huggingface_hub.snapshot_download`
into the cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub), and only the files we read:
safetensors + json for a checkpoint, the tokenizer/chat-template files for a tokenizer (never *.bin, *.pt, ...).
`HF_HUB_OFFLINE=1` uses the cache only. These variables are read at each call, not at import.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from emorl_jax.errors import TokenizerError, UserError

TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "*.model", "*.jinja", "chat_template.json")
CHECKPOINT_PATTERNS = ("*.safetensors", "*.json", *TOKENIZER_PATTERNS)  # *.json: config + index (+ tokenizer)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^@\s]+))?$")


def _true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    """The Hugging Face hub cache now: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def offline() -> bool:
    """Whether `HF_HUB_OFFLINE` (or the older `TRANSFORMERS_OFFLINE`) is set now."""
    return _true("HF_HUB_OFFLINE") or _true("TRANSFORMERS_OFFLINE")


def _error_class(what: str) -> type[UserError]:
    if what == "tokenizer":
        return TokenizerError
    from emorl_jax.checkpoint import CheckpointError  # checkpoint imports this module

    return CheckpointError


def resolve(name: str | os.PathLike, *, what: str) -> Path | str | os.PathLike:
    """A local directory/file for `name`, which is a local path, a URL, or a Hub id `org/name[@revision]`.

    `what`: "tokenizer" (fetch the tokenizer files only, errors are `TokenizerError`) or "checkpoint" (weights,
    config and tokenizer files; errors are `checkpoint.CheckpointError`).
    Returns an existing local path as a `pathlib.Path`, a URL (`gs://...`) as given (remote paths are the
    caller's), and a Hub id as the `pathlib.Path` of its snapshot in the cache. Raises a one-line user error,
    '<name>: <problem>', for a missing path, a bad id, or a repo/revision that is neither cached nor on the Hub.
    """
    if what not in ("checkpoint", "tokenizer"):
        raise ValueError(f"what={what!r}: expected 'checkpoint' or 'tokenizer'")
    text = os.fspath(name)
    if _URL.match(text):
        return name
    error = _error_class(what)
    if not text:
        raise error(f"{what}: empty path")
    path = Path(text).expanduser()
    if path.exists():
        return path
    match = _HUB_ID.match(text)
    if match is None or not _valid_repo_id(match["repo"]):
        raise error(f"{text}: {what} file or directory not found")
    repo, revision = match["repo"], match["revision"]
    patterns = list(TOKENIZER_PATTERNS if what == "tokenizer" else CHECKPOINT_PATTERNS)
    return Path(_download(text, repo, revision, patterns, error, what))


def _valid_repo_id(repo: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def _download(text: str, repo: str, revision: str | None, patterns: list[str], error, what: str) -> str:
    """`snapshot_download` with the cache and offline mode of now; its errors as one-line `error`s."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    cache, is_offline = cache_dir(), offline()
    where = f"no local {what} of that name, and"
    try:
        return huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache,
                                                 local_files_only=is_offline, allow_patterns=patterns)
    except hf_errors.RevisionNotFoundError as e:
        raise error(f"{text}: revision {revision!r} not found in Hub repo {repo}") from e
    except hf_errors.GatedRepoError as e:
        raise error(f"{text}: Hub repo {repo} is gated: accept its terms on huggingface.co and log in "
                    "(`hf auth login` or HF_TOKEN)") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise error(f"{text}: {where} no model repo {repo} on the Hugging Face Hub (or it is private: log in "
                    "with `hf auth login` or set HF_TOKEN)") from e
    except hf_errors.LocalEntryNotFoundError as e:
        if isinstance(e, getattr(hf_errors, "IncompleteSnapshotError", ())):
            raise error(f"{text}: the cached snapshot in {cache} misses files; download it again online") from e
        cached = (cache / ("models--" + repo.replace("/", "--"))).is_dir()
        missing = f"revision {revision or 'main'!r} of Hub repo {repo}" if cached else f"Hub repo {repo}"
        reason = "HF_HUB_OFFLINE is set" if is_offline else "the Hugging Face Hub cannot be reached"
        raise error(f"{text}: {where} {missing} is not in the cache {cache} ({reason})") from e
    except hf_errors.HfHubHTTPError as e:
        raise error(f"{text}: Hugging Face Hub error: {str(e).splitlines()[0]}") from e
