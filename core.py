"""The torch-free core: what both samplers need, in numpy, Pillow and the standard library only.

ddpm.py (PyTorch), sample_ort.py (ONNX Runtime, no torch), export.py and evaluate.py import it;
it imports nothing of this project. Each number is computed here once:

  schedules   beta_t (Ho et al. sec. 4, Nichol & Dhariwal eq. 17) and every float64 table of a
              chain: alpha-bar, the posterior (eqs. 6-7), the log-variances of the bound, DDIM's
              sigma (Song et al. eq. 12), DPM-Solver++'s coefficients (Lu et al. 2022b); respacing
  sampling    timestep spacings, the sampler checks, the step tables the ONNX update graphs read
  pictures    uint8 images, grids, the reverse process as a still or an animation, the loss curve
  files       atomic writes and the checks that an output can be written without losing anything
  commands    class specs (--class), the sampling flags both scripts share, messages

Time convention, as in ddpm.py: t is 0-indexed, t = 0 .. T-1; the code's t=0 is the paper's t=1.
"""

import contextlib
import math
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# Messages: library code reports through these, never with print, so that under torchrun only
# rank 0 speaks and every process's warnings carry its rank.


def rank():
    """This process's rank in a torchrun job (torchrun sets RANK), 0 otherwise."""
    return int(os.environ.get("RANK", "0") or 0)


def say(message):
    """Progress and results on standard output; under torchrun from rank 0 alone."""
    if rank() == 0:
        print(message, flush=True)


def warn(message, kind="warning"):
    """'warning: ...' (or 'note: ...', or the message alone for kind None) on standard error,
    from every process, with its rank under torchrun."""
    who = f"rank {rank()}: " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    print(f"{who}{kind + ': ' if kind else ''}{message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Schedules


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
    kept original t's for a respaced one (`respaced`), whose betas come from the kept alpha-bars."""

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
        # A step goes from index i to i - 1, the last (i = 0) to abar = 1 (lambda = inf, sigma = 0).
        # x_{i-1} = sigma_{i-1} / sigma_i x_i + w_i D, w_i = alpha_{i-1} - sigma_{i-1} alpha_i / sigma_i
        # (= -alpha_{i-1} (e^-h - 1)); D = x_0 (first order, the same step as DDIM with eta 0) or
        # x_0 + (x_0 - x_0') h_i / (2 h_{i+1}) with x_0' the previous step's (2M, midpoint form).
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
# Sampling: which t's a chain keeps, and the checks every sampler makes


def ddim_timesteps(T, num_steps, spacing="leading"):
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
    multistep correction extrapolates badly over leading's last jump to t = 0 (docs/samplers.md,
    the solver-error table), leading (DDIM's own) for the others."""
    return "trailing" if sampler == "dpm++" else "leading"


def check_sampler(sampler, num_steps, eta, T, spacing=None):
    """ValueError with a sentence for sampler settings that would give no or wrong images."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; use {', '.join(SAMPLERS)}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown --spacing '{spacing}'; use {', '.join(SPACINGS)}")
    if num_steps is not None and not (isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= T):
        raise ValueError(f"--steps must be between 1 and T={T}, got {num_steps}")
    if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):  # also refuses nan
        raise ValueError(f"--eta must be between 0 (deterministic DDIM) and 1, got {eta}")
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"--eta sets DDIM's noise; --sampler {sampler} has none to set. Use "
                         "--sampler ddim, or leave --eta out")


def distilled_sampler(steps, sampler, num_steps, eta, spacing):
    """(sampler, num_steps, spacing) for a model distilled for `steps` sampling steps (distill.py;
    0: not distilled, the flags as given, ddpm where none). A student knows one chain, the one it
    was trained on: deterministic DDIM over the trailing t's of exactly `steps` steps. That is its
    default, and any other sampler, step count, eta or spacing is a ValueError with a sentence."""
    if not steps:
        return sampler or "ddpm", num_steps, spacing
    asked = [(flag, value) for flag, value, fits in (("--sampler", sampler, sampler in (None, "ddim")),
                                            ("--steps", num_steps, num_steps in (None, steps)),
                                            ("--eta", eta, not eta),
                                            ("--spacing", spacing, spacing in (None, "trailing"))) if not fits]
    if asked:
        raise ValueError(f"this model was distilled to sample in exactly {steps} deterministic DDIM steps "
                         f"(--sampler ddim --steps {steps} --eta 0 --spacing trailing, its defaults), so it "
                         f"cannot sample with {', '.join(f'{f} {v}' for f, v in asked)}; leave "
                         f"{'that flag' if len(asked) == 1 else 'those flags'} out, or sample its teacher")
    return "ddim", steps, "trailing"


def distilled_guidance(built_in, given, conditional, classes):
    """(the scale to guide the network with, the scale the samples have) for --guidance `given`
    (None: GUIDANCE). A student distilled with guidance s built in (built_in != 1, distill.py) has
    it in its labelled branch: it samples that branch as it is for s or no --guidance, and its
    unconditional branch for 0; another scale is a ValueError. Other models: the given scale."""
    scale = guidance_scale(given, conditional, classes)
    if built_in == 1 or not conditional or classes is None:
        return scale, scale
    if given is None or given == built_in:
        return 1.0, built_in
    if given == 0:
        return 0.0, 0.0
    raise ValueError(f"--guidance {given:g}: this student was distilled with classifier-free guidance "
                     f"{built_in:g} built in, so it samples at that scale (leave --guidance out) or "
                     "unconditionally (--guidance 0); distil its teacher again for another scale")


def kept_timesteps(T, sampler, num_steps=None, spacing=None):
    """The original t's a sampler's chain visits, or None for the full chain of Algorithm 2
    (ddpm at num_steps = T, the only chain that is not respaced)."""
    num_steps = num_steps or T
    if sampler == "ddpm" and num_steps == T:
        return None
    return ddim_timesteps(T, num_steps, spacing or default_spacing(sampler))


def step_table(chain, sampler, eta=0.0, var_type="fixed_large"):
    """(timesteps, coefs) of a chain (a Schedule) in sampling order, for export.py's update graphs:
    the network's t and, per step, the step graph's [a, b, c1, c2, c3, s] (learned_range: and
    [g, log_lo, log_hi]), or for dpm++ the multistep graph's [a, b, c1, c2, c4]; float32, from
    the chain's float64 tables (see export.step_graph for what the graph does with them)."""
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
    coefs = np.stack(columns, axis=1).astype(np.float32)
    return chain.timesteps[::-1].copy(), coefs[::-1].copy()


# ----------------------------------------------------------------------------------------------
# Pictures

PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROGRESS_EXTENSIONS = (".png", ".gif", ".webp")


def to_uint8(x, source=None):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, clipping what the sampler overshoots. x: a
    numpy array, or a torch tensor (on any device, of any float dtype). source: the model file the
    samples came from; then samples that are not finite are a ValueError, not black pictures."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if source is not None and not np.isfinite(x).all():
        raise ValueError(f"the samples of '{source}' are not finite (NaN or inf): its weights are, or a "
                         "setting (--amp fp16?) overflowed; nothing was written")
    x = np.clip(x, -1, 1)
    return np.round((x + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


def grid_of(images_uint8, nrow=None, pad=2):
    """(N, H, W, C) uint8 -> (rows, columns, C) uint8, the images on a white background."""
    n, h, w, c = images_uint8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images_uint8[k]
    return grid


def save_picture(images, path, **options):
    """A Pillow image (or a list of them: the frames of an animation) written atomically: to a
    temp file in the format the extension names, then renamed over `path`."""
    frames = images if isinstance(images, list) else [images]
    fmt = Image.registered_extensions()[os.path.splitext(path)[1].lower()]
    if len(frames) > 1:
        options.update(save_all=True, append_images=frames[1:])
    write_atomically(path, lambda tmp: frames[0].save(tmp, format=fmt, **options))


def pil_image(image_uint8):
    """(H, W, C) uint8 -> a Pillow image, grayscale for C = 1."""
    return Image.fromarray(image_uint8.squeeze(-1) if image_uint8.shape[-1] == 1 else image_uint8)


def save_grid(images_uint8, path, nrow=None, pad=2):
    """(N, H, W, C) uint8 -> one picture, nrow images per row (default: a square)."""
    save_picture(pil_image(grid_of(images_uint8, nrow, pad)), path)


def progress_steps(n_steps, animation):
    """Which steps a process picture shows: 10 evenly spaced for a still, up to 100 for an
    animation; the first step is always in, the sample itself is added after them."""
    return sorted(set(np.linspace(0, n_steps - 1, min(n_steps, 100 if animation else 10)).round().astype(int)))


def save_progress(frames, final, path):
    """The reverse process as a picture. frames: [(t, x_t, pred_x0)], both (N, H, W, C) uint8;
    final: the samples. A .png is a still: one row per image (up to 8), for each frame a pair of
    columns x_t | predicted x_0, then the sample. A .gif or .webp is an animation: per frame, the
    x_t of up to 16 images on the left and their predicted x_0 on the right, labelled with t."""
    n, h, w, c = final.shape
    zoom = max(1, 64 // h)  # small images enlarged (nearest), so a 32x32 sample is visible
    pad, label = 2, 12
    H, W = h * zoom, w * zoom
    columns = [(f"t={t}", x, p) for t, x, p in frames] + [("sample", final, final)]
    if os.path.splitext(path)[1].lower() == ".png":
        rows = min(n, 8)
        sheet = np.full((label + rows * (H + pad), len(columns) * (2 * W + 3 * pad), 3), 255, np.uint8)
        for j, (_, x, p) in enumerate(columns):
            left = j * (2 * W + 3 * pad)
            for r in range(rows):
                top = label + r * (H + pad)
                sheet[top:top + H, left:left + W] = enlarged(x[r], zoom)
                sheet[top:top + H, left + W + pad:left + 2 * W + pad] = enlarged(p[r], zoom)
        image = Image.fromarray(sheet)
        draw = ImageDraw.Draw(image)
        for j, (text, _, _) in enumerate(columns):
            draw.text((j * (2 * W + 3 * pad), 0), text, fill=(0, 0, 0))
        save_picture(image, path)
        return
    shown = min(n, 16)
    pictures = []
    for text, x, p in columns:
        left, right = tiles(x[:shown], zoom, pad), tiles(p[:shown], zoom, pad)
        frame = np.full((label + left.shape[0], 2 * left.shape[1] + 4 * pad, 3), 255, np.uint8)
        frame[label:, :left.shape[1]] = left
        frame[label:, left.shape[1] + 4 * pad:] = right
        image = Image.fromarray(frame)
        ImageDraw.Draw(image).text((0, 0), f"{text}: x_t | predicted x_0", fill=(0, 0, 0))
        pictures.append(image)
    durations = [60] * (len(pictures) - 1) + [1500]  # hold the samples
    lossless = {"lossless": True} if path.lower().endswith(".webp") else {}
    save_picture(pictures, path, duration=durations, loop=0, **lossless)


def enlarged(image, zoom):
    """(H, W, C) uint8 -> (zoom H, zoom W, 3), nearest-neighbour, grayscale as RGB."""
    image = image.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)


def tiles(images, zoom, pad):
    """(N, H, W, C) uint8 enlarged on a square of ceil(sqrt(N)) x ceil(sqrt(N)) cells."""
    n, h, w, _ = images.shape
    side, H, W = math.ceil(math.sqrt(n)), h * zoom, w * zoom
    grid = np.full((side * (H + pad), side * (W + pad), 3), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, side)
        grid[r * (H + pad):r * (H + pad) + H, q * (W + pad):q * (W + pad) + W] = enlarged(images[k], zoom)
    return grid


class ProcessFrames:
    """The (t, x_t, pred_x0) of the first batch at the steps that the --progress pictures show,
    for a chain of n_steps: a sampler's callback(k, t, x_t, pred_x0); set `done` after the first
    batch. `save` draws every picture once the samples are known."""

    def __init__(self, paths, n_steps):
        self.shown = {path: progress_steps(n_steps, not path.lower().endswith(".png")) for path in paths}
        self.wanted = set().union(*self.shown.values())
        self.frames, self.done = {}, False

    def wants(self, k):
        return not self.done and k in self.wanted

    def __call__(self, k, t, x_t, pred_x0):
        """Step k's network time t, and x_t and the predicted x_0 as (N, C, H, W) in [-1, 1]."""
        if self.wants(k):
            self.frames[k] = (int(t), to_uint8(x_t), to_uint8(pred_x0))

    def save(self, final):
        for path, steps in self.shown.items():
            save_progress([self.frames[k] for k in steps], final, path)


def save_loss_curve(rows, png_path, width=640, height=360):
    """Loss vs step from the log rows, drawn with Pillow (log-scale loss)."""
    if len(rows) < 2:
        return
    steps = np.array([r["step"] for r in rows], dtype=float)
    loss = np.log10(np.array([max(r["loss"], 1e-8) for r in rows]))
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    m = 50
    x0, x1, y0, y1 = steps.min(), steps.max(), loss.min(), loss.max()
    y1 = y1 if y1 > y0 else y0 + 1
    pts = [(m + (s - x0) / max(x1 - x0, 1) * (width - 2 * m),
            height - m - (v - y0) / (y1 - y0) * (height - 2 * m)) for s, v in zip(steps, loss)]
    d.rectangle([m, m, width - m, height - m], outline="black")
    d.line(pts, fill=(200, 40, 40), width=2)
    d.text((m, 10), "training loss (L_simple, log scale)", fill="black")
    d.text((m, height - m + 5), f"step {int(x0)}", fill="black")
    d.text((width - m - 90, height - m + 5), f"step {int(x1)}", fill="black")
    d.text((5, m - 15), f"{10 ** y1:.4f}", fill="black")
    d.text((5, height - m), f"{10 ** y0:.4f}", fill="black")
    save_picture(img, png_path)


def progress_bar(total, label):
    """A one-line text progress bar on stderr, for sample_ort.py (tqdm is not one of its
    dependencies); returns update(done)."""
    start = time.time()
    interactive = sys.stderr.isatty()

    def update(done):
        if done != total and (not interactive or done % max(1, total // 100)):
            return
        elapsed = time.time() - start
        frac = done / total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta = elapsed / frac - elapsed if frac > 0 else 0
        end = "\n" if done == total else ""
        print(f"\r{label} [{bar}] {done}/{total} {elapsed:.0f}s<{eta:.0f}s", end=end,
              file=sys.stderr, flush=True)
    return update


# ----------------------------------------------------------------------------------------------
# Files: written atomically, and checked before any work


def write_atomically(path, write):
    """write(temp path), then rename it over `path`: a crash leaves the old file or the new one,
    never half of one. Temp files of writers that died mid-write (kill -9) are removed first."""
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        pid = f[len(name) + 4:]
        if f.startswith(name + ".tmp") and pid.isdigit() and int(pid) != os.getpid() \
                and not process_alive(int(pid)):
            os.remove(os.path.join(folder, f))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """A text file written atomically, its write errors raised before the rename (a full disk
    leaves the old file, not an empty one)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    write_atomically(path, write)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def check_output_path(path, extensions, flag, overwrite=True, inputs=()):
    """Before any work, that `path` can be written and nothing is lost by writing it: a
    ValueError with a sentence if its extension is not one of `extensions`, it is a folder or one
    of the `inputs`, it exists and overwrite is False, or its folder cannot be written."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} '{path}' is a folder; give a file name")
    if os.path.splitext(path)[1].lower() not in extensions:
        raise ValueError(f"{flag} '{path}': the name must end in {', '.join(extensions)}")
    if os.path.exists(path):
        if any(os.path.exists(p) and os.path.samefile(path, p) for p in inputs):
            raise ValueError(f"{flag} '{path}' is the input file; writing it would destroy the input")
        if not overwrite:
            raise ValueError(f"{flag} '{path}' exists; pass --overwrite to replace it")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), flag)


def missing_folders(folder):
    """The folders that making `folder` would create, deepest first ([] if it exists)."""
    missing, folder = [], os.path.abspath(folder)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def remove_empty(folders):
    """Remove each folder that is empty (deepest first, as missing_folders lists them)."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def check_writable_folder(folder, flag):
    """Create the folder and a file in it, as the real write will; a sentence if that fails."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag}: cannot write in '{folder}', which is a file, not a folder")
    created = missing_folders(folder)  # made for the test and removed after it, so that a run
    try:                                # refused later leaves no empty folders behind
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag}: cannot write in '{folder}' ({e.strerror or e})") from None
    finally:
        remove_empty(created)


# ----------------------------------------------------------------------------------------------
# Commands: class specs, and what the two sampling scripts share


def parse_classes(spec, names):
    """The class indices `--class` asks for: 'all', or a comma list of names or indices."""
    if spec == "all":
        return list(range(len(names)))
    classes = []
    for part in str(spec).split(","):
        part = part.strip()
        if part in names:
            classes.append(list(names).index(part))
        elif part.isdigit() and int(part) < len(names):
            classes.append(int(part))
        else:
            raise ValueError(f"--class {part}: not a class of this model; use an index 0..{len(names) - 1}, "
                             f"a name ({', '.join(names)}), a comma list, or all")
    return classes


def class_labels(classes, n):
    """(labels, images per grid row): n images of one class, or a row of ceil(n / K) images
    for each of K classes."""
    if len(classes) == 1:
        return np.full(n, classes[0]), None
    per_class = math.ceil(n / len(classes))
    return np.repeat(classes, per_class), per_class


def add_sampling_flags(parser):
    """The flags `ddpm.py sample` and `sample_ort.py` share, with one help text each."""
    parser.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    parser.add_argument("--steps", dest="sampling_steps", type=int, default=None,
                        help="sampling steps; fewer than T respaces the chain (default: T; a distilled "
                             "model: the steps it was distilled for)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help="ddpm: ancestral (Algorithm 2); ddim: Song et al.; dpm++: DPM-Solver++(2M), "
                             "Lu et al. 2022, good at 10 to 25 steps (default: ddpm; a distilled model: ddim)")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM noise, 0 deterministic .. 1 (default: 0; ddim only)")
    parser.add_argument("--spacing", choices=SPACINGS, default=None,
                        help="which t's a chain shorter than T keeps: leading 0, T/steps, ..; trailing "
                             ".., T-1 (Lin et al. 2023) (default: trailing for dpm++, leading otherwise)")
    parser.add_argument("--seed", type=int, default=0, help="seed of x_T and the noise (default: 0)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per network call (default: all of --n)")
    parser.add_argument("--out", default="samples.png",
                        help="the grid picture, .png/.jpg/.webp/.bmp (default: samples.png)")
    parser.add_argument("--outdir", default=None,
                        help="also write one PNG per image in this folder (default: none)")
    parser.add_argument("--progress", action="append", default=[], metavar="PATH",
                        help="also draw the reverse process: .png, a still (x_t and predicted x_0 at "
                             "10 steps), or .gif/.webp, an animation; may be given more than once "
                             "(default: none)")
    parser.add_argument("--class", dest="classes", default=None, metavar="K",
                        help="class(es) to draw: a name or an index, a comma list, or all (a grid row "
                             "per class); needs a class-conditional model (trained with --cond), or in "
                             "ddpm.py a --classifier (default: none, unconditional)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale s of a conditional model with --class: 0 "
                             "unconditional, 1 plain conditional, > 1 follows the class more strictly (default: 3)")


def check_sampling_request(n, batch, guidance, out, progress, outdir, inputs, seed=0):
    """The checks both sampling scripts make before any work: sizes, the seed, the guidance scale,
    and that every output can be written without destroying an input or another output. Returns
    the progress paths."""
    if n < 1:
        raise ValueError(f"--n {n}: sample at least 1 image")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"--seed {seed}: use a whole number from 0 to 2^63 - 1")
    if batch is not None and batch < 1:
        raise ValueError(f"--batch {batch}: use at least 1 image per batch")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"--guidance {guidance}: use a number >= 0 (0: unconditional, 1: conditional)")
    check_output_path(out, PICTURE_EXTENSIONS, "--out", inputs=inputs)
    progress = [progress] if isinstance(progress, str) else list(progress or ())
    for k, path in enumerate(progress):
        if os.path.abspath(path) in map(os.path.abspath, [out, *progress[:k]]):
            raise ValueError(f"--progress '{path}' is named twice (also as --out or another --progress)")
        check_output_path(path, PROGRESS_EXTENSIONS, "--progress", inputs=(*inputs, out))
    if outdir:
        check_writable_folder(outdir, "--outdir")
    return progress


GUIDANCE = 3.0  # --guidance where it is not given


def guidance_scale(given, conditional, classes):
    """--guidance's value (GUIDANCE where not given), with a note where a given one changes nothing."""
    if given is not None and (not conditional or classes is None):
        warn("--guidance has no effect: " + ("the model is unconditional (trained without --cond)" if not conditional
                                             else "without --class the samples are unconditional"), "note")
    return GUIDANCE if given is None else given


def write_samples(images, out, nrow=None, outdir=None, process=None, first_batch=None):
    """The samples' grid at `out`, one PNG each in outdir, and the process pictures of the first
    batch (a ProcessFrames); a sentence naming what was written."""
    try:
        if process is not None:
            process.save(images[:first_batch])
        save_grid(images, out, nrow)
        if outdir:
            for k, image in enumerate(images):
                save_picture(pil_image(image), os.path.join(outdir, f"{k:05d}.png"))
    except OSError as e:
        raise ValueError(f"the samples could not be written ({e.strerror or e})") from None
    return (f"wrote {out}" + (f" and {len(images)} PNGs in {outdir}" if outdir else "") +
            (f", the process in {' and '.join(process.shown)}" if process is not None and process.shown else ""))
