"""Sampling and training speed, side by side in one run: our PyTorch path, our ONNX Runtime path
and the peer (diffusers' UNet2DModel with the same config, driving the same loop), against the
machine's own peak.

  python bench/bench.py                  # CPU: cifar10 preset, batch 8 (make bench)
  python bench/bench.py --device cuda    # GPU: batch 64 plus a batch sweep (make bench-gpu)
  python bench/bench.py --quick          # tiny model, a few steps: the smoke test in make test

Rules. Each contender runs in its own worker process with the parent's torch.get_num_threads(),
forked from a server that has imported torch and our modules and built nothing (multiprocessing
'forkserver'). A worker builds its model once and warms it up (compiling, where it compiles),
then does one timed run per request. The parent asks them in turn, A B C A B C ... over the
repeats, so drift hits all alike, pausing 0.2 s before each request (ONNX Runtime's threads spin
for about 0.1 s after a run), and reports the median, as image-steps/s (sampling) or images/s
(training), with the ratio to PyTorch eager. CUDA is synchronised before every clock read.

Utilization = achieved FLOP/s over peak FLOP/s, both counted by torch.utils.flop_counter (2 FLOPs
per multiply-add, for a convolution as for a matmul). Achieved = the FLOPs of one forward x
throughput (x3 for a training step, forward + backward). The peak is measured the way the model
computes: almost all of the U-Net's FLOPs are 3x3 convolutions (oneDNN on a CPU, cuDNN on a GPU),
so the peak is the best FLOP/s of torch.nn.functional.conv2d on the model's own 3 convolution
shapes with the most FLOPs, at the contender's batch, NCHW and channels-last, with the same
threads, in the contender's precision: fp32, or under the same autocast for bf16/fp16 (bf16 on
a CPU only where it has bf16 units). The parent measures it after every round, its workers
idle, and keeps the best call: a peak is what the kernels reach undisturbed. int8 has no FLOP
peak (n/a; its achieved column counts the same operations). ONNX Runtime's CPU kernels are its
own (MLAS); a row of it above 100% would mean they beat oneDNN's on these shapes.

The old peak, the FLOP/s of an n=2048 fp32 torch.matmul, is still printed, as a reference. Rows
could read more than 100% of it (167% on an AVX-512 VNNI/bf16 CPU) because it times another
library than the one the model spends its time in: an fp32 torch.matmul is MKL's sgemm, the
convolutions are oneDNN's, and each picks its own kernels for the CPU (MKL_VERBOSE=1 and
ONEDNN_VERBOSE=1 print which). On a 2-core AMD EPYC (AVX2) oneDNN ran this model's largest 3x3
convolutions 1.2-1.3x faster per core than MKL ran that matmul. Not Winograd: PyTorch asks
oneDNN for direct convolution (ONEDNN_VERBOSE shows alg:convolution_direct), so 2 FLOPs per
multiply-add is the work done; and not the threads, the same in the old single process.
Against the model's own kernels a utilization above 100% is a measuring error; the tests check.

Memory, per worker: working memory = the rise of its RSS high-water mark (reset once the model
is built) over its RSS at that point, through the warm-up (compilation included) and the timed
runs; process peak = its whole RSS high-water mark, torch's import included (for ONNX Runtime's
worker too). On a GPU: max allocated over allocated, and max allocated.
Prints a markdown table last and writes a JSON copy to bench/results/<machine>.json.
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import checkpoints  # noqa: E402
import convert  # noqa: E402
import ddpm  # noqa: E402
import distributed  # noqa: E402
import export  # noqa: E402
import sample_ort  # noqa: E402
import schedules  # noqa: E402
from schedules import Sampler  # noqa: E402

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> autocast dtype
SETTLE_S = 0.2  # the pause before each timed run: ONNX Runtime's threads spin ~0.1 s after a run
CPU_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


# -- measuring ------------------------------------------------------------------------------------

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def current_memory_mb(device):
    """Allocated CUDA memory, or this process's resident set size (VmRSS)."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2 ** 20
    return _proc_status_mb("VmRSS")


def reset_peak(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the RSS high-water mark


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _proc_status_mb("VmHWM")


def _proc_status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def best_seconds(fn, device, budget=0.25):
    """Shortest time of one fn() call, the best of at least 3 timings and of `budget` seconds.
    On a GPU each timing runs calls back to back for 20 ms, so that launches do not count; on a
    CPU each times one call, so that the best is a call no other process interrupted."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - t0
    calls = math.ceil(0.02 / once) if device == "cuda" else 1
    best = float("inf")
    for _ in range(max(3, math.ceil(budget / (calls * once)))):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def counted_flops(fn):
    """FLOPs of fn() by torch's flop counter, the one that counts the model."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One Conv2d call of the model: what F.conv2d needs to repeat it."""
    x: tuple  # (B, C_in, H, W)
    weight: tuple  # (C_out, C_in / groups, kh, kw)
    bias: bool
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    def conv(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def flops(self):
        x, w = torch.empty(self.x, device="meta"), torch.empty(self.weight, device="meta")
        b = torch.empty(self.weight[0], device="meta") if self.bias else None
        return counted_flops(lambda: self.conv(x, w, b))

    def __str__(self):
        kh, kw = self.weight[2:]
        return f"{kh}x{kw} conv {self.x[1]}->{self.weight[0]} at {self.x[2]}x{self.x[3]}, batch {self.x[0]}"


def dominant_convs(model, cfg, k=3):
    """The k convolution shapes with the most FLOPs (all their calls together) in one forward, at
    batch 1: every layer of the U-Net works per image, so at batch B only x's first size changes."""
    calls = []

    def record(module, inputs, output):
        calls.append(ConvShape(tuple(inputs[0].shape), tuple(module.weight.shape), module.bias is not None,
                               module.stride, module.padding, module.dilation, module.groups))
    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    total = {}
    for shape in calls:
        total[shape] = total.get(shape, 0) + shape.flops()
    return sorted(total, key=total.get, reverse=True)[:k]


def conv_peak(convs, batch, device, precision):
    """(FLOP/s, what reached it): the best F.conv2d does on the model's own shapes at `batch`, in
    the contender's precision (fp32, or under the same autocast), NCHW or channels-last."""
    dtype = AUTOCAST.get(precision, torch.float32)
    autocast = torch.autocast(device, dtype=dtype) if precision in AUTOCAST else contextlib.nullcontext()
    best = (0.0, None)
    for shape in convs:
        shape = dataclasses.replace(shape, x=(batch,) + shape.x[1:])
        for layout, fmt in (("NCHW", torch.contiguous_format), ("channels-last", torch.channels_last)):
            x = torch.randn(shape.x, device=device, dtype=dtype).contiguous(memory_format=fmt)
            w = torch.randn(shape.weight, device=device, dtype=dtype).contiguous(memory_format=fmt)
            b = torch.randn(shape.weight[0], device=device, dtype=dtype) if shape.bias else None
            with torch.no_grad(), autocast:
                seconds = best_seconds(lambda: shape.conv(x, w, b), device)
            rate = shape.flops() / seconds
            if rate > best[0]:
                best = (rate, f"{shape}, {layout}")
    return best


def conv_peaks(contenders, convs, device):
    """{(batch, precision): (FLOP/s, what reached it)} for every contender with a FLOP peak."""
    found = {}
    for c in contenders:
        if c.precision != "int8" and (c.batch, c.precision) not in found:
            found[c.batch, c.precision] = conv_peak(convs, c.batch, device, c.precision)
    return found


def matmul_peak(device, precision, n):
    """FLOP/s of an n x n x n matrix product: the old peak, kept as a reference."""
    dtype = AUTOCAST.get(precision, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return counted_flops(lambda: a @ b) / best_seconds(lambda: a @ b, device)


# -- contenders: each is a function run() -> units of work done (image-steps or images) -------------

@dataclasses.dataclass
class Contender:
    """One row of the table; its worker process builds it."""
    name: str
    kind: str  # "sampling" or "training"
    model: str  # "ours", "diffusers", or the path of an .onnx file (ONNX Runtime)
    precision: str  # "fp32"; "bf16"/"fp16" (autocast, or an fp16 file); "int8"
    batch: int
    steps: int = 0  # sampling steps per timed run
    compile: bool = False
    channels_last: bool = False
    io_binding: bool = True
    cuda_graph: bool = False


def torch_sampler(model, cfg, batch, steps, device, amp=None):
    diffusion = ddpm.GaussianDiffusion.from_config(cfg)
    x_T = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    autocast = torch.autocast(device, dtype=amp) if amp else contextlib.nullcontext()

    def run():
        with autocast:
            ddpm.sample_loop(model, diffusion, x_T, Sampler("ddim", steps, eta=1.0), noise_fn=ddpm.GaussianNoise(torch.Generator(device=device).manual_seed(0)))
        return batch * steps
    return run


class DiffusersEps(torch.nn.Module):
    """diffusers' UNet2DModel as eps_theta(x_t, t), so it drives our loop."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


def diffusers_unet(cfg):
    from diffusers import UNet2DModel
    return UNet2DModel(**convert.unet2d_config(cfg))


def ort_sampler(onnx_path, cfg, batch, steps, provider, io_binding=True, cuda_graph=False):
    denoiser, step, meta, device = sample_ort.open_sessions(onnx_path, provider, cuda_graph, batch)
    ts, coefs = schedules.step_table(meta["betas"], Sampler("ddim", steps, eta=1.0))
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    if io_binding:
        sampler = sample_ort.Runner(denoiser, step, shape, device)

        def run():
            sampler.run(x_T, ts, coefs, lambda k, s: noise)
            return batch * steps
    else:  # the plain way: numpy in, numpy out, every step through the host
        def run():
            x = x_T
            for t, coef in zip(ts, coefs):
                eps = denoiser.run(["eps"], {"x_t": x, "t": np.full(batch, t, np.int64)})[0]
                x = step.run(["x_prev"], {"x_t": x, "eps": eps, "noise": noise, "coef": coef})[0]
            return batch * steps
    return run


def train_step(model, raw_model, cfg, batch, device, amp=None):
    """ddpm.Run.train_step itself (the micro-batch's draws, autocast, the scaler, clipping, the
    optimizer, the EMA) on a batch of noise images, for our U-Net and diffusers' alike."""
    run = ddpm.Run(cfg, ddpm.GaussianDiffusion.from_config(cfg), torch.device(device), amp, init=raw_model)
    run.raw_model, run.model = raw_model, model  # the contender as built (compiled, channels_last)
    run.ema, run.optimizer = copy.deepcopy(raw_model).requires_grad_(False), ddpm.make_optimizer(cfg, raw_model.parameters())
    x0 = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device).clamp(-1, 1)
    labels = torch.zeros(batch, dtype=torch.long)
    steps = itertools.count()

    def run_step():
        run.train_step(x0, labels, next(steps))
        return batch
    return run_step


def build(c, cfg, ckpt, device):
    """The contender's run(), its model built from the checkpoint (ours) or the config (the peer)."""
    if c.model.endswith(".onnx"):
        return ort_sampler(c.model, cfg, c.batch, c.steps, device, c.io_binding, c.cuda_graph)
    if c.model == "ours":
        model = ddpm.load_checkpoint(ckpt, ema=c.kind == "sampling")[0]
    else:
        model = DiffusersEps(diffusers_unet(cfg))
    model = model.to(device).train(c.kind == "training")
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    if c.compile:
        model = torch.compile(model)
    amp = AUTOCAST.get(c.precision)
    if c.kind == "training":
        return train_step(model, raw_model, cfg, c.batch, device, amp)
    return torch_sampler(model, cfg, c.batch, c.steps, device, amp)


# -- the worker processes -----------------------------------------------------------------------

def serve(conn, c, cfg, ckpt, device, threads):
    """A contender's worker: waits for 'build', builds and warms up, answers 'ready'; then
    (units, seconds) of one timed run per 'run'; on 'stop', (working MB, process peak MB)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    conn.recv()  # "build": the parent builds one worker at a time
    run = build(c, cfg, ckpt, device)
    with torch.no_grad() if c.kind == "sampling" else contextlib.nullcontext():
        sync(device)
        built_peak = peak_memory_mb(device)  # imports and building
        reset_peak(device)
        before = current_memory_mb(device)
        run()  # warm-up (and compilation)
        sync(device)
        conn.send("ready")
        while conn.recv() == "run":
            sync(device)
            t0 = time.perf_counter()
            units = run()
            sync(device)
            conn.send((units, time.perf_counter() - t0))
        peak = peak_memory_mb(device)
    conn.send((peak - before, max(built_peak, peak)))


def receive(conn, name):
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError(f"the worker process of '{name}' died (its traceback is above)") from None


def measure(contenders, cfg, ckpt, device, repeats, after_round=None):
    """Each contender in its own worker, built and warmed up one at a time (two at once would
    share the cores), then A B C ... for `repeats` rounds, after_round() after each (its
    workers idle). Returns {name: (median units/s, working memory MB, process peak MB)}."""
    # forked from a server that has imported torch and our modules (seconds each, once) but built
    # nothing and started no threads; each worker's memory and threads are its own
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "ddpm", "export", "sample_ort", "convert"])
    workers = {}
    try:
        for c in contenders:
            conn, worker_conn = context.Pipe()
            process = context.Process(target=serve, args=(worker_conn, c, cfg, ckpt, device, torch.get_num_threads()))
            process.start()
            worker_conn.close()
            workers[c.name] = (process, conn)
        for name, (_, conn) in workers.items():
            conn.send("build")
            assert receive(conn, name) == "ready"
        rates = {name: [] for name in workers}
        for _ in range(repeats):
            for name, (_, conn) in workers.items():
                time.sleep(SETTLE_S)  # the last worker's threads stop spinning
                conn.send("run")
                units, seconds = receive(conn, name)
                rates[name].append(units / seconds)
            if after_round:
                time.sleep(SETTLE_S)
                after_round()
        results = {}
        for name, (process, conn) in workers.items():
            conn.send("stop")
            working, process_peak = receive(conn, name)
            process.join()
            results[name] = (statistics.median(rates[name]), working, process_peak)
        return results
    finally:
        for process, _ in workers.values():
            if process.is_alive():
                process.kill()
                process.join()


# -- the run --------------------------------------------------------------------------------------

def machine_info(device):
    cpu, flags = platform.processor() or platform.machine(), []
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = [flag for flag in CPU_FLAGS if flag in line.split()]
                break
    import onnxruntime
    info = {"cpu": cpu, "cpu_flags": flags, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["diffusers"] = importlib.metadata.version("diffusers")  # not imported: it takes seconds
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="cifar10", choices=list(ddpm.PRESETS))
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on GPU")
    p.add_argument("--steps", type=int, default=None, help="sampling steps per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contenders")
    p.add_argument("--quick", action="store_true", help="tiny model, 16x16, few steps: a smoke test")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA GPU")
    load = os.getloadavg()[0]  # before any of our own work
    if load >= 0.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores before the run: other processes "
              "will disturb the timings (and the peak)", file=sys.stderr)
    torch.manual_seed(0)
    if args.quick:
        cfg = ddpm.make_config("tiny", image_size=16)
        batch, steps, train_batch, repeats, compile_ = 2, 3, 4, 2, False
    else:
        cfg = ddpm.make_config(args.model)
        batch = args.batch or (64 if device == "cuda" else 8)
        steps = args.steps or (50 if device == "cuda" else 5)
        train_batch = 128 if device == "cuda" else 16
        repeats, compile_ = args.repeats, not args.no_compile

    ours = ddpm.UNet(cfg).eval()
    flops = ddpm.count_flops(ours, cfg)
    tmp = tempfile.mkdtemp()
    ckpt = os.path.join(tmp, "ckpt.pt")
    checkpoints.save_checkpoint(ckpt, checkpoints.checkpoint_state(cfg, ours))
    onnx = {prec: os.path.join(tmp, f"{prec}.onnx") for prec in ("fp32", "fp16", "int8")}
    skipped = []
    with contextlib.redirect_stdout(sys.stderr):
        export.export(ckpt, onnx["fp32"])
        if device == "cuda":
            export.export(ckpt, onnx["fp16"], fp16=True)
        else:
            export.export(ckpt, onnx["int8"], int8=True)

    def sampler(name, model, precision="fp32", **kw):
        return Contender(name, "sampling", model, precision, batch, steps, **kw)

    sampling = [sampler("PyTorch eager fp32", "ours")]
    if compile_:
        sampling.append(sampler("PyTorch compile fp32", "ours", compile=True))
    if device == "cuda" or distributed.cpu_has_bf16():
        sampling.append(sampler("PyTorch eager bf16 autocast", "ours", "bf16"))
    else:
        skipped.append("PyTorch eager bf16 autocast: this CPU has no bf16 units (AVX512-BF16 or AMX), "
                       "so autocast would emulate bf16, slower than fp32")
    if device == "cuda":
        sampling.append(sampler("PyTorch eager fp16 autocast", "ours", "fp16"))
        for prec in ("fp32", "fp16"):
            sampling += [sampler(f"ORT CUDA {prec}, no IO binding", onnx[prec], prec, io_binding=False),
                         sampler(f"ORT CUDA {prec}, IO binding", onnx[prec], prec),
                         sampler(f"ORT CUDA {prec}, IO binding + CUDA graph", onnx[prec], prec, cuda_graph=True)]
    else:
        sampling += [sampler("ORT CPU fp32, IO binding", onnx["fp32"]),
                     sampler("ORT CPU int8, IO binding", onnx["int8"], "int8")]
    sampling.append(sampler("diffusers eager fp32", "diffusers"))
    if compile_:
        sampling.append(sampler("diffusers compile fp32", "diffusers", compile=True))

    training = [Contender("ours fp32", "training", "ours", "fp32", train_batch)]
    if device == "cuda":
        training.append(Contender("ours bf16 + compile + channels_last", "training", "ours", "bf16", train_batch,
                                  compile=True, channels_last=True))
    training.append(Contender("diffusers fp32", "training", "diffusers", "fp32", train_batch))
    print(f"{len(sampling)} sampling contenders ({cfg.preset}, batch {batch}, {steps} steps per run) and "
          f"{len(training)} training (batch {train_batch}), {repeats} repeats", file=sys.stderr)
    convs, peaks = dominant_convs(ours, cfg), {}  # (batch, precision) -> (FLOP/s, what reached it)

    def measure_peaks():  # in every round, so that drift hits the peak as it hits the contenders
        for key, found in conv_peaks(sampling + training, convs, device).items():
            peaks[key] = max(found, peaks.get(key, found))
    results = measure(sampling + training, cfg, ckpt, device, repeats, measure_peaks)

    sweep = {}
    if device == "cuda":  # how throughput grows with the batch, for the eager and the fastest path
        for b in (8, 32, 64, 128, 256):
            runs = [Contender("PyTorch eager fp32", "sampling", "ours", "fp32", b, steps),
                    Contender("ORT CUDA fp16, IO binding + CUDA graph", "sampling", onnx["fp16"], "fp16", b, steps,
                              cuda_graph=True)]
            sweep[b] = {name: rate for name, (rate, _, _) in measure(runs, cfg, ckpt, device, repeats).items()}

    matmul_n = 256 if args.quick else 8192 if device == "cuda" else 2048
    matmul = {prec: matmul_peak(device, prec, matmul_n) for prec in sorted({prec for _, prec in peaks})}

    rows = []
    for c in sampling + training:
        rate, working, process_peak = results[c.name]
        base = results["PyTorch eager fp32" if c.kind == "sampling" else "ours fp32"][0]
        achieved = flops * rate * (3 if c.kind == "training" else 1)  # forward + backward: about 3 forwards
        peak = None if c.precision == "int8" else peaks[c.batch, c.precision][0]
        rows.append({"kind": c.kind, "contender": c.name, "precision": c.precision, "rate": rate,
                     "unit": "img/s" if c.kind == "training" else "image-steps/s", "vs_eager": rate / base,
                     "tflops": achieved / 1e12, "peak_tflops": peak and peak / 1e12,
                     "utilization": peak and achieved / peak, "peak_mem_mb": working, "process_peak_mb": process_peak})

    info = {**machine_info(device), "load_average": load}
    stamp = datetime.date.today().isoformat()
    result = {"date": stamp, "machine": info, "device": device, "model": cfg.preset, "batch": batch,
              "steps": steps, "train_batch": train_batch, "forward_gflops": flops / 1e9,
              "conv_peaks": [{"batch": b, "precision": prec, "tflops": rate / 1e12, "reached_by": what}
                             for (b, prec), (rate, what) in peaks.items()],
              "matmul_peaks": {"n": matmul_n, **{prec: rate / 1e12 for prec, rate in matmul.items()}},
              "rows": rows, "batch_sweep": sweep, "skipped": skipped}
    os.makedirs(args.out, exist_ok=True)
    name = "quick" if args.quick else f"{device}-{info.get('gpu', info['cpu'])}"
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)

    flags = ", ".join(info["cpu_flags"]) or "no AVX-512/AMX"
    print(f"\n{stamp}, {info.get('gpu', info['cpu'])} ({info['cpu_capability']}; {flags}), {info['threads']} threads, "
          f"load {load:.1f} at the start, torch {info['torch']}, onnxruntime {info['onnxruntime']}, "
          f"diffusers {info.get('diffusers', '-')}")
    print(f"{cfg.preset} preset, {flops / 1e9:.2f} GFLOPs per forward (torch's flop counter, 2 per multiply-add)")
    for (b, prec), (rate, what) in peaks.items():
        print(f"peak {prec} at batch {b}: {rate / 1e12:.3f} TFLOP/s ({what})")
    print(f"reference, not used: a {matmul_n}x{matmul_n} torch.matmul, "
          + ", ".join(f"{prec} {rate / 1e12:.3f} TFLOP/s" for prec, rate in matmul.items()))
    for note in skipped:
        print(f"skipped: {note}")
    for r in rows:
        if r["utilization"] is not None and r["utilization"] > 1:
            print(f"warning: {r['contender']} reads {100 * r['utilization']:.0f}% of its peak: the peak or the "
                  "FLOP count is wrong on this machine (see the module docstring), or the run was disturbed")
    if sweep:
        names = list(next(iter(sweep.values())))
        print("\n| batch | " + " | ".join(f"{n} (image-steps/s)" for n in names) + " |")
        print("|---|" + "---|" * len(names))
        for b, rates in sweep.items():
            print(f"| {b} | " + " | ".join(f"{rates[n]:.0f}" for n in names) + " |")
    print("\n| what | contender | throughput | vs ours eager | achieved TFLOP/s | utilization | "
          "peak working memory | process peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        utilization = "n/a" if r["utilization"] is None else f"{100 * r['utilization']:.1f}%"
        print(f"| {r['kind']} | {r['contender']} | {r['rate']:.1f} {r['unit']} | {r['vs_eager']:.2f}x | "
              f"{r['tflops']:.3f} | {utilization} | {r['peak_mem_mb']:.0f} MB | {r['process_peak_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
