"""GPU readiness: every CUDA path of the project, run and measured in one go (make gpu-check).

  python bench/gpu_check.py              # on a CUDA GPU: about 9 minutes at most
  python bench/gpu_check.py --rehearse   # the same script end to end on the CPU, tiny sizes (make
                                         # gpu-check REHEARSE=1; a test in make test runs it)

Stages, in order, each in its own process with a time limit, each writing its result as soon as
it has one; a stage that fails or runs out of time records why and the next one still runs:
  tests      the `gpu`-marked tests (CUDA against the CPU)
  train      the preset at its batch: bf16 autocast + channels-last, eager and torch.compile'd, and
             diffusers' UNet2DModel of the same configuration through the same ddpm.train_step;
             images/s, peak memory, the share of the GPU's bf16 peak; then fp16 with the loss
             scaler for a few dozen steps (no NaN, the scaler's scale finite)
  auto_batch `--batch-size auto`: the batch it picks, then steps at that batch
  torchrun   `torchrun` (NCCL on CUDA, gloo on a CPU) with one process, two where there are two
             GPUs, against the plain one-process run: the weights must be equal
  sampling   n images x T steps of DDPM: PyTorch eager and compiled, ONNX Runtime (CUDA with IO
             binding, with CUDA graphs, an fp16 file), DPM-Solver++ at 20 steps; seconds, the
             difference of a short trajectory from the CPU float32 one (same x_T and noise),
             and host<->device copies per step counted by the profilers
  distill    progressive distillation: one short round (2 x 4 -> 4 steps) of the preset at its
             batch in bf16, its optimizer steps/s (each runs the teacher's two float32 DDIM steps
             too); then the 4-step student's images/s through ONNX Runtime against its teacher's at
             100 DDIM and 1000 DDPM steps, same file size and batch
What a stage needs and the machine lacks (no GPU, a CPU-only onnxruntime, no diffusers) is one
sentence saying what to install; the rest of the stage still runs. Writes the JSON to
bench/results/gpu-check-<machine>.json (--out) and prints the Markdown table the README shows.
"""
import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

STAGES = ("tests", "train", "auto_batch", "torchrun", "sampling", "distill")
# full: Ho et al.'s CIFAR-10 network at their batch; rehearse: seconds on a CPU, and torch.compile
# traced by dynamo but run eagerly (the "eager" backend): the script's path without a minute of
# C++ code generation per compiled model that only a GPU's numbers would justify
SIZES = {
    "full": dict(preset="cifar10", image_size=32, batch=128, warm=5, timed=20, fp16_steps=40, n=64, T=1000,
                 dpm_steps=20, diff_n=2, diff_steps=20, compiler="inductor", student_steps=4, teacher_steps=(100, 1000),
                 budget={"tests": 60, "train": 150, "auto_batch": 45, "torchrun": 60, "sampling": 150, "distill": 90}),
    "rehearse": dict(preset="tiny", image_size=16, batch=4, warm=1, timed=2, fp16_steps=3, n=2, T=10,
                     dpm_steps=5, diff_n=2, diff_steps=5, compiler="eager", student_steps=2, teacher_steps=(5, 10),
                     budget={"tests": 60, "train": 90, "auto_batch": 30, "torchrun": 60, "sampling": 60, "distill": 60}),
}
# Dense bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, matched in the device's name.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
GOALS = {"train_img_s": 5400, "ort_cuda_graph_s": 2.0, "ort_vs_compiled": 1.2}  # issue 25's targets


def machine():
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def missing(what, install):
    return {"status": "missing", "note": f"{what} is not usable here: {install}"}


# -- the stages (each run in its own process by run_stage) --------------------------------------

def stage_tests(size, device):
    """pytest -m gpu: every test that needs CUDA (skipped with its reason where there is none), from
    the test files that mark some (collecting the others would only import them)."""
    folder = os.path.join(ROOT, "tests")
    marked = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.startswith("test_") and f.endswith(".py")
              and "mark.gpu" in open(os.path.join(folder, f)).read()]
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs", *marked],
                       capture_output=True, text=True, cwd=ROOT)
    summary = (r.stdout.strip().splitlines() or ["no output"])[-1]
    return {"status": "ok" if r.returncode in (0, 5) else "failed", "summary": summary.strip("= "),
            "note": "" if r.returncode in (0, 5) else r.stdout[-1500:]}


def train_speed(run, size):
    """(images/s, peak MB, losses) of a ddpm.Run's train_step on one batch of noise images."""
    import torch
    cfg, device = run.cfg, run.device
    x0 = torch.randn(cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=device).clamp(-1, 1)
    labels = torch.zeros(cfg.batch_size, dtype=torch.long)
    losses = []
    for step in range(size["warm"]):
        losses.append(run.train_step(x0, labels, step)[0])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for step in range(size["warm"], size["warm"] + size["timed"]):
        losses.append(run.train_step(x0, labels, step)[0])
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return cfg.batch_size * size["timed"] / seconds, peak, losses


def stage_train(size, device):
    import torch
    import ddpm
    import distributed
    cfg = ddpm.make_config(size["preset"], image_size=size["image_size"], batch_size=size["batch"], warmup=1)
    dtype = torch.bfloat16 if device.type == "cuda" else distributed.amp_dtype("auto", device)
    flops = 3 * ddpm.count_flops(ddpm.UNet(cfg), cfg)  # forward + backward, per image
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in machine()), None) if device.type == "cuda" else None
    rows = []
    result = {"status": "ok", "precision": "bf16" if dtype else "fp32", "rows": rows}
    contenders = [("ours, eager", False), ("ours, torch.compile", True), ("diffusers UNet2DModel", False)]
    for name, compiled in contenders:
        try:
            if name.startswith("diffusers"):
                import bench
                raw = bench.DiffusersEps(bench.diffusers_unet(cfg))
            else:
                torch.manual_seed(0)
                raw = ddpm.UNet(cfg)
            run = ddpm.Run(cfg, ddpm.GaussianDiffusion.from_config(cfg), device, dtype, init=raw)
            if compiled:
                run.model = torch.compile(run.raw_model, backend=size["compiler"])
            ips, mb, losses = train_speed(run, size)
            tflops = ips * flops / 1e12
            rows.append({"name": name, "img_per_s": ips, "peak_mb": mb, "tflops": tflops,
                         "share_of_bf16_peak": tflops / peak if peak and dtype else None,
                         "finite": all(map(math.isfinite, losses))})
        except ImportError as e:
            rows.append({"name": name, **missing(e.name or "a package", f"pip install {e.name or 'diffusers'}")})
        except Exception as e:  # a contender that fails does not stop the others
            rows.append({"name": name, "status": "failed", "note": f"{type(e).__name__}: {str(e)[:300]}"})
    if device.type != "cuda":
        result["fp16"] = missing("fp16 with the loss scaler", "it needs CUDA; run this on a GPU")
        return result
    run = ddpm.Run(cfg, ddpm.GaussianDiffusion.from_config(cfg), device, torch.float16)  # its loss scaler on
    _, _, losses = train_speed(run, dict(size, warm=0, timed=size["fp16_steps"]))
    scale = run.scaler.get_scale()
    result["fp16"] = {"steps": len(losses), "finite_losses": sum(map(math.isfinite, losses)),
                      "scale": scale, "status": "ok" if scale > 0 and scale < float("inf") else "failed"}
    return result


def stage_auto_batch(size, device):
    import torch
    import ddpm
    import distributed
    if device.type != "cuda":
        return missing("--batch-size auto", "it measures GPU memory, so it needs CUDA")
    cfg = ddpm.make_config(size["preset"], image_size=size["image_size"], batch_size=0)
    run = ddpm.Run(cfg, ddpm.GaussianDiffusion.from_config(cfg), device, torch.bfloat16)
    batch, accum = distributed.auto_batch(run, 1_000_000)
    run.cfg = ddpm.make_config(size["preset"], image_size=size["image_size"], batch_size=batch, warmup=1)
    ips, mb, losses = train_speed(run, dict(size, warm=1, timed=3))
    return {"status": "ok", "batch": batch, "img_per_s": ips, "peak_mb": mb,
            "total_mb": torch.cuda.get_device_properties(device).total_memory / 2 ** 20}


def train_command(folder, name, device, extra=()):
    return ["ddpm.py", "train", "--data", "shapes", "--model", "tiny", "--image-size", "16", "--steps", "3",
            "--batch-size", "8", "--warmup", "1", "--num-workers", "0", "--no-tensorboard", "--sample-every", "0",
            "--device", device, "--out", os.path.join(folder, name), "--ckpt", os.path.join(folder, f"{name}.pt"),
            *extra]


def stage_torchrun(size, device):
    import torch
    with tempfile.TemporaryDirectory() as folder:
        kind = "cuda" if device.type == "cuda" else "cpu"
        env = dict(os.environ, OMP_NUM_THREADS="1")  # the same threads in every run: the same sums
        r = subprocess.run([sys.executable, *train_command(folder, "plain", kind)], capture_output=True,
                           text=True, cwd=ROOT, env=env)
        if r.returncode:
            return {"status": "failed", "note": r.stderr[-800:]}
        plain = torch.load(os.path.join(folder, "plain.pt"), weights_only=True)["model"]
        runs = {}
        for world in (1, 2) if torch.cuda.device_count() >= 2 else (1,):
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                       *train_command(folder, f"world{world}", kind)]
            r = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
            if r.returncode:
                runs[world] = {"status": "failed", "note": r.stderr[-800:]}
                continue
            weights = torch.load(os.path.join(folder, f"world{world}.pt"), weights_only=True)["model"]
            diff = max((weights[k].float() - plain[k].float()).abs().max().item() for k in plain)
            runs[world] = {"status": "ok", "max_weight_difference": diff}
    backend = "nccl" if device.type == "cuda" else "gloo"
    return {"status": "ok" if all(r["status"] == "ok" for r in runs.values()) else "failed", "backend": backend,
            "processes": runs}


def torch_copies_per_step(run, steps):
    """Host<->device copies per step while run() samples, counted by torch.profiler (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    copies = sum(e.count for e in prof.key_averages() if "Memcpy HtoD" in e.key or "Memcpy DtoH" in e.key)
    return copies / steps


def stage_sampling(size, device):
    import numpy as np
    import torch
    from schedules import Sampler
    import checkpoints
    import ddpm
    import export
    import sample_ort
    cfg = ddpm.make_config(size["preset"], image_size=size["image_size"], T=size["T"],
                           schedule="linear" if size["T"] > 20 else "cosine")
    torch.manual_seed(0)
    model = ddpm.UNet(cfg).eval()
    diffusion = ddpm.GaussianDiffusion.from_config(cfg)
    rows = []
    # the short trajectory every row is compared on: the CPU float32 result, same x_T and noise
    rng = np.random.default_rng(0)
    n, k = size["diff_n"], size["diff_steps"]
    x_T_small = rng.standard_normal((n, 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    noise_small = rng.standard_normal((k, n, 3, cfg.image_size, cfg.image_size), dtype=np.float32)

    def torch_trajectory(net, sampler, dev):
        return ddpm.sample_loop(net, diffusion, torch.from_numpy(x_T_small).to(dev), Sampler(sampler, k), noise_fn=lambda j, shape: torch.from_numpy(noise_small[j])).cpu().numpy()
    reference = {s: torch_trajectory(model, s, torch.device("cpu")) for s in ("ddpm", "dpm++")}

    def timed(name, run, steps, trajectory, copies=None):
        try:
            run()  # warm-up (compiles, captures)
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            seconds = time.perf_counter() - t0
            sampler = "dpm++" if "DPM-Solver" in name else "ddpm"
            rows.append({"name": name, "seconds": seconds, "image_steps_per_s": size["n"] * steps / seconds,
                         "trajectory_max_abs_diff": float(np.abs(trajectory() - reference[sampler]).max()),
                         "copies_per_step": copies() if copies else None, "status": "ok"})
        except ValueError as e:  # a sentence from our code: what is missing
            rows.append({"name": name, "status": "missing", "note": str(e)})
        except Exception as e:
            rows.append({"name": name, "status": "failed", "note": f"{type(e).__name__}: {str(e)[:300]}"})

    net = model.to(device)
    x_T = torch.randn(size["n"], 3, cfg.image_size, cfg.image_size, device=device)
    T, dpm = cfg.T, size["dpm_steps"]
    for name, compiled in (("PyTorch eager", False), ("PyTorch torch.compile", True)):
        runner = torch.compile(net, backend=size["compiler"]) if compiled else net

        def run(runner=runner, sampler="ddpm", steps=None):
            return ddpm.sample_loop(runner, diffusion, x_T, Sampler(sampler, steps))
        copies = (lambda run=run: torch_copies_per_step(run, T)) if device.type == "cuda" else None
        timed(f"{name}, DDPM {T} steps", run, T, lambda r=runner: torch_trajectory(r, "ddpm", device), copies)
    timed(f"PyTorch eager, DPM-Solver++ {dpm} steps", lambda: ddpm.sample_loop(net, diffusion, x_T, Sampler("dpm++", dpm)),
          dpm, lambda: torch_trajectory(net, "dpm++", device))

    provider = "cuda" if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        ckpt = os.path.join(folder, "ckpt.pt")
        checkpoints.save_checkpoint(ckpt, checkpoints.checkpoint_state(cfg, model.cpu()))
        export.export(ckpt, os.path.join(folder, "fp32.onnx"))
        export.export(ckpt, os.path.join(folder, "fp16.onnx"), fp16=True)
        variants = [("fp32", False, "ddpm"), ("fp32", True, "ddpm"), ("fp16", False, "ddpm"), ("fp32", False, "dpm++")]
        for precision, graph, sampler in variants:
            path = os.path.join(folder, f"{precision}.onnx")
            steps = dpm if sampler == "dpm++" else T
            name = (f"ONNX Runtime {provider.upper()} {precision}" + (", CUDA graphs" if graph else "")
                    + (f", DPM-Solver++ {dpm} steps" if sampler == "dpm++" else f", DDPM {T} steps"))
            if graph and provider != "cuda":
                rows.append({"name": name, **missing("CUDA graphs", "they need a GPU and onnxruntime-gpu")})
                continue
            timed(name, *ort_runs(path, provider, graph, sampler, steps, size, x_T_small, noise_small))
    return {"status": "ok", "rows": rows}


def ort_runs(path, provider, graph, sampler, steps, size, x_T_small, noise_small):
    """(run, steps, trajectory, copies) for one ONNX Runtime row; copies from ORT's own profile."""
    import numpy as np
    import sample_ort
    import schedules
    from schedules import Sampler
    denoiser, step, meta, device = sample_ort.open_sessions(path, provider, graph, size["n"],
                                                            multistep=sampler == "dpm++")
    shape = (size["n"], meta["in_channels"], meta["image_size"], meta["image_size"])
    ts, coefs = schedules.step_table(meta["betas"], Sampler(sampler, steps), meta["var_type"])
    runner = sample_ort.Runner(denoiser, step, shape, device)
    noise = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    x_T = np.random.default_rng(2).standard_normal(shape, dtype=np.float32)

    def trajectory():
        small = sample_ort.Runner(*sample_ort.open_sessions(path, provider, False, None,
                                                             multistep=sampler == "dpm++")[:2],
                                   x_T_small.shape, device)
        t_small, c_small = schedules.step_table(meta["betas"], Sampler(sampler, size["diff_steps"]), meta["var_type"])
        return small.run(x_T_small, t_small, c_small, lambda j, s: noise_small[j])

    def copies():
        """Memcpy nodes ONNX Runtime ran per step, from a profiled session pair (none with IO binding)."""
        options = sample_ort.session_options(size["n"] if graph else None)
        options.enable_profiling = True
        import onnxruntime as ort
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        with tempfile.TemporaryDirectory() as folder:  # the profile is read here, not left in the clone
            options.profile_file_prefix = os.path.join(folder, "ort_profile")
            profiled = ort.InferenceSession(path, options, providers=providers)
            probe = sample_ort.Runner(profiled, step, shape, device)
            probe.run(x_T, ts[:10], coefs[:10], lambda j, s: noise)
            with open(profiled.end_profiling()) as f:
                events = json.load(f)
        return sum("Memcpy" in e.get("name", "") for e in events if e.get("cat") == "Node") / 10
    return (lambda: runner.run(x_T, ts, coefs, lambda j, s: noise)), steps, trajectory, copies


def ort_images_per_s(path, provider, sampler, n):
    """(images/s, steps) of sample_ort's reverse process for the file at `path` with the
    schedules.Sampler given (a student: its own), n images in one batch, after a 2-step warm-up."""
    import numpy as np
    import sample_ort
    import schedules
    (denoiser, step, meta, device), (sampler, _, _) = sample_ort.open_for_sampling(path, sampler, provider=provider, batch=n)
    ts, coefs = schedules.step_table(meta["betas"], sampler, meta["var_type"])
    shape = (n, meta["in_channels"], meta["image_size"], meta["image_size"])
    runner = sample_ort.Runner(denoiser, step, shape, device, clip_x0=meta["clip_x0"])
    x_T = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    noise = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    runner.run(x_T, ts[:2], coefs[:2], lambda j, s: noise)
    t0 = time.perf_counter()
    runner.run(x_T, ts, coefs, lambda j, s: noise)
    return n / (time.perf_counter() - t0), len(ts)


def stage_distill(size, device):
    import dataclasses
    import torch
    from schedules import Sampler
    import checkpoints
    import ddpm
    import distill
    import distributed
    import export
    steps, (few, many) = size["student_steps"], size["teacher_steps"]
    cfg_teacher = ddpm.make_config(size["preset"], image_size=size["image_size"], T=size["T"], batch_size=size["batch"],
                                   warmup=0, schedule="linear" if size["T"] > 20 else "cosine")
    cfg = dataclasses.replace(cfg_teacher, prediction="v", distilled_steps=steps, cosine_lr=True)
    torch.manual_seed(0)
    teacher = ddpm.UNet(cfg_teacher)
    dtype = torch.bfloat16 if device.type == "cuda" else distributed.amp_dtype("auto", device)
    run = ddpm.Run(cfg, distill.Distillation(cfg, teacher, cfg_teacher, steps), device, dtype, init=teacher)
    img_s, peak, losses = train_speed(run, size)
    result = {"status": "ok", "precision": "bf16" if dtype else "fp32", "round": f"{2 * steps} -> {steps} steps",
              "batch": cfg.batch_size, "optimizer_steps_per_s": img_s / cfg.batch_size, "peak_mb": peak,
              "finite": all(map(math.isfinite, losses))}
    provider = "cuda" if device.type == "cuda" else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, config, model, sampler in (("student", cfg, run.raw_model, Sampler(None)),
                                             ("teacher", cfg_teacher, teacher, Sampler("ddim", few)),
                                             ("teacher", cfg_teacher, teacher, Sampler("ddpm", many))):
            path = os.path.join(folder, f"{name}.onnx")
            if not os.path.exists(path):
                ckpt = os.path.join(folder, f"{name}.pt")
                checkpoints.save_checkpoint(ckpt, checkpoints.checkpoint_state(config, model.cpu().float()))
                export.export(ckpt, path)
            try:
                ips, taken = ort_images_per_s(path, provider, sampler, size["n"])
                rows.append({"name": f"{name}, {sampler.name or 'ddim'} {taken} steps", "img_per_s": ips, "status": "ok"})
            except ValueError as e:  # a sentence from our code: what is missing
                rows.append({"name": name, "status": "missing", "note": str(e)})
    student = rows[0].get("img_per_s")
    for row in rows[1:]:
        if student and row.get("img_per_s"):
            row["student_speedup"] = student / row["img_per_s"]
    result.update(provider=provider, rows=rows)
    return result


# -- running the stages and writing the results ---------------------------------------------------

def run_stage(stage, size_name, out_json, budget):
    """The stage in a child process with a time limit: its result, or why there is none."""
    t0 = time.time()
    command = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--size", size_name, "--out", out_json]
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=budget, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "note": f"no result within its {budget} s", "seconds": budget}
    if r.returncode or not os.path.exists(out_json):
        return {"status": "failed", "note": (r.stderr or r.stdout)[-1500:], "seconds": time.time() - t0}
    with open(out_json) as f:
        return {**json.load(f), "seconds": time.time() - t0}


def table(results):
    """The Markdown table: one row per measured thing; what did not run says why."""
    lines = ["| stage | what | result |", "|---|---|---|"]
    for stage in STAGES:
        r = results.get(stage, {"status": "not run yet"})
        if r.get("status") not in ("ok",) and not r.get("rows"):
            lines.append(f"| {stage} | | {r.get('status')}: {r.get('note', '')[:200]} |".replace("\n", " "))
            continue
        if stage == "tests":
            lines.append(f"| tests | `pytest -m gpu` | {r['summary']} |")
        if stage == "distill":
            mem = f", peak {r['peak_mb']:.0f} MB" if r.get("peak_mb") else ""
            lines.append(f"| distill ({r['precision']}) | one round {r['round']}, batch {r['batch']} | "
                         f"{r['optimizer_steps_per_s']:.2f} optimizer steps/s{mem} |")
        for row in r.get("rows", []):
            if row.get("status", "ok") != "ok":
                lines.append(f"| {stage} | {row['name']} | {row['status']}: {row.get('note', '')[:200]} |".replace("\n", " "))
            elif stage == "distill":
                speedup = f", student {row['student_speedup']:.0f}x faster" if row.get("student_speedup") else ""
                lines.append(f"| distill | ONNX Runtime {r['provider'].upper()}, {row['name']} | "
                             f"{row['img_per_s']:.1f} img/s{speedup} |")
            elif stage == "train":
                share = f", {row['share_of_bf16_peak']:.0%} of bf16 peak" if row.get("share_of_bf16_peak") else ""
                mem = f", peak {row['peak_mb']:.0f} MB" if row.get("peak_mb") else ""
                lines.append(f"| train ({r['precision']}) | {row['name']} | {row['img_per_s']:.1f} img/s{mem}{share} |")
            else:
                copies = f", {row['copies_per_step']:g} copies/step" if row.get("copies_per_step") is not None else ""
                lines.append(f"| sampling | {row['name']} | {row['seconds']:.2f} s, trajectory diff "
                             f"{row['trajectory_max_abs_diff']:.1e}{copies} |")
        if stage == "train" and "fp16" in r:
            f16 = r["fp16"]
            text = (f"{f16['finite_losses']} of {f16['steps']} losses finite, scale {f16['scale']:g}"
                    if f16.get("status") == "ok" else f"{f16['status']}: {f16.get('note', '')}")
            lines.append(f"| train | fp16 with the loss scaler | {text} |")
        if stage == "auto_batch" and r.get("status") == "ok":
            lines.append(f"| auto_batch | `--batch-size auto` | batch {r['batch']}, {r['img_per_s']:.0f} img/s, "
                         f"peak {r['peak_mb']:.0f} of {r['total_mb']:.0f} MB |")
        if stage == "torchrun" and r.get("processes"):
            for world, p in r["processes"].items():
                text = (f"max weight difference from 1 process {p['max_weight_difference']:.1e}"
                        if p["status"] == "ok" else f"{p['status']}: {p.get('note', '')[:200]}")
                lines.append(f"| torchrun ({r['backend']}) | {world} process(es) | {text} |".replace("\n", " "))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Run every CUDA path of the project and measure it.")
    p.add_argument("--rehearse", action="store_true",
                   help="run on the CPU with tiny sizes, to check the script itself (default: the full check)")
    p.add_argument("--out", default=None, help="the JSON file (default: bench/results/gpu-check-<machine>.json)")
    p.add_argument("--stage", choices=STAGES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", choices=list(SIZES), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:  # a child: one stage, its result in --out
        import torch
        size = SIZES[args.size]
        device = torch.device("cpu" if args.size == "rehearse" or not torch.cuda.is_available() else "cuda")
        torch.set_num_threads(max(1, torch.get_num_threads()))
        try:
            result = globals()[f"stage_{args.stage}"](size, device)
        except Exception as e:
            result = {"status": "failed", "note": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}"}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        return 0
    size_name = "rehearse" if args.rehearse else "full"
    import torch
    if not args.rehearse and not torch.cuda.is_available():
        raise SystemExit("error: no usable CUDA GPU here; run `make gpu-check REHEARSE=1` to rehearse on the CPU")
    name = machine()
    out = args.out or os.path.join(HERE, "results", f"gpu-check-{''.join(c if c.isalnum() else '_' for c in name)}"
                                                    f"{'-rehearsal' if args.rehearse else ''}.json")
    results = {"date": datetime.date.today().isoformat(), "machine": name, "size": size_name,
               "torch": torch.__version__, "goals": GOALS}
    start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        for stage in STAGES:
            budget = SIZES[size_name]["budget"][stage]
            print(f"{stage}: running (at most {budget} s)", flush=True)
            results[stage] = run_stage(stage, size_name, os.path.join(folder, f"{stage}.json"), budget)
            print(f"{stage}: {results[stage]['status']} in {results[stage]['seconds']:.0f} s", flush=True)
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:  # after every stage: a later crash keeps what was measured
                json.dump(results, f, indent=1, default=str)
    results["seconds"] = time.time() - start
    results["table"] = table(results)
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\n{name} ({size_name}), {results['seconds']:.0f} s in all; {out}\n")
    print(results["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
