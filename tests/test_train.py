"""Training, checkpoints, data and the command line of ddpm.py (CPU, tiny model, 16x16): exact
resume (also after a signal in the middle of a step), nothing a user did can destroy a file or
lose finished work, and every mistake is a sentence."""
import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import ddpm
import distill
import distributed
import pictures
import sampling
from conftest import ROOT, max_difference, no_space_left, refusal, run_script
from schedules import Sampler


def tiny_cfg(tmp_path, name, **kw):
    base = dict(data="shapes", image_size=16, dropout=0.1, batch_size=8, steps=6, warmup=2,
                ema_decay=0.9, save_every=1000, sample_every=0, log_every=1,
                run_dir=str(tmp_path / name), ckpt=str(tmp_path / f"{name}.pt"), num_workers=0)
    base.update(kw)
    return ddpm.make_config("tiny", **base)


def load(path):
    return torch.load(path, weights_only=True)


def run_files(folder):
    """The names in a run directory, its one TensorBoard event file as 'events.out.tfevents.*'."""
    names = sorted(os.listdir(folder))
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) == 1, names
    return sorted(["events.out.tfevents.*"] + [n for n in names if n not in events])


# -- exact resume -------------------------------------------------------------------------------

@pytest.mark.heavy
def test_resume_continues_exactly(tmp_path):
    """Stopped at k and resumed to 2k == 2k uninterrupted: weights, EMA and Adam state."""
    ddpm.train(tiny_cfg(tmp_path, "straight", steps=6))
    ddpm.train(tiny_cfg(tmp_path, "halves", steps=3))
    ddpm.train(tiny_cfg(tmp_path, "halves", steps=6), resume=str(tmp_path / "halves.pt"))
    a, b = load(tmp_path / "straight.pt"), load(tmp_path / "halves.pt")
    assert a["step"] == b["step"] == 6
    worst = max_difference(a, b)
    moved = max((a["model"][k] - a["ema"][k]).abs().max().item() for k in a["model"])
    print(f"max |straight - resumed| over model, EMA and Adam = {worst}; (model - EMA: {moved:.2e})")
    assert worst == 0.0 and moved > 0
    log = [json.loads(line) for line in open(tmp_path / "halves" / "metrics.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # the resumed run appends
    straight = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["loss"] for r in log] == [r["loss"] for r in straight]


@pytest.mark.heavy
def test_a_signal_in_the_middle_of_a_step_saves_at_its_end_and_resumes_exactly(tmp_path, monkeypatch):
    """SIGINT arrives during the first micro-batch of step 3 (of 6, 2 micro-batches each): the
    step is finished, saved as step 3, and resuming from it gives the uninterrupted weights."""
    ddpm.train(tiny_cfg(tmp_path, "straight", grad_accum=2))
    real = ddpm.GaussianDiffusion.training_loss
    calls = {"n": 0}

    def loss_with_a_signal(self, model, x0, i, noise, y=None):
        calls["n"] += 1  # call 1: pre-flight; then 2 per step; call 6: step 3, micro-batch 1 of 2
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, model, x0, i, noise, y)

    monkeypatch.setattr(ddpm.GaussianDiffusion, "training_loss", loss_with_a_signal)
    cfg = tiny_cfg(tmp_path, "stopped", grad_accum=2)
    with pytest.raises(ddpm.Stopped) as stop:
        ddpm.train(cfg)
    print(stop.value)
    assert stop.value.exit_code == 130 and "saved step 3" in str(stop.value) and "--resume" in str(stop.value)
    assert load(cfg.ckpt)["step"] == 3 and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    monkeypatch.undo()
    ddpm.train(cfg, resume=cfg.ckpt)
    worst = max_difference(load(tmp_path / "straight.pt"), load(cfg.ckpt))
    print(f"interrupted mid-step and resumed vs uninterrupted: max difference {worst}")
    assert worst == 0.0


@pytest.mark.heavy
def test_sigterm_saves_like_ctrl_c(tmp_path):
    """What schedulers and `kill` send: the step is finished and saved, exit code 128 + 15."""
    base = [sys.executable, os.path.join(ROOT, "ddpm.py"), "train", "--data", "shapes", "--model", "tiny",
            "--image-size", "16", "--batch-size", "8", "--sample-every", "0", "--warmup", "10"]
    p = subprocess.Popen(base + ["--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=tmp_path)
    assert "data: shapes" in p.stdout.readline()
    assert "pre-flight ok" in p.stdout.readline()
    time.sleep(2)  # a few dozen steps
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert "SIGTERM: saved step" in err and "--resume" in err
    saved = load(tmp_path / "ckpt.pt")["step"]
    print(f"SIGTERM saved step {saved}")
    assert saved > 0
    r = subprocess.run(base + ["--steps", str(saved + 2), "--resume"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from ckpt.pt at step {saved}" in r.stdout
    assert load(tmp_path / "ckpt.pt")["step"] == saved + 2
    steps = [json.loads(line)["step"] for line in open(tmp_path / "runs" / "shapes" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == saved + 2  # no step logged twice


def test_resume_alone_continues_the_run_and_says_which_settings_changed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ddpm.main(["train", "--image-size", "16", "--steps", "2", "--batch-size", "8", "--warmup", "1",
               "--sample-every", "0", "--ckpt", "a.pt"])
    ddpm.main(["train", "--resume", "a.pt", "--steps", "3", "--batch-size", "4", "--lr", "1e-4"])
    out = capsys.readouterr().out
    print(out)
    assert "batch_size was 8 in the checkpoint and is 4 now; 4 is used from step 2 on" in out
    assert "lr was 0.0002 in the checkpoint and is 0.0001 now" in out
    state = load(tmp_path / "a.pt")
    assert state["step"] == 3 and state["config"]["image_size"] == 16 and state["config"]["batch_size"] == 4
    refusal(ddpm.main, ["train", "--resume", "a.pt", "--model", "cifar10"], "preset 'tiny'")


# -- nothing is destroyed, no finished work is lost ---------------------------------------------

def test_a_new_run_refuses_to_replace_an_earlier_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["train", "--image-size", "16", "--steps", "3", "--batch-size", "8", "--sample-every", "0",
             "--out", "run"]
    ddpm.main(flags)
    ckpt, log = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "run" / "metrics.jsonl").read_bytes()
    refusal(ddpm.main, flags, "'ckpt.pt' exists (step 3)", "--resume", "--overwrite")
    os.rename("ckpt.pt", "kept.pt")
    refusal(ddpm.main, flags, "metrics.jsonl' holds the log of an earlier run", "--resume", "--overwrite")
    refusal(ddpm.main, flags + ["--resume", "kept.pt", "--ckpt", "kept.pt", "--out", "other", "--ckpt", "samples.png"],
            "--ckpt 'samples.png'", ".pt")
    assert (tmp_path / "kept.pt").read_bytes() == ckpt
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == log
    ddpm.main(flags + ["--steps", "2", "--overwrite"])
    assert load(tmp_path / "ckpt.pt")["step"] == 2
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [2]


def test_diverged_weights_never_replace_a_good_checkpoint(tmp_path, capsys):
    """lr 1e6 after 4 good steps: the step-5 weights are finite (about 1e6) but give a NaN loss."""
    cfg = tiny_cfg(tmp_path, "run", steps=4, save_every=1)
    ddpm.train(cfg)
    good = (tmp_path / "run.pt").read_bytes()
    cfg = tiny_cfg(tmp_path, "run", steps=10, save_every=1, lr=1e6, warmup=0)
    with pytest.raises(ddpm.Stopped) as stop:
        ddpm.train(cfg, resume=cfg.ckpt)
    print(stop.value)
    assert stop.value.exit_code == 1 and "'" + cfg.ckpt + "' holds step 4" in str(stop.value)
    assert (tmp_path / "run.pt").read_bytes() == good
    assert os.path.getmtime(tmp_path / "run" / "loss.png") >= os.path.getmtime(tmp_path / "run.pt")


def test_nan_loss_stops_and_says_which_step_is_kept(tmp_path, monkeypatch):
    real = ddpm.GaussianDiffusion.training_loss
    calls = {"n": 0}

    def loss_turning_nan(self, model, x0, i, noise, y=None):
        calls["n"] += 1  # call 1 is the pre-flight, then one per step and one per save check
        loss = real(self, model, x0, i, noise, y)
        return loss * float("nan") if calls["n"] >= 6 else loss

    monkeypatch.setattr(ddpm.GaussianDiffusion, "training_loss", loss_turning_nan)
    cfg = tiny_cfg(tmp_path, "nan", steps=10, save_every=2)
    with pytest.raises(ddpm.Stopped) as stop:
        ddpm.train(cfg)
    print(stop.value)
    assert "nan" in str(stop.value) and "holds step 2" in str(stop.value)
    assert checkpoints.read_checkpoint(cfg.ckpt)["step"] == 2
    assert (tmp_path / "nan" / "loss.png").exists()  # drawn at every log, not only at the end


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    path = tmp_path / "c.pt"
    checkpoints.save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(2)}, "step": 1})
    with pytest.raises(ValueError, match="not finite"):
        checkpoints.save_checkpoint(path, {"config": {}, "model": {"w": torch.tensor([1.0, float("inf")])}})
    assert load(path)["step"] == 1


def test_crash_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(3)}, "step": 1})

    def dying_save(obj, f):  # writes half a file, then the machine "dies"
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(3)}, "step": 2})
    monkeypatch.undo()
    state = checkpoints.read_checkpoint(str(path))
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_temp_files_of_killed_writers_are_removed_on_the_next_save(tmp_path):
    path = tmp_path / "ckpt.pt"
    sleeper = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        (tmp_path / f"ckpt.pt.tmp{dead.pid}").write_bytes(b"left by kill -9")  # its writer is gone
        (tmp_path / f"ckpt.pt.tmp{sleeper.pid}").write_bytes(b"being written")  # its writer lives
        (tmp_path / "other.pt.tmp1").write_bytes(b"not ours")
        checkpoints.save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(1)}, "step": 1})
        assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", f"ckpt.pt.tmp{sleeper.pid}", "other.pt.tmp1"]
    finally:
        sleeper.kill()


@pytest.mark.heavy
def test_a_failed_save_warns_and_training_goes_on_but_the_last_must_work(tmp_path, monkeypatch, capsys):
    real = torch.save
    calls = {"n": 0}

    def full_disk_once(obj, f):
        calls["n"] += 1
        if calls["n"] == 1:
            no_space_left()
        real(obj, f)

    monkeypatch.setattr(torch, "save", full_disk_once)
    cfg = tiny_cfg(tmp_path, "full", steps=4, save_every=2)
    ddpm.train(cfg)
    err = capsys.readouterr().err
    assert "could not save step 2" in err and "No space left" in err and "training goes on" in err
    assert load(cfg.ckpt)["step"] == 4

    monkeypatch.setattr(torch, "save", no_space_left)
    with pytest.raises(ddpm.Stopped) as stop:
        ddpm.train(tiny_cfg(tmp_path, "full", steps=6, save_every=0), resume=cfg.ckpt)
    print(stop.value)
    assert "could not save step 6" in str(stop.value) and "holds step 4" in str(stop.value)
    assert load(cfg.ckpt)["step"] == 4


@pytest.mark.heavy
def test_a_disk_that_fills_during_training_warns_then_stops_with_a_sentence(small_disk, tmp_path, monkeypatch, capsys):
    """A real full disk (a tmpfs filled to the last byte while the run trains): torch's zip writer
    fails under the save with a RuntimeError, not an OSError. The periodic save warns and training
    goes on; the final one stops with a sentence; the step saved before stays whole."""
    disk = small_disk(96 << 20)  # room for the run's free-space check (a checkpoint and 64 MB)
    real, calls = checkpoints.save_checkpoint, []

    def fill_then_save(path, state):
        calls.append(state["step"])
        if len(calls) == 2:  # something else fills the disk between the first save and the second
            disk.fill()
        real(path, state)

    monkeypatch.setattr(checkpoints, "save_checkpoint", fill_then_save)
    ckpt = disk.path / "c.pt"
    argv = ["train", "--data", "shapes", "--model", "tiny", "--image-size", "16", "--steps", "6", "--batch-size", "4",
            "--save-every", "2", "--sample-every", "0", "--log-every", "2", "--num-workers", "0",
            "--ckpt", ckpt, "--out", tmp_path / "run", "--no-tensorboard"]
    with pytest.raises(SystemExit) as stop:
        ddpm.main([str(a) for a in argv])
    err = capsys.readouterr().err
    print(err.strip().splitlines()[-2:])
    assert stop.value.code == 1 and calls == [2, 4, 6]
    assert "Traceback" not in err and "could not save step 4" in err and "training goes on" in err
    assert "error: could not save step 6" in err and "No space left on device" in err and "holds step 2" in err
    assert load(ckpt)["step"] == 2 and sorted(os.listdir(disk.path)) == ["c.pt", "filler"]


@pytest.mark.heavy
def test_a_run_folder_on_a_full_disk_warns_once_and_training_finishes(small_disk, tmp_path):
    """--out on a disk with no byte left: metrics.jsonl, loss.png and TensorBoard's events all fail
    to write; one warning, no traceback (TensorBoard writes from a thread of its own), the
    checkpoint saved."""
    disk = small_disk(1 << 20)
    disk.fill()
    r = run_script("ddpm.py", "train", "--data", "shapes", "--model", "tiny", "--image-size", "16", "--steps", "2",
                   "--batch-size", "4", "--sample-every", "2", "--log-every", "1", "--num-workers", "0",
                   "--T", "25", "--ckpt", tmp_path / "c.pt", "--out", disk.path / "run")  # T 25: a short grid
    print(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0 and "Traceback" not in r.stderr and "Exception" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("cannot write the log") == 1 and "No space left" in r.stderr
    assert load(tmp_path / "c.pt")["step"] == 2


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (every write: no space)")
def test_a_full_disk_under_the_log_warns_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    """metrics.jsonl on a device that is always full (/dev/full), loss.png and TensorBoard failing
    the same way: one warning, the training and its checkpoint unharmed (the README's promise)."""
    import runlog
    from torch.utils.tensorboard import SummaryWriter

    real_open = open
    monkeypatch.setattr(runlog, "open", lambda path, mode="r": real_open("/dev/full" if path.endswith("metrics.jsonl")
                                                                        else path, mode), raising=False)
    monkeypatch.setattr(pictures, "save_loss_curve", no_space_left)
    monkeypatch.setattr(SummaryWriter, "add_scalar", no_space_left)
    cfg = tiny_cfg(tmp_path, "fulllog", steps=4, save_every=2)
    ddpm.train(cfg)
    err = capsys.readouterr().err
    print(err.strip().splitlines()[0])
    assert err.count("cannot write the log") == 1 and "No space left" in err and "training goes on" in err
    assert load(cfg.ckpt)["step"] == 4


def test_outputs_that_cannot_be_written_fail_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    flags = ["train", "--image-size", "16", "--steps", "2", "--batch-size", "8"]
    refusal(ddpm.main, flags + ["--ckpt", tmp_path / "a_file" / "c.pt"], "--ckpt: cannot write")
    refusal(ddpm.main, flags + ["--ckpt", "/proc/ddpm/c.pt"], "--ckpt: cannot write")
    refusal(ddpm.main, flags + ["--ckpt", tmp_path / "c.pt", "--out", "/proc/ddpm"], "--out: cannot write")
    refusal(ddpm.main, flags + ["--ckpt", tmp_path], "is a folder")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: type("U", (), {"free": 10 << 20})())
    refusal(ddpm.main, flags + ["--ckpt", tmp_path / "c.pt", "--out", tmp_path / "run"], "only 10 MB free")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # a refused run leaves no folder behind


def test_grad_clip_zero_means_no_clipping(tmp_path):
    ddpm.train(tiny_cfg(tmp_path, "off", steps=2, grad_clip=0.0))
    ddpm.train(tiny_cfg(tmp_path, "huge", steps=2, grad_clip=1e9))
    off, huge = load(tmp_path / "off.pt"), load(tmp_path / "huge.pt")
    torch.manual_seed(0)
    init = ddpm.UNet(ddpm.make_config("tiny", image_size=16, dropout=0.1)).state_dict()
    moved = max((off["model"][k] - init[k]).abs().max().item() for k in init)
    print(f"--grad-clip 0 vs 1e9: max difference {max_difference(off, huge)}; weights moved {moved:.2e}")
    assert max_difference(off, huge) == 0.0 and moved > 1e-4


def test_save_every_zero_saves_at_the_end_and_sample_every_zero_never(tmp_path):
    cfg = tiny_cfg(tmp_path, "zero", steps=3, save_every=0, sample_every=0)
    ddpm.train(cfg)
    assert load(cfg.ckpt)["step"] == 3
    assert run_files(cfg.run_dir) == ["events.out.tfevents.*", "loss.png", "metrics.jsonl"]


def test_img_per_s_leaves_out_sampling_and_saving(tmp_path, monkeypatch):
    """The logged images/s count training alone. On a controlled clock (the run log's) that moves
    1 s per training step and 100 s per save and per sample grid, whatever else the machine does,
    the rate is exactly one batch of 8 images per second."""
    import runlog
    now = [0.0]
    real_step, real_save = ddpm.Run.train_step, ddpm.Run.save

    def advancing(seconds, function):
        def timed(*args, **kwargs):
            now[0] += seconds
            return function(*args, **kwargs)
        return timed
    monkeypatch.setattr(runlog, "clock", lambda: now[0])
    monkeypatch.setattr(ddpm.Run, "train_step", advancing(1.0, real_step))
    monkeypatch.setattr(ddpm.Run, "save", advancing(100.0, real_save))
    monkeypatch.setattr(ddpm, "sample_grid", advancing(100.0, lambda *args: None))
    cfg = tiny_cfg(tmp_path, "speed", steps=4, save_every=1, sample_every=1, log_every=2)
    ddpm.train(cfg)
    rates = [json.loads(line)["img_per_s"] for line in open(tmp_path / "speed" / "metrics.jsonl")]
    print(f"logged img/s {rates} on a clock of 1 s per step and 100 s per save and per grid "
          f"(with those counted: {2 * 8 / 402:.3f})")
    assert rates == [8.0, 8.0]


@pytest.mark.heavy
def test_checkpoint_is_self_describing_and_safe(tmp_path):
    cfg = tiny_cfg(tmp_path, "run", steps=2, sample_every=1000)
    ddpm.train(cfg)
    state = torch.load(cfg.ckpt, weights_only=True)  # no pickled code in it
    assert {"format_version", "config", "model", "ema", "optimizer", "scaler", "step"} <= set(state)
    model, cfg2 = ddpm.load_checkpoint(cfg.ckpt)
    assert cfg2 == cfg
    assert all(torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())
    raw, _ = ddpm.load_checkpoint(cfg.ckpt, ema=False)
    assert all(torch.equal(v, state["model"][k]) for k, v in raw.state_dict().items())
    assert run_files(cfg.run_dir) == ["events.out.tfevents.*", "loss.png", "metrics.jsonl", "samples_0000002.png"]


def test_unusable_checkpoints_are_sentences(tmp_path):
    cfg = tiny_cfg(tmp_path, "run", steps=1)
    ddpm.train(cfg)
    state = load(cfg.ckpt)
    bad = {"config_not_dict": {**state, "config": [1, 2]},
           "weights_do_not_fit": {**state, "config": {**state["config"], "ch": 64}},
           "bad_value": {**state, "config": {**state["config"], "ch_mult": "abc"}},
           "missing_key": {**state, "model": {k: v for k, v in state["model"].items() if "conv_in" not in k},
                           "ema": None}}
    for name, content in bad.items():
        torch.save(content, tmp_path / f"{name}.pt")
        message = refusal(ddpm.main, ["sample", "--ckpt", tmp_path / f"{name}.pt", "--n", 1,
                                      "--out", tmp_path / "s.png"], "error:")
        assert name != "weights_do_not_fit" or "do not fit" in message
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 100)
    refusal(ddpm.main, ["sample", "--ckpt", tmp_path / "corrupt.pt"], "corrupt")
    refusal(ddpm.main, ["sample", "--ckpt", tmp_path / "missing.pt"], "does not exist")
    assert not (tmp_path / "s.png").exists()


# -- data -------------------------------------------------------------------------------------

def test_shapes_are_deterministic_labelled_and_in_range():
    a, b = data.ShapesDataset(n=20, size=16, seed=3), data.ShapesDataset(n=20, size=16, seed=3)
    assert torch.equal(a.images, b.images)
    assert a.images.min() >= -1 and a.images.max() <= 1 and a.images.std() > 0.3
    assert sorted(set(a.labels.tolist())) == list(range(10))
    assert not torch.equal(a.images, data.ShapesDataset(n=20, size=16, seed=4).images)


def test_uint8_round_trip_and_clipping():
    img = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    assert np.array_equal(pictures.to_uint8(data.to_model_range(img)), img)
    over = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    assert pictures.to_uint8(over).ravel().tolist() == [0, 0, 128, 255, 255]


def write_png(path, size=(20, 12), colour=(200, 10, 10)):
    Image.new("RGB", size, colour).save(path)


def test_image_folder_with_classes_and_junk(tmp_path, capsys):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for k in range(3):
            write_png(tmp_path / cls / f"{k}.png")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = data.ImageFolderDataset(str(tmp_path), 16)
    assert len(ds) == 6 and ds.skipped == 2 and ds.classes == ["cats", "dogs"]
    out = capsys.readouterr().out
    print(out.strip())
    assert "skipped 2 files" in out and "'dogs/broken.jpg' (not a readable image)" in out
    x, label = ds[4]
    assert x.shape == (3, 16, 16) and label == 1
    assert x.min() >= -1 and x.max() <= 1
    assert x[0].mean().item() == pytest.approx(200 / 127.5 - 1, abs=0.02)  # red channel kept


def test_a_fifo_named_like_an_image_is_named_and_skipped_without_blocking(tmp_path, capsys):
    write_png(tmp_path / "0.png")
    os.mkfifo(tmp_path / "x.png")  # opening it to read would wait for a writer forever
    ds = data.ImageFolderDataset(str(tmp_path), 16)
    out = capsys.readouterr().out
    print(out.strip())
    assert len(ds) == 1 and "'x.png' (not a regular file)" in out


def test_flat_image_folder_and_empty_folder(tmp_path):
    for k in range(2):
        write_png(tmp_path / f"{k}.jpg", size=(40, 40))
    ds = data.ImageFolderDataset(str(tmp_path), 8)
    assert len(ds) == 2 and ds[1][1] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        data.ImageFolderDataset(str(empty), 8)


def corrupt_png(path, size=(16, 16)):
    """A PNG whose chunk checksums are right (so Image.verify passes) but whose compressed pixel
    data is garbage: only decoding it fails."""
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4:at])[0]
    data[at + 4 + 2:at + 4 + length] = bytes(range(7, 7 + length - 2))  # keep the zlib header
    data[at + 4 + length:at + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[at:at + 4 + length])))
    path.write_bytes(bytes(data))


def test_an_image_that_fails_to_decode_is_named_and_skipped(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for k in range(8):
        write_png(folder / f"{k}.png", size=(16, 16), colour=(10 * k, 0, 0))
    corrupt_png(folder / "3b.png")
    ds = data.ImageFolderDataset(str(folder), 16)
    assert len(ds) == 9  # its header is fine: only decoding shows the damage
    names = [os.path.basename(p) for p, _ in ds.items]
    x, _ = ds[names.index("3b.png")]
    assert "3b.png" in capsys.readouterr().err
    assert x[0].mean().item() == pytest.approx(40 / 127.5 - 1, abs=0.01)  # the next image, 4.png
    cfg = tiny_cfg(tmp_path, "run", data=str(folder), steps=2, batch_size=9, flip=False)
    ddpm.train(cfg)  # every image is drawn in step 1: training goes on
    assert load(cfg.ckpt)["step"] == 2


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    img = Image.fromarray(np.full((8, 8), 200 * 257, np.uint16))
    img.save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode.startswith("I")  # Pillow reads it as 16-bit
    ds = data.ImageFolderDataset(str(tmp_path), 8)
    x, _ = ds[0]
    print(f"16-bit 51400/65535 read as {x.mean().item():.4f} (expected {200 / 127.5 - 1:.4f})")
    assert x.shape == (3, 8, 8) and x.mean().item() == pytest.approx(200 / 127.5 - 1, abs=1e-6)


@pytest.mark.heavy
def test_grayscale_trains_samples_and_reads_folders(tmp_path, monkeypatch):
    write_png(tmp_path / "a.png", size=(8, 8), colour=(255, 0, 0))
    x, _ = data.ImageFolderDataset(str(tmp_path), 8, channels=1)[0]
    assert x.shape == (1, 8, 8) and x.mean().item() == pytest.approx(round(0.299 * 255) / 127.5 - 1, abs=1e-6)
    shapes = data.ShapesDataset(n=4, size=8, channels=1)
    assert shapes.images.shape == (4, 1, 8, 8)
    cfg = tiny_cfg(tmp_path, "gray", in_channels=1, steps=2, sample_every=2)
    ddpm.train(cfg)
    with Image.open(tmp_path / "gray" / "samples_0000002.png") as grid:
        assert grid.mode == "L"
    ddpm.sample(cfg.ckpt, sampling.Request(n=2, out=str(tmp_path / "s.png"), outdir=str(tmp_path / "one"), sampler=Sampler("ddim", steps=3)))
    with Image.open(tmp_path / "one" / "00001.png") as one:
        assert one.mode == "L" and one.size == (16, 16)


def test_step_batches_depend_on_step_only():
    full = list(data.StepBatchSampler(50, 8, seed=1, start_step=0, steps=14))
    tail = list(data.StepBatchSampler(50, 8, seed=1, start_step=5, steps=14))
    assert full[5:] == tail and len(full) == 14
    assert sorted(sum(full[:6], [])) == sorted(set(sum(full[:6], [])))  # an epoch has no repeats


# -- command line -----------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_train_then_sample(tmp_path):
    """The README's recipe as a user types it: three processes."""
    r = run_script("ddpm.py", "train", "--data", "shapes", "--model", "tiny", "--image-size", "16", "--steps", "3",
                   "--batch-size", "8", "--log-every", "1", "--out", "run", "--ckpt", "run/ckpt.pt",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for f in ("ckpt.pt", "metrics.jsonl", "loss.png", "samples_0000003.png"):
        assert (tmp_path / "run" / f).exists(), f
    r = run_script("ddpm.py", "sample", "--ckpt", "run/ckpt.pt", "--n", "5", "--sampler", "ddim", "--steps", "4",
                   "--out", "grid.png", "--outdir", "imgs", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "image-steps/s" in r.stdout
    with Image.open(tmp_path / "grid.png") as grid:
        grid.load()
    pngs = sorted(os.listdir(tmp_path / "imgs"))
    assert len(pngs) == 5
    with Image.open(tmp_path / "imgs" / pngs[0]) as one:
        assert one.size == (16, 16) and one.mode == "RGB"
    r = run_script("ddpm.py", "info", "--ckpt", "run/ckpt.pt", cwd=tmp_path)
    assert r.returncode == 0 and "parameters" in r.stdout and "FLOPs" in r.stdout


@pytest.mark.heavy
def test_sample_draws_the_reverse_process(small_ckpt, tmp_path):
    shown = []

    def spy(frames, final, path):
        shown.append((path, [t for t, _, _ in frames], final.shape))
        real_save_progress(frames, final, path)

    real_save_progress = pictures.save_progress
    pictures.save_progress = spy
    try:
        ddpm.main(["sample", "--ckpt", small_ckpt, "--n", "4", "--batch", "2", "--sampler", "ddim", "--steps", "30",
                   "--out", str(tmp_path / "s.png"), "--progress", str(tmp_path / "p.png")])
        ddpm.main(["sample", "--ckpt", small_ckpt, "--n", "2", "--steps", "150", "--out", str(tmp_path / "s.png"),
                   "--progress", str(tmp_path / "p.webp")])
    finally:
        pictures.save_progress = real_save_progress
    (still, ts, shape), (animation, ts2, _) = shown
    assert ts[0] == 29 * (1000 // 30) and ts[-1] == 0 and len(ts) == 10 and shape[0] == 2  # the first batch
    assert len(ts2) == 100 and ts2[0] == 149 * (1000 // 150)  # 100 of the 150 respaced steps (T = 1000)
    with Image.open(tmp_path / "p.webp") as webp:
        assert webp.n_frames == 101
    refusal(ddpm.main, ["sample", "--ckpt", small_ckpt, "--progress", tmp_path / "p.jpg"], ".gif")
    refusal(ddpm.main, ["sample", "--ckpt", small_ckpt, "--progress", small_ckpt], ".png")


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    cfg = tiny_cfg(d, "run", steps=1, sample_every=0)
    ddpm.train(cfg)
    return cfg.ckpt


TRAIN_MISTAKES = [
    (["--data", ".", "--out", "runs_here"], "inside the data folder"),
    (["--out", "run.pt"], "names the run directory"),
    (["--batch-size", "0"], "give a positive number, or auto"),
    (["--grad-accum", "-2"], "give a positive number, or auto"),
    (["--data", "cifar100"], "neither a built-in dataset"),
    (["--model", "cifar10", "--image-size", "36"], "does not fit preset"),
    (["--bogus-flag", "1"], "unrecognized"),
    (["--device", "tpu"], "--device tpu"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--in-channels", "2"], "grayscale"),
    (["--attn-resolutions", "7"], "would never run"),
    (["--attn-resolutions", "a,b"], "comma-separated"),
    (["--ema-decay", "2"], "--ema-decay"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--save-every", "-1"], "--save-every"),
    (["--log-every", "0"], "--log-every"),
    (["--sample-every", "-5"], "--sample-every"),
    (["--steps", "0"], "--steps 0"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "6", "--grad-accum", "4"], "multiple of --grad-accum"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--dropout", "1.5"], "--dropout"),
    (["--T", "1"], "T=1"),
    (["--schedule", "quadratic"], "invalid choice"),
    (["--amp", "fp8"], "invalid choice"),
    (["--num-workers", "-3"], "--num-workers"),
    (["--data", "cifar10", "--image-size", "48"], "no preset for --image-size 48"),
    (["--resume", "nothing.pt"], "does not exist"),
]


@pytest.mark.parametrize("argv,fragment", TRAIN_MISTAKES)
def test_train_mistakes_are_sentences(tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    defaults = {"--model": "tiny", "--image-size": "16", "--steps": "2"}
    prefix = [x for flag, value in defaults.items() if flag not in argv for x in (flag, value)]
    refusal(ddpm.main, ["train"] + prefix * ("--image-size" not in argv) + argv, fragment)
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_sample_mistakes_are_sentences(small_ckpt, tmp_path):
    (tmp_path / "a_dir.png").mkdir()
    for argv, fragment in [
            (["--n", "0"], "--n 0"), (["--batch", "0"], "--batch 0"),
            (["--steps", "0"], "--steps"), (["--steps", "5000"], "--steps"),
            (["--sampler", "ddim", "--eta", "2"], "--eta"), (["--sampler", "ddim", "--eta", "nan"], "--eta"),
            (["--eta", "0.3"], "ddpm has none to set"), (["--device", "tpu"], "invalid choice"),
            (["--out", tmp_path / "g.txt"], ".png"), (["--out", small_ckpt], ".png"),
            (["--out", tmp_path / "a_dir.png"], "is a folder"),
            (["--out", "/proc/ddpm/g.png"], "cannot write"),
            (["--outdir", small_ckpt], "is a file")]:
        refusal(ddpm.main, ["sample", "--ckpt", small_ckpt] + argv, fragment)
    assert os.listdir(tmp_path) == ["a_dir.png"]


def test_cifar10_not_downloadable_says_where_to_put_it(tmp_path, monkeypatch):
    # A proxy on a closed loopback port makes the download fail at once, with no traffic out.
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        refusal(ddpm.main, ["train", "--data", "cifar10", "--data-dir", "dl/nested"], "could not be downloaded",
                "cifar-10-python.tar.gz", os.path.join("dl", "nested", "cifar-10-python.tar.gz"))
    assert not (tmp_path / "dl").exists() and not (tmp_path / "runs").exists()  # no empty folders left behind


def test_steps_inside_the_warmup_warn(tmp_path, capsys):
    ddpm.train(tiny_cfg(tmp_path, "w", steps=3, warmup=100))
    err = capsys.readouterr().err
    assert "--steps 3 ends inside the 100-step warm-up" in err


@pytest.mark.parametrize("main,command", [(ddpm.main, ["train"]), (ddpm.main, ["train-classifier"]),
                                          (ddpm.main, ["sample"]), (ddpm.main, ["info"]), (distill.main, [])])
def test_help_gives_every_flag_a_default(main, command):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*command, "-h"])
    text = out.getvalue()
    options = text[text.index("options:"):]
    entries = [e for e in options.split("\n  -")[1:] if not e.startswith("h, --help")]
    assert entries
    for entry in entries:
        assert "default" in entry, f"{command}: -{entry.strip()}"
    if command == ["train"]:
        for name in ("cifar10", "stl10", "shapes", "tiny"):
            assert name in text


# -- bf16 autocast on a CPU ---------------------------------------------------------------------

def test_cpu_amp_follows_what_the_cpu_can_do(tmp_path, capsys):
    """--amp bf16 trains in bf16 where the CPU has bf16 units, else warns and trains in fp32;
    auto and none stay fp32 on a CPU; fp16 (CUDA's scaler) is a sentence."""
    cpu = torch.device("cpu")
    native = torch.backends.cpu.get_cpu_capability() == "AVX512" and \
        (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())  # not held to AVX2
    assert ddpm.amp_dtype("auto", cpu) is None and ddpm.amp_dtype("none", cpu) is None
    assert ddpm.amp_dtype("bf16", cpu) == (torch.bfloat16 if native else None)
    assert native or "no native bf16" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs CUDA"):
        ddpm.amp_dtype("fp16", cpu)
    ddpm.train(tiny_cfg(tmp_path, "bf16", amp="bf16", steps=3))
    ddpm.train(tiny_cfg(tmp_path, "fp32", amp="none", steps=3))
    a, b = load(tmp_path / "bf16.pt"), load(tmp_path / "fp32.pt")
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    print(f"this CPU has native bf16: {native}; |bf16 run - fp32 run| after 3 steps: {diff:.1e}")
    assert all(torch.isfinite(v).all() for v in a["model"].values())
    assert (diff > 0) == native  # bf16 rounding shows in the weights exactly when it ran


def test_sample_amp_bf16_where_native(small_ckpt, tmp_path, monkeypatch):
    """--amp auto is bf16 autocast where the CPU multiplies bf16 natively (here made to say so),
    fp32 elsewhere; the images move by bf16's rounding, not more. fp16 needs CUDA."""
    def images(folder, **kw):
        request = sampling.Request(n=4, sampler=Sampler("ddim", 5), out=str(tmp_path / f"{folder}.png"),
                                   outdir=str(tmp_path / folder))
        ddpm.sample(small_ckpt, request, device="cpu", **kw)
        return np.stack([np.asarray(Image.open(tmp_path / folder / f"{k:05d}.png")) for k in range(4)]).astype(int)
    fp32 = images("fp32")
    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: False)
    assert ddpm.sampling_dtype("auto", torch.device("cpu")) is None
    assert np.array_equal(images("auto_fp32", amp="auto"), fp32)
    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: True)
    assert ddpm.sampling_dtype("auto", torch.device("cpu")) == torch.bfloat16
    bf16 = images("bf16", amp="auto")
    diff = np.abs(bf16 - fp32)
    print(f"bf16 autocast vs fp32, 4 images x 5 DDIM steps: mean difference {diff.mean():.2f}, "
          f"max {diff.max()} of 255")
    assert 0 < diff.mean() < 4
    refusal(ddpm.main, ["sample", "--ckpt", small_ckpt, "--amp", "fp16", "--device", "cpu",
                        "--out", tmp_path / "x.png"], "needs CUDA")


def test_a_checkpoint_with_nan_weights_samples_a_sentence_not_black_pictures(small_ckpt, tmp_path):
    state = torch.load(small_ckpt, weights_only=True)
    state["ema"]["conv_out.bias"][0] = float("nan")  # written around save_checkpoint, which refuses it
    torch.save(state, tmp_path / "nan.pt")
    refusal(ddpm.main, ["sample", "--ckpt", tmp_path / "nan.pt", "--n", 2, "--steps", 3, "--sampler", "ddim",
                        "--out", tmp_path / "s.png"], "not finite", "nothing was written")
    assert not (tmp_path / "s.png").exists()


def test_info_of_a_preset_shows_the_model_not_training_settings(capsys):
    ddpm.main(["info", "--model", "cifar10"])
    out = capsys.readouterr().out
    assert "preset: cifar10" in out and "ch_mult: (1, 2, 2, 2)" in out and "parameters: 35,746,307" in out
    assert "data:" not in out and "batch_size" not in out  # a preset has no data or training run
