"""Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel, 2020) in one file.

What is here, in the order of the paper:
  Config          one dataclass: model preset, diffusion and training settings
  schedules       beta_t, linear (Ho et al. sec. 4) and cosine (Nichol & Dhariwal 2021, eq. 17)
  U-Net           Ho et al.'s architecture (appendix B), with the attribute names of their
                  TF code as ported by pesser/pytorch_diffusion, so published weights load; an
                  optional class embedding; its downsampling half as the noisy classifier
  diffusion       q_sample (eq. 4), q_posterior (eqs. 6-7), predict_x0_from_eps (eq. 15),
                  p_mean_variance / p_sample (eq. 11, Algorithm 2), L_simple (eq. 14),
                  DDIM (Song, Meng & Ermon 2021, eq. 12) and DPM-Solver++(2M) (Lu et al.
                  2022) on a respaced schedule, the bound,
                  classifier-free guidance (Ho & Salimans 2021), classifier guidance
                  (Dhariwal & Nichol 2021)
  checkpoints     self-describing, atomic, never non-finite, loaded with weights_only
  data            shapes (built in), CIFAR-10, STL-10, a folder of images (RGB or grayscale)
  training        Algorithm 1 with Adam (or AdamW), warm-up, grad clipping, EMA, AMP, exact
                  resume (also after Ctrl-C or SIGTERM, which finish the step and save), DDP
                  under torchrun with the same math at every world size
  sampling        grids and per-image PNGs, optionally under bf16 autocast
  main()          python ddpm.py {train,train-classifier,sample,info}

Beside it: convert.py (diffusers folders, both ways), export.py (ONNX), sample_ort.py (ONNX
Runtime, no torch).

Time convention: t is 0-indexed in code, t = 0 .. T-1; the code's t=0 is the paper's t=1.
Images live in [-1, 1] everywhere inside this file; the data boundary converts.

  python ddpm.py train --data cifar10        # Ho et al.'s CIFAR-10 run (a GPU job)
  python ddpm.py train --data shapes --model tiny --steps 2000   # a CPU demo
  python ddpm.py train --resume              # continue ckpt.pt exactly where it stopped
  torchrun --standalone --nproc-per-node=8 ddpm.py train --data cifar10   # 8 GPUs, batch 128 in all
  python ddpm.py sample --ckpt ckpt.pt --n 64
  python ddpm.py train --data shapes --cond ...  # class-conditional, then sample --class all --guidance 3
  python ddpm.py info --model cifar10
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image, ImageDraw

CHECKPOINT_FORMAT = 1

# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # model (a preset fills these; a flag overrides one)
    model: str = "cifar10"
    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    dropout: float = 0.1
    norm_groups: int = 32  # GroupNorm groups (Ho et al.: 32)
    # diffusion
    T: int = 1000
    schedule: str = "linear"
    var_type: str = "fixed_large"
    clip_x0: bool = True
    prediction: str = "eps"  # Ho et al.: eps; v (Salimans & Ho 2022) and x0 are converted to eps
    # class conditioning (Ho & Salimans 2021): num_classes and class_names come from the data
    cond: bool = False
    p_uncond: float = 0.1
    num_classes: int = 0  # 0: unconditional; else the class embedding has num_classes + 1 rows
    class_names: tuple = ()
    kind: str = "denoiser"  # or "classifier": p(y | x_t, t) for classifier guidance
    # training
    data: str = "shapes"
    data_dir: str = "data"
    steps: int = 800_000
    batch_size: int = 128  # the global batch, over all processes and micro-batches; 0: auto
    grad_accum: int = 1  # 0: auto
    grad_checkpoint: bool = False
    optimizer: str = "adam"
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 5000
    cosine_lr: bool = False  # not in Ho et al.
    min_snr: float = 0.0  # not in Ho et al.: min-SNR-gamma weights (Hang et al. 2023); 0 is L_simple
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    flip: bool = True
    amp: str = "auto"
    compile: bool = False
    seed: int = 0
    ckpt: str = "ckpt.pt"
    out: str = ""
    save_every: int = 5000
    sample_every: int = 5000
    log_every: int = 100
    num_workers: int = -1
    device: str = "auto"
    tensorboard: bool = True


# One line of help per Config field; `train -h` prints it with the default.
HELP = {
    "model": "model preset (default: tiny for shapes, else by image size: cifar10 32, res64 64, "
             "stl10 96)",
    "image_size": "image height and width in pixels (default: the preset's)",
    "in_channels": "1 (grayscale) or 3 (RGB)",
    "ch": "base channel count, a multiple of 32 (default: the preset's)",
    "ch_mult": "channel multiplier per resolution level (default: the preset's)",
    "num_res_blocks": "residual blocks per level (default: the preset's)",
    "attn_resolutions": "resolutions with self-attention, each one the U-Net reaches "
                        "(default: the preset's)",
    "dropout": "dropout in the residual blocks (default: the preset's)",
    "norm_groups": "GroupNorm groups; 32 is Ho et al.'s (default: the preset's)",
    "T": "diffusion steps T",
    "schedule": "beta schedule: linear (Ho et al.) or cosine (Nichol & Dhariwal)",
    "var_type": "reverse variance: fixed_large (sigma^2 = beta_t), fixed_small (beta-tilde_t), or "
                "learned_range (the network interpolates the two, trained with L_hybrid; Nichol & "
                "Dhariwal 2021)",
    "clip_x0": "clip the predicted x_0 to [-1, 1] when sampling",
    "prediction": "what the network predicts: eps (Ho et al.), v = sqrt(abar) eps - sqrt(1-abar) x_0 "
                  "(Salimans & Ho 2022) or x0; samplers and export convert it to eps",
    "cond": "class-conditional: labels from the data (shapes, cifar10, stl10's labelled split, a "
            "folder with class sub-folders), dropped with probability --p-uncond so one network "
            "also learns the unconditional model that classifier-free guidance needs",
    "p_uncond": "with --cond, the probability a label is replaced by 'no label' (Ho & Salimans: "
                "0.1 or 0.2)",
    "num_classes": "set from the data",
    "class_names": "set from the data",
    "kind": "set by the command",
    "data": "shapes (built in), cifar10, stl10, or a folder of images (class sub-folders give "
            "labels)",
    "data_dir": "where cifar10 and stl10 are downloaded to or found",
    "steps": "optimizer steps in total; a resumed run finishes the same plan",
    "batch_size": "images per optimizer step, over all processes of a torchrun job; auto: the "
                  "largest that fits in GPU memory, found by trial (CUDA only) (default: 128)",
    "grad_accum": "micro-batches per optimizer step and process (each batch_size / (processes x "
                  "grad_accum) images); auto: the fewest that fit in GPU memory, keeping "
                  "--batch-size (CUDA only) (default: 1)",
    "grad_checkpoint": "recompute the activations of the residual and attention blocks in the "
                       "backward pass instead of storing them: less memory, about a third more "
                       "compute, the same gradients",
    "optimizer": "adam (Ho et al.) or adamw (decoupled weight decay, Loshchilov & Hutter 2019)",
    "lr": "learning rate after warm-up",
    "weight_decay": "weight decay: decoupled with adamw, an L2 term in the gradient with adam "
                    "(default: 0 with adam, 0.01 with adamw, PyTorch's defaults)",
    "warmup": "linear learning-rate warm-up steps",
    "cosine_lr": "decay the learning rate to 0 after warm-up (not in Ho et al.)",
    "min_snr": "weight each t's loss by min(SNR_t, gamma) as Hang et al. 2023 (gamma 5); 0 is "
               "Ho et al.'s unweighted L_simple",
    "grad_clip": "clip the gradient norm to this; 0 turns clipping off",
    "ema_decay": "decay of the exponential moving average of the weights, in [0, 1)",
    "flip": "random horizontal flips",
    "amp": "mixed precision: auto (bf16 on CUDA, fp32 on a CPU), bf16 (also on CPUs with native "
           "bf16: AVX512-BF16 or AMX), fp16 (CUDA, with a loss scaler) or none",
    "compile": "torch.compile the model",
    "seed": "seed of the data order, t, eps, flips and dropout",
    "ckpt": "checkpoint file, written every --save-every steps and on Ctrl-C (train-classifier: "
            "clf.pt)",
    "out": "run directory for metrics.jsonl, loss.png and sample grids (default: runs/<data>)",
    "save_every": "save the checkpoint every N steps; 0: only at the end and on a stop",
    "sample_every": "write a 64-image DDIM grid every N steps and at the end; 0: never",
    "log_every": "log loss, lr, grad norm and img/s every N steps",
    "num_workers": "data loader processes; -1: 0 for built-in data, else up to 8 by CPU count",
    "device": "auto, cpu, cuda or cuda:N; under torchrun each process takes its LOCAL_RANK's GPU",
    "tensorboard": "also write TensorBoard event files (loss, lr, grad norm, img/s, sample grids) "
                   "in the run directory, where the tensorboard package is installed",
}


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
                "attn_resolutions", "dropout", "norm_groups", "num_classes")
DERIVED_FIELDS = ("num_classes", "class_names", "kind")  # not flags: the data and command set them
KINDS = ("denoiser", "classifier")
BUILTIN_DATA = ("shapes", "cifar10", "stl10")
PREDICTIONS = ("eps", "v", "x0")
VAR_TYPES = ("fixed_large", "fixed_small", "learned_range")
AMP_MODES = ("auto", "bf16", "fp16", "none")
OPTIMIZERS = ("adam", "adamw")
SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddpm", "ddim", "dpm++")


def make_config(model="cifar10", **overrides):
    """Config from a preset, with explicit overrides (None means 'not given')."""
    if model not in PRESETS:
        raise ValueError(f"unknown model preset '{model}'; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = {**PRESETS[model], **given}
    levels = [settings["image_size"] // 2 ** k for k in range(len(settings["ch_mult"]))]
    if "attn_resolutions" not in given and not set(settings["attn_resolutions"]) & set(levels):
        # another image size: attention at the level nearest 16x16, as the presets place it
        settings["attn_resolutions"] = (min(levels, key=lambda r: abs(r - 16)),)
    cfg = Config(model=model, **settings)
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Bad settings are a ValueError with a sentence, before any work starts."""
    levels = len(cfg.ch_mult)
    if levels < 1 or any(m < 1 for m in cfg.ch_mult) or cfg.num_res_blocks < 1:
        raise ValueError("--ch-mult needs at least one positive multiplier and --num-res-blocks "
                         "must be at least 1")
    if cfg.image_size < 2 ** (levels - 1) or cfg.image_size % 2 ** (levels - 1):
        raise ValueError(f"image size {cfg.image_size} does not fit preset '{cfg.model}': it "
                         f"halves the image {levels - 1} times, so the size must be a multiple "
                         f"of {2 ** (levels - 1)}")
    resolutions = [cfg.image_size // 2 ** k for k in range(levels)]
    missing = [r for r in cfg.attn_resolutions if r not in resolutions]
    if missing:
        raise ValueError(f"--attn-resolutions {','.join(map(str, missing))}: this U-Net works at "
                         f"{', '.join(map(str, resolutions))} pixels, so attention there would "
                         "never run")
    if cfg.norm_groups < 1 or cfg.ch < cfg.norm_groups or cfg.ch % cfg.norm_groups:
        raise ValueError(f"ch={cfg.ch} must be a positive multiple of --norm-groups {cfg.norm_groups}")
    if cfg.in_channels not in (1, 3):
        raise ValueError(f"--in-channels {cfg.in_channels}: use 1 (grayscale) or 3 (RGB)")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout {cfg.dropout} must be in [0, 1)")
    if cfg.schedule not in ("linear", "cosine"):
        raise ValueError(f"unknown schedule '{cfg.schedule}'; use linear or cosine")
    if cfg.var_type not in VAR_TYPES:
        raise ValueError(f"unknown var_type '{cfg.var_type}'; use {', '.join(VAR_TYPES)}")
    if cfg.prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction '{cfg.prediction}'; use {', '.join(PREDICTIONS)}")
    if not (math.isfinite(cfg.min_snr) and cfg.min_snr >= 0):
        raise ValueError(f"--min-snr {cfg.min_snr}: use gamma > 0 (Hang et al.: 5), or 0 for none")
    if not 0 <= cfg.p_uncond < 1:
        raise ValueError(f"--p-uncond {cfg.p_uncond} must be in [0, 1) (Ho & Salimans: 0.1 or 0.2)")
    if cfg.num_classes < 0 or (cfg.class_names and len(cfg.class_names) != cfg.num_classes):
        raise ValueError(f"num_classes {cfg.num_classes} does not match the {len(cfg.class_names)} "
                         "class names")
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown kind '{cfg.kind}'; use {', '.join(KINDS)}")
    if cfg.T < 2:
        raise ValueError(f"T={cfg.T}: the diffusion needs at least 2 steps")
    if cfg.schedule == "linear" and cfg.T <= 20:  # beta_T = 0.02 * 1000 / T must stay below 1
        raise ValueError(f"T={cfg.T}: the linear schedule needs T > 20 (its beta_T = 20 / T reaches "
                         "1 at T = 20, and alpha-bar_T 0); use --schedule cosine")
    if cfg.amp not in AMP_MODES:
        raise ValueError(f"unknown --amp '{cfg.amp}'; use {', '.join(AMP_MODES)}")
    if cfg.batch_size < 0 or cfg.grad_accum < 0 or (cfg.batch_size == cfg.grad_accum == 0):
        raise ValueError("--batch-size and --grad-accum take a positive number or auto, and only "
                         "one of them can be auto")
    if cfg.batch_size and cfg.grad_accum and cfg.batch_size % cfg.grad_accum:
        raise ValueError("--batch-size must be a positive multiple of --grad-accum")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown --optimizer '{cfg.optimizer}'; use {', '.join(OPTIMIZERS)}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"--weight-decay {cfg.weight_decay} must be at least 0")
    if cfg.steps < 1:
        raise ValueError(f"--steps {cfg.steps}: train for at least 1 step")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0) or cfg.warmup < 0:
        raise ValueError("--lr must be a positive number and --warmup at least 0")
    if not (math.isfinite(cfg.grad_clip) and cfg.grad_clip >= 0):
        raise ValueError(f"--grad-clip {cfg.grad_clip}: use a positive norm, or 0 for no clipping")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"--ema-decay {cfg.ema_decay} must be in [0, 1) (Ho et al.: 0.9999)")
    if cfg.seed < 0:
        raise ValueError("--seed must be at least 0")
    if cfg.log_every < 1 or cfg.save_every < 0 or cfg.sample_every < 0:
        raise ValueError("--log-every must be at least 1; --save-every and --sample-every at "
                         "least 0 (0: only at the end / never)")
    if cfg.num_workers < -1:
        raise ValueError("--num-workers must be -1 (automatic) or at least 0")
    if not (cfg.device in ("auto", "cpu", "cuda") or
            (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit())):
        raise ValueError(f"--device {cfg.device}: use auto, cpu, cuda or cuda:N")


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


def Normalize(channels, groups=32):
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, temb_channels, dropout, groups=32):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels, groups)
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

    def __init__(self, channels, groups=32):
        super().__init__()
        self.norm = Normalize(channels, groups)
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
# The U-Net (Ho et al. appendix B): eps_theta(x_t, t), and eps_theta(x_t, t, y) with a class
# embedding (Ho & Salimans 2021) added to the time embedding, as diffusers' num_class_embeds


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ch = cfg.ch
        self.num_res_blocks = cfg.num_res_blocks
        self.num_classes = cfg.num_classes
        self.grad_checkpoint = False  # train() sets it for --grad-checkpoint
        temb_ch = 4 * cfg.ch
        num_levels = len(cfg.ch_mult)
        groups = cfg.norm_groups

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(cfg.ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        if cfg.num_classes:  # the last row is "no label" (y = num_classes): the unconditional model
            self.label_emb = nn.Embedding(cfg.num_classes + 1, temb_ch)
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
                block.append(ResnetBlock(block_in, block_out, temb_ch, cfg.dropout, groups))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in, groups))
                skip_channels.append(block_in)
            down = nn.Module()
            down.block, down.attn = block, attn
            if level != num_levels - 1:
                down.downsample = Downsample(block_in)
                skip_channels.append(block_in)
                res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout, groups)

        # upsampling: num_res_blocks + 1 blocks per level, each eating one skip connection
        self.up = nn.ModuleList()
        for level in reversed(range(num_levels)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                block.append(ResnetBlock(block_in + skip_channels.pop(), block_out, temb_ch,
                                         cfg.dropout, groups))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in, groups))
            up = nn.Module()
            up.block, up.attn = block, attn
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, up)  # self.up[level] is the level at that resolution, as in TF
        assert not skip_channels

        self.norm_out = Normalize(block_in, groups)
        # learned_range: C more channels, the v of the variance interpolation (eq. 15, N&D)
        out_channels = cfg.in_channels * (2 if cfg.var_type == "learned_range" else 1)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def embed(self, t, y, dtype):
        """The time embedding (B, 4 ch), plus the class embedding of y for a conditional model
        (y None: 'no label')."""
        temb = get_timestep_embedding(t, self.ch).to(dtype)  # (B, ch), sin/cos in float32
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))  # (B, 4 ch)
        if self.num_classes:
            if y is None:
                y = torch.full_like(t, self.num_classes)
            return temb + self.label_emb(y).to(temb.dtype)
        if y is not None:
            raise ValueError("this model is unconditional (trained without --cond); it takes no labels")
        return temb

    def run_block(self, block, *args):
        """A residual or attention block. With grad_checkpoint, in training, its activations are
        recomputed in the backward pass instead of kept (Chen et al. 2016); the RNG state is
        replayed, so dropout draws the same masks and the gradients are the same."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def encode(self, x, temb):
        """The downsampling half and the middle: every activation the skip connections need,
        the middle block's output last."""
        hs = [self.conv_in(x)]
        for down in self.down:
            for i, block in enumerate(down.block):
                h = self.run_block(block, hs[-1], temb)
                if len(down.attn) > 0:
                    h = self.run_block(down.attn[i], h)
                hs.append(h)
            if hasattr(down, "downsample"):
                hs.append(down.downsample(hs[-1]))
        h = hs[-1]
        h = self.run_block(self.mid.attn_1, self.run_block(self.mid.block_1, h, temb))
        return hs, self.run_block(self.mid.block_2, h, temb)

    def forward(self, x, t, y=None):
        """x: (B, C, H, W) noisy images x_t in [-1, 1]-ish, t: (B,) int64 in [0, T), y: (B,) int64
        labels of a conditional model. Returns eps (or v or x_0), and with learned variances C
        more channels: the interpolation's v."""
        temb = self.embed(t, y, x.dtype)
        hs, h = self.encode(x, temb)
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = self.run_block(block, torch.cat([h, hs.pop()], dim=1), temb)  # [h, skip]
                if len(up.attn) > 0:
                    h = self.run_block(up.attn[i], h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        assert not hs
        return self.conv_out(F.silu(self.norm_out(h)))


class Classifier(UNet):
    """p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4.1): the U-Net's
    downsampling half and middle, sized by the same preset, then GroupNorm, SiLU, an average
    over the pixels (their "adaptive" pooling) and a linear head to num_classes logits."""

    def __init__(self, cfg):
        super().__init__(dataclasses.replace(cfg, num_classes=0))
        del self.up, self.norm_out, self.conv_out  # the decoder is not needed
        channels = cfg.ch * cfg.ch_mult[-1]
        self.norm_out = Normalize(channels, cfg.norm_groups)
        self.head = nn.Linear(channels, cfg.num_classes)

    def forward(self, x, t):
        """Logits (B, num_classes) of the class of x_t's x_0."""
        _, h = self.encode(x, self.embed(t, None, x.dtype))
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))


def build_model(cfg):
    """The network a Config describes: the U-Net, or the noisy classifier."""
    return Classifier(cfg) if cfg.kind == "classifier" else UNet(cfg)


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

    def __init__(self, betas, var_type="fixed_large", clip_x0=True, timesteps=None, prediction="eps",
                 min_snr=0.0):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.num_timesteps = len(betas)
        self.timesteps = np.arange(len(betas)) if timesteps is None else np.asarray(timesteps)
        self.var_type, self.clip_x0 = var_type, clip_x0
        self.prediction, self.min_snr = prediction, min_snr
        self._tables = {}  # (table, device, dtype) -> the table as a tensor there (see _at)

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
        # log-variances as the bound uses them (Ho et al.'s code, improved-diffusion): beta-tilde_0
        # is 0, so t = 0 takes beta-tilde_1, in both the fixed_small and the fixed_large table
        first = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.fixed_large_log_variance = np.log(np.append(first, betas[1:]))
        self.log_betas = np.log(betas)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        # DPM-Solver++ (Lu et al. 2022b) in the half-log-SNR lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t)).
        # A step goes from index i to i - 1, the last (i = 0) to abar = 1 (lambda = inf, sigma = 0).
        # x_{i-1} = sigma_{i-1} / sigma_i x_i + w_i D, w_i = alpha_{i-1} - sigma_{i-1} alpha_i / sigma_i
        # (= -alpha_{i-1} (e^-h - 1)); D = x_0 (first order, the same step as DDIM with eta 0) or
        # x_0 + (x_0 - x_0') h_i / (2 h_{i+1}) with x_0' the previous step's (2M, midpoint form).
        lam = 0.5 * (np.log(self.alphas_cumprod) - np.log1p(-self.alphas_cumprod))
        h = lam[:-1] - lam[1:]  # h[i - 1] = lambda_{i-1} - lambda_i, the step from index i, i >= 1
        self.dpm_sigma_ratio = np.sqrt((1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod))
        self.dpm_w = np.sqrt(self.alphas_cumprod_prev) - self.dpm_sigma_ratio * np.sqrt(self.alphas_cumprod)
        # h_i / (2 h_{i+1}) for 1 <= i <= N - 2; 0 (first order) at the first step (i = N - 1,
        # no earlier x_0) and the last (i = 0, h = inf), as diffusers' lower_order_final
        self.dpm_half_ratio = np.zeros(len(betas))
        self.dpm_half_ratio[1:-1] = h[:-1] / (2 * h[1:])

    @classmethod
    def from_config(cls, cfg):
        return cls(get_betas(cfg.schedule, cfg.T), cfg.var_type, cfg.clip_x0, None, cfg.prediction,
                   cfg.min_snr)

    def respace(self, timesteps):
        """A shorter chain over the kept t's: beta_i = 1 - abar(t_i) / abar(t_{i-1})."""
        timesteps = np.asarray(sorted(timesteps))
        abar = self.alphas_cumprod[timesteps]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(betas, self.var_type, self.clip_x0, self.timesteps[timesteps],
                                 self.prediction, self.min_snr)

    def _at(self, arr, i, x):
        """arr[i] as a (B, 1, 1, 1) tensor of x's dtype and device; i: (B,) index tensor. The
        float64 table is copied to x's device and dtype once and indexed there, so a step on the
        GPU copies nothing from the host and waits for nothing."""
        return self._table(arr, x.device, x.dtype)[i.to(x.device)].view(-1, 1, 1, 1)

    def _table(self, arr, device, dtype):
        key = (id(arr), device, dtype)
        if key not in self._tables or self._tables[key][0] is not arr:
            self._tables[key] = (arr, torch.from_numpy(arr).to(device, dtype))
        return self._tables[key][1]

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
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (eq. 15)."""
        return self._at(self.sqrt_recip_alphas_cumprod, i, x_t) * x_t - \
            self._at(self.sqrt_recipm1_alphas_cumprod, i, x_t) * eps

    def predict_eps_from_x0(self, x_t, i, x0):
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), the same relation solved for eps."""
        return (self._at(self.sqrt_recip_alphas_cumprod, i, x_t) * x_t - x0) / \
            self._at(self.sqrt_recipm1_alphas_cumprod, i, x_t)

    # -- reverse process ------------------------------------------------------------------------
    # Every method takes (x_t, i, eps, ...): the state, its index in this chain, the network output.

    def network_t(self, i, device):
        """The t the network is fed for chain index i: the original t of a respaced chain."""
        return self._table(self.timesteps, device, torch.long)[i.to(device)]

    def model_output(self, model, x_t, i, classifier_grad=None):
        """(eps_theta(x_t, t), v) with the network fed the original t of index i: its output
        converted to eps if it predicts v or x_0, and v the learned variance's interpolation
        weight in [-1, 1] (None for fixed variances). classifier_grad(x_t, t), if given, is
        s grad log p(y | x_t), and eps becomes eps - sqrt(1 - abar_t) s grad log p(y | x_t)
        (classifier guidance, Dhariwal & Nichol 2021 eq. 14), whatever the sampler."""
        t = self.network_t(i, x_t.device)
        out = model(x_t, t).to(x_t.dtype)
        var_v = None
        if self.var_type == "learned_range":
            out, var_v = out.chunk(2, dim=1)
        eps = eps_from_prediction(self.prediction, x_t, out, self._at(self.alphas_cumprod, i, x_t))
        if classifier_grad is not None:
            eps = eps - self._at(self.sqrt_one_minus_alphas_cumprod, i, x_t) * classifier_grad(x_t, t)
        return eps, var_v

    def model_eps(self, model, x_t, i):
        """eps_theta(x_t, t) alone (see model_output)."""
        return self.model_output(model, x_t, i)[0]

    def predict_x0(self, x_t, i, eps, clip=None):
        """The x_0 the samplers use: from eps, clipped to the data range [-1, 1] if clip_x0."""
        pred_x0 = self.predict_x0_from_eps(x_t, i, eps)
        return pred_x0.clamp(-1, 1) if (self.clip_x0 if clip is None else clip) else pred_x0

    def log_variance(self, i, x, var_v=None):
        """log sigma_t^2 as the bound uses it: log beta_t (fixed_large), log beta-tilde_t
        (fixed_small), both with beta-tilde_1 at t = 0; or learned, Nichol & Dhariwal eq. 15:
        log Sigma = w log beta_t + (1 - w) log beta-tilde_t with w = (v + 1) / 2."""
        if self.var_type == "learned_range":
            w = (var_v + 1) / 2
            return w * self._at(self.log_betas, i, x) + (1 - w) * self._at(self.posterior_log_variance_clipped, i, x)
        table = self.fixed_large_log_variance if self.var_type == "fixed_large" else self.posterior_log_variance_clipped
        return self._at(table, i, x)

    def p_mean_variance(self, x_t, i, eps, var_v=None):
        """Mean and variance of p_theta(x_{t-1} | x_t) given eps_theta (eq. 11 via eq. 15 + 7),
        and v for learned variances."""
        pred_x0 = self.predict_x0(x_t, i, eps)
        mean, posterior_variance = self.q_posterior(pred_x0, x_t, i)
        if self.var_type == "fixed_large":
            variance = self._at(self.betas, i, x_t)  # sigma_t^2 = beta_t (Ho et al.'s CIFAR-10)
        elif self.var_type == "fixed_small":
            variance = posterior_variance  # sigma_t^2 = beta-tilde_t
        else:
            variance = self.log_variance(i, x_t, var_v).exp()
        return mean, variance, pred_x0

    def p_sample(self, x_t, i, eps, noise, var_v=None):
        """x_{t-1} = mu + sigma z, with no noise at t = 0 (Algorithm 2, lines 3-4)."""
        mean, variance, pred_x0 = self.p_mean_variance(x_t, i, eps, var_v)
        nonzero = (i != 0).to(x_t.device, x_t.dtype).view(-1, 1, 1, 1)  # a mask, not a branch: traces cleanly
        return mean + nonzero * variance.sqrt() * noise, pred_x0

    def ddim_step(self, x_t, i, eps, noise, eta=0.0):
        """x_{t-1} from x_t (Song et al. eq. 12); eta=1 is DDPM's posterior noise, eta=0 none."""
        pred_x0 = self.predict_x0(x_t, i, eps)
        if self.clip_x0:
            eps = self.predict_eps_from_x0(x_t, i, pred_x0)  # the eps consistent with the clipped x_0
        abar = self._at(self.alphas_cumprod, i, x_t)
        abar_prev = self._at(self.alphas_cumprod_prev, i, x_t)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        x_prev = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - sigma ** 2).sqrt() * eps
        return x_prev + sigma * noise, pred_x0

    def dpm_solver_step(self, x_t, i, eps, prev_x0):
        """x_{t-1} from x_t by DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2, the midpoint form
        diffusers' DPMSolverMultistepScheduler uses): a multistep solver of the probability-flow
        ODE in the data prediction x_0, second order from the previous step's x_0 (prev_x0),
        first order at the first and the last step. Returns (x_prev, pred_x0); pred_x0 is the
        next step's prev_x0."""
        pred_x0 = self.predict_x0(x_t, i, eps)
        D = pred_x0 + self._at(self.dpm_half_ratio, i, x_t) * (pred_x0 - prev_x0)
        return self._at(self.dpm_sigma_ratio, i, x_t) * x_t + self._at(self.dpm_w, i, x_t) * D, pred_x0

    def training_loss(self, model, x0, i, noise, y=None):
        """L_simple = || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2 (eq. 14),
        or the same squared error on v or x_0 for those targets, optionally min-SNR weighted; with
        learned variances L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal sec. 3.1). y: the
        labels of a conditional model (None: unconditional)."""
        x_t = self.q_sample(x0, i, noise)
        t = self.network_t(i, x_t.device)
        out = (model(x_t, t) if y is None else model(x_t, t, y)).float()
        if self.var_type == "learned_range":
            out, var_v = out.chunk(2, dim=1)
            return self.mse_loss(out, x0, i, noise) + self.hybrid_vlb_term(x0, x_t, i, out, var_v)
        return self.mse_loss(out, x0, i, noise)

    def classifier_loss(self, classifier, x0, i, noise, y):
        """-log p_phi(y | x_t, t) on x_t = q_sample(x_0, t, eps): the noisy classifier's cross
        entropy (Dhariwal & Nichol 2021 sec. 4.1), t drawn over the whole chain as for the denoiser."""
        x_t = self.q_sample(x0, i, noise)
        return F.cross_entropy(classifier(x_t, self.network_t(i, x_t.device)).float(), y)

    def hybrid_vlb_term(self, x0, x_t, i, out, var_v):
        """lambda L_vlb with lambda = 1/1000: one uniformly drawn term of the bound, in bits/dim,
        times T/1000 (L_vlb = T E_t[L_t]), with the gradient stopped on the mean so that it
        trains only the variance (Nichol & Dhariwal sec. 3.1; improved-diffusion's rescaled MSE)."""
        eps = eps_from_prediction(self.prediction, x_t, out.detach(), self._at(self.alphas_cumprod, i, x_t))
        vb = self.vb_terms_bpd(x0, x_t, i, eps, var_v, clip=False)
        return vb.mean() * self.num_timesteps / 1000.0

    def mse_loss(self, out, x0, i, noise):
        """The squared error of the output against its target, averaged over pixels and images."""
        if self.prediction == "eps" and not self.min_snr:
            return F.mse_loss(out, noise.float())
        abar = self._at(self.alphas_cumprod, i, out)
        target = {"eps": noise, "x0": x0,
                  "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[self.prediction].float()
        per_image = ((out - target) ** 2).mean(dim=(1, 2, 3))
        if self.min_snr:  # Hang et al. eq. 10: the x_0-space weight min(SNR, gamma), per target
            snr = (abar / (1 - abar)).view(-1)
            clipped = snr.clamp(max=self.min_snr)
            per_image = per_image * {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[self.prediction]
        return per_image.mean()

    # -- the variational bound (eq. 5), in bits per dimension -----------------------------------

    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) per image, bits/dim: no parameters, near 0."""
        i = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long)
        mean = self._at(self.sqrt_alphas_cumprod, i, x0) * x0
        log_var = self._at(self.log_one_minus_alphas_cumprod, i, x0).expand_as(x0)
        kl = normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0))
        return kl.mean(dim=(1, 2, 3)) / math.log(2.0)

    def vb_terms_bpd(self, x0, x_t, i, eps, var_v=None, clip=None):
        """Per image, bits/dim: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) where
        i > 0, and L_0 = -log p_theta(x_0 | x_1), the discretized decoder, where i = 0 (eq. 5);
        eps, var_v: the network's output at (x_t, i). The KL is between the true posterior and
        p_theta with the log-variances of `log_variance` (Ho et al.'s code, improved-diffusion)."""
        true_mean, _ = self.q_posterior(x0, x_t, i)
        true_log_var = self._at(self.posterior_log_variance_clipped, i, x_t).expand_as(x_t)
        mean, _ = self.q_posterior(self.predict_x0(x_t, i, eps, clip), x_t, i)  # p_theta's mean, eq. 11
        log_var = self.log_variance(i, x_t, var_v).expand_as(x_t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3))
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3))
        return torch.where(i.to(x_t.device) == 0, nll, kl) / math.log(2.0)

    @torch.no_grad()
    def bits_per_dim(self, model, x0, generator=None, callback=None):
        """The bound L_VLB = L_T + sum_{t>1} L_{t-1} + L_0 of each image in bits/dim, every term
        evaluated at one x_t ~ q(x_t | x_0) (Ho et al.'s calc_bpd_loop). Returns (total (B,),
        prior (B,), terms (B, T) with terms[:, 0] = L_0). callback(k) after each of the T terms."""
        B, T = x0.shape[0], self.num_timesteps
        terms = torch.zeros(B, T, dtype=torch.float64)
        for k, i_int in enumerate(range(T - 1, -1, -1)):
            i = torch.full((B,), i_int, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, i, noise)
            eps, var_v = self.model_output(model, x_t, i)
            terms[:, i_int] = self.vb_terms_bpd(x0, x_t, i, eps, var_v).double().cpu()
            if callback is not None:
                callback(k)
        prior = self.prior_bpd(x0).double().cpu()
        return terms.sum(dim=1) + prior, prior, terms


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def standard_normal_cdf(x):
    """Phi(x) by the tanh approximation that Ho et al.'s and improved-diffusion's decoders use."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x0, mean, log_scale):
    """log p(x_0) per element of 8-bit data scaled to [-1, 1] under N(mean, e^(2 log_scale)): the
    mass on the pixel's bin [x - 1/255, x + 1/255], the first and last bins reaching to -inf and
    +inf (Ho et al. eq. 13). Probabilities are floored at 1e-12, as in both reference codes."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv_std * (x0 - mean + 1.0 / 255))
    cdf_min = standard_normal_cdf(inv_std * (x0 - mean - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x0 < -0.999, log_cdf_plus, torch.where(x0 > 0.999, log_one_minus_cdf_min, log_bin))


def eps_from_prediction(prediction, x_t, out, abar):
    """The eps a network output implies, with abar = alpha-bar_t: eps itself; v = sqrt(abar) eps -
    sqrt(1 - abar) x_0 (Salimans & Ho 2022), so eps = sqrt(1 - abar) x_t + sqrt(abar) v; or x_0,
    so eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar) (eq. 4). export.py puts this in the graph."""
    if prediction == "eps":
        return out
    if prediction == "v":
        return (1 - abar).sqrt() * x_t + abar.sqrt() * out
    return (x_t - abar.sqrt() * out) / (1 - abar).sqrt()


def ddim_timesteps(T, steps, spacing="leading"):
    """The `steps` t's a shorter chain keeps (Lin et al. 2023, table 2): 'leading' 0, T//steps, ...
    (DDIM's and DDIMScheduler's default), 'trailing' ..., T-1-T/steps, T-1 (starts at the last t,
    where x_T is pure noise), 'linspace' rounded linspace(0, T-1)."""
    if not 1 <= steps <= T:
        raise ValueError(f"--steps must be between 1 and T={T}, got {steps}")
    if spacing == "leading":
        return np.arange(steps) * (T // steps)
    if spacing == "trailing":
        return np.sort(np.round(np.arange(T, 0, -T / steps)).astype(int) - 1)
    if spacing == "linspace":
        return np.unique(np.linspace(0, T - 1, steps).round().astype(int))
    raise ValueError(f"unknown --spacing '{spacing}'; use {', '.join(SPACINGS)}")


def default_spacing(sampler):
    """The t's a shorter chain keeps when --spacing is not given: trailing for DPM-Solver++, whose
    multistep correction extrapolates badly over leading's last jump to t = 0 (the solver-error
    table in the README), leading (DDIM's own) for the others."""
    return "trailing" if sampler == "dpm++" else "leading"


def check_sampler(sampler, steps, eta, T, spacing="leading"):
    """ValueError with a sentence for sampler settings that would give no or wrong images."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; use {', '.join(SAMPLERS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown --spacing '{spacing}'; use {', '.join(SPACINGS)}")
    if steps is not None and not (isinstance(steps, (int, np.integer)) and 1 <= steps <= T):
        raise ValueError(f"--steps must be between 1 and T={T}, got {steps}")
    if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):  # also refuses nan
        raise ValueError(f"--eta must be between 0 (deterministic DDIM) and 1, got {eta}")
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"--eta sets DDIM's noise; --sampler {sampler} has none to set. Use "
                         "--sampler ddim, or leave --eta out")


def classifier_free_guidance(model, y, s):
    """The network of a conditional model as a function of (x_t, t) alone, with classifier-free
    guidance (Ho & Salimans 2021, eq. 6): out = out(x_t, t) + s (out(x_t, t, y) - out(x_t, t)),
    the unconditional branch fed the 'no label' class. s = 0 is the unconditional model, 1 the
    plain conditional one (one branch each), s > 1 follows y more strictly; otherwise both
    branches go through the network in one batched call. The combination is linear, so guiding
    v or x_0 equals guiding the eps they imply; a learned variance comes from the conditional
    branch. y None: unconditional."""
    def guided(x_t, t):
        null = torch.full_like(t, model.num_classes)
        if y is None or s == 0:
            return model(x_t, t, null)
        labels = y.to(t.device)
        if s == 1:
            return model(x_t, t, labels)
        out_c, out_u = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        C = x_t.shape[1]
        eps = out_u[:, :C] + s * (out_c[:, :C] - out_u[:, :C])
        return torch.cat([eps, out_c[:, C:]], dim=1)
    return guided


def classifier_gradient(classifier, y, s):
    """(x_t, t) -> s grad_{x_t} log p_phi(y | x_t, t), the classifier-guidance term (Dhariwal &
    Nichol 2021, Algorithm 1 and eq. 14); model_output subtracts it from eps scaled by
    sqrt(1 - abar_t)."""
    def grad(x_t, t):
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            log_p = F.log_softmax(classifier(x, t).double(), dim=1)
            chosen = log_p[torch.arange(len(x)), y.to(x.device)].sum()  # images are independent
            return s * torch.autograd.grad(chosen, x)[0]
    return grad


@torch.no_grad()
def sample_loop(model, diffusion, x_T, sampler="ddpm", steps=None, eta=0.0, noise_fn=None,
                generator=None, callback=None, progress=False, spacing=None, y=None,
                guidance=1.0, classifier=None, classifier_scale=1.0):
    """Run the reverse process from x_T (Algorithm 2, DDIM, or DPM-Solver++(2M)) and return x_0.

    steps:     number of steps; fewer than T respaces the schedule (network sees original t),
               keeping the t's `spacing` names (see ddim_timesteps; None: default_spacing).
    noise_fn:  noise_fn(k, shape) -> tensor, the fresh noise for the k-th step (k = 0 first);
               default randn from `generator`. Two implementations fed the same noise_fn agree.
    callback:  callback(k, t, x_t, pred_x0) at every step: the step's input x_t (network time t)
               and the x_0 predicted from it, e.g. for pictures of the process.
    y:         (B,) class labels: a conditional model samples them with classifier-free guidance
               of scale `guidance` (None: unconditional), and a classifier p(y | x_t, t) guides
               any model towards them with scale `classifier_scale`.
    """
    T = diffusion.num_timesteps
    spacing = spacing or default_spacing(sampler)
    check_sampler(sampler, steps, eta, T, spacing)
    if getattr(model, "num_classes", 0):
        model = classifier_free_guidance(model, y, guidance)
    elif y is not None and classifier is None:
        raise ValueError("this model is unconditional (trained without --cond): labels need a "
                         "conditional model or a classifier (--classifier)")
    classifier_grad = None
    if classifier is not None:
        if y is None:
            raise ValueError("classifier guidance needs the classes to guide towards (--class)")
        classifier_grad = classifier_gradient(classifier, y, classifier_scale)
    steps = steps or T
    if sampler == "ddpm" and steps == T:
        chain = diffusion
    else:
        chain = diffusion.respace(ddim_timesteps(T, steps, spacing))
    x = x_T
    prev_x0 = torch.zeros_like(x)  # dpm++: the previous step's x_0 (the first step does not use it)
    indices = range(chain.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc=f"{sampler} sampling", unit="step", leave=False)
    for k, i_int in enumerate(indices):
        i = torch.full((x.shape[0],), i_int, dtype=torch.long, device=x.device)  # a fill, no copy
        if noise_fn is not None:
            noise = noise_fn(k, x.shape).to(x.device, x.dtype)
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        eps, var_v = chain.model_output(model, x, i, classifier_grad)
        if sampler == "ddpm":
            x_prev, pred_x0 = chain.p_sample(x, i, eps, noise, var_v)
        elif sampler == "ddim":
            x_prev, pred_x0 = chain.ddim_step(x, i, eps, noise, eta)
        else:  # deterministic: the step's noise is drawn all the same, so every sampler sees one stream
            x_prev, pred_x0 = chain.dpm_solver_step(x, i, eps, prev_x0)
            prev_x0 = pred_x0
        if callback is not None:
            callback(k, int(chain.timesteps[i_int]), x, pred_x0)
        x = x_prev
    return x


# ----------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_state(cfg, model, ema=None, step=0, optimizer=None, scaler=None):
    """The one checkpoint layout: config, weights and EMA weights, and with an optimizer the
    state that --resume needs. Models are the raw (not compiled, not DDP) modules."""
    state = {"format_version": CHECKPOINT_FORMAT, "config": asdict(cfg), "step": step,
             "model": model.state_dict(), "ema": (ema or model).state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state["scaler"] = scaler.state_dict()
    return state


def write_atomically(path, write):
    """write(temp path), then rename it over `path`: a crash leaves the old file or the new one,
    never half of one. Temp files of writers that died mid-write (kill -9) are removed first."""
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        pid = f[len(name) + 4:]
        if f.startswith(name + ".tmp") and pid.isdigit() and int(pid) != os.getpid() \
                and not process_alive(int(pid)):
            os.remove(os.path.join(folder, f))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def save_checkpoint(path, state):
    """Atomic; refuses non-finite weights, so a diverged model never replaces a checkpoint."""
    for part in ("model", "ema"):
        if part in state and not all(torch.isfinite(v).all() for v in state[part].values()
                                     if v.is_floating_point()):
            raise ValueError(f"the {part} weights are not finite (the training diverged); "
                             f"'{path}' was not written")
    write_atomically(path, lambda tmp: torch.save(state, tmp))


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


def config_from_dict(d, path="the checkpoint"):
    """The Config a checkpoint describes; ValueError if the values cannot build a model."""
    known = {f.name for f in dataclasses.fields(Config)}
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
    try:
        cfg = Config(**d)
        check_config(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has an unusable config: {e}") from None
    return cfg


def load_weights(module, weights, path, what="weights"):
    """module.load_state_dict, with a sentence instead of a traceback when they do not fit."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"the {what} in '{path}' do not fit the model its config describes "
                         f"({detail})") from None


def load_checkpoint(path, ema=True, kind="denoiser"):
    """(model in eval mode, config) rebuilt from the checkpoint alone. EMA weights by default.
    kind: the network expected, the denoiser or the noisy classifier."""
    state = read_checkpoint(path)
    cfg = config_from_dict(state["config"], f"'{path}'")
    if cfg.kind != kind:
        what = {"classifier": "a noisy classifier (train-classifier)", "denoiser": "a denoiser"}
        raise ValueError(f"'{path}' holds {what[cfg.kind]}, not {what[kind]}"
                         + ("; it guides sampling: ddpm.py sample --classifier" if cfg.kind == "classifier" else ""))
    model = build_model(cfg)
    use_ema = ema and isinstance(state.get("ema"), dict)
    load_weights(model, state["ema"] if use_ema else state["model"], path,
                 "EMA weights" if use_ema else "weights")
    return model.eval(), cfg


CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".ckpt")


def check_output_path(path, extensions, flag, overwrite=True, inputs=()):
    """Before any work, that `path` can be written and nothing is lost by writing it: a
    ValueError with a sentence if its extension is not one of `extensions`, it is a folder or one
    of the `inputs`, it exists and overwrite is False, or its folder cannot be written."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} '{path}' is a folder; give a file name")
    if os.path.splitext(path)[1].lower() not in extensions:
        raise ValueError(f"{flag} '{path}': the name must end in {', '.join(extensions)}")
    if os.path.exists(path):
        if any(os.path.exists(p) and os.path.samefile(path, p) for p in inputs):
            raise ValueError(f"{flag} '{path}' is the input file; writing it would destroy the input")
        if not overwrite:
            raise ValueError(f"{flag} '{path}' exists; pass --overwrite to replace it")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), flag)


def check_output_folder(folder, flag):
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag} '{folder}' is a file, not a folder")
    check_writable_folder(folder, flag)


def check_writable_folder(folder, flag):
    """Create the folder and a file in it, as the real write will; a sentence if that fails."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag}: cannot write in '{folder}' ({e.strerror or e})") from None


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
    classes = SHAPE_CLASSES

    def __init__(self, n=10_000, size=32, seed=0, channels=3, split="train"):
        rng = np.random.default_rng(seed if split == "train" else [seed, 1])  # test: another draw
        self.labels = np.arange(n) % len(SHAPE_CLASSES)
        images = np.stack([draw_shape(c, rng, size) for c in self.labels])  # (N, H, W, 3)
        if channels == 1:  # ITU-R 601 luma, as Pillow's convert("L")
            images = np.round(images @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.uint8)
        self.images = to_model_range(images)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return self.images[idx], int(self.labels[idx])


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def to_8bit(img, channels):
    """A Pillow image as 8-bit RGB (channels 3) or L (channels 1). 16-bit images (mode I;16 or I)
    are scaled by 255/65535; a plain convert() would clip them to white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or arr.max() > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError("floating-point images (mode F) have no defined range")
    return img.convert("RGB" if channels == 3 else "L")


def center_crop_resize(img, size, channels=3):
    """Shorter side to `size`, then the central size x size square; (H, W, C) uint8 array."""
    img = to_8bit(img, channels)
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size))).reshape(size, size, channels)


class ImageFolderDataset(torch.utils.data.Dataset):
    """A folder of images; class sub-folders give labels, a flat folder gives label 0."""

    def __init__(self, root, size, channels=3):
        if not os.path.isdir(root):
            raise ValueError(f"--data '{root}' is neither a built-in dataset (shapes, cifar10, "
                             "stl10) nor a folder")
        self.size, self.channels = size, channels
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
        """The image at idx; one whose data turns out corrupt when decoded (the header check at
        start-up cannot see that) is named on stderr and replaced by the next readable one."""
        for k in range(len(self.items)):
            path, label = self.items[(idx + k) % len(self.items)]
            try:
                with Image.open(path) as img:
                    arr = center_crop_resize(img, self.size, self.channels)
                return to_model_range(arr[None])[0], label
            except (OSError, ValueError, SyntaxError) as e:
                print(f"data: skipping unreadable image '{path}' ({type(e).__name__}: {e})",
                      file=sys.stderr)
        raise ValueError(f"none of the {len(self.items)} images can be decoded")


def _opens(path):
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:
        return False


class TorchvisionImages(torch.utils.data.Dataset):
    """CIFAR-10 / STL-10 through torchvision, mapped to [-1, 1] at this boundary."""

    def __init__(self, base, size, channels=3):
        self.base, self.size, self.channels = base, size, channels
        self.classes = base.classes

    def __len__(self):
        return len(self.base)

    def __getitem__(self, idx):
        img, label = self.base[idx]
        return to_model_range(center_crop_resize(img, self.size, self.channels)[None])[0], int(label)


DOWNLOADS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz"),
    "stl10": ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "stl10_binary.tar.gz"),
}


def load_dataset(cfg, split="train", labelled=False):
    """The training images (split 'train'), or the held-out ones ('test': CIFAR-10's 10,000 test
    images, STL-10's 8,000, another draw of shapes). A folder is its own split. labelled: only
    images with a label (STL-10's 5,000 labelled training images instead of train+unlabeled)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split '{split}'; use train or test")
    if cfg.data == "shapes":
        return ShapesDataset(size=cfg.image_size, seed=cfg.seed, channels=cfg.in_channels, split=split)
    if cfg.data in DOWNLOADS:
        import torchvision
        url, filename = DOWNLOADS[cfg.data]
        try:
            with contextlib.redirect_stdout(sys.stderr):
                if cfg.data == "cifar10":
                    base = torchvision.datasets.CIFAR10(cfg.data_dir, train=split == "train",
                                                        download=True)
                else:
                    base = torchvision.datasets.STL10(
                        cfg.data_dir, split="test" if split == "test" else
                        "train" if labelled else "train+unlabeled",
                        download=True)
        except Exception as e:
            raise ValueError(
                f"{cfg.data} is not in '{cfg.data_dir}' and could not be downloaded "
                f"({type(e).__name__}: {str(e)[:120]}). Download {url} and put the file at "
                f"{os.path.join(cfg.data_dir, filename)}, then run again.") from None
        return TorchvisionImages(base, cfg.image_size, cfg.in_channels)
    return ImageFolderDataset(cfg.data, cfg.image_size, cfg.in_channels)


def class_names(dataset, data):
    """The names of the dataset's classes, in label order; ValueError if it has no labels."""
    names = tuple(str(c) for c in getattr(dataset, "classes", ()))
    if len(names) < 2:
        raise ValueError(f"--data {data} has no class labels (a folder gives them by its class "
                         "sub-folders, at least 2); --cond and train-classifier need them")
    return names


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches determined by (seed, step) alone, so a resumed run sees the same batches. Of the
    batch, process `rank` of `world` gets the rank-th of world equal parts."""

    def __init__(self, n, batch_size, seed, start_step, steps, rank=0, world=1):
        assert n >= batch_size and batch_size % world == 0
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.steps = start_step, steps
        self.part = slice(rank * batch_size // world, (rank + 1) * batch_size // world)

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
            yield perm[k * self.batch_size:(k + 1) * self.batch_size][self.part].tolist()


# ----------------------------------------------------------------------------------------------
# Pictures

PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def save_grid(images_uint8, path, nrow=None, pad=2):
    """(N, H, W, C) uint8 -> one picture, nrow images per row (default: a square)."""
    grid = grid_of(images_uint8, nrow, pad)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(path)


def grid_of(images_uint8, nrow=None, pad=2):
    """(N, H, W, C) uint8 -> (rows, columns, C) uint8, the images on a white background."""
    n, h, w, c = images_uint8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images_uint8[k]
    return grid


PROGRESS_EXTENSIONS = (".png", ".gif", ".webp")


def progress_steps(n_steps, animation):
    """Which steps a process picture shows: 10 evenly spaced for a still, up to 100 for an
    animation; the first step is always in, the sample itself is added after them."""
    return sorted(set(np.linspace(0, n_steps - 1, min(n_steps, 100 if animation else 10)).round().astype(int)))


def save_progress(frames, final, path):
    """The reverse process as a picture. frames: [(t, x_t, pred_x0)], both (N, H, W, C) uint8;
    final: the samples. A .png is a still: one row per image (up to 8), for each frame a pair of
    columns x_t | predicted x_0, then the sample. A .gif or .webp is an animation: per frame, the
    x_t of up to 16 images on the left and their predicted x_0 on the right, labelled with t."""
    n, h, w, c = final.shape
    zoom = max(1, 64 // h)  # small images enlarged (nearest), so a 32x32 sample is visible
    pad, label = 2, 12

    def cell(img):
        img = img.repeat(zoom, axis=0).repeat(zoom, axis=1)
        return img if c == 3 else np.repeat(img, 3, axis=2)

    H, W = h * zoom, w * zoom
    columns = [(f"t={t}", x, p) for t, x, p in frames] + [("sample", final, final)]
    if os.path.splitext(path)[1].lower() == ".png":
        rows = min(n, 8)
        sheet = np.full((label + rows * (H + pad), len(columns) * (2 * W + 3 * pad), 3), 255, np.uint8)
        for j, (_, x, p) in enumerate(columns):
            left = j * (2 * W + 3 * pad)
            for r in range(rows):
                top = label + r * (H + pad)
                sheet[top:top + H, left:left + W] = cell(x[r])
                sheet[top:top + H, left + W + pad:left + 2 * W + pad] = cell(p[r])
        image = Image.fromarray(sheet)
        draw = ImageDraw.Draw(image)
        for j, (text, _, _) in enumerate(columns):
            draw.text((j * (2 * W + 3 * pad), 0), text, fill=(0, 0, 0))
        image.save(path)
        return
    shown = min(n, 16)
    side = math.ceil(math.sqrt(shown))

    def tile(images):
        grid = np.full((side * (H + pad), side * (W + pad), 3), 255, np.uint8)
        for k in range(shown):
            r, q = divmod(k, side)
            grid[r * (H + pad):r * (H + pad) + H, q * (W + pad):q * (W + pad) + W] = cell(images[k])
        return grid

    pictures = []
    for text, x, p in columns:
        left, right = tile(x), tile(p)
        frame = np.full((label + left.shape[0], 2 * left.shape[1] + 4 * pad, 3), 255, np.uint8)
        frame[label:, :left.shape[1]] = left
        frame[label:, left.shape[1] + 4 * pad:] = right
        image = Image.fromarray(frame)
        ImageDraw.Draw(image).text((0, 0), f"{text}: x_t | predicted x_0", fill=(0, 0, 0))
        pictures.append(image)
    durations = [60] * (len(pictures) - 1) + [1500]  # hold the samples
    lossless = {"lossless": True} if path.lower().endswith(".webp") else {}
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0, **lossless)


def save_loss_curve(rows, png_path, width=640, height=360):
    """Loss vs step from the log rows, drawn with Pillow (log-scale loss)."""
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
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but no CUDA GPU is usable here")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast
    is emulated and slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def amp_dtype(amp, device):
    """The autocast dtype training uses, or None for fp32."""
    if device.type == "cuda":
        return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if amp == "fp16":
        raise ValueError("--amp fp16 needs CUDA (its loss scaler is CUDA's); on a CPU use --amp "
                         "bf16 or none")
    if amp == "bf16" and not cpu_has_bf16():
        print("warning: --amp bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where it "
              "is slower than fp32; training in fp32", file=sys.stderr)
        return None
    return torch.bfloat16 if amp == "bf16" else None


def sampling_dtype(amp, device):
    """The autocast dtype of the network in sampling, or None for fp32 (the default, 'none'):
    'auto' is bf16 where it is native (CUDA, or a CPU with AVX512-BF16 or AMX), else fp32. The
    sampler's own arithmetic stays float32 (model_output casts the network's output back)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; on a CPU use --amp bf16, auto or none")
    return amp_dtype(amp, device)


def learning_rate(cfg, step):
    """Linear warm-up (Ho et al.), then constant, or a cosine decay to 0 with --cosine-lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.cosine_lr:
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr


def micro_batch_seed(seed, step, micro):
    """The seed of micro-batch `micro` of optimizer step `step`. t, eps, flips and dropout are
    drawn after seeding with it, so they depend on (seed, step, micro) alone: a resumed run draws
    exactly what an uninterrupted one would, with no RNG state to save."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0])


def ema_update(ema, model, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta, for all parameters in one fused call."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def run_dir(cfg):
    name = os.path.basename(os.path.normpath(cfg.data)) + ("-classifier" if cfg.kind == "classifier" else "")
    return cfg.out or os.path.join("runs", name)


def check_run_files(cfg, resume, overwrite):
    """Before any work: the checkpoint and run directory can be written, and nothing a previous
    run left there is clobbered unless --resume continues it or --overwrite replaces it."""
    log = os.path.join(run_dir(cfg), "metrics.jsonl")
    exists = os.path.exists(cfg.ckpt) and not os.path.isdir(cfg.ckpt)
    continuing = resume is not None and exists and os.path.samefile(resume, cfg.ckpt)
    if exists and not (overwrite or continuing):
        raise ValueError(f"--ckpt '{cfg.ckpt}' exists ({checkpoint_step(cfg.ckpt)}); continue that "
                         "run with --resume, or start over with --overwrite")
    check_output_path(cfg.ckpt, CHECKPOINT_EXTENSIONS, "--ckpt")
    if os.path.isfile(log) and os.path.getsize(log) and resume is None and not overwrite:
        raise ValueError(f"'{log}' holds the log of an earlier run; continue that run with --resume, "
                         "start over with --overwrite, or pick another --out")
    check_writable_folder(run_dir(cfg), "--out")


def checkpoint_step(path):
    """'step N' of an existing checkpoint, for messages; cheap (memory-mapped)."""
    try:
        return f"step {torch.load(path, mmap=True, weights_only=True)['step']}"
    except Exception:
        return "not a ddpm.py training checkpoint"


def check_free_space(path, model):
    """A checkpoint holds the weights 4 times (model, EMA, Adam's two moments): refuse to start
    where it cannot be written, instead of failing at the first save."""
    need = 4 * 4 * count_params(model) + (64 << 20)  # float32 tensors, plus room for logs and grids
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if free < need:
        raise ValueError(f"only {free >> 20} MB free beside '{path}'; a checkpoint of this model "
                         f"needs about {need >> 20} MB. Free some space or choose another --ckpt")


def restore(resume, cfg, raw_model, ema, optimizer, scaler):
    """Load the training state from `resume` into the given objects; returns its step. Settings
    that define the model must match; changed training settings are reported, this run's win."""
    state = read_checkpoint(resume)
    saved = config_from_dict(state["config"], f"'{resume}'")
    for name in MODEL_FIELDS + ("T", "schedule", "kind"):
        if getattr(saved, name) != getattr(cfg, name):
            raise ValueError(f"--resume {resume}: the checkpoint has {name}="
                             f"{getattr(saved, name)}, this run {getattr(cfg, name)}; a resumed "
                             "run cannot change the model or its schedule")
    if state.get("format_version") != CHECKPOINT_FORMAT or not isinstance(state.get("optimizer"), dict):
        raise ValueError(f"'{resume}' holds weights only, not a training state to resume")
    load_weights(raw_model, state["model"], resume)
    load_weights(ema, state["ema"], resume, "EMA weights")
    load_weights(optimizer, state["optimizer"], resume, "optimizer state")
    for group in optimizer.param_groups:  # the saved groups carry the old run's settings: this run's win
        group.update(optimizer.defaults)
    load_weights(scaler, state["scaler"], resume, "gradient scaler state")
    step = int(state["step"])
    for f in dataclasses.fields(Config):
        old, new = getattr(saved, f.name), getattr(cfg, f.name)
        if old != new and f.name not in ("ckpt", "out", "steps"):
            print(f"resume: {f.name} was {old} in the checkpoint and is {new} now; {new} is used "
                  f"from step {step} on")
    print(f"resuming from {resume} at step {step} of {cfg.steps}")
    return step


class RunLog:
    """metrics.jsonl, one JSON line per logged step, and loss.png, redrawn at every line; with
    tensorboard, the same numbers and the sample grids as TensorBoard events. A resumed run first
    drops the lines written after the step it resumes from (and tells TensorBoard to, by a purge
    step; a new run purges from step 0, so an earlier run's events in the folder are hidden)."""

    def __init__(self, out_dir, resume_step=None, tensorboard=True):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.png = os.path.join(out_dir, "loss.png")
        self.rows = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path) as f:
                for line in f:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        row = json.loads(line)
                        if row["step"] <= resume_step:
                            self.rows.append(row)
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        write_atomically(self.path, lambda tmp: open(tmp, "w").write(text))
        self.file = open(self.path, "a")
        self.warned = False
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: the tensorboard package is not installed, so the log is metrics.jsonl "
                      "and loss.png only (pip install tensorboard, or pass --no-tensorboard)",
                      file=sys.stderr)
            else:
                self.tb = SummaryWriter(out_dir, flush_secs=30,
                                        purge_step=0 if resume_step is None else resume_step + 1)

    def write(self, row):
        self.rows.append(row)
        try:
            self.file.write(json.dumps(row) + "\n")
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
            save_loss_curve(self.rows, self.png)
        except OSError as e:
            self.warn(e)

    def warn(self, e):
        if not self.warned:  # the log is not the work: keep training, say it once
            print(f"warning: cannot write the log in '{os.path.dirname(self.path)}' "
                  f"({e.strerror or e}); training goes on", file=sys.stderr)
            self.warned = True

    def close(self):
        with contextlib.suppress(OSError):
            self.file.close()
            if self.tb is not None:
                self.tb.close()


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
        print(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
              "(send it again to stop at once, without saving)", file=sys.stderr)

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


def make_optimizer(cfg, params):
    """Adam (Ho et al.) or AdamW. --weight-decay is an L2 term in Adam's gradient; AdamW decays
    the weights directly, apart from the adaptive step (Loshchilov & Hutter 2019)."""
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# Several processes (torchrun). Every process runs this same program on its share of each batch:
# with N processes and K micro-batches each, process r takes micro-batches r K .. r K + K - 1 of
# the N K, and draws t, eps, flips and dropout for micro-batch m from micro_batch_seed(seed, step,
# m), as a single process with N K micro-batches does. DDP averages the gradients over the
# processes, so the optimizer step is the same: the world size does not change the math.


def init_distributed(cfg):
    """Under torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK): join the job's process group,
    NCCL with each process on its LOCAL_RANK's GPU, or gloo on CPUs. Returns (rank, world size,
    device); (0, 1, the --device) without torchrun. Processes other than rank 0 print only
    warnings and errors."""
    device = pick_device(cfg.device)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if cfg.device.startswith("cuda:"):
            raise ValueError(f"--device {cfg.device}: under torchrun each process uses the GPU "
                             "of its LOCAL_RANK; pass --device cuda (or auto)")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local}, but this machine has {torch.cuda.device_count()} "
                             "GPU(s): start at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank(), dist.get_world_size(), device


def lost_a_peer(e):
    """Whether a collective failed because another process of the job stopped."""
    return isinstance(e, dist.DistError) or any(
        text in str(e) for text in ("Connection closed by peer", "Connection reset by peer"))


def agree(loss_sum, signum, world):
    """(the mean loss over all processes, whether any process was asked to stop). One all-reduce
    per step, so all stop after the same step: torchrun passes Ctrl-C and SIGTERM on to each
    process, and they do not arrive at the same moment."""
    both = torch.stack([loss_sum.float(), torch.ones((), device=loss_sum.device) * (signum is not None)])
    if world > 1:
        dist.all_reduce(both)
    total, stops = both.tolist()
    return total / world, stops > 0


def largest_batch(fits, limit):
    """The largest b <= limit with fits(b), doubling from 1 until a batch fails, then bisecting
    (fits(b) is False for a batch that runs out of memory); 0 if not even one image fits."""
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fits_on_gpu(loss_of, model, shape, reserve_bytes):
    """Whether one micro-batch of `shape` runs forward and backward in GPU memory, with
    reserve_bytes held back for what training adds later (Adam's moments, DDP's buckets)."""
    device = next(model.parameters()).device
    fits, held, x0 = True, None, None
    try:
        held = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)
        x0 = torch.zeros(shape, device=device).contiguous(memory_format=torch.channels_last)
        loss_of(model, x0, torch.zeros(shape[0], dtype=torch.long), 0, 0).backward()
        torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        fits = False
    held = x0 = None
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return fits


def split_batch(cfg, micro_max, world):
    """(batch_size, grad_accum) for --batch-size auto (micro-batches of micro_max, the
    --grad-accum given) or --grad-accum auto (--batch-size kept, the fewest micro-batches of
    at most micro_max)."""
    if micro_max < 1:
        raise ValueError("not even one image fits in GPU memory; try --grad-checkpoint, --amp bf16 "
                         "or a smaller model")
    if cfg.batch_size == 0:
        return micro_max * world * cfg.grad_accum, cfg.grad_accum
    per_process = cfg.batch_size // world  # k = per_process (micro-batches of 1) always fits
    return cfg.batch_size, min(k for k in range(1, per_process + 1)
                               if per_process % k == 0 and per_process // k <= micro_max)


class Diverged(Exception):
    pass


class Stopped(Exception):
    """Training stopped early (a signal, or a diverged model); `exit_code` for main()."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def train(cfg, resume=None, overwrite=False):
    """Algorithm 1 for cfg.steps optimizer steps. resume: a checkpoint to continue exactly.
    Files a previous run left at cfg.ckpt or in the run directory are refused unless resume
    continues them or overwrite is set. Under torchrun, one of the job's processes (rank 0 writes
    the files)."""
    rank, world, device = init_distributed(cfg)
    lead = rank == 0  # the process that writes the checkpoint, the log and the pictures
    if not (cfg.batch_size and cfg.grad_accum) and device.type != "cuda":
        raise ValueError("--batch-size auto and --grad-accum auto measure GPU memory, so they "
                         "need CUDA; on a CPU give numbers")
    out_dir = run_dir(cfg)
    if lead:
        check_run_files(cfg, resume, overwrite)
    if cfg.steps < cfg.warmup and lead:
        print(f"warning: --steps {cfg.steps} ends inside the {cfg.warmup}-step warm-up, so the "
              f"learning rate never reaches --lr {cfg.lr} (it ends at "
              f"{learning_rate(cfg, cfg.steps - 1):.2g}); lower --warmup", file=sys.stderr)

    # AMP (nanoGPT style): bf16 autocast by default on CUDA, fp16 with a scaler; a CPU trains in
    # fp32 unless --amp bf16 is asked for and the CPU has bf16 units (1.5x on AMX)
    dtype = amp_dtype(cfg.amp, device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    labelled = cfg.cond or cfg.kind == "classifier"
    dataset = load_dataset(cfg, labelled=labelled)
    names = class_names(dataset, cfg.data) if labelled else ()
    cfg = dataclasses.replace(cfg, num_classes=len(names), class_names=names)

    torch.manual_seed(cfg.seed)  # the initial weights, the same in every process
    raw_model = build_model(cfg).to(device)
    raw_model.grad_checkpoint = cfg.grad_checkpoint
    if device.type == "cuda":
        raw_model = raw_model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(raw_model).eval().requires_grad_(False)
    optimizer = make_optimizer(cfg, raw_model.parameters())
    diffusion = GaussianDiffusion.from_config(cfg)
    objective = diffusion.classifier_loss if cfg.kind == "classifier" else diffusion.training_loss
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if lead:
        check_free_space(cfg.ckpt, raw_model)

    def loss_of(net, x0, y, at_step, m):
        """The loss on micro-batch m of a step, with flips, t, eps, dropped labels and dropout
        from its seed."""
        torch.manual_seed(micro_batch_seed(cfg.seed, at_step, m))
        if cfg.flip:
            flip = torch.rand(x0.shape[0], device=device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        i = torch.randint(0, cfg.T, (x0.shape[0],), device=device)  # indexes tables kept on the device
        noise = torch.randn_like(x0)
        y = labels_seen(y)
        with autocast:
            return objective(net, x0, i, noise, y)

    def labels_seen(y):
        """What the network is told of the labels: none (unconditional), all (the classifier), or,
        for --cond, each replaced by 'no label' with probability p_uncond (Ho & Salimans)."""
        if cfg.kind == "classifier":
            return y.to(device)
        if not cfg.cond:
            return None
        dropped = torch.rand(y.shape[0]) < cfg.p_uncond
        return torch.where(dropped, cfg.num_classes, y).to(device)

    if not (cfg.batch_size and cfg.grad_accum):  # auto: find by trial what fits in GPU memory
        shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        reserve = 3 * 4 * count_params(raw_model)  # Adam's two moments, DDP's gradient buckets
        micro_max = largest_batch(lambda b: fits_on_gpu(loss_of, raw_model, (b, *shape), reserve),
                                  limit=len(dataset) // world)
        if world > 1:  # the smallest GPU decides
            micro_max = torch.tensor(micro_max, device=device)
            dist.all_reduce(micro_max, dist.ReduceOp.MIN)
            micro_max = int(micro_max)
        micro_max = max(1, micro_max * 9 // 10) if micro_max else 0  # 10% to spare for fragmentation
        batch_size, grad_accum = split_batch(cfg, micro_max, world)
        print(f"auto: micro-batches of up to {micro_max} images fit (90% of the largest that ran); "
              f"--batch-size {batch_size} = {world} process(es) x {grad_accum} micro-batch(es) x "
              f"{batch_size // (world * grad_accum)} images")
        cfg = dataclasses.replace(cfg, batch_size=batch_size, grad_accum=grad_accum)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} does not split into {world} process(es) x "
                         f"{cfg.grad_accum} micro-batch(es); use a multiple of {world * cfg.grad_accum}")
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than --batch-size "
                         f"{cfg.batch_size}")
    print(f"data: {cfg.data}, {len(dataset)} images at {cfg.image_size}x{cfg.image_size}"
          f"{f', {len(names)} classes' if names else ''}; run directory {out_dir}; device {device}"
          f"{f'; {world} processes' if world > 1 else ''}")

    step = restore(resume, cfg, raw_model, ema, optimizer, scaler) if resume is not None else 0
    if step >= cfg.steps:
        print(f"nothing to do: the checkpoint is at step {step}, --steps is {cfg.steps}")
        return
    first_step = step
    micro = cfg.batch_size // (world * cfg.grad_accum)
    if cfg.num_workers >= 0:
        workers = cfg.num_workers
    else:  # in-memory data needs no workers; decoding files does, shared by a node's processes
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        workers = 0 if isinstance(dataset, ShapesDataset) else min(8, max(1, (os.cpu_count() or 1) // per_node))
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, step,
                                                cfg.steps, rank, world),
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(cfg.seed))

    saved = {"step": step if resume is not None and os.path.exists(cfg.ckpt)
             and os.path.samefile(resume, cfg.ckpt) else None}

    def on_disk():
        return (f"'{cfg.ckpt}' holds step {saved['step']}" if saved["step"] is not None
                else "no checkpoint was written by this run")

    def save(at_step, final, x0, y):
        """Only weights whose loss on x0 is finite are saved: a model that diverged in its last
        step (finite weights, NaN outputs) never replaces a good checkpoint. Periodic saves that
        fail (disk full) warn and training goes on; the last one must work."""
        with torch.no_grad(), autocast:
            check = objective(raw_model, x0, torch.full((x0.shape[0],), cfg.T // 2),
                              torch.randn_like(x0), y.to(device) if cfg.kind == "classifier" else None)
        if not torch.isfinite(check):
            raise Diverged(f"the weights after step {at_step} give a loss of {check.item()}")
        try:
            save_checkpoint(cfg.ckpt, checkpoint_state(cfg, raw_model, ema, at_step, optimizer, scaler))
            saved["step"] = at_step
        except (OSError, ValueError) as e:
            message = f"could not save step {at_step} to '{cfg.ckpt}' ({getattr(e, 'strerror', None) or e})"
            if final or isinstance(e, ValueError):
                raise Stopped(f"error: {message}; {on_disk()}", 1) from None
            print(f"warning: {message}; {on_disk()}; training goes on", file=sys.stderr)

    def sample_grid(at_step):
        """64 DDIM samples of the EMA model (a conditional one: the classes in turn, unguided)."""
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        x_T = torch.randn(64, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g,
                          device=device)
        y = torch.arange(64) % cfg.num_classes if cfg.num_classes else None
        x0 = sample_loop(ema, diffusion, x_T, sampler="ddim", steps=min(50, cfg.T), generator=g, y=y)
        images = to_uint8(x0)
        log.image(at_step, grid_of(images))
        try:
            save_grid(images, os.path.join(out_dir, f"samples_{at_step:07d}.png"))
        except OSError as e:
            print(f"warning: cannot write a sample grid in '{out_dir}' ({e.strerror or e})",
                  file=sys.stderr)

    # Pre-flight: one batch through data, model and backward, so a broken setup fails in
    # seconds. Its gradients are dropped, and every step seeds its own draws, so it changes nothing.
    first, first_y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=micro)))
    t0 = time.time()
    loss = loss_of(model, first.to(device), first_y, step, 0)
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    print(f"pre-flight ok: one step on one batch, loss {loss.item():.4f}, {time.time() - t0:.1f}s")
    if world > 1:  # DDP averages the gradients in backward(); it starts from rank 0's weights
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    from tqdm import tqdm
    log = RunLog(out_dir, step if resume is not None else None, cfg.tensorboard) if lead else None
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not lead)
    model.train()
    t_last, imgs_since, paused = time.time(), 0, 0.0  # paused: saving and sampling, not training
    try:
        with StopSignals() as stop:
            for batch, labels in loader:
                lr = learning_rate(cfg, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                for k, (x0, y) in enumerate(zip(batch.to(device, non_blocking=True).split(micro),
                                                labels.split(micro))):
                    if device.type == "cuda":
                        x0 = x0.contiguous(memory_format=torch.channels_last)
                    # DDP averages the gradients once, in the backward of the last micro-batch
                    last = k == cfg.grad_accum - 1
                    with contextlib.nullcontext() if world == 1 or last else model.no_sync():
                        loss = loss_of(model, x0, y, step, rank * cfg.grad_accum + k) / cfg.grad_accum
                        scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                loss_sum, stop_asked = agree(loss_sum, stop.signal, world)
                if not math.isfinite(loss_sum):
                    raise Diverged(f"the loss became {loss_sum} at step {step + 1}")
                scaler.unscale_(optimizer)
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # 0: no clipping
                grad_norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm))
                if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16 skips such steps
                    raise Diverged(f"the gradient norm became {grad_norm} at step {step + 1}")
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                ema_update(ema, raw_model, cfg.ema_decay)
                step += 1
                imgs_since += cfg.batch_size
                bar.update(1)
                t_pause = time.time()
                if lead and (step % cfg.log_every == 0 or step == cfg.steps):
                    ips = imgs_since / max(t_pause - t_last - paused, 1e-9)
                    log.write({"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                               "img_per_s": ips})
                    bar.set_postfix(loss=f"{loss_sum:.4f}", img_s=f"{ips:.1f}")
                    t_last, imgs_since, paused = time.time(), 0, 0.0
                    t_pause = t_last
                if stop_asked or step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                    if lead:
                        save(step, stop_asked or step == cfg.steps, x0, y)
                    if world > 1:  # the others wait: torchrun ends the job when one process exits
                        dist.barrier()
                if lead and cfg.sample_every and cfg.kind == "denoiser" and \
                        (step % cfg.sample_every == 0 or step == cfg.steps):
                    sample_grid(step)
                paused += time.time() - t_pause
                if stop_asked:
                    signum = stop.signal or signal.SIGTERM  # another process may have been the one asked
                    raise Stopped(f"\n{signal.Signals(signum).name}: saved step {step} to "
                                  f"'{cfg.ckpt}'; continue with --resume {cfg.ckpt}" if lead else "",
                                  128 + signum)
    except Diverged as e:
        raise Stopped(f"error: {e}; training stopped, and {on_disk()} (only weights that give a "
                      "finite loss are saved). Try a lower --lr, --amp bf16 instead of fp16, or check "
                      "the data" if lead else "", 1) from None
    except KeyboardInterrupt:
        hint = f"; continue with --resume {cfg.ckpt}" if saved["step"] is not None else ""
        raise Stopped(f"\nstopped at once during step {step + 1}, without saving; {on_disk()}{hint}",
                      130) from None
    finally:
        bar.close()
        if log is not None:
            log.draw()
            log.close()
    if world > 1:  # rank 0 finishes its last grid before the job ends
        dist.barrier()
    print(f"done: steps {first_step}..{step}; checkpoint '{cfg.ckpt}', samples and loss curve "
          f"in {out_dir}")


# ----------------------------------------------------------------------------------------------
# Sampling


def parse_classes(spec, names):
    """The class indices `--class` asks for: 'all', or a comma list of names or indices."""
    if spec == "all":
        return list(range(len(names)))
    classes = []
    for part in str(spec).split(","):
        part = part.strip()
        if part in names:
            classes.append(names.index(part))
        elif part.isdigit() and int(part) < len(names):
            classes.append(int(part))
        else:
            raise ValueError(f"--class {part}: not a class of this model; use an index 0..{len(names) - 1}, "
                             f"a name ({', '.join(names)}), a comma list, or all")
    return classes


def class_labels(classes, n):
    """(labels, images per grid row): n images of one class, or a row of ceil(n / K) images
    for each of K classes."""
    if len(classes) == 1:
        return np.full(n, classes[0]), None
    per_class = math.ceil(n / len(classes))
    return np.repeat(classes, per_class), per_class


def load_classifier(path, cfg):
    """The noisy classifier at `path` (raw weights: Dhariwal & Nichol keep no EMA of it), checked
    against the denoiser's config: same image shape and schedule, and the same classes."""
    classifier, clf_cfg = load_checkpoint(path, ema=False, kind="classifier")
    for name in ("image_size", "in_channels", "T", "schedule"):
        if getattr(clf_cfg, name) != getattr(cfg, name):
            raise ValueError(f"--classifier {path} has {name}={getattr(clf_cfg, name)}, the model "
                             f"{getattr(cfg, name)}; train the classifier with the model's settings")
    if cfg.num_classes and clf_cfg.class_names != cfg.class_names:
        raise ValueError(f"--classifier {path} knows the classes {', '.join(clf_cfg.class_names)}; "
                         f"the model {', '.join(cfg.class_names)}")
    return classifier, clf_cfg


def sample(ckpt, n=64, steps=None, sampler="ddpm", eta=0.0, seed=0, out="samples.png",
           outdir=None, ema=True, batch=None, device="auto", progress=(), spacing=None,
           classes=None, guidance=3.0, classifier=None, classifier_scale=1.0, amp="none"):
    """n images from the checkpoint's model into one grid (and one PNG each in outdir, and the
    reverse process of the first batch as a picture or animation in each path of progress).
    classes: --class's text (names or indices, a comma list, or all: a grid row per class),
    sampled with classifier-free guidance of scale `guidance` if the model is conditional, and
    guided by the noisy classifier at path `classifier` with scale `classifier_scale`."""
    if n < 1:
        raise ValueError(f"--n {n}: sample at least 1 image")
    if batch is not None and batch < 1:
        raise ValueError(f"--batch {batch}: use at least 1 image per batch")
    check_output_path(out, PICTURE_EXTENSIONS, "--out", inputs=(ckpt,))
    progress = [progress] if isinstance(progress, str) else list(progress or ())
    for path in progress:
        check_output_path(path, PROGRESS_EXTENSIONS, "--progress", inputs=(ckpt, out))
    if outdir:
        check_output_folder(outdir, "--outdir")
    if not (math.isfinite(guidance) and guidance >= 0) or not math.isfinite(classifier_scale):
        raise ValueError("--guidance must be a number >= 0 (0: unconditional, 1: conditional) and "
                         "--classifier-scale a finite number")
    device = pick_device(device)
    dtype = sampling_dtype(amp, device)
    model, cfg = load_checkpoint(ckpt, ema=ema)
    check_sampler(sampler, steps, eta, cfg.T, spacing or default_spacing(sampler))
    clf, names = None, cfg.class_names
    if classifier is not None:
        clf, clf_cfg = load_classifier(classifier, cfg)
        clf.to(device)
        names = clf_cfg.class_names
    labels, nrow = None, None
    if classes is not None:
        if not names:
            raise ValueError(f"--class: '{ckpt}' is unconditional (trained without --cond); pass "
                             "a noisy classifier with --classifier, or train with --cond")
        labels, nrow = class_labels(parse_classes(classes, names), n)
        n = len(labels)
    elif clf is not None:
        raise ValueError("--classifier guides towards the classes given by --class")
    model.to(device)
    diffusion = GaussianDiffusion.from_config(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    batch = batch or n
    images, frames = [], {}
    n_steps = steps or cfg.T
    shown = {path: progress_steps(n_steps, not path.lower().endswith(".png")) for path in progress}
    wanted = set().union(*shown.values())

    def record(k, t, x_t, pred_x0):  # the first batch's process, at the steps the pictures show
        if not images and k in wanted:
            frames[k] = (t, to_uint8(x_t), to_uint8(pred_x0))

    t0 = time.time()
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x_T = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g,
                          device=device)
        y = torch.as_tensor(labels[start:start + b], device=device) if labels is not None else None
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            x0 = sample_loop(model, diffusion, x_T, sampler=sampler, steps=steps, eta=eta,
                             generator=g, callback=record, progress=True, spacing=spacing, y=y,
                             guidance=guidance, classifier=clf, classifier_scale=classifier_scale)
        images.append(to_uint8(x0))
    elapsed = time.time() - t0
    images = np.concatenate(images)
    try:
        for path, steps_shown in shown.items():
            save_progress([frames[k] for k in steps_shown], images[:min(batch, n)], path)
        save_grid(images, out, nrow)
        if outdir:
            for k, img in enumerate(images):
                Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(
                    os.path.join(outdir, f"{k:05d}.png"))
    except OSError as e:
        raise ValueError(f"the samples could not be written ({e.strerror or e})") from None
    guided = ""
    if labels is not None:
        shown_classes = ", ".join(names[c] for c in dict.fromkeys(labels.tolist()))
        guided = (f"; classes {shown_classes}" + (f", guidance {guidance:g}" if cfg.num_classes else "")
                  + (f", classifier scale {classifier_scale:g}" if clf is not None else ""))
    print(f"wrote {out}" + (f" and {n} PNGs in {outdir}" if outdir else "") +
          (f", the process in {' and '.join(progress)}" if progress else "") +
          f"; {n * n_steps / elapsed:.1f} image-steps/s on {device} ({sampler}, {n_steps} steps, "
          f"{'bf16' if dtype == torch.bfloat16 else 'fp16' if dtype else 'fp32'}){guided}")


# ----------------------------------------------------------------------------------------------
# Command line

CHOICES = {"model": list(PRESETS), "schedule": ["linear", "cosine"], "prediction": list(PREDICTIONS),
           "var_type": list(VAR_TYPES), "amp": list(AMP_MODES), "optimizer": list(OPTIMIZERS)}
AUTO_FIELDS = ("batch_size", "grad_accum")  # take "auto", stored as 0 until train() finds the number


def add_config_flags(parser):
    """One flag per Config field (--batch-size for batch_size); default None = preset/default."""
    for f in dataclasses.fields(Config):
        if f.name in DERIVED_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        shown = "the preset's" if f.name in MODEL_FIELDS else \
            ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        text = HELP[f.name] if "default:" in HELP[f.name] else f"{HELP[f.name]} (default: {shown})"
        text = text.replace("%", "%%")
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, type=int_tuple, default=None, metavar="A,B,..", help=text)
        elif f.name in AUTO_FIELDS:
            parser.add_argument(flag, type=count_or_auto, default=None, metavar="N|auto", help=text)
        else:
            parser.add_argument(flag, type=type(f.default), default=None, help=text,
                                choices=CHOICES.get(f.name))


def count_or_auto(text):
    if text == "auto":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a whole number nor auto") from None


def int_tuple(text):
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


def train_config(given, resume):
    """The run's Config from the flags given (None: not given). A fresh run starts from a preset;
    a resumed one from the checkpoint's config, so `train --resume` alone continues the run."""
    if given["optimizer"] == "adamw" and given["weight_decay"] is None:
        given["weight_decay"] = 0.01  # PyTorch's AdamW default; Adam's is 0
    if resume is not None:
        path = resume or given["ckpt"] or Config.ckpt
        saved = config_from_dict(read_checkpoint(path)["config"], f"'{path}'")
        if given["model"] not in (None, saved.model):
            raise ValueError(f"--resume {path}: the checkpoint was trained with preset "
                             f"'{saved.model}', not '{given['model']}'")
        changes = {k: v for k, v in given.items() if v is not None}
        changes.setdefault("ckpt", path)  # continue writing the file we resume from
        cfg = dataclasses.replace(saved, **changes)
        check_config(cfg)
        return cfg, path
    if given["model"] is None:  # pick the preset from the data, then the image size
        size = given["image_size"] or (96 if given["data"] == "stl10" else 32)
        given["model"] = "tiny" if given["data"] in (None, "shapes") else PRESET_BY_SIZE.get(size)
        if given["model"] is None:
            raise ValueError(f"no preset for --image-size {size}; pass --model "
                             f"({', '.join(PRESETS)}) and a size it can take")
    return make_config(**given), None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ddpm.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for command, text in (("train", "train a model (Algorithm 1)"),
                          ("train-classifier", "train a noisy classifier p(y | x_t, t) for classifier "
                                               "guidance (the flags of train; --cond, --prediction and "
                                               "the sampling flags have no effect)")):
        train_parser = sub.add_parser(command, help=text)
        add_config_flags(train_parser)
        train_parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                                  help="continue the run saved in PATH (default PATH: the --ckpt file); "
                                       "flags given change its settings (default: start a new run)")
        train_parser.add_argument("--overwrite", action="store_true",
                                  help="replace an existing --ckpt and the run's metrics.jsonl "
                                       "(default: refuse to)")

    sample_parser = sub.add_parser("sample", help="sample images from a checkpoint (Algorithm 2)")
    sample_parser.add_argument("--ckpt", default="ckpt.pt", help="checkpoint (default: ckpt.pt)")
    sample_parser.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    sample_parser.add_argument("--steps", type=int, default=None,
                               help="sampling steps; fewer than T respaces the chain (default: T)")
    sample_parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                               help="ddpm: ancestral (Algorithm 2); ddim: Song et al.; dpm++: DPM-Solver++(2M), "
                                    "Lu et al. 2022, good at 10 to 25 steps (default: ddpm)")
    sample_parser.add_argument("--eta", type=float, default=0.0,
                               help="DDIM noise, 0 deterministic .. 1 (default: 0; ddim only)")
    sample_parser.add_argument("--spacing", choices=SPACINGS, default=None,
                               help="which t's a chain shorter than T keeps: leading 0, T/steps, ..; "
                                    "trailing .., T-1 (Lin et al. 2023) (default: trailing for dpm++, "
                                    "leading otherwise)")
    sample_parser.add_argument("--seed", type=int, default=0, help="seed of x_T and the noise (default: 0)")
    sample_parser.add_argument("--batch", type=int, default=None,
                               help="images per network call (default: all of --n)")
    sample_parser.add_argument("--out", default="samples.png",
                               help="the grid picture, .png/.jpg/.webp/.bmp (default: samples.png)")
    sample_parser.add_argument("--outdir", default=None,
                               help="also write one PNG per image in this folder (default: none)")
    sample_parser.add_argument("--progress", action="append", default=[], metavar="PATH",
                               help="also draw the reverse process: .png, a still (x_t and predicted "
                                    "x_0 at 10 steps), or .gif/.webp, an animation; may be given "
                                    "more than once (default: none)")
    sample_parser.add_argument("--class", dest="classes", default=None, metavar="K",
                               help="class(es) to draw: a name or an index, a comma list, or all (a "
                                    "grid row per class); needs a model trained with --cond, or "
                                    "--classifier (default: none, unconditional)")
    sample_parser.add_argument("--guidance", type=float, default=3.0,
                               help="classifier-free guidance scale s of a --cond model: 0 "
                                    "unconditional, 1 plain conditional, > 1 stronger (default: 3)")
    sample_parser.add_argument("--classifier", default=None, metavar="PATH",
                               help="a noisy classifier from train-classifier that guides any model "
                                    "towards --class (default: none)")
    sample_parser.add_argument("--classifier-scale", type=float, default=1.0,
                               help="classifier guidance scale s, eps - s sqrt(1 - abar) grad log "
                                    "p(y | x_t) (default: 1)")
    sample_parser.add_argument("--no-ema", action="store_true",
                               help="use the raw weights, not the EMA (default: EMA)")
    sample_parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                               help="where to run (default: auto, CUDA if usable)")
    sample_parser.add_argument("--amp", default="none", choices=list(AMP_MODES),
                               help="the network in autocast: bf16, fp16 (CUDA), auto (bf16 where native: CUDA, "
                                    "or a CPU with AVX512-BF16 or AMX) or none, float32 (default: none)")

    info_parser = sub.add_parser("info", help="config, parameter count and FLOPs of a model")
    info_parser.add_argument("--model", default=None, choices=list(PRESETS),
                             help="a preset (default: cifar10)")
    info_parser.add_argument("--image-size", type=int, default=None,
                             help="image size (default: the preset's)")
    info_parser.add_argument("--ckpt", default=None, help="describe this checkpoint instead (default: none)")

    args = parser.parse_args(argv)
    try:
        if args.command in ("train", "train-classifier"):
            given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                     if f.name not in DERIVED_FIELDS}
            if args.command == "train-classifier":
                if given["out"] and given["out"].lower().endswith(CHECKPOINT_EXTENSIONS) and not given["ckpt"]:
                    given["ckpt"], given["out"] = given["out"], None  # `--out clf.pt` names the file
                given["ckpt"] = given["ckpt"] or "clf.pt"
            cfg, resume = train_config(given, args.resume)
            if args.command == "train-classifier":
                cfg = dataclasses.replace(cfg, kind="classifier")
            elif cfg.kind != "denoiser":
                raise ValueError(f"'{resume}' is a noisy classifier; continue it with train-classifier")
            train(cfg, resume, args.overwrite)
        elif args.command == "sample":
            sample(args.ckpt, args.n, args.steps, args.sampler, args.eta, args.seed, args.out,
                   args.outdir, ema=not args.no_ema, batch=args.batch, device=args.device,
                   progress=args.progress, spacing=args.spacing, classes=args.classes,
                   guidance=args.guidance, classifier=args.classifier,
                   classifier_scale=args.classifier_scale, amp=args.amp)
        elif args.command == "info":
            if args.ckpt:
                kind = config_from_dict(read_checkpoint(args.ckpt)["config"], f"'{args.ckpt}'").kind
                model, cfg = load_checkpoint(args.ckpt, kind=kind)
            else:
                cfg = make_config(args.model or "cifar10", image_size=args.image_size)
                model = UNet(cfg)
            for name, value in asdict(cfg).items():
                print(f"{name:>17}: {value}")
            print(f"{'parameters':>17}: {count_params(model):,}")
            print(f"{'forward FLOPs':>17}: {count_flops(model, cfg) / 1e9:.2f} G at batch 1, "
                  f"{cfg.image_size}x{cfg.image_size}")
    except ValueError as e:
        who = f"rank {dist.get_rank()}: " if dist.is_initialized() and dist.get_rank() else ""
        raise SystemExit(f"{who}error: {e}") from None
    except Stopped as e:
        if str(e):  # under torchrun, rank 0 speaks for the job
            print(str(e), file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted") from None
    except RuntimeError as e:
        if not (dist.is_initialized() and lost_a_peer(e)):
            raise
        raise SystemExit(f"rank {dist.get_rank()}: stopped, because another process of this "
                         "torchrun job stopped (its message is above)") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
