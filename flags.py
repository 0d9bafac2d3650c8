"""The settings of ddpm.py's Config as the command line shows them: the help text of every field,
the checks that turn a bad setting into a sentence before any work starts, and the flags `train`
and `train-classifier` take. It never imports ddpm.py: the Config class is an argument.
"""

import argparse
import dataclasses
import math

import core
from core import VAR_TYPES

# not flags: the data and the command set them
DERIVED_FIELDS = ("num_classes", "class_names", "kind", "distilled_steps", "distilled_guidance", "teacher")
KINDS = ("denoiser", "classifier")
PREDICTIONS = ("eps", "v", "x0")
AMP_MODES = ("auto", "bf16", "fp16", "none")
OPTIMIZERS = ("adam", "adamw")


# One line of help per Config field; `train -h` prints it with the default.
HELP = {
    "preset": "model preset (default: tiny for shapes, else by image size: cifar10 32, res64 64, "
             "stl10 96)",
    "image_size": "image height and width in pixels (default: the preset's)",
    "in_channels": "1 (grayscale) or 3 (RGB) (default: 3)",
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
    "distilled_steps": "set by distill: the DDIM steps a student samples in (0: not distilled)",
    "distilled_guidance": "set by distill: the classifier-free guidance built into a student (1: none)",
    "teacher": "set by distill: the checkpoint a round distilled",
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
    "ckpt": "checkpoint file, written every --save-every steps and on Ctrl-C",
    "run_dir": "run directory for metrics.jsonl, loss.png and sample grids (default: runs/<data>)",
    "save_every": "save the checkpoint every N steps; 0: only at the end and on a stop",
    "sample_every": "write a 64-image DDIM grid every N steps and at the end; 0: never",
    "log_every": "log loss, lr, grad norm and img/s every N steps",
    "num_workers": "data loader processes; -1: 0 for built-in data, else up to 8 by CPU count",
    "device": "auto, cpu, cuda or cuda:N; under torchrun each process takes its LOCAL_RANK's GPU",
    "tensorboard": "also write TensorBoard event files (loss, lr, grad norm, img/s, sample grids) "
                   "in the run directory, where the tensorboard package is installed",
}


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
    if cfg.schedule not in core.SCHEDULES:
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




FLAGS = {"preset": "--model", "run_dir": "--out"}  # fields whose flag is not their name
CHOICES = {"schedule": list(core.SCHEDULES), "prediction": list(PREDICTIONS),
           "var_type": list(VAR_TYPES), "amp": list(AMP_MODES), "optimizer": list(OPTIMIZERS)}
AUTO_FIELDS = ("batch_size", "grad_accum")  # take "auto", stored as 0 until train() finds the number


def add_config_flags(parser, config_class, presets, classifier=False):
    """One flag per field of the config dataclass (--batch-size for batch_size), but for the
    derived ones (and with classifier, those a classifier does not use); default None: the
    preset's value or the field's default."""
    choices = {"preset": list(presets), **CHOICES}
    helps = {**HELP, **CLASSIFIER_HELP} if classifier else HELP
    for f in dataclasses.fields(config_class):
        if f.name in DERIVED_FIELDS or (classifier and f.name in NOT_FOR_CLASSIFIERS):
            continue
        flag = FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        text = helps[f.name] if "default:" in helps[f.name] else f"{helps[f.name]} (default: {shown})"
        text = text.replace("%", "%%")
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, dest=f.name, type=int_tuple, default=None, metavar="A,B,..", help=text)
        elif f.name in AUTO_FIELDS:
            parser.add_argument(flag, dest=f.name, type=count_or_auto, default=None, metavar="N|auto", help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=None, help=text,
                                choices=choices.get(f.name))


def count_or_auto(text):
    if text == "auto":
        return 0
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a whole number nor auto") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"'{text}': give a positive number, or auto")
    return number


def int_tuple(text):
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


# What a noisy classifier does not use (it predicts the class, not eps, and draws no samples),
# and the defaults `train-classifier` has instead of train's.
NOT_FOR_CLASSIFIERS = ("cond", "p_uncond", "prediction", "var_type", "clip_x0", "min_snr", "sample_every")
CLASSIFIER_HELP = {"ckpt": "checkpoint file, written every --save-every steps and on Ctrl-C; a file name "
                           "ending in .pt given as --out names it too (default: clf.pt)",
                   "run_dir": "run directory for metrics.jsonl and loss.png (default: runs/<data>-classifier)"}


def add_train_flags(parser, config_class, presets, classifier=False):
    """The flags of `train` (one per config field, --resume, --overwrite), or with classifier
    those of `train-classifier`: the fields it uses, with its own defaults."""
    add_config_flags(parser, config_class, presets, classifier)
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue the run saved in PATH (default PATH: the --ckpt file); "
                             "flags given change its settings (default: start a new run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --ckpt and the run's metrics.jsonl "
                             "(default: refuse to)")


def add_info_flags(parser, presets):
    """The flags of `ddpm.py info`."""
    parser.add_argument("--model", dest="preset", default=None, choices=list(presets),
                        help="a preset (default: cifar10)")
    parser.add_argument("--image-size", type=int, default=None, help="image size (default: the preset's)")
    parser.add_argument("--ckpt", default=None, help="describe this checkpoint instead (default: none)")


def add_sample_flags(parser):
    """The flags of `ddpm.py sample`: those sample_ort.py shares (core.add_sampling_flags), then
    the ones only PyTorch has."""
    parser.add_argument("--ckpt", default="ckpt.pt", help="checkpoint (default: ckpt.pt)")
    core.add_sampling_flags(parser)
    parser.add_argument("--classifier", default=None, metavar="PATH",
                        help="a noisy classifier from train-classifier that guides any model "
                             "towards --class (default: none)")
    parser.add_argument("--classifier-scale", type=float, default=1.0,
                        help="classifier guidance scale s, eps - s sqrt(1 - abar) grad log "
                             "p(y | x_t) (default: 1)")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw weights, not the EMA (default: EMA)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (default: auto, CUDA if usable)")
    parser.add_argument("--amp", default="none", choices=list(AMP_MODES),
                        help="the network in autocast: bf16, fp16 (CUDA), auto (bf16 where native: CUDA, "
                             "or a CPU with AVX512-BF16 or AMX) or none, float32 (default: none)")
