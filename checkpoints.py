"""Checkpoint files and what keeps a run's work safe: the one layout (config, weights, EMA
weights, and the optimizer state --resume needs), written atomically and never with non-finite
weights, read weights-only (a file cannot run code); the checks before a run that nothing a
previous run left is clobbered; resuming; and the signals (Ctrl-C, SIGTERM) that finish the step
and save. It never imports ddpm.py: configs arrive as dataclasses, models as modules.
"""

import dataclasses
import os
import shutil
import signal
import threading

import torch
import torch.distributed as dist

import files
import messages

CHECKPOINT_FORMAT = 1
CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".ckpt")


def checkpoint_state(cfg, model, ema=None, step=0, optimizer=None, scaler=None):
    """The one checkpoint layout: config, weights and EMA weights, and with an optimizer the
    state that --resume needs. Models are the raw (not compiled, not DDP) modules."""
    state = {"format_version": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg), "step": step,
             "model": model.state_dict(), "ema": (ema or model).state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state["scaler"] = scaler.state_dict()
    return state


def save_checkpoint(path, state):
    """Atomic; refuses non-finite weights, so a diverged model never replaces a checkpoint."""
    for part in ("model", "ema"):
        if part in state and not all(torch.isfinite(v).all() for v in state[part].values()
                                     if v.is_floating_point()):
            raise ValueError(f"the {part} weights are not finite (the training diverged); "
                             f"'{path}' was not written")
    files.write_atomically(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path):
    """The checkpoint dict; weights_only, so a file cannot run code. Clear error if unusable."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint '{path}' does not exist (train one with "
                         "'python ddpm.py train', or pass --ckpt PATH)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds objects we will not unpickle
        raise ValueError(f"checkpoint '{path}' cannot be read ({type(e).__name__}); "
                         "it is corrupt or not a ddpm.py checkpoint") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"'{path}' is not a ddpm.py checkpoint (no 'config' and 'model' entries)")
    if not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        raise ValueError(f"'{path}' is not a ddpm.py checkpoint (its config or weights are not "
                         "a dict)")
    return state


def load_weights(module, weights, path, what="weights"):
    """module.load_state_dict, with a sentence instead of a traceback when they do not fit."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"the {what} in '{path}' do not fit the model its config describes "
                         f"({detail})") from None


def checkpoint_step(path):
    """'step N' of an existing checkpoint, for messages; cheap (memory-mapped)."""
    try:
        return f"step {torch.load(path, mmap=True, weights_only=True)['step']}"
    except Exception:
        return "not a ddpm.py training checkpoint"


# ----------------------------------------------------------------------------------------------
# Before a run: nothing is clobbered, and there is room


def check_classifier(path, clf_cfg, cfg):
    """ValueError unless the noisy classifier's config (at `path`) fits the denoiser's: the same
    image shape and schedule, and the same classes."""
    for name in ("image_size", "in_channels", "T", "schedule"):
        if getattr(clf_cfg, name) != getattr(cfg, name):
            raise ValueError(f"--classifier {path} has {name}={getattr(clf_cfg, name)}, the model "
                             f"{getattr(cfg, name)}; train the classifier with the model's settings")
    if cfg.num_classes and clf_cfg.class_names != cfg.class_names:
        raise ValueError(f"--classifier {path} knows the classes {', '.join(clf_cfg.class_names)}; "
                         f"the model {', '.join(cfg.class_names)}")


def default_run_dir(cfg):
    """runs/<data name>, or runs/<data name>-classifier for a noisy classifier."""
    name = os.path.basename(os.path.normpath(cfg.data)) + ("-classifier" if cfg.kind == "classifier" else "")
    return os.path.join("runs", name)


def check_run_files(cfg, resume, overwrite):
    """Before any work: the checkpoint and run directory can be written, and nothing a previous
    run left there is clobbered unless --resume continues it or --overwrite replaces it."""
    log = os.path.join(cfg.run_dir, "metrics.jsonl")
    if cfg.run_dir.lower().endswith(CHECKPOINT_EXTENSIONS):
        raise ValueError(f"--out '{cfg.run_dir}' names the run directory, a folder for the log and pictures; "
                         "the checkpoint file is --ckpt")
    run_dir, data_dir = os.path.realpath(cfg.run_dir), os.path.realpath(cfg.data)
    if os.path.isdir(cfg.data) and os.path.commonpath([run_dir, data_dir]) == data_dir:
        raise ValueError(f"--out '{cfg.run_dir}' is inside the data folder '{cfg.data}': the run's pictures "
                         "would become training images. Pick a run directory outside it")
    exists = os.path.exists(cfg.ckpt) and not os.path.isdir(cfg.ckpt)
    continuing = resume is not None and exists and os.path.samefile(resume, cfg.ckpt)
    if exists and not (overwrite or continuing):
        raise ValueError(f"--ckpt '{cfg.ckpt}' exists ({checkpoint_step(cfg.ckpt)}); continue that "
                         "run with --resume, or start over with --overwrite")
    files.check_output_path(cfg.ckpt, CHECKPOINT_EXTENSIONS, "--ckpt")
    if os.path.isfile(log) and os.path.getsize(log) and resume is None and not overwrite:
        raise ValueError(f"'{log}' holds the log of an earlier run; continue that run with --resume, "
                         "start over with --overwrite, or pick another --out")
    files.check_writable_folder(cfg.run_dir, "--out")


def check_free_space(path, num_params):
    """A checkpoint holds the weights 4 times (model, EMA, Adam's two moments): refuse to start
    where it cannot be written, instead of failing at the first save."""
    need = 4 * 4 * num_params + (64 << 20)  # float32 tensors, plus room for logs and grids
    folder = os.path.dirname(os.path.abspath(path))
    missing = files.missing_folders(folder)  # not made yet: the disk it will be made on
    free = shutil.disk_usage(os.path.dirname(missing[-1]) if missing else folder).free
    if free < need:
        raise ValueError(f"only {free >> 20} MB free beside '{path}'; a checkpoint of this model "
                         f"needs about {need >> 20} MB. Free some space or choose another --ckpt")


# ----------------------------------------------------------------------------------------------
# Resuming and saving during a run


def restore(state, path, saved_cfg, run, fixed):
    """Load the training state read from `path` into a run (ddpm.Run: its raw_model, ema,
    optimizer and scaler); returns its step. The config fields named in `fixed` (those that
    define the model) must match the run's; changed training settings are reported, and this
    run's win."""
    cfg, optimizer = run.cfg, run.optimizer
    for name in fixed:
        if getattr(saved_cfg, name) != getattr(cfg, name):
            raise ValueError(f"--resume {path}: the checkpoint has {name}={getattr(saved_cfg, name)}, "
                             f"this run {getattr(cfg, name)}; a resumed run cannot change the model "
                             "or its schedule")
    if state.get("format_version") != CHECKPOINT_FORMAT or not isinstance(state.get("optimizer"), dict):
        raise ValueError(f"'{path}' holds weights only, not a training state to resume")
    load_weights(run.raw_model, state["model"], path)
    load_weights(run.ema, state["ema"], path, "EMA weights")
    load_weights(optimizer, state["optimizer"], path, "optimizer state")
    for group in optimizer.param_groups:  # the saved groups carry the old run's settings: this run's win
        group.update(optimizer.defaults)
    load_weights(run.scaler, state["scaler"], path, "gradient scaler state")
    step = int(state["step"])
    for f in dataclasses.fields(cfg):
        old, new = getattr(saved_cfg, f.name), getattr(cfg, f.name)
        if old != new and f.name not in ("ckpt", "run_dir", "steps"):
            messages.say(f"resume: {f.name} was {old} in the checkpoint and is {new} now; {new} is used "
                         f"from step {step} on")
    messages.say(f"resuming from {path} at step {step} of {cfg.steps}")
    return step


def on_disk(ckpt, saved_step):
    """What the checkpoint file holds, for the messages of a run that stops."""
    return f"'{ckpt}' holds step {saved_step}" if saved_step is not None else \
        "no checkpoint was written by this run"


def save_during_run(path, state, final, saved_step):
    """Save a training state; returns the step now on disk. A periodic save that fails (disk
    full) warns and the run goes on with the older file; the final one must work (Stopped)."""
    try:
        save_checkpoint(path, state)
        return state["step"]
    except (OSError, ValueError) as e:
        message = f"could not save step {state['step']} to '{path}' ({getattr(e, 'strerror', None) or e})"
        if final or isinstance(e, ValueError):
            raise Stopped(f"error: {message}; {on_disk(path, saved_step)}", 1) from None
        messages.warn(f"{message}; {on_disk(path, saved_step)}; training goes on")
        return saved_step


class Diverged(Exception):
    """The loss, the gradients or the weights stopped being finite."""


class Stopped(Exception):
    """Training stopped early (a signal, or a diverged model); `exit_code` for main()."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (kill, job schedulers) ask the loop to stop after the step it
    is in, so the checkpoint is saved at a step boundary and resumes exactly. A second signal
    stops at once (KeyboardInterrupt). Outside the main thread signals cannot be caught: no-op."""

    def __enter__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        messages.warn(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                      "(send it again to stop at once, without saving)", kind=None)

    def __exit__(self, exc_type, *exc):
        # a job of several processes that is ending with an error: the SIGTERM torchrun sends the
        # others must not cut short the message that says why
        ending = exc_type is not None and dist.is_initialized()
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_IGN if ending else handler)


def ignore_stop_signals(worker_id):
    """DataLoader workers leave Ctrl-C and SIGTERM (which job schedulers send to the whole process
    group) to the main process, which finishes the step first; a worker killed by them would make
    the loader raise in the middle of that step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
