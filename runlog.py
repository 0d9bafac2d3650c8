"""A training run's log: metrics.jsonl (one JSON line per logged step), loss.png (redrawn at
every line) and, where the tensorboard package is installed, the same numbers and the sample
grids as TensorBoard event files, all in the run directory. The log is not the work: a log that
cannot be written warns once and training goes on.
"""

import contextlib
import json
import math
import os

import core


class RunLog:
    """A resumed run first drops the lines written after the step it resumes from (and tells
    TensorBoard to, by a purge step; a new run purges from step 0, so an earlier run's events in
    the folder are hidden)."""

    def __init__(self, run_dir, resume_step=None, tensorboard=True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.png = os.path.join(run_dir, "loss.png")
        self.rows, self.warned, self.file, self.tb = [], False, None, None
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path) as f:
                for line in f:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        row = json.loads(line)
                        if row["step"] <= resume_step:
                            self.rows.append(row)
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        try:
            core.write_text(self.path, text)
            self.file = open(self.path, "a")
        except OSError as e:
            self.warn(e)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                core.warn("the tensorboard package is not installed, so the log is metrics.jsonl and "
                          "loss.png only (pip install tensorboard, or pass --no-tensorboard)", "note")
            else:
                try:
                    self.tb = SummaryWriter(run_dir, flush_secs=30,
                                            purge_step=0 if resume_step is None else resume_step + 1)
                except OSError as e:
                    self.warn(e)

    def write(self, row):
        """One logged step: {'step': N, name: number, ...}; numbers that are not finite are
        written as null (JSON has no NaN)."""
        self.rows.append(row)
        try:
            if self.file is not None:
                clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}
                self.file.write(json.dumps(clean) + "\n")
                self.file.flush()
            if self.tb is not None:
                for name, value in row.items():
                    if name != "step":
                        self.tb.add_scalar(f"train/{name}", value, row["step"])
        except OSError as e:
            self.warn(e)
        self.draw()

    def image(self, step, grid):
        """A (rows, columns, C) uint8 picture in TensorBoard's images tab."""
        if self.tb is not None:
            try:
                self.tb.add_image("samples", grid, step, dataformats="HWC")
            except OSError as e:
                self.warn(e)

    def draw(self):
        try:
            core.save_loss_curve(self.rows, self.png)
        except OSError as e:
            self.warn(e)

    def warn(self, e):
        if not self.warned:  # the log is not the work: keep training, say it once
            core.warn(f"cannot write the log in '{os.path.dirname(self.path)}' "
                      f"({getattr(e, 'strerror', None) or e}); training goes on")
            self.warned = True

    def close(self):
        for closing in (self.file, self.tb):
            with contextlib.suppress(OSError):
                if closing is not None:
                    closing.close()
