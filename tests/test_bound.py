"""The variational bound (issue 11): the Gaussian KL, the discretized decoder, every term of the
bound against closed forms, the sum of the terms against the direct definition of L_VLB by Monte
Carlo over whole forward trajectories, learned variances (L_hybrid, sampling through PyTorch and
ONNX Runtime) and `evaluate.py nll`. Expected values are written out here in numpy from the
papers' formulas, never taken from ddpm.py."""
import json
import math

import numpy as np
import pytest
import torch

import checkpoints
import ddpm
import evaluate
import export
import sample_ort
import schedules
from conftest import refusal, run_main
from schedules import Sampler

LN2 = math.log(2.0)


def phi(x):
    """The exact standard normal CDF (ddpm.py uses the tanh approximation of the references)."""
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def bin_log_prob(x0, mean, var):
    """log of the mass of N(mean, var) on x0's 8-bit bin, the edge bins open (Ho et al. eq. 13)."""
    s = np.sqrt(var)
    upper = np.where(x0 > 0.999, 1.0, phi((x0 - mean + 1 / 255) / s))
    lower = np.where(x0 < -0.999, 0.0, phi((x0 - mean - 1 / 255) / s))
    with np.errstate(divide="ignore"):  # bins far in the tails have no mass in float64
        return np.log(upper - lower)


def tables(betas):
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    return alphas, abar, abar_prev, beta_tilde


def test_normal_kl_against_the_closed_form_and_monte_carlo():
    m1, v1, m2, v2 = 0.3, 0.5, -0.2, 2.0
    closed = 0.5 * (math.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)
    ours = ddpm.normal_kl(*(torch.tensor(x, dtype=torch.float64) for x in (m1, math.log(v1), m2, math.log(v2)))).item()
    z = np.random.default_rng(0).normal(m1, math.sqrt(v1), 2_000_000)
    log_ratio = -0.5 * np.log(v1) - (z - m1) ** 2 / (2 * v1) + 0.5 * np.log(v2) + (z - m2) ** 2 / (2 * v2)
    print(f"KL: ours {ours:.8f}, closed form {closed:.8f}, Monte Carlo {log_ratio.mean():.5f}")
    assert abs(ours - closed) < 1e-12 and abs(log_ratio.mean() - closed) < 3e-3


@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.5, 0.1), (-0.9, 0.5), (0.99, 2.0)])
def test_decoder_bins_sum_to_one_and_match_the_exact_cdf(mean, std):
    x0 = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    log_p = ddpm.discretized_gaussian_log_likelihood(x0, torch.full_like(x0, mean),
                                                      torch.full_like(x0, math.log(std)))
    total = torch.logsumexp(log_p, 0).exp().item()
    exact = bin_log_prob(x0.numpy(), mean, std ** 2)
    p_err = np.abs(log_p.exp().numpy() - np.exp(exact)).max()
    print(f"N({mean}, {std}^2): mass over the 256 bins {total:.9f}; max |p - p_exact| {p_err:.1e} "
          "(the tanh approximation of the CDF)")
    assert abs(total - 1) < 1e-9 and p_err < 2e-3


class PointOracle(torch.nn.Module):
    """eps_theta(x_t, t) = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t): the exact eps for data that
    is the single image c (a perfect posterior model), optionally with a constant variance v."""

    def __init__(self, betas, c, var_v=None):
        super().__init__()
        self.abar = torch.tensor(np.cumprod(1 - betas))
        self.c, self.var_v = c, var_v

    def forward(self, x_t, t):
        abar = self.abar[t].view(-1, 1, 1, 1).to(x_t.dtype)
        eps = (x_t - abar.sqrt() * self.c) / (1 - abar).sqrt()
        return eps if self.var_v is None else torch.cat([eps, torch.full_like(eps, self.var_v)], 1)


@pytest.mark.parametrize("var_type", schedules.VAR_TYPES)
def test_each_term_for_a_perfect_posterior_model_on_one_point(var_type):
    """On the one-point data set the model's mean is the true posterior mean, so each L_{t-1} is
    only the variance mismatch 1/2 (log s2 - log bt + bt / s2 - 1), zero for beta-tilde; L_0 is
    the bin mass of N(x_0, sigma_1^2) at x_0; L_T the KL of N(sqrt(abar_T) x_0, 1 - abar_T)."""
    T = 50
    betas = ddpm.get_betas("cosine", T)
    _, abar, _, beta_tilde = tables(betas)
    x0 = (torch.randint(0, 256, (1, 3, 4, 4), generator=torch.Generator().manual_seed(0)).double() / 127.5 - 1)
    w = 0.7  # learned_range: v = 2 w - 1
    model = PointOracle(betas, x0, 2 * w - 1 if var_type == "learned_range" else None)
    d = ddpm.GaussianDiffusion(betas=betas, var_type=var_type, clip_x0=True)
    total, prior, terms = d.bits_per_dim(model, x0, torch.Generator().manual_seed(1))
    bt = np.append(beta_tilde[1], beta_tilde[1:])  # beta-tilde_0 = 0: the references take beta-tilde_1
    s2 = {"fixed_small": bt, "fixed_large": np.append(beta_tilde[1], betas[1:]),
          "learned_range": np.exp(w * np.log(betas) + (1 - w) * np.log(bt))}[var_type]
    kl = 0.5 * (np.log(s2) - np.log(bt) + bt / s2 - 1) / LN2
    decoder = -bin_log_prob(x0.numpy(), x0.numpy(), s2[0]).mean() / LN2
    m, v = np.sqrt(abar[-1]) * x0.numpy(), 1 - abar[-1]
    prior_expected = (0.5 * (-np.log(v) + v + m ** 2 - 1)).mean() / LN2
    err_kl = np.abs(terms[0, 1:].numpy() - kl[1:]).max()
    err_dec = abs(terms[0, 0].item() - decoder)
    print(f"{var_type}: max |L_t-1 - closed form| {err_kl:.1e} bits/dim (terms up to {kl[1:].max():.2e}); "
          f"L_0 {terms[0, 0].item():.5f} vs {decoder:.5f}; L_T {prior.item():.3e} vs {prior_expected:.3e}; "
          f"total {total.item():.4f}")
    assert err_kl < 1e-9 and err_dec < 2e-3 and abs(prior.item() - prior_expected) < 1e-12


@pytest.mark.parametrize("var_type", schedules.VAR_TYPES)
def test_the_terms_sum_to_the_direct_definition_of_the_bound(var_type):
    """L_VLB = E_q[-log p(x_T) - sum_t log p_theta(x_{t-1} | x_t) + sum_t log q(x_t | x_{t-1})]
    (Ho et al. eq. 3), estimated by Monte Carlo over whole forward trajectories with p_theta's
    mean from eq. 11 and the decoder's bins, against the mean of bits_per_dim over as many
    draws of its per-term estimate: two unbiased estimates of the same number."""
    T, N = 6, 20_000
    betas = ddpm.get_betas("cosine", T)
    alphas, abar, _, beta_tilde = tables(betas)
    bt = np.append(beta_tilde[1], beta_tilde[1:])
    w = 0.3
    s2 = {"fixed_small": bt, "fixed_large": np.append(beta_tilde[1], betas[1:]),
          "learned_range": np.exp(w * np.log(betas) + (1 - w) * np.log(bt))}[var_type]
    x0_img = torch.tensor([-1.0, -0.2, 0.4, 1.0], dtype=torch.float64).view(1, 1, 2, 2)
    c = torch.tensor([-0.6, 0.1, 0.1, 0.8], dtype=torch.float64).view(1, 1, 2, 2)
    model = PointOracle(betas, c, 2 * w - 1 if var_type == "learned_range" else None)  # wrong data: no term is 0
    d = ddpm.GaussianDiffusion(betas=betas, var_type=var_type, clip_x0=False)
    total, _, _ = d.bits_per_dim(model, x0_img.repeat(N, 1, 1, 1), torch.Generator().manual_seed(0))

    rng = np.random.default_rng(1)
    x0 = np.repeat(x0_img.numpy().reshape(1, 4), N, 0)
    cn = c.numpy().reshape(1, 4)
    xs = [x0]
    for t in range(T):  # the forward chain q(x_t | x_{t-1}), t = 1..T
        xs.append(np.sqrt(alphas[t]) * xs[-1] + np.sqrt(betas[t]) * rng.standard_normal(x0.shape))

    def log_normal(x, m, v):
        return -0.5 * (np.log(2 * np.pi * v) + (x - m) ** 2 / v)

    log_q = sum(log_normal(xs[t + 1], np.sqrt(alphas[t]) * xs[t], betas[t]) for t in range(T))
    log_p = log_normal(xs[T], 0.0, 1.0)
    for t in range(T):  # p_theta(x_{t-1} | x_t) with eq. 11's mean, t = 1..T (index t here = t - 1)
        eps = (xs[t + 1] - np.sqrt(abar[t]) * cn) / np.sqrt(1 - abar[t])
        mu = (xs[t + 1] - betas[t] / np.sqrt(1 - abar[t]) * eps) / np.sqrt(alphas[t])
        log_p = log_p + (bin_log_prob(x0, mu, s2[0]) if t == 0 else log_normal(xs[t], mu, s2[t]))
    direct = (log_q - log_p).sum(axis=1) / (4 * LN2)
    se = math.hypot(direct.std(), total.std().item()) / math.sqrt(N)
    print(f"{var_type}: sum of the terms {total.mean().item():.4f}, direct definition "
          f"{direct.mean():.4f} bits/dim (standard error of the difference {se:.4f})")
    assert abs(total.mean().item() - direct.mean()) < 4 * se + 2e-3  # 2e-3: the CDF's tanh approximation


def test_hybrid_loss_trains_the_variance_only_through_l_vlb():
    """L_hybrid = L_simple + T/1000 L_t: the L_vlb part must not move the mean (stop-gradient)."""
    cfg = ddpm.make_config("tiny", image_size=8, ch_mult=(1,), attn_resolutions=(), var_type="learned_range",
                           T=100, schedule="cosine")
    d = ddpm.GaussianDiffusion.from_config(cfg)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    i = torch.tensor([0, 10, 50, 99])
    x_t = d.q_sample(x0, i, torch.randn_like(x0))
    out = torch.randn(4, 3, 8, 8, requires_grad=True)
    var_v = torch.zeros(4, 3, 8, 8, requires_grad=True)
    d.hybrid_vlb_term(x0, i, x_t, out, var_v).backward()
    print(f"|grad| mean branch {out.grad.abs().max().item() if out.grad is not None else 0:.1e}, "
          f"variance branch {var_v.grad.abs().max().item():.1e}")
    assert (out.grad is None or out.grad.abs().max() == 0) and var_v.grad.abs().max() > 0
    model = ddpm.UNet(cfg)
    assert model(x0, i).shape == (4, 6, 8, 8)
    loss = d.training_loss(model, x0, i, torch.randn_like(x0))
    loss.backward()
    assert torch.isfinite(loss) and model.conv_out.weight.grad[3:].abs().sum() > 0


@pytest.fixture(scope="module")
def learned_model(tmp_path_factory):
    """A tiny learned-variance model, its variance channels scaled up so that they matter."""
    d = tmp_path_factory.mktemp("learned")
    cfg = ddpm.make_config("tiny", image_size=16, var_type="learned_range", T=50, schedule="cosine",
                           prediction="v", data="shapes")
    torch.manual_seed(0)
    model = ddpm.UNet(cfg).eval()
    with torch.no_grad():
        model.conv_out.weight.mul_(3)
    checkpoints.save_checkpoint(str(d / "ckpt.pt"), checkpoints.checkpoint_state(cfg, model))
    export.export(str(d / "ckpt.pt"), str(d / "lr.onnx"))
    return d, cfg, model


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 10), ("ddim", 10)])
def test_learned_variance_trajectories_pytorch_vs_onnx_runtime(learned_model, sampler, steps):
    d, cfg, model = learned_model
    diffusion = ddpm.GaussianDiffusion.from_config(cfg)
    denoiser, step, meta, device = sample_ort.open_sessions(str(d / "lr.onnx"), "cpu")
    assert meta["var_type"] == "learned_range"
    ts, coefs = schedules.step_table(meta["betas"], Sampler(sampler, steps), meta["var_type"])
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    noise = rng.standard_normal((len(ts), 2, 3, 16, 16)).astype(np.float32)
    got = sample_ort.Runner(denoiser, step, x_T.shape, device).run(x_T, ts, coefs, lambda k, shape: noise[k])
    ref = ddpm.sample_loop(model, diffusion, torch.from_numpy(x_T), Sampler(sampler, steps), noise_fn=lambda k, shape: torch.from_numpy(noise[k]))
    fixed = ddpm.GaussianDiffusion(betas=diffusion.betas, var_type="fixed_small", prediction=cfg.prediction)
    no_var = ddpm.sample_loop(lambda x, t: model(x, t)[:, :3], fixed, torch.from_numpy(x_T), Sampler(sampler, steps), noise_fn=lambda k, shape: torch.from_numpy(noise[k]))
    err, moved = np.abs(got - ref.numpy()).max(), (ref - no_var).abs().max().item()
    print(f"learned_range {sampler} {steps or 'T'} steps: ORT vs PyTorch max abs error {err:.1e} "
          f"(the learned variance moves the result by {moved:.2f} from beta-tilde)")
    assert err < 1e-4
    if sampler == "ddpm":
        assert moved > 1e-2


@pytest.mark.heavy
def test_sample_ort_and_nll_cli_on_a_learned_model(learned_model, tmp_path):
    d, _, _ = learned_model
    r = run_main("sample_ort.py", "--model", d / "lr.onnx", "--n", 2, "--steps", 5, "--provider", "cpu",
                 "--out", tmp_path / "s.png")
    assert r.returncode == 0 and (tmp_path / "s.png").exists(), r.stderr
    r = run_main("evaluate.py", "nll", "--ckpt", d / "ckpt.pt", "--n", 3, "--batch", 2,
                 "--json", tmp_path / "nll.json")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "nll.json").read_text())
    print(r.stdout.strip())
    assert {"bits_per_dim", "prior", "decoder", "terms", "n_images"} <= set(result) and result["n_images"] == 3
    parts = result["prior"] + result["decoder"] + result["terms"]
    assert abs(parts - result["bits_per_dim"]) < 1e-9 and len(result["terms_per_t"]) == 50
    assert result["bits_per_dim"] > 0 and "bits/dim" in r.stdout


def test_nll_json_over_an_old_file_on_a_full_disk_is_a_sentence_and_keeps_it(learned_model, small_disk):
    d, _, _ = learned_model
    disk = small_disk(1 << 20)
    (disk.path / "nll.json").write_text('{"old": 1}')
    disk.fill()
    message = refusal(evaluate.main, ["nll", "--ckpt", d / "ckpt.pt", "--n", 2, "--json", disk.path / "nll.json"],
                      "cannot write", "nll.json", "No space left")
    print(message)
    assert (disk.path / "nll.json").read_text() == '{"old": 1}'


def test_nll_refuses_bad_input(learned_model, tmp_path):
    d, _, _ = learned_model
    refusal(evaluate.main, ["nll", "--ckpt", d / "ckpt.pt", "--n", 0], "--n 0")
    refusal(evaluate.main, ["nll", "--ckpt", d / "ckpt.pt", "--batch", 0], "--batch 0")
    refusal(evaluate.main, ["nll", "--ckpt", d / "ckpt.pt", "--split", "val"], "invalid choice")
    refusal(evaluate.main, ["nll", "--ckpt", d / "ckpt.pt", "--data", tmp_path / "none"], "none")
    refusal(evaluate.main, ["nll", "--ckpt", tmp_path / "missing.pt"], "missing.pt")
    refusal(evaluate.main, ["nll", "--ckpt", d / "ckpt.pt", "--json", d / "ckpt.pt"], "--json")
