"""Export a ddpm.py checkpoint's denoiser eps_theta(x_t, t) to one self-contained ONNX file.

  python export.py ckpt.pt                  # -> ddpm.onnx, EMA weights, float32
  python export.py ckpt.pt --fp16 -o ddpm_fp16.onnx
  python export.py ckpt.pt --int8 -o ddpm_int8.onnx   # int8 convolutions, for ORT's CPU provider

The contract (other runtimes are written against it):
  inputs   x_t  float32 (B, C, H, W), the noisy images, in [-1, 1] at t=0
           t    int64   (B,), the 0-indexed timestep (0 .. T-1; the paper's t=1 is 0)
  and, for a class-conditional model (ddpm.num_classes > 0):
           y    int64   (B,), the class, 0 .. num_classes - 1, or num_classes for "no label"
  output   eps  float32 (B, C, H, W), the predicted noise
  and, for a model with learned variances (ddpm.var_type learned_range):
  output   var_values float32 (B, C, H, W), the network's v of Nichol & Dhariwal eq. 15,
           log Sigma = (v + 1)/2 log beta_t + (1 - v)/2 log beta-tilde_t
  B is dynamic. Metadata (model.metadata_props, all strings) holds what a sampler needs:
  ddpm.format, ddpm.schedule, ddpm.T, ddpm.betas (JSON, float64), ddpm.image_size,
  ddpm.in_channels, ddpm.var_type, ddpm.clip_x0, ddpm.preset, ddpm.ema, ddpm.num_classes,
  ddpm.precision, and ddpm.step_graph: a base64 ONNX graph of the per-step update
  x_{t-1} = c1 pred_x0 + c2 x_t + c3 eps' + s noise, which sample_ort.py runs on the device
  (with learned variances s is per pixel, from var_values: see step_graph); it outputs x_prev
  and pred_x0 (format 2 on; format 1 files output x_prev alone). A conditional model
  also has ddpm.class_names (JSON) and ddpm.guided_step_graph: the same update preceded by
  classifier-free guidance over a batch whose halves are the conditional and the unconditional
  branch (see step_graph). ddpm.multistep_graph (and ddpm.guided_multistep_graph) is
  DPM-Solver++(2M)'s update, which takes the previous step's x_0 and returns this step's (see
  multistep_graph). The guided graphs also output eps_guided, the guided eps of the B images.

Before it reports success the file is checked: onnx.checker, then ONNX Runtime against
PyTorch on random inputs at batch 1 and 3; above the precision's tolerance nothing is written
and it exits non-zero. The output is written to a temp file and renamed into place, and it is
never the checkpoint itself.
"""

import argparse
import base64
import copy
import json
import logging
import os
import sys
import tempfile
import warnings

MIN_OPSET = 17
MAX_OPSET = 20  # the newest the TorchScript exporter (dynamo=False) of this torch writes


def parser():
    """export.py's flags."""
    p = argparse.ArgumentParser(description="Export a ddpm.py checkpoint to ONNX.")
    p.add_argument("ckpt", help="checkpoint written by ddpm.py train or convert.py")
    p.add_argument("-o", "--output", default="ddpm.onnx",
                   help="the .onnx file to write; never the checkpoint itself (default: ddpm.onnx)")
    p.add_argument("--fp16", action="store_true",
                   help="half precision inside, inputs and outputs float32 (default: float32)")
    p.add_argument("--int8", action="store_true",
                   help="int8 convolutions for ONNX Runtime's CPU provider (static quantization "
                        "calibrated on noised shapes), inputs and outputs float32 (default: float32)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA (default: EMA)")
    p.add_argument("--opset", type=int, default=MIN_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: {MIN_OPSET})")
    return p


if __name__ == "__main__":  # --help and a malformed flag are answered before torch loads (seconds)
    parser().parse_args()

import numpy as np
import onnx
import onnx.helper as oh
import torch
import torch.nn as nn

import data
import ddpm
import files
import messages
import schedules

FORMAT_VERSION = 2  # 2: the update graphs also output pred_x0 (and eps_guided where guided)
# max |ort - torch| / max |torch| allowed: float32 is exact up to kernel rounding; float16 is
# compared against the float32 PyTorch model, so it includes the half-precision loss itself;
# int8 too: measured 1.2e-2 and 1.4e-2 on tiny models trained 300 steps, 7.5e-2 to 9.4e-2 on
# untrained tiny and cifar10 models (see quantize_int8). 0.15 passes them and still refuses a
# file whose int8 kernels saturate (2.1e-1 and 2.4e-1 on untrained tiny without reduce_range).
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-2, "int8": 0.15}


class Float32(nn.Module):
    """Runs a module in float32 inside a float16 model (GroupNorm statistics lose bits in fp16)."""

    def __init__(self, module):
        super().__init__()
        self.module = module.float()

    def forward(self, x):
        return self.module(x.float()).to(x.dtype)


class Denoiser(nn.Module):
    """The exported function eps(x_t, t): float32 in and out, whatever precision runs inside; a
    network that predicts v or x_0 has its output converted to eps in the graph (with alpha-bar
    indexed by t: ddpm.GaussianDiffusion.eps_from_output), so the contract is the same for every
    model."""

    def __init__(self, unet, dtype, cfg):
        super().__init__()
        self.unet, self.dtype = unet, dtype
        self.diffusion = ddpm.GaussianDiffusion.from_config(cfg)

    def forward(self, x_t, t, y=None):
        out, var_values = ddpm.split_output(self.unet(x_t.to(self.dtype), t, y).float(), x_t.shape[1])
        eps = self.diffusion.eps_from_output(x_t, t, out)
        return eps if var_values is None else (eps, var_values)


def half_precision(unet):
    """A float16 copy of the U-Net with every GroupNorm kept in float32 (measured: see docs/onnx.md)."""
    unet = unet.half()
    for module in list(unet.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, Float32(child))
    return unet


def output_names(cfg):
    return ["eps", "var_values"] if cfg.var_type == "learned_range" else ["eps"]


def input_names(cfg):
    return ["x_t", "t", "y"] if cfg.num_classes else ["x_t", "t"]


def guidance_and_x0(nodes, inits, inputs, opset, clip_x0, guided, learned=False):
    """The part of every update graph before its own formula, added to nodes, inits and inputs:
    with guided, classifier-free guidance over a batch of 2B rows whose halves are the
    conditional and the unconditional branch (one more input guidance (1,) = [s]; eps_guided =
    eps_u + s (eps_c - eps_u), Ho & Salimans eq. 6, an output), then
      pred_x0 = a x_t - b eps            (eq. 15 solved for x_0; a = 1/sqrt(abar), b = sqrt(1/abar - 1))
      pred_x0 = clip(pred_x0, -1, 1)     (if the model says so), an output.
    Needs the scalars a and b from the coef split. Returns the names of (x_t, eps, var_values) of
    the B images the update works on: the conditional half where guided."""
    x, eps, var = "x_t", "eps", "var_values"
    if guided:
        inputs.append(oh.make_tensor_value_info("guidance", onnx.TensorProto.FLOAT, [1]))
        halves = {"num_outputs": 2} if opset >= 18 else {}  # equal halves of the batch
        for name in ("x_t", "eps") + (("var_values",) if learned else ()):
            nodes.append(oh.make_node("Split", [name], [name + "_c", name + "_u"], axis=0, **halves))
        nodes += [oh.make_node("Sub", ["eps_c", "eps_u"], ["eps_diff"]),
                  oh.make_node("Mul", ["guidance", "eps_diff"], ["eps_push"]),
                  oh.make_node("Add", ["eps_u", "eps_push"], ["eps_guided"])]
        x, eps, var = "x_t_c", "eps_guided", "var_values_c"
    nodes += [oh.make_node("Mul", ["a", x], ["a_x"]),
              oh.make_node("Mul", ["b", eps], ["b_eps"]),
              oh.make_node("Sub", ["a_x", "b_eps"], ["pred_x0_raw" if clip_x0 else "pred_x0"])]
    if clip_x0:
        inits += [oh.make_tensor(name, onnx.TensorProto.FLOAT, [], [value]) for name, value in (("lo", -1.0), ("hi", 1.0))]
        nodes.append(oh.make_node("Clip", ["pred_x0_raw", "lo", "hi"], ["pred_x0"]))
    return x, eps, var


def update_model(name, nodes, inputs, inits, opset, ir_version, guided):
    """The graph's outputs: x_prev (the B updated images; where guided twice, so the next denoiser
    call sees both branches again), pred_x0 (B) and, where guided, eps_guided (B); checked."""
    image, batch = ["B", "C", "H", "W"], ["N", "C", "H", "W"] if guided else ["B", "C", "H", "W"]
    if guided:  # both halves again; this last node reads only intermediates (in-place safe)
        nodes.append(oh.make_node("Concat", ["x_updated", "x_updated"], ["x_prev"], axis=0))
    outputs = [oh.make_tensor_value_info("x_prev", onnx.TensorProto.FLOAT, batch),
               oh.make_tensor_value_info("pred_x0", onnx.TensorProto.FLOAT, image)]
    if guided:
        outputs.append(oh.make_tensor_value_info("eps_guided", onnx.TensorProto.FLOAT, image))
    graph = oh.make_graph(nodes, name, inputs, outputs, inits)
    # the denoiser's IR version: the onnx package's newest can be ahead of ONNX Runtime's
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def step_graph(clip_x0, opset, ir_version, learned=False, guided=False):
    """The per-step update of DDPM and DDIM as a tiny ONNX graph, so it runs where the images are
    (GPU or CPU).

    inputs x_t, eps, noise (B, C, H, W) float32 and coef (6,) = [a, b, c1, c2, c3, s]; pred_x0 as
    in guidance_and_x0, then
      eps'    = (a x_t - pred_x0) / b    (the eps consistent with a clipped x_0; eps if no clipping)
      x_prev  = c1 pred_x0 + c2 x_t + c3 eps' + s noise
    DDPM: c1, c2 = the posterior mean coefficients (eq. 7), c3 = 0, s = sigma_t (0 at t=0).
    DDIM: c1 = sqrt(abar_prev), c2 = 0, c3 = sqrt(1 - abar_prev - sigma^2), s = sigma.
    learned: one more input var_values (B, C, H, W) and coef (9,) = [..., s, g, log_lo, log_hi]
    with the noise's scale per pixel s + g exp(1/2 (log_lo + (v + 1)/2 (log_hi - log_lo))): DDPM
    s = 0, g = 1 (0 at t=0), log_lo = log beta-tilde_t (clipped), log_hi = log beta_t; DDIM g = 0.
    guided: x_t, eps and var_values have 2B rows (see guidance_and_x0), the variance from the
    conditional half, noise (B, C, H, W). Outputs: see update_model. schedules.step_table writes coef.
    """
    image = ["B", "C", "H", "W"]
    batch = ["N", "C", "H", "W"] if guided else image  # N = 2B: both branches
    names = ("x_t", "eps", "noise", "var_values") if learned else ("x_t", "eps", "noise")
    inputs = [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, image if n == "noise" else batch)
              for n in names]
    n_coef = 9 if learned else 6
    inputs.append(oh.make_tensor_value_info("coef", onnx.TensorProto.FLOAT, [n_coef]))
    coef_names = ["a", "b", "c1", "c2", "c3", "s"] + (["g", "log_lo", "log_hi"] if learned else [])
    nodes = [oh.make_node("Split", ["coef", "split"], coef_names, axis=0)]
    inits = [oh.make_tensor("split", onnx.TensorProto.INT64, [n_coef], [1] * n_coef)]
    x, eps, var = guidance_and_x0(nodes, inits, inputs, opset, clip_x0, guided, learned)
    if clip_x0:
        nodes += [oh.make_node("Sub", ["a_x", "pred_x0"], ["a_x_minus_x0"]),
                  oh.make_node("Div", ["a_x_minus_x0", "b"], ["eps_used"])]
    else:
        nodes.append(oh.make_node("Identity", [eps], ["eps_used"]))
    scale = "s"  # the noise's scale: a number, or per pixel with learned variances
    if learned:  # scale = s + g exp(0.5 (log_lo + (v + 1) / 2 (log_hi - log_lo)))
        inits += [oh.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0]),
                  oh.make_tensor("half", onnx.TensorProto.FLOAT, [], [0.5])]
        nodes += [oh.make_node("Add", [var, "one"], ["v1"]),
                  oh.make_node("Mul", ["v1", "half"], ["frac"]),
                  oh.make_node("Sub", ["log_hi", "log_lo"], ["log_span"]),
                  oh.make_node("Mul", ["frac", "log_span"], ["log_up"]),
                  oh.make_node("Add", ["log_lo", "log_up"], ["log_var"]),
                  oh.make_node("Mul", ["log_var", "half"], ["log_std"]),
                  oh.make_node("Exp", ["log_std"], ["std"]),
                  oh.make_node("Mul", ["g", "std"], ["g_std"]),
                  oh.make_node("Add", ["s", "g_std"], ["scale"])]
        scale = "scale"
    nodes += [
        oh.make_node("Mul", ["c1", "pred_x0"], ["t1"]),
        oh.make_node("Mul", ["c2", x], ["t2"]),
        oh.make_node("Mul", ["c3", "eps_used"], ["t3"]),
        oh.make_node("Mul", [scale, "noise"], ["t4"]),
        oh.make_node("Add", ["t1", "t2"], ["mean12"]),
        oh.make_node("Add", ["mean12", "t3"], ["mean"]),
        oh.make_node("Add", ["mean", "t4"], ["x_updated" if guided else "x_prev"]),
    ]
    return update_model("ddpm_step", nodes, inputs, inits, opset, ir_version, guided)


def multistep_graph(clip_x0, opset, ir_version, guided=False):
    """DPM-Solver++(2M)'s update (see ddpm.GaussianDiffusion.dpm_solver_step) as a tiny ONNX graph
    that carries the previous step's x_0 as state.

    inputs x_t, eps (B, C, H, W) float32, prev_x0 (B, C, H, W), the previous step's pred_x0
    (anything at the first step), and coef (5,) = [a, b, c1, c2, c4]; pred_x0 as in
    guidance_and_x0, then
      x_prev  = c1 pred_x0 + c2 x_t + c4 prev_x0
    with c2 = sigma_{t-1} / sigma_t, c1 = w (1 + r), c4 = -w r (r = h_t / (2 h_{t+1}), 0 at the first
    and the last step). pred_x0, an output, is the next step's prev_x0. guided: x_t and eps have
    2B rows; prev_x0 has B. Outputs: see update_model.
    """
    image = ["B", "C", "H", "W"]
    batch = ["N", "C", "H", "W"] if guided else image
    inputs = [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, batch) for n in ("x_t", "eps")]
    inputs += [oh.make_tensor_value_info("prev_x0", onnx.TensorProto.FLOAT, image),
               oh.make_tensor_value_info("coef", onnx.TensorProto.FLOAT, [5])]
    nodes = [oh.make_node("Split", ["coef", "split"], ["a", "b", "c1", "c2", "c4"], axis=0)]
    inits = [oh.make_tensor("split", onnx.TensorProto.INT64, [5], [1] * 5)]
    x, _, _ = guidance_and_x0(nodes, inits, inputs, opset, clip_x0, guided)
    nodes += [oh.make_node("Mul", ["c1", "pred_x0"], ["t1"]),
              oh.make_node("Mul", ["c2", x], ["c2_x"]),
              oh.make_node("Mul", ["c4", "prev_x0"], ["t4"]),
              oh.make_node("Add", ["t1", "c2_x"], ["t12"]),
              oh.make_node("Add", ["t12", "t4"], ["x_updated" if guided else "x_prev"])]  # last: reads only intermediates
    return update_model("ddpm_multistep", nodes, inputs, inits, opset, ir_version, guided)


def metadata(cfg, ema, precision, opset, ir_version):
    betas = schedules.get_betas(cfg.schedule, cfg.T)
    learned = cfg.var_type == "learned_range"

    def graph(guided, multistep=False):
        model = (multistep_graph(cfg.clip_x0, opset, ir_version, guided) if multistep else
                 step_graph(cfg.clip_x0, opset, ir_version, learned, guided))
        return base64.b64encode(model.SerializeToString()).decode()
    conditional = {"ddpm.class_names": json.dumps(list(cfg.class_names)),
                   "ddpm.guided_step_graph": graph(True),
                   "ddpm.guided_multistep_graph": graph(True, True)} if cfg.num_classes else {}
    return {
        "ddpm.format": str(FORMAT_VERSION),
        "ddpm.schedule": cfg.schedule,
        "ddpm.T": str(cfg.T),
        "ddpm.betas": json.dumps(betas.tolist()),  # repr of float64 round-trips exactly
        "ddpm.image_size": str(cfg.image_size),
        "ddpm.in_channels": str(cfg.in_channels),
        "ddpm.var_type": cfg.var_type,
        "ddpm.clip_x0": "true" if cfg.clip_x0 else "false",
        "ddpm.preset": cfg.preset,
        "ddpm.ema": "true" if ema else "false",
        "ddpm.num_classes": str(cfg.num_classes),  # 0: unconditional
        "ddpm.network_prediction": cfg.prediction,  # what the U-Net predicts; the graph outputs eps
        "ddpm.precision": precision,
        "ddpm.step_graph": graph(False),
        "ddpm.multistep_graph": graph(False, True),  # --sampler dpm++; files without it refuse dpm++
        "ddpm.distilled_steps": str(cfg.distilled_steps),  # a student's DDIM steps (distill.py); 0: none
        "ddpm.distilled_guidance": repr(float(cfg.distilled_guidance)),  # the guidance built into it
        **conditional,
    }


def compare_with_torch(path, model, cfg, batches=(1, 3), seed=0):
    """Max abs and relative error of ONNX Runtime (CPU) against the float32 PyTorch model."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    results = []
    for b in batches:
        x_t = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
        t = torch.randint(0, cfg.T, (b,), generator=g)
        inputs = (x_t, t)
        if cfg.num_classes:  # every class and "no label" turn up across the batches
            inputs += (torch.randint(0, cfg.num_classes + 1, (b,), generator=g),)
        with torch.no_grad():
            expected = model(*inputs)
        expected = np.concatenate([e.numpy() for e in (expected if isinstance(expected, tuple) else [expected])], 1)
        feed = {name: value.numpy() for name, value in zip(input_names(cfg), inputs)}
        got = np.concatenate(session.run(output_names(cfg), feed), 1)
        abs_err = float(np.abs(got - expected).max())
        results.append((b, abs_err, abs_err / float(np.abs(expected).max())))
    return results


# -- int8 ---------------------------------------------------------------------------------------
# Static quantization (QDQ) with onnxruntime.quantization, chosen by measurement on a 2-core AMD
# EPYC (Zen 3: AVX2, no VNNI), ONNX Runtime 1.31.1. Errors are compare_with_torch's (random x_t,
# batch 1 and 3), then in brackets on x_t ~ q(x_t | x_0) of shapes at 32 evenly spread t; timings
# at batch 8 on a shared, busy CPU (medians; only the order is trustworthy):
# - what --int8 writes, every Conv but the first and the last, per-channel weights, reduce_range:
#   tiny trained 300 steps 1.2e-2 (2.1e-1) at 16x16 and 1.4e-2 (2.9e-1) at 32x32, conditional;
#   untrained tiny 7.5e-2 and 9.4e-2, untrained cifar10 8.3e-2 (6.0e-2). Against float32 in
#   ONNX Runtime: cifar10 1.6x faster (1.72 s against 2.76 s), tiny at 32x32 1.2x (201 against
#   250 ms), tiny at 16x16 no faster (its convolutions are too small to pay for the QDQ steps).
#   The bracketed errors come from small t (32x32 tiny: 2.2e-1 at t < 20, 2.6e-2 at t >= 100),
#   where x_t is almost clean and the noise the network has to find (std 0.01 to 0.05) is under
#   the 8-bit step of its activations. From the same noise, the 32x32 tiny's images end 0.7/255
#   from float32's on average after 100 DDPM steps (max 4/255), 1.0/255 after 50 DDIM (max 11).
# - the same without reduce_range: 2.3e-2 (tiny trained) and 2.1e-1 (untrained tiny), 1.3e-1
#   (cifar10), against 1.1e-2, 8.1e-2 and 6.5e-2 for the same files run with ONNX Runtime's
#   graph optimizations off (dequantize, then a float Conv): the u8s8 kernels of a CPU without
#   VNNI add two products in 16 bits (vpmaddubsw) and saturate; 7-bit weights cannot.
# - the first and the last Conv quantized too: 2.1e-2 and 2.5e-2 (2.8e-1 and 4.9e-1), trained tiny.
# - every op the quantizer knows (Add, Mul, MatMul, ...), tried without reduce_range: 1.1e-1
#   (3.0e-1) on the trained tiny, and slower than float32.
# - the whole full-resolution level kept in float32 as well: 3.3e-3 (2.9e-2) on the trained
#   tiny, 3.6e-2 (4.2e-2) on cifar10, but cifar10 only 1.2x faster: most of the FLOPs are there.
# - dynamic quantization (quantize_dynamic, the Conv weights; activations' ranges per call):
#   1.0e-2 (1.6e-1) tiny, 4.1e-2 (5.8e-2) cifar10, but 1.4x to 1.9x slower than float32 (its
#   ConvInteger has no fused kernel). So static, which is the point of int8: speed.
# quant_pre_process is not used: its symbolic shape inference fails on this graph.

CALIBRATION_SAMPLES = 64


def cpu_has_vnni():
    """Whether /proc/cpuinfo lists an 8-bit dot product (AVX-512 VNNI, AVX-VNNI or AMX-INT8).
    Without one, ONNX Runtime's u8 x s8 kernels add pairs of products in 16 bits, which can
    saturate; 7-bit weights (reduce_range) keep the pair in range."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def calibration_inputs(cfg, n=CALIBRATION_SAMPLES, batch=8, seed=0):
    """The feeds int8's activation ranges are measured on: x_t ~ q(x_t | x_0) (eq. 4) at n
    timesteps spread evenly over 0 .. T-1 and, for a conditional model, y cycling through every
    class and "no label" (num_classes). x_0 are the built-in shapes at the model's size and
    channels, whatever the model was trained on: the checkpoint does not carry its data, and
    cifar10 or an image folder may not be where one exports. Shapes fill [-1, 1] with flat areas
    and sharp edges, and from t of a few hundred on the noise sets x_t's range anyway. Random
    N(0, 1) x_t would miss the small-t inputs, which are almost clean images."""
    x0 = data.ShapesDataset(n=n, size=cfg.image_size, channels=cfg.in_channels, seed=seed).images  # (n, C, H, W)
    t = torch.from_numpy(np.linspace(0, cfg.T - 1, n).round().astype(np.int64))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x_t = ddpm.GaussianDiffusion.from_config(cfg).q_sample(x0, t, noise)
    y = torch.arange(n) % (cfg.num_classes + 1)
    feeds = []
    for first in range(0, n, batch):
        inputs = (x_t[first:first + batch], t[first:first + batch], y[first:first + batch])
        feeds.append({name: value.numpy() for name, value in zip(input_names(cfg), inputs)})
    return feeds


def quantize_int8(fp32_path, cfg):
    """The float32 ONNX file at fp32_path with its convolutions in int8 (QDQ), as a ModelProto:
    weights per output channel (int8), activations uint8 with ranges from calibration_inputs.
    The first and the last Conv stay float32: the first reads x_t, whose noise at small t is
    under the 8-bit step, and the last writes eps. What was measured: see the comment above."""
    from onnxruntime import quantization as oq  # part of onnxruntime: no other package

    vnni = cpu_has_vnni()
    messages.say("int8: this CPU has " + ("VNNI: 8-bit weights" if vnni else
          "no VNNI: 7-bit weights (reduce_range), so ONNX Runtime's u8s8 kernels cannot saturate"))
    convs = [node.name for node in onnx.load(fp32_path).graph.node if node.op_type == "Conv"]
    assert all(convs), "the exporter names every node"
    feeds = iter(calibration_inputs(cfg))

    class Calibration(oq.CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    with tempfile.TemporaryDirectory() as folder:  # the quantizer's files too; removed on failure
        path = os.path.join(folder, "int8.onnx")
        logging.disable(logging.WARNING)  # its advice to run quant_pre_process (see above)
        try:
            oq.quantize_static(fp32_path, path, Calibration(), quant_format=oq.QuantFormat.QDQ,
                               op_types_to_quantize=["Conv"], nodes_to_exclude=convs[:1] + convs[-1:],
                               per_channel=True, reduce_range=not vnni,
                               activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load(path)


def export_module(denoiser, cfg, out, reference, precision="fp32", ema=True, opset=MIN_OPSET, check=True):
    """Trace denoiser(x_t, t[, y]) -> eps (float32 in and out) to `out` with the ddpm.* metadata,
    check it against `reference` (the float32 PyTorch model), and only then move it into place.
    Returns [(batch, max abs error, relative error)] of the check."""
    x_t = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([0, cfg.T - 1])
    example = (x_t, t, torch.tensor([0, cfg.num_classes])) if cfg.num_classes else (x_t, t)

    def write(tmp):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                names = output_names(cfg) + input_names(cfg)
                torch.onnx.export(denoiser, example, tmp, input_names=input_names(cfg),
                                  output_names=output_names(cfg),
                                  dynamic_axes={name: {0: "batch"} for name in names},
                                  opset_version=opset, dynamo=False)
        except OSError:
            raise
        except Exception as e:  # the exporter's own errors have many types
            raise ValueError(f"torch could not export the model at opset {opset} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        proto = quantize_int8(tmp, cfg) if precision == "int8" else onnx.load(tmp)  # tmp: float32
        for key, value in metadata(cfg, ema, precision, opset, proto.ir_version).items():
            proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)  # one file: weights inline (the largest preset is far below 2 GB)
        results[:] = compare_with_torch(tmp, reference, cfg) if check else []
        for b, abs_err, rel_err in results:
            messages.say(f"check: ONNX Runtime vs PyTorch (float32), batch {b}: max abs error {abs_err:.2e}, "
                  f"relative {rel_err:.2e} (tolerance {TOLERANCE[precision]:.1e})")
        if any(not rel <= TOLERANCE[precision] for _, _, rel in results):
            raise ValueError(f"the exported model disagrees with PyTorch beyond the {precision} "
                             f"tolerance; '{out}' was not written")

    results = []
    try:
        files.write_atomically(out, write)
    except OSError as e:
        raise ValueError(f"cannot write '{out}' ({e.strerror or e}); nothing was written") from None
    return results


def export(ckpt, out="ddpm.onnx", fp16=False, ema=True, opset=MIN_OPSET, check=True, int8=False):
    """Write the ONNX file of a checkpoint's denoiser; returns the check's [(batch, abs, rel)]."""
    if fp16 and int8:
        raise ValueError("--fp16 and --int8 are two precisions for one file; choose one")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset {opset}: this torch exports opsets {MIN_OPSET} to {MAX_OPSET}")
    files.check_output_path(out, (".onnx",), "-o", inputs=(ckpt,))
    model, cfg = ddpm.load_checkpoint(ckpt, ema=ema)
    precision = "fp16" if fp16 else "int8" if int8 else "fp32"  # int8: quantized from the float32 graph
    unet = half_precision(copy.deepcopy(model)) if fp16 else model
    denoiser = Denoiser(unet, torch.float16 if fp16 else torch.float32, cfg).eval()
    reference = Denoiser(model, torch.float32, cfg).eval()
    results = export_module(denoiser, cfg, out, reference, precision, ema, opset, check)
    size_mb = os.path.getsize(out) / 2 ** 20
    messages.say(f"wrote {out} ({size_mb:.1f} MB, {precision}, {'EMA' if ema else 'raw'} weights, "
          f"preset {cfg.preset}, opset {opset})")
    return results


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        export(args.ckpt, out=args.output, fp16=args.fp16, ema=not args.no_ema, opset=args.opset, int8=args.int8)
    except (ValueError, files.WriteFailed) as e:  # a user's mistake, a full disk: one sentence
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted; nothing was written") from None


if __name__ == "__main__":
    sys.exit(main())
