"""Our implementation against an independent one, diffusers: the google/ddpm-cifar10-32 layout
converted weight for weight both ways (convert.py), and the DDPM / DDIM schedulers step for step.
No network: the reference model is built here and saved with save_pretrained. Every test here
carries the `diffusers` marker; diffusers is a dev requirement, so its absence is a failure."""

import dataclasses

import diffusers
import numpy as np
import onnxruntime as ort
import pytest
import torch

import checkpoints
import convert
import ddpm
import export
import schedules
from conftest import assert_clean_error, run_script
from schedules import Sampler

pytestmark = pytest.mark.diffusers

# google/ddpm-cifar10-32 as UNet2DModel arguments, from our cifar10 preset (tests/test_convert.py
# checks these against the hub's config.json)
GOOGLE_CIFAR10 = convert.unet2d_config(ddpm.make_config("cifar10"))


def perturbed_unet(**overrides):
    """A UNet2DModel whose every parameter is moved off its initial value, so that no layer that
    starts at zero or one (norms, biases) can hide a wrong mapping."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**{**GOOGLE_CIFAR10, **overrides}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet


@pytest.fixture(scope="module")
def google_like(tmp_path_factory):
    d = tmp_path_factory.mktemp("google")
    unet = perturbed_unet()
    unet.save_pretrained(d)
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large",
                            clip_sample=True).save_pretrained(d)
    cfg = convert.from_diffusers(str(d), str(d / "ckpt.pt"))
    model, _ = ddpm.load_checkpoint(str(d / "ckpt.pt"))
    return d, unet, model, cfg


def test_converted_config_is_the_cifar10_preset(google_like):
    _, unet, model, cfg = google_like
    preset = ddpm.make_config("cifar10")
    for name in ddpm.MODEL_FIELDS:
        assert getattr(cfg, name) == getattr(preset, name), name
    assert (cfg.var_type, cfg.clip_x0, cfg.schedule, cfg.T) == ("fixed_large", True, "linear", 1000)
    assert ddpm.count_params(model) == sum(p.numel() for p in unet.parameters()) == 35_746_307


def test_converted_model_matches_diffusers(google_like):
    _, unet, model, _ = google_like
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    with torch.no_grad():
        theirs = unet(x, t).sample
        ours = model(x, t)
    err = (ours - theirs).abs().max().item()
    print(f"ours vs diffusers UNet2DModel, t={t.tolist()}: max abs error {err:.2e} "
          f"(output scale {theirs.abs().max().item():.2f})")
    assert err < 1e-5


@pytest.mark.heavy
def test_converted_model_through_onnx_matches_diffusers(google_like, tmp_path):
    d, unet, _, _ = google_like
    export.export(str(d / "ckpt.pt"), str(tmp_path / "g.onnx"))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 250, 999])
    got = ort.InferenceSession(str(tmp_path / "g.onnx")).run(["eps"], {"x_t": x.numpy(), "t": t.numpy()})[0]
    with torch.no_grad():
        theirs = unet(x, t).sample.numpy()
    err = np.abs(got - theirs).max()
    print(f"ONNX Runtime (converted) vs diffusers: max abs error {err:.2e}")
    assert err < 1e-4


def test_old_attention_names_and_bin_weights(google_like, tmp_path):
    """Older diffusers saved attention as query/key/value/proj_attn, in a .bin."""
    d, unet, model, _ = google_like
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in unet.state_dict().items():
        for new, legacy in renames.items():
            k = k.replace(f".{new}.", f".{legacy}.")
        old[k] = v
    assert any(".query." in k for k in old)
    torch.save(old, tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    convert.from_diffusers(str(tmp_path), str(tmp_path / "old.pt"))
    again, _ = ddpm.load_checkpoint(str(tmp_path / "old.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_layout_that_is_not_ho_et_al_is_a_clear_error(tmp_path):
    perturbed_unet(attention_head_dim=8).save_pretrained(tmp_path / "heads")
    with pytest.raises(ValueError, match="attention_head_dim=8"):
        convert.from_diffusers(str(tmp_path / "heads"), str(tmp_path / "x.pt"))
    perturbed_unet(flip_sin_to_cos=True, freq_shift=0).save_pretrained(tmp_path / "flip")
    with pytest.raises(ValueError, match="flip_sin_to_cos=True"):
        convert.from_diffusers(str(tmp_path / "flip"), str(tmp_path / "x.pt"))


def test_unknown_and_missing_keys_are_listed(google_like, tmp_path):
    d, unet, _, _ = google_like
    state = dict(unet.state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["conv_in.bias"]
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ValueError) as e:
        convert.from_diffusers(str(tmp_path), str(tmp_path / "x.pt"))
    print(e.value)
    assert "1 unknown (extra.weight)" in str(e.value) and "1 missing (conv_in.bias)" in str(e.value)


@pytest.mark.heavy
def test_convert_cli(google_like, tmp_path):
    d, _, _, _ = google_like
    r = run_script("convert.py", "--from-diffusers", d, "-o", tmp_path / "c.pt")
    assert r.returncode == 0 and "35,746,307" in r.stdout, r.stderr
    assert_clean_error(run_script("convert.py", "--from-diffusers", d, "-o", tmp_path / "c.pt"),
                       "exists", "--overwrite")
    assert_clean_error(run_script("convert.py", "--from-diffusers", tmp_path), "no config.json")


def converted_to_diffusers(cfg, ckpt, folder):
    """Our U-Net of cfg, every parameter perturbed, saved to ckpt and converted to a pipeline folder."""
    torch.manual_seed(0)
    model = ddpm.UNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    checkpoints.save_checkpoint(ckpt, checkpoints.checkpoint_state(cfg, model))
    convert.to_diffusers(str(ckpt), str(folder))
    return model


@pytest.mark.parametrize("schedule,var_type,clip", [("linear", "fixed_large", True), ("cosine", "fixed_small", False),
                                                    ("cosine", "learned_range", True)])
def test_to_diffusers_loads_in_ddpm_pipeline_and_samples(tmp_path, schedule, var_type, clip):
    """Our checkpoint -> a DDPMPipeline folder: same eps for the same input, same scheduler
    tables, and the pipeline samples; converting it back gives our weights bit for bit."""
    cfg = ddpm.make_config("tiny", image_size=16, schedule=schedule, var_type=var_type, clip_x0=clip)
    model = converted_to_diffusers(cfg, tmp_path / "ours.pt", tmp_path / "pipe")
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "pipe"))
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 417, 999])
    with torch.no_grad():
        ours = model(x, t)
        err = (pipe.unet(x, t).sample - ours).abs().max().item()
    assert ours.shape[1] == (6 if var_type == "learned_range" else 3)
    betas_err = np.abs(pipe.scheduler.betas.double().numpy() - ddpm.get_betas(schedule, 1000)).max()
    print(f"{schedule}: DDPMPipeline's UNet vs ours, max abs error {err:.2e}; betas {betas_err:.1e}")
    assert err < 1e-5 and betas_err < 1e-6  # diffusers keeps its betas in float32
    sched = pipe.scheduler.config
    assert (sched.variance_type, sched.clip_sample, sched.num_train_timesteps) == (var_type, clip, 1000)
    images = pipe(batch_size=2, num_inference_steps=5, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    back = convert.from_diffusers(str(tmp_path / "pipe"), str(tmp_path / "back.pt"))
    again, _ = ddpm.load_checkpoint(str(tmp_path / "back.pt"))
    assert (back.schedule, back.var_type, back.clip_x0) == (schedule, var_type, clip)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    if var_type == "learned_range":  # 2C outputs with a fixed-variance scheduler: refused
        path = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
        path.write_text(path.read_text().replace('"learned_range"', '"fixed_small"'))
        with pytest.raises(ValueError, match="learned_range needs twice"):
            convert.from_diffusers(str(tmp_path / "pipe"), str(tmp_path / "bad.pt"))


# -- schedulers ---------------------------------------------------------------------------------
# diffusers builds betas and alpha-bars in float32, we in float64. Run with float64 tables (same
# formulas, our precision) the two must agree to rounding (1e-10). With the stock float32 tables
# they differ by diffusers' own rounding: 1 - abar_t cancels catastrophically at small t
# (1 - 0.99964 at t=2 carries float32's 6e-8 as a 1.7e-4 relative error), which moves one step's
# output by up to ~4e-4 on values of order 1 (measured 3.1e-4); we allow 1e-3.
F64_TOL, F32_TOL = 1e-10, 1e-3


def in_float64(sched):
    """The scheduler with its tables recomputed in float64 by its own formulas."""
    sched.betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [True, False])
def test_one_ancestral_step_equals_ddpm_scheduler(variance_type, clip):
    d = ddpm.GaussianDiffusion(betas=ddpm.get_betas("linear", 1000), var_type=variance_type, clip_x0=clip)
    for precision, dtype, tol in (("float64", torch.float64, F64_TOL), ("float32", torch.float32, F32_TOL)):
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        variance_type=variance_type, clip_sample=clip)
        if dtype == torch.float64:
            sched = in_float64(sched)
        worst = 0.0
        for t in [0, 1, 2, 10, 100, 333, 500, 750, 998, 999]:
            g = torch.Generator().manual_seed(t)
            x_t = torch.randn(2, 3, 8, 8, generator=g, dtype=dtype)
            eps = torch.randn(2, 3, 8, 8, generator=g, dtype=dtype)
            noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1000 + t), dtype=dtype)
            theirs = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(1000 + t)).prev_sample
            i = torch.full((2,), t)
            ours, _ = d.p_sample(x_t, i, d.predict_x0_from_eps(x_t, i, eps), noise)
            worst = max(worst, (ours - theirs).abs().max().item())
        print(f"DDPM step ({variance_type}, clip={clip}), diffusers tables in {precision}: "
              f"max abs error over t = {worst:.2e} (tolerance {tol:.0e})")
        assert worst < tol


@pytest.mark.parametrize("steps", [None, 50])
def test_learned_range_ancestral_step_equals_ddpm_scheduler(steps):
    """Learned variances (Nichol & Dhariwal eq. 15): diffusers' DDPMScheduler with variance_type
    learned_range takes the same 2C-channel output (eps, v); full and respaced chains."""
    betas = ddpm.get_betas("cosine", 1000)
    d = ddpm.GaussianDiffusion(betas=betas, var_type="learned_range", clip_x0=True)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                    variance_type="learned_range", clip_sample=True)
    sched.betas = torch.tensor(betas)  # float64 tables, diffusers' formulas (see in_float64)
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    chain = d
    if steps:
        sched.set_timesteps(steps)
        chain = d.respace(sched.timesteps.numpy())
    kept = np.sort(sched.timesteps.numpy()) if steps else np.arange(1000)  # chain index k <-> t = kept[k]
    worst = 0.0
    for k in [1, 2, len(kept) // 3, len(kept) // 2, len(kept) - 1]:
        t = int(kept[k])
        g = torch.Generator().manual_seed(k)
        x_t = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
        eps = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
        var_v = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        theirs = sched.step(torch.cat([eps, var_v], 1), t, x_t,
                            generator=torch.Generator().manual_seed(99)).prev_sample
        i = torch.full((2,), k)
        ours, _ = chain.p_sample(x_t, i, chain.predict_x0_from_eps(x_t, i, eps), noise, var_v)
        worst = max(worst, (ours - theirs).abs().max().item())
    print(f"learned_range DDPM step, {steps or 1000} steps: max abs error against diffusers {worst:.2e}")
    assert worst < F64_TOL


def test_q_sample_equals_add_noise():
    d = ddpm.GaussianDiffusion(betas=ddpm.get_betas("linear", 1000))
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    for precision, dtype, tol in (("float64", torch.float64, F64_TOL), ("float32", torch.float32, 1e-5)):
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        if dtype == torch.float64:
            sched = in_float64(sched)
        x0, noise = torch.randn(6, 3, 8, 8, dtype=dtype), torch.randn(6, 3, 8, 8, dtype=dtype)
        err = (d.q_sample(x0, t, noise) - sched.add_noise(x0, noise, t)).abs().max().item()
        print(f"q_sample vs add_noise ({precision} tables): max abs error {err:.2e}")
        assert err < tol


class GaussianDataEps(torch.nn.Module):
    """The exact eps for data ~ N(0, s^2 I): eps = sqrt(1-abar) x_t / (abar s^2 + 1 - abar).
    Smooth and well-conditioned, so a whole chain compares the samplers and not chaos."""

    def __init__(self, s=0.5):
        super().__init__()
        betas = np.linspace(1e-4, 0.02, 1000)
        self.abar = torch.from_numpy(np.cumprod(1 - betas))
        self.s2 = s * s

    def forward(self, x_t, t):
        abar = self.abar[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * x_t / (abar * self.s2 + 1 - abar)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_50_steps_equals_ddim_scheduler(eta, clip):
    model = GaussianDataEps()
    for precision, dtype, tol in (("float64", torch.float64, 1e-9), ("float32", torch.float32, F32_TOL)):
        sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                                        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
        if dtype == torch.float64:
            sched = in_float64(sched)
        sched.set_timesteps(50)
        assert list(sched.timesteps.numpy()) == list(schedules.spaced_timesteps(1000, 50)[::-1])
        x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
        g = torch.Generator().manual_seed(5)
        x = x_T
        for t in sched.timesteps:
            x = sched.step(model(x, t.view(1).repeat(2)), t, x, eta=eta, use_clipped_model_output=True,
                           generator=g).prev_sample
        g = torch.Generator().manual_seed(5)  # the same noise stream, drawn in the same order
        d = ddpm.GaussianDiffusion(betas=ddpm.get_betas("linear", 1000), clip_x0=clip)
        noise_fn = (lambda k, shape: torch.randn(shape, generator=g, dtype=dtype)) if eta > 0 else None
        ours = ddpm.sample_loop(model, d, x_T, Sampler("ddim", 50, eta=eta), noise_fn=noise_fn)
        err = (ours - x).abs().max().item()
        print(f"DDIM 50 steps, eta={eta}, clip={clip}, diffusers tables in {precision}: "
              f"max abs error {err:.2e} (tolerance {tol:.0e})")
        assert err < tol


@pytest.mark.heavy
def test_end_to_end_20_ddim_steps_with_the_converted_unet(google_like):
    """diffusers' UNet2DModel + DDIMScheduler against our converted U-Net + our DDIM loop."""
    d, unet, model, cfg = google_like
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                    set_alpha_to_one=True, steps_offset=0)
    sched.set_timesteps(20)
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = x_T
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    diffusion = ddpm.GaussianDiffusion(betas=ddpm.get_betas("linear", 1000), clip_x0=False)
    ours = ddpm.sample_loop(model, diffusion, x_T, Sampler("ddim", 20))
    err = (ours - x).abs().max().item()
    print(f"20 DDIM steps, diffusers pipeline pieces vs ours: max abs error {err:.2e} "
          f"(images span {x.min().item():.2f}..{x.max().item():.2f})")
    assert err < 1e-3


def test_scheduler_config_sets_variance_clip_and_refuses_other_betas(google_like, tmp_path):
    d, _, _, _ = google_like
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    diffusers.DDPMScheduler(variance_type="fixed_small", clip_sample=False).save_pretrained(tmp_path)
    cfg = convert.from_diffusers(str(tmp_path), str(tmp_path / "a.pt"))
    assert (cfg.var_type, cfg.clip_x0, cfg.schedule) == ("fixed_small", False, "linear")
    cosine = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    cosine.save_pretrained(tmp_path)
    assert convert.from_diffusers(str(tmp_path), str(tmp_path / "b.pt")).schedule == "cosine"
    err = np.abs(cosine.betas.double().numpy() - ddpm.get_betas("cosine", 1000)).max()
    print(f"diffusers squaredcos_cap_v2 betas (float32) vs our cosine: max abs error {err:.1e}")
    assert err < 1e-6
    # diffusers takes 1e-4..0.02 as given for any T; ours scales them by 1000/T: not the same betas
    diffusers.DDPMScheduler(num_train_timesteps=500).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="betas we do not build"):
        convert.from_diffusers(str(tmp_path), str(tmp_path / "c.pt"))


def test_class_conditional_unet_converts_both_ways_and_matches_diffusers(tmp_path):
    """diffusers' UNet2DModel with num_class_embeds (its class embedding added to the time
    embedding) is our conditional U-Net plus 'no label' as the last class: converted from and to
    diffusers, the outputs agree for every label, and the class names travel in class_names.json."""
    cfg = ddpm.make_config("tiny", num_classes=4, class_names=("a", "b", "c", "d"), cond=True)
    theirs = convert.unet2d_config(cfg)
    assert theirs["num_class_embeds"] == 5
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**theirs).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "theirs")
    cfg_in = convert.from_diffusers(str(tmp_path / "theirs"), str(tmp_path / "ours.pt"))
    assert cfg_in.num_classes == 4 and cfg_in.class_names == ("0", "1", "2", "3")
    model, _ = ddpm.load_checkpoint(str(tmp_path / "ours.pt"))
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([0, 10, 500, 900, 999]), torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        err = (model(x, t, y) - unet(x, t, class_labels=y).sample).abs().max().item()
        spread = (unet(x, t, class_labels=y).sample - unet(x, t, class_labels=torch.zeros_like(y)).sample).abs().max().item()
    print(f"conditional: ours vs diffusers max abs error {err:.1e} (labels move the output by {spread:.2f})")
    assert err < 1e-5 and spread > 1e-3
    ckpt = tmp_path / "named.pt"
    checkpoints.save_checkpoint(str(ckpt), checkpoints.checkpoint_state(cfg, model))
    convert.to_diffusers(str(ckpt), str(tmp_path / "back"))
    again = diffusers.UNet2DModel.from_pretrained(tmp_path / "back" / "unet").eval()
    with torch.no_grad():
        assert (again(x, t, class_labels=y).sample - unet(x, t, class_labels=y).sample).abs().max() < 1e-6
    assert convert.from_diffusers(str(tmp_path / "back"), str(tmp_path / "again.pt")).class_names == cfg.class_names


def dpm_scheduler(spacing, clip, steps):
    """diffusers' DPMSolverMultistepScheduler at its defaults (dpmsolver++, order 2, midpoint,
    lower_order_final, final sigma 0), with clipping as its thresholding at a maximum of 1, and
    float64 tables (in_float64, and the sigmas it derives from them in set_timesteps)."""
    sched = in_float64(diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", timestep_spacing=spacing, thresholding=clip,
        sample_max_value=1.0))
    sched.set_timesteps(steps)
    sigma = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5
    sched.sigmas = torch.cat([sigma[sched.timesteps], torch.zeros(1, dtype=torch.float64)])
    return sched


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("clip", [True, False])
def test_dpm_solver_steps_equal_dpm_solver_multistep_scheduler(spacing, clip):
    """Step by step in float64 over a whole chain of 20 steps on diffusers' own timesteps (its
    leading and linspace differ from ours; our chain is respaced to them): its first- and
    second-order updates against ddpm.py's dpm_solver_step. diffusers' step() computes in float32
    whatever the input, so the float64 comparison drives its update functions in step()'s order
    (first order at the first and the last step); the next test runs step() itself."""
    model = GaussianDataEps()
    sched = dpm_scheduler(spacing, clip, 20)
    ts = sched.timesteps.numpy()
    chain = ddpm.GaussianDiffusion(betas=ddpm.get_betas("linear", 1000), clip_x0=clip).respace(ts)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    ours, prev_x0, worst = x.clone(), torch.zeros_like(x), 0.0
    for k, t in enumerate(sched.timesteps):
        sched._step_index = k
        out = sched.convert_model_output(model(x, t.view(1).repeat(2)), sample=x)
        sched.model_outputs = [sched.model_outputs[-1], out]
        if k in (0, len(ts) - 1):
            x = sched.dpm_solver_first_order_update(out, sample=x)
        else:
            x = sched.multistep_dpm_solver_second_order_update(sched.model_outputs, sample=x)
        i = torch.full((2,), len(ts) - 1 - k)
        eps = model(ours, torch.as_tensor(chain.timesteps[i]))
        ours, prev_x0 = chain.dpm_solver_step(ours, i, chain.predict_x0_from_eps(ours, i, eps), prev_x0)
        worst = max(worst, (ours - x).abs().max().item())
    print(f"DPM-Solver++ 20 steps, {spacing} {ts[:2].tolist()}..{ts[-2:].tolist()}, clip={clip}: max abs error over "
          f"the chain {worst:.2e} (tolerance {F64_TOL:.0e})")
    assert worst < F64_TOL


@pytest.mark.parametrize("clip", [True, False])
def test_dpm_solver_20_steps_equals_scheduler_step(clip):
    """sched.step() (float32 inside) over 20 trailing steps, whose t's equal ours, against
    ddpm.sample_loop('dpm++') in float64: the loop, its order choices and the spacing."""
    model = GaussianDataEps()
    sched = dpm_scheduler("trailing", clip, 20)
    assert list(sched.timesteps.numpy()) == list(schedules.spaced_timesteps(1000, 20, "trailing")[::-1])
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    x = x_T
    for t in sched.timesteps:
        x = sched.step(model(x, t.view(1).repeat(2)), t, x).prev_sample
    d = ddpm.GaussianDiffusion(betas=ddpm.get_betas("linear", 1000), clip_x0=clip)
    ours = ddpm.sample_loop(model, d, x_T, Sampler("dpm++", 20, spacing="trailing"))
    err = (ours - x).abs().max().item()
    print(f"DPM-Solver++ 20 trailing steps, clip={clip}: sample_loop vs scheduler.step, max abs error "
          f"{err:.2e} on values up to {x.abs().max().item():.2f} (tolerance {F32_TOL:.0e})")
    assert err < F32_TOL


@pytest.mark.parametrize("cond", [False, True])
def test_a_student_becomes_a_ddim_pipeline_that_draws_its_images(tmp_path, cond):
    """A distilled student (here a perturbed v-prediction net marked as a 4-step student) to
    diffusers: a DDIMScheduler at its trailing steps, eta 0. Unconditional: DDIMPipeline called
    with its steps draws, from the same x_T (the pipeline's generator), the images ddpm.py draws.
    Conditional (guidance built in): the loop of docs/diffusers.md with class_labels does. Back to
    ours, the student keeps its steps and its guidance."""
    classes = dict(num_classes=4, class_names=("a", "b", "c", "d"), cond=True) if cond else {}
    cfg = ddpm.make_config("tiny", image_size=16, schedule="cosine", prediction="v", var_type="fixed_small", **classes)
    cfg = dataclasses.replace(cfg, distilled_steps=4, distilled_guidance=3.0 if cond else 1.0)
    model = converted_to_diffusers(cfg, tmp_path / "student.pt", tmp_path / "pipe")
    x_T = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4) if cond else None
    with torch.no_grad():
        ours = ddpm.sample_loop(model, ddpm.GaussianDiffusion.from_config(cfg), x_T,
                                Sampler("ddim", 4, spacing="trailing"), guidance=ddpm.Guidance(y))
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    if not cond:
        pipe = diffusers.DDIMPipeline.from_pretrained(str(tmp_path / "pipe"))
        assert type(pipe.scheduler).__name__ == "DDIMScheduler"
        theirs = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=4, eta=0.0,
                      use_clipped_model_output=True, output_type="np").images
    else:  # docs/diffusers.md: the labelled branch alone, its guidance is in the weights
        scheduler = diffusers.DDIMScheduler.from_pretrained(str(tmp_path / "pipe"), subfolder="scheduler")
        unet = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "pipe"), subfolder="unet").eval()
        scheduler.set_timesteps(4)
        x = x_T
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t, class_labels=y).sample, t, x, eta=0.0,
                                   use_clipped_model_output=True).prev_sample
        theirs = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    err = np.abs(theirs - ours).max()
    print(f"4-step student{' (conditional)' if cond else ''}: diffusers DDIM vs ddpm.py, max abs error {err:.1e}")
    assert err < 1e-4
    back = convert.from_diffusers(str(tmp_path / "pipe"), str(tmp_path / "back.pt"))
    assert (back.distilled_steps, back.distilled_guidance, back.prediction) == (4, cfg.distilled_guidance, "v")
