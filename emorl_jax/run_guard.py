"""A run directory remembers the config it was started with, so a rerun cannot silently mix configs.

`<workdir>/config.json` holds the resolved run config, the package version that wrote it, and the history of
accepted changes. A rerun (resume, or a finished run printing its results) whose config differs refuses to start
and names every changed key, old -> new, unless the user resumes with the changes on purpose
(`--resume_with_changes`). Keys that only say where or how fast the run executes (`PLACEMENT_KEYS`: mesh shape,
input workers) may change freely: a run resumes exactly on another slice or host count.
"""

from __future__ import annotations

import json

import jax
from etils import epath

import emorl_jax
from emorl_jax import distributed
from emorl_jax.errors import ConfigError

CONFIG_FILE = "config.json"
PLACEMENT_KEYS = frozenset({"mesh.shape", "mesh.activation_constraints", "mesh.strict_sharding", "data.worker_count"})


def flatten(config) -> dict[str, object]:
    """{"section.key": JSON value} of a ConfigDict (or nested dict); tuples become lists, as in JSON."""
    tree = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = node

    walk("", tree)
    return flat


def changed_keys(old: dict, new: dict) -> dict[str, tuple[object, object]]:
    """{key: (old, new)} for every flattened key whose value differs (absent = None), placement keys excepted."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in PLACEMENT_KEYS}


def describe(changes: dict[str, tuple[object, object]]) -> str:
    return "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())


def check_or_record(config, workdir, *, resume_with_changes: bool = False) -> dict[str, tuple[object, object]]:
    """Records `config` in `<workdir>/config.json` on a fresh run; on a rerun compares it with the recorded one.

    Returns the accepted changes ({} when none). Raises ConfigError naming the changed keys when they differ and
    `resume_with_changes` is False. Every process must call it (the decision is taken on every process's view)."""
    path = epath.Path(workdir) / CONFIG_FILE
    new = flatten(config)
    record = json.loads(path.read_text()) if path.exists() else None
    changes = changed_keys(flatten(record["config"]), new) if record else {}
    refusal = (f"{path}: the config differs from the one this run was started with ({describe(changes)}); "
               "rerun with --resume_with_changes to continue with the new values, or use a new --workdir"
               if changes and not resume_with_changes else "")
    refusals = [r for r in distributed.gather_strings(refusal) if r]
    if refusals:
        raise ConfigError(refusals[0])
    if record and changes:
        print(f"resuming {workdir} with config changes: {describe(changes)}")
    if record and record.get("version") != emorl_jax.__version__:
        print(f"{path}: written by emorl_jax {record.get('version')}, now running {emorl_jax.__version__}")
    if jax.process_index() == 0 and (record is None or changes):
        history = (record or {}).get("changes", [])
        if changes:
            history.append({"version": emorl_jax.__version__,
                            "changed": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": emorl_jax.__version__, "config": config.to_dict()
                                    if hasattr(config, "to_dict") else config, "changes": history}, indent=2) + "\n")
    return changes
