"""Solver error, not speed: how far each sampler's x_0 lands from the probability-flow ODE's.

  python bench/solver_error.py --ckpt runs/demo/ckpt.pt            # the table in docs/performance.md
  python bench/solver_error.py --ckpt ckpt.pt --onnx ddpm_int8.onnx  # also an exported model's cost

From the same x_T, a trained model's probability-flow ODE solution is approximated by DDIM with
eta 0 at every one of the T steps (Song et al. 2021: DDIM with eta 0 is the ODE's Euler method in
the right variables). Every deterministic sampler (DDIM, DPM-Solver++(2M)) at 10/20/50/100 steps
and each --spacing is then a solver of the same ODE, and its distance to that reference is its
solver error: RMS over pixels (images in [-1, 1]) and in 8-bit levels (x 127.5), mean over the
images. The model's own x_0 clipping is kept, as a user samples it.

--onnx FILE runs DPM-Solver++ and DDIM at 20 steps through ONNX Runtime (sample_ort.Runner, the
same x_T) with an exported model, against the same PyTorch float32 reference: the quality cost of
an export (fp16, int8) in the same units. The 1000-step reference is the slowest part; one x_T
batch is shared by all rows. Prints a markdown table; writes bench/results/solver_error-<host>.json.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import ddpm  # noqa: E402
import sample_ort  # noqa: E402
import schedules  # noqa: E402
from schedules import Sampler  # noqa: E402


def rms(a, b):
    """Root mean square difference per image, then the mean over images."""
    return float(((a - b) ** 2).mean(axis=(1, 2, 3)).sqrt().mean()) if torch.is_tensor(a) else \
        float(np.sqrt(((a - b) ** 2).mean(axis=(1, 2, 3))).mean())


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main(argv=None):
    p = argparse.ArgumentParser(description="Distance of each sampler's result to the probability-flow "
                                            "ODE solution (DDIM eta 0 at T steps) from the same x_T.")
    p.add_argument("--ckpt", required=True, help="a trained checkpoint (EMA weights are used)")
    p.add_argument("--n", type=int, default=16, help="images (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of x_T (default: 0)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100],
                   help="step counts (default: 10 20 50 100)")
    p.add_argument("--spacings", nargs="+", choices=schedules.SPACINGS, default=list(schedules.SPACINGS),
                   help="time spacings (default: all three)")
    p.add_argument("--samplers", nargs="+", choices=["ddim", "dpm++"], default=["ddim", "dpm++"],
                   help="deterministic samplers to compare (default: ddim dpm++)")
    p.add_argument("--onnx", nargs="*", default=[], metavar="FILE",
                   help="exported models to run through ONNX Runtime at 20 steps (default: none)")
    p.add_argument("--onnx-spacing", choices=schedules.SPACINGS, default="trailing",
                   help="the spacing of the --onnx rows (default: trailing)")
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="folder for the JSON copy (default: bench/results)")
    args = p.parse_args(argv)
    try:
        model, cfg = ddpm.load_checkpoint(args.ckpt)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.num_classes:
        print("note: a class-conditional model; sampled unconditionally ('no label')")
    torch.manual_seed(0)
    diffusion = ddpm.GaussianDiffusion.from_config(cfg)
    x_T = torch.randn(args.n, cfg.in_channels, cfg.image_size, cfg.image_size,
                      generator=torch.Generator().manual_seed(args.seed))

    def run(sampler, steps, spacing="leading"):
        start = time.perf_counter()
        x0 = ddpm.sample_loop(model, diffusion, x_T, Sampler(sampler, steps, spacing=spacing), progress=True)
        return x0, time.perf_counter() - start

    reference, ref_seconds = run("ddim", cfg.T)
    print(f"reference: DDIM eta 0, {cfg.T} steps, {args.n} images, {ref_seconds:.0f} s")
    rows, outputs = [], {}
    for spacing in args.spacings:
        for sampler in args.samplers:
            for steps in args.steps:
                x0, seconds = run(sampler, steps, spacing)
                outputs[sampler, spacing, steps] = x0.numpy()
                rows.append({"runtime": "PyTorch fp32", "sampler": sampler, "spacing": spacing, "steps": steps,
                             "rms": rms(x0, reference), "seconds": seconds})
                print(f"{sampler:6} {spacing:9} {steps:4} steps: RMS {rows[-1]['rms']:.4f}")
    for path in args.onnx:  # the PyTorch row of the same setting isolates the export's own error
        if not all((sampler, args.onnx_spacing, 20) in outputs for sampler in args.samplers):
            x0s = {sampler: run(sampler, 20, args.onnx_spacing)[0].numpy() for sampler in args.samplers}
            outputs.update({(sampler, args.onnx_spacing, 20): x for sampler, x in x0s.items()})
        try:
            denoiser, _, meta, device = sample_ort.open_sessions(path, "cpu")
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        for sampler in args.samplers:
            _, step, _, _ = sample_ort.open_sessions(path, "cpu", multistep=sampler == "dpm++")
            ts, coefs = schedules.step_table(meta["betas"], Sampler(sampler, 20, spacing=args.onnx_spacing), meta["var_type"])
            x = x_T.numpy()
            start = time.perf_counter()
            x0 = sample_ort.Runner(denoiser, step, x.shape, device).run(
                x, ts, coefs, lambda k, shape: np.zeros(shape, np.float32))  # eta 0: the noise is unused
            rows.append({"runtime": f"ORT {meta['precision']} ({os.path.basename(path)})", "sampler": sampler,
                         "spacing": args.onnx_spacing, "steps": 20, "rms": rms(x0, reference.numpy()),
                         "rms_vs_pytorch": rms(x0, outputs[sampler, args.onnx_spacing, 20]),
                         "seconds": time.perf_counter() - start})
            print(f"{rows[-1]['runtime']} {sampler} 20 steps: RMS {rows[-1]['rms']:.4f}, "
                  f"{rows[-1]['rms_vs_pytorch']:.4f} from PyTorch's")

    result = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
              "cpu": cpu_name(),
              "ckpt": os.path.abspath(args.ckpt), "preset": cfg.preset, "prediction": cfg.prediction,
              "schedule": cfg.schedule, "clip_x0": cfg.clip_x0, "n": args.n, "seed": args.seed,
              "reference_seconds": ref_seconds, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"solver_error-{platform.node() or 'machine'}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{cfg.preset} preset ({cfg.prediction}, {cfg.schedule} schedule, clip {cfg.clip_x0}), {args.n} images; "
          f"distance to DDIM eta 0 at {cfg.T} steps from the same x_T, RMS in [-1, 1] (8-bit levels)\n")
    pytorch = [r for r in rows if r["runtime"] == "PyTorch fp32"]
    print("| sampler | spacing | " + " | ".join(f"{s} steps" for s in args.steps) + " |")
    print("|---|---|" + "---|" * len(args.steps))
    for spacing in args.spacings:
        for sampler in args.samplers:
            cells = [next(r for r in pytorch if (r["sampler"], r["spacing"], r["steps"]) == (sampler, spacing, s))
                     for s in args.steps]
            print(f"| {sampler} | {spacing} | " + " | ".join(f"{c['rms']:.4f} ({127.5 * c['rms']:.1f})" for c in cells) + " |")
    if args.onnx:
        print("\n| runtime | sampler | spacing | steps | RMS to the reference | RMS to PyTorch fp32, same sampler |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if r["runtime"] != "PyTorch fp32":
                print(f"| {r['runtime']} | {r['sampler']} | {r['spacing']} | 20 | {r['rms']:.4f} "
                      f"({127.5 * r['rms']:.1f}) | {r['rms_vs_pytorch']:.4f} ({127.5 * r['rms_vs_pytorch']:.1f}) |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
