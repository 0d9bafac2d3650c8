"""export.py and sample_ort.py: ONNX Runtime against PyTorch, per call and over whole
trajectories fed identical noise; metadata; bad input; running without torch."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import ddpm
import export
import sample_ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_usable():
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        s = ort.InferenceSession(onnx.helper.make_model(onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
            ir_version=8).SerializeToString(), providers=["CUDAExecutionProvider"])
        return s.get_providers()[0] == "CUDAExecutionProvider"
    except Exception:
        return False


CUDA = cuda_usable()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny 16x16 model trained for 200 steps on shapes, exported to ONNX.

    Trained, not random: with random weights the predicted x0 sits far outside [-1, 1], and
    clipping makes deterministic DDIM chaotic; measured here, torch against itself with 1e-6
    relative jitter on eps drifted by 7e-2 after 50 steps, so no runtime could be compared to it.
    After 200 steps of training the same jitter moves the final images by 5e-6.
    """
    d = tmp_path_factory.mktemp("onnx")
    cfg = ddpm.make_config("tiny", image_size=16, data="shapes", steps=200, batch_size=16, lr=1e-3,
                           warmup=20, ema_decay=0.95, out=str(d / "run"), ckpt=str(d / "ckpt.pt"),
                           num_workers=0, sample_every=10 ** 6, save_every=10 ** 6, log_every=50)
    ddpm.train(cfg)
    export.export(str(d / "ckpt.pt"), str(d / "ddpm.onnx"))
    model, _ = ddpm.load_checkpoint(str(d / "ckpt.pt"))
    return d, cfg, model


def run(script, *args, cwd=None, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


# -- per call -----------------------------------------------------------------------------------

def test_eps_parity_at_batch_1_3_8(exported):
    d, cfg, model = exported
    session = ort.InferenceSession(str(d / "ddpm.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    for b in (1, 3, 8):
        x_t = torch.randn(b, 3, 16, 16, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g)
        t[0] = 0
        with torch.no_grad():
            ref = model(x_t, t).numpy()
        got = session.run(["eps"], {"x_t": x_t.numpy(), "t": t.numpy()})[0]
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"batch {b}: max abs {np.abs(got - ref).max():.2e}, relative {rel:.2e}")
        assert got.shape == ref.shape and rel < 1e-5


def test_onnx_contract_names_types_and_dynamic_batch(exported):
    d, _, _ = exported
    m = onnx.load(str(d / "ddpm.onnx"))
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in m.graph.initializer)
    assert {p.name for p in m.graph.input} == {"x_t", "t"} and [o.name for o in m.graph.output] == ["eps"]
    types = {p.name: p.type.tensor_type for p in m.graph.input}
    assert types["x_t"].elem_type == onnx.TensorProto.FLOAT and types["t"].elem_type == onnx.TensorProto.INT64
    assert types["x_t"].shape.dim[0].dim_param == "batch" and types["t"].shape.dim[0].dim_param == "batch"
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert sorted(f for f in os.listdir(d) if f != "run") == ["ckpt.pt", "ddpm.onnx"]  # no sidecar


def test_metadata_round_trip(exported):
    d, cfg, _ = exported
    session = ort.InferenceSession(str(d / "ddpm.onnx"), providers=["CPUExecutionProvider"])
    meta = sample_ort.read_metadata(session, "ddpm.onnx")
    raw = session.get_modelmeta().custom_metadata_map
    assert np.array_equal(meta["betas"], ddpm.get_betas(cfg.schedule, cfg.T))  # bit-exact
    assert (meta["image_size"], meta["in_channels"], meta["var_type"], meta["clip_x0"]) == \
        (16, 3, "fixed_large", True)
    assert raw["ddpm.schedule"] == "linear" and raw["ddpm.T"] == "1000" and raw["ddpm.preset"] == "tiny"
    assert raw["ddpm.ema"] == "true" and raw["ddpm.num_classes"] == "0" and raw["ddpm.precision"] == "fp32"
    assert raw["ddpm.format"] == "1"


def test_ema_weights_are_exported_by_default(tmp_path, exported):
    d, _, _ = exported
    export.export(str(d / "ckpt.pt"), str(tmp_path / "raw.onnx"), ema=False)
    raw, _ = ddpm.load_checkpoint(str(d / "ckpt.pt"), ema=False)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    got = ort.InferenceSession(str(tmp_path / "raw.onnx")).run(None, {"x_t": x.numpy(), "t": t.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - raw(x, t).numpy()).max() < 1e-4
    meta = ort.InferenceSession(str(tmp_path / "raw.onnx")).get_modelmeta().custom_metadata_map
    assert meta["ddpm.ema"] == "false"


def test_schedule_tables_match_ddpm(exported):
    """sample_ort's float64 coefficients equal ddpm.GaussianDiffusion's, for every sampler."""
    betas = ddpm.get_betas("cosine", 1000)
    for sampler, steps, eta, var in [("ddpm", None, 0, "fixed_large"), ("ddpm", 100, 0, "fixed_small"),
                                     ("ddim", 50, 0.0, "fixed_large"), ("ddim", 50, 0.7, "fixed_large")]:
        ts, coefs = sample_ort.step_table(betas, sampler, steps, eta, var)
        d = ddpm.GaussianDiffusion(betas, var_type=var)
        if steps:
            d = d.respace(ddpm.ddim_timesteps(1000, steps))
        assert list(ts) == list(d.timesteps[::-1])
        i = np.arange(d.num_timesteps)[::-1]
        assert np.allclose(coefs[:, 0], d.sqrt_recip_alphas_cumprod[i], rtol=1e-6)
        assert np.allclose(coefs[:, 1], d.sqrt_recipm1_alphas_cumprod[i], rtol=1e-6)
        if sampler == "ddpm":
            assert np.allclose(coefs[:, 2], d.posterior_mean_coef1[i], rtol=1e-6)
            assert np.allclose(coefs[:, 3], d.posterior_mean_coef2[i], rtol=1e-6)


# -- whole trajectories -------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 1000, 0.0), ("ddim", 50, 0.0), ("ddim", 50, 1.0)])
def test_trajectory_parity_with_identical_noise(exported, sampler, steps, eta):
    d, cfg, model = exported
    rng = np.random.default_rng(7)
    x_T = rng.standard_normal((4, 3, 16, 16), dtype=np.float32)
    noise = rng.standard_normal((steps, 4, 3, 16, 16), dtype=np.float32)
    ref = ddpm.sample_loop(model, ddpm.GaussianDiffusion.from_config(cfg), torch.from_numpy(x_T),
                           sampler, steps=steps, eta=eta,
                           noise_fn=lambda k, shape: torch.from_numpy(noise[k])).numpy()
    denoiser, step, meta, device = sample_ort.open_sessions(str(d / "ddpm.onnx"), "cpu")
    ts, coefs = sample_ort.step_table(meta["betas"], sampler, steps, eta, meta["var_type"])
    got = sample_ort.Sampler(denoiser, step, x_T.shape, device).run(x_T, ts, coefs, lambda k, shape: noise[k])
    err = np.abs(got - ref).max()
    print(f"{sampler} {steps} steps eta={eta}: final images max abs error {err:.2e} "
          f"(values span {ref.min():.2f}..{ref.max():.2f})")
    assert err < 1e-3


# -- the scripts --------------------------------------------------------------------------------

def test_sample_ort_runs_without_torch(exported, tmp_path):
    d, _, _ = exported
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "blocker"))
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "blocked" in check.stderr
    r = run("sample_ort.py", "--model", str(d / "ddpm.onnx"), "--n", "3", "--sampler", "ddim",
            "--steps", "5", "--out", "g.png", "--outdir", "imgs", "--provider", "cpu", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "image-steps/s" in r.stdout and "CPUExecutionProvider" in r.stdout
    print(r.stdout.strip().splitlines()[-1])
    assert len(os.listdir(tmp_path / "imgs")) == 3
    with Image.open(tmp_path / "g.png") as g:
        g.load()


def test_export_and_sample_cli_with_defaults(exported, tmp_path):
    """python export.py ckpt.pt, then python sample_ort.py with no --model, in one folder."""
    d, _, _ = exported
    os.symlink(d / "ckpt.pt", tmp_path / "ckpt.pt")
    r = run("export.py", "ckpt.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "relative" in r.stdout and (tmp_path / "ddpm.onnx").exists()
    r = run("sample_ort.py", "--n", "2", "--steps", "3", "--sampler", "ddim", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "samples.png").exists()


def test_fp16_export_error_against_fp32(exported, tmp_path):
    d, _, _ = exported
    results = export.export(str(d / "ckpt.pt"), str(tmp_path / "h.onnx"), fp16=True)
    worst = max(rel for _, _, rel in results)
    print(f"fp16 ONNX vs fp32 PyTorch: worst relative error {worst:.2e}")
    assert worst < export.TOLERANCE["fp16"]
    m = onnx.load(str(tmp_path / "h.onnx"))
    assert {p.name: p.type.tensor_type.elem_type for p in m.graph.input}["x_t"] == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in m.graph.initializer)


def assert_clean_error(r, fragment):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert fragment in r.stderr, r.stderr
    print(r.stderr.strip().splitlines()[-1])


def test_bad_inputs_give_one_sentence(exported, tmp_path):
    d, _, _ = exported
    assert_clean_error(run("sample_ort.py", "--model", "nope.onnx", cwd=tmp_path), "does not exist")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07 this is not protobuf" * 50)
    assert_clean_error(run("sample_ort.py", "--model", "junk.onnx", cwd=tmp_path), "corrupt")
    plain = export.step_graph(True, 17, 8)  # a valid ONNX model without our metadata
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    assert_clean_error(run("sample_ort.py", "--model", "plain.onnx", cwd=tmp_path), "not one written by export.py")
    assert_clean_error(run("sample_ort.py", "--model", str(d / "ddpm.onnx"), "--n", "0", cwd=tmp_path),
                       "at least 1")
    assert_clean_error(run("export.py", "missing.pt", cwd=tmp_path), "does not exist")
    assert_clean_error(run("export.py", str(d / "ckpt.pt"), "--opset", "13", "-o", "x.onnx", cwd=tmp_path),
                       "17 or later")


@pytest.mark.skipif(CUDA, reason="a usable GPU is present, so --provider cuda cannot fail here")
def test_insisting_on_cuda_without_a_gpu_fails_clearly(exported, tmp_path):
    d, _, _ = exported
    assert_clean_error(run("sample_ort.py", "--model", str(d / "ddpm.onnx"), "--n", "1",
                           "--provider", "cuda", cwd=tmp_path), "CUDA")


# -- CUDA (run where a GPU is usable) ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no usable CUDA GPU for onnxruntime here")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_trajectory_matches_cpu(exported, cuda_graph):
    d, _, _ = exported
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal((4, 3, 16, 16), dtype=np.float32)
    noise = rng.standard_normal((50, 4, 3, 16, 16), dtype=np.float32)
    out = {}
    for provider in ("cpu", "cuda"):
        denoiser, step, meta, device = sample_ort.open_sessions(str(d / "ddpm.onnx"), provider,
                                                                cuda_graph and provider == "cuda", 4)
        assert device == provider
        ts, coefs = sample_ort.step_table(meta["betas"], "ddim", 50, 1.0)
        out[provider] = sample_ort.Sampler(denoiser, step, x_T.shape, device).run(
            x_T, ts, coefs, lambda k, shape: noise[k])
    err = np.abs(out["cuda"] - out["cpu"]).max()
    print(f"CUDA (graph={cuda_graph}) vs CPU, 50 DDIM steps: max abs error {err:.2e}")
    assert err < 1e-3
