"""Messages: library code reports through these, never with print, so that under torchrun only
rank 0 speaks and every process's warnings carry its rank; and a text progress bar for the code
that has no tqdm (sample_ort.py). numpy-, torch- and project-free.
"""

import os
import sys
import time


def rank():
    """This process's rank in a torchrun job (torchrun sets RANK), 0 otherwise."""
    return int(os.environ.get("RANK", "0") or 0)


def say(message):
    """Progress and results on standard output; under torchrun from rank 0 alone."""
    if rank() == 0:
        print(message, flush=True)


def warn(message, kind="warning"):
    """'warning: ...' (or 'note: ...', or the message alone for kind None) on standard error,
    from every process, with its rank under torchrun."""
    who = f"rank {rank()}: " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    print(f"{who}{kind + ': ' if kind else ''}{message}", file=sys.stderr, flush=True)


def progress_bar(total, label):
    """A one-line text progress bar on stderr, for sample_ort.py (tqdm is not one of its
    dependencies); returns update(done)."""
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
