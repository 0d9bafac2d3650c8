"""The step tables of every sampler (schedules.chain_coefficients, which the ONNX update graphs read) against
the paper's formulas written out here in numpy from the betas alone: the forward process (eq. 4),
the posterior (eqs. 6-7), DDIM's sigma (Song et al. eq. 16), DPM-Solver++(2M)'s coefficients
(Lu et al. 2022b) and the learned variance's interpolation bounds (Nichol & Dhariwal eq. 15).
ddpm.GaussianDiffusion's own tables are checked against the same numbers."""
import numpy as np
import pytest

import ddpm
import schedules

T = 1000


def kept(sampler, steps, spacing):
    """The t's of the chain, written out: leading 0, T/n, ..; trailing .., T-1; linspace rounded."""
    if sampler == "ddpm" and steps == T:
        return np.arange(T)
    if spacing == "leading":
        return np.arange(steps) * (T // steps)
    if spacing == "trailing":
        return np.array(sorted(round(T - k * T / steps) - 1 for k in range(steps)))
    return np.unique(np.round(np.linspace(0, T - 1, steps)).astype(int))


def paper_columns(betas, ts, sampler, eta, var_type):
    """The columns in sampling order (last t first), from the formulas."""
    abar = np.cumprod(1 - betas)[ts]  # eq. 4's alpha-bar at the kept t's
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1 - abar / abar_prev  # the respaced chain's betas
    a, b = 1 / np.sqrt(abar), np.sqrt(1 / abar - 1)  # x_0 = a x_t - b eps (eq. 15)
    tilde = beta * (1 - abar_prev) / (1 - abar)  # beta-tilde (eq. 7)
    last = np.arange(len(ts)) == 0  # the step to x_0
    if sampler == "dpm++":
        lam = 0.5 * np.log(abar / (1 - abar))
        ratio = np.sqrt((1 - abar_prev) / (1 - abar))  # sigma_{i-1} / sigma_i, 0 at the last step
        w = np.sqrt(abar_prev) - ratio * np.sqrt(abar)
        r = np.zeros(len(ts))
        for i in range(1, len(ts) - 1):  # h_i / (2 h_{i+1}); 0 at the first and the last step
            r[i] = (lam[i - 1] - lam[i]) / (2 * (lam[i] - lam[i + 1]))
        columns = [a, b, w * (1 + r), ratio, -w * r]
    elif sampler == "ddpm":
        c1 = beta * np.sqrt(abar_prev) / (1 - abar)
        c2 = (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)
        sigma = {"fixed_large": np.sqrt(beta), "fixed_small": np.sqrt(tilde), "learned_range": 0 * beta}[var_type]
        columns = [a, b, c1, c2, 0 * a, np.where(last, 0.0, sigma)]
    else:
        sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        columns = [a, b, np.sqrt(abar_prev), 0 * a, np.sqrt(1 - abar_prev - sigma ** 2), sigma]
    if var_type == "learned_range" and sampler != "dpm++":
        log_lo = np.log(np.where(last, tilde[1], tilde))  # beta-tilde_1 stands in for beta-tilde_0 = 0
        g = np.where(last, 0.0, 1.0) if sampler == "ddpm" else 0 * a
        columns += [g, log_lo, np.log(beta)]
    return [c[::-1] for c in columns]


CASES = [(sampler, steps, spacing, eta, var_type)
         for sampler, steps, spacing, eta in [("ddpm", 1000, "leading", 0.0), ("ddpm", 100, "leading", 0.0),
                                              ("ddpm", 50, "trailing", 0.0), ("ddim", 50, "leading", 0.0),
                                              ("ddim", 20, "trailing", 1.0), ("ddim", 25, "linspace", 0.3),
                                              ("ddim", 1000, "leading", 0.5)]
         for var_type in ("fixed_large", "fixed_small", "learned_range")] + \
        [("dpm++", steps, spacing, 0.0, "fixed_large") for steps, spacing in
         [(1000, "leading"), (20, "trailing"), (20, "leading"), (10, "linspace"), (2, "trailing"), (1, "trailing")]]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,steps,spacing,eta,var_type", CASES)
def test_every_step_table_column_follows_the_formulas(schedule, sampler, steps, spacing, eta, var_type):
    betas = schedules.get_betas(schedule, T)
    full = schedules.Schedule(betas)
    ts, coefs = schedules.step_table(betas, schedules.Sampler(sampler, steps, eta, spacing), var_type)
    want_ts = kept(sampler, steps, spacing)
    assert list(ts) == list(want_ts[::-1])
    names = {"dpm++": ["a", "b", "c1", "c2", "c4"]}.get(sampler, ["a", "b", "c1", "c2", "c3", "s", "g", "log_lo", "log_hi"])
    expected = paper_columns(betas, want_ts, sampler, eta, var_type)
    assert coefs.shape == (len(want_ts), len(expected)) and coefs.dtype == np.float32
    worst = 0.0
    for col, want in enumerate(expected):
        err = np.abs(coefs[:, col] - want).max() / max(np.abs(want).max(), 1e-30)
        worst = max(worst, err)
        assert err < 1e-6, f"column {names[col]}: relative error {err:.2e}"
    print(f"{schedule} {sampler} {steps} {spacing} eta={eta} {var_type}: {len(expected)} columns, "
          f"worst relative error {worst:.2e} (float32 rounding)")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_diffusions_tables_follow_the_formulas(schedule):
    """The float64 tables ddpm.py's GaussianDiffusion samples and trains with, full and respaced."""
    betas = schedules.get_betas(schedule, T)
    d = ddpm.GaussianDiffusion(betas=betas, var_type="learned_range")
    for ts in (np.arange(T), kept("ddim", 50, "trailing")):
        c = d if len(ts) == T else d.respace(ts)
        abar = np.cumprod(1 - betas)[ts]
        abar_prev = np.append(1.0, abar[:-1])
        beta = 1 - abar / abar_prev
        tilde = beta * (1 - abar_prev) / (1 - abar)
        pairs = {"alphas_cumprod": abar, "posterior_variance": tilde,
                 "posterior_mean_coef1": beta * np.sqrt(abar_prev) / (1 - abar),
                 "posterior_mean_coef2": (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar),
                 "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - abar),
                 "posterior_log_variance_clipped": np.log(np.append(tilde[1], tilde[1:]))}
        worst = max(np.abs(getattr(c, name) - want).max() / np.abs(want).max() for name, want in pairs.items())
        print(f"{schedule}, {len(ts)} steps: worst relative error of the diffusion's tables {worst:.1e}")
        assert worst < 1e-12 and list(c.timesteps) == list(ts)


def test_ddim_sigma_of_eta_one_is_the_posterior_std():
    """Song et al.: eta = 1 makes DDIM's sigma_t the DDPM posterior's sqrt(beta-tilde_t)."""
    chain = schedules.Schedule(schedules.get_betas("linear", T))
    sigma, eps_coef = chain.ddim_sigma(1.0)
    err = np.abs(sigma - np.sqrt(chain.posterior_variance)).max()
    print(f"eta 1: |sigma - sqrt(beta-tilde)| max {err:.1e}")
    assert err < 1e-12 and np.allclose(eps_coef ** 2 + sigma ** 2, 1 - chain.alphas_cumprod_prev)
