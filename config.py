"""What a run is: the one Config dataclass (the model, the diffusion, the training run), the model
presets, the checks that turn a bad setting into a sentence before any work starts, and reading a
Config back from a checkpoint. Standard library only, so the command line (flags.py) is built and
answers --help without torch.
"""

import dataclasses
import math
from dataclasses import dataclass

from schedules import SCHEDULES, VAR_TYPES

# not flags: the data and the command set them
DERIVED_FIELDS = ("num_classes", "class_names", "kind", "distilled_steps", "distilled_guidance", "teacher")
KINDS = ("denoiser", "classifier")
PREDICTIONS = ("eps", "v", "x0")
AMP_MODES = ("auto", "bf16", "fp16", "none")
OPTIMIZERS = ("adam", "adamw")


@dataclass
class Config:
    # model (a preset fills these; a flag overrides one)
    preset: str = "cifar10"  # the flag --model
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
    prediction: str = "eps"  # Ho et al.: eps; or v (Salimans & Ho 2022), or x0
    # class conditioning (Ho & Salimans 2021): num_classes and class_names come from the data
    cond: bool = False
    p_uncond: float = 0.1
    num_classes: int = 0  # 0: unconditional; else the class embedding has num_classes + 1 rows
    class_names: tuple = ()
    kind: str = "denoiser"  # or "classifier": p(y | x_t, t) for classifier guidance
    distilled_steps: int = 0  # set by distill.py (Salimans & Ho 2022): a student's DDIM steps; 0: none
    distilled_guidance: float = 1.0  # the classifier-free guidance built into a student; 1: none
    teacher: str = ""  # the checkpoint a distillation round started from
    # training
    data: str = "shapes"
    data_dir: str = "data"
    steps: int = 800_000  # optimizer steps (sampling steps are num_steps)
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
    run_dir: str = ""  # the flag --out; "": runs/<data>
    save_every: int = 5000
    sample_every: int = 5000
    log_every: int = 100
    num_workers: int = -1
    device: str = "auto"
    tensorboard: bool = True


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
INFO_FIELDS = ("preset",) + MODEL_FIELDS + ("T", "schedule", "var_type", "clip_x0", "prediction")  # info of a preset
RENAMED_FIELDS = {"model": "preset", "out": "run_dir"}  # their names in checkpoints before 2026-12-02


def make_config(preset="cifar10", **overrides):
    """Config from a preset, with explicit overrides (None means 'not given')."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset '{preset}'; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = {**PRESETS[preset], **given}
    levels = [settings["image_size"] // 2 ** k for k in range(len(settings["ch_mult"]))]
    if "attn_resolutions" not in given and not set(settings["attn_resolutions"]) & set(levels):
        # another image size: attention at the level nearest 16x16, as the presets place it
        settings["attn_resolutions"] = (min(levels, key=lambda r: abs(r - 16)),)
    cfg = Config(preset=preset, **settings)
    check_config(cfg)
    return cfg


def config_from_dict(d, path="the checkpoint"):
    """The Config a checkpoint describes; ValueError if the values cannot build a model. Field
    names of earlier versions (model, out) are read as today's (preset, run_dir)."""
    d = {RENAMED_FIELDS.get(k, k) if RENAMED_FIELDS.get(k, k) not in d else k: v for k, v in d.items()}
    known = {f.name for f in dataclasses.fields(Config)}
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
    try:
        cfg = Config(**d)
        check_config(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has an unusable config: {e}") from None
    return cfg


def check_config(cfg):
    """Bad settings are a ValueError with a sentence, before any work starts."""
    levels = len(cfg.ch_mult)
    if levels < 1 or any(m < 1 for m in cfg.ch_mult) or cfg.num_res_blocks < 1:
        raise ValueError("--ch-mult needs at least one positive multiplier and --num-res-blocks "
                         "must be at least 1")
    if cfg.image_size < 2 ** (levels - 1) or cfg.image_size % 2 ** (levels - 1):
        raise ValueError(f"image size {cfg.image_size} does not fit preset '{cfg.preset}': it "
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
    if cfg.schedule not in SCHEDULES:
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
    if not 0 <= cfg.distilled_steps <= cfg.T or not (math.isfinite(cfg.distilled_guidance) and cfg.distilled_guidance >= 0):
        raise ValueError(f"distilled_steps {cfg.distilled_steps} must be 0 to T={cfg.T} and distilled_guidance "
                         f"{cfg.distilled_guidance} at least 0")
    if not 2 <= cfg.T <= 100_000:
        raise ValueError(f"T={cfg.T}: the diffusion needs 2 to 100,000 steps (Ho et al.: 1000)")
    if cfg.image_size > 4096:
        raise ValueError(f"--image-size {cfg.image_size}: at most 4096 pixels a side")
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
