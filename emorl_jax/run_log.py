"""Run metrics as JSON lines (`<workdir>/metrics.jsonl`) and TensorBoard events (`<workdir>/tb`).

The workdir may be local or remote (`gs://...`). Locally each row is appended as it comes and tensorboardX
writes `<workdir>/tb` itself. A remote object cannot be appended to, and tensorboardX writes `gs://` only with
google-cloud-storage installed, so under a remote workdir the rows stay in memory (after those already in
metrics.jsonl) and the events go to a local temporary folder; every `flush_secs` (and at `flush()`, `close()`
and interpreter exit) metrics.jsonl is rewritten and the event files are copied to `<workdir>/tb`. A process
killed outright (SIGKILL) loses at most the last `flush_secs` of rows and events there.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from emorl_jax.paths import as_path, is_remote, upload


class RunLog:
    """`log(step, {"name": value, ...}, stage=...)` writes one JSON line and one TensorBoard scalar per value."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, flush_secs: float = 60.0):
        self.enabled = enabled
        self.workdir = as_path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.remote = is_remote(self.workdir)
        self.flush_secs = flush_secs
        self._tb = None
        self._lines: list[str] = []  # remote: every line of metrics.jsonl
        self._flushed = time.monotonic()
        if enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            if self.remote:
                if self.path.exists():  # a resumed run keeps the earlier rows
                    self._lines = self.path.read_text().splitlines(keepends=True)
                self._tb_local = Path(tempfile.mkdtemp(prefix="emorl_jax_tb_"))
                # A unique file name: the copies of these events never replace those of an earlier session.
                self._tb = SummaryWriter(str(self._tb_local), filename_suffix=f".{uuid.uuid4().hex[:8]}")
                atexit.register(self.close)
            else:
                self._tb = SummaryWriter(str(self.workdir / "tb"))

    def log(self, step: int, values: dict, *, stage: str) -> dict:
        row = {"stage": stage, "step": int(step)}
        for name, value in values.items():
            value = float(np.asarray(value))
            row[name] = value if math.isfinite(value) else str(value)
        if self.enabled:
            line = json.dumps(row) + "\n"
            if self.remote:
                self._lines.append(line)
            else:
                with self.path.open("a") as f:
                    f.write(line)
            for name, value in row.items():
                if isinstance(value, float):
                    self._tb.add_scalar(f"{stage}/{name}", value, int(step))
            if self.remote and time.monotonic() - self._flushed >= self.flush_secs:
                try:
                    self.flush()
                except OSError as e:  # a storage hiccup must not stop training: the next flush retries
                    print(f"warning: {self.workdir}: metrics not copied yet ({e})")
        return row

    def flush(self) -> None:
        """Writes out everything logged so far (remote workdir: rewrites metrics.jsonl, copies the events)."""
        if self._tb is not None:
            self._tb.flush()
            self._sync()

    def close(self) -> None:
        if self._tb is None:
            return
        self._tb.close()
        self._sync()
        self._tb = None
        if self.remote:
            shutil.rmtree(self._tb_local, ignore_errors=True)
            atexit.unregister(self.close)

    def _sync(self) -> None:
        if not self.remote:
            return
        self.path.write_text("".join(self._lines))
        for f in sorted(p for p in self._tb_local.rglob("*") if p.is_file()):
            upload(f, self.workdir / "tb" / f.relative_to(self._tb_local).as_posix())
        self._flushed = time.monotonic()
