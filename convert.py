"""Ho et al.'s U-Net between ddpm.py checkpoints and diffusers folders, both ways, weight for weight.

  python convert.py --from-diffusers ddpm-cifar10-32/ -o ckpt.pt   # google/ddpm-cifar10-32 -> ours
  python convert.py --to-diffusers ckpt.pt -o my-ddpm/             # ours -> a DDPMPipeline folder

A diffusers folder is a UNet2DModel (config.json + diffusion_pytorch_model.safetensors or .bin,
at the top or in unet/) and optionally a scheduler (scheduler_config.json, at the top or in
scheduler/). --to-diffusers writes the layout `DDPMPipeline.from_pretrained(DIR)` loads
(`DDIMPipeline` for a distilled student): model_index.json, unet/ and scheduler/. diffusers
itself is not needed for either direction.

The mapping (checked against diffusers in tests/test_diffusers.py):
  [sin, cos] time embedding (flip_sin_to_cos False, freq_shift 1); Downsample pads right/bottom
  (downsample_padding 0); one attention head of C channels, whose Linear (C, C) weights are our
  1x1 convs; GroupNorm(32, eps 1e-6); diffusers' up_blocks[i] is our up[L-1-i]; the middle
  block's resnets.0 / attentions.0 / resnets.1 are our block_1 / attn_1 / block_2; a class-
  conditional model's class_embedding (num_class_embeds = classes + 1, the last "no label") is
  our label_emb, its class names in class_names.json at the top of the folder.
"""

import argparse
import json
import math
import os
import shutil
import sys


def parser():
    """convert.py's flags."""
    p = argparse.ArgumentParser(description="Convert Ho et al.'s U-Net between ddpm.py checkpoints "
                                            "and diffusers folders.")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-diffusers", metavar="DIR",
                     help="a diffusers UNet2DModel or DDPMPipeline folder, e.g. google/ddpm-cifar10-32 "
                          "(no default: this or --to-diffusers is required)")
    way.add_argument("--to-diffusers", metavar="CKPT",
                     help="a ddpm.py checkpoint (no default: this or --from-diffusers is required)")
    p.add_argument("-o", "--out", default=None,
                   help="the checkpoint to write (default: ckpt.pt) or the folder to write "
                        "(default: the checkpoint's name with -diffusers)")
    p.add_argument("--no-ema", action="store_true",
                   help="--to-diffusers: write the raw, not the EMA, weights (default: EMA)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output checkpoint or folder (default: refuse)")
    return p


if __name__ == "__main__":  # --help and a malformed flag are answered before torch loads (seconds)
    parser().parse_args()

import torch

import checkpoints
import ddpm
import files
import messages
import schedules

HO_LAYOUT = {  # UNet2DModel settings that make it Ho et al.'s network
    "act_fn": "silu", "norm_eps": 1e-6, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default", "center_input_sample": False, "add_attention": True,
    "class_embed_type": None, "time_embedding_dim": None,
}
# A class-conditional model: num_class_embeds = num_classes + 1 (the last row "no label", for
# classifier-free guidance), its class_embedding added to the time embedding as ours. diffusers'
# config has no class names: they travel in class_names.json beside model_index.json.
CLASS_NAMES_FILE = "class_names.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LFS_POINTER = b"version https://git-lfs.github.com/spec"

# Our layer names and diffusers', inside a residual block and an attention block.
RESNET_LAYERS = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
                 "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
ATTENTION_LAYERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
LEGACY_ATTENTION = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # diffusers < 0.14
TOP_LEVEL = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
             "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out",
             "label_emb": "class_embedding"}
MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # ours: diffusers' names


# ----------------------------------------------------------------------------------------------
# Configs


def unet2d_config(cfg):
    """UNet2DModel arguments that build Ho et al.'s network for our Config (the inverse of
    `model_config`); bench and tests build their diffusers peer from this."""
    levels = len(cfg.ch_mult)
    down = ["AttnDownBlock2D" if cfg.image_size // 2 ** k in cfg.attn_resolutions else "DownBlock2D"
            for k in range(levels)]
    out_channels = cfg.in_channels * (2 if cfg.var_type == "learned_range" else 1)  # eps and v
    return dict(sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=out_channels,
                block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
                down_block_types=down, up_block_types=[k.replace("Down", "Up") for k in reversed(down)],
                attention_head_dim=None, dropout=cfg.dropout, norm_num_groups=cfg.norm_groups,
                num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
                **{k: v for k, v in HO_LAYOUT.items() if v is not None})


def model_config(d, path="config.json", class_names=None):
    """Our model settings from a UNet2DModel config.json, or ValueError naming what is not Ho et
    al.'s; and whether it outputs 2C channels (learned variances). A class-conditional model's
    classes are named by class_names (default: their indices)."""
    try:
        channels, down, up = list(d["block_out_channels"]), list(d["down_block_types"]), list(d["up_block_types"])
        size, layers = typed(d, "sample_size", int, None, path), typed(d, "layers_per_block", int, None, path)
    except (KeyError, TypeError) as e:
        raise ValueError(f"'{path}' is not a UNet2DModel config ({type(e).__name__}: {e})") from None
    if not channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
        raise ValueError(f"'{path}': block_out_channels {channels} must be a list of positive whole numbers")
    if not 1 <= size <= 4096 or not 1 <= layers <= 64:
        raise ValueError(f"'{path}': sample_size {size} (1 to 4096) or layers_per_block {layers} (1 to 64) is out of range")
    wrong = [f"{k}={d.get(k)!r} (Ho et al.: {v!r})" for k, v in HO_LAYOUT.items() if d.get(k, v) != v]
    ch = channels[0]
    attn = tuple(size // 2 ** k for k, kind in enumerate(down) if kind == "AttnDownBlock2D")
    if any(kind not in ("DownBlock2D", "AttnDownBlock2D") for kind in down):
        wrong.append(f"down_block_types={down}")
    if up != [k.replace("Down", "Up") for k in reversed(down)]:
        wrong.append(f"up_block_types={up} (must mirror the down blocks)")
    if d.get("attention_head_dim") not in (None, *channels) or d.get("num_attention_heads") not in (None, 1):
        wrong.append(f"attention_head_dim={d.get('attention_head_dim')} (Ho et al. use one head: None)")
    in_channels = d.get("in_channels", 3)
    if any(c % ch for c in channels) or d.get("out_channels", 3) not in (in_channels, 2 * in_channels):
        wrong.append(f"block_out_channels={channels} / out_channels={d.get('out_channels')}")
    embeds = d.get("num_class_embeds") or 0
    if embeds and (not isinstance(embeds, int) or embeds < 3):
        wrong.append(f"num_class_embeds={embeds} (classes and 'no label': at least 3)")
    num_classes = max(embeds - 1, 0)
    names = tuple(class_names) if class_names is not None else tuple(str(k) for k in range(num_classes))
    if num_classes and len(names) != num_classes:
        wrong.append(f"num_class_embeds={embeds} but {len(names)} class names")
    if wrong:
        raise ValueError("this UNet2DModel is not Ho et al.'s layout: " + "; ".join(wrong))
    return dict(image_size=size, in_channels=in_channels, ch=ch,
                ch_mult=tuple(c // ch for c in channels), num_res_blocks=layers,
                attn_resolutions=attn, dropout=typed(d, "dropout", float, 0.1, path),
                norm_groups=typed(d, "norm_num_groups", int, 32, path), num_classes=num_classes,
                class_names=names if num_classes else (), cond=num_classes > 0), \
        d.get("out_channels", 3) == 2 * in_channels


def typed(d, key, kind, default, path):
    """d[key] (or the default) if it has the JSON type kind (int, float, bool, str), else a ValueError:
    a string where a number or a boolean belongs is never read as one ("false" would be true)."""
    value = d.get(key, default)
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        what = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}[kind]
        raise ValueError(f"'{path}': {key} is {value!r}, not {what}")
    return value


def schedule_config(sched, path):
    """Our diffusion settings from a scheduler_config.json; ValueError if its betas are not ours."""
    T = typed(sched, "num_train_timesteps", int, 1000, path)
    if not 2 <= T <= 100_000:
        raise ValueError(f"'{path}': num_train_timesteps {T} (a diffusion needs 2 to 100,000 steps)")
    kind = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(sched.get("beta_schedule", "linear"))
    if kind == "linear":  # ours scales 1e-4..0.02 by 1000/T; diffusers takes beta_start/end as given
        ends = (typed(sched, "beta_start", float, 1e-4, path), typed(sched, "beta_end", float, 0.02, path))
        if not all(math.isclose(a, b * 1000 / T) for a, b in zip(ends, (1e-4, 0.02))):
            kind = None
    if kind is None:
        raise ValueError(f"scheduler '{path}' uses betas we do not build ({sched.get('beta_schedule')}, "
                         f"{sched.get('beta_start')}..{sched.get('beta_end')} over T={T})")
    var_type = sched.get("variance_type", "fixed_small")
    if var_type not in schedules.VAR_TYPES:
        raise ValueError(f"scheduler '{path}': variance_type {var_type} is not supported")
    prediction = {theirs: ours for ours, theirs in PREDICTION_TYPES.items()}.get(sched.get("prediction_type", "epsilon"))
    if prediction is None:
        raise ValueError(f"scheduler '{path}': prediction_type {sched['prediction_type']} is not one of "
                         f"{', '.join(PREDICTION_TYPES.values())}")
    found = dict(var_type=var_type, clip_x0=typed(sched, "clip_sample", bool, True, path), T=T, schedule=kind,
                 prediction=prediction)
    if "distilled_steps" in sched:  # a student we wrote (scheduler_config)
        found.update(distilled_steps=typed(sched, "distilled_steps", int, 0, path),
                     distilled_guidance=typed(sched, "distilled_guidance", float, 1.0, path))
    return found


def scheduler_config(cfg):
    """DDPMScheduler settings with our betas, variance and clipping (the inverse of the above). A
    distilled student gets a DDIMScheduler instead (Salimans & Ho's students take deterministic
    DDIM steps at the trailing t's, the last one onto abar = 1), with its steps and its built-in
    guidance recorded (diffusers ignores the two keys; convert.py reads them back)."""
    sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": cfg.T, "variance_type": cfg.var_type,
             "clip_sample": cfg.clip_x0, "clip_sample_range": 1.0,
             "prediction_type": PREDICTION_TYPES[cfg.prediction]}
    if cfg.distilled_steps:
        sched.update(_class_name="DDIMScheduler", timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0,
                     distilled_steps=cfg.distilled_steps, distilled_guidance=cfg.distilled_guidance)
    if cfg.schedule == "linear":
        sched.update(beta_schedule="linear", beta_start=1e-4 * 1000 / cfg.T, beta_end=0.02 * 1000 / cfg.T)
    else:
        sched.update(beta_schedule="squaredcos_cap_v2")
    return sched


# ----------------------------------------------------------------------------------------------
# Parameter names


def our_key(key, num_levels):
    """Our parameter name for a diffusers UNet2DModel parameter name (None: not ours)."""
    parts = key.split(".")
    head, leaf = ".".join(parts[:-1]), parts[-1]
    fixed = {theirs: ours for ours, theirs in TOP_LEVEL.items()}
    if head in fixed:
        return f"{fixed[head]}.{leaf}"
    layers = {theirs.split(".")[0]: ours for ours, theirs in {**RESNET_LAYERS, **ATTENTION_LAYERS}.items()}
    layers.update(LEGACY_ATTENTION)
    try:
        if parts[0] in ("down_blocks", "up_blocks"):
            down = parts[0] == "down_blocks"
            level = int(parts[1]) if down else num_levels - 1 - int(parts[1])
            ours, kind, rest = "down" if down else "up", parts[2], parts[4:]
            if kind in ("downsamplers", "upsamplers"):
                return f"{ours}.{level}.{'downsample' if down else 'upsample'}.conv.{leaf}"
            group = {"resnets": "block", "attentions": "attn"}[kind]
            return f"{ours}.{level}.{group}.{parts[3]}.{layers[rest[0]]}.{leaf}"
        if parts[0] == "mid_block":
            name = {theirs: ours for ours, theirs in MID.items()}[".".join(parts[1:3])]
            return f"mid.{name}.{layers[parts[3]]}.{leaf}"
    except (KeyError, IndexError, ValueError):
        return None
    return None


def diffusers_key(key, num_levels):
    """diffusers' UNet2DModel parameter name for one of ours (the inverse of `our_key`)."""
    parts = key.split(".")
    head, leaf = ".".join(parts[:-1]), parts[-1]
    if head in TOP_LEVEL:
        return f"{TOP_LEVEL[head]}.{leaf}"
    if parts[0] == "mid":
        layers = RESNET_LAYERS if parts[1].startswith("block") else ATTENTION_LAYERS
        return f"mid_block.{MID[parts[1]]}.{layers[parts[2]]}.{leaf}"
    level = int(parts[1])
    theirs = "down_blocks" if parts[0] == "down" else "up_blocks"
    index = level if parts[0] == "down" else num_levels - 1 - level
    if parts[2] in ("downsample", "upsample"):
        return f"{theirs}.{index}.{parts[2]}rs.0.conv.{leaf}"
    group, layers = ("resnets", RESNET_LAYERS) if parts[2] == "block" else ("attentions", ATTENTION_LAYERS)
    return f"{theirs}.{index}.{group}.{parts[3]}.{layers[parts[4]]}.{leaf}"


# ----------------------------------------------------------------------------------------------
# diffusers -> ours


def read_json(path, names=False):
    """A diffusers config (a JSON object), or with names=True a JSON list of class names."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"'{path}' cannot be read as JSON ({type(e).__name__})") from None
    if names and not (isinstance(d, list) and all(isinstance(n, str) for n in d)):
        raise ValueError(f"'{path}' must be a JSON list of class names")
    if not names and not isinstance(d, dict):
        raise ValueError(f"'{path}' is not a diffusers config (not a JSON object)")
    return d


def read_weights(unet_dir):
    """The UNet2DModel's state dict from .safetensors (preferred) or .bin."""
    found = [os.path.join(unet_dir, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(unet_dir, f))]
    if not found:
        raise ValueError(f"no {' or '.join(WEIGHT_FILES)} in '{unet_dir}'")
    path = found[0]
    with open(path, "rb") as f:
        head = f.read(len(LFS_POINTER))
    if head == LFS_POINTER:
        raise ValueError(f"'{path}' is a Git LFS pointer ({os.path.getsize(path)} bytes), not the "
                         "weights: the folder was cloned without git-lfs. Run 'git lfs install && "
                         "git lfs pull' inside it, or download it with 'huggingface-cli download "
                         "google/ddpm-cifar10-32 --local-dir DIR'")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a weights file
        raise ValueError(f"'{path}' cannot be read ({type(e).__name__}); it is corrupt or incomplete") from None


def from_diffusers(folder, out="ckpt.pt", overwrite=False):
    """Read a diffusers UNet2DModel folder and write our self-describing checkpoint."""
    files.check_output_path(out, checkpoints.CHECKPOINT_EXTENSIONS, "-o", overwrite=overwrite)
    unet_dir = os.path.join(folder, "unet") if os.path.isdir(os.path.join(folder, "unet")) else folder
    config_path = os.path.join(unet_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"no config.json in '{unet_dir}': not a diffusers UNet2DModel folder")
    names_path = os.path.join(folder, CLASS_NAMES_FILE)
    names = read_json(names_path, names=True) if os.path.isfile(names_path) else None
    model_cfg, learned = model_config(read_json(config_path), config_path, names)
    schedule = dict(var_type="fixed_large", clip_x0=True, T=1000, schedule="linear", prediction="eps")  # Ho et al.
    if learned:  # 2C outputs: eps and the variance's v (improved-diffusion's layout)
        schedule["var_type"] = "learned_range"
    for path in (os.path.join(folder, "scheduler", "scheduler_config.json"),
                 os.path.join(folder, "scheduler_config.json")):
        if os.path.isfile(path):
            schedule = schedule_config(read_json(path), path)
            if learned != (schedule["var_type"] == "learned_range"):
                raise ValueError(f"'{config_path}' has out_channels={2 if learned else 1} x in_channels "
                                 f"but '{path}' has variance_type {schedule['var_type']}: learned_range "
                                 "needs twice the input channels (eps and v), the fixed types as many")
            break
    cfg = ddpm.Config(preset="converted", **model_cfg, **schedule)
    ddpm.check_config(cfg)

    theirs = read_weights(unet_dir)
    model = ddpm.UNet(cfg)
    ours = model.state_dict()
    converted, unknown = {}, []
    for key, value in theirs.items():
        name = our_key(key, len(cfg.ch_mult))
        if name is None or name not in ours or value.numel() != ours[name].numel():
            unknown.append(key)
            continue
        converted[name] = value.reshape(ours[name].shape)  # attention Linear (C, C) -> 1x1 conv
    missing = sorted(set(ours) - set(converted))
    if unknown or missing:
        raise ValueError("the weights do not match Ho et al.'s U-Net: "
                         f"{len(unknown)} unknown ({', '.join(unknown[:5])}), "
                         f"{len(missing)} missing ({', '.join(missing[:5])})")
    model.load_state_dict(converted)
    try:
        checkpoints.save_checkpoint(out, checkpoints.checkpoint_state(cfg, model))
    except OSError as e:  # a full disk: the atomic write left nothing behind
        raise ValueError(f"cannot write '{out}' ({e.strerror or e})") from None
    messages.say(f"wrote {out}: {ddpm.count_params(model):,} parameters, {cfg.image_size}x{cfg.image_size}, "
          f"{cfg.schedule} schedule, {cfg.var_type}, clip_x0={cfg.clip_x0}")
    return cfg


# ----------------------------------------------------------------------------------------------
# ours -> diffusers


def to_diffusers(ckpt, out, ema=True, overwrite=False):
    """Write a DDPMPipeline folder (model_index.json, unet/, scheduler/) from our checkpoint."""
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not overwrite):
        raise ValueError(f"-o '{out}' exists and is not an empty folder; pick a new folder "
                         "(or pass --overwrite to replace the pipeline files in it)")
    if os.path.commonpath([os.path.realpath(out), os.path.realpath(ckpt)]) == os.path.realpath(out):
        raise ValueError(f"-o '{out}' holds the input '{ckpt}'; write the pipeline to another folder")
    model, cfg = ddpm.load_checkpoint(ckpt, ema=ema)
    pipeline, scheduler = ("DDIMPipeline", "DDIMScheduler") if cfg.distilled_steps else ("DDPMPipeline", "DDPMScheduler")
    from safetensors.torch import save_file
    num_levels = len(cfg.ch_mult)
    theirs = {}
    for key, value in model.state_dict().items():
        name = diffusers_key(key, num_levels)
        is_attention_linear = value.ndim == 4 and ".attentions." in name and name.endswith(".weight") \
            and "group_norm" not in name
        theirs[name] = (value[:, :, 0, 0] if is_attention_linear else value).contiguous()
    unet = {"_class_name": "UNet2DModel", **unet2d_config(cfg)}
    index = {"_class_name": pipeline, "scheduler": ["diffusers", scheduler], "unet": ["diffusers", "UNet2DModel"]}
    out = os.path.abspath(out)
    tmp = f"{out}.tmp{os.getpid()}"  # build beside it, then move into place
    try:
        os.makedirs(os.path.join(tmp, "unet"))
        os.makedirs(os.path.join(tmp, "scheduler"))
        files = [(os.path.join(tmp, "model_index.json"), index),
                 (os.path.join(tmp, "unet", "config.json"), unet),
                 (os.path.join(tmp, "scheduler", "scheduler_config.json"), scheduler_config(cfg))]
        if cfg.num_classes:
            files.append((os.path.join(tmp, CLASS_NAMES_FILE), list(cfg.class_names)))
        for path, d in files:
            with open(path, "w") as f:
                json.dump(d, f, indent=2)
        save_file(theirs, os.path.join(tmp, "unet", WEIGHT_FILES[0]))
        if not os.path.isdir(out):
            os.replace(tmp, out)
        else:  # --overwrite: only the files this converter writes are replaced; nothing else is touched
            written = [os.path.relpath(path, tmp) for path, _ in files] + [os.path.join("unet", WEIGHT_FILES[0])]
            for name in written:
                os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
                os.replace(os.path.join(tmp, name), os.path.join(out, name))
            if not cfg.num_classes and os.path.isfile(os.path.join(out, CLASS_NAMES_FILE)):
                os.remove(os.path.join(out, CLASS_NAMES_FILE))  # an earlier conditional model's
    except OSError as e:
        raise ValueError(f"cannot write '{out}' ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    messages.say(f"wrote {out}: {pipeline} folder ({ddpm.count_params(model):,} parameters, "
          f"{'EMA' if ema else 'raw'} weights, {cfg.schedule} schedule, {cfg.var_type})")
    if cfg.distilled_steps:
        messages.say(f"a distilled student: sample it with {pipeline}.from_pretrained(...)(num_inference_steps="
                     f"{cfg.distilled_steps}, eta=0.0" + (", use_clipped_model_output=True)" if cfg.clip_x0 else ")") + (f"; its guidance {cfg.distilled_guidance:g} is built into "
                     "the labelled branch: call the UNet with class_labels (docs/diffusers.md)" if cfg.num_classes else ""))
    return out


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        if args.from_diffusers:
            from_diffusers(args.from_diffusers, out=args.out or "ckpt.pt", overwrite=args.overwrite)
        else:
            out = args.out or os.path.splitext(args.to_diffusers)[0] + "-diffusers"
            to_diffusers(args.to_diffusers, out, ema=not args.no_ema, overwrite=args.overwrite)
    except (ValueError, files.WriteFailed) as e:  # a user's mistake, a full disk: one sentence
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted; nothing was written") from None


if __name__ == "__main__":
    sys.exit(main())
