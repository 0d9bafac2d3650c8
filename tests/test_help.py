"""Every command answers --help and refuses a malformed flag before torch is imported: each runs here
as `python script ...` does, with torch made unimportable (sys.modules["torch"] = None), and must
still print its help (exit 0) or argparse's usage error (exit 2), never an ImportError. How long
they take is measured by bench/startup.py, not asserted here."""
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

RUN_WITHOUT_TORCH = """import runpy, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
sys.path.insert(0, {root!r})
sys.argv = {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""

# (script, sub-command, a malformed flag and what argparse says of it)
COMMANDS = [
    ("ddpm.py", [], ["--steps", "5"], "invalid choice"),
    ("ddpm.py", ["train"], ["--steps", "many"], "invalid int value: 'many'"),
    ("ddpm.py", ["train-classifier"], ["--batch-size", "lots"], "neither a whole number nor auto"),
    ("ddpm.py", ["sample"], ["--sampler", "plms"], "invalid choice: 'plms'"),
    ("ddpm.py", ["info"], ["--model", "huge"], "invalid choice: 'huge'"),
    ("distill.py", [], ["--to-steps", "four"], "invalid int value: 'four'"),
    ("export.py", [], ["ckpt.pt", "--opset", "x"], "invalid int value: 'x'"),
    ("convert.py", [], ["--no-ema"], "one of the arguments --from-diffusers --to-diffusers is required"),
    ("evaluate.py", ["fid"], ["--n", "all"], "invalid int value: 'all'"),
    ("evaluate.py", ["nll"], ["--split", "val"], "invalid choice: 'val'"),
    ("evaluate.py", ["shapes"], [], "the following arguments are required: images"),
    ("sample_ort.py", [], ["--n", "x"], "invalid int value: 'x'"),
    ("sample_web.py", [], ["--port", "x"], "invalid int value: 'x'"),
]


def without_torch(script, argv):
    code = RUN_WITHOUT_TORCH.format(root=ROOT, argv=[script, *argv], script=os.path.join(ROOT, script))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("script,command,malformed,answer", COMMANDS)
def test_help_and_malformed_flags_need_no_torch(script, command, malformed, answer):
    r, seconds = without_torch(script, [*command, "--help"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.startswith("usage:") and "options:" in r.stdout, r.stdout[:500]
    assert "(default" in r.stdout or (script, command) == ("ddpm.py", []), r.stdout[:500]  # ddpm.py: its commands
    bad, bad_seconds = without_torch(script, [*command, *malformed])
    print(f"{script} {' '.join(command)}: --help in {seconds:.2f} s, a malformed flag in {bad_seconds:.2f} s, "
          f"torch blocked: {bad.stderr.strip().splitlines()[-1]}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and answer in bad.stderr, bad.stderr[-2000:]


def test_the_block_would_show_a_torch_import():
    """The check can fail: a script that imports torch first stops with the ImportError here."""
    r = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH.format(root=ROOT, argv=["x", "--help"],
                        script=os.path.join(ROOT, "tests", "test_cuda.py"))], capture_output=True, text=True)
    assert r.returncode == 1 and "import of torch halted" in r.stderr
