"""Every `python ...` and `torchrun ...` line in the README's code blocks, run as a reader types it,
in one folder and in the README's order, shrunk to seconds: flags appended after the README's
(argparse keeps the last value) train `tiny` on the built-in shapes for a few steps and sample a
few images in a few steps. What is not shrunk is what the README promises: the file names, the
defaults that find the previous command's files (ckpt.pt, ddpm.onnx), `--resume`, torchrun, the
samplers, int8 export. `--data cifar10` is replaced by the shapes, since nothing may be
downloaded here (the offline message for it is tested in tests/test_train.py), and the judge's
line, which reads the grid `make demo` wrote, runs last, on a grid of real shapes. The `make`
lines are the Makefile's (tests/test_demo.py runs `make demo`)."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data
import pictures
from conftest import ROOT

# appended to a line of each script; --data shapes replaces the README's --data cifar10
SHRINK = {
    ("ddpm.py", "train"): ["--model", "tiny", "--image-size", "16", "--steps", "{steps}", "--batch-size", "4",
                           "--sample-every", "0", "--log-every", "1"],
    ("ddpm.py", "sample"): ["--n", "2", "--steps", "3"],
    ("distill.py", None): ["--from-steps", "8", "--round-steps", "2", "--batch-size", "4", "--log-every", "1",
                             "--sample-every", "0"],
    ("sample_ort.py", None): ["--n", "2", "--steps", "3", "--provider", "cpu"],
    ("export.py", None): [],
    ("sample_web.py", None): ["--build", "web-site"],  # the static page instead of a server that runs until stopped
    ("evaluate.py", None): [],
}


def readme_commands():
    """(program, arguments) of each command line in README.md's bash blocks and of each command in
    its prose (`python ...` in backticks), in the README's order, comments removed."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    lines = []
    for block, inline in re.findall(r"```bash\n(.*?)```|`((?:python|torchrun) [^`]+)`", text, flags=re.S):
        lines += block.splitlines() if block else [inline]
    commands = []
    for line in lines:
        words = line.split("#")[0].split()
        if words and words[0] in ("python", "torchrun"):
            commands.append(words)
    return commands


def shrunk(words, trained_steps):
    """The README's line as argv for this Python, with the shrinking flags appended."""
    if words[0] == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run"]
        rest = [w if not w.startswith("--nproc-per-node") else "--nproc-per-node=2" for w in words[1:]]
        at = next(i for i, w in enumerate(rest) if w.endswith(".py"))  # torchrun's flags end here
        launcher, words = launcher + rest[:at], ["python"] + rest[at:]
    else:
        launcher = [sys.executable]
    script, args = words[1], ["shapes" if w == "cifar10" else w for w in words[2:]]
    key = (script, args[0] if script == "ddpm.py" else None)
    extra = [a.format(steps=trained_steps) for a in SHRINK[key]]
    if any("distill" in a or "student" in a for a in args):  # a distilled model samples its own steps only
        extra = [a for k, a in enumerate(extra) if "--steps" not in extra[max(k - 1, 0):k + 1]]
    return launcher + [os.path.join(ROOT, script)] + args + extra


@pytest.mark.slow  # about a minute: ten commands, each a fresh Python
def test_every_readme_command_runs_as_written(tmp_path, shapes_judge, judge_cache):
    commands = readme_commands()
    assert len(commands) >= 10, commands  # the README's examples, found
    steps = 2
    # the judge's line reads the grid `make demo` wrote: here it runs last, on a grid of this run
    for words in sorted(commands, key=lambda words: "evaluate.py" in words):
        cwd = tmp_path
        if words[0] == "torchrun":  # the README's other way to run the same training: a run of its own
            cwd = tmp_path / "torchrun"
            cwd.mkdir()
        if "evaluate.py" in words:  # the demo's grid (a row of 4 per class): real shapes stand in for it
            rng = np.random.default_rng(0)
            shapes = np.stack([data.draw_shape(c, rng, 32) for c in np.repeat(np.arange(10), 4)])
            os.makedirs(tmp_path / "runs" / "demo")
            pictures.save_grid(shapes, str(tmp_path / "runs" / "demo" / "samples.png"), nrow=4)
            shutil.copytree(judge_cache, tmp_path / "data" / "judge")  # trained once per test run
        if "--resume" in words:
            steps += 2  # --steps is the total: the resumed run goes on to it
        r = subprocess.run(shrunk(words, steps), capture_output=True, text=True, cwd=cwd, timeout=300)
        print(f"{' '.join(words):<75} -> exit {r.returncode}, {r.stdout.strip().splitlines()[-1:]}")
        assert r.returncode == 0, f"{' '.join(words)}\n{r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
    for name in ("ckpt.pt", "samples.png", "ddpm.onnx", "ddpm_int8.onnx", "torchrun/ckpt.pt", "runs/distill/4-steps.pt",
                 "student.onnx", "web-site/index.html"):
        assert (tmp_path / name).exists(), name
