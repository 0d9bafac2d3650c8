"""ddpm.py's command line, built without torch (so --help and a malformed flag are answered at
once): the help text of every Config field, a flag per field for `train` and `train-classifier`,
and the flags of `sample` and `info`.
"""

import argparse
import dataclasses

import sampling
from config import AMP_MODES, DERIVED_FIELDS, OPTIMIZERS, PREDICTIONS, PRESETS, Config
from schedules import SCHEDULES, VAR_TYPES


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


FLAGS = {"preset": "--model", "run_dir": "--out"}  # fields whose flag is not their name
CHOICES = {"schedule": list(SCHEDULES), "prediction": list(PREDICTIONS),
           "var_type": list(VAR_TYPES), "amp": list(AMP_MODES), "optimizer": list(OPTIMIZERS)}
AUTO_FIELDS = ("batch_size", "grad_accum")  # take "auto", stored as 0 until train() finds the number


def add_config_flags(parser, classifier=False):
    """One flag per field of Config (--batch-size for batch_size), but for the derived ones (and
    with classifier, those a classifier does not use); default None: the preset's value or the
    field's default."""
    choices = {"preset": list(PRESETS), **CHOICES}
    helps = {**HELP, **CLASSIFIER_HELP} if classifier else HELP
    for f in dataclasses.fields(Config):
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


def add_train_flags(parser, classifier=False):
    """The flags of `train` (one per config field, --resume, --overwrite), or with classifier
    those of `train-classifier`: the fields it uses, with its own defaults."""
    add_config_flags(parser, classifier)
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue the run saved in PATH (default PATH: the --ckpt file); "
                             "flags given change its settings (default: start a new run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --ckpt and the run's metrics.jsonl "
                             "(default: refuse to)")


def add_info_flags(parser):
    """The flags of `ddpm.py info`."""
    parser.add_argument("--model", dest="preset", default=None, choices=list(PRESETS),
                        help="a preset (default: cifar10)")
    parser.add_argument("--image-size", type=int, default=None, help="image size (default: the preset's)")
    parser.add_argument("--ckpt", default=None, help="describe this checkpoint instead (default: none)")


def add_sample_flags(parser):
    """The flags of `ddpm.py sample`: those sample_ort.py shares (sampling.add_sampling_flags), then
    the ones only PyTorch has."""
    parser.add_argument("--ckpt", default="ckpt.pt", help="checkpoint (default: ckpt.pt)")
    sampling.add_sampling_flags(parser)
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


def ddpm_parser():
    """ddpm.py's parser: its commands and their flags."""
    top = argparse.ArgumentParser(prog="ddpm.py", description="Denoising Diffusion Probabilistic Models "
                                  "(Ho, Jain & Abbeel, 2020): train, sample, describe.")
    commands = top.add_subparsers(dest="command", required=True)
    add_train_flags(commands.add_parser("train", help="train a model (Algorithm 1)"))
    add_train_flags(commands.add_parser("train-classifier", help="train a noisy classifier p(y | x_t, t) for "
                                        "classifier guidance (the flags of train that a classifier uses)"),
                    classifier=True)
    add_sample_flags(commands.add_parser("sample", help="sample images from a checkpoint (Algorithm 2)"))
    add_info_flags(commands.add_parser("info", help="config, parameter count and FLOPs of a model"))
    return top
