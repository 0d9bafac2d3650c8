"""Progressive distillation, judged: a class-conditional shapes teacher at 100 DDPM steps, DDIM and
DPM-Solver++ at few steps, and the distilled students at their own steps, each through PyTorch and
through ONNX Runtime (CPU), scored by the shapes judge (evaluate.judge_shapes: the fraction of
cells that are one clean shape of the class their row asked for), with ONNX Runtime's images per
second. Writes <out>/distill.json and prints the table docs/distillation.md shows.

    python distill.py --teacher runs/demo/ckpt.pt --from-steps 64 --to-steps 4 --out runs/distill
    python bench/distill.py --teacher runs/demo/ckpt.pt --students runs/distill
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sampling  # noqa: E402
import schedules  # noqa: E402
from schedules import Sampler  # noqa: E402
import ddpm  # noqa: E402
import evaluate  # noqa: E402
import export  # noqa: E402
import sample_ort  # noqa: E402


def judged(images, judge, classes):
    """(clean shapes of the class asked for, clean shapes, right class) in % of a --class all grid."""
    verdict = evaluate.judge_shapes(images, judge)
    asked = np.repeat(np.arange(classes), len(images) // classes)
    right = verdict["class"] == asked
    return [round(100 * float(v.mean()), 1) for v in (verdict["good"] & right, verdict["good"], right)]


def quiet(function, *args, **kwargs):
    """function's result and what it printed (the progress bars go to stderr as usual)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = function(*args, **kwargs)
    return result, out.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher checkpoint (required)")
    p.add_argument("--students", required=True,
                   help="the distill --out folder holding <steps>-steps.pt (required)")
    p.add_argument("--steps", default="16,8,4", help="the students to judge (default: 16,8,4)")
    p.add_argument("--solver-steps", default="4,8,20",
                   help="the teacher's DDIM (leading and trailing) and DPM-Solver++ steps (default: 4,8,20)")
    p.add_argument("--ddpm-steps", type=int, default=100,
                   help="the teacher's ancestral steps, the reference (0: leave it out) (default: 100)")
    p.add_argument("--teacher-steps", default="64",
                   help="also the teacher's trailing DDIM at these steps: the first round's teacher (default: 64)")
    p.add_argument("--n", type=int, default=100, help="images per grid, a row per class (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of x_T (default: 0)")
    p.add_argument("--out", default="runs/distill-bench", help="grids and distill.json (default: runs/distill-bench)")
    p.add_argument("--judge-cache", default=os.path.join("runs", "judge"),
                   help="where the judge's classifier is kept (default: runs/judge)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    judge, judge_accuracy = evaluate.shapes_judge(args.judge_cache)
    _, cfg = ddpm.load_checkpoint(args.teacher)
    classes = cfg.num_classes
    solver_steps = [int(k) for k in args.solver_steps.split(",") if k]
    runs = [("teacher", args.teacher, "ddpm", args.ddpm_steps, None)] if args.ddpm_steps else []
    runs += [("teacher", args.teacher, "ddim", k, spacing) for spacing in ("leading", "trailing") for k in solver_steps]
    runs += [("teacher", args.teacher, "dpm++", k, "trailing") for k in solver_steps]
    runs += [("teacher", args.teacher, "ddim", k, "trailing") for k in [int(k) for k in args.teacher_steps.split(",") if k]]
    runs += [(f"student {k}", os.path.join(args.students, f"{k}-steps.pt"), None, k, None) for k in [int(k) for k in args.steps.split(",") if k]]
    onnx, rows = {}, []
    for name, ckpt, sampler, steps, spacing in runs:
        if ckpt not in onnx:
            onnx[ckpt] = os.path.join(args.out, os.path.basename(os.path.dirname(ckpt) if name == "teacher" else ckpt) + ".onnx")
            quiet(export.export, ckpt, out=onnx[ckpt])
        tag = f"{name.replace(' ', '')}-{sampler or 'ddim'}-{steps}-{spacing or 'own'}"
        row = {"model": name, "sampler": sampler or "ddim (its own)", "steps": steps, "spacing": spacing or ("trailing" if sampler is None else schedules.default_spacing(sampler))}
        t0 = time.time()
        request = sampling.Request(n=args.n, sampler=Sampler(sampler, None if sampler is None else steps, 0.0, spacing),
                                   seed=args.seed, out=os.path.join(args.out, f"{tag}-torch.png"), classes="all")
        quiet(ddpm.sample, ckpt, request)
        row["torch_s"] = round(time.time() - t0, 1)
        cells = evaluate.split_grid(os.path.join(args.out, f"{tag}-torch.png"), cfg.image_size)
        row["torch"] = judged(cells, judge, classes)
        images, said = quiet(sample_ort.sample, onnx[ckpt], request._replace(out=os.path.join(args.out, f"{tag}-ort.png")),
                             provider="cpu")
        # its own clock around the steps (sessions opened before it): image-steps/s over the steps
        rate, taken = re.search(r"([0-9.]+) image-steps/s, \d+ images x (\d+) ", said).groups()
        row["ort"], row["ort_img_per_s"] = judged(images, judge, classes), round(float(rate) / int(taken), 1)
        rows.append(row)
        print(f"{name:>10} {row['sampler']:>15} {steps:>4} steps {row['spacing']:>8}: PyTorch {row['torch'][0]:5.1f}%  "
              f"ONNX Runtime {row['ort'][0]:5.1f}%  ({row['ort_img_per_s']} img/s)", flush=True)
    with open(os.path.join(args.out, "distill.json"), "w") as f:
        json.dump({"judge_accuracy": judge_accuracy, "n": args.n, "rows": rows}, f, indent=1)
    print("\n| model | sampler | steps | spacing | PyTorch: clean, right class | ONNX Runtime | ORT img/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['spacing']} | {r['torch'][0]:.0f}% | {r['ort'][0]:.0f}% "
              f"| {r['ort_img_per_s']:.1f} |")


if __name__ == "__main__":
    main()
