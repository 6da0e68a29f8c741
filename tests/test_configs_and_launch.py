"""configs/*.py load through ml_collections' config_flags with exactly `base_run_config()`'s keys; the 7B configs
hold the published Qwen2-Audio-7B shape and the paper's values; the launch scripts pass `bash -n` (and shellcheck
when installed) and, with DRY_RUN=1, print gcloud/python commands whose flags gcloud's own help lists and whose
`--config.*` overrides parse against the config they name."""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from emorl_jax.config import QWEN2_AUDIO_7B, base_run_config, from_config_dict, load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))
# Model-shape configs (a `model` and a `mesh`, no run sections); every other configs/*.py is a run config.
MODEL_SHAPE_CONFIGS = {"qwen2_audio_7b.py", "tiny.py"}
RUN_CONFIGS = [p for p in CONFIGS if p.name not in MODEL_SHAPE_CONFIGS]
SEVEN_B = {"qwen2_audio_7b_iemocap.py": ("iemocap", "iemocap4"), "qwen2_audio_7b_meld.py": ("meld", "meld")}
TPU_SH, GPU_SH = ROOT / "launch" / "tpu_vm.sh", ROOT / "launch" / "gpu_node.sh"


load = load_run_config  # the CLI's own parsing: `--config=path --config.x=y ...`


def flat(cfg, prefix=""):
    """{dotted key: value} over nested ConfigDicts."""
    out = {}
    for key, value in cfg.items():
        if hasattr(value, "items"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --- configs ----------------------------------------------------------------------------------------------


def test_every_config_file_is_classified():
    assert {p.name for p in CONFIGS} >= MODEL_SHAPE_CONFIGS | set(SEVEN_B)
    assert len(RUN_CONFIGS) >= 3  # tiny_synthetic + the two 7B configs


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_has_exactly_the_base_keys_and_types(path):
    base, cfg = flat(base_run_config()), flat(load(path))
    assert sorted(set(cfg) - set(base)) == [], "unknown keys (typos?)"
    assert sorted(set(base) - set(cfg)) == [], "missing keys"
    assert {k: type(v).__name__ for k, v in cfg.items()} == {k: type(v).__name__ for k, v in base.items()}
    from_config_dict(load(path).model)  # builds


@pytest.mark.parametrize("name", sorted(MODEL_SHAPE_CONFIGS))
def test_model_shape_config_builds_its_model(name):
    cfg = load(ROOT / "configs" / name)
    assert "rl" not in cfg and "data" not in cfg  # a run config belongs in RUN_CONFIGS: drop it from the set
    assert set(flat(cfg.model)) == set(flat(base_run_config().model))
    from_config_dict(cfg.model)


def test_config_overrides_of_unknown_keys_fail():
    with pytest.raises(AttributeError, match="Did you mean \"group_size\""):
        load(ROOT / "configs" / "qwen2_audio_7b_meld.py", "--config.rl.group_sizee=8")


@pytest.mark.parametrize("name", sorted(SEVEN_B))
def test_7b_config_is_the_published_model_with_the_paper_values(name):
    cfg = load(ROOT / "configs" / name)
    model = from_config_dict(cfg.model)
    assert model.audio == QWEN2_AUDIO_7B.audio and model.text == QWEN2_AUDIO_7B.text
    assert model.audio_token_index == QWEN2_AUDIO_7B.audio_token_index
    assert model == QWEN2_AUDIO_7B.replace(dtype="bfloat16", param_dtype="float32", remat=True)
    dataset, labels = SEVEN_B[name]
    assert (cfg.data.dataset, cfg.data.labels) == (dataset, labels)
    # (paper): G = 6, lr = 1e-6, ESR prompting, ESWR with Plutchik similarity and gamma = 0.7
    assert (cfg.rl.group_size, cfg.rl.learning_rate, cfg.prompt_mode) == (6, 1e-6, "esr")
    assert (cfg.reward.accuracy, cfg.reward.similarity, cfg.reward.gamma) == ("eswr", "plutchik", 0.7)
    # ours, as DESIGN.md §5 lists them
    assert (cfg.rl.beta, cfg.rl.clip_eps, cfg.rl.temperature, cfg.rl.max_new_tokens) == (0.04, 0.2, 1.0, 256)
    assert (cfg.rl.loss_normalization, cfg.rl.iterations, cfg.optim.warmup_fraction) == ("sequence", 1, 0.03)
    assert cfg.sft.steps == 0 and cfg.init.hf_dir == cfg.init.checkpoint == cfg.tokenizer.path == ""
    assert tuple(cfg.mesh.shape) == (1, -1, 1)


def test_iemocap_fold_is_a_command_line_override():
    path = ROOT / "configs" / "qwen2_audio_7b_iemocap.py"
    assert load(path).data.fold == 1
    for fold in range(1, 6):
        assert load(path, f"--config.data.fold={fold}").data.fold == fold
    assert load(ROOT / "configs" / "qwen2_audio_7b_meld.py").data.fold == 0


def test_7b_configs_differ_only_in_data_and_steps():
    a, b = (flat(load(ROOT / "configs" / n)) for n in sorted(SEVEN_B))
    differ = sorted(k for k in a if a[k] != b[k])
    assert differ and all(k.startswith("data.") or k == "rl.steps" for k in differ), differ


@pytest.mark.parametrize("devices", [4, 8], ids=["v5p-8 (4 chips)", "8 GPUs"])
def test_7b_batches_shard_over_the_default_mesh(devices):
    """The config comment's claim: a micro-batch's prompts and the eval batch divide over 4 chips or 8 GPUs."""
    from emorl_jax.sharding import BATCH_AXES, make_mesh

    for name in SEVEN_B:
        cfg = load(ROOT / "configs" / name)
        mesh = make_mesh(cfg.mesh.shape, devices=jax.devices()[:devices])
        batch_devices = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
        assert batch_devices == devices
        assert cfg.rl.batch_size % cfg.rl.micro_batches == 0
        assert (cfg.rl.batch_size // cfg.rl.micro_batches) % batch_devices == 0
        assert cfg.train.eval_batch_size % batch_devices == 0


def test_7b_memory_numbers_in_the_config_docstring():
    """8.40e9 params; fp32 params + AdamW moments + grads = 16 B each = 134 GB = 31.3 GiB per chip on 4 chips."""
    from flax import nnx

    from emorl_jax.checkpoint import abstract_model

    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract_model(QWEN2_AUDIO_7B), nnx.Param)))
    assert round(params / 1e9, 2) == 8.40
    assert round(params * 16 / 1e9) == 134
    per_chip_gib = params * 16 / 4 / 2**30
    assert round(per_chip_gib, 1) == 31.3
    assert per_chip_gib > 0.95 * 32 and per_chip_gib < 0.35 * 95  # all of a v4 chip; a third of a v5p chip
    from emorl_jax.config import qwen2_audio_7b_run_config

    doc = qwen2_audio_7b_run_config.__doc__
    assert "8.40e9" in doc and "134 GB" in doc and "31.3 GiB" in doc


# --- launch scripts -----------------------------------------------------------------------------------------


def script(path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in {"DATA_DIR", "FOLD", "CONFIG", "XLA_FLAGS"}}
    full_env.update(DRY_RUN="1", **env)
    return subprocess.run(["bash", str(path), *args], capture_output=True, text=True, env=full_env, timeout=30)


def dry_run(path: Path, *args: str, **env: str) -> list[list[str]]:
    """The commands a DRY_RUN prints, each split into words as the shell would."""
    out = script(path, *args, **env)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def remote_command(argv: list[str]) -> str:
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return command


def python_module(words: list[str], module: str) -> list[str]:
    """The arguments after `python -m module` (any python executable) in a word list, up to a shell operator."""
    for i, word in enumerate(words):
        if word.endswith("python") and words[i + 1:i + 3] == ["-m", module]:
            args = words[i + 3:]
            ends = [j for j, a in enumerate(args) if re.match(r"^(\d?>|<|\||&|;)", a)]
            return args[:ends[0]] if ends else args
    raise AssertionError(f"no `python -m {module}` in {words}")


def arg(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def check_overrides_parse(args: list[str]) -> None:
    """Every --config.* override the script passes names a real key of the config and parses."""
    config = ROOT / arg(args, "config")
    overrides = [a for a in args if a.startswith("--config.")]
    cfg = load(config, *overrides)
    for override in overrides:
        key, value = override.removeprefix("--config.").split("=", 1)
        got = cfg
        for part in key.split("."):
            got = got[part]
        assert str(got) == value


@functools.cache
def gcloud_help(*command: str) -> str:
    out = subprocess.run(["gcloud", *command, "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"})
    assert out.returncode == 0, out.stderr
    return re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)


def check_gcloud_flags(argv: list[str]) -> None:
    """Each --flag of a gcloud command is in that command's --help (or gcloud's wide flags)."""
    assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
    if shutil.which("gcloud") is None:
        return
    documented = gcloud_help(*argv[1:5]) + gcloud_help()
    for word in argv[5:]:
        if word.startswith("--"):
            assert re.search(re.escape(word.split("=", 1)[0]) + r"(?=[=\s,\]|])", documented), f"{word} not in help"


@pytest.mark.parametrize("path", [TPU_SH, GPU_SH], ids=lambda p: p.name)
def test_script_syntax_and_shellcheck(path):
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


def test_tpu_create_and_delete():
    (create,) = dry_run(TPU_SH, "create", TPU_NAME="t1", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-32",
                        RUNTIME_VERSION="tpu-ubuntu2204-base", SPOT="1", PROJECT="my-proj")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1"]
    assert {"--zone=us-central2-b", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
            "--project=my-proj"} <= set(create)
    check_gcloud_flags(create)
    (delete,) = dry_run(TPU_SH, "delete", TPU_NAME="t1")
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t1"] and "--quiet" in delete
    check_gcloud_flags(delete)


def test_tpu_setup_copies_the_checkout_and_installs_on_every_worker():
    commands = dry_run(TPU_SH, "setup", NFS_SHARE="10.0.0.2:/vol1", SHARED_DIR="/mnt/shared")
    gcloud = [c for c in commands if c[0] == "gcloud"]
    for c in gcloud:
        check_gcloud_flags(c)
        assert "--worker=all" in c
    assert commands[0][:2] == ["gcloud", "compute"] and "mount -t nfs" in remote_command(commands[0])
    assert commands[1][:2] == ["bash", "-c"] and "git ls-files" in commands[1][2]  # the tarball of this checkout
    assert [c[4] for c in gcloud] == ["ssh", "scp", "ssh", "ssh"]
    install = " ".join(shlex.split(remote_command(gcloud[-1])))  # as the worker's shell reads it
    assert "uv venv --seed --python 3.12 ~/emorl_venv" in install
    assert "~/emorl_venv/bin/python -m pip install -q -e ~/emorl_jax[gcs] jax[tpu]" in install  # gs:// runs
    cloned = dry_run(TPU_SH, "setup", REPO_URL="https://example.com/emorl_jax.git", REPO_REF="v1")
    assert "git clone https://example.com/emorl_jax.git" in remote_command(cloned[0])
    assert "fetch origin v1" in remote_command(cloned[0])


def test_tpu_convert_runs_once_on_cpu():
    (convert,) = dry_run(TPU_SH, "convert", HF_DIR="/mnt/shared/hf", CKPT_DIR="/mnt/shared/ckpt")
    check_gcloud_flags(convert)
    assert "--worker=0" in convert
    words = shlex.split(remote_command(convert))
    assert "JAX_PLATFORMS=cpu" in words
    args = python_module(words, "emorl_jax.convert")
    assert arg(args, "hf_dir") == "/mnt/shared/hf" and arg(args, "out") == "/mnt/shared/ckpt"


def test_tpu_train_runs_multihost_on_every_worker():
    (train,) = dry_run(TPU_SH, "train", "--config.rl.steps=10", DATA_DIR="/mnt/shared/data/IEMOCAP full",
                       FOLD="3", SHARED_DIR="/mnt/shared")
    check_gcloud_flags(train)
    assert train[4] == "ssh" and "--worker=all" in train
    command = remote_command(train)
    assert "python -m emorl_jax.train --multihost" in command
    args = python_module(shlex.split(command), "emorl_jax.train")
    assert "--multihost" in args
    assert arg(args, "workdir") == "/mnt/shared/runs/qwen2_audio_7b_iemocap_fold3"
    assert arg(args, "config.data.data_dir") == "/mnt/shared/data/IEMOCAP full"  # quoting survives
    assert arg(args, "config.data.fold") == "3" and arg(args, "config.rl.steps") == "10"
    assert arg(args, "config.init.checkpoint") == "/mnt/shared/ckpt/qwen2_audio_7b"
    check_overrides_parse(args)
    (from_hf,) = dry_run(TPU_SH, "train", DATA_DIR="/d", INIT_FROM="hf", CONFIG="configs/qwen2_audio_7b_meld.py")
    args = python_module(shlex.split(remote_command(from_hf)), "emorl_jax.train")
    assert arg(args, "config.init.hf_dir") == arg(args, "config.tokenizer.path")
    assert not any(a.startswith("--config.init.checkpoint") for a in args)
    check_overrides_parse(args)


def test_tpu_train_detached_keeps_the_same_command():
    (train,) = dry_run(TPU_SH, "train", DATA_DIR="/mnt/d", DETACH="1")
    words = shlex.split(remote_command(train))
    assert words[words.index("nohup"):words.index("nohup") + 2] == ["nohup", "bash"] and words[-1] == "&"
    inner = shlex.split(words[words.index("-c") + 1])
    args = python_module(inner, "emorl_jax.train")
    assert "--multihost" in args and arg(args, "config.data.data_dir") == "/mnt/d"
    check_overrides_parse(args)


def test_tpu_eval_fold_or_split():
    (ev,) = dry_run(TPU_SH, "eval", DATA_DIR="/d", FOLD="2", HF_DIR="/hf")
    check_gcloud_flags(ev)
    args = python_module(shlex.split(remote_command(ev)), "emorl_jax.eval")
    assert (arg(args, "dataset"), arg(args, "fold"), arg(args, "data_dir"), arg(args, "tokenizer")) == (
        "iemocap", "2", "/d", "/hf")
    assert arg(args, "checkpoint") == "/mnt/shared/runs/qwen2_audio_7b_iemocap_fold2/final"  # train's workdir
    assert "--multihost" in args  # every worker of a pod slice joins one evaluation
    # no FOLD: emorl_jax.eval runs all five folds, each from its own training run
    (ev,) = dry_run(TPU_SH, "eval", DATA_DIR="/d")
    args = python_module(shlex.split(remote_command(ev)), "emorl_jax.eval")
    assert arg(args, "checkpoint") == "/mnt/shared/runs/qwen2_audio_7b_iemocap_fold{fold}/final"
    assert not any(a.startswith("--fold") for a in args)
    # cross-corpus: the fold picks the model, the corpus is evaluated on its split
    (ev,) = dry_run(TPU_SH, "eval", FOLD="4", EVAL_DATASET="ravdess", EVAL_DATA_DIR="/r")
    args = python_module(shlex.split(remote_command(ev)), "emorl_jax.eval")
    assert (arg(args, "dataset"), arg(args, "split"), arg(args, "data_dir")) == ("ravdess", "test", "/r")
    assert arg(args, "checkpoint") == "/mnt/shared/runs/qwen2_audio_7b_iemocap_fold4/final"
    assert not any(a.startswith("--fold") for a in args)
    (ev,) = dry_run(TPU_SH, "eval", CONFIG="configs/qwen2_audio_7b_meld.py", DATA_DIR="/m", EVAL_CHECKPOINT="/ck")
    args = python_module(shlex.split(remote_command(ev)), "emorl_jax.eval")
    assert (arg(args, "dataset"), arg(args, "split"), arg(args, "checkpoint")) == ("meld", "test", "/ck")


@pytest.mark.parametrize("path", [TPU_SH, GPU_SH], ids=lambda p: p.name)
@pytest.mark.parametrize("command", ["convert", "train", "eval"])
def test_flags_the_scripts_pass_are_defined_by_the_clis(path, command):
    """Oracle: the absl flags each CLI module defines (`--config.*` overrides are checked against the config)."""
    module = ROOT / "emorl_jax" / f"{command}.py"
    if not module.exists():
        pytest.skip(f"{module.name} not written yet")
    source = module.read_text()
    if "distributed.define_flags()" in source:  # the multi-process flags train and eval share
        source += (ROOT / "emorl_jax" / "distributed.py").read_text()
    defined = set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source))
    for env in ({"FOLD": "1"}, {}, {"EVAL_DATASET": "ravdess"}):
        (line,) = dry_run(path, command, DATA_DIR="/d", **env)
        words = shlex.split(remote_command(line)) if path == TPU_SH else line
        used = {a[2:].split("=", 1)[0] for a in python_module(words, f"emorl_jax.{command}")
                if not a.startswith("--config.")}
        assert used and used <= defined, used - defined


@pytest.mark.parametrize("path", [TPU_SH, GPU_SH], ids=lambda p: p.name)
def test_script_errors_name_the_problem(path):
    out = script(path, "train")
    assert out.returncode == 1 and "set DATA_DIR" in out.stderr
    out = script(path, "bogus")
    assert out.returncode == 1 and "unknown command 'bogus'" in out.stderr
    out = script(path, "train", DATA_DIR="/d", INIT_FROM="scratch")
    assert out.returncode == 1 and "INIT_FROM must be checkpoint or hf, got 'scratch'" in out.stderr
    out = script(path, "convert", "--extra")
    assert out.returncode == 1 and "convert takes no arguments" in out.stderr
    out = script(path)
    assert out.returncode == 2 and "usage:" in out.stderr
    assert script(path, "--help").stdout.startswith("usage:")


def test_tpu_script_refuses_unsafe_remote_names():
    out = script(TPU_SH, "setup", REMOTE_DIR="a b")
    assert out.returncode == 1 and "'a b' (REMOTE_DIR, VENV_DIR or RUN_NAME) must be a plain name" in out.stderr


def test_gpu_train_and_eval_set_the_memory_flags():
    commands = dry_run(GPU_SH, "train", "--config.rl.micro_batches=4", DATA_DIR="/data/MELD.Raw",
                       CONFIG="configs/qwen2_audio_7b_meld.py", XLA_FLAGS="--xla_dump_to=/tmp/x")
    (train,) = commands
    assert train[0] == "env"
    env = dict(w.split("=", 1) for w in train[1:3])
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_enable_latency_hiding_scheduler=true"
    args = python_module(train, "emorl_jax.train")
    assert "--multihost" not in args and arg(args, "workdir") == "runs/qwen2_audio_7b_meld"
    assert arg(args, "config.rl.micro_batches") == "4"
    check_overrides_parse(args)
    (ev,) = dry_run(GPU_SH, "eval", DATA_DIR="/data/MELD.Raw", CONFIG="configs/qwen2_audio_7b_meld.py")
    assert ev[1].startswith("XLA_PYTHON_CLIENT_MEM_FRACTION=")
    args = python_module(ev, "emorl_jax.eval")
    assert (arg(args, "dataset"), arg(args, "split"), arg(args, "checkpoint")) == (
        "meld", "test", "runs/qwen2_audio_7b_meld/final")


def test_gpu_setup_and_convert():
    commands = dry_run(GPU_SH, "setup", VENV_DIR="/tmp/definitely_not_a_venv")
    assert commands[0] == ["python3", "-m", "venv", "/tmp/definitely_not_a_venv"]
    assert commands[1] == ["/tmp/definitely_not_a_venv/bin/python", "-m", "pip", "install", "-e", f"{ROOT}[gcs]",
                           "jax[cuda12]"]
    (convert,) = dry_run(GPU_SH, "convert", HF_DIR="/m/hf", CKPT_DIR="/m/ck")
    assert convert[:2] == ["env", "JAX_PLATFORMS=cpu"]
    args = python_module(convert, "emorl_jax.convert")
    assert (arg(args, "hf_dir"), arg(args, "out"), arg(args, "param_dtype")) == ("/m/hf", "/m/ck", "float32")
