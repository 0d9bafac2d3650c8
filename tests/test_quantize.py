"""export.py --int8: the calibration inputs against the forward process recomputed in numpy, the
int8 file's contract and metadata, its error against the float32 PyTorch model, a failed check
that leaves nothing behind, --int8 with --fp16, and sample_ort.py sampling the int8 file."""
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import checkpoints
import data
import ddpm
import export
import sample_ort
import sampling
from conftest import refusal
from schedules import Sampler


def untrained(path, **settings):
    """A tiny 16x16 checkpoint with random weights. The int8 error of untrained models is 5 to 10
    times that of trained ones (measured: see export.quantize_int8), so this is the hard case."""
    cfg = ddpm.make_config("tiny", image_size=16, **settings)
    torch.manual_seed(0)
    model = ddpm.UNet(cfg).eval()
    checkpoints.save_checkpoint(path, checkpoints.checkpoint_state(cfg, model))
    return cfg, model


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    """The int8 export of a conditional model with learned variances: the whole contract (inputs
    x_t, t, y; outputs eps, var_values). An unconditional one goes through it in
    test_a_failed_int8_check_writes_nothing."""
    d = tmp_path_factory.mktemp("int8")
    cfg, model = untrained(d / "ckpt.pt", num_classes=3, class_names=("a", "b", "c"), var_type="learned_range")
    results = export.export(str(d / "ckpt.pt"), str(d / "int8.onnx"), int8=True)
    return d, cfg, model, results


def test_calibration_inputs_follow_the_forward_process():
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4), with abar recomputed here in float64
    from the betas, at t spread evenly over 0 .. T-1, and y through every class and 'no label'."""
    cfg = ddpm.make_config("tiny", image_size=16, num_classes=3, class_names=("a", "b", "c"))
    feeds = export.calibration_inputs(cfg)
    x_t = np.concatenate([f["x_t"] for f in feeds])
    t = np.concatenate([f["t"] for f in feeds])
    y = np.concatenate([f["y"] for f in feeds])
    n = export.CALIBRATION_SAMPLES
    assert x_t.shape == (n, 3, 16, 16) and x_t.dtype == np.float32
    assert t.dtype == np.int64 and y.dtype == np.int64
    assert t[0] == 0 and t[-1] == cfg.T - 1 and np.all(np.diff(t) > 0)
    assert np.abs(np.diff(t) - (cfg.T - 1) / (n - 1)).max() <= 1  # evenly spread
    assert set(y.tolist()) == {0, 1, 2, 3}  # 3 is "no label"
    x0 = data.ShapesDataset(n=n, size=16, seed=0).images.numpy().astype(np.float64)
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0)).numpy()
    abar = np.cumprod(1 - ddpm.get_betas(cfg.schedule, cfg.T))[t].reshape(-1, 1, 1, 1)
    expected = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    err = np.abs(x_t - expected).max()
    print(f"calibration x_t against eq. 4 in float64: max abs error {err:.1e}; "
          f"t = 0 .. {t[-1]} in steps of {np.diff(t).min()} to {np.diff(t).max()}")
    assert err < 1e-5
    assert np.abs(x_t[0]).max() <= 1.05 and 0.9 < x_t[-8:].std() < 1.1  # an image at t=0, noise at T-1
    plain = export.calibration_inputs(ddpm.make_config("tiny", image_size=16))
    assert set(plain[0]) == {"x_t", "t"}


def test_int8_file_keeps_the_contract_and_the_metadata(int8):
    d, cfg, model, _ = int8
    m = onnx.load(str(d / "int8.onnx"))
    inputs = {p.name: p.type.tensor_type for p in m.graph.input}
    outputs = {p.name: p.type.tensor_type for p in m.graph.output}
    assert list(inputs) == export.input_names(cfg) and list(outputs) == export.output_names(cfg)
    assert inputs["x_t"].elem_type == onnx.TensorProto.FLOAT and inputs["t"].elem_type == onnx.TensorProto.INT64
    if cfg.num_classes:
        assert inputs["y"].elem_type == onnx.TensorProto.INT64
    for p in list(inputs.values()) + list(outputs.values()):
        assert p.shape.dim[0].dim_param == "batch"
    assert all(p.elem_type == onnx.TensorProto.FLOAT for p in outputs.values())
    # the same ddpm.* metadata as a float32 export, but the precision (the quantizer adds onnx.infer)
    raw = {p.key: p.value for p in m.metadata_props if p.key.startswith("ddpm.")}
    assert raw == {**export.metadata(cfg, True, "fp32", export.MIN_OPSET, m.ir_version), "ddpm.precision": "int8"}
    session = ort.InferenceSession(str(d / "int8.onnx"), providers=["CPUExecutionProvider"])
    assert sample_ort.read_metadata(session, "int8.onnx")["precision"] == "int8"
    # int8 weights in every Conv but the first and the last, which read float32 initializers
    produced_by = {out: node.op_type for node in m.graph.node for out in node.output}
    initializers = {init.name: init.data_type for init in m.graph.initializer}
    convs = [node for node in m.graph.node if node.op_type == "Conv"]
    weights = [produced_by.get(node.input[1], initializers.get(node.input[1])) for node in convs]
    assert weights[0] == weights[-1] == onnx.TensorProto.FLOAT
    assert all(w == "DequantizeLinear" for w in weights[1:-1])
    size, params = os.path.getsize(d / "int8.onnx"), sum(p.numel() for p in model.parameters())
    print(f"{len(convs) - 2} of {len(convs)} Convs in int8; {size / 2 ** 20:.2f} MB against "
          f"{4 * params / 2 ** 20:.2f} MB of float32 weights")
    assert size < 0.5 * 4 * params


def test_int8_error_against_float32_pytorch(int8):
    """The export's own check, then ONNX Runtime run here on random inputs (what the check feeds,
    another draw) and on x_t ~ q(x_t | x_0) of shapes, printed for t >= 100 and for t < 20, where
    x_t is almost clean and int8 cannot resolve the noise (see export.quantize_int8)."""
    d, cfg, model, results = int8
    worst = max(rel for _, _, rel in results)
    print(f"export's check: worst relative error {worst:.2e} (tolerance {export.TOLERANCE['int8']:.1e})")
    assert worst <= export.TOLERANCE["int8"]
    g = torch.Generator().manual_seed(1)
    x0 = data.ShapesDataset(n=16, size=16, seed=3).images
    t = torch.tensor([0, 2, 5, 10, 15, 19, 19, 19, 100, 200, 400, 600, 800, 900, 999, 999])
    x_t = ddpm.GaussianDiffusion.from_config(cfg).q_sample(x0, t, torch.randn(x0.shape, generator=g))
    x_t = torch.cat([torch.randn(8, 3, 16, 16, generator=g), x_t])  # (24, C, H, W): random, t < 20, t >= 100
    t = torch.cat([torch.randint(0, cfg.T, (8,), generator=g), t])
    y = torch.arange(24) % (cfg.num_classes + 1)
    with torch.no_grad():
        expected = torch.cat(export.Denoiser(model, torch.float32, cfg).eval()(x_t, t, y), 1).numpy()
    session = ort.InferenceSession(str(d / "int8.onnx"), providers=["CPUExecutionProvider"])
    got = np.concatenate(session.run(None, {"x_t": x_t.numpy(), "t": t.numpy(), "y": y.numpy()}), 1)
    errors = {name: np.abs(got[rows] - expected[rows]).max() / np.abs(expected[rows]).max()
              for name, rows in [("random", slice(0, 8)), ("t < 20", slice(8, 16)), ("t >= 100", slice(16, 24))]}
    print(", ".join(f"{name}: relative error {err:.2e}" for name, err in errors.items()))
    assert errors["random"] <= export.TOLERANCE["int8"] and errors["t >= 100"] <= export.TOLERANCE["int8"]
    assert errors["t < 20"] < 0.5  # garbage is about 1


def test_a_failed_int8_check_writes_nothing(tmp_path, monkeypatch):
    untrained(tmp_path / "ckpt.pt")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the quantizer's folders go here
    monkeypatch.setitem(export.TOLERANCE, "int8", 0.0)
    refusal(export.main, [tmp_path / "ckpt.pt", "--int8", "-o", tmp_path / "m.onnx"], "int8", "was not written")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "tmp"] and os.listdir(tmp_path / "tmp") == []


def test_int8_with_fp16_is_a_sentence(tmp_path):
    untrained(tmp_path / "ckpt.pt")
    refusal(export.main, [tmp_path / "ckpt.pt", "--int8", "--fp16", "-o", tmp_path / "m.onnx"], "--fp16", "--int8")
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_sample_ort_samples_an_int8_file(int8, tmp_path):
    """sample_ort.py as it is: DDIM on the int8 file with classifier-free guidance (both branches
    in one batch through the int8 network) and DDPM with the learned variances."""
    d, _, _, _ = int8
    images = sample_ort.sample(str(d / "int8.onnx"), sampling.Request(n=3, out=str(tmp_path / "grid.png"), classes="all", sampler=Sampler("ddim", steps=5)), provider="cpu")
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    images = sample_ort.sample(str(d / "int8.onnx"), sampling.Request(n=2, out=str(tmp_path / "grid.png"), sampler=Sampler("ddpm", steps=5)), provider="cpu")
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert (tmp_path / "grid.png").is_file()
