"""How long each command takes to answer --help, and to refuse a malformed flag, beside the cost of
`import torch` itself, in one run (issue 34: under 1 second each, without importing torch).

  python bench/startup.py              # 5 runs of each; prints a markdown table
  python bench/startup.py --repeats 9

Each figure is the median wall time of a fresh `python script ...` process, as a user types it
(with torch importable: what the command costs, not what the test with torch blocked costs).
Writes bench/results/startup-<cpu>.json.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

COMMANDS = [
    ["ddpm.py", "--help"], ["ddpm.py", "train", "--help"], ["ddpm.py", "sample", "--help"],
    ["ddpm.py", "info", "--help"], ["ddpm.py", "train", "--steps", "many"], ["distill.py", "--help"],
    ["export.py", "--help"], ["convert.py", "--help"], ["evaluate.py", "fid", "--help"],
    ["sample_ort.py", "--help"], ["sample_ort.py", "--n", "x"], ["sample_web.py", "--help"],
]


def seconds(argv, repeats):
    """Median wall time of `python argv` over `repeats` fresh processes."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per command (default: 5)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the JSON (default: bench/results)")
    args = p.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats {args.repeats}: run each at least once")
    torch_import = seconds(["-c", "import torch"], args.repeats)
    rows = [{"command": " ".join(argv), "seconds": seconds(argv, args.repeats)} for argv in COMMANDS]
    print(f"| command | seconds | vs `import torch` ({torch_import:.2f} s) |\n|---|---|---|")
    for row in rows:
        print(f"| `python {row['command']}` | {row['seconds']:.2f} | {row['seconds'] / torch_import:.2f}x |")
    cpu = cpu_name()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "startup-" + "".join(c if c.isalnum() else "_" for c in cpu)[:40] + ".json")
    with open(path, "w") as f:
        json.dump({"cpu": cpu, "cores": os.cpu_count(), "date": datetime.date.today().isoformat(),
                   "repeats": args.repeats, "import_torch_s": torch_import, "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
