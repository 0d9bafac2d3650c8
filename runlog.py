"""A training run's log: metrics.jsonl (one JSON line per logged step), loss.png (redrawn at
every line) and, where the tensorboard package is installed, the same numbers and the sample
grids as TensorBoard event files, all in the run directory; and the images per second of
training, which leave out the time spent saving and sampling. The log is not the work: a log
that cannot be written warns once and training goes on.
"""

import contextlib
import json
import math
import os
import threading
import time

import files
import messages
import pictures


WARNING = threading.Lock()


def clock():
    """Seconds, for the images per second (a test sets its own clock here)."""
    return time.monotonic()


class RunLog:
    """A resumed run first drops the lines written after the step it resumes from (and tells
    TensorBoard to, by a purge step; a new run purges from step 0, so an earlier run's events in
    the folder are hidden). run_dir None: the log of a process that writes none (under torchrun,
    all but rank 0), which only counts."""

    def __init__(self, run_dir, resume_step=None, tensorboard=True):
        self.rows, self.warned, self.file, self.tb = [], False, None, None
        self.images, self.since, self.paused_s = 0, clock(), 0.0  # the images/s since the last line
        self.path = run_dir and os.path.join(run_dir, "metrics.jsonl")
        if run_dir is None:
            return
        self.png = os.path.join(run_dir, "loss.png")
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path) as f:
                for line in f:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        row = json.loads(line)
                        if row["step"] <= resume_step:
                            self.rows.append(row)
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        try:
            files.write_text(self.path, text)
            self.file = open(self.path, "a")
        except OSError as e:
            self.warn(e)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                messages.warn("the tensorboard package is not installed, so the log is metrics.jsonl and "
                              "loss.png only (pip install tensorboard, or pass --no-tensorboard)", "note")
            else:
                self.excepthook, threading.excepthook = threading.excepthook, self.writer_thread_failed
                try:
                    self.tb = SummaryWriter(run_dir, flush_secs=30,
                                            purge_step=0 if resume_step is None else resume_step + 1)
                except OSError as e:
                    self.warn(e)

    def trained(self, images):
        """Count the images of a training step."""
        self.images += images

    @contextlib.contextmanager
    def paused(self):
        """Time that is not training (saving, sampling): left out of the images per second."""
        start = clock()
        try:
            yield
        finally:
            self.paused_s += clock() - start

    def write(self, row):
        """One logged step: {'step': N, name: number, ...} and img_per_s, the images trained per
        second since the last line, the time paused left out; numbers that are not finite are
        written as null (JSON has no NaN). Returns the row written."""
        row = {**row, "img_per_s": self.images / max(clock() - self.since - self.paused_s, 1e-9)}
        if self.path is not None:
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
        self.images, self.since, self.paused_s = 0, clock(), 0.0  # the time writing took is left out too
        return row

    def image(self, step, grid):
        """A (rows, columns, C) uint8 picture in TensorBoard's images tab."""
        if self.tb is not None:
            try:
                self.tb.add_image("samples", grid, step, dataformats="HWC")
            except OSError as e:
                self.warn(e)

    def draw(self):
        if self.path is None:
            return
        try:
            pictures.save_loss_curve(self.rows, self.png)
        except OSError as e:
            self.warn(e)

    def writer_thread_failed(self, args):
        """TensorBoard writes its events from a thread of its own: a write that fails there (a full
        disk) is this log's one warning, not a traceback; its next call raises it again, here."""
        if isinstance(args.exc_value, OSError) and "tensorboard" in type(args.thread).__module__:
            self.warn(args.exc_value)
        else:
            self.excepthook(args)

    def warn(self, e):
        with WARNING:  # TensorBoard's thread may warn at the same moment as the training loop
            if not self.warned:  # the log is not the work: keep training, say it once
                messages.warn(f"cannot write the log in '{os.path.dirname(self.path)}' "
                              f"({getattr(e, 'strerror', None) or e}); training goes on")
                self.warned = True

    def close(self):
        for closing in (self.file, self.tb):
            with contextlib.suppress(OSError):
                if closing is not None:
                    closing.close()
        if threading.excepthook == self.writer_thread_failed:
            threading.excepthook = self.excepthook
