"""Training throughput of one process against a torchrun job of several, on the same cores.

  python bench/ddp.py                        # tiny preset, shapes, batch 32, 2 processes (make bench-ddp)
  python bench/ddp.py --model cifar10 --batch-size 16 --steps 12

One process uses every core as threads; the job gives each of its N processes cores / N threads
(torchrun's OMP_NUM_THREADS). Both train the same run from the same seed; the contenders
alternate (A B A B) and each reports the median img/s of its logged steps after the first log
interval (which holds start-up). Prints a markdown table with the ratio to one process.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(kind, args, folder):
    """img/s of one training run (its metrics.jsonl), in a fresh process (or job)."""
    cores = os.cpu_count() or 1
    train = [os.path.join(ROOT, "ddpm.py"), "train", "--data", "shapes", "--model", args.model,
             "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--log-every",
             str(args.log_every), "--sample-every", "0", "--save-every", "0", "--no-tensorboard",
             "--out", folder, "--ckpt", os.path.join(folder, "ckpt.pt"), "--overwrite"]
    if kind == "one":
        command, threads = [sys.executable, *train], cores
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={args.nproc}", *train]
        threads = max(1, cores // args.nproc)
    r = subprocess.run(command, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode:
        raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    return statistics.median(row["img_per_s"] for row in rows[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="preset (default: tiny)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (default: 32)")
    parser.add_argument("--steps", type=int, default=60, help="steps per run (default: 60)")
    parser.add_argument("--log-every", type=int, default=10, help="steps per img/s reading (default: 10)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the job (default: 2)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternated (default: 2)")
    args = parser.parse_args()
    results = {"one": [], "job": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for kind in results:
                results[kind].append(run(kind, args, os.path.join(tmp, f"{kind}{k}")))
                print(f"{kind} run {k + 1}: {results[kind][-1]:.1f} img/s", file=sys.stderr)
    cores = os.cpu_count() or 1
    one = statistics.median(results["one"])
    print(f"\n{args.model}, batch {args.batch_size}, {args.steps} steps, {cores} cores\n")
    print("| contender | img/s (median of runs) | vs 1 process |\n|---|---|---|")
    print(f"| 1 process x {cores} threads | {one:.1f} | 1.00x |")
    job = statistics.median(results["job"])
    print(f"| torchrun {args.nproc} processes x {max(1, cores // args.nproc)} thread(s), gloo | "
          f"{job:.1f} | {job / one:.2f}x |")


if __name__ == "__main__":
    main()
