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
t and the coefficients travel to it. This file holds only ONNX Runtime: the schedule, the step
tables come from schedules.py, the same numbers ddpm.py uses, and the checks and the pictures
from sampling.py and pictures.py.
"""

import argparse
import base64
import binascii
import contextlib
import io
import json
import math
import os
import time

import numpy as np
import onnxruntime as ort

import files
import messages
import pictures
import sampling
import schedules

SUPPORTED_FORMAT = 2  # 1: the update graphs output x_prev alone (no pred_x0, no eps_guided)


# ----------------------------------------------------------------------------------------------
# Loading


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
    if not 1 <= fmt <= SUPPORTED_FORMAT:
        raise ValueError(f"'{path}' has metadata format {fmt}; this sample_ort.py reads up to "
                         f"{SUPPORTED_FORMAT}. Update sample_ort.py")
    wrong = []
    if betas.ndim != 1 or len(betas) < 2 or not np.all((betas > 0) & (betas <= 1)):
        wrong.append("ddpm.betas must be a list of at least 2 numbers in (0, 1]")
    elif T != len(betas):
        wrong.append(f"ddpm.T is {T} but ddpm.betas has {len(betas)} values")
    if image_size < 1 or in_channels not in (1, 3):
        wrong.append(f"ddpm.image_size {image_size} / ddpm.in_channels {in_channels}")
    if meta["ddpm.var_type"] not in schedules.VAR_TYPES:
        wrong.append(f"ddpm.var_type '{meta['ddpm.var_type']}' is not one of {', '.join(schedules.VAR_TYPES)}")
    if meta["ddpm.clip_x0"] not in ("true", "false"):
        wrong.append(f"ddpm.clip_x0 '{meta['ddpm.clip_x0']}' is not true or false")
    try:
        num_classes = int(meta.get("ddpm.num_classes", "0"))
        class_names = json.loads(meta.get("ddpm.class_names", "[]"))
        guided_graph = base64.b64decode(meta.get("ddpm.guided_step_graph", ""), validate=True)
        multistep = [base64.b64decode(meta.get(key, ""), validate=True) for key in MULTISTEP]
        distilled = int(meta.get("ddpm.distilled_steps", "0")), float(meta.get("ddpm.distilled_guidance", "1"))
    except (ValueError, TypeError, binascii.Error) as e:
        raise ValueError(f"{problem} ({type(e).__name__}: {str(e)[:100]})") from None
    if not (0 <= distilled[0] <= T and math.isfinite(distilled[1]) and distilled[1] >= 0):
        wrong.append(f"ddpm.distilled_steps {distilled[0]} / ddpm.distilled_guidance {distilled[1]}")
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
    return {"format": fmt, "betas": betas, "image_size": image_size, "in_channels": in_channels,
            "var_type": meta["ddpm.var_type"], "clip_x0": meta["ddpm.clip_x0"] == "true",
            "precision": meta["ddpm.precision"], "preset": meta.get("ddpm.preset", "?"),
            "step_graph": step_graph, "num_classes": num_classes,
            "class_names": [str(c) for c in class_names], "guided_step_graph": guided_graph,
            "multistep_graph": multistep[0], "guided_multistep_graph": multistep[1],
            "distilled_steps": distilled[0], "distilled_guidance": distilled[1]}


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
        messages.warn("CUDA is not usable here; running on the CPU", "note")
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
    inputs = ({"x_t", "eps", "prev_x0", "coef"} if multistep else {"x_t", "eps", "noise", "coef"} | learned) \
        | ({"guidance"} if guided else set())
    outputs = ["x_prev", "pred_x0"] + (["eps_guided"] if guided else [])  # format 1: x_prev (and dpm++'s pred_x0)
    if meta["format"] == 1:
        outputs = outputs[:2] if multistep else ["x_prev"]
    if names != (inputs, outputs):
        raise ValueError(f"'{path}' has a ddpm.{key} with inputs {sorted(names[0])} and outputs "
                         f"{names[1]}, not the update export.py writes; export it again")
    if not cuda_graph and not update_moves(step):  # (a captured graph must not see other buffers)
        raise ValueError(f"'{path}' has a ddpm.{key} that does not compute the update (a probe step "
                         "did not give c1 x_0 + c2 x_t); export it again with export.py")
    return denoiser, step, meta, "cuda" if on_cuda else "cpu"


def update_moves(step):
    """One probe step of an update graph: x_t = 1, eps = 0, no noise, no previous x_0, and coef
    a = b = 1, c1 = 0.5, c2 = 0.25, the rest 0, so x_0 = 1 and x_prev = c1 x_0 + c2 x_t = 0.75.
    A graph with the right names that does not update (x_prev = x_t) gives 1."""
    inputs = {i.name: i for i in step.get_inputs()}
    guided = "guidance" in inputs
    n_coef = inputs["coef"].shape[0]
    feeds = {"coef": np.array([1.0, 1.0, 0.5, 0.25] + [0.0] * (n_coef - 4), np.float32)}
    for name in inputs:
        if name in ("x_t", "eps", "var_values", "noise", "prev_x0"):
            rows = 2 if guided and name != "noise" and name != "prev_x0" else 1
            feeds[name] = np.full((rows, 1, 1, 1), 1.0 if name == "x_t" else 0.0, np.float32)
    if guided:
        feeds["guidance"] = np.array([2.0], np.float32)
    x_prev = step.run(["x_prev"], feeds)[0]
    return bool(np.allclose(x_prev, 0.75, atol=1e-6))


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


class Runner:
    """Device buffers bound once; each step updates t and coef in place and runs
    eps = denoiser(x, t) then x = step(x, eps, noise, coef), x never copied back to the host.

    The noise: drawn on the device by `noise` (a session of noise_graph, seeded when it was
    made) if given, else uploaded from the host each step (run's noise_fn: the parity tests feed
    both implementations the same numbers). The update also writes the step's predicted x_0 to a
    device buffer (and the guided eps, where guided), read back only for the process pictures.
    DPM-Solver++'s update (a step session with a prev_x0 input) has no noise; it carries the
    previous x_0 in two device buffers that swap roles each step (two bindings, so the addresses
    stay fixed for CUDA graphs). A conditional model gets labels y (B,) from set_labels ('no
    label' until then); with a guidance scale (the step session then being the guided update) x
    holds each image twice, for the conditional and the unconditional branch, so both go
    through the network in one call."""

    def __init__(self, denoiser, step, shape, device, num_classes=0, guidance=None, noise=None, clip_x0=True):
        self.denoiser, self.step, self.shape, self.clip_x0 = denoiser, step, shape, clip_x0
        learned = [o.name for o in denoiser.get_outputs()] == ["eps", "var_values"]
        self.multistep = "prev_x0" in {i.name for i in step.get_inputs()}
        output_names = [o.name for o in step.get_outputs()]
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
        extra = [name for name in output_names if name != "x_prev" and not (self.multistep and name == "pred_x0")]
        step_outputs = {name: new(shape, np.float32, device, 0) for name in extra}  # pred_x0, eps_guided
        if not self.multistep:
            self.noise = new(shape, np.float32, device, 0)
            step_inputs += [("noise", self.noise)] + [(k, v) for k, v in outputs.items() if k != "eps"]
        if self.guided:
            self.guidance = new((1,), np.float32, device, 0)
            self.guidance.update_inplace(np.array([guidance], np.float32))
            step_inputs.append(("guidance", self.guidance))
        self.x0 = [new(shape, np.float32, device, 0) for _ in range(2 if self.multistep else 0)]
        self.pred_x0 = step_outputs.get("pred_x0")  # DDPM, DDIM: None in format 1 files
        self.step_bindings, self.step_options = [], []
        for j in range(2 if self.multistep else 1):
            binding = step.io_binding()
            for name, value in step_inputs:
                binding.bind_ortvalue_input(name, value)
            # The update writes x_{t-1} over x_t: its last node (an Add or Concat of intermediates)
            # runs after every node that reads x_t, so this in-place binding is safe.
            binding.bind_ortvalue_output("x_prev", self.x)
            for name, value in step_outputs.items():
                binding.bind_ortvalue_output(name, value)
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

    def run(self, x_T, timesteps, coefs, noise_fn=None, progress=None, process=None):
        """x_0 from x_T; noise_fn(k, shape) the k-th step's noise if the noise comes from the host.
        process: a pictures.ProcessFrames, given x_t and the predicted x_0 of the steps it wants."""
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
            wanted = process is not None and process.wants(k)
            if wanted:
                x_t = self.x.numpy()[:shape[0]].copy()
                pred_x0 = self.format1_pred_x0(x_t, coef) if self.pred_x0 is None and not self.multistep else None
            j = k % len(self.step_bindings)
            self.step.run_with_iobinding(self.step_bindings[j], self.step_options[j])
            if wanted:
                written = self.x0[1 - j] if self.multistep else self.pred_x0
                process(k, t, x_t, pred_x0 if written is None else written.numpy())
            if progress:
                progress(k + 1)
        return self.x.numpy()[:self.shape[0]]

    def format1_pred_x0(self, x_t, coef):
        """The x_0 a format-1 update graph predicts but does not output, for the pictures of files
        exported before format 2: clip(a x_t - b eps, -1, 1) with eps guided as the graph does."""
        B, eps = self.shape[0], self.eps.numpy()
        if self.guided:
            eps = eps[B:] + self.guidance.numpy()[0] * (eps[:B] - eps[B:])
        pred_x0 = coef[0] * x_t - coef[1] * eps[:B]
        return np.clip(pred_x0, -1, 1) if self.clip_x0 else pred_x0


def open_for_sampling(path, sampler, guidance=None, classes=None, provider="auto", cuda_graph=False, batch=None):
    """open_sessions for a schedules.Sampler and --guidance and --class, and the settings they come
    to: (sessions, (the sampler, the guidance scale to apply, the one the samples have)). A
    distilled model samples its own chain, with the guidance built into it (sampling.distilled_*),
    which the metadata tells: the sessions opened for the flags as given are opened again where
    that changes the update graph (the guided one or not, DPM-Solver++'s or not)."""
    given = sampling.GUIDANCE if guidance is None else guidance
    opened = (classes is not None and given not in (0, 1), sampler.name == "dpm++")  # guided: else one branch
    sessions = open_sessions(path, provider, cuda_graph, batch, *opened)
    meta = sessions[2]
    sampler = sampling.distilled_sampler(meta["distilled_steps"], sampler)
    scale, shown = sampling.distilled_guidance(meta["distilled_guidance"], guidance, meta["num_classes"] > 0, classes)
    wanted = (classes is not None and scale not in (0, 1), sampler.name == "dpm++")
    if wanted != opened:
        sessions = open_sessions(path, provider, cuda_graph, batch, *wanted)
    return sessions, (sampler, scale, shown)


def sample(model, request=sampling.Request(), *, provider="auto", cuda_graph=False, host_noise=False):
    """request.n images from the exported model into one grid (and one PNG each in outdir, and the
    reverse process of the first batch as a picture or animation in each path of progress): a
    sampling.Request, the flags ddpm.py sample shares. Its classes (--class's text: names or
    indices, a comma list, or all: a grid row per class) are sampled by a conditional model with
    classifier-free guidance of its guidance scale. host_noise: each step's noise from numpy and
    uploaded (as before device noise; also with --cuda-graph, whose replays would repeat one
    draw), else drawn on the device."""
    request = sampling.check_request(request, (model,))
    if cuda_graph and provider == "cpu":
        raise ValueError("--cuda-graph captures CUDA work; it needs --provider cuda (or auto on a GPU)")
    n, classes = request.n, request.classes
    graph_batch = min(request.batch or n, n)  # a CUDA graph's fixed batch; later batches are padded to it
    sampling.check_sampler(request.sampler._replace(name=request.sampler.name or "ddpm", steps=None), 1)  # before any file
    (denoiser, step, meta, device), (sampler, guidance_scale, shown) = open_for_sampling(
        model, request.sampler, request.guidance, classes, provider, cuda_graph, graph_batch)
    guided = classes is not None and guidance_scale not in (0, 1)
    if cuda_graph and device != "cuda":
        messages.warn("--cuda-graph: CUDA is not usable here, so the steps run without CUDA graphs")
    labels, nrow = None, None
    if classes is not None:
        if not meta["num_classes"]:
            raise ValueError(f"--class: '{model}' is an unconditional model (trained without --cond)")
        labels, nrow = sampling.class_labels(sampling.parse_classes(classes, meta["class_names"]), n)
        n = len(labels)  # a row per class: n rounded up
    batch = graph_batch if cuda_graph else min(request.batch or n, n)
    sampling.check_sampler(sampler, len(meta["betas"]))
    timesteps, coefs = schedules.step_table(meta["betas"], sampler, meta["var_type"])

    rng = np.random.default_rng(request.seed)
    noise = None if host_noise or cuda_graph or sampler.name == "dpm++" else noise_session(request.seed, device)
    C, S = meta["in_channels"], meta["image_size"]
    process = pictures.ProcessFrames(request.progress, len(timesteps))
    images, runner, start = [], None, time.time()
    for first in range(0, n, batch):
        # a captured CUDA graph keeps its shape and addresses: reuse it, padding the last batch
        b = batch if cuda_graph else min(batch, n - first)
        if runner is None or runner.shape[0] != b:
            runner = Runner(denoiser, step, (b, C, S, S), device, meta["num_classes"],
                            guidance_scale if guided else None, noise, meta["clip_x0"])
        if labels is not None and guidance_scale != 0:  # guidance 0: the unconditional model
            runner.set_labels(np.pad(labels[first:first + b], (0, b - len(labels[first:first + b])), mode="edge"))
        x_T = rng.standard_normal((b, C, S, S), dtype=np.float32)
        label = f"{sampler.name} {first // batch + 1}/{math.ceil(n / batch)}"
        x0 = runner.run(x_T, timesteps, coefs, HostNoise(rng), messages.progress_bar(len(timesteps), label),
                        process if request.progress else None)
        process.done = True  # the pictures show the first batch
        images.append(pictures.to_uint8(x0, source=model)[:n - first])
    elapsed = time.time() - start
    images = np.concatenate(images)
    messages.say(sampling.write_samples(images, request.out, nrow, request.outdir, process, batch))
    name = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[device]
    if labels is not None:
        names = ", ".join(meta["class_names"][c] for c in dict.fromkeys(labels.tolist()))
        messages.say(f"classes {names}, classifier-free guidance {shown:g}")
    messages.say(f"{n * len(timesteps) / elapsed:.1f} image-steps/s, {n} images x {len(timesteps)} "
                 f"{sampler.name} steps in {elapsed:.1f}s on {name} ({meta['precision']}, batch {batch}"
                 f"{', CUDA graph' if cuda_graph and device == 'cuda' else ''})")
    return images


class HostNoise:
    """noise_fn(k, shape) -> the k-th step's noise, drawn from a numpy generator on the host."""

    def __init__(self, rng):
        self.rng = rng

    def __call__(self, k, shape):
        return self.rng.standard_normal(shape, dtype=np.float32)


def parser():
    """sample_ort.py's flags: those ddpm.py sample shares (sampling.add_sampling_flags), then ONNX Runtime's."""
    p = argparse.ArgumentParser(description="Sample a DDPM exported by export.py with ONNX Runtime.")
    p.add_argument("--model", default="ddpm.onnx", help="the exported model (default: ddpm.onnx)")
    sampling.add_sampling_flags(p)
    p.add_argument("--host-noise", action="store_true",
                   help="draw each step's noise with numpy and upload it, as ddpm.py can be fed it, instead "
                        "of on the device (default: on the device)")
    p.add_argument("--provider", choices=["auto", "cuda", "cpu"], default="auto",
                   help="ONNX Runtime provider (default: auto, CUDA if usable)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each step in a CUDA graph (default: off)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        sample(args.model, sampling.Request.from_args(args), provider=args.provider, cuda_graph=args.cuda_graph,
               host_noise=args.host_noise)
    except (ValueError, files.WriteFailed) as e:  # a user's mistake, a full disk: one sentence
        raise SystemExit(f"error: {e}") from None
    except (MemoryError, ort.capi.onnxruntime_pybind11_state.RuntimeException) as e:
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower():
            raise
        raise SystemExit(f"error: out of memory: the sizes asked for do not fit (a smaller --n or --batch will) "
                         f"({type(e).__name__})") from None
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted") from None


if __name__ == "__main__":
    main()
