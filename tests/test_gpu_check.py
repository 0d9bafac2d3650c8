"""make gpu-check REHEARSE=1: the GPU readiness script end to end on the CPU with tiny sizes, so
every stage's code, its JSON and its table run here, where no GPU is (issue 25)."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

STAGES = ("tests", "train", "auto_batch", "torchrun", "sampling", "distill")


@pytest.mark.slow  # a minute or two: make test runs it, make test-fast leaves it out
def test_the_gpu_check_rehearses_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--rehearse", "--out", out],
                       capture_output=True, text=True, timeout=300)
    seconds = time.time() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    print(r.stdout[-3000:])
    result = json.loads(out.read_text())
    print(f"rehearsal: {seconds:.0f} s")
    assert seconds < 180
    # every stage ran to a result: measured, or one sentence saying what the CPU lacks
    assert {stage: result[stage]["status"] for stage in STAGES} == \
        {"tests": "ok", "train": "ok", "auto_batch": "missing", "torchrun": "ok", "sampling": "ok", "distill": "ok"}
    assert "needs CUDA" in result["auto_batch"]["note"] and "needs CUDA" in result["train"]["fp16"]["note"]
    train = {row["name"]: row for row in result["train"]["rows"]}
    assert all(train[name]["img_per_s"] > 0 and train[name]["finite"] for name in
               ("ours, eager", "ours, torch.compile", "diffusers UNet2DModel"))
    assert result["torchrun"]["processes"]["1"]["max_weight_difference"] == 0.0  # the same math
    rows = {row["name"]: row for row in result["sampling"]["rows"]}
    assert rows["PyTorch eager, DDPM 10 steps"]["trajectory_max_abs_diff"] == 0.0  # it is the reference
    assert rows["ONNX Runtime CPU fp32, DDPM 10 steps"]["trajectory_max_abs_diff"] < 1e-4
    assert rows["ONNX Runtime CPU fp32, DDPM 10 steps"]["copies_per_step"] == 0
    assert rows["ONNX Runtime CPU fp32, CUDA graphs, DDPM 10 steps"]["status"] == "missing"
    distilled = result["distill"]
    assert distilled["round"] == "4 -> 2 steps" and distilled["optimizer_steps_per_s"] > 0 and distilled["finite"]
    speed = {row["name"]: row for row in distilled["rows"]}
    assert set(speed) == {"student, ddim 2 steps", "teacher, ddim 5 steps", "teacher, ddpm 10 steps"}, speed
    # the same network size and batch: the images/s go as the steps (2 against 5 and 10), give or take timing
    assert speed["teacher, ddpm 10 steps"]["student_speedup"] > 2 and speed["teacher, ddim 5 steps"]["student_speedup"] > 1
    for stage in STAGES:
        assert f"| {stage}" in result["table"]
