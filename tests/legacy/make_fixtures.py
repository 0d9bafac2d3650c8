"""Writes the files in this folder with the code of commit 32b6524, the last one before the
redesign (issue 23): checkpoints, ONNX exports and the samples both scripts drew from them.
tests/test_legacy.py checks that today's code loads, resumes, exports and samples them the same.

Run at that commit (it uses that commit's names), from the repository root:
  git worktree add /tmp/old 32b6524 && cd /tmp/old && cp <this file> . && \
  .venv/bin/python make_fixtures.py OUT_FOLDER
It is kept for the record; today's code cannot run it.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

import ddpm
import export
import sample_ort

OUT = sys.argv[1]
os.makedirs(OUT, exist_ok=True)
PY = sys.executable
SMALL = dict(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), norm_groups=4,
             dropout=0.0, data="shapes", batch_size=16, lr=1e-3, warmup=10, ema_decay=0.9, num_workers=0,
             sample_every=0, log_every=20, tensorboard=False, seed=0)


def run(*args):
    r = subprocess.run([PY, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


torch.set_num_threads(1)
# 1. an unconditional eps model (linear, fixed_large, clipped): step 60 with its optimizer state,
#    and the same run resumed to step 120 by this code
a = ddpm.make_config("tiny", steps=60, T=100, save_every=60, out=f"{OUT}/run_uncond", ckpt=f"{OUT}/uncond_step60.pt", **SMALL)
ddpm.train(a)
shutil.copy(f"{OUT}/uncond_step60.pt", f"{OUT}/work.pt")
run("ddpm.py", "train", "--resume", f"{OUT}/work.pt", "--steps", 120, "--save-every", 60)
os.replace(f"{OUT}/work.pt", f"{OUT}/uncond_step120.pt")
# 2. a conditional model with learned variances, v prediction, cosine betas, min-SNR
c = ddpm.make_config("tiny", steps=120, T=50, schedule="cosine", var_type="learned_range", prediction="v",
                     min_snr=5.0, cond=True, save_every=0, out=f"{OUT}/run_cond", ckpt=f"{OUT}/cond.pt", **SMALL)
ddpm.train(c)
shutil.rmtree(f"{OUT}/run_uncond")
shutil.rmtree(f"{OUT}/run_cond")
for name in ("uncond_step120", "cond"):
    export.export(f"{OUT}/{name}.pt", f"{OUT}/{name}.onnx")

# 3. what this code's two scripts draw from them, by the commands users type
CASES = {"uncond_step120": [("ddpm", None, 0.0, None), ("ddpm", 10, 0.0, None), ("ddim", 10, 0.0, None),
                            ("ddim", 10, 0.5, "trailing"), ("dpm++", 10, 0.0, None)],
         "cond": [("ddpm", None, 0.0, None), ("ddim", 10, 0.0, None), ("dpm++", 10, 0.0, None)]}
expected = []
for name, cases in CASES.items():
    for sampler, steps, eta, spacing in cases:
        flags = ["--n", 4, "--seed", 3, "--sampler", sampler, "--eta", eta]
        flags += ["--steps", steps] if steps else []
        flags += ["--spacing", spacing] if spacing else []
        flags += ["--class", "all", "--guidance", 3, "--n", 10] if name == "cond" else []
        tag = f"{name}-{sampler}-{steps or 'T'}-{eta}-{spacing or 'default'}".replace("+", "p")
        run("ddpm.py", "sample", "--ckpt", f"{OUT}/{name}.pt", *flags, "--out", f"{OUT}/{tag}-torch.png", "--device", "cpu")
        run("sample_ort.py", "--model", f"{OUT}/{name}.onnx", *flags, "--out", f"{OUT}/{tag}-ort.png",
            "--provider", "cpu")
        run("sample_ort.py", "--model", f"{OUT}/{name}.onnx", *flags, "--out", f"{OUT}/{tag}-ort-host.png",
            "--provider", "cpu", "--host-noise")
        expected.append({"ckpt": f"{name}.pt", "onnx": f"{name}.onnx", "flags": [str(f) for f in flags], "tag": tag})
run("ddpm.py", "sample", "--ckpt", f"{OUT}/cond.pt", "--n", 10, "--class", "all", "--steps", 10, "--sampler", "ddim",
    "--out", f"{OUT}/cond-process-torch-grid.png", "--progress", f"{OUT}/cond-process-torch.png", "--device", "cpu")
run("sample_ort.py", "--model", f"{OUT}/cond.onnx", "--n", 10, "--class", "all", "--steps", 10, "--sampler", "ddim",
    "--out", f"{OUT}/cond-process-ort-grid.png", "--progress", f"{OUT}/cond-process-ort.png", "--provider", "cpu")

# 4. float32 trajectories through the library functions, from numpy-drawn x_T and noise
#    (np.random.default_rng(7)), for a tolerance finer than 8-bit pictures
floats = {}
for name in ("uncond_step120", "cond"):
    model, cfg = ddpm.load_checkpoint(f"{OUT}/{name}.pt")
    diffusion = ddpm.GaussianDiffusion.from_config(cfg)
    denoiser, _, meta, device = sample_ort.open_sessions(f"{OUT}/{name}.onnx", "cpu")
    for sampler, steps in (("ddpm", None), ("ddim", 10), ("dpm++", 10)):
        rng = np.random.default_rng(7)
        x_T = rng.standard_normal((4, 3, 8, 8), dtype=np.float32)
        noise = rng.standard_normal((cfg.T, 4, 3, 8, 8), dtype=np.float32)
        y = torch.tensor([0, 1, 2, 3]) if cfg.num_classes else None
        x0 = ddpm.sample_loop(model, diffusion, torch.from_numpy(x_T), sampler, steps,
                              noise_fn=lambda k, shape: torch.from_numpy(noise[k]), y=y, guidance=3.0)
        floats[f"{name}-{sampler}-torch"] = x0.numpy()
        guided = cfg.num_classes > 0
        d, step, meta, device = sample_ort.open_sessions(f"{OUT}/{name}.onnx", "cpu", guided=guided,
                                                         multistep=sampler == "dpm++")
        runner = sample_ort.Sampler(d, step, (4, 3, 8, 8), device, meta["num_classes"], 3.0 if guided else None)
        if guided:
            runner.set_labels(np.array([0, 1, 2, 3]))
        timesteps, coefs = sample_ort.step_table(meta["betas"], sampler, steps, 0.0, meta["var_type"])
        floats[f"{name}-{sampler}-ort"] = runner.run(x_T, timesteps, coefs, lambda k, shape: noise[k])
np.savez_compressed(f"{OUT}/trajectories.npz", **floats)
with open(f"{OUT}/commands.json", "w") as f:
    json.dump(expected, f, indent=1)
os.remove(f"{OUT}/uncond_step120.pt.bak") if os.path.exists(f"{OUT}/uncond_step120.pt.bak") else None
print("done")
