"""The demo recipe, end to end, judged (slow: it is the 8-minute `make demo`): both grids,
PyTorch and ONNX Runtime, must stay at least DEMO_FLOOR clean shapes of the dataset by
evaluate.py's judge, and the process pictures must be there."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import evaluate
from conftest import ROOT

# Measured on the Makefile's recipe (1,300 steps, bf16): 72% (PyTorch) and 81% (ONNX
# Runtime) of 36 cells, 78% of 100 samples; the recipe of the previous session (1,000 fp32 steps)
# 59%, Ho et al.'s recipe 0% and 8% (README, "The main job"). 36 cells move by about 7 points.
DEMO_FLOOR = 0.55


@pytest.mark.slow
def test_make_demo_draws_clean_shapes(tmp_path):
    demo = tmp_path / "demo"
    r = subprocess.run(["make", "-C", ROOT, "demo", f"DEMO={demo}", f"PY={sys.executable}"],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("samples.png", "samples_ort.png", "process.png", "process.gif", "process_ort.png",
                 "loss.png", "ddpm.onnx", "ckpt.pt"):
        assert (demo / name).exists(), name
    classifier, accuracy = evaluate.train_shapes_classifier()
    print(f"judge's classifier: {accuracy:.1%} on a held-out draw of the dataset")
    scores = {}
    for grid in ("samples.png", "samples_ort.png"):
        verdict = evaluate.judge_shapes(evaluate.split_grid(str(demo / grid), 32), classifier)
        scores[grid] = {k: float(v.mean()) for k, v in verdict.items() if k != "class"}
    print(json.dumps(scores, indent=1))
    for grid, score in scores.items():
        assert score["good"] >= DEMO_FLOOR, f"{grid}: {score['good']:.0%} clean shapes (floor {DEMO_FLOOR:.0%})"
    with Image.open(demo / "process.gif") as animation:
        assert animation.n_frames > 10
