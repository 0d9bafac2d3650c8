"""Conditional generation (issue 12): the class embedding, label dropout in training, classifier-
free guidance in both samplers (PyTorch and the ONNX Runtime step graph, whole trajectories fed
the same noise), classifier guidance against a classifier whose gradient is a closed form, the
noisy classifier's training and resume, and the command lines. The accuracy of guided samples
by an independent judge is in tests/test_demo.py (slow)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import ddpm
import export
import pictures
import sample_ort
import sampling
from conftest import refusal, run_main
from schedules import Sampler
import schedules

K = len(data.SHAPE_CLASSES)


def conditional_cfg(**overrides):
    settings = dict(image_size=16, T=50, schedule="cosine", data="shapes", num_classes=K,
                    class_names=data.SHAPE_CLASSES, cond=True)
    return ddpm.make_config("tiny", **{**settings, **overrides})


def random_conditional_unet(cfg, seed=0):
    """A random U-Net whose class embedding is scaled up, so that the label visibly matters."""
    torch.manual_seed(seed)
    model = ddpm.UNet(cfg).eval()
    with torch.no_grad():
        model.label_emb.weight.mul_(20)
    return model


# -- the model -------------------------------------------------------------------------------------

def test_unconditional_model_is_unchanged_and_conditional_adds_one_embedding():
    plain = ddpm.UNet(ddpm.make_config("cifar10"))
    assert ddpm.count_params(plain) == 35_746_307  # Ho et al.'s CIFAR-10 model (README)
    assert not any("label" in k for k in plain.state_dict())
    cond = ddpm.UNet(ddpm.make_config("cifar10", num_classes=10, class_names=tuple("abcdefghij")))
    extra = set(cond.state_dict()) - set(plain.state_dict())
    assert extra == {"label_emb.weight"} and cond.label_emb.weight.shape == (11, 512)
    with pytest.raises(ValueError, match="unconditional"):
        plain(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_no_label_is_the_last_row_and_labels_change_the_output():
    cfg = conditional_cfg()
    model = random_conditional_unet(cfg)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 20, 49])
    with torch.no_grad():
        none = model(x, t)
        null = model(x, t, torch.full((3,), K))
        a, b = model(x, t, torch.zeros(3, dtype=torch.long)), model(x, t, torch.ones(3, dtype=torch.long))
    print(f"y=None vs y=K: {(none - null).abs().max():.1e}; class 0 vs 1: {(a - b).abs().max():.2f}")
    assert torch.equal(none, null)
    assert (a - b).abs().max() > 0.1


class Affine(torch.nn.Module):
    """out(x, t, y) = [x, x] + table[y] (eps and learned-variance channels): each branch's output
    is known in closed form."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.table = torch.randn(num_classes + 1, channels, generator=torch.Generator().manual_seed(3))
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(len(x))
        return x.repeat(1, 2, 1, 1) + self.table[y][:, :, None, None]


@pytest.mark.parametrize("s", [0.0, 1.0, 3.0, 7.5])
def test_classifier_free_guidance_is_eq_6_in_one_batched_call(s):
    model = Affine(6, 4)  # 6 channels: 3 of eps, 3 of learned-variance values
    x, t, y = torch.randn(5, 3, 4, 4), torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 2, 3, 1])
    got = ddpm.ClassifierFreeGuidance(model, y, s)(x, t)
    table = model.table.numpy()
    cond, uncond = table[y.numpy()], table[[4] * 5]
    expected_eps = x.numpy() + (uncond + s * (cond - uncond))[:, :3, None, None]
    expected_var = x.numpy() + (uncond if s == 0 else cond)[:, 3:, None, None]  # s = 0: the unconditional model
    err = max(np.abs(got[:, :3].numpy() - expected_eps).max(), np.abs(got[:, 3:].numpy() - expected_var).max())
    print(f"s={s}: max error {err:.1e}, network calls {model.calls}")
    assert err < 1e-5
    assert model.calls == ([5] if s in (0, 1) else [10])  # both branches in one call


class LinearClassifier(torch.nn.Module):
    """logits = A flatten(x): grad_x log p(y | x) = A_y - sum_k p_k A_k, in closed form."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.A = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.3

    def forward(self, x, t):
        return x.double().flatten(1) @ self.A.T


def test_classifier_guidance_shifts_eps_by_the_closed_form_gradient():
    betas = ddpm.get_betas("linear", 100)
    d = ddpm.GaussianDiffusion(betas=betas)
    clf = LinearClassifier(3 * 4 * 4, 5)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    i, y, s = torch.tensor([0, 10, 50, 99]), torch.tensor([0, 4, 2, 2]), 2.5
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731  eps_theta = 0
    eps, _, _ = d.model_output(zero, x, i, ddpm.ClassifierGradient(clf, y, s))
    A, xf = clf.A.numpy(), x.flatten(1).numpy()
    logits = xf @ A.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = A[y.numpy()] - p @ A
    expected = -np.sqrt(1 - d.alphas_cumprod[i.numpy()])[:, None] * s * grad
    err = np.abs(eps.flatten(1).numpy() - expected).max()
    print(f"eps - sqrt(1 - abar) s grad log p(y|x_t): max error {err:.1e} (values up to {np.abs(expected).max():.2f})")
    assert err < 1e-12


def test_classifier_guidance_moves_samples_towards_the_class():
    """A classifier that prefers bright images for class 1 and dark ones for class 0: guided DDIM
    samples of a zero-eps model end brighter for 1 than for 0, and more so at a larger scale."""
    class Brightness(torch.nn.Module):
        def forward(self, x, t):
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([-4 * m, 4 * m], dim=1)

    d = ddpm.GaussianDiffusion(betas=ddpm.get_betas("linear", 100))
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    x_T = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    means = {}
    for s in (1.0, 4.0):
        for label in (0, 1):
            x0 = ddpm.sample_loop(zero, d, x_T, Sampler("ddim", 20), guidance=ddpm.Guidance(torch.full((8,), label), classifier=Brightness(), classifier_scale=s))
            means[s, label] = x0.mean().item()
    print({f"s={s} y={label}": round(v, 3) for (s, label), v in means.items()})
    assert means[1.0, 1] > means[1.0, 0]
    assert means[4.0, 1] - means[4.0, 0] > means[1.0, 1] - means[1.0, 0]


def test_the_noisy_classifier_is_the_unets_downsampling_half():
    cfg = dataclass_replace(ddpm.make_config("tiny", image_size=16), kind="classifier", num_classes=K,
                            class_names=data.SHAPE_CLASSES)
    clf, unet = ddpm.build_model(cfg), ddpm.UNet(dataclass_replace(cfg, kind="denoiser", num_classes=0, class_names=()))
    ours = set(clf.state_dict())
    encoder = {k for k in unet.state_dict() if not k.startswith(("up.", "norm_out", "conv_out"))}
    assert ours - encoder == {"norm_out.weight", "norm_out.bias", "head.weight", "head.bias"}
    assert encoder <= ours
    logits = clf(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]))
    assert logits.shape == (2, K)


def dataclass_replace(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


# -- training ----------------------------------------------------------------------------------------

def tiny_run(tmp_path, name, **overrides):
    settings = dict(image_size=16, data="shapes", steps=2, batch_size=64, warmup=1, run_dir=str(tmp_path / name),
                    ckpt=str(tmp_path / f"{name}.pt"), num_workers=0, sample_every=0, log_every=1, save_every=0)
    return ddpm.make_config("tiny", **{**settings, **overrides})


@pytest.mark.heavy
def test_cond_training_drops_labels_at_p_uncond_and_passes_the_rest(tmp_path, monkeypatch):
    seen = []
    real = ddpm.GaussianDiffusion.training_loss

    def recording(self, model, x0, i, noise, y=None):
        seen.append(None if y is None else y.clone())
        return real(self, model, x0, i, noise, y)

    monkeypatch.setattr(ddpm.GaussianDiffusion, "training_loss", recording)
    ddpm.train(tiny_run(tmp_path, "cond", cond=True, p_uncond=0.5, steps=3))
    labels = torch.cat(seen[:4])  # pre-flight and 3 steps; the save check is unconditional
    dropped = (labels == K).float().mean().item()
    print(f"p_uncond 0.5: {dropped:.0%} of {len(labels)} labels replaced by 'no label'")
    assert 0.35 < dropped < 0.65 and labels.min() >= 0 and len(set(labels.tolist())) == K + 1
    state = torch.load(tmp_path / "cond.pt", weights_only=True)
    assert state["config"]["num_classes"] == K and tuple(state["config"]["class_names"]) == data.SHAPE_CLASSES
    seen.clear()
    ddpm.train(tiny_run(tmp_path, "plain"))
    assert all(y is None for y in seen)


@pytest.mark.heavy
def test_cond_needs_labelled_data_and_resume_keeps_the_conditioning(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(flat / f"{k}.png")
    refusal(ddpm.main, ["train", "--data", flat, "--cond", "--steps", "1", "--batch-size", "2",
                        "--ckpt", tmp_path / "f.pt", "--out", tmp_path / "f"], "no class labels")
    refusal(ddpm.main, ["train-classifier", "--data", flat, "--steps", "1", "--batch-size", "2",
                        "--ckpt", tmp_path / "g.pt", "--out", tmp_path / "g"], "no class labels")
    ddpm.train(tiny_run(tmp_path, "c", cond=True, steps=1))
    refusal(ddpm.main, ["train", "--resume", tmp_path / "c.pt", "--no-cond", "--steps", "2"], "num_classes")
    refusal(ddpm.main, ["train", "--p-uncond", "1", "--cond"], "--p-uncond")


def test_folder_class_names_come_from_sub_folders(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name / "a.png")
    cfg = ddpm.make_config("tiny", image_size=8, ch_mult=(1,), attn_resolutions=(), data=str(tmp_path))
    dataset = data.load_dataset(cfg, labelled=True)
    assert data.class_names(dataset, cfg.data) == ("cat", "dog") and [dataset[k][1] for k in range(2)] == [0, 1]


@pytest.mark.heavy
def test_train_classifier_resumes_exactly(tmp_path):
    def run(name, steps, resume=None):
        argv = ["train-classifier", "--data", "shapes", "--model", "tiny", "--image-size", "16",
                "--batch-size", "64", "--steps", steps, "--warmup", "1", "--lr", "2e-3",
                "--ckpt", tmp_path / f"{name}.pt", "--out", tmp_path / name, "--num-workers", "0",
                "--log-every", "1"]
        ddpm.main([str(a) for a in argv] + (["--resume"] if resume else []))

    run("straight", 6)
    run("split", 3)
    run("split", 6, resume=True)
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "split.pt", weights_only=True)
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    print(f"classifier: resumed vs straight max weight difference {diff:.1e}; cross entropy "
          f"{rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} (ln 10 = {np.log(10):.3f})")
    assert diff == 0 and a["config"]["kind"] == "classifier"
    assert rows[0]["loss"] == pytest.approx(np.log(K), abs=0.3)
    clf, cfg = ddpm.load_checkpoint(str(tmp_path / "straight.pt"), ema=False, kind="classifier")
    assert cfg.class_names == data.SHAPE_CLASSES
    refusal(ddpm.main, ["sample", "--ckpt", tmp_path / "straight.pt"], "noisy classifier", "--classifier")
    refusal(ddpm.main, ["train", "--resume", tmp_path / "straight.pt"], "train-classifier")


# -- both samplers, PyTorch and ONNX Runtime -------------------------------------------------------------

@pytest.fixture(scope="module")
def conditional_models(tmp_path_factory):
    """Random conditional U-Nets (v-prediction), one per variance kind, saved and exported."""
    models = {}
    for var_type in ("fixed_large", "learned_range"):
        d = tmp_path_factory.mktemp(var_type)
        cfg = conditional_cfg(var_type=var_type, prediction="v")
        model = random_conditional_unet(cfg)
        checkpoints.save_checkpoint(str(d / "ckpt.pt"), checkpoints.checkpoint_state(cfg, model))
        export.export(str(d / "ckpt.pt"), str(d / "cond.onnx"))
        models[var_type] = d, cfg, model
    return models


@pytest.fixture(scope="module")
def conditional_onnx(conditional_models):
    return conditional_models["fixed_large"]


@pytest.mark.parametrize("var_type", ["fixed_large", "learned_range"])
@pytest.mark.parametrize("sampler,steps,s", [("ddpm", None, 3.0), ("ddpm", 10, 3.0), ("ddim", 10, 3.0),
                                             ("ddpm", 10, 1.0), ("ddpm", 10, 0.0)])
def test_guided_trajectories_pytorch_vs_onnx_runtime(conditional_models, var_type, sampler, steps, s):
    d, cfg, model = conditional_models[var_type]
    diffusion = ddpm.GaussianDiffusion.from_config(cfg)
    guided = s not in (0, 1)
    denoiser, step, meta, device = sample_ort.open_sessions(str(d / "cond.onnx"), "cpu", guided=guided)
    assert meta["num_classes"] == K and meta["class_names"] == list(data.SHAPE_CLASSES)
    ts, coefs = schedules.step_table(meta["betas"], Sampler(sampler, steps), meta["var_type"])
    rng = np.random.default_rng(1)
    x_T = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    noise = rng.standard_normal((len(ts), 3, 3, 16, 16)).astype(np.float32)
    y = np.array([2, 7, 0])
    runner = sample_ort.Runner(denoiser, step, x_T.shape, device, K, s if guided else None)
    if s != 0:
        runner.set_labels(y)
    got = runner.run(x_T, ts, coefs, lambda k, shape: noise[k])

    def torch_run(labels, scale):
        return ddpm.sample_loop(model, diffusion, torch.from_numpy(x_T), Sampler(sampler, steps), noise_fn=lambda k, shape: torch.from_numpy(noise[k]), guidance=ddpm.Guidance(labels, scale=scale)).numpy()
    ref = torch_run(torch.from_numpy(y), s)
    err = np.abs(got - ref).max()
    moved = np.abs(ref - torch_run(None, 1.0)).max()  # against the unconditional model
    print(f"{cfg.var_type} {sampler} {steps or 'T'} steps, s={s}: ORT vs PyTorch max abs error {err:.1e}; "
          f"guidance moves the result by {moved:.2f} from the unconditional model")
    assert err < 1e-4
    assert (moved == 0) if s == 0 else (moved > 0.05)


def test_process_pictures_pytorch_vs_onnx_runtime(conditional_onnx):
    """The predicted x_0 of every step, which the update graph outputs (format 2), equals the one
    ddpm.sample_loop hands its callback, guided, to the 8-bit picture."""
    d, cfg, model = conditional_onnx
    steps, y = 10, np.array([2, 7, 0])
    x_T = np.random.default_rng(4).standard_normal((3, 3, 16, 16)).astype(np.float32)
    frames_ort, frames_torch = pictures.ProcessFrames(["a.gif"], steps), pictures.ProcessFrames(["b.gif"], steps)
    denoiser, step, meta, device = sample_ort.open_sessions(str(d / "cond.onnx"), "cpu", guided=True)
    assert meta["format"] == 2
    runner = sample_ort.Runner(denoiser, step, x_T.shape, device, K, 3.0)
    runner.set_labels(y)
    ts, coefs = schedules.step_table(meta["betas"], Sampler("ddim", steps), meta["var_type"])
    runner.run(x_T, ts, coefs, lambda k, shape: np.zeros(shape, np.float32), process=frames_ort)
    ddpm.sample_loop(model, ddpm.GaussianDiffusion.from_config(cfg), torch.from_numpy(x_T), Sampler("ddim", steps), callback=frames_torch, guidance=ddpm.Guidance(torch.from_numpy(y), scale=3.0))
    assert sorted(frames_ort.frames) == sorted(frames_torch.frames) == list(range(steps))
    worst = max(np.abs(frames_ort.frames[k][j].astype(int) - frames_torch.frames[k][j]).max()
                for k in range(steps) for j in (1, 2))
    print(f"process frames, ORT vs PyTorch: max difference {worst} levels of 255")
    assert worst <= 1 and all(frames_ort.frames[k][0] == frames_torch.frames[k][0] for k in range(steps))


def test_export_contract_of_a_conditional_model(conditional_onnx):
    d, cfg, _ = conditional_onnx
    import onnxruntime as ort
    session = ort.InferenceSession(str(d / "cond.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.type for i in session.get_inputs()}
    assert inputs == {"x_t": "tensor(float)", "t": "tensor(int64)", "y": "tensor(int64)"}
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["ddpm.num_classes"] == str(K) and json.loads(meta["ddpm.class_names"]) == list(data.SHAPE_CLASSES)
    assert "ddpm.guided_step_graph" in meta


@pytest.mark.parametrize("script", ["ddpm.py", "sample_ort.py"])
def test_class_all_draws_a_row_per_class(conditional_onnx, tmp_path, script):
    d, cfg, _ = conditional_onnx
    model = ["--ckpt", d / "ckpt.pt"] if script == "ddpm.py" else ["--model", d / "cond.onnx"]
    r = run_main(script, *(["sample"] if script == "ddpm.py" else []), *model, "--n", "15", "--class", "all",
                 "--steps", "5", "--out", tmp_path / "g.png", "--outdir", tmp_path / "each")
    assert r.returncode == 0, r.stderr[-2000:]
    with Image.open(tmp_path / "g.png") as grid:
        assert grid.size == (2 + 2 * 18, 2 + K * 18)  # ceil(15 / 10) = 2 per row, a row per class
    assert len(os.listdir(tmp_path / "each")) == 2 * K
    assert "classes circle, square" in r.stdout


def test_class_names_and_indices_agree_in_both_scripts():
    names = list(data.SHAPE_CLASSES)
    for spec in ("all", "3", "ring,0,star", "vbar"):
        ours = sampling.parse_classes(spec, names)
        assert ours == sampling.parse_classes(spec, names)
        for n in (1, 7, 20):
            a, b = sampling.class_labels(ours, n), sampling.class_labels(ours, n)
            assert np.array_equal(a[0], b[0]) and a[1] == b[1] and len(a[0]) >= n
    assert sampling.parse_classes("ring,0,star", names) == [5, 0, 6]


def test_guidance_mistakes_are_sentences(conditional_onnx, tmp_path):
    d, cfg, _ = conditional_onnx
    plain = tmp_path / "plain.pt"
    ucfg = ddpm.make_config("tiny", image_size=16, T=50, schedule="cosine")
    checkpoints.save_checkpoint(str(plain), checkpoints.checkpoint_state(ucfg, ddpm.UNet(ucfg)))
    export.export(str(plain), str(tmp_path / "plain.onnx"))
    ckpt = d / "ckpt.pt"
    refusal(ddpm.main, ["sample", "--ckpt", plain, "--class", "1"], "unconditional", "--classifier")
    refusal(ddpm.main, ["sample", "--ckpt", ckpt, "--class", "blob"], "--class blob", "circle")
    refusal(ddpm.main, ["sample", "--ckpt", ckpt, "--class", "10"], "--class 10", "0..9")
    refusal(ddpm.main, ["sample", "--ckpt", ckpt, "--class", "1", "--guidance", "-1"], "--guidance")
    refusal(ddpm.main, ["sample", "--ckpt", ckpt, "--classifier", plain, "--class", "1"], "not a noisy classifier")
    refusal(sample_ort.main, ["--model", tmp_path / "plain.onnx", "--class", "1"], "unconditional")
    refusal(sample_ort.main, ["--model", d / "cond.onnx", "--class", "blob"], "--class blob")


def test_a_classifier_of_other_classes_is_refused(tmp_path, conditional_onnx):
    d, cfg, _ = conditional_onnx
    other = dataclass_replace(cfg, kind="classifier", num_classes=3, class_names=("a", "b", "c"))
    checkpoints.save_checkpoint(str(tmp_path / "clf.pt"), checkpoints.checkpoint_state(other, ddpm.build_model(other)))
    refusal(ddpm.main, ["sample", "--ckpt", d / "ckpt.pt", "--classifier", tmp_path / "clf.pt", "--class", "1"],
            "knows the classes a, b, c")
    refusal(ddpm.main, ["sample", "--ckpt", d / "ckpt.pt", "--classifier", tmp_path / "clf.pt"], "--class")
