"""Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel, 2020): the paper and its training
loop in one file, in the paper's order. The machinery they use lives in plainly named files beside it.

The forward process q adds Gaussian noise in T steps of variance beta_1 .. beta_T. With
alpha_t = 1 - beta_t and abar_t = alpha_1 alpha_2 ... alpha_t it jumps to any t at once (eq. 4):

    q(x_t | x_0) = N(x_t; sqrt(abar_t) x_0, (1 - abar_t) I),   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps

The reverse process p_theta undoes it from x_T ~ N(0, I), for t = T .. 1 (Algorithm 2, eq. 11):

    x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z

where a U-Net eps_theta(x_t, t) learns the noise that was added (Algorithm 1, eq. 14):

    L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2

In this file, in that order:
  Ho et al.       GaussianDiffusion: q_sample (eq. 4), q_posterior (eqs. 6-7), p_sample and its loop
                  (eq. 11, Algorithm 2), L_simple (eq. 14); a reader who stops there has a DDPM
  later papers    in the same class, each under its paper: v and x_0 prediction, min-SNR weights,
                  learned variances and L_hybrid, the bound (eq. 5) in bits/dim, DDIM, DPM-Solver++(2M),
                  the noisy classifier; then classifier-free and classifier guidance, and sample_loop
  training        Algorithm 1: Adam, warm-up, grad clipping, EMA, AMP, exact resume, DDP (Run, train)
  the U-Net       Ho et al.'s appendix B, with the attribute names of their TF code as ported by
                  pesser/pytorch_diffusion, so published weights load; a class embedding; its
                  downsampling half as the noisy classifier
  sampling        a grid of samples from a checkpoint
  command line    python ddpm.py {train,train-classifier,sample,info}

Beside it: config.py (the Config dataclass and its presets), schedules.py (the torch-free numbers
both samplers share), data.py, checkpoints.py, runlog.py, distributed.py, flags.py, sampling.py,
pictures.py, files.py, messages.py; distill.py, convert.py, export.py, sample_ort.py, evaluate.py.

Time convention: t is 0-indexed in code, t = 0 .. T-1; the code's t=0 is the paper's t=1.
Images live in [-1, 1] everywhere inside this file; the data boundary converts.

  python ddpm.py train --data cifar10 && python ddpm.py sample --ckpt ckpt.pt --n 64
"""

import contextlib
import copy
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from typing import NamedTuple

import flags  # the command line, torch-free

if __name__ == "__main__":  # --help and a malformed flag are answered before torch loads (seconds)
    flags.ddpm_parser().parse_args()

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import checkpoints
import data
import distributed
import files
import messages
import pictures
import sampling
import schedules
from checkpoints import Diverged, Stopped
from config import (DERIVED_FIELDS, INFO_FIELDS, MODEL_FIELDS, PRESET_BY_SIZE, PRESETS, Config, check_config,
                    config_from_dict, make_config)
from distributed import amp_dtype, pick_device, sampling_dtype
from runlog import RunLog
from schedules import Sampler, get_betas

# ----------------------------------------------------------------------------------------------
# Ho et al. 2020. The forward process q and its posterior (eqs. 4-7); the schedule beta_t and
# every float64 table derived from it come from schedules.py (linear: Ho et al.'s 1e-4 .. 0.02)


class GaussianDiffusion(schedules.Schedule):
    """The diffusion on a chain of betas: every table of schedules.Schedule (float64, computed once,
    improved-diffusion's layout) and the torch side of the math, Ho et al.'s first, then the later
    papers' additions, each under a heading that names its paper.

    Arguments come in one order: the network where there is one, then the image (x_0 for the
    forward process, the losses and the bound; x_t for the reverse process), then its index i in
    this chain, then the rest. `timesteps[i]` is the network's t for index i: the identity for the
    full chain, the kept original t's for a respaced one (`respace`).
    """

    def __init__(self, *, betas, var_type="fixed_large", clip_x0=True, prediction="eps",
                 min_snr=0.0, timesteps=None):
        super().__init__(betas, timesteps)
        self.var_type, self.clip_x0 = var_type, clip_x0
        self.prediction, self.min_snr = prediction, min_snr
        self._tables = {}  # (table, device, dtype) -> the table as a tensor there (see at)

    @classmethod
    def from_config(cls, cfg):
        return cls(betas=get_betas(cfg.schedule, cfg.T), var_type=cfg.var_type, clip_x0=cfg.clip_x0,
                   prediction=cfg.prediction, min_snr=cfg.min_snr)

    def respace(self, kept):
        """A shorter chain over the kept t's: beta_i = 1 - abar(t_i) / abar(t_{i-1})."""
        betas, timesteps = self.respaced(kept)
        return GaussianDiffusion(betas=betas, timesteps=timesteps, var_type=self.var_type,
                                 clip_x0=self.clip_x0, prediction=self.prediction, min_snr=self.min_snr)

    def at(self, table, i, x):
        """table[i] as a (B, 1, 1, 1) tensor of x's dtype and device; i: (B,) index tensor. The
        float64 table is copied to x's device and dtype once and indexed there, so a step on the
        GPU copies nothing from the host and waits for nothing."""
        return self._table(table, x.device, x.dtype)[i.to(x.device)].view(-1, 1, 1, 1)

    def _table(self, table, device, dtype):
        key = (id(table), device, dtype)
        if key not in self._tables or self._tables[key][0] is not table:
            self._tables[key] = (table, torch.from_numpy(table).to(device, dtype))
        return self._tables[key][1]

    def q_sample(self, x0, i, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4)."""
        return self.at(self.sqrt_alphas_cumprod, i, x0) * x0 + \
            self.at(self.sqrt_one_minus_alphas_cumprod, i, x0) * noise

    def q_posterior(self, x0, i, x_t):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
        mean = self.at(self.posterior_mean_coef1, i, x_t) * x0 + \
            self.at(self.posterior_mean_coef2, i, x_t) * x_t
        return mean, self.at(self.posterior_variance, i, x_t)

    def predict_x0_from_eps(self, x_t, i, eps):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (eq. 4 solved for x_0, as eq. 15 uses it)."""
        return self.at(self.sqrt_recip_alphas_cumprod, i, x_t) * x_t - \
            self.at(self.sqrt_recipm1_alphas_cumprod, i, x_t) * eps

    # -- the reverse process p_theta (eq. 11, Algorithm 2) --------------------------------------

    def network_t(self, i, device):
        """The t the network is fed for chain index i: the original t of a respaced chain."""
        return self._table(self.timesteps, device, torch.long)[i.to(device)]

    def model_output(self, model, x_t, i, classifier_grad=None):
        """(eps_theta(x_t, t), the x_0 it implies, v) with the network fed the original t of index
        i; v is the learned variance's interpolation weight in [-1, 1], None for Ho et al.'s fixed
        variances. A network that predicts v or x_0 is converted (eps_from_output, x0_from_output,
        Salimans & Ho below). classifier_grad(x_t, t), if given, is s grad log p(y | x_t), and eps
        becomes eps - sqrt(1 - abar_t) s grad log p(y | x_t) (classifier guidance, Dhariwal &
        Nichol 2021 eq. 14), whatever the sampler."""
        t = self.network_t(i, x_t.device)
        out, var_v = split_output(model(x_t, t).to(x_t.dtype), x_t.shape[1])
        eps = self.eps_from_output(x_t, i, out)  # Ho et al.'s network: out itself
        if classifier_grad is None:
            return eps, self.x0_from_output(x_t, i, out), var_v
        eps = eps - self.at(self.sqrt_one_minus_alphas_cumprod, i, x_t) * classifier_grad(x_t, t)
        return eps, self.predict_x0_from_eps(x_t, i, eps), var_v

    def clipped(self, x0, clip=None):
        """The x_0 the samplers use: clipped to the data range [-1, 1] if clip_x0 (or clip)."""
        return x0.clamp(-1, 1) if (self.clip_x0 if clip is None else clip) else x0

    def p_mean_variance(self, x_t, i, x0, var_v=None):
        """Mean and variance of p_theta(x_{t-1} | x_t) given the predicted x_0: q's posterior mean
        (eq. 7) at it, which with x_0 from eps_theta is eq. 11's mean; sigma_t^2 = beta_t or
        beta-tilde_t. Returns (mean, variance, the x_0 used: clipped if clip_x0)."""
        pred_x0 = self.clipped(x0)
        mean, posterior_variance = self.q_posterior(pred_x0, i, x_t)
        if self.var_type == "fixed_large":
            variance = self.at(self.betas, i, x_t)  # sigma_t^2 = beta_t (Ho et al.'s CIFAR-10)
        elif self.var_type == "fixed_small":
            variance = posterior_variance  # sigma_t^2 = beta-tilde_t
        else:
            variance = self.log_variance(x_t, i, var_v).exp()  # learned (Nichol & Dhariwal, below)
        return mean, variance, pred_x0

    def p_sample(self, x_t, i, x0, noise, var_v=None):
        """x_{t-1} = mu + sigma z, with no noise at t = 0 (Algorithm 2, lines 3-4); x0: the
        predicted x_0. Returns (x_{t-1}, the x_0 used)."""
        mean, variance, pred_x0 = self.p_mean_variance(x_t, i, x0, var_v)
        nonzero = (i != 0).to(x_t.device, x_t.dtype).view(-1, 1, 1, 1)  # a mask, not a branch: traces cleanly
        return mean + nonzero * variance.sqrt() * noise, pred_x0

    @torch.no_grad()
    def p_sample_loop(self, model, x_T, noise_fn, sampler="ddpm", eta=0.0, callback=None, progress=False,
                      classifier_grad=None):
        """Algorithm 2 over this chain's indices N-1 .. 0, from x_T: x_{t-1} = p_sample(x_t, t), or
        a later sampler's step (ddim, dpm++ below); returns x_0. noise_fn(k, shape): the k-th
        step's z (k = 0 first), drawn for every sampler, so that all see one stream.
        callback(k, t, x_t, pred_x0) at every step: its input x_t (network time t) and the x_0
        predicted from it, e.g. for pictures of the process."""
        x, pred_x0 = x_T, torch.zeros_like(x_T)  # dpm++ reads the previous x_0 (its first step does not)
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm import tqdm
            indices = tqdm(indices, desc=f"{sampler} sampling", unit="step", leave=False)
        for k, i_int in enumerate(indices):
            i = torch.full((x.shape[0],), i_int, dtype=torch.long, device=x.device)  # a fill, no copy
            noise = noise_fn(k, x.shape).to(x.device, x.dtype)
            eps, x0, var_v = self.model_output(model, x, i, classifier_grad)
            if sampler == "ddpm":
                x_prev, pred_x0 = self.p_sample(x, i, x0, noise, var_v)
            elif sampler == "ddim":
                x_prev, pred_x0 = self.ddim_step(x, i, eps, x0, noise, eta)
            else:  # deterministic: the noise was drawn all the same
                x_prev, pred_x0 = self.dpm_solver_step(x, i, x0, pred_x0)
            if callback is not None:
                callback(k, int(self.timesteps[i_int]), x, pred_x0)
            x = x_prev
        return x

    # -- the objective (eq. 14, Algorithm 1) ----------------------------------------------------

    def training_loss(self, model, x0, i, noise, y=None):
        """L_simple = || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2 (eq. 14),
        averaged over pixels and images; y: the labels of a conditional model (None:
        unconditional). Later papers' networks: the squared error on v or x_0, optionally min-SNR
        weighted (weighted_mse), and with learned variances L_hybrid = L_simple + lambda L_vlb
        (Nichol & Dhariwal sec. 3.1)."""
        x_t = self.q_sample(x0, i, noise)
        t = self.network_t(i, x_t.device)
        out, var_v = split_output((model(x_t, t) if y is None else model(x_t, t, y)).float(), x0.shape[1])
        if self.prediction == "eps" and not self.min_snr:
            loss = F.mse_loss(out, noise.float())
        else:
            loss = self.weighted_mse(x0, i, noise, out)
        return loss if var_v is None else loss + self.hybrid_vlb_term(x0, i, x_t, out, var_v)

    # == The later papers' additions ============================================================
    # -- networks that predict v (Salimans & Ho 2022) or x_0; min-SNR weights (Hang et al. 2023)

    def eps_from_output(self, x_t, i, out):
        """The eps a network output implies: eps itself; from v = sqrt(abar) eps - sqrt(1 - abar) x_0,
        eps = sqrt(1 - abar) x_t + sqrt(abar) v; from x_0, eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)
        (eq. 4). export.py puts this in the graph."""
        if self.prediction == "eps":
            return out
        if self.prediction == "v":
            return self.at(self.sqrt_one_minus_alphas_cumprod, i, x_t) * x_t + \
                self.at(self.sqrt_alphas_cumprod, i, x_t) * out
        return (x_t - self.at(self.sqrt_alphas_cumprod, i, x_t) * out) / \
            self.at(self.sqrt_one_minus_alphas_cumprod, i, x_t)

    def x0_from_output(self, x_t, i, out):
        """The x_0 a network output implies: from eps by predict_x0_from_eps; from v as
        sqrt(abar) x_t - sqrt(1 - abar) v, and x_0 itself. Directly, not through eps: at the cosine
        schedule's first step (abar 4.9e-5) x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) loses
        three digits of float32 (tests/test_core.py measures it), where v and x_0 lose none."""
        if self.prediction == "eps":
            return self.predict_x0_from_eps(x_t, i, out)
        if self.prediction == "v":
            return self.at(self.sqrt_alphas_cumprod, i, x_t) * x_t - \
                self.at(self.sqrt_one_minus_alphas_cumprod, i, x_t) * out
        return out

    def weighted_mse(self, x0, i, noise, out):
        """The squared error of the output against its target (eps, x_0 or v = sqrt(abar) eps -
        sqrt(1 - abar) x_0), per image, weighted by min-SNR (Hang et al. eq. 10: the x_0-space
        weight min(SNR, gamma), per target) where --min-snr is set, averaged over the images."""
        abar = self.at(self.alphas_cumprod, i, out)
        target = {"eps": noise, "x0": x0,
                  "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[self.prediction].float()
        per_image = ((out - target) ** 2).mean(dim=(1, 2, 3))
        if self.min_snr:
            snr = (abar / (1 - abar)).view(-1)
            clipped = snr.clamp(max=self.min_snr)
            per_image = per_image * {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[self.prediction]
        return per_image.mean()

    # -- learned variances and L_hybrid (Nichol & Dhariwal 2021) --------------------------------

    def log_variance(self, x_t, i, var_v=None):
        """log sigma_t^2 as the bound uses it: log beta_t (fixed_large), log beta-tilde_t
        (fixed_small), both with beta-tilde_1 at t = 0; or learned, Nichol & Dhariwal eq. 15:
        log Sigma = w log beta_t + (1 - w) log beta-tilde_t with w = (v + 1) / 2."""
        if self.var_type == "learned_range":
            w = (var_v + 1) / 2
            return w * self.at(self.log_betas, i, x_t) + (1 - w) * self.at(self.posterior_log_variance_clipped, i, x_t)
        table = self.fixed_large_log_variance if self.var_type == "fixed_large" else self.posterior_log_variance_clipped
        return self.at(table, i, x_t)

    def hybrid_vlb_term(self, x0, i, x_t, out, var_v):
        """lambda L_vlb with lambda = 1/1000: one uniformly drawn term of the bound, in bits/dim,
        times T/1000 (L_vlb = T E_t[L_t]), with the gradient stopped on the mean so that it
        trains only the variance (Nichol & Dhariwal sec. 3.1; improved-diffusion's rescaled MSE)."""
        vb = self.vb_terms_bpd(x0, i, x_t, self.x0_from_output(x_t, i, out.detach()), var_v, clip=False)
        return vb.mean() * self.num_timesteps / 1000.0

    # -- the variational bound (Ho et al. eq. 5) in bits per dimension, as their code computes it

    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) per image, bits/dim: no parameters, near 0."""
        i = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long)
        mean = self.at(self.sqrt_alphas_cumprod, i, x0) * x0
        log_var = self.at(self.log_one_minus_alphas_cumprod, i, x0).expand_as(x0)
        kl = normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0))
        return kl.mean(dim=(1, 2, 3)) / math.log(2.0)

    def vb_terms_bpd(self, x0, i, x_t, pred_x0, var_v=None, clip=None):
        """Per image, bits/dim: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) where
        i > 0, and L_0 = -log p_theta(x_0 | x_1), the discretized decoder, where i = 0 (eq. 5);
        pred_x0, var_v: the network's x_0 and v at (x_t, i). The KL is between the true posterior
        and p_theta with the log-variances of `log_variance` (Ho et al.'s code, improved-diffusion)."""
        true_mean, _ = self.q_posterior(x0, i, x_t)
        true_log_var = self.at(self.posterior_log_variance_clipped, i, x_t).expand_as(x_t)
        mean, _ = self.q_posterior(self.clipped(pred_x0, clip), i, x_t)  # p_theta's mean, eq. 11
        log_var = self.log_variance(x_t, i, var_v).expand_as(x_t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3))
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3))
        return torch.where(i.to(x_t.device) == 0, nll, kl) / math.log(2.0)

    @torch.no_grad()
    def bits_per_dim(self, model, x0, generator=None, callback=None):
        """The bound L_VLB = L_T + sum_{t>1} L_{t-1} + L_0 of each image in bits/dim, every term
        evaluated at one x_t ~ q(x_t | x_0) (Ho et al.'s calc_bpd_loop). Returns (total (B,),
        prior (B,), terms (B, T) with terms[:, 0] = L_0). callback(k) after each of the T terms."""
        B, T = x0.shape[0], self.num_timesteps
        terms = torch.zeros(B, T, dtype=torch.float64)
        for k, i_int in enumerate(range(T - 1, -1, -1)):
            i = torch.full((B,), i_int, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, i, noise)
            _, pred_x0, var_v = self.model_output(model, x_t, i)
            terms[:, i_int] = self.vb_terms_bpd(x0, i, x_t, pred_x0, var_v).double().cpu()
            if callback is not None:
                callback(k)
        prior = self.prior_bpd(x0).double().cpu()
        return terms.sum(dim=1) + prior, prior, terms

    # -- DDIM (Song et al. 2021) ----------------------------------------------------------------

    def predict_eps_from_x0(self, x_t, i, x0):
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), eq. 4 solved for eps."""
        return (self.at(self.sqrt_recip_alphas_cumprod, i, x_t) * x_t - x0) / \
            self.at(self.sqrt_recipm1_alphas_cumprod, i, x_t)

    def ddim_step(self, x_t, i, eps, x0, noise, eta=0.0):
        """x_{t-1} = sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1} - sigma_t^2) eps + sigma_t z (Song et
        al. eq. 12), the eps consistent with the clipped x_0 where it is clipped; sigma_t from eta
        (schedules.Schedule.ddim_sigma): 1 is DDPM's noise, 0 none. Returns (x_{t-1}, the x_0 used)."""
        pred_x0 = self.clipped(x0)
        if self.clip_x0:
            eps = self.predict_eps_from_x0(x_t, i, pred_x0)
        sigma, eps_coef = self.ddim_sigma(eta)
        x_prev = self.at(self.sqrt_alphas_cumprod_prev, i, x_t) * pred_x0 + self.at(eps_coef, i, x_t) * eps
        return x_prev + self.at(sigma, i, x_t) * noise, pred_x0

    # -- DPM-Solver++(2M) (Lu et al. 2022b) -----------------------------------------------------

    def dpm_solver_step(self, x_t, i, x0, prev_x0):
        """x_{t-1} from x_t by DPM-Solver++(2M) (Algorithm 2, the midpoint form diffusers'
        DPMSolverMultistepScheduler uses): a multistep solver of the probability-flow ODE in the
        data prediction x_0, second order from the previous step's x_0 (prev_x0), first order at
        the first and the last step. Returns (x_prev, the x_0 used), the next step's prev_x0."""
        pred_x0 = self.clipped(x0)
        D = pred_x0 + self.at(self.dpm_half_ratio, i, x_t) * (pred_x0 - prev_x0)
        return self.at(self.dpm_sigma_ratio, i, x_t) * x_t + self.at(self.dpm_w, i, x_t) * D, pred_x0

    # -- the noisy classifier of classifier guidance (Dhariwal & Nichol 2021) -------------------

    def classifier_loss(self, classifier, x0, i, noise, y):
        """-log p_phi(y | x_t, t) on x_t = q_sample(x_0, t, eps): the noisy classifier's cross
        entropy (Dhariwal & Nichol 2021 sec. 4.1), t drawn over the whole chain as for the denoiser."""
        x_t = self.q_sample(x0, i, noise)
        return F.cross_entropy(classifier(x_t, self.network_t(i, x_t.device)).float(), y)


def split_output(out, channels):
    """The network's output as (its prediction: the first `channels` channels, the learned
    variance's v: the other `channels`, Nichol & Dhariwal eq. 15; None for a fixed variance)."""
    return out[:, :channels], (out[:, channels:] if out.shape[1] > channels else None)


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def standard_normal_cdf(x):
    """Phi(x) by the tanh approximation that Ho et al.'s and improved-diffusion's decoders use."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x0, mean, log_scale):
    """log p(x_0) per element of 8-bit data scaled to [-1, 1] under N(mean, e^(2 log_scale)): the
    mass on the pixel's bin [x - 1/255, x + 1/255], the first and last bins reaching to -inf and
    +inf (Ho et al. eq. 13). Probabilities are floored at 1e-12, as in both reference codes."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv_std * (x0 - mean + 1.0 / 255))
    cdf_min = standard_normal_cdf(inv_std * (x0 - mean - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x0 < -0.999, log_cdf_plus, torch.where(x0 > 0.999, log_one_minus_cdf_min, log_bin))


# ----------------------------------------------------------------------------------------------
# Guidance: classifier-free (Ho & Salimans 2021) and by a noisy classifier (Dhariwal & Nichol 2021)


class ClassifierFreeGuidance(nn.Module):
    """The network of a conditional model as a function of (x_t, t) alone, with classifier-free
    guidance (Ho & Salimans 2021, eq. 6): out = out(x_t, t) + s (out(x_t, t, y) - out(x_t, t)),
    the unconditional branch fed the 'no label' class. s = 0 is the unconditional model, 1 the
    plain conditional one (one branch each), s > 1 follows y more strictly; otherwise both
    branches go through the network in one batched call. The combination is linear, so guiding
    v or x_0 equals guiding the eps they imply; a learned variance comes from the conditional
    branch. y None: unconditional."""

    def __init__(self, model, y, guidance_scale):
        super().__init__()
        self.model, self.y, self.s = model, y, guidance_scale

    def forward(self, x_t, t):
        null = torch.full_like(t, self.model.num_classes)
        if self.y is None or self.s == 0:
            return self.model(x_t, t, null)
        labels = self.y.to(t.device)
        if self.s == 1:
            return self.model(x_t, t, labels)
        out_c, out_u = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        (pred_c, var_c), (pred_u, _) = split_output(out_c, x_t.shape[1]), split_output(out_u, x_t.shape[1])
        guided = pred_u + self.s * (pred_c - pred_u)
        return guided if var_c is None else torch.cat([guided, var_c], dim=1)


class ClassifierGradient:
    """(x_t, t) -> s grad_{x_t} log p_phi(y | x_t, t), the classifier-guidance term (Dhariwal &
    Nichol 2021, Algorithm 1 and eq. 14); model_output subtracts it from eps scaled by
    sqrt(1 - abar_t)."""

    def __init__(self, classifier, y, classifier_scale):
        self.classifier, self.y, self.s = classifier, y, classifier_scale

    def __call__(self, x_t, t):
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            log_p = F.log_softmax(self.classifier(x, t).double(), dim=1)
            chosen = log_p[torch.arange(len(x)), self.y.to(x.device)].sum()  # images are independent
            return self.s * torch.autograd.grad(chosen, x)[0]


class Guidance(NamedTuple):
    """What sample_loop guides towards: labels y (B,) that a conditional model samples with
    classifier-free guidance of `scale`, and that a noisy `classifier` guides any model towards
    with `classifier_scale`. The default: none (a conditional model samples 'no label')."""
    y: torch.Tensor = None
    scale: float = 1.0
    classifier: nn.Module = None
    classifier_scale: float = 1.0

    def network(self, model):
        """(the network as a function of (x_t, t), the classifier's gradient term or None)."""
        if getattr(model, "num_classes", 0):
            model = ClassifierFreeGuidance(model, self.y, self.scale)
        elif self.y is not None and self.classifier is None:
            raise ValueError("this model is unconditional (trained without --cond): labels need a "
                             "conditional model or a classifier (--classifier)")
        if self.classifier is None:
            return model, None
        if self.y is None:
            raise ValueError("classifier guidance needs the classes to guide towards (--class)")
        return model, ClassifierGradient(self.classifier, self.y, self.classifier_scale)


# ----------------------------------------------------------------------------------------------
# Sampling: a sampler's chain from x_T


class GaussianNoise:
    """noise_fn(k, shape) -> z ~ N(0, I), drawn from `generator` (None: torch's global one) on its
    device (or `device`), in `dtype`: the noise of sample_loop unless the caller feeds its own."""

    def __init__(self, generator=None, device=None, dtype=torch.float32):
        self.generator, self.dtype = generator, dtype
        self.device = generator.device if generator is not None else device

    def __call__(self, k, shape):
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)


def sample_loop(model, diffusion, x_T, sampler=Sampler(), *, noise_fn=None, callback=None, progress=False,
                guidance=Guidance()):
    """Run the reverse process from x_T and return x_0: the schedules.Sampler's chain (Algorithm 2,
    DDIM or DPM-Solver++(2M); fewer steps than T respace it, the network still fed the original
    t's, schedules.kept_timesteps), walked by p_sample_loop, guided as `guidance` says.

    noise_fn:  noise_fn(k, shape) -> the k-th step's noise (k = 0 first); default GaussianNoise
               from torch's global generator. Two implementations fed the same noise_fn agree.
    callback:  callback(k, t, x_t, pred_x0) at every step (p_sample_loop).
    """
    sampling.check_sampler(sampler, diffusion.num_timesteps)
    network, classifier_grad = guidance.network(model)
    kept = schedules.kept_timesteps(diffusion.num_timesteps, sampler)
    chain = diffusion if kept is None else diffusion.respace(kept)
    noise_fn = noise_fn or GaussianNoise(None, x_T.device, x_T.dtype)
    return chain.p_sample_loop(network, x_T, noise_fn, sampler.name, sampler.eta, callback, progress, classifier_grad)


# ----------------------------------------------------------------------------------------------
# Training (Algorithm 1)


def autocast(dtype, device):
    """Autocast to dtype on the device, or nothing for dtype None (float32)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def learning_rate(cfg, step):
    """Linear warm-up (Ho et al.), then constant, or a cosine decay to 0 with --cosine-lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.cosine_lr:
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr


def micro_batch_seed(seed, step, micro):
    """The seed of micro-batch `micro` of optimizer step `step`. t, eps, flips and dropout are
    drawn after seeding with it, so they depend on (seed, step, micro) alone: a resumed run draws
    exactly what an uninterrupted one would, with no RNG state to save."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0])


def make_optimizer(cfg, params):
    """Adam (Ho et al.) or AdamW. --weight-decay is an L2 term in Adam's gradient; AdamW decays
    the weights directly, apart from the adaptive step (Loshchilov & Hutter 2019)."""
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def ema_update(ema, model, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta, for all parameters in one fused call."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


class Run:
    """What a training run carries, in one order: its config; the diffusion whose training_loss it
    minimises over its num_timesteps indices; raw_model, the network itself (its weights are what
    is saved), and model, the same network as it trains (compiled with --compile, wrapped by DDP
    under torchrun); the EMA of the weights; the optimizer and the loss scaler (fp16 only); the
    device and the autocast dtype there (None: float32); and this process's rank of `world`.
    init: a network to start from (a distillation's teacher); default a new one."""

    def __init__(self, cfg, diffusion, device, dtype=None, rank=0, world=1, init=None):
        self.cfg, self.diffusion, self.device, self.dtype = cfg, diffusion, device, dtype
        self.rank, self.world = rank, world
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        torch.manual_seed(cfg.seed)  # the initial weights, the same in every process
        raw = (build_model(cfg) if init is None else copy.deepcopy(init).train().requires_grad_()).to(device)
        raw.grad_checkpoint = cfg.grad_checkpoint
        self.raw_model = raw.to(memory_format=torch.channels_last) if device.type == "cuda" else raw
        self.ema = copy.deepcopy(self.raw_model).eval().requires_grad_(False)
        self.optimizer = make_optimizer(cfg, self.raw_model.parameters())
        self.model = torch.compile(self.raw_model) if cfg.compile else self.raw_model

    def micro_batch_loss(self, model, x0, y, step, micro):
        """Algorithm 1, lines 2-5, on micro-batch `micro` of a step through `model`: x_0 (randomly
        flipped), t ~ Uniform({1..T}), eps ~ N(0, I), the loss; all drawn from the micro-batch's
        own seed. The network is told the labels y not at all (unconditional), all (the
        classifier), or, with --cond, each replaced by 'no label' with probability p_uncond (Ho &
        Salimans)."""
        cfg, device = self.cfg, x0.device
        torch.manual_seed(micro_batch_seed(cfg.seed, step, micro))
        if cfg.flip:
            flip = torch.rand(x0.shape[0], device=device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        i = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=device)  # t: T, or a student's steps
        noise = torch.randn_like(x0)
        with autocast(self.dtype, device):
            if cfg.kind == "classifier":
                return self.diffusion.classifier_loss(model, x0, i, noise, y.to(device))
            if cfg.cond:
                dropped = torch.rand(y.shape[0]) < cfg.p_uncond
                return self.diffusion.training_loss(model, x0, i, noise, torch.where(dropped, cfg.num_classes, y).to(device))
            return self.diffusion.training_loss(model, x0, i, noise)

    def train_step(self, batch, labels, step, stop=None):
        """One optimizer step on this process's share of a batch: the gradient of the mean loss over
        its grad_accum micro-batches (DDP averages it over the processes, once, in the backward of
        the last micro-batch), clipped, an Adam step, the EMA. Returns (the loss averaged over the
        job, the gradient norm, whether any process was asked to stop), agreed in one all-reduce
        after the micro-batches, so a signal that arrives during them counts for this step."""
        cfg, optimizer, scaler = self.cfg, self.optimizer, self.scaler
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        micro = batch.shape[0] // cfg.grad_accum
        loss_sum = torch.zeros((), device=batch.device)
        for k, (x0, y) in enumerate(zip(batch.split(micro), labels.split(micro))):
            if batch.device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            last = k == cfg.grad_accum - 1
            with contextlib.nullcontext() if self.world == 1 or last else self.model.no_sync():
                loss = self.micro_batch_loss(self.model, x0, y, step, self.rank * cfg.grad_accum + k) / cfg.grad_accum
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        loss, stop_asked = distributed.agree(loss_sum, stop and stop.signal, self.world)
        if not math.isfinite(loss):
            raise Diverged(f"the loss became {loss} at step {step + 1}")
        scaler.unscale_(optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # 0: no clipping
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm))
        if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16 skips such steps
            raise Diverged(f"the gradient norm became {grad_norm} at step {step + 1}")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema_update(self.ema, self.raw_model, cfg.ema_decay)
        return loss, grad_norm, stop_asked

    def resume(self, path):
        """The step the run saved in `path` stopped at, its state loaded into this run."""
        state = checkpoints.read_checkpoint(path)
        saved_cfg = config_from_dict(state["config"], f"'{path}'")
        return checkpoints.restore(state, path, saved_cfg, self, MODEL_FIELDS + ("T", "schedule", "kind"))

    def preflight(self, dataset, micro, step):
        """One batch through data, model and backward, so a broken setup fails in seconds. Its
        gradients are dropped, and every step seeds its own draws, so it changes nothing."""
        first, first_y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=micro)))
        t0 = time.time()
        loss = self.micro_batch_loss(self.model, first.to(self.device), first_y, step, 0)
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        messages.say(f"pre-flight ok: one step on one batch, loss {loss.item():.4f}, {time.time() - t0:.1f}s")

    def save(self, step, x0, y, final, saved_step):
        """Save the run at `step`; returns the step now on disk. Only weights whose loss on x0 is
        finite are saved: a model that diverged in its last step (finite weights, NaN outputs) never
        replaces a good checkpoint. A periodic save that fails warns; the last one must work."""
        cfg, diffusion = self.cfg, self.diffusion
        i, noise = torch.full((x0.shape[0],), diffusion.num_timesteps // 2), torch.randn_like(x0)
        with torch.no_grad(), autocast(self.dtype, x0.device):
            check = (diffusion.classifier_loss(self.raw_model, x0, i, noise, y.to(x0.device)) if cfg.kind == "classifier"
                     else diffusion.training_loss(self.raw_model, x0, i, noise))
        if not torch.isfinite(check):
            raise Diverged(f"the weights after step {step} give a loss of {check.item()}")
        state = checkpoints.checkpoint_state(cfg, self.raw_model, self.ema, step, self.optimizer, self.scaler)
        return checkpoints.save_during_run(cfg.ckpt, state, final, saved_step)


def sample_grid(ema, diffusion, cfg, step, log):
    """64 DDIM samples of the EMA model (a conditional one: the classes in turn, unguided), in
    the run directory and TensorBoard."""
    device = next(ema.parameters()).device
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    x_T = torch.randn(64, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g, device=device)
    y = torch.arange(64) % cfg.num_classes if cfg.num_classes else None
    x0 = sample_loop(ema, diffusion, x_T, Sampler("ddim", min(50, diffusion.num_timesteps)), noise_fn=GaussianNoise(g),
                     progress=True, guidance=Guidance(y))
    images = pictures.to_uint8(x0)
    log.image(step, pictures.grid_of(images))
    try:
        pictures.save_grid(images, os.path.join(cfg.run_dir, f"samples_{step:07d}.png"))
    except OSError as e:
        log.warn(e)  # the run folder's one warning


def train(cfg, *, resume=None, overwrite=False, diffusion=None, init=None):
    """Algorithm 1 for cfg.steps optimizer steps. resume: a checkpoint to continue exactly.
    Files a previous run left at cfg.ckpt or in the run directory are refused unless resume
    continues them or overwrite is set. Under torchrun, one of the job's processes (rank 0 writes
    the files). diffusion: whose training_loss to minimise over its num_timesteps indices (default
    the config's; distill.py passes a Distillation); init: a model to start from (default: new)."""
    rank, world, device = distributed.init(pick_device(cfg.device), cfg.device)
    lead = rank == 0  # the process that writes the checkpoint, the log and the pictures
    if not (cfg.batch_size and cfg.grad_accum) and device.type != "cuda":
        raise ValueError("--batch-size auto and --grad-accum auto measure GPU memory, so they "
                         "need CUDA; on a CPU give numbers")
    cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir or checkpoints.default_run_dir(cfg))
    if lead:
        checkpoints.check_run_files(cfg, resume, overwrite)
        if cfg.steps < cfg.warmup:
            messages.warn(f"--steps {cfg.steps} ends inside the {cfg.warmup}-step warm-up, so the learning "
                          f"rate never reaches --lr {cfg.lr} (it ends at {learning_rate(cfg, cfg.steps - 1):.2g}); "
                          "lower --warmup")
    dtype = amp_dtype(cfg.amp, device)
    labelled = cfg.cond or cfg.kind == "classifier"
    dataset = data.load_dataset(cfg, labelled=labelled)
    names = data.class_names(dataset, cfg.data) if labelled else ()
    cfg = dataclasses.replace(cfg, num_classes=len(names), class_names=names)
    run = Run(cfg, diffusion or GaussianDiffusion.from_config(cfg), device, dtype, rank, world, init)
    if lead:
        checkpoints.check_free_space(cfg.ckpt, count_params(run.raw_model))
    if not (cfg.batch_size and cfg.grad_accum):  # auto: find by trial what fits in GPU memory
        batch_size, grad_accum = distributed.auto_batch(run, len(dataset))
        run.cfg = cfg = dataclasses.replace(cfg, batch_size=batch_size, grad_accum=grad_accum)
    distributed.check_batch(cfg.batch_size, cfg.grad_accum, world, len(dataset))
    messages.say(f"data: {cfg.data}, {len(dataset)} images at {cfg.image_size}x{cfg.image_size}"
                 f"{f', {len(names)} classes' if names else ''}; run directory {cfg.run_dir}; device {device}"
                 f"{f'; {world} processes' if world > 1 else ''}")

    step = run.resume(resume) if resume is not None else 0
    if step >= cfg.steps:
        messages.say(f"nothing to do: the checkpoint is at step {step}, --steps is {cfg.steps}")
        return
    first_step, micro = step, cfg.batch_size // (world * cfg.grad_accum)
    loader = data.step_loader(dataset, cfg, step, rank, world, device)
    continuing = resume is not None and os.path.exists(cfg.ckpt) and os.path.samefile(resume, cfg.ckpt)
    saved_step = step if continuing else None  # what cfg.ckpt holds, for the messages of a stop
    run.preflight(dataset, micro, step)
    if world > 1:  # DDP averages the gradients in backward(); it starts from rank 0's weights
        run.model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)

    from tqdm import tqdm
    log = RunLog(cfg.run_dir if lead else None, step if resume is not None else None, cfg.tensorboard)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not lead)
    run.model.train()
    try:
        with checkpoints.StopSignals() as stop:
            for batch, labels in loader:
                batch = batch.to(device, non_blocking=True)
                loss, grad_norm, stop_asked = run.train_step(batch, labels, step, stop)
                step += 1
                log.trained(cfg.batch_size)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    row = log.write({"step": step, "loss": loss, "lr": run.optimizer.param_groups[0]["lr"],
                                     "grad_norm": grad_norm})
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{row['img_per_s']:.1f}")
                with log.paused():  # saving and sampling are not training: the images/s leave them out
                    if stop_asked or step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                        if lead:
                            saved_step = run.save(step, batch[-micro:], labels[-micro:],
                                                  stop_asked or step == cfg.steps, saved_step)
                        if world > 1:  # the others wait: torchrun ends the job when one process exits
                            dist.barrier()
                    if lead and cfg.sample_every and cfg.kind == "denoiser" and \
                            (step % cfg.sample_every == 0 or step == cfg.steps):
                        sample_grid(run.ema, run.diffusion, cfg, step, log)
                if stop_asked:
                    signum = stop.signal or signal.SIGTERM  # another process may have been the one asked
                    raise Stopped(f"\n{signal.Signals(signum).name}: saved step {step} to '{cfg.ckpt}'; "
                                  f"continue with --resume {cfg.ckpt}" if lead else "", 128 + signum)
    except Diverged as e:
        raise Stopped(f"error: {e}; training stopped, and {checkpoints.on_disk(cfg.ckpt, saved_step)} "
                      "(only weights that give a finite loss are saved). Try a lower --lr, --amp bf16 "
                      "instead of fp16, or check the data" if lead else "", 1) from None
    except KeyboardInterrupt:
        hint = f"; continue with --resume {cfg.ckpt}" if saved_step is not None else ""
        raise Stopped(f"\nstopped at once during step {step + 1}, without saving; "
                      f"{checkpoints.on_disk(cfg.ckpt, saved_step)}{hint}", 130) from None
    finally:
        bar.close()
        log.close()
    if world > 1:  # rank 0 finishes its last grid before the job ends
        dist.barrier()
    written = [f for f in ("metrics.jsonl", "loss.png", f"samples_{step:07d}.png") if os.path.exists(os.path.join(cfg.run_dir, f))]
    messages.say(f"done: steps {first_step}..{step}; checkpoint '{cfg.ckpt}'; {', '.join(written)} in {cfg.run_dir}")


# ----------------------------------------------------------------------------------------------
# Appendix B: Ho et al.'s U-Net. Its building blocks (bottom-up)


def get_timestep_embedding(t, dim):
    """Sinusoidal embedding of integer t (Vaswani et al.), [sin, cos] halves, as in Ho et al."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - 1))
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, dim)


def Normalize(channels, groups=32):
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, temb_channels, dropout, groups=32):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # time enters after the first conv
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, scale C^-1/2."""

    def __init__(self, channels, groups=32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, 1, C, H * W).transpose(2, 3)  # (B, 1, HW, C)
        k = self.k(h).reshape(B, 1, C, H * W).transpose(2, 3)
        v = self.v(h).reshape(B, 1, C, H * W).transpose(2, 3)
        # softmax(q k^T / sqrt(C)) v; the fused kernel computes exactly this, faster
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # TF "SAME" padding for a stride-2 3x3 conv pads right/bottom only; torch's padding=1
        # would pad both sides and shift the grid, so published weights would not match.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----------------------------------------------------------------------------------------------
# The U-Net (Ho et al. appendix B): eps_theta(x_t, t), and eps_theta(x_t, t, y) with a class
# embedding (Ho & Salimans 2021) added to the time embedding, as diffusers' num_class_embeds


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ch = cfg.ch
        self.num_res_blocks = cfg.num_res_blocks
        self.num_classes = cfg.num_classes
        self.grad_checkpoint = False  # train() sets it for --grad-checkpoint
        temb_ch = 4 * cfg.ch
        num_levels = len(cfg.ch_mult)
        groups = cfg.norm_groups

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(cfg.ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        if cfg.num_classes:  # the last row is "no label" (y = num_classes): the unconditional model
            self.label_emb = nn.Embedding(cfg.num_classes + 1, temb_ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)

        # downsampling: num_res_blocks blocks per level, attention after each at 16x16
        res = cfg.image_size
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        skip_channels = [cfg.ch]  # channels of every h pushed onto the skip stack
        self.down = nn.ModuleList()
        for level in range(num_levels):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = cfg.ch * in_ch_mult[level], cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, temb_ch, cfg.dropout, groups))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in, groups))
                skip_channels.append(block_in)
            down = nn.Module()
            down.block, down.attn = block, attn
            if level != num_levels - 1:
                down.downsample = Downsample(block_in)
                skip_channels.append(block_in)
                res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout, groups)

        # upsampling: num_res_blocks + 1 blocks per level, each eating one skip connection
        self.up = nn.ModuleList()
        for level in reversed(range(num_levels)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                block.append(ResnetBlock(block_in + skip_channels.pop(), block_out, temb_ch,
                                         cfg.dropout, groups))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in, groups))
            up = nn.Module()
            up.block, up.attn = block, attn
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, up)  # self.up[level] is the level at that resolution, as in TF
        assert not skip_channels

        self.norm_out = Normalize(block_in, groups)
        # learned_range: C more channels, the v of the variance interpolation (eq. 15, N&D)
        out_channels = cfg.in_channels * (2 if cfg.var_type == "learned_range" else 1)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def embed(self, t, y, dtype):
        """The time embedding (B, 4 ch), plus the class embedding of y for a conditional model
        (y None: 'no label')."""
        temb = get_timestep_embedding(t, self.ch).to(dtype)  # (B, ch), sin/cos in float32
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))  # (B, 4 ch)
        if self.num_classes:
            if y is None:
                y = torch.full_like(t, self.num_classes)
            return temb + self.label_emb(y).to(temb.dtype)
        if y is not None:
            raise ValueError("this model is unconditional (trained without --cond); it takes no labels")
        return temb

    def run_block(self, block, *args):
        """A residual or attention block. With grad_checkpoint, in training, its activations are
        recomputed in the backward pass instead of kept (Chen et al. 2016); the RNG state is
        replayed, so dropout draws the same masks and the gradients are the same."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def encode(self, x, temb):
        """The downsampling half and the middle: every activation the skip connections need,
        the middle block's output last."""
        hs = [self.conv_in(x)]
        for down in self.down:
            for i, block in enumerate(down.block):
                h = self.run_block(block, hs[-1], temb)
                if len(down.attn) > 0:
                    h = self.run_block(down.attn[i], h)
                hs.append(h)
            if hasattr(down, "downsample"):
                hs.append(down.downsample(hs[-1]))
        h = hs[-1]
        h = self.run_block(self.mid.attn_1, self.run_block(self.mid.block_1, h, temb))
        return hs, self.run_block(self.mid.block_2, h, temb)

    def forward(self, x, t, y=None):
        """x: (B, C, H, W) noisy images x_t in [-1, 1]-ish, t: (B,) int64 in [0, T), y: (B,) int64
        labels of a conditional model. Returns eps (or v or x_0), and with learned variances C
        more channels: the interpolation's v."""
        temb = self.embed(t, y, x.dtype)
        hs, h = self.encode(x, temb)
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = self.run_block(block, torch.cat([h, hs.pop()], dim=1), temb)  # [h, skip]
                if len(up.attn) > 0:
                    h = self.run_block(up.attn[i], h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        assert not hs
        return self.conv_out(F.silu(self.norm_out(h)))


class Classifier(UNet):
    """p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4.1): the U-Net's
    downsampling half and middle, sized by the same preset, then GroupNorm, SiLU, an average
    over the pixels (their "adaptive" pooling) and a linear head to num_classes logits."""

    def __init__(self, cfg):
        super().__init__(dataclasses.replace(cfg, num_classes=0))
        del self.up, self.norm_out, self.conv_out  # the decoder is not needed
        channels = cfg.ch * cfg.ch_mult[-1]
        self.norm_out = Normalize(channels, cfg.norm_groups)
        self.head = nn.Linear(channels, cfg.num_classes)

    def forward(self, x, t):
        """Logits (B, num_classes) of the class of x_t's x_0."""
        _, h = self.encode(x, self.embed(t, None, x.dtype))
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))


def build_model(cfg):
    """The network a Config describes: the U-Net, or the noisy classifier."""
    return Classifier(cfg) if cfg.kind == "classifier" else UNet(cfg)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_flops(model, cfg, batch=1):
    """FLOPs of one forward pass (2 per multiply-add), counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------
# Checkpoints (the file format and its safe reading live in checkpoints.py), and sampling from one


def load_checkpoint(path, ema=True, kind="denoiser"):
    """(model in eval mode, config) rebuilt from the checkpoint alone. EMA weights by default.
    kind: the network expected, the denoiser or the noisy classifier."""
    state = checkpoints.read_checkpoint(path)
    cfg = config_from_dict(state["config"], f"'{path}'")
    if cfg.kind != kind:
        what = {"classifier": "a noisy classifier (train-classifier)", "denoiser": "a denoiser"}
        raise ValueError(f"'{path}' holds {what[cfg.kind]}, not {what[kind]}"
                         + ("; it guides sampling: ddpm.py sample --classifier" if cfg.kind == "classifier" else ""))
    model = build_model(cfg)
    use_ema = ema and isinstance(state.get("ema"), dict)
    checkpoints.load_weights(model, state["ema"] if use_ema else state["model"], path,
                             "EMA weights" if use_ema else "weights")
    return model.eval(), cfg


def load_classifier(path, cfg):
    """The noisy classifier at `path` (raw weights: Dhariwal & Nichol keep no EMA of it), checked
    against the denoiser's config: same image shape and schedule, and the same classes."""
    classifier, clf_cfg = load_checkpoint(path, ema=False, kind="classifier")
    checkpoints.check_classifier(path, clf_cfg, cfg)
    return classifier, clf_cfg


def sample(ckpt, request=sampling.Request(), *, ema=True, device="auto", classifier=None, classifier_scale=1.0,
           amp="none"):
    """request.n images from the checkpoint's model into one grid (and one PNG each in outdir, and
    the reverse process of the first batch as a picture or animation in each path of progress):
    a sampling.Request, the flags sample_ort.py shares. Its classes (--class's text: names or
    indices, a comma list, or all: a grid row per class) are sampled with classifier-free guidance
    of its guidance scale if the model is conditional, and guided by the noisy classifier at path
    `classifier` with scale `classifier_scale`."""
    request = sampling.check_request(request, (ckpt,))
    if not math.isfinite(classifier_scale):
        raise ValueError(f"--classifier-scale {classifier_scale}: use a finite number")
    device = pick_device(device)
    dtype = sampling_dtype(amp, device)
    model, cfg = load_checkpoint(ckpt, ema=ema)
    sampler = sampling.distilled_sampler(cfg.distilled_steps, request.sampler)
    sampling.check_sampler(sampler, cfg.T)
    clf, names, labels, nrow, n = None, cfg.class_names, None, None, request.n
    if classifier is not None:
        clf, clf_cfg = load_classifier(classifier, cfg)
        clf.to(device)
        names = clf_cfg.class_names
    if request.classes is not None:
        if not names:
            raise ValueError(f"--class: '{ckpt}' is unconditional (trained without --cond); pass "
                             "a noisy classifier with --classifier, or train with --cond")
        labels, nrow = sampling.class_labels(sampling.parse_classes(request.classes, names), n)
        n = len(labels)
    elif clf is not None:
        raise ValueError("--classifier guides towards the classes given by --class")
    model.to(device)
    diffusion = GaussianDiffusion.from_config(cfg)
    guidance_scale, shown = sampling.distilled_guidance(cfg.distilled_guidance, request.guidance,
                                                        cfg.num_classes > 0, request.classes)
    g = torch.Generator(device=device).manual_seed(request.seed)
    batch = request.batch or n
    n_steps = sampler.steps or cfg.T
    process = pictures.ProcessFrames(request.progress, n_steps)
    images = []
    t0 = time.time()
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x_T = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g, device=device)
        y = torch.as_tensor(labels[start:start + b], device=device) if labels is not None else None
        with autocast(dtype, device):
            x0 = sample_loop(model, diffusion, x_T, sampler, noise_fn=GaussianNoise(g), callback=process, progress=True,
                             guidance=Guidance(y, guidance_scale, clf, classifier_scale))
        process.done = True  # the pictures show the first batch
        images.append(pictures.to_uint8(x0, source=ckpt))
    elapsed = time.time() - t0
    written = sampling.write_samples(np.concatenate(images), request.out, nrow, request.outdir, process, min(batch, n))
    guided = ""
    if labels is not None:
        shown_classes = ", ".join(names[c] for c in dict.fromkeys(labels.tolist()))
        guided = (f"; classes {shown_classes}" + (f", guidance {shown:g}" if cfg.num_classes else "")
                  + (f", classifier scale {classifier_scale:g}" if clf is not None else ""))
    messages.say(f"{written}; {n * n_steps / elapsed:.1f} image-steps/s on {device} ({sampler.name}, {n_steps} "
                 f"steps, {'bf16' if dtype == torch.bfloat16 else 'fp16' if dtype else 'fp32'}){guided}")


# ----------------------------------------------------------------------------------------------
# Command line (its flags, their help text and checks: flags.py and config.py)


def train_config(given, resume):
    """The run's Config from the flags given (None: not given). A fresh run starts from a preset;
    a resumed one from the checkpoint's config, so `train --resume` alone continues the run."""
    if given["optimizer"] == "adamw" and given["weight_decay"] is None:
        given["weight_decay"] = 0.01  # PyTorch's AdamW default; Adam's is 0
    if resume is not None:
        path = resume or given["ckpt"] or Config.ckpt
        saved = config_from_dict(checkpoints.read_checkpoint(path)["config"], f"'{path}'")
        if given["preset"] not in (None, saved.preset):
            raise ValueError(f"--resume {path}: the checkpoint was trained with preset "
                             f"'{saved.preset}', not '{given['preset']}'")
        changes = {k: v for k, v in given.items() if v is not None}
        changes.setdefault("ckpt", path)  # continue writing the file we resume from
        cfg = dataclasses.replace(saved, **changes)
        check_config(cfg)
        return cfg, path
    if given["preset"] is None:  # pick the preset from the data, then the image size
        size = given["image_size"] or (96 if given["data"] == "stl10" else 32)
        given["preset"] = "tiny" if given["data"] in (None, "shapes") else PRESET_BY_SIZE.get(size)
        if given["preset"] is None:
            raise ValueError(f"no preset for --image-size {size}; pass --model "
                             f"({', '.join(PRESETS)}) and a size it can take")
    return make_config(**given), None


def train_command(args):
    """`train` and `train-classifier` with their parsed flags."""
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Config) if f.name not in DERIVED_FIELDS}
    if args.command == "train-classifier":
        if given["run_dir"] and given["run_dir"].lower().endswith(checkpoints.CHECKPOINT_EXTENSIONS) \
                and not given["ckpt"]:
            given["ckpt"], given["run_dir"] = given["run_dir"], None  # `--out clf.pt` names the file
        given["ckpt"] = given["ckpt"] or "clf.pt"
    cfg, resume = train_config(given, args.resume)
    if args.command == "train-classifier":
        cfg = dataclasses.replace(cfg, kind="classifier")
    elif cfg.kind != "denoiser" or cfg.distilled_steps:
        raise ValueError(f"'{resume}' is a " + ("distilled student; continue it with distill.py --resume"
                                                 if cfg.distilled_steps else
                                                 "noisy classifier; continue it with train-classifier"))
    train(cfg, resume=resume, overwrite=args.overwrite)


def info_command(args):
    """`info`: a model's config, parameter count and FLOPs."""
    if args.ckpt:
        kind = config_from_dict(checkpoints.read_checkpoint(args.ckpt)["config"], f"'{args.ckpt}'").kind
        model, cfg = load_checkpoint(args.ckpt, kind=kind)
    else:
        cfg = make_config(args.preset or "cifar10", image_size=args.image_size)
        model = UNet(cfg)
    shown = asdict(cfg) if args.ckpt else {k: v for k, v in asdict(cfg).items() if k in INFO_FIELDS}
    for name, value in shown.items():
        print(f"{name:>17}: {value}")
    print(f"{'parameters':>17}: {count_params(model):,}")
    print(f"{'forward FLOPs':>17}: {count_flops(model, cfg) / 1e9:.2f} G at batch 1, "
          f"{cfg.image_size}x{cfg.image_size}")


def sample_command(args):
    """`sample` with its parsed flags."""
    sample(args.ckpt, sampling.Request.from_args(args), ema=not args.no_ema, device=args.device,
           classifier=args.classifier, classifier_scale=args.classifier_scale, amp=args.amp)


def run_command(command, args):
    """command(args) as a command line runs it: a user's mistake (ValueError) is one sentence, a
    stopped run (Ctrl-C, SIGTERM, divergence) its message and exit code, memory that ran out a
    sentence; under torchrun the message names the rank, and the process group is left."""
    try:
        command(args)
    except (ValueError, files.WriteFailed) as e:  # a user's mistake, a full disk: one sentence
        who = f"rank {dist.get_rank()}: " if dist.is_initialized() and dist.get_rank() else ""
        raise SystemExit(f"{who}error: {e}") from None
    except Stopped as e:
        if str(e):  # under torchrun, rank 0 speaks for the job
            messages.warn(str(e), kind=None)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted") from None
    except (RuntimeError, MemoryError) as e:
        if distributed.out_of_memory(e):
            raise SystemExit(f"error: {distributed.out_of_memory(e)}") from None
        if not (dist.is_initialized() and distributed.lost_a_peer(e)):
            raise
        raise SystemExit(f"rank {dist.get_rank()}: stopped, because another process of this "
                         "torchrun job stopped (its message is above)") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


COMMANDS = {"train": train_command, "train-classifier": train_command, "sample": sample_command, "info": info_command}


def main(argv=None):
    args = flags.ddpm_parser().parse_args(argv)
    run_command(COMMANDS[args.command], args)


if __name__ == "__main__":
    main()
