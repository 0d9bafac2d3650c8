"""Sampling and training speed, side by side in one run: our PyTorch path, our ONNX Runtime path
and the peer (diffusers' UNet2DModel with the same config, driving the same loop), against the
machine's own peak.

  python bench/bench.py                  # CPU: cifar10 preset, batch 8 (make bench)
  python bench/bench.py --device cuda    # GPU: batch 64 plus a batch sweep (make bench-gpu)
  python bench/bench.py --quick          # tiny model, a few steps: the smoke test in make test

Rules: a warm-up run first; CUDA synchronised before every clock read; contenders alternate
(A B C A B C ...) so drift hits all alike; the median of the repeats is reported, as
image-steps/s (sampling) or images/s (training), with the ratio to PyTorch eager. Achieved
FLOP/s = forward FLOPs (torch's flop counter) x throughput; utilization = that over the peak of
a large matrix product in the same precision, measured in the same run. Peak memory is each
path's working memory: the rise of the RSS high-water mark (reset before each contender) over
the RSS before its first run on CPU, of max allocated over allocated on GPU. Weights loaded
before that (every model lives in this one process) are not in it.
Prints a markdown table last and writes a JSON copy to bench/results/<machine>.json.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import convert  # noqa: E402
import ddpm  # noqa: E402
import export  # noqa: E402
import sample_ort  # noqa: E402


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


def peak_flops(device, dtype, n):
    """FLOP/s of an n x n x n matrix product: the machine's practical peak in that precision."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


# -- contenders: each is a function run() -> units of work done (image-steps or images) -------------

def torch_sampler(model, cfg, batch, steps, device, amp=None):
    diffusion = ddpm.GaussianDiffusion.from_config(cfg)
    x_T = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    autocast = torch.autocast(device, dtype=amp) if amp else contextlib.nullcontext()

    def run():
        with autocast:
            ddpm.sample_loop(model, diffusion, x_T, "ddim", steps=steps, eta=1.0,
                             generator=torch.Generator(device=device).manual_seed(0))
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
    ts, coefs = sample_ort.step_table(meta["betas"], "ddim", steps, 1.0)
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    if io_binding:
        sampler = sample_ort.Sampler(denoiser, step, shape, device)

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


def train_step(model, cfg, batch, device, amp=None):
    diffusion = ddpm.GaussianDiffusion.from_config(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device).clamp(-1, 1)
    autocast = torch.autocast(device, dtype=amp) if amp else contextlib.nullcontext()

    def run():
        i = torch.randint(0, cfg.T, (batch,))  # on the CPU, as ddpm.train: no sync to index the tables
        with autocast:
            loss = diffusion.training_loss(model, x0, i, torch.randn_like(x0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch
    return run


def measure(contenders, device, repeats):
    """Warm up each, then alternate A B C ... for `repeats` rounds; median units/s and peak memory."""
    times = {name: [] for name in contenders}
    peaks = {}
    for name, run in contenders.items():
        sync(device)
        reset_peak(device)
        before = current_memory_mb(device)
        run()  # warm-up (and compilation)
        sync(device)
        peaks[name] = peak_memory_mb(device) - before  # working memory of this path alone
    for _ in range(repeats):
        for name, run in contenders.items():
            sync(device)
            t0 = time.perf_counter()
            units = run()
            sync(device)
            times[name].append(units / (time.perf_counter() - t0))
    return {name: (statistics.median(v), peaks[name]) for name, v in times.items()}


# -- the run --------------------------------------------------------------------------------------

def machine_info(device):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import onnxruntime
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    with contextlib.suppress(ImportError):
        import diffusers
        info["diffusers"] = diffusers.__version__
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
    provider = "cuda" if device == "cuda" else "cpu"

    ours = ddpm.UNet(cfg).to(device).eval()
    peer = DiffusersEps(diffusers_unet(cfg)).to(device).eval()
    flops = ddpm.count_flops(ddpm.UNet(cfg).eval(), cfg)
    tmp = tempfile.mkdtemp()
    ckpt = os.path.join(tmp, "ckpt.pt")
    ddpm.save_checkpoint(ckpt, ddpm.checkpoint_state(cfg, ours.cpu()))
    ours.to(device)
    with contextlib.redirect_stdout(sys.stderr):
        export.export(ckpt, os.path.join(tmp, "fp32.onnx"))
        if device == "cuda":
            export.export(ckpt, os.path.join(tmp, "fp16.onnx"), fp16=True)

    sampling = {"PyTorch eager fp32": torch_sampler(ours, cfg, batch, steps, device)}
    if compile_:
        sampling["PyTorch compile fp32"] = torch_sampler(torch.compile(ours), cfg, batch, steps, device)
    if device == "cuda":
        sampling["PyTorch eager bf16"] = torch_sampler(ours, cfg, batch, steps, device, torch.bfloat16)
        sampling["PyTorch eager fp16"] = torch_sampler(ours, cfg, batch, steps, device, torch.float16)
        for prec in ("fp32", "fp16"):
            path = os.path.join(tmp, f"{prec}.onnx")
            sampling[f"ORT CUDA {prec}, no IO binding"] = ort_sampler(path, cfg, batch, steps, provider, False)
            sampling[f"ORT CUDA {prec}, IO binding"] = ort_sampler(path, cfg, batch, steps, provider)
            sampling[f"ORT CUDA {prec}, IO binding + CUDA graph"] = ort_sampler(path, cfg, batch, steps, provider,
                                                                                True, True)
    else:
        sampling["ORT CPU fp32, IO binding"] = ort_sampler(os.path.join(tmp, "fp32.onnx"), cfg, batch, steps, provider)
    sampling["diffusers eager fp32"] = torch_sampler(peer, cfg, batch, steps, device)
    if compile_:
        sampling["diffusers compile fp32"] = torch_sampler(torch.compile(peer), cfg, batch, steps, device)

    print(f"sampling: {cfg.model}, batch {batch}, {steps} steps per run, {repeats} repeats", file=sys.stderr)
    with torch.no_grad():
        sample_results = measure(sampling, device, repeats)

    sweep = {}
    if device == "cuda":  # how throughput grows with the batch, for the eager and the fastest path
        for b in (8, 32, 64, 128, 256):
            runs = {"PyTorch eager fp32": torch_sampler(ours, cfg, b, steps, device),
                    "ORT CUDA fp16, IO binding + CUDA graph": ort_sampler(
                        os.path.join(tmp, "fp16.onnx"), cfg, b, steps, provider, True, True)}
            with torch.no_grad():
                sweep[b] = {name: rate for name, (rate, _) in measure(runs, device, repeats).items()}

    ours_train = ddpm.UNet(cfg).to(device).train()
    peer_train = DiffusersEps(diffusers_unet(cfg)).to(device).train()
    training = {"ours fp32": train_step(ours_train, cfg, train_batch, device)}
    if device == "cuda":
        fast = torch.compile(ours_train.to(memory_format=torch.channels_last))
        training["ours bf16 + compile + channels_last"] = train_step(fast, cfg, train_batch, device, torch.bfloat16)
    training["diffusers fp32"] = train_step(peer_train, cfg, train_batch, device)
    print(f"training: batch {train_batch}", file=sys.stderr)
    train_results = measure(training, device, repeats)

    peak32 = peak_flops(device, torch.float32, 256 if args.quick else 2048)
    peak16 = peak_flops(device, torch.bfloat16, 8192) if device == "cuda" else None
    rows = []
    base = sample_results["PyTorch eager fp32"][0]
    for name, (rate, mem) in sample_results.items():
        peak = peak16 if peak16 and ("fp16" in name or "bf16" in name) else peak32
        achieved = flops * rate
        rows.append({"kind": "sampling", "contender": name, "rate": rate, "unit": "image-steps/s",
                     "vs_eager": rate / base, "tflops": achieved / 1e12, "utilization": achieved / peak,
                     "peak_mem_mb": mem})
    base = train_results["ours fp32"][0]
    for name, (rate, mem) in train_results.items():
        peak = peak16 if peak16 and "bf16" in name else peak32
        achieved = 3 * flops * rate  # forward + backward is about 3 forwards
        rows.append({"kind": "training", "contender": name, "rate": rate, "unit": "img/s",
                     "vs_eager": rate / base, "tflops": achieved / 1e12, "utilization": achieved / peak,
                     "peak_mem_mb": mem})

    info = machine_info(device)
    stamp = datetime.date.today().isoformat()
    result = {"date": stamp, "machine": info, "device": device, "model": cfg.model, "batch": batch,
              "steps": steps, "train_batch": train_batch, "forward_gflops": flops / 1e9,
              "peak_tflops_fp32": peak32 / 1e12, "peak_tflops_bf16": peak16 and peak16 / 1e12, "rows": rows,
              "batch_sweep": sweep}
    os.makedirs(args.out, exist_ok=True)
    name = "quick" if args.quick else f"{device}-{info.get('gpu', info['cpu'])}"
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)

    print(f"\n{stamp}, {info.get('gpu', info['cpu'])}, {info['threads']} threads, torch {info['torch']}, "
          f"onnxruntime {info['onnxruntime']}, diffusers {info.get('diffusers', '-')}")
    print(f"{cfg.model} preset, {flops / 1e9:.2f} GFLOPs per forward; peak fp32 matmul "
          f"{peak32 / 1e12:.2f} TFLOP/s" + (f", bf16 {peak16 / 1e12:.0f} TFLOP/s" if peak16 else ""))
    if sweep:
        names = list(next(iter(sweep.values())))
        print("\n| batch | " + " | ".join(f"{n} (image-steps/s)" for n in names) + " |")
        print("|---|" + "---|" * len(names))
        for b, rates in sweep.items():
            print(f"| {b} | " + " | ".join(f"{rates[n]:.0f}" for n in names) + " |")
    print("\n| what | contender | throughput | vs ours eager | achieved TFLOP/s | utilization | peak working memory |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['contender']} | {r['rate']:.1f} {r['unit']} | {r['vs_eager']:.2f}x | "
              f"{r['tflops']:.3f} | {100 * r['utilization']:.1f}% | {r['peak_mem_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
