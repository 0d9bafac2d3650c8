"""Training, checkpoints, data and the command line of ddpm.py (CPU, tiny model, 16x16)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(tmp_path, name, **kw):
    base = dict(data="shapes", image_size=16, dropout=0.1, batch_size=8, steps=6, warmup=2,
                ema_decay=0.9, save_every=1000, sample_every=1000, log_every=1,
                out=str(tmp_path / name), ckpt=str(tmp_path / f"{name}.pt"), num_workers=0)
    base.update(kw)
    return ddpm.make_config("tiny", **base)


def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "ddpm.py"), *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


# -- training ---------------------------------------------------------------------------------

def test_resume_continues_exactly(tmp_path):
    """Stopped at k and resumed to 2k == 2k uninterrupted: weights, EMA and Adam state."""
    ddpm.train(tiny_cfg(tmp_path, "straight", steps=6))
    ddpm.train(tiny_cfg(tmp_path, "halves", steps=3))
    ddpm.train(tiny_cfg(tmp_path, "halves", steps=6), resume=str(tmp_path / "halves.pt"))
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "halves.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    worst = 0.0
    for part in ("model", "ema"):
        for k in a[part]:
            worst = max(worst, (a[part][k] - b[part][k]).abs().max().item())
    moved = max((a["model"][k] - a["ema"][k]).abs().max().item() for k in a["model"])
    print(f"max |straight - resumed| over model+EMA = {worst}; (model - EMA differs by {moved:.2e})")
    assert worst == 0.0 and moved > 0
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    log = [json.loads(line) for line in open(tmp_path / "halves" / "metrics.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # the resumed run appends


def test_checkpoint_is_self_describing_and_safe(tmp_path):
    cfg = tiny_cfg(tmp_path, "run", steps=2)
    ddpm.train(cfg)
    state = torch.load(cfg.ckpt, weights_only=True)  # no pickled code in it
    assert {"format_version", "config", "model", "ema", "optimizer", "scaler", "step",
            "rng"} <= set(state)
    model, cfg2 = ddpm.load_checkpoint(cfg.ckpt)
    assert cfg2 == cfg
    assert all(torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())
    raw, _ = ddpm.load_checkpoint(cfg.ckpt, ema=False)
    assert all(torch.equal(v, state["model"][k]) for k, v in raw.state_dict().items())
    files = sorted(os.listdir(cfg.out))
    assert files == ["loss.png", "metrics.jsonl", "samples_0000002.png"], files


def test_crash_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    ddpm.save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(3)}, "step": 1})

    def dying_save(obj, f):  # writes half a file, then the machine "dies"
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        ddpm.save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(3)}, "step": 2})
    monkeypatch.undo()
    state = ddpm.read_checkpoint(str(path))
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = ddpm.GaussianDiffusion.training_loss
    calls = {"n": 0}

    def loss_turning_nan(self, model, x0, i, noise):
        calls["n"] += 1  # call 1 is the pre-flight, call k+2 is step k (0-indexed)
        loss = real(self, model, x0, i, noise)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(ddpm.GaussianDiffusion, "training_loss", loss_turning_nan)
    cfg = tiny_cfg(tmp_path, "nan", steps=10, save_every=2)
    with pytest.raises(SystemExit) as exc:
        ddpm.train(cfg)
    print(exc.value)
    assert "nan" in str(exc.value) and "intact" in str(exc.value)
    assert ddpm.read_checkpoint(cfg.ckpt)["step"] == 2


def test_learning_rate_warmup_and_cosine():
    cfg = ddpm.Config(lr=1e-3, warmup=10, steps=110)
    assert ddpm.learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert ddpm.learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert ddpm.learning_rate(cfg, 100) == pytest.approx(1e-3)
    cfg.cosine_lr = True
    assert ddpm.learning_rate(cfg, 60) == pytest.approx(5e-4)
    assert ddpm.learning_rate(cfg, 110) == pytest.approx(0, abs=1e-12)


# -- data -------------------------------------------------------------------------------------

def test_shapes_are_deterministic_labelled_and_in_range():
    a, b = ddpm.ShapesDataset(n=20, size=16, seed=3), ddpm.ShapesDataset(n=20, size=16, seed=3)
    assert torch.equal(a.images, b.images)
    assert a.images.min() >= -1 and a.images.max() <= 1 and a.images.std() > 0.3
    assert sorted(set(a.labels.tolist())) == list(range(10))
    assert not torch.equal(a.images, ddpm.ShapesDataset(n=20, size=16, seed=4).images)


def test_uint8_round_trip_and_clipping():
    img = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    assert np.array_equal(ddpm.to_uint8(ddpm.to_model_range(img)), img)
    over = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    assert ddpm.to_uint8(over).ravel().tolist() == [0, 0, 128, 255, 255]


def write_png(path, size=(20, 12), colour=(200, 10, 10)):
    Image.new("RGB", size, colour).save(path)


def test_image_folder_with_classes_and_junk(tmp_path, capsys):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for k in range(3):
            write_png(tmp_path / cls / f"{k}.png")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = ddpm.ImageFolderDataset(str(tmp_path), 16)
    assert len(ds) == 6 and ds.skipped == 2 and ds.classes == ["cats", "dogs"]
    assert "skipped 2 files" in capsys.readouterr().out
    x, label = ds[4]
    assert x.shape == (3, 16, 16) and label == 1
    assert x.min() >= -1 and x.max() <= 1
    assert x[0].mean().item() == pytest.approx(200 / 127.5 - 1, abs=0.02)  # red channel kept


def test_flat_image_folder_and_empty_folder(tmp_path):
    for k in range(2):
        write_png(tmp_path / f"{k}.jpg", size=(40, 40))
    ds = ddpm.ImageFolderDataset(str(tmp_path), 8)
    assert len(ds) == 2 and ds[1][1] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        ddpm.ImageFolderDataset(str(empty), 8)


def test_step_batches_depend_on_step_only():
    full = list(ddpm.StepBatchSampler(50, 8, seed=1, start_step=0, steps=14))
    tail = list(ddpm.StepBatchSampler(50, 8, seed=1, start_step=5, steps=14))
    assert full[5:] == tail and len(full) == 14
    assert sorted(sum(full[:6], [])) == sorted(set(sum(full[:6], [])))  # an epoch has no repeats


# -- command line -----------------------------------------------------------------------------

def test_cli_train_then_sample(tmp_path):
    r = run_cli("train", "--data", "shapes", "--model", "tiny", "--image-size", "16", "--steps", "3",
                "--batch-size", "8", "--log-every", "1", "--out", "run", "--ckpt", "run/ckpt.pt",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for f in ("ckpt.pt", "metrics.jsonl", "loss.png", "samples_0000003.png"):
        assert (tmp_path / "run" / f).exists(), f
    r = run_cli("sample", "--ckpt", "run/ckpt.pt", "--n", "5", "--sampler", "ddim", "--steps", "4",
                "--out", "grid.png", "--outdir", "imgs", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "image-steps/s" in r.stdout
    with Image.open(tmp_path / "grid.png") as grid:
        grid.load()
    pngs = sorted(os.listdir(tmp_path / "imgs"))
    assert len(pngs) == 5
    with Image.open(tmp_path / "imgs" / pngs[0]) as one:
        assert one.size == (16, 16) and one.mode == "RGB"
    r = run_cli("info", "--ckpt", "run/ckpt.pt", cwd=tmp_path)
    assert r.returncode == 0 and "parameters" in r.stdout and "FLOPs" in r.stdout


def assert_clean_error(r, *fragments):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    for fragment in fragments:
        assert fragment in r.stderr, r.stderr
    print(r.stderr.strip().splitlines()[-1])


def test_clear_errors_without_tracebacks(tmp_path):
    assert_clean_error(run_cli("train", "--data", "cifar100", cwd=tmp_path),
                       "neither a built-in dataset")
    assert_clean_error(run_cli("train", "--model", "cifar10", "--image-size", "36", cwd=tmp_path),
                       "does not fit preset")
    assert_clean_error(run_cli("train", "--bogus-flag", "1", cwd=tmp_path), "unrecognized")
    assert_clean_error(run_cli("sample", "--ckpt", "missing.pt", cwd=tmp_path), "does not exist")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 100)
    assert_clean_error(run_cli("sample", "--ckpt", "corrupt.pt", cwd=tmp_path), "corrupt")
    assert_clean_error(run_cli("sample", "--n", "0", cwd=tmp_path), "at least 1")


def test_cifar10_not_downloadable_says_where_to_put_it(tmp_path):
    # A proxy on a closed loopback port makes the download fail at once, with no traffic out.
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    r = run_cli("train", "--data", "cifar10", "--data-dir", "dl", env=env, cwd=tmp_path)
    assert_clean_error(r, "could not be downloaded", "cifar-10-python.tar.gz",
                       os.path.join("dl", "cifar-10-python.tar.gz"))


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    base = [sys.executable, os.path.join(ROOT, "ddpm.py"), "train", "--data", "shapes", "--model", "tiny",
            "--image-size", "16", "--batch-size", "8", "--sample-every", "100000"]
    p = subprocess.Popen(base + ["--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=tmp_path)
    assert "data: shapes" in p.stdout.readline()
    assert "pre-flight ok" in p.stdout.readline()
    time.sleep(3)  # a few dozen steps
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "Traceback" not in err, err[-2000:]
    assert "interrupted: saved step" in err and "--resume" in err
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    print(f"Ctrl-C saved step {saved}")
    assert saved > 0
    r = subprocess.run(base + ["--steps", str(saved + 2), "--resume"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from ckpt.pt at step {saved}" in r.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == saved + 2
