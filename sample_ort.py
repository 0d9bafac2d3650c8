"""Sample from an exported DDPM with ONNX Runtime: numpy, onnxruntime and Pillow, no torch.

  python sample_ort.py --n 64                       # 1000 ancestral steps from ddpm.onnx
  python sample_ort.py --n 64 --sampler ddim --steps 50
  python sample_ort.py --n 64 --sampler dpm++ --steps 20 --spacing trailing
  python sample_ort.py --provider cuda --cuda-graph --batch 64
  python sample_ort.py --class all --guidance 3     # a conditional model: a row per class

The reverse process (Ho et al. Algorithm 2, DDIM, Song et al. eq. 12, or DPM-Solver++(2M), Lu
et al. 2022) runs as ONNX Runtime sessions that share device buffers through IO binding: the
denoiser eps_theta(x_t, t) from ddpm.onnx, and the per-step update stored in the file's
metadata (ddpm.step_graph, or ddpm.multistep_graph for DPM-Solver++, which carries the previous
x_0), whose output is bound to the denoiser's x_t input; the noise is drawn on the device by a
third, one-node session. On CUDA the image batch therefore never leaves the GPU; per step only
t and the coefficients travel to it. The schedule is rebuilt from the betas in the metadata
with the same float64 math as ddpm.py.
"""

import argparse
import base64
import binascii
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw

SUPPORTED_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# The schedule: the float64 arithmetic of ddpm.GaussianDiffusion, repeated here without torch
# (tests/test_onnx.py checks that both give the same numbers).


SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddpm", "ddim", "dpm++")


def default_spacing(sampler):
    """trailing for DPM-Solver++, leading otherwise (as ddpm.default_spacing)."""
    return "trailing" if sampler == "dpm++" else "leading"


def ddim_timesteps(T, steps, spacing="leading"):
    """The t's a shorter chain keeps (as ddpm.ddim_timesteps): leading, trailing or linspace."""
    if not 1 <= steps <= T:
        raise ValueError(f"--steps must be between 1 and T={T}, got {steps}")
    if spacing == "leading":
        return np.arange(steps) * (T // steps)
    if spacing == "trailing":
        return np.sort(np.round(np.arange(T, 0, -T / steps)).astype(int) - 1)
    if spacing == "linspace":
        return np.unique(np.linspace(0, T - 1, steps).round().astype(int))
    raise ValueError(f"unknown --spacing '{spacing}'; use {', '.join(SPACINGS)}")


def check_sampler(sampler, steps, eta, T):
    """ValueError with a sentence for settings that would give no or wrong images (as ddpm.py)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; use {', '.join(SAMPLERS)}")
    if steps is not None and not 1 <= steps <= T:
        raise ValueError(f"--steps must be between 1 and T={T}, got {steps}")
    if not 0 <= eta <= 1:  # also refuses nan
        raise ValueError(f"--eta must be between 0 (deterministic DDIM) and 1, got {eta}")
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"--eta sets DDIM's noise; --sampler {sampler} has none to set. Use "
                         "--sampler ddim, or leave --eta out")


def step_table(betas, sampler="ddpm", steps=None, eta=0.0, var_type="fixed_large", spacing=None):
    """(timesteps, coefs) in sampling order: the network's t and the step graph's
    [a, b, c1, c2, c3, s] for each step (learned_range: and [g, log_lo, log_hi], see export.py's
    step_graph), or for dpm++ the multistep graph's [a, b, c1, c2, c4] (export.py's
    multistep_graph), computed in float64 and handed over as float32."""
    betas = np.asarray(betas, dtype=np.float64)
    T = len(betas)
    check_sampler(sampler, steps, eta, T)
    steps = steps or T
    spacing = spacing or default_spacing(sampler)
    timesteps = np.arange(T)
    if not (sampler == "ddpm" and steps == T):  # respace: betas from the kept alpha-bars
        timesteps = ddim_timesteps(T, steps, spacing)
        abar_kept = np.cumprod(1.0 - betas)[timesteps]
        betas = 1.0 - abar_kept / np.append(1.0, abar_kept[:-1])
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    a = np.sqrt(1.0 / abar)
    b = np.sqrt(1.0 / abar - 1)
    if sampler == "dpm++":  # DPM-Solver++(2M), as ddpm.GaussianDiffusion.dpm_solver_step
        sigma_ratio = np.sqrt((1.0 - abar_prev) / (1.0 - abar))
        w = np.sqrt(abar_prev) - sigma_ratio * np.sqrt(abar)
        lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # log(alpha / sigma)
        h = lam[:-1] - lam[1:]
        r = np.zeros_like(betas)  # first order at the first and the last step
        r[1:-1] = h[:-1] / (2 * h[1:])
        coefs = np.stack([a, b, w * (1 + r), sigma_ratio, -w * r], axis=1).astype(np.float32)
        return timesteps[::-1].copy(), coefs[::-1].copy()
    if sampler == "ddpm":
        c1 = betas * np.sqrt(abar_prev) / (1.0 - abar)  # eq. 7
        c2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
        c3 = np.zeros_like(betas)
        variance = betas if var_type == "fixed_large" else betas * (1.0 - abar_prev) / (1.0 - abar)
        s = np.sqrt(variance) if var_type != "learned_range" else np.zeros_like(betas)
        s[0] = 0.0  # no noise on the last step (t = 0)
    else:
        sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        c1, c2 = np.sqrt(abar_prev), np.zeros_like(betas)
        c3 = np.sqrt(1 - abar_prev - sigma ** 2)
        s = sigma
    columns = [a, b, c1, c2, c3, s]
    if var_type == "learned_range":  # the network's v picks the log-variance between these two
        posterior = betas * (1.0 - abar_prev) / (1.0 - abar)
        first = posterior[1] if len(betas) > 1 else betas[0]  # beta-tilde_0 = 0: the bound's clip
        g = np.zeros_like(betas)  # DDIM: eta's sigma in s, no learned one
        if sampler == "ddpm":
            g[1:] = 1.0  # the learned sigma on every step but the last (t = 0)
        columns += [g, np.log(np.append(first, posterior[1:])), np.log(betas)]
    coefs = np.stack(columns, axis=1).astype(np.float32)
    return timesteps[::-1].copy(), coefs[::-1].copy()


# ----------------------------------------------------------------------------------------------
# Loading


VAR_TYPES = ("fixed_large", "fixed_small", "learned_range")
REQUIRED = ("ddpm.format", "ddpm.betas", "ddpm.image_size", "ddpm.in_channels", "ddpm.var_type",
            "ddpm.clip_x0", "ddpm.precision", "ddpm.step_graph")
# optional: files exported before DPM-Solver++ lack these, and refuse --sampler dpm++ alone
MULTISTEP = ("ddpm.multistep_graph", "ddpm.guided_multistep_graph")


def read_metadata(session, path):
    """The sampler's settings from the model's ddpm.* metadata, every value checked: a file
    whose metadata is missing, partial or altered is a ValueError naming what is wrong."""
    meta = session.get_modelmeta().custom_metadata_map
    if not any(key.startswith("ddpm.") for key in meta):
        raise ValueError(f"'{path}' is an ONNX model but not one written by export.py (no ddpm.* "
                         "metadata); export a checkpoint with 'python export.py ckpt.pt'")
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise ValueError(f"'{path}' lacks the metadata {', '.join(missing)}; it was altered or "
                         "written by another program. Export it again with export.py")
    problem = f"'{path}' has altered ddpm.* metadata; export it again with export.py"
    try:
        fmt = int(meta["ddpm.format"])
        betas = np.array(json.loads(meta["ddpm.betas"]), dtype=np.float64)
        image_size, in_channels = int(meta["ddpm.image_size"]), int(meta["ddpm.in_channels"])
        step_graph = base64.b64decode(meta["ddpm.step_graph"], validate=True)
        T = int(meta.get("ddpm.T", len(betas)))
    except (ValueError, TypeError, binascii.Error) as e:
        raise ValueError(f"{problem} ({type(e).__name__}: {str(e)[:100]})") from None
    if fmt > SUPPORTED_FORMAT:
        raise ValueError(f"'{path}' has metadata format {fmt}; this sample_ort.py reads up to "
                         f"{SUPPORTED_FORMAT}. Update sample_ort.py")
    wrong = []
    if betas.ndim != 1 or len(betas) < 2 or not np.all((betas > 0) & (betas <= 1)):
        wrong.append("ddpm.betas must be a list of at least 2 numbers in (0, 1]")
    elif T != len(betas):
        wrong.append(f"ddpm.T is {T} but ddpm.betas has {len(betas)} values")
    if image_size < 1 or in_channels not in (1, 3):
        wrong.append(f"ddpm.image_size {image_size} / ddpm.in_channels {in_channels}")
    if meta["ddpm.var_type"] not in VAR_TYPES:
        wrong.append(f"ddpm.var_type '{meta['ddpm.var_type']}' is not one of {', '.join(VAR_TYPES)}")
    if meta["ddpm.clip_x0"] not in ("true", "false"):
        wrong.append(f"ddpm.clip_x0 '{meta['ddpm.clip_x0']}' is not true or false")
    try:
        num_classes = int(meta.get("ddpm.num_classes", "0"))
        class_names = json.loads(meta.get("ddpm.class_names", "[]"))
        guided_graph = base64.b64decode(meta.get("ddpm.guided_step_graph", ""), validate=True)
        multistep = [base64.b64decode(meta.get(key, ""), validate=True) for key in MULTISTEP]
    except (ValueError, TypeError, binascii.Error) as e:
        raise ValueError(f"{problem} ({type(e).__name__}: {str(e)[:100]})") from None
    if num_classes and (not isinstance(class_names, list) or len(class_names) != num_classes
                        or not guided_graph):
        wrong.append(f"ddpm.num_classes {num_classes} needs as many ddpm.class_names and a "
                     "ddpm.guided_step_graph")
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = ["eps", "var_values"] if meta["ddpm.var_type"] == "learned_range" else ["eps"]
    expected = {"x_t", "t", "y"} if num_classes else {"x_t", "t"}
    if set(inputs) != expected or [o.name for o in session.get_outputs()] != outputs:
        wrong.append(f"the inputs are {sorted(inputs)} (expected {', '.join(sorted(expected))}) and "
                     f"the outputs {[o.name for o in session.get_outputs()]} (expected {', '.join(outputs)})")
    else:
        dims = inputs["x_t"].shape[1:]
        if len(dims) != 3 or any(isinstance(d, int) and d != want for d, want in
                                 zip(dims, (in_channels, image_size, image_size))):
            wrong.append(f"x_t has shape {inputs['x_t'].shape}, the metadata says "
                         f"(B, {in_channels}, {image_size}, {image_size})")
    if wrong:
        raise ValueError(f"{problem}: " + "; ".join(wrong))
    return {"betas": betas, "image_size": image_size, "in_channels": in_channels,
            "var_type": meta["ddpm.var_type"], "clip_x0": meta["ddpm.clip_x0"] == "true",
            "precision": meta["ddpm.precision"], "preset": meta.get("ddpm.preset", "?"),
            "step_graph": step_graph, "num_classes": num_classes,
            "class_names": [str(c) for c in class_names], "guided_step_graph": guided_graph,
            "multistep_graph": multistep[0], "guided_multistep_graph": multistep[1]}


def session_options(batch=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = physical_cores()
    so.log_severity_level = 3
    if batch is not None:  # a static batch lets shape computations fold away (CUDA graphs need it)
        so.add_free_dimension_override_by_name("batch", batch)
        so.add_free_dimension_override_by_name("B", batch)
    return so


def physical_cores():
    """Cores, not hyper-threads (ORT's CPU kernels gain nothing from the second thread of a
    core), and no more than this process may use."""
    cores, physical_id = set(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    physical_id = value.strip()
                elif key.strip() == "core id":
                    cores.add((physical_id, value.strip()))
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(len(cores), usable) if cores else usable


def open_sessions(path, provider="auto", cuda_graph=False, batch=None, guided=False, multistep=False):
    """(denoiser session, step session, metadata, device) with a clear error for bad input.
    guided: the step session is the classifier-free guidance update (a conditional model);
    multistep: it is DPM-Solver++'s update, which carries the previous x_0."""
    if not os.path.isfile(path):
        raise ValueError(f"model file '{path}' does not exist (make one with 'python export.py "
                         "ckpt.pt', or pass --model PATH)")
    cuda_ok = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not cuda_ok:
        raise ValueError("--provider cuda was asked for, but this onnxruntime has no CUDA provider "
                         "(install onnxruntime-gpu)")
    want_cuda = provider in ("auto", "cuda") and cuda_ok
    if want_cuda:
        cuda_options = {"enable_cuda_graph": "1"} if cuda_graph else {}
        providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    if want_cuda and hasattr(ort, "preload_dlls"):
        # torch is not imported here, so load CUDA and cuDNN from pip's nvidia-* packages (the
        # onnxruntime-gpu[cuda,cudnn] extras); where they are missing the probe below says so
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ort.preload_dlls()
    ort.set_default_logger_severity(4)  # the CUDA probe's own log is noise; we say it in one line
    try:
        network_batch = 2 * batch if guided and batch else batch  # guidance: both branches
        denoiser = ort.InferenceSession(path, session_options(network_batch if cuda_graph else None),
                                        providers=providers)
    except Exception as e:
        raise ValueError(f"'{path}' cannot be loaded by ONNX Runtime ({str(e).splitlines()[0][:160]}); "
                         "the file is corrupt or not an ONNX model") from None
    finally:
        ort.set_default_logger_severity(2)  # back to ONNX Runtime's default, warnings
    meta = read_metadata(denoiser, path)
    on_cuda = denoiser.get_providers()[0] == "CUDAExecutionProvider"
    if want_cuda and not on_cuda:
        if provider == "cuda":
            raise ValueError("--provider cuda was asked for, but CUDA is not usable here (no GPU, or "
                             "the CUDA and cuDNN libraries onnxruntime-gpu needs are missing)")
        print("note: CUDA is not usable here; running on the CPU", file=sys.stderr)
    providers = providers if on_cuda else ["CPUExecutionProvider"]
    if guided and not meta["num_classes"]:
        raise ValueError(f"--class: '{path}' is an unconditional model (trained without --cond)")
    options = session_options(batch if cuda_graph else None)
    if guided and cuda_graph:
        options.add_free_dimension_override_by_name("N", 2 * batch)
    key = ("guided_" if guided else "") + ("multistep_graph" if multistep else "step_graph")
    if not meta[key]:
        raise ValueError(f"'{path}' was exported before --sampler dpm++ existed (no ddpm.{key}); "
                         "export it again with export.py, or use --sampler ddim")
    try:
        step = ort.InferenceSession(meta[key], options, providers=providers)
    except Exception as e:
        raise ValueError(f"'{path}' has a ddpm.{key} ONNX Runtime cannot load "
                         f"({str(e).splitlines()[0][:120]}); export it again with export.py") from None
    names = ({i.name for i in step.get_inputs()}, [o.name for o in step.get_outputs()])
    learned = {"var_values"} if meta["var_type"] == "learned_range" and not multistep else set()
    wanted = ({"x_t", "eps", "prev_x0", "coef"}, ["x_prev", "pred_x0"]) if multistep else \
        ({"x_t", "eps", "noise", "coef"} | learned, ["x_prev"])
    if names != (wanted[0] | ({"guidance"} if guided else set()), wanted[1]):
        raise ValueError(f"'{path}' has a ddpm.{key} with inputs {sorted(names[0])} and outputs "
                         f"{names[1]}, not the update export.py writes; export it again")
    return denoiser, step, meta, "cuda" if on_cuda else "cpu"


# ----------------------------------------------------------------------------------------------
# The reverse process

# A one-node ONNX model, noise = RandomNormalLike(like): N(0, I) of like's shape, drawn where the
# session runs (on the GPU with CUDA), from a generator seeded by ort.set_seed when the session is
# made and advancing with every run. Serialized here because sample_ort.py does not import onnx;
# tests/test_onnx.py rebuilds it with onnx.helper and compares the bytes.
NOISE_GRAPH = ("CAgSADp2Ch8KBGxpa2USBW5vaXNlIhBSYW5kb21Ob3JtYWxMaWtlEgpkZHBtX25vaXNlWiIKBGxpa2USGgoYCAESFAoD"
               "EgFCCgMSAUMKAxIBSAoDEgFXYiMKBW5vaXNlEhoKGAgBEhQKAxIBQgoDEgFDCgMSAUgKAxIBV0IECgAQEQ==")


def noise_session(seed, device):
    """The session that draws each step's noise on the device, its generator seeded with `seed`
    (ONNX Runtime's own generator: other numbers than numpy's for the same seed)."""
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    ort.set_seed(seed)
    return ort.InferenceSession(base64.b64decode(NOISE_GRAPH), session_options(), providers=providers)


class Sampler:
    """Device buffers bound once; each step updates t and coef in place and runs
    eps = denoiser(x, t) then x = step(x, eps, noise, coef), x never copied back to the host.

    The noise: drawn on the device by `noise` (a session of noise_graph, seeded when it was
    made) if given, else uploaded from the host each step (run's noise_fn: the parity tests feed
    both implementations the same numbers). DPM-Solver++'s update (a step session with a
    prev_x0 input) has no noise; it carries the previous x_0 in two device buffers that swap
    roles each step (two bindings, so the addresses stay fixed for CUDA graphs).
    A conditional model gets labels y (B,) from set_labels ('no label' until then); with a guidance scale
    (the step session then being the guided update) x holds each image twice, for the
    conditional and the unconditional branch, so both go through the network in one call."""

    def __init__(self, denoiser, step, shape, device, num_classes=0, guidance=None, noise=None):
        self.denoiser, self.step, self.shape = denoiser, step, shape
        learned = [o.name for o in denoiser.get_outputs()] == ["eps", "var_values"]
        self.multistep = "prev_x0" in {i.name for i in step.get_inputs()}
        self.guided = guidance is not None
        B = shape[0]
        N = 2 * B if self.guided else B  # images per network call
        network_shape = (N,) + tuple(shape[1:])
        # buffers owned by ONNX Runtime (from_numpy on the CPU would borrow a numpy array's memory)
        new = ort.OrtValue.ortvalue_from_shape_and_type
        self.x = new(network_shape, np.float32, device, 0)
        self.t = new((N,), np.int64, device, 0)
        self.eps = new(network_shape, np.float32, device, 0)
        n_coef = {i.name: i.shape for i in step.get_inputs()}["coef"][0]
        self.coef = new((n_coef,), np.float32, device, 0)
        outputs = {"eps": self.eps}
        if learned:  # learned variances: the network's v goes to the update too (not to dpm++'s)
            outputs["var_values"] = new(network_shape, np.float32, device, 0)
        inputs = {"x_t": self.x, "t": self.t}
        self.num_classes = num_classes
        if num_classes:
            self.y = inputs["y"] = new((N,), np.int64, device, 0)
            self.set_labels(None)
        self.eps_binding = denoiser.io_binding()
        for name, value in inputs.items():
            self.eps_binding.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            self.eps_binding.bind_ortvalue_output(name, value)
        step_inputs = [("x_t", self.x), ("eps", self.eps), ("coef", self.coef)]
        if not self.multistep:
            self.noise = new(shape, np.float32, device, 0)
            step_inputs += [("noise", self.noise)] + [(k, v) for k, v in outputs.items() if k != "eps"]
        if self.guided:
            self.guidance = new((1,), np.float32, device, 0)
            self.guidance.update_inplace(np.array([guidance], np.float32))
            step_inputs.append(("guidance", self.guidance))
        self.x0 = [new(shape, np.float32, device, 0) for _ in range(2 if self.multistep else 0)]
        self.step_bindings, self.step_options = [], []
        for j in range(2 if self.multistep else 1):
            binding = step.io_binding()
            for name, value in step_inputs:
                binding.bind_ortvalue_input(name, value)
            # The update writes x_{t-1} over x_t: its last node (an Add or Concat of intermediates)
            # runs after every node that reads x_t, so this in-place binding is safe.
            binding.bind_ortvalue_output("x_prev", self.x)
            options = ort.RunOptions()
            if self.multistep:  # step k reads x0[k % 2] and writes this step's x_0 to the other
                binding.bind_ortvalue_input("prev_x0", self.x0[j])
                binding.bind_ortvalue_output("pred_x0", self.x0[1 - j])
                options.add_run_config_entry("gpu_graph_id", str(j + 1))  # a CUDA graph per binding
            self.step_bindings.append(binding)
            self.step_options.append(options)
        self.noise_session = noise if not self.multistep else None
        if self.noise_session is not None:  # RandomNormalLike reads only the shape of its input
            self.noise_binding = noise.io_binding()
            self.noise_binding.bind_ortvalue_input("like", self.noise)
            self.noise_binding.bind_ortvalue_output("noise", self.noise)
        self.run_options = ort.RunOptions()

    def set_labels(self, y):
        """The classes of the next run, (B,) (None: 'no label'); guided: [y; no label]."""
        B = self.shape[0]
        null = np.full(B, self.num_classes, np.int64)
        labels = null if y is None else np.asarray(y, np.int64)
        self.y.update_inplace(np.concatenate([labels, null]) if self.guided else labels)

    def run(self, x_T, timesteps, coefs, noise_fn=None, progress=None, on_step=None):
        """x_0 from x_T; noise_fn(k, shape) the k-th step's noise if the noise comes from the host.
        on_step(k, sampler), if given, runs between the denoiser and the update,
        when self.x holds x_t and self.eps the network's output (e.g. for process pictures)."""
        shape, N = x_T.shape, 2 * x_T.shape[0] if self.guided else x_T.shape[0]
        self.x.update_inplace(np.ascontiguousarray(np.concatenate([x_T, x_T]) if self.guided else x_T,
                                                   dtype=np.float32))
        for x0 in self.x0:  # the first step multiplies prev_x0 by 0: it must not hold a nan
            x0.update_inplace(np.zeros(shape, np.float32))
        for k, (t, coef) in enumerate(zip(timesteps, coefs)):
            self.t.update_inplace(np.full(N, t, dtype=np.int64))
            self.coef.update_inplace(coef)
            if self.noise_session is not None:
                self.noise_session.run_with_iobinding(self.noise_binding, self.run_options)
            elif not self.multistep:  # dpm++ has no noise
                self.noise.update_inplace(np.ascontiguousarray(noise_fn(k, shape), dtype=np.float32))
            self.denoiser.run_with_iobinding(self.eps_binding, self.run_options)
            if on_step:
                on_step(k, self)
            j = k % len(self.step_bindings)
            self.step.run_with_iobinding(self.step_bindings[j], self.step_options[j])
            if progress:
                progress(k + 1)
        return self.x.numpy()[:self.shape[0]]

    def current(self):
        """(x_t, eps) of the step in progress as numpy, eps guided if it is (for pictures)."""
        B = self.shape[0]
        x_t, eps = self.x.numpy()[:B], self.eps.numpy()
        if self.guided:
            eps_c, eps_u = eps[:B], eps[B:]
            eps = eps_u + self.guidance.numpy()[0] * (eps_c - eps_u)
        return x_t, eps


def progress_bar(total, label):
    """A one-line text progress bar on stderr (tqdm is not a dependency of this script)."""
    start = time.time()
    interactive = sys.stderr.isatty()

    def update(done):
        if done != total and (not interactive or done % max(1, total // 100)):
            return
        elapsed = time.time() - start
        frac = done / total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta = elapsed / frac - elapsed if frac > 0 else 0
        end = "\n" if done == total else ""
        print(f"\r{label} [{bar}] {done}/{total} {elapsed:.0f}s<{eta:.0f}s", end=end,
              file=sys.stderr, flush=True)
    return update


def to_uint8(x):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, clipped (as ddpm.to_uint8)."""
    x = np.clip(x, -1, 1)
    return np.round((x + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


def save_grid(images, path, nrow=None, pad=2):
    """(N, H, W, C) uint8 -> one picture, nrow images per row (default: a square; as ddpm.save_grid)."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[k]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)


# The reverse process as a picture, as ddpm.save_progress (repeated: ddpm.py imports torch;
# tests/test_onnx.py checks that both draw the same file).

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


# Output checks before any work, as ddpm.check_output_path (repeated: ddpm.py imports torch).
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_output_path(path, flag, inputs=(), extensions=PICTURE_EXTENSIONS):
    if os.path.isdir(path):
        raise ValueError(f"{flag} '{path}' is a folder; give a file name")
    if os.path.splitext(path)[1].lower() not in extensions:
        raise ValueError(f"{flag} '{path}': the name must end in {', '.join(extensions)}")
    if os.path.exists(path) and any(os.path.exists(p) and os.path.samefile(path, p) for p in inputs):
        raise ValueError(f"{flag} '{path}' is the input file; writing it would destroy the input")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), flag)


def check_writable_folder(folder, flag):
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag} '{folder}' is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag}: cannot write in '{folder}' ({e.strerror or e})") from None


# Class labels, as ddpm.parse_classes and ddpm.class_labels (repeated: ddpm.py imports torch).

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


def sample(model, n=64, steps=None, sampler="ddpm", eta=0.0, seed=0, batch=None, provider="auto",
           cuda_graph=False, out="samples.png", outdir=None, progress=(), spacing=None,
           classes=None, guidance=3.0, host_noise=False):
    """n images from the exported model into one grid (and one PNG each in outdir, and the
    reverse process of the first batch as a picture or animation in each path of progress).
    classes: --class's text (names or indices, a comma list, or all: a grid row per class) for a
    conditional model, sampled with classifier-free guidance of scale `guidance`.
    host_noise: each step's noise from numpy and uploaded (as before device noise; also with
    --cuda-graph, whose replays would repeat one draw), else drawn on the device."""
    if n < 1:
        raise ValueError(f"--n {n}: sample at least 1 image")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"--guidance {guidance}: use a number >= 0 (0: unconditional, 1: conditional)")
    if batch is not None and batch < 1:
        raise ValueError(f"--batch {batch}: use at least 1 image per batch")
    check_output_path(out, "--out", inputs=(model,))
    progress = [progress] if isinstance(progress, str) else list(progress or ())
    for path in progress:
        check_output_path(path, "--progress", (model, out), PROGRESS_EXTENSIONS)
    if outdir:
        check_writable_folder(outdir, "--outdir")
    guided = classes is not None and guidance not in (0, 1)  # else one branch is enough
    graph_batch = min(batch or n, n)  # a CUDA graph's fixed batch; later batches are padded to it
    check_sampler(sampler, None, eta, 1)  # a sentence before any file is opened; --steps once T is known
    denoiser, step, meta, device = open_sessions(model, provider, cuda_graph, graph_batch, guided,
                                                 multistep=sampler == "dpm++")
    labels, nrow = None, None
    if classes is not None:
        if not meta["num_classes"]:
            raise ValueError(f"--class: '{model}' is an unconditional model (trained without --cond)")
        labels, nrow = class_labels(parse_classes(classes, meta["class_names"]), n)
        n = len(labels)  # a row per class: n rounded up
    batch = graph_batch if cuda_graph else min(batch or n, n)
    timesteps, coefs = step_table(meta["betas"], sampler, steps, eta, meta["var_type"], spacing)

    rng = np.random.default_rng(seed)
    noise = None if host_noise or cuda_graph or sampler == "dpm++" else noise_session(seed, device)
    C, S = meta["in_channels"], meta["image_size"]
    images, frames, start = [], {}, time.time()
    shown = {path: progress_steps(len(timesteps), not path.lower().endswith(".png")) for path in progress}
    wanted = set().union(*shown.values())

    def record(k, runner):  # the first batch's process: x_t and the x_0 the step graph predicts
        if not images and k in wanted:
            a, b = coefs[k][:2]
            x_t, eps = runner.current()
            pred_x0 = a * x_t - b * eps
            if meta["clip_x0"]:
                pred_x0 = np.clip(pred_x0, -1, 1)
            frames[k] = (int(timesteps[k]), to_uint8(x_t), to_uint8(pred_x0))

    runner = None
    for first in range(0, n, batch):
        # a captured CUDA graph keeps its shape and addresses: reuse it, padding the last batch
        b = batch if cuda_graph else min(batch, n - first)
        if runner is None or runner.shape[0] != b:
            runner = Sampler(denoiser, step, (b, C, S, S), device, meta["num_classes"],
                             guidance if guided else None, noise)
        if labels is not None and guidance != 0:  # guidance 0: the unconditional model
            runner.set_labels(np.pad(labels[first:first + b], (0, b - len(labels[first:first + b])), mode="edge"))
        x_T = rng.standard_normal((b, C, S, S), dtype=np.float32)
        label = f"{sampler} {first // batch + 1}/{math.ceil(n / batch)}"
        x0 = runner.run(x_T, timesteps, coefs, lambda k, shape: rng.standard_normal(shape, dtype=np.float32),
                        progress_bar(len(timesteps), label), record if progress else None)
        images.append(to_uint8(x0)[:n - first])
    elapsed = time.time() - start
    images = np.concatenate(images)
    try:
        for path, steps_shown in shown.items():
            save_progress([frames[k] for k in steps_shown], images[:batch], path)
        save_grid(images, out, nrow)
        if outdir:
            for k, img in enumerate(images):
                Image.fromarray(img.squeeze(-1) if C == 1 else img).save(os.path.join(outdir, f"{k:05d}.png"))
    except OSError as e:
        raise ValueError(f"the samples could not be written ({e.strerror or e})") from None
    name = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[device]
    print(f"wrote {out}" + (f" and {n} PNGs in {outdir}" if outdir else "") +
          (f", the process in {' and '.join(progress)}" if progress else ""))
    if labels is not None:
        names = ", ".join(meta["class_names"][c] for c in dict.fromkeys(labels.tolist()))
        print(f"classes {names}, classifier-free guidance {guidance:g}")
    print(f"{n * len(timesteps) / elapsed:.1f} image-steps/s, {n} images x {len(timesteps)} "
          f"{sampler} steps in {elapsed:.1f}s on {name} ({meta['precision']}, batch {batch}"
          f"{', CUDA graph' if cuda_graph and device == 'cuda' else ''})")
    return images


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample a DDPM exported by export.py with ONNX Runtime.")
    p.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    p.add_argument("--model", default="ddpm.onnx", help="the exported model (default: ddpm.onnx)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps; fewer than T respaces the chain (default: T)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm: ancestral (Algorithm 2); ddim: Song et al.; dpm++: DPM-Solver++(2M), Lu et "
                        "al. 2022, good at 10 to 25 steps (default: ddpm)")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM noise, 0 deterministic .. 1 (default: 0; ddim only)")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="which t's a chain shorter than T keeps: leading 0, T/steps, ..; trailing .., "
                        "T-1 (Lin et al. 2023) (default: trailing for dpm++, leading otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed of x_T and the noise (default: 0)")
    p.add_argument("--host-noise", action="store_true",
                   help="draw each step's noise with numpy and upload it, as ddpm.py can be fed it, instead "
                        "of on the device (default: on the device)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: all of --n)")
    p.add_argument("--provider", choices=["auto", "cuda", "cpu"], default="auto",
                   help="ONNX Runtime provider (default: auto, CUDA if usable)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each step in a CUDA graph (default: off)")
    p.add_argument("--out", default="samples.png",
                   help="the grid picture, .png/.jpg/.webp/.bmp (default: samples.png)")
    p.add_argument("--outdir", default=None, help="also write one PNG per image here (default: none)")
    p.add_argument("--progress", action="append", default=[], metavar="PATH",
                   help="also draw the reverse process: .png, a still (x_t and predicted x_0 at 10 "
                        "steps), or .gif/.webp, an animation; may be given more than once (default: none)")
    p.add_argument("--class", dest="classes", default=None, metavar="K",
                   help="class(es) of a conditional model: a name or an index, a comma list, or all (a "
                        "grid row per class) (default: none, unconditional)")
    p.add_argument("--guidance", type=float, default=3.0,
                   help="classifier-free guidance scale: 0 unconditional, 1 plain conditional, > 1 "
                        "stronger (default: 3)")
    args = p.parse_args(argv)
    try:
        sample(args.model, args.n, args.steps, args.sampler, args.eta, args.seed, args.batch,
               args.provider, args.cuda_graph, args.out, args.outdir, args.progress, args.spacing,
               args.classes, args.guidance, args.host_noise)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted") from None


if __name__ == "__main__":
    main()
