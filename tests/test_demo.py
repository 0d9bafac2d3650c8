"""The demo recipe, end to end, judged. A class-conditional model draws a grid with one row per
class, with classifier-free guidance 3, in PyTorch and through ONNX Runtime. An independent judge
(evaluate.py: a small CNN trained on another draw of the shapes, and pixel rules for a flat shape
on a flat background in the data's colours) must find clean shapes, of the class each row asked
for; guidance must beat the unguided model in both samplers, and a noisy classifier must raise
the unguided model's class accuracy (classifier guidance).

Two lengths of the same recipe (the Makefile's `demo` target, its flags unchanged):
- `make test` trains it for SHORT_STEPS steps (a few minutes) and holds the grids to floors
  measured for that run: a broken recipe, sampler or export draws far below them;
- `make demo-check` (DEMO_CHECK=full) runs the whole `make demo` and holds it to the demo's own
  goal, at least 90% clean shapes of the class asked for in both grids, and adds the
  classifier-guidance check (a classifier trained for 300 steps)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import evaluate
from conftest import ROOT, run_main, run_script

FULL = os.environ.get("DEMO_CHECK") == "full"
SHORT_STEPS = 200
# (clean shapes, class asked for) floors per grid. Full: the demo's goal (issue 24), met at 97.5% and
# 100% (docs/demo.md). Short: measured for SHORT_STEPS steps at 17.5-45% and 57.5-65% (bf16 and fp32,
# both samplers, 2026-12-07, docs/testing.md), less about 2.5 standard deviations of a 40-cell grid
# for the class; a broken recipe, sampler or export draws near 0% clean shapes and 10% of the class
# asked for.
DEMO_FLOOR, ACCURACY_FLOOR = (0.9, 0.9) if FULL else (0.1, 0.4)
CLASSES = 10
with open(os.path.join(ROOT, "Makefile")) as f:  # the demo's sampler, as the Makefile sets it
    SAMPLING = re.search(r"^DEMO_SAMPLING := (.*)$", f.read(), flags=re.M).group(1).split()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    demo = tmp_path_factory.mktemp("demo") / "demo"
    steps = [] if FULL else [f"DEMO_STEPS={SHORT_STEPS}"]
    r = subprocess.run(["make", "-C", ROOT, "demo", f"DEMO={demo}", f"PY={sys.executable}", *steps],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return demo


@pytest.fixture(scope="module")
def judge(shapes_judge):
    return shapes_judge


def score(path, judge):
    """(clean-shape fraction, fraction of the class its row asked for) of a --class all grid."""
    cells = evaluate.split_grid(str(path), 32)
    verdict = evaluate.judge_shapes(cells, judge)
    asked = np.repeat(np.arange(CLASSES), len(cells) // CLASSES)
    return float(verdict["good"].mean()), float((verdict["class"] == asked).mean())


def sample_both(demo, tmp_path, *flags, n=40):
    """The demo's grid (n cells, a row per class, its sampler) drawn again with other flags,
    by ddpm.py and, unless a classifier is among them, by sample_ort.py."""
    out = {}
    r = run_main("ddpm.py", "sample", "--ckpt", demo / "ckpt.pt", "--n", n, "--class", "all",
                 *SAMPLING, "--out", tmp_path / "torch.png", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    out["PyTorch"] = tmp_path / "torch.png"
    if "--classifier" not in flags:
        r = run_main("sample_ort.py", "--model", demo / "ddpm.onnx", "--n", n, "--class", "all",
                     *SAMPLING, "--provider", "cpu", "--out", tmp_path / "ort.png", *flags)
        assert r.returncode == 0, r.stderr[-2000:]
        out["ONNX Runtime"] = tmp_path / "ort.png"
    return out


@pytest.fixture(scope="module")
def unguided(demo, judge, tmp_path_factory):
    """Clean-shape fraction and class accuracy of the demo model at guidance 0 (unconditional)."""
    grids = sample_both(demo, tmp_path_factory.mktemp("unguided"), "--guidance", 0, n=40 if FULL else 20)
    return {name: score(path, judge) for name, path in grids.items()}


@pytest.mark.slow
def test_make_demo_draws_clean_shapes_of_the_class_asked_for(demo, judge):
    for name in ("samples.png", "samples_ort.png", "process.png", "process.gif", "process_ort.png",
                 "loss.png", "ddpm.onnx", "ckpt.pt"):
        assert (demo / name).exists(), name
    scores = {grid: score(demo / grid, judge) for grid in ("samples.png", "samples_ort.png")}
    print(json.dumps({grid: {"clean shapes": good, "class asked for": acc} for grid, (good, acc) in scores.items()}))
    for grid, (good, accuracy) in scores.items():
        assert good >= DEMO_FLOOR, f"{grid}: {good:.0%} clean shapes (floor {DEMO_FLOOR:.0%})"
        assert accuracy >= ACCURACY_FLOOR, f"{grid}: {accuracy:.0%} of the class asked for"
    with Image.open(demo / "process.gif") as animation:
        assert animation.n_frames > 10


@pytest.mark.slow
def test_guidance_beats_the_unguided_model_in_both_samplers(demo, judge, unguided):
    guided = {"PyTorch": score(demo / "samples.png", judge), "ONNX Runtime": score(demo / "samples_ort.png", judge)}
    for name in guided:
        print(f"{name}: class accuracy {unguided[name][1]:.0%} at guidance 0, {guided[name][1]:.0%} at 3; "
              f"clean shapes {unguided[name][0]:.0%} and {guided[name][0]:.0%}")
        assert guided[name][1] >= ACCURACY_FLOOR and guided[name][1] > unguided[name][1] + 0.3


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="make demo-check runs it (the classifier trains for minutes)")
def test_classifier_guidance_raises_the_unguided_models_accuracy(demo, judge, unguided, tmp_path):
    clf = tmp_path / "clf.pt"
    r = run_script("ddpm.py", "train-classifier", "--data", "shapes", "--model", "tiny", "--schedule", "cosine",
                   "--steps", 300, "--batch-size", 64, "--lr", "1e-3", "--warmup", 50, "--amp", "bf16",
                   "--out", clf, "--log-every", 50, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    grids = sample_both(demo, tmp_path, "--guidance", 0, "--classifier", clf, "--classifier-scale", 10, n=20)
    good, accuracy = score(grids["PyTorch"], judge)
    print(f"classifier guidance (scale 10) on the unguided model: class accuracy {unguided['PyTorch'][1]:.0%} "
          f"-> {accuracy:.0%}, clean shapes {unguided['PyTorch'][0]:.0%} -> {good:.0%}")
    assert accuracy >= unguided["PyTorch"][1] + 0.3 - 1e-9  # at least 6 of the 20 more
    assert os.path.exists(tmp_path / "runs" / "shapes-classifier" / "metrics.jsonl")
