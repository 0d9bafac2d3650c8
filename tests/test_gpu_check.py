"""make gpu-check REHEARSE=1: the GPU readiness script end to end on the CPU with tiny sizes, so
every stage's code, its JSON and its table run here, where no GPU is (issue 25)."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT


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
    assert {stage: result[stage]["status"] for stage in ("tests", "train", "auto_batch", "torchrun", "sampling")} == \
        {"tests": "ok", "train": "ok", "auto_batch": "missing", "torchrun": "ok", "sampling": "ok"}
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
    for stage in ("tests", "train", "auto_batch", "torchrun", "sampling"):
        assert f"| {stage}" in result["table"]
