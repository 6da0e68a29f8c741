"""Run metrics as JSON lines (`<workdir>/metrics.jsonl`) and TensorBoard events (`<workdir>/tb`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


class RunLog:
    """`log(step, {"name": value, ...}, stage=...)` appends one JSON line and one scalar per value to TensorBoard."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(Path(workdir) / "tb"))

    def log(self, step: int, values: dict, *, stage: str) -> dict:
        row = {"stage": stage, "step": int(step)}
        for name, value in values.items():
            value = float(np.asarray(value))
            row[name] = value if math.isfinite(value) else str(value)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            for name, value in row.items():
                if isinstance(value, float):
                    self._tb.add_scalar(f"{stage}/{name}", value, int(step))
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
