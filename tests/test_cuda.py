"""What needs a CUDA GPU in ddpm.py itself (marker `gpu`; skipped with the reason elsewhere):
the reverse process on CUDA against the CPU from the same x_T and noise, and training steps in
bf16 and fp16 (with the loss scaler) that stay finite. ONNX Runtime's CUDA provider: test_onnx.py."""
import copy

import numpy as np
import pytest
import torch

import ddpm
from schedules import Sampler

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no usable CUDA GPU for torch here")]


@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 20), ("dpm++", 20)])
def test_cuda_trajectory_matches_cpu(sampler, steps):
    cfg = ddpm.make_config("tiny", image_size=16, T=100)
    torch.manual_seed(0)
    model = ddpm.UNet(cfg).eval()
    d = ddpm.GaussianDiffusion.from_config(cfg)
    rng = np.random.default_rng(0)
    x_T = torch.from_numpy(rng.standard_normal((4, 3, 16, 16), dtype=np.float32))
    noise = torch.from_numpy(rng.standard_normal((steps, 4, 3, 16, 16), dtype=np.float32))
    out = {}
    for device in ("cpu", "cuda"):
        net = copy.deepcopy(model).to(device)
        out[device] = ddpm.sample_loop(net, d, x_T.to(device), Sampler(sampler, steps), noise_fn=lambda k, shape: noise[k]).cpu().numpy()
    err = np.abs(out["cuda"] - out["cpu"]).max()
    print(f"{sampler} {steps} steps, CUDA vs CPU: max abs error {err:.2e}")
    assert err < 1e-3


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_training_steps_stay_finite(amp):
    cfg = ddpm.make_config("tiny", image_size=16, batch_size=16, warmup=1, amp=amp)
    device = torch.device("cuda")
    run = ddpm.Run(cfg, ddpm.GaussianDiffusion.from_config(cfg), device, ddpm.amp_dtype(amp, device))
    scaler = run.scaler
    x0 = torch.rand(16, 3, 16, 16, device=device) * 2 - 1
    losses = [run.train_step(x0, torch.zeros(16, dtype=torch.long), step)[0] for step in range(20)]
    print(f"{amp}: losses {losses[0]:.3f} .. {losses[-1]:.3f}, scale {scaler.get_scale() if scaler.is_enabled() else '-'}")
    assert all(np.isfinite(losses))
    assert not scaler.is_enabled() or 0 < scaler.get_scale() < float("inf")
