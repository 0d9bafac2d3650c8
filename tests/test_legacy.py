"""Files written by the code before the redesign (issue 23, commit 32b6524), kept in tests/legacy/
with the samples that code drew from them (tests/legacy/make_fixtures.py wrote them): today's code
must load, describe, export and --resume them, and sample the same images from them for the same
command and seed, in ddpm.py and in sample_ort.py, with every sampler.

Tolerances: 1e-6 jitter on the weights moves these trajectories by up to 5e-5, and the same
fixtures written on two CPUs (AMD EPYC, Intel Xeon) differ by 1.7e-5; so float trajectories must
agree to 5e-4 and 8-bit pictures to 1 level (a pixel on a rounding edge).
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import ddpm
import export
import sample_ort
from conftest import run_main
from schedules import Sampler
import schedules

HERE = os.path.join(os.path.dirname(__file__), "legacy")
CASES = json.load(open(os.path.join(HERE, "commands.json")))


def run_ok(*args):
    r = run_main(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def picture(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def assert_same_picture(got, expected):
    a, b = picture(got), picture(expected)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a - b)
    print(f"{os.path.basename(expected)}: max difference {diff.max()} levels, {np.mean(diff > 0):.2%} of values differ")
    assert diff.max() <= 1


def legacy(name):
    return os.path.join(HERE, name)


def test_the_old_checkpoints_load_with_their_old_config_names():
    """Their configs say model= and out= (today preset= and run_dir=)."""
    state = checkpoints.read_checkpoint(legacy("cond.pt"))
    assert "model" in state["config"] and "preset" not in state["config"]
    model, cfg = ddpm.load_checkpoint(legacy("cond.pt"))
    assert (cfg.preset, cfg.num_classes, cfg.var_type, cfg.prediction, cfg.T) == ("tiny", 10, "learned_range", "v", 50)
    _, cfg = ddpm.load_checkpoint(legacy("uncond_step120.pt"))
    assert (cfg.preset, cfg.num_classes, cfg.steps, cfg.run_dir.endswith("run_uncond")) == ("tiny", 0, 120, True)


@pytest.mark.heavy
def test_info_describes_an_old_checkpoint():
    out = run_ok("ddpm.py", "info", "--ckpt", legacy("cond.pt")).stdout
    assert "preset: tiny" in out and "num_classes: 10" in out and "parameters:" in out


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["uncond_step120", "cond"])
def test_samples_from_old_files_are_the_old_samples(name, tmp_path):
    """Every command the old code ran, through both scripts, draws the pictures it drew."""
    for case in (c for c in CASES if c["ckpt"] == f"{name}.pt"):
        tag, flags = case["tag"], case["flags"]
        run_ok("ddpm.py", "sample", "--ckpt", legacy(case["ckpt"]), *flags, "--out", tmp_path / "torch.png",
                   "--device", "cpu")
        assert_same_picture(tmp_path / "torch.png", legacy(f"{tag}-torch.png"))
        run_ok("sample_ort.py", "--model", legacy(case["onnx"]), *flags, "--out", tmp_path / "ort.png",
                   "--provider", "cpu")
        assert_same_picture(tmp_path / "ort.png", legacy(f"{tag}-ort.png"))
        run_ok("sample_ort.py", "--model", legacy(case["onnx"]), *flags, "--out", tmp_path / "host.png",
                   "--provider", "cpu", "--host-noise")
        assert_same_picture(tmp_path / "host.png", legacy(f"{tag}-ort-host.png"))


@pytest.mark.heavy
def test_the_process_pictures_of_old_files_are_the_old_ones(tmp_path):
    """Format-1 files have no pred_x0 output: sample_ort.py computes their pictures' x_0 as before."""
    flags = ["--n", "10", "--class", "all", "--steps", "10", "--sampler", "ddim"]
    run_ok("ddpm.py", "sample", "--ckpt", legacy("cond.pt"), *flags, "--out", tmp_path / "grid.png",
               "--progress", tmp_path / "process.png", "--device", "cpu")
    assert_same_picture(tmp_path / "process.png", legacy("cond-process-torch.png"))
    assert_same_picture(tmp_path / "grid.png", legacy("cond-process-torch-grid.png"))
    run_ok("sample_ort.py", "--model", legacy("cond.onnx"), *flags, "--out", tmp_path / "grid_ort.png",
               "--progress", tmp_path / "process_ort.png", "--provider", "cpu")
    assert_same_picture(tmp_path / "process_ort.png", legacy("cond-process-ort.png"))
    assert_same_picture(tmp_path / "grid_ort.png", legacy("cond-process-ort-grid.png"))


@pytest.mark.parametrize("name", ["uncond_step120", "cond"])
@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 10), ("dpm++", 10)])
def test_float_trajectories_of_old_files_match(name, sampler, steps):
    """The library functions, fed the old run's x_T and noise (numpy, seed 7), to 5e-4: ddpm.py on
    the old checkpoint, sample_ort.py on the old ONNX file (format 1)."""
    expected = np.load(legacy("trajectories.npz"))
    model, cfg = ddpm.load_checkpoint(legacy(f"{name}.pt"))
    rng = np.random.default_rng(7)
    x_T = rng.standard_normal((4, 3, 8, 8), dtype=np.float32)
    noise = rng.standard_normal((cfg.T, 4, 3, 8, 8), dtype=np.float32)
    y = torch.tensor([0, 1, 2, 3]) if cfg.num_classes else None
    x0 = ddpm.sample_loop(model, ddpm.GaussianDiffusion.from_config(cfg), torch.from_numpy(x_T), Sampler(sampler, steps), noise_fn=lambda k, shape: torch.from_numpy(noise[k]), guidance=ddpm.Guidance(y, scale=3.0)).numpy()
    err = np.abs(x0 - expected[f"{name}-{sampler}-torch"]).max()
    guided = cfg.num_classes > 0
    denoiser, step, meta, device = sample_ort.open_sessions(legacy(f"{name}.onnx"), "cpu", guided=guided,
                                                            multistep=sampler == "dpm++")
    assert meta["format"] == 1
    runner = sample_ort.Runner(denoiser, step, (4, 3, 8, 8), device, meta["num_classes"], 3.0 if guided else None)
    if guided:
        runner.set_labels(np.array([0, 1, 2, 3]))
    timesteps, coefs = schedules.step_table(meta["betas"], Sampler(sampler, steps), meta["var_type"])
    x0_ort = runner.run(x_T, timesteps, coefs, lambda k, shape: noise[k])
    err_ort = np.abs(x0_ort - expected[f"{name}-{sampler}-ort"]).max()
    print(f"{name} {sampler}: max |new - old| {err:.1e} (ddpm.py), {err_ort:.1e} (sample_ort.py)")
    assert err < 5e-4 and err_ort < 5e-4


@pytest.mark.heavy
def test_resuming_an_old_training_checkpoint_continues_as_the_old_code_did(tmp_path):
    """--resume of the old step-60 file to step 120 ends where the old code's own resume ended."""
    ckpt = tmp_path / "work.pt"
    shutil.copy(legacy("uncond_step60.pt"), ckpt)
    run_ok("ddpm.py", "train", "--resume", ckpt, "--steps", "120", "--save-every", "60",
               "--out", tmp_path / "run")
    new, old = torch.load(ckpt, weights_only=True), torch.load(legacy("uncond_step120.pt"), weights_only=True)
    assert new["step"] == old["step"] == 120
    for part in ("model", "ema"):
        err = max((new[part][k] - old[part][k]).abs().max().item() for k in old[part])
        print(f"{part}: max |new - old| {err:.1e} over {len(old[part])} tensors")
        assert err < 5e-4
    assert new["config"]["preset"] == "tiny" and "model" not in new["config"]


def test_an_old_checkpoint_exports_to_the_new_format(tmp_path):
    """Exported today, the old checkpoint gives a format-2 file (pred_x0 an output of the update)
    that samples the old pictures."""
    out = tmp_path / "new.onnx"
    export.export(legacy("uncond_step120.pt"), str(out))
    denoiser, step, meta, _ = sample_ort.open_sessions(str(out), "cpu")
    assert meta["format"] == export.FORMAT_VERSION == 2
    assert [o.name for o in step.get_outputs()] == ["x_prev", "pred_x0"]
    case = next(c for c in CASES if c["tag"] == "uncond_step120-ddim-10-0.0-default")
    run_ok("sample_ort.py", "--model", out, *case["flags"], "--out", tmp_path / "ort.png", "--provider", "cpu")
    assert_same_picture(tmp_path / "ort.png", legacy(f"{case['tag']}-ort.png"))

