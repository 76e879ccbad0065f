"""One metrics module for every loop: JSON lines, TensorBoard, and Weights & Biases when it is installed.

``MetricsLogger(workdir)`` appends one JSON object per record to ``<workdir>/metrics.jsonl``
(``{"step": s, "run": name, "time": unix seconds, **values}``), writes the numeric values as TensorBoard scalars under
``<workdir>/tensorboard/<run name>/`` (tensorboardX), and, with ``wandb=True`` and the ``wandb`` package installed,
logs them to a W&B run of the same name.

Resume-safe: ``MetricsLogger(workdir, resume_step=s)`` keeps the run name stored in the workdir, drops every JSONL
record past step ``s`` (written after the checkpoint a resumed run restarts from, so they will be written again) and
purges TensorBoard events past ``s``; a resumed run therefore never repeats a step. Run names are unique:
``<prefix>-<UTC time>-<random>`` unless given, stored in ``<workdir>/run.json`` so a resume keeps it.

Only the primary process (``jax.process_index() == 0`` in a multi-host run) should write: pass ``enabled=False``
elsewhere and every call is a no-op.
"""
from __future__ import annotations

import gzip
import json
import math
import numbers
import os
import secrets
import time
from typing import Any, Mapping

JSONL = "metrics.jsonl"
RUN_FILE = "run.json"


def unique_run_name(prefix: str = "run") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of ``<workdir>/metrics.jsonl`` (a truncated last line, from a crash mid-write, is skipped)."""
    path = os.path.join(os.fspath(workdir), JSONL)
    return read_jsonl(path) if os.path.exists(path) else []


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``.gz``: read compressed); a truncated line (a writer killed mid-line) is
    skipped."""
    path = os.fspath(path)
    records = []
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _scalar(value) -> float | None:
    """A finite-or-not float for TensorBoard, or None for values that are not scalars (lists, strings)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Number):
        return float(value)
    shape = getattr(value, "shape", None)
    if shape == () and hasattr(value, "item"):
        return float(value.item())
    return None


def _jsonable(value):
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # NaN/inf as strings: JSON has no literal for them
    scalar = _scalar(value)
    if scalar is not None:
        return _jsonable(scalar)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        return [_jsonable(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    return str(value)


class MetricsLogger:
    """Write step records to JSONL, TensorBoard and (optionally) W&B; see the module docstring."""

    def __init__(self, workdir: str | os.PathLike, *, run_name: str | None = None, prefix: str = "run",
                 resume_step: int | None = None, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "m1jax", enabled: bool = True, log=print):
        self.workdir = os.fspath(workdir)
        self.enabled = enabled
        self.run_name = run_name
        self._tb = self._wandb = self._jsonl = None
        if not enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        self.run_name = run_name or self._stored_run_name() or unique_run_name(prefix)
        self._store_run_name()
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._jsonl = open(os.path.join(self.workdir, JSONL), "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log("tensorboardX is not installed: metrics go to metrics.jsonl only (pip install tensorboardX)")
            else:
                # purge_step: events at or past it (from the run before the resume) are dropped by TensorBoard.
                self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard", self.run_name),
                                         purge_step=None if resume_step is None else resume_step + 1)
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                log("wandb is not installed: no Weights & Biases logging (pip install wandb)")
            else:
                self._wandb = wandb_lib.init(project=wandb_project, name=self.run_name, id=self.run_name,
                                             resume="allow", dir=self.workdir)

    # ------------------------------------------------------------------------------------------------ run name
    def _stored_run_name(self) -> str | None:
        path = os.path.join(self.workdir, RUN_FILE)
        if os.path.exists(path):
            with open(path) as fh:
                return json.load(fh).get("run_name")
        return None

    def _store_run_name(self) -> None:
        path = os.path.join(self.workdir, RUN_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"run_name": self.run_name}, fh)
        os.replace(tmp, path)

    def _truncate_after(self, step: int) -> None:
        """Rewrite metrics.jsonl without records past ``step`` (atomically: a crash leaves the old or new file)."""
        path = os.path.join(self.workdir, JSONL)
        if not os.path.exists(path):
            return
        kept = [r for r in read_metrics(self.workdir) if r.get("step", 0) <= step]
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            for record in kept:
                fh.write(json.dumps(record) + "\n")
        os.replace(tmp, path)

    # ------------------------------------------------------------------------------------------------ writing
    def write(self, step: int, values: Mapping[str, Any], *, prefix: str = "") -> None:
        """One record at ``step``; TensorBoard/W&B get the scalar values as ``<prefix>/<name>`` (or ``<name>``)."""
        if not self.enabled:
            return
        record = {"step": int(step), "run": self.run_name, "time": round(time.time(), 3),
                  **{k: _jsonable(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {}
        for k, v in values.items():
            x = _scalar(v)
            if x is not None and k != "step":
                scalars[f"{prefix}/{k}" if prefix else k] = x
        if self._tb is not None:
            for k, x in scalars.items():
                if math.isfinite(x):
                    self._tb.add_scalar(k, x, int(step))
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
