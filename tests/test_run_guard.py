"""A run directory records its config; a rerun with another config refuses (naming each change, old -> new) unless
resumed with the changes on purpose, which are then recorded."""

from __future__ import annotations

import json

import pytest

import emorl_jax
from emorl_jax.config import load_run_config
from emorl_jax.errors import ConfigError
from emorl_jax.run_guard import check_or_record

CONFIG = "configs/tiny_synthetic.py"


def test_fresh_run_records_config_and_version(tmp_path):
    config = load_run_config(CONFIG)
    assert check_or_record(config, tmp_path / "run") == {}
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["version"] == emorl_jax.__version__ and record["changes"] == []
    assert record["config"]["rl"]["learning_rate"] == config.rl.learning_rate
    assert record["config"]["data"]["length_buckets"] == list(config.data.length_buckets)
    assert check_or_record(load_run_config(CONFIG), tmp_path / "run") == {}  # the same config: a plain resume


def test_changed_config_refuses_naming_every_change(tmp_path):
    check_or_record(load_run_config(CONFIG), tmp_path)
    before = (tmp_path / "config.json").read_text()
    changed = load_run_config(CONFIG, "rl.learning_rate=0.5", "reward.accuracy=binary")
    with pytest.raises(ConfigError) as err:
        check_or_record(changed, tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'config.json'}: the config differs")
    old_lr = load_run_config(CONFIG).rl.learning_rate
    assert f"rl.learning_rate: {json.dumps(old_lr)} -> 0.5" in message
    assert 'reward.accuracy: "eswr" -> "binary"' in message and "--resume_with_changes" in message
    assert (tmp_path / "config.json").read_text() == before  # nothing recorded


def test_resume_with_changes_records_them(tmp_path):
    check_or_record(load_run_config(CONFIG), tmp_path)
    changed = load_run_config(CONFIG, "rl.steps=600")
    changes = check_or_record(changed, tmp_path, resume_with_changes=True)
    assert changes == {"rl.steps": (load_run_config(CONFIG).rl.steps, 600)}
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["config"]["rl"]["steps"] == 600
    assert record["changes"] == [{"version": emorl_jax.__version__,
                                  "changed": {"rl.steps": {"old": changes["rl.steps"][0], "new": 600}}}]
    assert check_or_record(changed, tmp_path) == {}  # the new config is now the run's
    with pytest.raises(ConfigError, match=r"rl.steps: 600 -> "):
        check_or_record(load_run_config(CONFIG), tmp_path)


def test_placement_keys_may_change(tmp_path):
    check_or_record(load_run_config(CONFIG), tmp_path)
    moved = load_run_config(CONFIG, "mesh.shape=(2,-1,1)", "data.worker_count=4")
    assert check_or_record(moved, tmp_path) == {}
