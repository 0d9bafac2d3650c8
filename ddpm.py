"""Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel, 2020) in one file.

What is here, in the order of the paper:
  Config          one dataclass: model preset, diffusion and training settings
  schedules       beta_t, linear (Ho et al. sec. 4) and cosine (Nichol & Dhariwal 2021, eq. 17)
  U-Net           Ho et al.'s architecture (appendix B), with the attribute names of their
                  TF code as ported by pesser/pytorch_diffusion, so published weights load
  diffusion       q_sample (eq. 4), q_posterior (eqs. 6-7), predict_x0_from_eps (eq. 15),
                  p_mean_variance / p_sample (eq. 11, Algorithm 2), L_simple (eq. 14),
                  DDIM (Song, Meng & Ermon 2021, eq. 12) on a respaced schedule
  checkpoints     self-describing, atomic, loaded with weights_only
  converter       diffusers UNet2DModel folders (google/ddpm-cifar10-32) -> our checkpoint
  data            shapes (built in), CIFAR-10, STL-10, a folder of images
  training        Algorithm 1 with Adam, warm-up, grad clipping, EMA, AMP, exact resume
  sampling        grids and per-image PNGs
  main()          python ddpm.py {train,sample,convert,info}

Time convention: t is 0-indexed in code, t = 0 .. T-1; the code's t=0 is the paper's t=1.
Images live in [-1, 1] everywhere inside this file; the data boundary converts.

  python ddpm.py train --data cifar10        # Ho et al.'s CIFAR-10 run (a GPU job)
  python ddpm.py train --data shapes --model tiny --steps 2000   # a CPU demo
  python ddpm.py sample --ckpt ckpt.pt --n 64
  python ddpm.py info --model cifar10
  python ddpm.py convert --from-diffusers ddpm-cifar10-32/   # published weights -> ckpt.pt
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

CHECKPOINT_FORMAT = 1

# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # model (a preset fills these; a flag overrides one)
    model: str = "cifar10"  # preset name, see PRESETS
    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    dropout: float = 0.1
    # diffusion
    T: int = 1000
    schedule: str = "linear"  # linear | cosine
    var_type: str = "fixed_large"  # fixed_large: sigma^2 = beta_t | fixed_small: beta-tilde_t
    clip_x0: bool = True  # clip the predicted x0 to [-1, 1] when sampling
    # training
    data: str = "shapes"  # shapes | cifar10 | stl10 | PATH to a folder of images
    data_dir: str = "data"  # where torchvision datasets are downloaded to
    steps: int = 800_000  # optimizer steps in total (a resumed run finishes the same plan)
    batch_size: int = 128
    grad_accum: int = 1  # micro-batches per optimizer step; each is batch_size / grad_accum
    lr: float = 2e-4
    warmup: int = 5000
    cosine_lr: bool = False  # decay the lr to 0 after warm-up (not in Ho et al.)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    flip: bool = True  # random horizontal flips
    amp: str = "bf16"  # bf16 | fp16 | none; only used on CUDA, CPU trains in fp32
    compile: bool = False
    seed: int = 0
    ckpt: str = "ckpt.pt"
    out: str = ""  # run directory; empty means runs/<data>/
    save_every: int = 5000
    sample_every: int = 5000
    log_every: int = 100
    num_workers: int = -1  # -1: by CPU count
    device: str = "auto"  # auto | cpu | cuda


# Named model presets. Ho et al. use 4 resolutions (32 -> 4) for CIFAR-10 and 6 (256 -> 8) at
# 256x256, attention at 16x16 in all of them; the 64 and 96 presets follow that: one more level
# per doubling of the image size, attention at the level nearest 16x16 (12x12 for 96 = 3 * 2^5).
PRESETS = {
    "cifar10": dict(image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.1),
    "res64": dict(image_size=64, ch=128, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=2,
                  attn_resolutions=(16,), dropout=0.1),
    "stl10": dict(image_size=96, ch=128, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=2,
                  attn_resolutions=(12,), dropout=0.1),
    # Not from the paper: small enough to train on a 2-core CPU in minutes.
    "tiny": dict(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                 attn_resolutions=(16,), dropout=0.0),
}
PRESET_BY_SIZE = {32: "cifar10", 64: "res64", 96: "stl10"}
MODEL_FIELDS = ("image_size", "in_channels", "ch", "ch_mult", "num_res_blocks",
                "attn_resolutions", "dropout")


def make_config(model="cifar10", **overrides):
    """Config from a preset, with explicit overrides (None means 'not given')."""
    if model not in PRESETS:
        raise ValueError(f"unknown model preset '{model}'; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = Config(**{"model": model, **PRESETS[model], **given})
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Bad settings are a ValueError with a sentence, before any work starts."""
    levels = len(cfg.ch_mult)
    if cfg.image_size < 2 ** (levels - 1) or cfg.image_size % 2 ** (levels - 1):
        raise ValueError(f"image size {cfg.image_size} does not fit preset '{cfg.model}': it "
                         f"halves the image {levels - 1} times, so the size must be a multiple "
                         f"of {2 ** (levels - 1)}")
    if cfg.ch % 32:
        raise ValueError(f"ch={cfg.ch} must be a multiple of 32 (GroupNorm uses 32 groups)")
    if cfg.schedule not in ("linear", "cosine"):
        raise ValueError(f"unknown schedule '{cfg.schedule}'; use linear or cosine")
    if cfg.var_type not in ("fixed_large", "fixed_small"):
        raise ValueError(f"unknown var_type '{cfg.var_type}'; use fixed_large or fixed_small")
    if cfg.amp not in ("bf16", "fp16", "none"):
        raise ValueError(f"unknown --amp '{cfg.amp}'; use bf16, fp16 or none")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.batch_size % cfg.grad_accum:
        raise ValueError("--batch-size must be a positive multiple of --grad-accum")
    if cfg.steps < 1 or cfg.T < 2:
        raise ValueError("--steps must be >= 1 and T >= 2")


# ----------------------------------------------------------------------------------------------
# Noise schedules: float64 numpy, no torch, so sample_ort.py rebuilds the same numbers.


def get_betas(schedule, T):
    """beta_1..beta_T as a float64 array of length T."""
    if schedule == "linear":
        # Ho et al.: 1e-4 to 0.02 for T=1000; scaled by 1000/T for other T (improved-diffusion)
        scale = 1000 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if schedule == "cosine":
        # Nichol & Dhariwal eq. 17: alpha-bar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) pi/2)^2
        s = 0.008
        steps = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        return np.clip(betas, 0, 0.999)  # clipped to avoid the singularity at t = T
    raise ValueError(f"unknown schedule '{schedule}'; use linear or cosine")


# ----------------------------------------------------------------------------------------------
# U-Net building blocks (bottom-up)


def get_timestep_embedding(t, dim):
    """Sinusoidal embedding of integer t (Vaswani et al.), [sin, cos] halves, as in Ho et al."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - 1))
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, dim)


def Normalize(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, temb_channels, dropout):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # time enters after the first conv
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, scale C^-1/2."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, 1, C, H * W).transpose(2, 3)  # (B, 1, HW, C)
        k = self.k(h).reshape(B, 1, C, H * W).transpose(2, 3)
        v = self.v(h).reshape(B, 1, C, H * W).transpose(2, 3)
        # softmax(q k^T / sqrt(C)) v; the fused kernel computes exactly this, faster
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # TF "SAME" padding for a stride-2 3x3 conv pads right/bottom only; torch's padding=1
        # would pad both sides and shift the grid, so published weights would not match.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----------------------------------------------------------------------------------------------
# The U-Net (Ho et al. appendix B): eps_theta(x_t, t)


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ch = cfg.ch
        self.num_res_blocks = cfg.num_res_blocks
        temb_ch = 4 * cfg.ch
        num_levels = len(cfg.ch_mult)

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(cfg.ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)

        # downsampling: num_res_blocks blocks per level, attention after each at 16x16
        res = cfg.image_size
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        skip_channels = [cfg.ch]  # channels of every h pushed onto the skip stack
        self.down = nn.ModuleList()
        for level in range(num_levels):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = cfg.ch * in_ch_mult[level], cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, temb_ch, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
                skip_channels.append(block_in)
            down = nn.Module()
            down.block, down.attn = block, attn
            if level != num_levels - 1:
                down.downsample = Downsample(block_in)
                skip_channels.append(block_in)
                res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout)

        # upsampling: num_res_blocks + 1 blocks per level, each eating one skip connection
        self.up = nn.ModuleList()
        for level in reversed(range(num_levels)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                block.append(ResnetBlock(block_in + skip_channels.pop(), block_out, temb_ch,
                                         cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, up)  # self.up[level] is the level at that resolution, as in TF
        assert not skip_channels

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, x, t):
        """x: (B, C, H, W) noisy images x_t in [-1, 1]-ish, t: (B,) int64 in [0, T). Returns eps."""
        temb = get_timestep_embedding(t, self.ch).to(x.dtype)  # (B, ch), sin/cos in float32
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))  # (B, 4 ch)

        hs = [self.conv_in(x)]
        for down in self.down:
            for i, block in enumerate(down.block):
                h = block(hs[-1], temb)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
                hs.append(h)
            if hasattr(down, "downsample"):
                hs.append(down.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)

        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)  # [h, skip]
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        assert not hs
        return self.conv_out(F.silu(self.norm_out(h)))


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_flops(model, cfg, batch=1):
    """FLOPs of one forward pass (2 per multiply-add), counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------
# The diffusion: forward process q, reverse process p, loss, samplers


class GaussianDiffusion:
    """All coefficients precomputed once in float64 (improved-diffusion's layout).

    `timesteps[i]` is the network's t for index i: the identity for the full schedule, the kept
    original t's for a respaced one (`respace`), whose betas come from the kept alpha-bars.
    """

    def __init__(self, betas, var_type="fixed_large", clip_x0=True, timesteps=None):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.num_timesteps = len(betas)
        self.timesteps = np.arange(len(betas)) if timesteps is None else np.asarray(timesteps)
        self.var_type, self.clip_x0 = var_type, clip_x0

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)  # alpha-bar_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # alpha-bar_{t-1}
        # q(x_t | x_0), eq. 4
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # x_0 from eps, eq. 15 solved for x_0
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0), eqs. 6-7
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_config(cls, cfg):
        return cls(get_betas(cfg.schedule, cfg.T), cfg.var_type, cfg.clip_x0)

    def respace(self, timesteps):
        """A shorter chain over the kept t's: beta_i = 1 - abar(t_i) / abar(t_{i-1})."""
        timesteps = np.asarray(sorted(timesteps))
        abar = self.alphas_cumprod[timesteps]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(betas, self.var_type, self.clip_x0, self.timesteps[timesteps])

    @staticmethod
    def _at(arr, i, x):
        """arr[i] as a (B, 1, 1, 1) tensor of x's dtype and device; i: (B,) index tensor."""
        return torch.from_numpy(arr)[i.cpu()].to(x.device, x.dtype).view(-1, 1, 1, 1)

    # -- forward process ------------------------------------------------------------------------

    def q_sample(self, x0, i, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4)."""
        return self._at(self.sqrt_alphas_cumprod, i, x0) * x0 + \
            self._at(self.sqrt_one_minus_alphas_cumprod, i, x0) * noise

    def q_posterior(self, x0, x_t, i):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
        mean = self._at(self.posterior_mean_coef1, i, x_t) * x0 + \
            self._at(self.posterior_mean_coef2, i, x_t) * x_t
        return mean, self._at(self.posterior_variance, i, x_t)

    def predict_x0_from_eps(self, x_t, i, eps):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (eq. 15 solved for x_0)."""
        return self._at(self.sqrt_recip_alphas_cumprod, i, x_t) * x_t - \
            self._at(self.sqrt_recipm1_alphas_cumprod, i, x_t) * eps

    # -- reverse process ------------------------------------------------------------------------

    def model_eps(self, model, x_t, i):
        """eps_theta(x_t, t) with the network fed the original t of index i."""
        t = torch.as_tensor(self.timesteps[i.cpu().numpy()], dtype=torch.long, device=x_t.device)
        return model(x_t, t).to(x_t.dtype)

    def p_mean_variance(self, eps, x_t, i):
        """Mean and variance of p_theta(x_{t-1} | x_t) given eps_theta (eq. 11 via eq. 15 + 7)."""
        pred_x0 = self.predict_x0_from_eps(x_t, i, eps)
        if self.clip_x0:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, posterior_variance = self.q_posterior(pred_x0, x_t, i)
        if self.var_type == "fixed_large":
            variance = self._at(self.betas, i, x_t)  # sigma_t^2 = beta_t (Ho et al.'s CIFAR-10)
        else:
            variance = posterior_variance  # sigma_t^2 = beta-tilde_t
        return mean, variance, pred_x0

    def p_sample(self, eps, x_t, i, noise):
        """x_{t-1} = mu + sigma z, with no noise at t = 0 (Algorithm 2, lines 3-4)."""
        mean, variance, pred_x0 = self.p_mean_variance(eps, x_t, i)
        nonzero = (i != 0).to(x_t.device, x_t.dtype).view(-1, 1, 1, 1)  # a mask, not a branch: traces cleanly
        return mean + nonzero * variance.sqrt() * noise, pred_x0

    def ddim_step(self, eps, x_t, i, noise, eta=0.0):
        """x_{t-1} from x_t (Song et al. eq. 12); eta=1 is DDPM's posterior noise, eta=0 none."""
        pred_x0 = self.predict_x0_from_eps(x_t, i, eps)
        if self.clip_x0:
            pred_x0 = pred_x0.clamp(-1, 1)
            eps = (self._at(self.sqrt_recip_alphas_cumprod, i, x_t) * x_t - pred_x0) / \
                self._at(self.sqrt_recipm1_alphas_cumprod, i, x_t)  # eps consistent with x0
        abar = self._at(self.alphas_cumprod, i, x_t)
        abar_prev = self._at(self.alphas_cumprod_prev, i, x_t)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        x_prev = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - sigma ** 2).sqrt() * eps
        return x_prev + sigma * noise, pred_x0

    def training_loss(self, model, x0, i, noise):
        """L_simple = || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2 (eq. 14)."""
        x_t = self.q_sample(x0, i, noise)
        return F.mse_loss(self.model_eps(model, x_t, i).float(), noise.float())


def ddim_timesteps(T, steps):
    """`steps` evenly strided t's, 0, T//steps, ... ('leading' spacing, as DDIMScheduler)."""
    if not 1 <= steps <= T:
        raise ValueError(f"--steps must be between 1 and T={T}, got {steps}")
    return np.arange(steps) * (T // steps)


@torch.no_grad()
def sample_loop(model, diffusion, x_T, sampler="ddpm", steps=None, eta=0.0, noise_fn=None,
                generator=None, callback=None, progress=False):
    """Run the reverse process from x_T (Algorithm 2, or DDIM) and return x_0.

    steps:     number of steps; fewer than T respaces the schedule (network sees original t).
    noise_fn:  noise_fn(k, shape) -> tensor, the fresh noise for the k-th step (k = 0 first);
               default randn from `generator`. Two implementations fed the same noise_fn agree.
    callback:  callback(k, t, x_t, pred_x0) after every step, e.g. for progress pictures.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler '{sampler}'; use ddpm or ddim")
    T = diffusion.num_timesteps
    steps = steps or T
    if sampler == "ddpm" and steps == T:
        chain = diffusion
    else:
        chain = diffusion.respace(ddim_timesteps(T, steps))
    x = x_T
    indices = range(chain.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc=f"{sampler} sampling", unit="step", leave=False)
    for k, i_int in enumerate(indices):
        i = torch.full((x.shape[0],), i_int, dtype=torch.long)  # on the CPU: no device sync
        if noise_fn is not None:
            noise = noise_fn(k, x.shape).to(x.device, x.dtype)
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        eps = chain.model_eps(model, x, i)
        if sampler == "ddpm":
            x, pred_x0 = chain.p_sample(eps, x, i, noise)
        else:
            x, pred_x0 = chain.ddim_step(eps, x, i, noise, eta)
        if callback is not None:
            callback(k, int(chain.timesteps[i_int]), x, pred_x0)
    return x


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, state):
    """Atomic: write a temp file beside the target, then rename over it."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    return state


def config_from_dict(d):
    known = {f.name for f in dataclasses.fields(Config)}
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
    return Config(**d)


def load_checkpoint(path, ema=True):
    """(model in eval mode, config) rebuilt from the checkpoint alone. EMA weights by default."""
    state = read_checkpoint(path)
    cfg = config_from_dict(state["config"])
    model = UNet(cfg)
    weights = state["ema"] if ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    return model.eval(), cfg


# ----------------------------------------------------------------------------------------------
# Published weights: a diffusers UNet2DModel folder (e.g. google/ddpm-cifar10-32) -> our checkpoint

HO_LAYOUT = {  # UNet2DModel settings that make it Ho et al.'s network
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-6, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default", "center_input_sample": False, "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "time_embedding_dim": None,
}


def diffusers_config(d):
    """Our Config from a UNet2DModel config.json, or ValueError naming what is not Ho et al.'s."""
    wrong = [f"{k}={d.get(k)!r} (Ho et al.: {v!r})" for k, v in HO_LAYOUT.items() if d.get(k, v) != v]
    channels = d["block_out_channels"]
    ch, size = channels[0], d["sample_size"]
    down, up = d["down_block_types"], d["up_block_types"]
    attn = tuple(size // 2 ** i for i, kind in enumerate(down) if kind == "AttnDownBlock2D")
    if any(kind not in ("DownBlock2D", "AttnDownBlock2D") for kind in down):
        wrong.append(f"down_block_types={down}")
    if list(up) != [k.replace("Down", "Up") for k in reversed(down)]:
        wrong.append(f"up_block_types={up} (must mirror the down blocks)")
    if d.get("attention_head_dim") not in (None, *channels) or d.get("num_attention_heads") not in (None, 1):
        wrong.append(f"attention_head_dim={d.get('attention_head_dim')} (Ho et al. use one head: None)")
    if any(c % ch for c in channels) or d.get("out_channels", 3) != d.get("in_channels", 3):
        wrong.append(f"block_out_channels={channels} / out_channels={d.get('out_channels')}")
    if wrong:
        raise ValueError("this UNet2DModel is not Ho et al.'s layout: " + "; ".join(wrong))
    return dict(image_size=size, in_channels=d.get("in_channels", 3), ch=ch,
                ch_mult=tuple(c // ch for c in channels), num_res_blocks=d["layers_per_block"],
                attn_resolutions=attn, dropout=d.get("dropout", 0.1) or 0.1)


def diffusers_key(key, num_levels):
    """Our parameter name for a diffusers UNet2DModel parameter name (None: not ours)."""
    parts = key.split(".")
    fixed = {"time_embedding.linear_1": "temb.dense.0", "time_embedding.linear_2": "temb.dense.1",
             "conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}
    head = ".".join(parts[:-1])
    if head in fixed:
        return f"{fixed[head]}.{parts[-1]}"
    layer = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2",
             "conv2": "conv2", "conv_shortcut": "nin_shortcut", "group_norm": "norm",
             "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v",
             "to_out": "proj_out", "proj_attn": "proj_out"}
    if parts[0] in ("down_blocks", "up_blocks"):
        level = int(parts[1]) if parts[0] == "down_blocks" else num_levels - 1 - int(parts[1])
        ours = "down" if parts[0] == "down_blocks" else "up"
        kind, rest = parts[2], parts[4:]
        if kind in ("downsamplers", "upsamplers"):
            resample = "downsample" if kind == "downsamplers" else "upsample"
            return f"{ours}.{level}.{resample}.conv.{rest[-1]}"
        group = {"resnets": "block", "attentions": "attn"}[kind]
        return f"{ours}.{level}.{group}.{parts[3]}.{layer[rest[0]]}.{rest[-1]}"
    if parts[0] == "mid_block":
        name = {"resnets.0": "block_1", "resnets.1": "block_2", "attentions.0": "attn_1"}[".".join(parts[1:3])]
        return f"mid.{name}.{layer[parts[3]]}.{parts[-1]}"
    return None


def diffusers_schedule(sched, path):
    """Our diffusion settings from a scheduler_config.json; ValueError if its betas are not ours."""
    T = int(sched.get("num_train_timesteps", 1000))
    kind = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(sched.get("beta_schedule", "linear"))
    if kind == "linear":  # ours scales 1e-4..0.02 by 1000/T; diffusers takes beta_start/end as given
        ends = (sched.get("beta_start", 1e-4), sched.get("beta_end", 0.02))
        if not all(math.isclose(a, b * 1000 / T) for a, b in zip(ends, (1e-4, 0.02))):
            kind = None
    if kind is None:
        raise ValueError(f"scheduler '{path}' uses betas we do not build ({sched.get('beta_schedule')}, "
                         f"{sched.get('beta_start')}..{sched.get('beta_end')} over T={T})")
    var_type = sched.get("variance_type", "fixed_small")
    if var_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"scheduler '{path}': variance_type {var_type} is not supported")
    return dict(var_type=var_type, clip_x0=bool(sched.get("clip_sample", True)), T=T, schedule=kind)


def convert_diffusers(folder, out="ckpt.pt"):
    """Read a diffusers UNet2DModel folder and write our self-describing checkpoint."""
    unet_dir = os.path.join(folder, "unet") if os.path.isdir(os.path.join(folder, "unet")) else folder
    config_path = os.path.join(unet_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"no config.json in '{unet_dir}': not a diffusers UNet2DModel folder")
    with open(config_path) as f:
        model_cfg = diffusers_config(json.load(f))
    schedule = dict(var_type="fixed_large", clip_x0=True, T=1000, schedule="linear")  # Ho et al.
    for path in (os.path.join(folder, "scheduler", "scheduler_config.json"),
                 os.path.join(folder, "scheduler_config.json")):
        if os.path.isfile(path):
            with open(path) as f:
                schedule = diffusers_schedule(json.load(f), path)
            break
    cfg = Config(model="converted", **model_cfg, **schedule)
    check_config(cfg)

    safetensors_path = os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")
    bin_path = os.path.join(unet_dir, "diffusion_pytorch_model.bin")
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file
        theirs = load_file(safetensors_path)
    elif os.path.isfile(bin_path):
        theirs = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"no diffusion_pytorch_model.safetensors or .bin in '{unet_dir}'")

    model = UNet(cfg)
    ours = model.state_dict()
    converted, unknown = {}, []
    for key, value in theirs.items():
        name = diffusers_key(key, len(cfg.ch_mult))
        if name is None or name not in ours:
            unknown.append(key)
            continue
        converted[name] = value.reshape(ours[name].shape)  # attention Linear (C, C) -> 1x1 conv
    missing = sorted(set(ours) - set(converted))
    if unknown or missing:
        raise ValueError("the weights do not match Ho et al.'s U-Net: "
                         f"{len(unknown)} unknown ({', '.join(unknown[:5])}), "
                         f"{len(missing)} missing ({', '.join(missing[:5])})")
    model.load_state_dict(converted)
    state = model.state_dict()
    save_checkpoint(out, {"format_version": CHECKPOINT_FORMAT, "config": asdict(cfg), "step": 0,
                          "model": state, "ema": state})
    print(f"wrote {out}: {count_params(model):,} parameters, {cfg.image_size}x{cfg.image_size}, "
          f"{cfg.schedule} schedule, {cfg.var_type}, clip_x0={cfg.clip_x0}")
    return cfg


# ----------------------------------------------------------------------------------------------
# Data. Images enter as uint8 HWC and leave as float (C, H, W) in [-1, 1].

SHAPE_CLASSES = ("circle", "square", "triangle", "diamond", "cross",
                 "ring", "star", "hbar", "vbar", "ellipse")


def draw_shape(cls, rng, size):
    """One image of class `cls`: a coloured shape on a plain background, drawn 4x and reduced."""
    S = size * 4
    bg = tuple(int(c) for c in rng.integers(0, 110, 3))
    fg = tuple(int(c) for c in rng.integers(140, 256, 3))
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)
    r = S * rng.uniform(0.22, 0.34)
    cx, cy = S / 2 + S * rng.uniform(-0.12, 0.12, 2)
    name = SHAPE_CLASSES[cls]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif name == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    elif name == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=int(r / 2.5))
    elif name == "star":
        pts = [(cx + (r if k % 2 == 0 else r / 2.3) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r / 2.3) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=fg)
    elif name == "hbar":
        d.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=fg)
    elif name == "vbar":
        d.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=fg)
    elif name == "ellipse":
        d.ellipse([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=fg)
    return np.asarray(img.resize((size, size), Image.BOX))  # area average: no ringing halo


def to_model_range(images_uint8):
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1]."""
    x = torch.tensor(np.asarray(images_uint8)).permute(0, 3, 1, 2).float()  # a copy: PIL's arrays are read-only
    return x / 127.5 - 1.0


def to_uint8(x):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, clipping what the sampler overshoots."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class ShapesDataset(torch.utils.data.Dataset):
    """10 classes of coloured shapes, generated once, deterministic from the seed."""

    def __init__(self, n=10_000, size=32, seed=0):
        rng = np.random.default_rng(seed)
        self.labels = np.arange(n) % len(SHAPE_CLASSES)
        self.images = to_model_range(np.stack([draw_shape(c, rng, size) for c in self.labels]))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return self.images[idx], int(self.labels[idx])


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def center_crop_resize(img, size):
    """Shorter side to `size`, then the central size x size square; RGB uint8 array."""
    img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


class ImageFolderDataset(torch.utils.data.Dataset):
    """A folder of images; class sub-folders give labels, a flat folder gives label 0."""

    def __init__(self, root, size):
        if not os.path.isdir(root):
            raise ValueError(f"--data '{root}' is neither a built-in dataset (shapes, cifar10, "
                             "stl10) nor a folder")
        self.size = size
        subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.classes = subdirs
        candidates = []
        for label, sub in enumerate(subdirs or [""]):
            folder = os.path.join(root, sub)
            for dirpath, _, files in sorted(os.walk(folder)):
                if not subdirs and dirpath != folder:
                    continue
                candidates += [(os.path.join(dirpath, f), label) for f in sorted(files)]
        self.items, skipped = [], 0
        for path, label in candidates:
            if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS or not _opens(path):
                skipped += 1
                continue
            self.items.append((path, label))
        self.skipped = skipped
        if not self.items:
            raise ValueError(f"no readable images in '{root}' ({skipped} other files skipped)")
        if skipped:
            print(f"data: skipped {skipped} files in '{root}' that are not readable images")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        path, label = self.items[idx]
        with Image.open(path) as img:
            x = to_model_range(center_crop_resize(img, self.size)[None])[0]
        return x, label


def _opens(path):
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:
        return False


class TorchvisionImages(torch.utils.data.Dataset):
    """CIFAR-10 / STL-10 through torchvision, mapped to [-1, 1] at this boundary."""

    def __init__(self, base, size):
        self.base, self.size = base, size

    def __len__(self):
        return len(self.base)

    def __getitem__(self, idx):
        img, label = self.base[idx]
        arr = np.asarray(img) if img.size == (self.size, self.size) else center_crop_resize(img, self.size)
        return to_model_range(arr[None])[0], int(label)


DOWNLOADS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz"),
    "stl10": ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "stl10_binary.tar.gz"),
}


def load_dataset(cfg):
    if cfg.data == "shapes":
        return ShapesDataset(size=cfg.image_size, seed=cfg.seed)
    if cfg.data in DOWNLOADS:
        import torchvision
        url, filename = DOWNLOADS[cfg.data]
        try:
            with contextlib.redirect_stdout(sys.stderr):
                if cfg.data == "cifar10":
                    base = torchvision.datasets.CIFAR10(cfg.data_dir, train=True, download=True)
                else:
                    base = torchvision.datasets.STL10(cfg.data_dir, split="train+unlabeled",
                                                      download=True)
        except Exception as e:
            raise ValueError(
                f"{cfg.data} is not in '{cfg.data_dir}' and could not be downloaded "
                f"({type(e).__name__}: {str(e)[:120]}). Download {url} and put the file at "
                f"{os.path.join(cfg.data_dir, filename)}, then run again.") from None
        return TorchvisionImages(base, cfg.image_size)
    return ImageFolderDataset(cfg.data, cfg.image_size)


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches determined by (seed, step) alone, so a resumed run sees the same batches."""

    def __init__(self, n, batch_size, seed, start_step, steps):
        assert n >= batch_size
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.steps = start_step, steps

    def __len__(self):
        return self.steps - self.start_step

    def __iter__(self):
        per_epoch = self.n // self.batch_size  # drop_last
        epoch, perm = -1, None
        for step in range(self.start_step, self.steps):
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                perm = torch.randperm(self.n, generator=g)
            k = step % per_epoch
            yield perm[k * self.batch_size:(k + 1) * self.batch_size].tolist()


# ----------------------------------------------------------------------------------------------
# Pictures


def save_grid(images_uint8, path, nrow=None, pad=2):
    """(N, H, W, C) uint8 -> one PNG grid."""
    n, h, w, c = images_uint8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images_uint8[k]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)


def save_loss_curve(log_path, png_path, width=640, height=360):
    """Loss vs step from the JSONL log, drawn with Pillow (log-scale loss)."""
    rows = [json.loads(line) for line in open(log_path)]
    if len(rows) < 2:
        return
    steps = np.array([r["step"] for r in rows], dtype=float)
    loss = np.log10(np.array([max(r["loss"], 1e-8) for r in rows]))
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    m = 50
    x0, x1, y0, y1 = steps.min(), steps.max(), loss.min(), loss.max()
    y1 = y1 if y1 > y0 else y0 + 1
    pts = [(m + (s - x0) / max(x1 - x0, 1) * (width - 2 * m),
            height - m - (v - y0) / (y1 - y0) * (height - 2 * m)) for s, v in zip(steps, loss)]
    d.rectangle([m, m, width - m, height - m], outline="black")
    d.line(pts, fill=(200, 40, 40), width=2)
    d.text((m, 10), "training loss (L_simple, log scale)", fill="black")
    d.text((m, height - m + 5), f"step {int(x0)}", fill="black")
    d.text((width - m - 90, height - m + 5), f"step {int(x1)}", fill="black")
    d.text((5, m - 15), f"{10 ** y1:.4f}", fill="black")
    d.text((5, height - m), f"{10 ** y0:.4f}", fill="black")
    img.save(png_path)


# ----------------------------------------------------------------------------------------------
# Training (Algorithm 1)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is usable here")
    return torch.device(name)


def learning_rate(cfg, step):
    """Linear warm-up (Ho et al.), then constant, or a cosine decay to 0 with --cosine-lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.cosine_lr:
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr


class NonFiniteLoss(Exception):
    pass


def train(cfg, resume=None):
    device = pick_device(cfg.device)
    out_dir = cfg.out or os.path.join("runs", os.path.basename(os.path.normpath(cfg.data)))
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # AMP (nanoGPT style): bf16 autocast by default on CUDA, fp16 with a scaler, fp32 on CPU
    use_amp = device.type == "cuda" and cfg.amp != "none"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}[cfg.amp]
    autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.amp == "fp16")

    dataset = load_dataset(cfg)
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than --batch-size "
                         f"{cfg.batch_size}")
    print(f"data: {cfg.data}, {len(dataset)} images at {cfg.image_size}x{cfg.image_size}; "
          f"run directory {out_dir}; device {device}")

    raw_model = UNet(cfg).to(device)
    if device.type == "cuda":
        raw_model = raw_model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(raw_model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=cfg.lr)
    diffusion = GaussianDiffusion.from_config(cfg)
    model = torch.compile(raw_model) if cfg.compile else raw_model

    step, rng_state = 0, None
    if resume:
        state = read_checkpoint(resume)
        saved = config_from_dict(state["config"])
        for name in MODEL_FIELDS + ("T", "schedule"):
            if getattr(saved, name) != getattr(cfg, name):
                raise ValueError(f"--resume {resume}: the checkpoint has {name}="
                                 f"{getattr(saved, name)}, this run {getattr(cfg, name)}")
        if state.get("format_version") != CHECKPOINT_FORMAT or "optimizer" not in state:
            raise ValueError(f"'{resume}' holds weights only, not a training state to resume")
        raw_model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, rng_state = state["step"], state["rng"]
        print(f"resuming from {resume} at step {step} of {cfg.steps}")
        if step >= cfg.steps:
            print(f"nothing to do: the checkpoint is at step {step}, --steps is {cfg.steps}")
            return

    micro = cfg.batch_size // cfg.grad_accum
    if cfg.num_workers >= 0:
        workers = cfg.num_workers
    else:  # in-memory data needs no workers; decoding files does
        workers = 0 if isinstance(dataset, ShapesDataset) else min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, step,
                                                cfg.steps),
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed))  # its own RNG: keeps resume exact

    def loss_of(x0):
        """L_simple on a batch with random flips, t and eps (from the global torch RNG)."""
        if cfg.flip:
            flip = torch.rand(x0.shape[0], device=device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        i = torch.randint(0, cfg.T, (x0.shape[0],))  # on the CPU: indexes the schedule tables
        noise = torch.randn_like(x0)
        with autocast:
            return diffusion.training_loss(model, x0, i, noise)

    def checkpoint(at_step):
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        save_checkpoint(cfg.ckpt, {
            "format_version": CHECKPOINT_FORMAT, "config": asdict(cfg), "step": at_step,
            "model": raw_model.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng})

    def sample_grid(at_step):
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        x_T = torch.randn(64, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g,
                          device=device)
        x0 = sample_loop(ema, diffusion, x_T, sampler="ddim", steps=min(50, cfg.T), generator=g)
        save_grid(to_uint8(x0), os.path.join(out_dir, f"samples_{at_step:07d}.png"))

    # Pre-flight: one batch through data, model and backward, so a broken setup fails in
    # seconds. Its gradients are dropped and the RNG reset after it, so it changes nothing.
    first = next(iter(torch.utils.data.DataLoader(dataset, batch_size=micro)))[0].to(device)
    t0 = time.time()
    loss = loss_of(first)
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    print(f"pre-flight ok: one step on one batch, loss {loss.item():.4f}, {time.time() - t0:.1f}s")
    if rng_state is None:
        torch.manual_seed(cfg.seed)
    else:
        torch.set_rng_state(rng_state["torch"])
        if "cuda" in rng_state and device.type == "cuda":
            torch.cuda.set_rng_state(rng_state["cuda"])

    from tqdm import tqdm
    log_path = os.path.join(out_dir, "metrics.jsonl")
    log = open(log_path, "a" if resume else "w")
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    t_last, imgs_since = time.time(), 0
    try:
        for batch, _ in loader:
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for x0 in batch.to(device, non_blocking=True).split(micro):
                if device.type == "cuda":
                    x0 = x0.contiguous(memory_format=torch.channels_last)
                loss = loss_of(x0) / cfg.grad_accum
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"the loss became {loss.item()} at step {step}")
                scaler.scale(loss).backward()
                loss_sum += loss.item()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), raw_model.parameters()):
                    p_ema.lerp_(p, 1 - cfg.ema_decay)
            step += 1
            imgs_since += batch.shape[0]
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.time()
                ips = imgs_since / (now - t_last)
                t_last, imgs_since = now, 0
                log.write(json.dumps({"step": step, "loss": loss_sum, "lr": lr,
                                      "grad_norm": float(grad_norm), "img_per_s": ips}) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss_sum:.4f}", img_s=f"{ips:.1f}")
            if step % cfg.save_every == 0 or step == cfg.steps:
                checkpoint(step)
            if step % cfg.sample_every == 0 or step == cfg.steps:
                sample_grid(step)
    except NonFiniteLoss as e:
        bar.close()
        kept = f"the last good checkpoint '{cfg.ckpt}' is intact" if os.path.exists(cfg.ckpt) \
            else "no checkpoint had been written yet"
        raise SystemExit(f"error: {e}; training stopped and {kept}. Try a lower --lr, "
                         "--amp bf16 instead of fp16, or check the data.") from None
    except KeyboardInterrupt:
        bar.close()
        checkpoint(step)
        raise SystemExit(f"\ninterrupted: saved step {step} to '{cfg.ckpt}'; continue with "
                         f"--resume {cfg.ckpt}") from None
    finally:
        log.close()
    bar.close()
    save_loss_curve(log_path, os.path.join(out_dir, "loss.png"))
    print(f"done: {step} steps; checkpoint '{cfg.ckpt}', samples and loss curve in {out_dir}")


# ----------------------------------------------------------------------------------------------
# Sampling


def sample(ckpt, n=64, steps=None, sampler="ddpm", eta=0.0, seed=0, out="samples.png",
           outdir=None, ema=True, batch=None, device="auto"):
    if n < 1:
        raise ValueError("--n must be at least 1")
    device = pick_device(device)
    model, cfg = load_checkpoint(ckpt, ema=ema)
    model.to(device)
    diffusion = GaussianDiffusion.from_config(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    batch = batch or n
    images = []
    t0 = time.time()
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x_T = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g,
                          device=device)
        x0 = sample_loop(model, diffusion, x_T, sampler=sampler, steps=steps, eta=eta,
                         generator=g, progress=True)
        images.append(to_uint8(x0))
    elapsed = time.time() - t0
    images = np.concatenate(images)
    save_grid(images, out)
    if outdir:
        os.makedirs(outdir, exist_ok=True)
        for k, img in enumerate(images):
            Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(
                os.path.join(outdir, f"{k:05d}.png"))
    n_steps = steps or cfg.T
    print(f"wrote {out}" + (f" and {n} PNGs in {outdir}" if outdir else "") +
          f"; {n * n_steps / elapsed:.1f} image-steps/s on {device} ({sampler}, {n_steps} steps)")


# ----------------------------------------------------------------------------------------------
# Command line


def add_config_flags(parser):
    """One flag per Config field (--batch-size for batch_size); default None = preset/default."""
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")),
                                default=None, metavar="A,B,..")
        else:
            parser.add_argument(flag, type=type(f.default), default=None)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ddpm.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="train a model (Algorithm 1)")
    add_config_flags(p_train)
    p_train.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                         help="continue from PATH (default: the --ckpt file)")

    p_sample = sub.add_parser("sample", help="sample images from a checkpoint (Algorithm 2)")
    p_sample.add_argument("--ckpt", default="ckpt.pt")
    p_sample.add_argument("--n", type=int, default=64)
    p_sample.add_argument("--steps", type=int, default=None, help="default: T (1000)")
    p_sample.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p_sample.add_argument("--eta", type=float, default=0.0)
    p_sample.add_argument("--seed", type=int, default=0)
    p_sample.add_argument("--batch", type=int, default=None)
    p_sample.add_argument("--out", default="samples.png")
    p_sample.add_argument("--outdir", default=None, help="also write one PNG per image here")
    p_sample.add_argument("--no-ema", action="store_true", help="use the raw, not the EMA, weights")
    p_sample.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p_convert = sub.add_parser("convert", help="make a checkpoint from published weights")
    p_convert.add_argument("--from-diffusers", required=True, metavar="DIR",
                           help="a diffusers UNet2DModel folder, e.g. google/ddpm-cifar10-32")
    p_convert.add_argument("-o", "--out", default="ckpt.pt")

    p_info = sub.add_parser("info", help="config, parameter count and FLOPs of a model")
    p_info.add_argument("--model", default=None, choices=list(PRESETS))
    p_info.add_argument("--image-size", type=int, default=None)
    p_info.add_argument("--ckpt", default=None)

    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
            if given["model"] is None:  # pick the preset from the data, then the image size
                size = given["image_size"] or (96 if given["data"] == "stl10" else 32)
                given["model"] = "tiny" if given["data"] in (None, "shapes") else PRESET_BY_SIZE.get(size)
                if given["model"] is None:
                    raise ValueError(f"no preset for --image-size {size}; pass --model "
                                     f"({', '.join(PRESETS)}) and a size it can take")
            cfg = make_config(**given)
            resume = None if args.resume is None else (args.resume or cfg.ckpt)
            train(cfg, resume)
        elif args.command == "sample":
            sample(args.ckpt, args.n, args.steps, args.sampler, args.eta, args.seed, args.out,
                   args.outdir, ema=not args.no_ema, batch=args.batch, device=args.device)
        elif args.command == "convert":
            convert_diffusers(args.from_diffusers, args.out)
        elif args.command == "info":
            if args.ckpt:
                model, cfg = load_checkpoint(args.ckpt)
            else:
                cfg = make_config(args.model or "cifar10", image_size=args.image_size)
                model = UNet(cfg)
            for name, value in asdict(cfg).items():
                print(f"{name:>17}: {value}")
            print(f"{'parameters':>17}: {count_params(model):,}")
            print(f"{'forward FLOPs':>17}: {count_flops(model, cfg) / 1e9:.2f} G at batch 1, "
                  f"{cfg.image_size}x{cfg.image_size}")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
