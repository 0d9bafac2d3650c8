"""export.py and sample_ort.py: the step graph and step table against ddpm.py for every sampler
setting, the ONNX Runtime sampler against the Gaussian closed form, ONNX Runtime against
PyTorch per call and over whole trajectories fed identical noise, metadata (and tampered
metadata), bad input, and running without torch."""
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import checkpoints
import ddpm
import export
import pictures
import sample_ort
import sampling
import schedules
from conftest import ROOT, SAMPLER_CASES, GaussianOracle, assert_clean_error, implied_moments, probe_inputs, \
    probe_moments, refusal, run_script
from schedules import Sampler


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
    """A tiny 16x16 model trained for 200 steps at batch 8 on shapes, exported to ONNX.

    Trained, not random: with random weights the predicted x0 sits far outside [-1, 1], and
    clipping makes deterministic DDIM chaotic; measured here, torch against itself with 1e-6
    relative jitter on eps drifted by 7e-2 after 50 steps, so no runtime could be compared to it.
    After 200 steps of training the same jitter moves the final images by 5e-6.
    """
    d = tmp_path_factory.mktemp("onnx")
    cfg = ddpm.make_config("tiny", image_size=16, data="shapes", steps=200, batch_size=8, lr=1e-3,
                           warmup=20, ema_decay=0.95, run_dir=str(d / "run"), ckpt=str(d / "ckpt.pt"),
                           num_workers=0, sample_every=0, save_every=0, log_every=50)
    ddpm.train(cfg)
    export.export(str(d / "ckpt.pt"), str(d / "ddpm.onnx"))
    model, _ = ddpm.load_checkpoint(str(d / "ckpt.pt"))
    return d, cfg, model


@pytest.fixture(scope="module")
def oracle_onnx(tmp_path_factory):
    """The Gaussian-data oracle eps (no weights: a few KB) exported with export.py's metadata as a
    1-channel 4x4 model, unclipped, so the ONNX Runtime sampler has a closed-form answer."""
    d = tmp_path_factory.mktemp("oracle")
    cfg = ddpm.make_config("tiny", image_size=4, in_channels=1, attn_resolutions=(), clip_x0=False)
    betas = ddpm.get_betas(cfg.schedule, cfg.T)
    oracle = GaussianOracle(betas).float()
    export.export_module(oracle, cfg, str(d / "oracle.onnx"), oracle)
    return d / "oracle.onnx", betas


# -- the step: sample_ort's table and export's graph against ddpm.py ------------------------------

STEP_SETTINGS = [(sampler, steps, var_type, clip, eta, spacing)
                 for sampler, steps, var_type, eta, spacing in [
                     ("ddpm", 1000, "fixed_large", 0.0, "leading"), ("ddpm", 1000, "fixed_small", 0.0, "leading"),
                     ("ddpm", 100, "fixed_large", 0.0, "leading"), ("ddpm", 100, "fixed_small", 0.0, "trailing"),
                     ("ddim", 1000, "fixed_large", 0.0, "leading"), ("ddim", 50, "fixed_large", 0.0, "leading"),
                     ("ddim", 50, "fixed_small", 1.0, "trailing"), ("ddim", 25, "fixed_large", 0.3, "linspace")]
                 for clip in (True, False)]


def chain_of(betas, sampler, steps, var_type, clip, spacing="leading"):
    d = ddpm.GaussianDiffusion(betas=betas, var_type=var_type, clip_x0=clip)
    if sampler == "ddpm" and steps == len(betas):
        return d
    return d.respace(schedules.spaced_timesteps(len(betas), steps, spacing))


@pytest.mark.parametrize("sampler,steps,var_type,clip,eta,spacing", STEP_SETTINGS)
def test_step_graph_equals_ddpm_step(sampler, steps, var_type, clip, eta, spacing):
    """export.step_graph run by ONNX Runtime with sample_ort's coefficients gives ddpm.py's
    p_sample / ddim_step (float64), x_{t-1} and the predicted x_0, at the first, middle and last
    steps of the chain (the coefficients themselves: tests/test_tables.py)."""
    betas = ddpm.get_betas("linear", 1000)
    ts, coefs = schedules.step_table(betas, Sampler(sampler, steps, eta=eta, spacing=spacing), var_type)
    graph = export.step_graph(clip, export.MIN_OPSET, 8)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    c = chain_of(betas, sampler, steps, var_type, clip, spacing)
    rng = np.random.default_rng(steps)
    worst = 0.0
    n = len(ts)
    for k in sorted({0, 1, n // 2, n - 2, n - 1}):  # k: step number; chain index n - 1 - k
        x_t = (3 * rng.standard_normal((2, 3, 4, 4))).astype(np.float32)  # some x_0 outside [-1, 1]
        eps = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        noise = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        got, got_x0 = session.run(["x_prev", "pred_x0"], {"x_t": x_t, "eps": eps, "noise": noise, "coef": coefs[k]})
        i = torch.full((2,), n - 1 - k)
        args = [torch.from_numpy(a).double() for a in (x_t, eps, noise)]
        x0 = c.predict_x0_from_eps(args[0], i, args[1])
        if sampler == "ddpm":
            ref, ref_x0 = c.p_sample(args[0], i, x0, args[2])
        else:
            ref, ref_x0 = c.ddim_step(args[0], i, args[1], x0, args[2], eta)
        for ours, theirs in ((got, ref.numpy()), (got_x0, ref_x0.numpy())):
            worst = max(worst, np.abs(ours - theirs).max() / max(1.0, np.abs(theirs).max()))
    print(f"{sampler} {steps} {spacing} {var_type} clip={clip} eta={eta}: step graph vs ddpm.py, "
          f"max relative error {worst:.2e}")
    assert worst < 1e-5


# -- whole trajectories: the ONNX Runtime sampler against the Gaussian closed form ---------------

@pytest.mark.parametrize("sampler,steps,var_type,eta,spacing", SAMPLER_CASES)
def test_ort_sampler_output_moments_match_the_closed_form(oracle_onnx, sampler, steps, var_type, eta, spacing):
    """sample_ort's whole loop (table, step graph, IO binding, noise order) on the exported oracle:
    the exact output moments (probe inputs) against the reverse process written out in the test."""
    path, betas = oracle_onnx
    denoiser, step, meta, device = sample_ort.open_sessions(str(path), "cpu")
    ts, coefs = schedules.step_table(meta["betas"], Sampler(sampler, steps, eta=eta, spacing=spacing), var_type)
    x_T, noise = probe_inputs(len(ts), (1, 4, 4))
    x_T, noise = x_T.astype(np.float32), noise.astype(np.float32)
    out = sample_ort.Runner(denoiser, step, x_T.shape, device).run(x_T, ts, coefs, lambda k, shape: noise[k])
    mean, var = probe_moments(out.astype(np.float64))
    m, v = implied_moments(betas, sampler, steps, var_type, eta, spacing)
    err_m, err_v = np.abs(mean - m).max(), np.abs(var / v - 1).max()
    print(f"ORT {sampler} {steps} {spacing} {var_type} eta={eta}: mean {mean.mean():.5f} (closed form {m:.5f}), "
          f"variance {var.mean():.5f} ({v:.5f}); max errors {err_m:.1e}, {err_v:.1e} relative")
    assert err_m < 1e-4 and err_v < 1e-3  # float32; a 10% coefficient error moves them by > 0.1


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
    assert raw["ddpm.format"] == "2"


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_a_model_that_predicts_v_or_x0_exports_eps(tmp_path, prediction):
    """The graph converts the network's output to eps with alpha-bar indexed by t, so the contract
    and sample_ort.py stay the same: ONNX Runtime's eps against PyTorch's model_output, and 20 DDIM
    steps through both samplers (cosine schedule, clipping off: smooth in a random model)."""
    cfg = ddpm.make_config("tiny", image_size=16, prediction=prediction, schedule="cosine", clip_x0=False)
    torch.manual_seed(0)
    model = ddpm.UNet(cfg).eval()
    checkpoints.save_checkpoint(tmp_path / "c.pt", checkpoints.checkpoint_state(cfg, model))
    export.export(str(tmp_path / "c.pt"), str(tmp_path / "m.onnx"))
    d = ddpm.GaussianDiffusion.from_config(cfg)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 400, 999])
    with torch.no_grad():
        ref = d.model_output(model, x, t)[0].numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(["eps"], {"x_t": x.numpy(), "t": t.numpy()})[0]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((2, 3, 16, 16), dtype=np.float32)
    torch_x0 = ddpm.sample_loop(model, d, torch.from_numpy(x_T), Sampler("ddim", 20)).numpy()
    denoiser, step, meta, device = sample_ort.open_sessions(str(tmp_path / "m.onnx"), "cpu")
    ts, coefs = schedules.step_table(meta["betas"], Sampler("ddim", 20))
    ort_x0 = sample_ort.Runner(denoiser, step, x_T.shape, device).run(x_T, ts, coefs, lambda k, s: 0 * x_T)
    traj = np.abs(ort_x0 - torch_x0).max() / np.abs(torch_x0).max()
    print(f"{prediction}: ONNX eps vs PyTorch, relative {err:.1e}; 20 DDIM steps, relative {traj:.1e}")
    assert err < 1e-5 and traj < 1e-4
    raw = ort.InferenceSession(str(tmp_path / "m.onnx")).get_modelmeta().custom_metadata_map
    assert raw["ddpm.network_prediction"] == prediction


def test_metadata_of_an_unclipped_grayscale_model(oracle_onnx):
    path, betas = oracle_onnx
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sample_ort.read_metadata(session, str(path))
    assert (meta["image_size"], meta["in_channels"], meta["clip_x0"]) == (4, 1, False)
    assert np.array_equal(meta["betas"], betas)
    # the step graph in the metadata does not clip either: x_0 = 3 passes through unchanged
    step = ort.InferenceSession(meta["step_graph"], providers=["CPUExecutionProvider"])
    x_t, zeros = np.full((1, 1, 4, 4), 3.0, np.float32), np.zeros((1, 1, 4, 4), np.float32)
    coef = np.array([1, 1, 1, 0, 0, 0], np.float32)  # x_prev = pred_x0 = x_t - eps
    assert step.run(None, {"x_t": x_t, "eps": zeros, "noise": zeros, "coef": coef})[0].max() == 3.0


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


# -- whole trajectories with a trained U-Net --------------------------------------------------------

@pytest.mark.parametrize("sampler,steps,eta", [pytest.param("ddpm", 1000, 0.0, marks=pytest.mark.slow),
                                               ("ddpm", 100, 0.0), ("ddim", 50, 0.0), ("ddim", 50, 1.0)])
def test_trajectory_parity_with_identical_noise(exported, sampler, steps, eta):
    d, cfg, model = exported
    rng = np.random.default_rng(7)
    x_T = rng.standard_normal((2, 3, 16, 16), dtype=np.float32)
    noise = rng.standard_normal((steps, 2, 3, 16, 16), dtype=np.float32)
    ref = ddpm.sample_loop(model, ddpm.GaussianDiffusion.from_config(cfg), torch.from_numpy(x_T), Sampler(sampler, steps, eta=eta), noise_fn=lambda k, shape: torch.from_numpy(noise[k])).numpy()
    denoiser, step, meta, device = sample_ort.open_sessions(str(d / "ddpm.onnx"), "cpu")
    ts, coefs = schedules.step_table(meta["betas"], Sampler(sampler, steps, eta=eta), meta["var_type"])
    got = sample_ort.Runner(denoiser, step, x_T.shape, device).run(x_T, ts, coefs, lambda k, shape: noise[k])
    err = np.abs(got - ref).max()
    print(f"{sampler} {steps} steps eta={eta}: final images max abs error {err:.2e} "
          f"(values span {ref.min():.2f}..{ref.max():.2f})")
    assert err < 1e-3


# -- pictures ------------------------------------------------------------------------------------

def test_uint8_of_numbers_and_tensors():
    """(x + 1) 127.5 rounded half to even, clipped: numbers written here; tensors give the same."""
    x = np.array([-1.3, -1.0, -0.5, 0.0, 0.5, 1.0, 1.2], np.float32).reshape(1, 1, 1, 7)
    ours = pictures.to_uint8(x)
    assert ours.shape == (1, 1, 7, 1) and ours.ravel().tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert np.array_equal(ours, pictures.to_uint8(torch.from_numpy(x).to(torch.bfloat16)))


def test_grid_layout(tmp_path):
    images = np.stack([np.full((3, 2, 1), 10 * k, np.uint8) for k in range(5)])
    pictures.save_grid(images, str(tmp_path / "a.png"), pad=1)
    a = np.asarray(Image.open(tmp_path / "a.png"))
    assert a.shape == (2 * 4 + 1, 3 * 3 + 1)  # 5 images: 3 per row, 2 rows, pad 1
    assert a[1, 1] == 0 and a[1, 4] == 10 and a[5, 1] == 30 and a[5, 7] == 255  # the sixth cell is empty


def test_process_pictures_are_laid_out_as_documented(tmp_path):
    rng = np.random.default_rng(0)
    frames = [(t, rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8),
               rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)) for t in (999, 500, 0)]
    final = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    for ext in (".png", ".gif", ".webp"):
        pictures.save_progress(frames, final, str(tmp_path / f"a{ext}"))
    with Image.open(tmp_path / "a.png") as still:
        # 5 rows of 16x16 images shown 4x (64 px), a label line; 4 column pairs (3 steps and the sample)
        assert still.size == (4 * (2 * 64 + 6), 12 + 5 * (64 + 2))
        cell = np.asarray(still.convert("RGB"))[12:12 + 64, 0:64]
        assert np.array_equal(cell[::4, ::4], frames[0][1][0])  # x_t of image 0 at t = 999
    with Image.open(tmp_path / "a.gif") as animation:
        assert animation.n_frames == 4


def test_sample_ort_draws_the_reverse_process(exported, tmp_path):
    d, _, _ = exported
    sample_ort.sample(str(d / "ddpm.onnx"), sampling.Request(n=3, out=str(tmp_path / "s.png"), progress=str(tmp_path / "p.png"), sampler=Sampler("ddim", steps=20)), provider="cpu")
    sample_ort.sample(str(d / "ddpm.onnx"), sampling.Request(n=3, out=str(tmp_path / "s.png"), progress=str(tmp_path / "p.gif"), sampler=Sampler("ddim", steps=20)), provider="cpu")
    with Image.open(tmp_path / "p.png") as still, Image.open(tmp_path / "p.gif") as animation:
        assert still.size == (11 * (2 * 64 + 6), 12 + 3 * 66)  # 10 steps and the sample
        assert animation.n_frames == 21  # every one of the 20 steps, and the sample
        sample_column = np.asarray(still.convert("RGB"))[12:12 + 64, 10 * 134:10 * 134 + 64]
    with Image.open(tmp_path / "s.png") as grid:
        first = np.asarray(grid.convert("RGB"))[2:18, 2:18]
    assert np.array_equal(sample_column[::4, ::4], first)  # the last column is the sample itself
    refusal(sample_ort.main, ["--model", d / "ddpm.onnx", "--n", 1, "--progress", tmp_path / "p.txt"], ".gif")


# -- the scripts --------------------------------------------------------------------------------

def test_sample_ort_runs_without_torch(exported, tmp_path):
    d, _, _ = exported
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "blocker"))
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "blocked" in check.stderr
    r = run_script("sample_ort.py", "--model", d / "ddpm.onnx", "--n", "3", "--sampler", "ddim",
                   "--steps", "5", "--out", "g.png", "--outdir", "imgs", "--provider", "cpu", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "image-steps/s" in r.stdout and "CPUExecutionProvider" in r.stdout
    print(r.stdout.strip().splitlines()[-1])
    assert len(os.listdir(tmp_path / "imgs")) == 3
    with Image.open(tmp_path / "g.png") as g:
        g.load()
    # imported as libraries, with torch blocked: the step tables, pictures and checks, and a sampler run
    code = f"""
import sys, numpy as np
sys.path.insert(0, {ROOT!r})
import pictures, sample_ort, sampling, schedules
ts, coefs = schedules.step_table(schedules.get_betas("cosine", 50), schedules.Sampler("ddim", 5))
denoiser, step, meta, device = sample_ort.open_sessions({str(d / "ddpm.onnx")!r}, "cpu")
x0 = sample_ort.Runner(denoiser, step, (2, 3, 16, 16), device).run(
    np.zeros((2, 3, 16, 16), np.float32), *schedules.step_table(meta["betas"], schedules.Sampler("ddim", 5)),
    lambda k, s: np.zeros(s, np.float32))
pictures.save_grid(pictures.to_uint8(x0), "lib.png")
sampling.check_sampler(schedules.Sampler("ddim", 5), 50)
print(len(ts), coefs.shape, x0.shape, "torch" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    print(r.stdout.strip())
    assert r.stdout.split() == ["5", "(5,", "6)", "(2,", "3,", "16,", "16)", "False"] and (tmp_path / "lib.png").exists()


@pytest.mark.heavy
def test_export_and_sample_cli_with_defaults(exported, tmp_path):
    """python export.py ckpt.pt, then python sample_ort.py with no --model, in one folder."""
    d, _, _ = exported
    os.symlink(d / "ckpt.pt", tmp_path / "ckpt.pt")
    r = run_script("export.py", "ckpt.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "relative" in r.stdout and (tmp_path / "ddpm.onnx").exists()
    r = run_script("sample_ort.py", "--n", "2", "--steps", "3", "--sampler", "ddim", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "samples.png").exists()


def test_grayscale_model_samples_grayscale_pictures(oracle_onnx, tmp_path):
    path, _ = oracle_onnx
    images = sample_ort.sample(str(path), sampling.Request(n=3, out=str(tmp_path / "g.png"), outdir=str(tmp_path / "imgs"), sampler=Sampler("ddim", steps=10)), provider="cpu")
    assert images.shape == (3, 4, 4, 1)
    with Image.open(tmp_path / "g.png") as g, Image.open(tmp_path / "imgs" / "00002.png") as one:
        assert g.mode == "L" and one.mode == "L" and one.size == (4, 4)


def test_fp16_export_error_against_fp32(exported, tmp_path):
    d, _, _ = exported
    results = export.export(str(d / "ckpt.pt"), str(tmp_path / "h.onnx"), fp16=True)
    worst = max(rel for _, _, rel in results)
    print(f"fp16 ONNX vs fp32 PyTorch: worst relative error {worst:.2e}")
    assert worst < export.TOLERANCE["fp16"]
    m = onnx.load(str(tmp_path / "h.onnx"))
    assert {p.name: p.type.tensor_type.elem_type for p in m.graph.input}["x_t"] == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in m.graph.initializer)


def test_export_refuses_to_destroy_its_input_and_writes_nothing_on_failure(exported, tmp_path, monkeypatch):
    d, _, _ = exported
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes((d / "ckpt.pt").read_bytes())
    before = ckpt.read_bytes()
    refusal(export.main, [ckpt, "-o", ckpt], ".onnx")
    (tmp_path / "ckpt.onnx").symlink_to(ckpt)
    refusal(export.main, [ckpt, "-o", tmp_path / "ckpt.onnx"], "the input file")
    assert ckpt.read_bytes() == before
    # a check that fails leaves no file and no temp file behind
    monkeypatch.setitem(export.TOLERANCE, "fp32", 0.0)
    refusal(export.main, [ckpt, "-o", tmp_path / "m.onnx"], "was not written")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.onnx", "ckpt.pt"]


def test_bad_inputs_give_one_sentence(exported, tmp_path):
    d, _, _ = exported
    model = str(d / "ddpm.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07 this is not protobuf" * 50)
    onnx.save(export.step_graph(True, 17, 8), str(tmp_path / "plain.onnx"))  # valid, no metadata
    (tmp_path / "a_dir.png").mkdir()
    (tmp_path / "a_dir.onnx").mkdir()
    for argv, fragment in [
            (["--model", "nope.onnx"], "does not exist"),
            (["--model", tmp_path / "junk.onnx"], "corrupt"),
            (["--model", tmp_path / "plain.onnx"], "not one written by export.py"),
            (["--model", model, "--n", "0"], "--n 0"),
            (["--model", model, "--batch", "0"], "--batch 0"),
            (["--model", model, "--steps", "0"], "--steps"),
            (["--model", model, "--steps", "1001"], "--steps"),
            (["--model", model, "--sampler", "ddim", "--eta", "2"], "--eta"),
            (["--model", model, "--sampler", "ddim", "--eta", "nan"], "--eta"),
            (["--model", model, "--sampler", "ddim", "--eta", "-0.5"], "--eta"),
            (["--model", model, "--eta", "0.5"], "--sampler ddpm has none to set"),
            (["--model", model, "--out", tmp_path / "a_dir.png"], "is a folder"),
            (["--model", model, "--out", tmp_path / "x.txt"], ".png"),
            (["--model", model, "--out", model], ".png"),
            (["--model", model, "--out", "/proc/no/such/x.png"], "cannot write"),
            (["--model", model, "--outdir", d / "ckpt.pt"], "is a file"),
            (["--model", model, "--provider", "tpu"], "invalid choice")]:
        refusal(sample_ort.main, argv, fragment)
    for argv, fragment in [
            (["missing.pt"], "does not exist"),
            ([d / "ckpt.pt", "--opset", "13", "-o", tmp_path / "x.onnx"], "--opset 13"),
            ([d / "ckpt.pt", "--opset", "99", "-o", tmp_path / "x.onnx"], "--opset 99"),
            ([d / "ckpt.pt", "-o", tmp_path / "x.png"], ".onnx"),
            ([d / "ckpt.pt", "-o", d / "ckpt.pt" / "m.onnx"], "cannot write"),
            ([d / "ckpt.pt", "-o", tmp_path / "a_dir.onnx"], "is a folder"),
            ([d / "ckpt.pt", "-o", "/proc/no/such/m.onnx"], "cannot write")]:
        refusal(export.main, argv, fragment)
    assert not (tmp_path / "x.onnx").exists()


def test_export_at_the_newest_opset(exported, tmp_path):
    d, _, _ = exported
    results = export.export(str(d / "ckpt.pt"), str(tmp_path / "new.onnx"), opset=export.MAX_OPSET)
    assert max(rel for _, _, rel in results) < 1e-5
    m = onnx.load(str(tmp_path / "new.onnx"))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == export.MAX_OPSET


def tampered(path, tmp_path, change):
    """A copy of the ONNX file with its metadata changed: change(dict) edits it in place."""
    m = onnx.load(str(path))
    meta = {p.key: p.value for p in m.metadata_props}
    change(meta)
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    out = tmp_path / f"t{len(os.listdir(tmp_path))}.onnx"
    onnx.save(m, str(out))
    return out


def set_key(key, value):
    def change(meta):
        meta[key] = value
    return change


def drop_key(key):
    def change(meta):
        del meta[key]
    return change


@pytest.mark.parametrize("change,fragment", [
    (drop_key("ddpm.betas"), "lacks the metadata ddpm.betas"),
    (drop_key("ddpm.step_graph"), "lacks the metadata ddpm.step_graph"),
    (set_key("ddpm.betas", "[0.1, \"x\"]"), "altered"),
    (set_key("ddpm.betas", "[0.5, -0.1, 0.2]"), "in (0, 1]"),
    (set_key("ddpm.betas", "{}"), "altered"),
    (set_key("ddpm.T", "999"), "ddpm.T is 999"),
    (set_key("ddpm.image_size", "eight"), "altered"),
    (set_key("ddpm.image_size", "8"), "x_t has shape"),
    (set_key("ddpm.in_channels", "3"), "x_t has shape"),
    (set_key("ddpm.in_channels", "7"), "ddpm.in_channels 7"),
    (set_key("ddpm.var_type", "learned"), "ddpm.var_type 'learned'"),
    (set_key("ddpm.clip_x0", "maybe"), "ddpm.clip_x0 'maybe'"),
    (set_key("ddpm.format", "99"), "format 99"),
    (set_key("ddpm.step_graph", "not base64 at all!"), "altered"),
    (set_key("ddpm.step_graph", "AAAA"), "step_graph ONNX Runtime cannot load")])
def test_tampered_metadata_is_a_sentence(oracle_onnx, tmp_path, change, fragment):
    path, _ = oracle_onnx
    out = tampered(path, tmp_path, change)
    refusal(sample_ort.main, ["--model", out, "--n", 1, "--steps", 2, "--sampler", "ddim",
                              "--out", tmp_path / "s.png", "--provider", "cpu"], fragment)
    assert not (tmp_path / "s.png").exists()


def test_step_graph_with_other_inputs_is_a_sentence(oracle_onnx, tmp_path):
    path, _ = oracle_onnx
    import base64
    other = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    out = tampered(path, tmp_path, set_key("ddpm.step_graph", base64.b64encode(other.SerializeToString()).decode()))
    refusal(sample_ort.main, ["--model", out, "--n", 1, "--out", tmp_path / "s.png"], "not the update export.py writes")


def test_an_update_graph_that_does_not_update_is_a_sentence(oracle_onnx, tmp_path):
    """The right names and outputs, but x_prev = x_t: it would "sample" its x_T without a word."""
    path, _ = oracle_onnx
    import base64
    h = onnx.helper
    names = ("x_t", "eps", "noise")
    fake = h.make_model(h.make_graph(
        [h.make_node("Identity", ["x_t"], ["x_prev"]), h.make_node("Identity", ["eps"], ["pred_x0"])], "g",
        [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["B", "C", "H", "W"]) for n in names]
        + [h.make_tensor_value_info("coef", onnx.TensorProto.FLOAT, [6])],
        [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["B", "C", "H", "W"]) for n in ("x_prev", "pred_x0")]),
        opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    out = tampered(path, tmp_path, set_key("ddpm.step_graph", base64.b64encode(fake.SerializeToString()).decode()))
    refusal(sample_ort.main, ["--model", out, "--n", 1, "--out", tmp_path / "s.png"], "does not compute the update")


@pytest.mark.heavy
def test_samples_and_pictures_on_a_full_disk_are_a_sentence_and_keep_the_old_files(exported, small_disk, tmp_path):
    """The grid (--out) or a picture of the process (--progress, PNG or GIF) on a disk with no byte
    left, in both scripts: one sentence that names the file and the full disk, the files that
    were there before unchanged, and the samples written where their own disk has room."""
    d, _, _ = exported
    disk = small_disk(1 << 20)
    old = {name: f"old {name}".encode() for name in ("g.png", "p.png", "p.gif")}
    for name, content in old.items():
        (disk.path / name).write_bytes(content)
    disk.fill()
    sources = ((sample_ort.main, ["--model", d / "ddpm.onnx", "--provider", "cpu"]),
               (ddpm.main, ["sample", "--ckpt", d / "ckpt.pt"]))
    for main, source in sources:
        for name in old:
            out = ["--out", disk.path / name] if name == "g.png" else ["--out", tmp_path / "g.png", "--progress", disk.path / name]
            refusal(main, [*source, "--n", 2, "--sampler", "ddim", "--steps", 3, *out], f"cannot write '{disk.path / name}'",
                    "No space left")
            if name != "g.png":  # the samples were written before the pictures of the process
                assert (tmp_path / "g.png").exists(), name
                os.remove(tmp_path / "g.png")
    assert {name: (disk.path / name).read_bytes() for name in old} == old
    assert sorted(os.listdir(disk.path)) == sorted([*old, "filler"])  # no temp file left behind


def test_sampling_mistakes_of_both_scripts_are_sentences(exported, tmp_path):
    """A negative or too large seed, one file named as --out and --progress, --cuda-graph on the CPU."""
    d, _, _ = exported
    model, ckpt = ["--model", d / "ddpm.onnx"], ["--ckpt", d / "ckpt.pt"]
    for main, source in ((sample_ort.main, model), (ddpm.main, ["sample", *ckpt])):
        refusal(main, [*source, "--n", 1, "--seed", -1, "--out", tmp_path / "s.png"], "--seed -1")
        refusal(main, [*source, "--n", 1, "--seed", 2 ** 64, "--out", tmp_path / "s.png"], "2^63")
        refusal(main, [*source, "--n", 1, "--out", tmp_path / "s.png", "--progress", tmp_path / "s.png"], "named twice")
    refusal(sample_ort.main, [*model, "--n", 1, "--cuda-graph", "--provider", "cpu", "--out", tmp_path / "s.png"],
            "needs --provider cuda")
    assert not os.path.exists(tmp_path / "s.png")
    for script, source in (("sample_ort.py", model), ("ddpm.py", ["sample", *ckpt])):  # said, not silent
        r = run_script(script, *source, "--n", 1, "--steps", 2, "--sampler", "ddim", "--guidance", 5,
                       "--out", tmp_path / "g.png", *(["--provider", "cpu"] if script == "sample_ort.py" else []))
        assert r.returncode == 0 and "--guidance has no effect: the model is unconditional" in r.stderr, r.stderr


def test_help_gives_every_flag_a_default():
    for main in (export.main, sample_ort.main):
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main(["-h"])
        flags = [line for line in out.getvalue().splitlines() if line.strip().startswith("-")]
        text = " ".join(out.getvalue().split())
        assert text.count("(default") >= len(flags) - 1, out.getvalue()  # -h has none


@pytest.mark.skipif(CUDA, reason="a usable GPU is present, so --provider cuda cannot fail here")
def test_insisting_on_cuda_without_a_gpu_fails_clearly(exported, tmp_path):
    d, _, _ = exported
    assert_clean_error(run_script("sample_ort.py", "--model", d / "ddpm.onnx", "--n", "1",
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
        ts, coefs = schedules.step_table(meta["betas"], Sampler("ddim", 50, eta=1.0))
        out[provider] = sample_ort.Runner(denoiser, step, x_T.shape, device).run(
            x_T, ts, coefs, lambda k, shape: noise[k])
    err = np.abs(out["cuda"] - out["cpu"]).max()
    print(f"CUDA (graph={cuda_graph}) vs CPU, 50 DDIM steps: max abs error {err:.2e}")
    assert err < 1e-3


# -- DPM-Solver++(2M): export's multistep graph against ddpm.py ----------------------------------


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("guided", [False, True])
def test_multistep_graph_equals_dpm_solver_step(clip, guided):
    """export.multistep_graph run by ONNX Runtime with sample_ort's table gives ddpm.py's
    dpm_solver_step (float64), and hands on the step's x_0; guided: on the eps that
    classifier-free guidance forms from the two halves."""
    betas = ddpm.get_betas("linear", 1000)
    ts, coefs = schedules.step_table(betas, Sampler("dpm++", 20, spacing="trailing"), "fixed_large")
    graph = export.multistep_graph(clip, export.MIN_OPSET, 8, guided)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    c = ddpm.GaussianDiffusion(betas=betas, clip_x0=clip).respace(schedules.spaced_timesteps(1000, 20, "trailing"))
    rng = np.random.default_rng(3)
    worst = 0.0
    for k in (0, 1, 10, 18, 19):
        x_t = (3 * rng.standard_normal((2, 3, 4, 4))).astype(np.float32)
        eps = rng.standard_normal((4 if guided else 2, 3, 4, 4)).astype(np.float32)
        prev = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        feed = {"x_t": np.concatenate([x_t, x_t]) if guided else x_t, "eps": eps, "prev_x0": prev, "coef": coefs[k]}
        e = torch.from_numpy(eps).double()
        if guided:
            feed["guidance"] = np.array([2.5], np.float32)
            e = e[2:] + 2.5 * (e[:2] - e[2:])
        x_prev, pred_x0 = session.run(["x_prev", "pred_x0"], feed)
        if guided:  # the guided eps is an output too
            worst = max(worst, np.abs(session.run(["eps_guided"], feed)[0] - e.numpy()).max())
        i, x_t64 = torch.full((2,), 19 - k), torch.from_numpy(x_t).double()
        ref, ref_x0 = c.dpm_solver_step(x_t64, i, c.predict_x0_from_eps(x_t64, i, e), torch.from_numpy(prev).double())
        if guided:
            assert np.array_equal(x_prev[:2], x_prev[2:])
            x_prev = x_prev[:2]
        worst = max(worst, np.abs(x_prev - ref.numpy()).max() / max(1.0, np.abs(ref.numpy()).max()),
                    np.abs(pred_x0 - ref_x0.numpy()).max() / max(1.0, np.abs(ref_x0.numpy()).max()))
    print(f"multistep graph clip={clip} guided={guided}: max relative error {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.parametrize("steps,spacing", [(20, "trailing"), (10, "leading")])
def test_dpm_solver_trajectory_parity(exported, steps, spacing):
    """The whole DPM-Solver++ loop, the ONNX Runtime Sampler (two state buffers that swap) against
    ddpm.sample_loop from the same x_T, with the trained U-Net."""
    d, cfg, model = exported
    x_T = np.random.default_rng(7).standard_normal((4, 3, 16, 16), dtype=np.float32)
    ref = ddpm.sample_loop(model, ddpm.GaussianDiffusion.from_config(cfg), torch.from_numpy(x_T), Sampler("dpm++", steps, spacing=spacing)).numpy()
    denoiser, step, meta, device = sample_ort.open_sessions(str(d / "ddpm.onnx"), "cpu", multistep=True)
    ts, coefs = schedules.step_table(meta["betas"], Sampler("dpm++", steps, spacing=spacing), meta["var_type"])
    got = sample_ort.Runner(denoiser, step, x_T.shape, device).run(x_T, ts, coefs)
    err = np.abs(got - ref).max()
    ddim = ddpm.sample_loop(model, ddpm.GaussianDiffusion.from_config(cfg), torch.from_numpy(x_T), Sampler("ddim", steps, spacing=spacing)).numpy()
    print(f"dpm++ {steps} {spacing}: ORT vs PyTorch final images max abs error {err:.2e}; "
          f"the same x_T through DDIM lands {np.abs(ddim - ref).max():.2e} away")
    assert err < 1e-3
    assert np.abs(ddim - ref).max() > 100 * err  # the loop ran DPM-Solver++, not DDIM


def test_an_export_without_the_multistep_graph_refuses_dpm_solver(oracle_onnx, tmp_path):
    path, _ = oracle_onnx
    out = tampered(path, tmp_path, drop_key("ddpm.multistep_graph"))
    refusal(sample_ort.main, ["--model", out, "--n", 1, "--steps", 5, "--sampler", "dpm++",
                              "--out", tmp_path / "s.png", "--provider", "cpu"], "export it again")
    sample_ort.sample(str(out), sampling.Request(n=1, out=str(tmp_path / "s.png"), sampler=Sampler("ddim", steps=5)), provider="cpu")
    refusal(sample_ort.main, ["--model", path, "--n", 1, "--sampler", "dpm++", "--eta", "0.5",
                              "--out", tmp_path / "s.png"], "--eta sets DDIM's noise")


# -- noise drawn on the device ----------------------------------------------------------------------

def test_noise_graph_is_the_one_node_model_it_says():
    import base64
    rebuilt = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("RandomNormalLike", ["like"], ["noise"])], "ddpm_noise",
        [onnx.helper.make_tensor_value_info("like", onnx.TensorProto.FLOAT, ["B", "C", "H", "W"])],
        [onnx.helper.make_tensor_value_info("noise", onnx.TensorProto.FLOAT, ["B", "C", "H", "W"])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8, producer_name="")
    onnx.checker.check_model(rebuilt)
    assert base64.b64decode(sample_ort.NOISE_GRAPH) == rebuilt.SerializeToString()


def test_device_noise_gives_the_closed_form_moments_and_follows_the_seed(oracle_onnx, tmp_path):
    """The ancestral sampler with noise drawn by ONNX Runtime on the oracle: the output's mean and
    variance over 2,000 x 16 pixels against the closed form (a noise of the wrong scale, or the
    same draw every step, moves the variance by far more than the sampling error of ~2%)."""
    path, betas = oracle_onnx
    denoiser, step, meta, device = sample_ort.open_sessions(str(path), "cpu")
    ts, coefs = schedules.step_table(meta["betas"], Sampler("ddpm", 100), "fixed_large")
    x_T = np.random.default_rng(0).standard_normal((2000, 1, 4, 4), dtype=np.float32)

    def run(seed):
        return sample_ort.Runner(denoiser, step, x_T.shape, device,
                                  noise=sample_ort.noise_session(seed, device)).run(x_T, ts, coefs)
    out = run(1)
    m, v = implied_moments(betas, "ddpm", 100, "fixed_large", 0.0)
    mean, var = out.mean(), out.var()
    print(f"device noise, ddpm 100 steps: mean {mean:.4f} (closed form {m:.4f}), variance {var:.4f} ({v:.4f})")
    assert abs(mean - m) < 0.02 and abs(var / v - 1) < 0.05
    assert np.array_equal(run(1), out) and not np.array_equal(run(2), out)


@pytest.mark.parametrize("learned", [False, True])
def test_guided_step_graph_outputs_the_guided_eps_and_pred_x0(learned):
    """The guided update's extra outputs against the formulas written here: eps_guided = eps_u +
    s (eps_c - eps_u) (Ho & Salimans eq. 6), pred_x0 = clip(a x_t - b eps_guided, -1, 1)."""
    graph = export.step_graph(True, export.MIN_OPSET, 8, learned=learned, guided=True)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    x = (2 * rng.standard_normal((2, 3, 4, 4))).astype(np.float32)
    eps = rng.standard_normal((4, 3, 4, 4)).astype(np.float32)
    coef = np.array([1.7, 0.9, 0.3, 0.2, 0.1, 0.05] + ([1.0, -6.0, -4.0] if learned else []), np.float32)
    feed = {"x_t": np.concatenate([x, x]), "eps": eps, "noise": rng.standard_normal((2, 3, 4, 4)).astype(np.float32),
            "coef": coef, "guidance": np.array([2.5], np.float32)}
    if learned:
        feed["var_values"] = rng.uniform(-1, 1, (4, 3, 4, 4)).astype(np.float32)
    eps_guided, pred_x0 = session.run(["eps_guided", "pred_x0"], feed)
    want_eps = eps[2:] + 2.5 * (eps[:2] - eps[2:])
    want_x0 = np.clip(1.7 * x - 0.9 * want_eps, -1, 1)
    err = max(np.abs(eps_guided - want_eps).max(), np.abs(pred_x0 - want_x0).max())
    print(f"guided step graph (learned={learned}): max abs error of eps_guided and pred_x0 {err:.1e}")
    assert err < 1e-5 and 0 < np.mean(np.abs(want_x0) == 1) < 1  # some x_0 were clipped, not all
