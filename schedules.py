"""The numbers of the diffusion, in float64 numpy and nothing else: ddpm.py (PyTorch), export.py and
sample_ort.py (ONNX Runtime, no torch) all take them from here, so each is computed in one place.

  beta_t       get_betas: linear (Ho et al. sec. 4), cosine (Nichol & Dhariwal eq. 17)
  a chain      Schedule: every table of a chain of betas: alpha-bar, q(x_t | x_0) (eq. 4), the
               posterior (eqs. 6-7), the log-variances of the bound, DDIM's sigma (Song et al.
               eq. 12), DPM-Solver++'s coefficients (Lu et al. 2022b); respacing onto kept t's
  a sampler    Sampler: a sampler and its steps; spaced_timesteps and kept_timesteps: which t's
               its chain keeps (Lin et al. 2023)
  step tables  step_table: per step, the network's t and the coefficients of the update that the
               exported ONNX graphs compute (export.step_graph)

Time convention, as in ddpm.py: t is 0-indexed, t = 0 .. T-1; the code's t=0 is the paper's t=1.
"""

from typing import NamedTuple

import numpy as np

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim", "dpm++")
SPACINGS = ("leading", "trailing", "linspace")
VAR_TYPES = ("fixed_large", "fixed_small", "learned_range")


def get_betas(schedule, T):
    """beta_1..beta_T as a float64 array of length T."""
    if schedule == "linear":
        # Ho et al.: 1e-4 to 0.02 for T=1000; scaled by 1000/T for other T (improved-diffusion)
        scale = 1000 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if schedule == "cosine":
        # Nichol & Dhariwal eq. 17: alpha-bar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) pi/2)^2
        offset = 0.008
        steps = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((steps + offset) / (1 + offset) * np.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        return np.clip(betas, 0, 0.999)  # clipped to avoid the singularity at t = T
    raise ValueError(f"unknown schedule '{schedule}'; use linear or cosine")


class Schedule:
    """Every float64 table of a chain of N steps, indexed by i = 0 .. N-1 (improved-diffusion's
    layout). `timesteps[i]` is the network's t for index i: the identity for the full chain, the
    kept original t's for a respaced one (`respaced`), whose betas come from the kept alpha-bars.
    The paper's symbols: alphas = 1 - beta_t, alphas_cumprod = alpha-bar_t (abar), and every
    square root is named for what it is the root of (sqrt_alphas_cumprod = sqrt(abar_t))."""

    def __init__(self, betas, timesteps=None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not len(betas) or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a list of numbers in (0, 1]")
        self.num_timesteps = len(betas)
        self.timesteps = np.arange(len(betas)) if timesteps is None else np.asarray(timesteps)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)  # alpha-bar_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # alpha-bar_{t-1}
        # q(x_t | x_0), eq. 4
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_alphas_cumprod_prev = np.sqrt(self.alphas_cumprod_prev)
        self.sqrt_one_minus_alphas_cumprod_prev = np.sqrt(1.0 - self.alphas_cumprod_prev)
        # x_0 from eps, eq. 15 solved for x_0
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0), eqs. 6-7
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_mean_coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(self.alphas) / (1.0 - abar)
        # log-variances as the bound uses them (Ho et al.'s code, improved-diffusion): beta-tilde_0
        # is 0, so t = 0 takes beta-tilde_1, in both the fixed_small and the fixed_large table
        first = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.fixed_large_log_variance = np.log(np.append(first, betas[1:]))
        self.log_betas = np.log(betas)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - abar)
        # DPM-Solver++ (Lu et al. 2022b) in the half-log-SNR lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t)).
        # A step goes from index i to i - 1, the last (i = 0) to abar = 1 (lambda = inf, sqrt(1 - abar) = 0).
        # With s_i = sqrt(1 - abar_i): x_{i-1} = s_{i-1} / s_i x_i + w_i D, w_i = sqrt(abar_{i-1}) -
        # s_{i-1} sqrt(abar_i) / s_i (= -sqrt(abar_{i-1}) (e^-h - 1)); D = x_0 (first order, the same
        # step as DDIM with eta 0) or x_0 + (x_0 - x_0') h_i / (2 h_{i+1}) with x_0' the previous step's
        # (2M, midpoint form).
        lam = 0.5 * (np.log(abar) - np.log1p(-abar))
        h = lam[:-1] - lam[1:]  # h[i - 1] = lambda_{i-1} - lambda_i, the step from index i, i >= 1
        self.dpm_sigma_ratio = np.sqrt((1.0 - abar_prev) / (1.0 - abar))
        self.dpm_w = np.sqrt(abar_prev) - self.dpm_sigma_ratio * np.sqrt(abar)
        # h_i / (2 h_{i+1}) for 1 <= i <= N - 2; 0 (first order) at the first step (i = N - 1,
        # no earlier x_0) and the last (i = 0, h = inf), as diffusers' lower_order_final
        self.dpm_half_ratio = np.zeros(len(betas))
        self.dpm_half_ratio[1:-1] = h[:-1] / (2 * h[1:])
        self._ddim = {}

    def respaced(self, kept):
        """(betas, timesteps) of a shorter chain over the kept indices: beta_i = 1 - abar(t_i) /
        abar(t_{i-1}), and the original t of each."""
        kept = np.asarray(sorted(kept))
        abar = self.alphas_cumprod[kept]
        return 1.0 - abar / np.append(1.0, abar[:-1]), self.timesteps[kept]

    def ddim_sigma(self, eta):
        """(sigma_t, sqrt(1 - abar_{t-1} - sigma_t^2)) of DDIM (Song et al. eq. 12, eq. 16 for
        sigma): sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1});
        eta 1 is DDPM's posterior noise, eta 0 none. Computed once per eta."""
        if eta not in self._ddim:
            abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
            sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            self._ddim[eta] = (sigma, np.sqrt(1 - abar_prev - sigma ** 2))
        return self._ddim[eta]


# ----------------------------------------------------------------------------------------------
# A sampler and the t's its chain keeps


class Sampler(NamedTuple):
    """A sampler and its chain: `name` ddpm (ancestral, Algorithm 2), ddim (Song et al.; eta its
    noise, 0 deterministic .. 1) or dpm++ (DPM-Solver++(2M)); `steps` fewer than T (None: T)
    respace the chain onto the t's that `spacing` keeps (None: default_spacing)."""
    name: str = "ddpm"
    steps: int = None
    eta: float = 0.0
    spacing: str = None


def spaced_timesteps(T, num_steps, spacing="leading"):
    """The t's a chain of num_steps keeps (Lin et al. 2023, table 2): 'leading' 0, T//n, ...
    (DDIM's and DDIMScheduler's default), 'trailing' ..., T-1-T/n, T-1 (starts at the last t,
    where x_T is pure noise), 'linspace' rounded linspace(0, T-1)."""
    if not 1 <= num_steps <= T:
        raise ValueError(f"--steps must be between 1 and T={T}, got {num_steps}")
    if spacing == "leading":
        return np.arange(num_steps) * (T // num_steps)
    if spacing == "trailing":
        return np.sort(np.round(np.arange(T, 0, -T / num_steps)).astype(int) - 1)
    if spacing == "linspace":
        return np.unique(np.linspace(0, T - 1, num_steps).round().astype(int))
    raise ValueError(f"unknown --spacing '{spacing}'; use {', '.join(SPACINGS)}")


def default_spacing(sampler):
    """The t's a shorter chain keeps when --spacing is not given: trailing for DPM-Solver++, whose
    multistep correction extrapolates badly over leading's last jump to t = 0 (docs/performance.md,
    the solver-error table), leading (DDIM's own) for the others."""
    return "trailing" if sampler == "dpm++" else "leading"


def kept_timesteps(T, sampler):
    """The original t's a Sampler's chain visits, or None for the full chain of Algorithm 2 (ddpm
    at T steps, the only chain that is not respaced)."""
    num_steps = sampler.steps or T
    if sampler.name == "ddpm" and num_steps == T:
        return None
    return spaced_timesteps(T, num_steps, sampler.spacing or default_spacing(sampler.name))


# ----------------------------------------------------------------------------------------------
# Step tables: what the exported update graphs read at each step


def step_table(betas, sampler, var_type="fixed_large"):
    """(timesteps, coefs) of a Sampler on the schedule of `betas`, in sampling order: the network's
    t and the update's coefficients (chain_coefficients) of each step of the chain kept_timesteps
    picks (the full chain, or a respaced one)."""
    full = Schedule(betas)
    kept = kept_timesteps(len(full.betas), sampler)
    chain = full if kept is None else Schedule(*full.respaced(kept))
    return chain.timesteps[::-1].copy(), chain_coefficients(chain, sampler.name, sampler.eta, var_type)


def chain_coefficients(chain, sampler, eta=0.0, var_type="fixed_large"):
    """Per step of a chain (a Schedule), in sampling order, the step graph's [a, b, c1, c2, c3, s]
    (learned_range: and [g, log_lo, log_hi]), or for dpm++ the multistep graph's [a, b, c1, c2, c4];
    float32, from the chain's float64 tables (export.step_graph says what the graph does with them)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; use {', '.join(SAMPLERS)}")
    a, b = chain.sqrt_recip_alphas_cumprod, chain.sqrt_recipm1_alphas_cumprod
    zeros = np.zeros(chain.num_timesteps)
    if sampler == "dpm++":  # x_prev = c1 x_0 + c2 x_t + c4 x_0' (ddpm.GaussianDiffusion.dpm_solver_step)
        w, r = chain.dpm_w, chain.dpm_half_ratio
        columns = [a, b, w * (1 + r), chain.dpm_sigma_ratio, -w * r]
    elif sampler == "ddpm":  # the posterior mean (eq. 7) and sigma_t, no noise at t = 0
        std = np.sqrt(chain.betas if var_type == "fixed_large" else chain.posterior_variance)
        s = zeros.copy() if var_type == "learned_range" else np.append(0.0, std[1:])
        columns = [a, b, chain.posterior_mean_coef1, chain.posterior_mean_coef2, zeros, s]
    else:  # DDIM: x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
        sigma, eps_coef = chain.ddim_sigma(eta)
        columns = [a, b, chain.sqrt_alphas_cumprod_prev, zeros, eps_coef, sigma]
    if var_type == "learned_range" and sampler != "dpm++":
        # the network's v picks the log-variance between log_lo and log_hi (g = 1: on every DDPM
        # step but the last; DDIM's noise is its eta's sigma, in s)
        g = np.append(0.0, np.ones(chain.num_timesteps - 1)) if sampler == "ddpm" else zeros
        columns += [g, chain.posterior_log_variance_clipped, chain.log_betas]
    return np.stack(columns, axis=1).astype(np.float32)[::-1].copy()
