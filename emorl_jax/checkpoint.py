"""Hugging Face safetensors <-> AudioLM params (streamed tensor by tensor), and orbax save/restore.

The HF names follow the published Qwen2-Audio checkpoint (`audio_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.weight`); transformers 5's in-memory names
(`model.language_model.*`, `lm_head.weight`) are accepted too. Conversion is a rename plus a transpose:
linear `weight` [out, in] <-> `kernel` [in, out]; conv `weight` [out, in, k] <-> `kernel` [k, in, out];
norm `weight` <-> `scale`; embedding `weight` <-> `embedding`. Layer i of a stack is row i of the stacked param.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from emorl_jax.config import DTYPES, AudioEncoderConfig, AudioLMConfig, TextConfig, from_hf_config, to_hf_config
from emorl_jax.errors import UserError
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.paths import as_path
from emorl_jax.sharding import _path_names, param_shardings


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read into the configured model; the message names the tensor/file."""


_PREFIX = {"audio_tower": "audio_tower", "multi_modal_projector": "multi_modal_projector",
           "language_model": "language_model.model", "lm_head": "language_model.lm_head"}
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_V5_ALIASES = (("model.language_model.", "language_model.model."), ("model.audio_tower.", "audio_tower."),
               ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head."))


def hf_names(path: Sequence[str], num_layers: int) -> list[str]:
    """HF tensor names of the param at `path`: one name, or one per layer for a stacked param."""
    top, *mods, leaf = path
    if (top, leaf) == ("audio_tower", "embed_positions") and not mods:
        return ["audio_tower.embed_positions.weight"]
    if _stacked(path):
        suffix = ".".join([*mods[1:], _LEAF[leaf]])
        return [f"{_PREFIX[top]}.layers.{i}.{suffix}" for i in range(num_layers)]
    return [f"{_PREFIX[top]}.{'.'.join([*mods, _LEAF[leaf]])}"]


def _to_jax_layout(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return w.transpose(2, 1, 0) if w.ndim == 3 else w.T
    return w


_to_hf_layout = _to_jax_layout  # both transposes are their own inverse


def _param_paths(state) -> list[tuple[list[str], jax.ShapeDtypeStruct]]:
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return [([n for n in _path_names(p) if n != "value"], x) for p, x in leaves]


def _stacked(path: Sequence[str]) -> bool:
    return list(path[1:2]) == ["layers"]


def _num_layers(cfg: AudioLMConfig, path: Sequence[str]) -> int:
    return cfg.audio.encoder_layers if path[0] == "audio_tower" else cfg.text.num_hidden_layers


class _SafetensorsDir:
    """Tensor index over one `model.safetensors` or a sharded set listed in `model.safetensors.index.json`."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            raw = {name: hf_dir / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            raw = {}
            for f in sorted(hf_dir.glob("*.safetensors")):
                with safe_open(f, framework="np") as handle:
                    raw.update({name: f for name in handle.keys()})
        if not raw:
            bins = sorted(p.name for p in hf_dir.glob("*.bin"))
            hint = (f"; found pickled PyTorch weights {bins}: pickled .bin checkpoints are refused (loading them "
                    "can run arbitrary code). Convert them to safetensors first, e.g. load with transformers and "
                    "`save_pretrained(dir, safe_serialization=True)`") if bins else ""
            raise CheckpointError(f"{hf_dir}: no *.safetensors weights{hint}")
        self.entries = {self.canonical(name): (f, name) for name, f in raw.items()}
        self._handles: dict[Path, object] = {}

    @staticmethod
    def canonical(name: str) -> str:
        for old, new in _V5_ALIASES:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def file(self, name: str) -> Path:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        handle, raw = self._open(name)
        return tuple(handle.get_slice(raw).get_shape())

    def get(self, name: str) -> np.ndarray:
        handle, raw = self._open(name)
        return handle.get_tensor(raw)

    def _open(self, name: str):
        if name not in self.entries:
            raise CheckpointError(f"missing tensor {name}: not in any *.safetensors file")
        f, raw = self.entries[name]
        if f not in self._handles:
            if not f.exists():
                raise CheckpointError(f"{f}: listed in model.safetensors.index.json but missing")
            self._handles[f] = safe_open(f, framework="np")
        return self._handles[f], raw


def abstract_model(cfg: AudioLMConfig) -> AudioLM:
    """The model with ShapeDtypeStruct params: no memory allocated (`nnx.eval_shape`)."""
    return nnx.eval_shape(lambda: AudioLM(cfg, rngs=nnx.Rngs(0)))


def from_hf(hf_dir: str | os.PathLike, *, dtype: str = "bfloat16", param_dtype: str = "float32",
            mesh: jax.sharding.Mesh | None = None, remat: bool = False, attention: str = "xla") -> AudioLM:
    """Reads a HF Qwen2-Audio directory (config.json + safetensors) into an AudioLM, tensor by tensor.

    `hf_dir`: a local directory or a Hub id `org/name[@revision]` (see `emorl_jax.hub.resolve`). `dtype`,
    `remat` and `attention` are how the run computes (`AudioLMConfig`), not part of the checkpoint.
    Peak host memory is about one stacked param plus one tensor. With a mesh, each param is placed with its
    `sharding.param_shardings` sharding as soon as it is read.
    """
    from emorl_jax import hub

    hf_dir = Path(hub.resolve(hf_dir, what="checkpoint"))
    config_file = hf_dir / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{hf_dir}: no config.json")
    cfg = from_hf_config(json.loads(config_file.read_text()), dtype=dtype, param_dtype=param_dtype)
    cfg = cfg.replace(remat=remat, attention=attention)
    weights = _SafetensorsDir(hf_dir)
    graphdef, abstract = nnx.split(abstract_model(cfg))
    shardings = param_shardings(abstract, mesh) if mesh is not None else None
    used: set[str] = set()

    def load(path, leaf, sharding):
        names = hf_names(path, _num_layers(cfg, path))
        out = np.empty(leaf.shape, DTYPES[param_dtype])
        for i, name in enumerate(names):
            target = out[i] if _stacked(path) else out
            expected = _to_jax_layout(path[-1], np.empty(target.shape, np.bool_)).shape
            got = weights.shape(name)
            if got != expected:
                raise CheckpointError(f"{weights.file(name)}: tensor {name} has shape {list(got)} but the config "
                                      f"expects {list(expected)}")
            target[...] = _to_jax_layout(path[-1], weights.get(name)).astype(out.dtype)
            used.add(name)
        return jax.device_put(out, sharding) if sharding is not None else jnp.asarray(out)

    paths = _param_paths(abstract)
    sharding_leaves = jax.tree.leaves(shardings) if shardings is not None else [None] * len(paths)
    values = [load(path, leaf, s) for (path, leaf), s in zip(paths, sharding_leaves)]
    head = "language_model.lm_head.weight"
    if cfg.text.tie_word_embeddings and head in weights.entries:
        if not np.array_equal(weights.get(head), weights.get("language_model.model.embed_tokens.weight")):
            raise CheckpointError(f"{weights.file(head)}: config.json ties the word embeddings but tensor {head} "
                                  "differs from embed_tokens (transformers' Qwen2-Audio never ties them at run "
                                  "time): set tie_word_embeddings to false")
        used.add(head)
    unexpected = sorted(set(weights.entries) - used)
    if unexpected:
        raise CheckpointError(f"{hf_dir}: unexpected tensor(s) not used by the config: {', '.join(unexpected[:10])}"
                              + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    state = jax.tree.unflatten(jax.tree.structure(abstract), values)
    return nnx.merge(graphdef, state)


def hf_tensors(model: AudioLM) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, HF-layout numpy array) for every tensor, one at a time (LoRA adapters folded in first)."""
    from emorl_jax.models.lora import merge_lora

    model = merge_lora(model)
    cfg = model.cfg
    for path, value in _param_paths(nnx.state(model)):
        names = hf_names(path, _num_layers(cfg, path))
        host = np.asarray(jax.device_get(value))
        for i, name in enumerate(names):
            yield name, np.ascontiguousarray(_to_hf_layout(path[-1], host[i] if _stacked(path) else host))


def to_hf(model: AudioLM, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json + safetensors shards (+ index when sharded) that transformers loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(to_hf_config(model.cfg), indent=2))
    shards, current, size = [], {}, 0
    for name, tensor in hf_tensors(model):
        if current and size + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.nbytes for s in shards for t in s.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def config_to_json(cfg: AudioLMConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2)


def config_from_json(text: str) -> AudioLMConfig:
    d = json.loads(text)
    return AudioLMConfig(audio=AudioEncoderConfig(**d.pop("audio")), text=TextConfig(**d.pop("text")), **d)


def save(model: AudioLM, directory: str | os.PathLike) -> None:
    """Saves params (orbax) and the model config (model_config.json) under `directory` (local or `gs://...`)."""
    import orbax.checkpoint as ocp

    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # one writer (a bucket object takes about one update per second)
        (directory / "model_config.json").write_text(config_to_json(model.cfg))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", nnx.state(model))


def restore(directory: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None,
            remat: bool | None = None, attention: str | None = None) -> AudioLM:
    """Restores a `save`d model (local or `gs://...`), each param placed with its sharding on `mesh` (or on the
    default device). `dtype`, `remat`, `attention`: how this run computes, overriding model_config.json's (None
    keeps it). Raises CheckpointError naming `directory` when it has no model_config.json or params, or when the
    stored params do not fit model_config.json."""
    import orbax.checkpoint as ocp

    directory = as_path(directory)
    if not (directory / "model_config.json").exists():
        raise CheckpointError(f"{directory}: no model_config.json (not a directory written by checkpoint.save)")
    if not (directory / "params").exists():
        raise CheckpointError(f"{directory}: no params (the orbax arrays beside model_config.json)")
    cfg = config_from_json((directory / "model_config.json").read_text())
    run = {"dtype": dtype, "remat": remat, "attention": attention}
    cfg = cfg.replace(**{k: v for k, v in run.items() if v is not None})
    graphdef, abstract = nnx.split(abstract_model(cfg))
    if mesh is not None:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                param_shardings(abstract, mesh))
    with ocp.StandardCheckpointer() as ckptr:
        _check_stored_shapes(directory, ckptr.metadata(directory / "params").item_metadata, abstract)
        try:
            state = ckptr.restore(directory / "params", abstract)
        except (ValueError, KeyError, FileNotFoundError) as e:  # what the shape check above did not foresee
            problem = " ".join(str(e).split())
            raise CheckpointError(f"{directory}: orbax cannot restore params into model_config.json's model "
                                  f"({problem[:500]})") from e
    return nnx.merge(graphdef, state)


def model_config(directory: str | os.PathLike) -> AudioLMConfig:
    """The config of an orbax model (model_config.json), a HF directory (config.json) or a Hub id, without reading
    any weight. Raises CheckpointError when `directory` is neither."""
    from emorl_jax import hub

    directory = as_path(hub.resolve(directory, what="checkpoint"))
    if (directory / "model_config.json").exists():
        return config_from_json((directory / "model_config.json").read_text())
    if (directory / "config.json").exists():
        return from_hf_config(json.loads((directory / "config.json").read_text()))
    hint = " (a run directory: use its final/)" if (directory / "final" / "model_config.json").exists() else ""
    raise CheckpointError(f"{directory}: neither an orbax model (model_config.json) nor a HF directory "
                          f"(config.json){hint}")


def load(directory: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, dtype: str = "bfloat16",
         remat: bool = False, attention: str = "xla") -> AudioLM:
    """Any model we read: an orbax model (`save`, local or gs://), a HF Qwen2-Audio directory, or a Hub id, set to
    compute in `dtype` with `remat` and `attention`."""
    from emorl_jax import hub

    directory = hub.resolve(directory, what="checkpoint")
    model_config(directory)  # neither kind: the error says so
    if (as_path(directory) / "model_config.json").exists():
        return restore(directory, mesh=mesh, dtype=dtype, remat=remat, attention=attention)
    return from_hf(directory, dtype=dtype, mesh=mesh, remat=remat, attention=attention)


def _check_stored_shapes(directory, stored, abstract) -> None:
    """Raises CheckpointError when the params stored under `directory` differ from `abstract` in names or shapes."""
    have = {".".join(p): tuple(x.shape) for p, x in _param_paths(stored) if hasattr(x, "shape")}
    want = {".".join(p): tuple(x.shape) for p, x in _param_paths(abstract)}
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing or extra:
        raise CheckpointError(f"{directory}: params do not match model_config.json: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    wrong = [f"{name} {list(have[name])} (expected {list(shape)})" for name, shape in want.items()
             if have[name] != shape]
    if wrong:
        raise CheckpointError(f"{directory}: {len(wrong)} param(s) have shapes that do not match "
                              f"model_config.json: {', '.join(wrong[:3])}")


def save_each_shard_once() -> None:
    """Makes orbax write each shard of an array once, from its first replica (for every save in this process).

    orbax's default splits a replicated shard among its replicas, cutting the slices with eager `jit(slice)`
    ops: one compile per leaf shape at the first save, and one dispatch per leaf at every save."""
    import orbax.checkpoint as ocp

    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class TrainCheckpointer:
    """Resumable training checkpoints under `<workdir>/checkpoints` (orbax CheckpointManager, async saves); the
    workdir may be local or remote (`gs://...`).

    Each step holds the train state pytree (params, optimizer state, step; restored onto the shardings of the
    `like` tree) and a JSON dict (stage, data-iterator state, anything else the loop needs to resume exactly).
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2):
        import orbax.checkpoint as ocp

        save_each_shard_once()
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            as_path(workdir) / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> None:
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state),
                                        meta=self._ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=force)

    def restore_meta(self, step: int) -> dict:
        """The JSON dict saved with `step` (nothing else is read)."""
        return self.manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))["meta"]

    def restore(self, like, step: int | None = None) -> tuple[object, dict]:
        """Restores (state shaped and sharded like `like`, meta) from `step` (default: the latest)."""
        step = self.manager.latest_step() if step is None else step
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
        out = self.manager.restore(step, args=self._ocp.args.Composite(
            state=self._ocp.args.StandardRestore(abstract), meta=self._ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
