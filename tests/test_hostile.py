"""Hostile files (issue 24): a pickle whose loading runs code, handed to every file argument of
every command. Each must answer with a sentence, and the payload must never run: every file
this project reads is loaded weights-only (or is not a pickle at all)."""
import json
import os
import pickle

import pytest
import torch

import convert
import ddpm
from conftest import run_script


class Payload:
    """Unpickling this calls os.system, which creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def planted(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    for name in ("evil.pt", "evil.pth", "evil.ckpt"):  # torch's zip format: torch.load(weights_only=False) runs it
        torch.save({"config": Payload(marker), "model": Payload(marker)}, tmp_path / name)
    with open(tmp_path / "evil.bin", "wb") as f:  # a bare pickle: pickle.load runs it
        pickle.dump({"config": Payload(marker), "model": Payload(marker)}, f)
    (tmp_path / "unet").mkdir()
    os.replace(tmp_path / "evil.bin", tmp_path / "unet" / "diffusion_pytorch_model.bin")
    unet = {"_class_name": "UNet2DModel", **convert.unet2d_config(ddpm.make_config("tiny"))}
    (tmp_path / "unet" / "config.json").write_text(json.dumps(unet))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    return tmp_path, marker


COMMANDS = [
    ("ddpm.py", ["sample", "--ckpt", "{d}/evil.pt", "--n", "1"]),
    ("ddpm.py", ["sample", "--ckpt", "{d}/evil.pt", "--classifier", "{d}/evil.ckpt", "--class", "0", "--n", "1"]),
    ("ddpm.py", ["info", "--ckpt", "{d}/evil.pt"]),
    ("ddpm.py", ["train", "--resume", "{d}/evil.pt", "--steps", "1"]),
    ("ddpm.py", ["train-classifier", "--resume", "{d}/evil.ckpt", "--steps", "1"]),
    ("export.py", ["{d}/evil.pt", "-o", "{d}/out.onnx"]),
    ("convert.py", ["--to-diffusers", "{d}/evil.pt", "-o", "{d}/hf"]),
    ("convert.py", ["--from-diffusers", "{d}", "-o", "{d}/from_hf.pt"]),
    ("evaluate.py", ["nll", "--ckpt", "{d}/evil.pt", "--n", "1"]),
    ("evaluate.py", ["fid", "--ckpt", "{d}/evil.pt", "--n", "2", "--ref", "shapes"]),
    ("evaluate.py", ["fid", "{d}", "{d}", "--inception-weights", "{d}/evil.pth"]),
]


@pytest.mark.heavy
@pytest.mark.parametrize("script,argv", COMMANDS, ids=[" ".join([s] + a[:2]) for s, a in COMMANDS])
def test_a_pickle_that_runs_code_is_refused_and_never_runs(planted, script, argv):
    d, marker = planted
    r = run_script(script, *[a.format(d=d) for a in argv], cwd=d)
    message = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    print(f"{script} {' '.join(argv[:2])}: exit {r.returncode}, {message[:160]}")
    assert not marker.exists(), "the payload ran"
    assert r.returncode != 0 and message.startswith("error:") and "Traceback" not in r.stderr
