"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2): a student learns to take in one deterministic DDIM step the two
steps its teacher takes, then becomes the next round's teacher, so each round halves the steps.

With alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t), and the student's step going from t to
t'' with the teacher's step t' between them:

    z_t   = alpha_t x + sigma_t eps                                       x from the data
    z_t'  = alpha_t'  x_eta(z_t)  + sigma_t'  / sigma_t  (z_t  - alpha_t  x_eta(z_t))    the teacher's
    z_t'' = alpha_t'' x_eta(z_t') + sigma_t'' / sigma_t' (z_t' - alpha_t' x_eta(z_t'))   two DDIM steps
    x~    = (z_t'' - sigma_t'' / sigma_t z_t) / (alpha_t'' - sigma_t'' / sigma_t alpha_t)
    L     = max(alpha_t^2 / sigma_t^2, 1) || x~ - x_theta(z_t) ||^2      (truncated SNR weighting)

x~ is the x_0 for which one DDIM step from z_t lands on z_t''. x_eta is the teacher's x_0 prediction,
clipped to [-1, 1] as its sampler clips it (clip_x0), computed in float32 whatever --amp is. The
last step lands on the data (t'' = 0: alpha = 1, sigma = 0, so x~ = z_t''). At the first step
(t = T, abar near 0) an eps network cannot give x_0, so the student predicts v by default
(--prediction v; Salimans & Ho sec. 4), starting from the teacher's weights whatever they predict.

The chains: a student of N steps keeps the t's of DDIM's trailing spacing (core.ddim_timesteps,
Lin et al. 2023), which start at t = T - 1 where x_T is pure noise, as the paper's grid t = i / N
does; the teacher's 2N-step chain contains them as every other step. Each round is a normal
training run of ddpm.py (train(): exact resume, signals, metrics.jsonl, TensorBoard, progress)
whose objective is this loss, and writes a normal checkpoint that records its steps
(Config.distilled_steps), which the samplers then use by default and require.

A conditional teacher distils with classifier-free guidance fixed (Meng et al. 2023, in its
simplest form): the target is the guided teacher, so the student's labelled branch is guided at
that scale (Config.distilled_guidance); labels dropped with p_uncond keep the unconditional branch.

    python ddpm.py distill --teacher ckpt.pt --from-steps 256 --to-steps 4   # -> runs/distill/4-steps.pt
"""

import dataclasses
import math
import os
import time

import numpy as np
import torch

import checkpoints
import core
import ddpm
import flags
from flags import check_config


def x0_from_prediction(prediction, x_t, out, alpha, sigma):
    """The x_0 a network output implies at alpha_t, sigma_t: from eps by eq. 4 solved for x_0, from
    v = alpha eps - sigma x_0 as alpha x_t - sigma v, or x_0 itself. Directly, not through eps: at
    the cosine schedule's first step (alpha 5e-5) x_0 = (x_t - sigma eps) / alpha loses three
    digits of float32, where v and x_0 lose none."""
    if prediction == "eps":
        return (x_t - sigma * out) / alpha
    if prediction == "v":
        return alpha * x_t - sigma * out
    return out


def alphas_sigmas(chain, k, x):
    """(alpha_t, sigma_t, alpha_s, sigma_s) at index k of a chain and at the index before it (s;
    before index 0 the data: alpha 1, sigma 0), from its float64 tables, as x's dtype."""
    return [chain._at(table, k, x) for table in (chain.sqrt_alphas_cumprod, chain.sqrt_one_minus_alphas_cumprod,
                                                  chain.sqrt_alphas_cumprod_prev, chain.sqrt_one_minus_alphas_cumprod_prev)]


def student_timesteps(T, steps):
    """The t's a student of `steps` steps samples at: DDIM's trailing spacing."""
    return core.ddim_timesteps(T, steps, "trailing")


class Distillation(ddpm.GaussianDiffusion):
    """The student's chain (its `steps` kept t's, index i = 0 .. steps - 1, t ascending) whose
    training_loss is the distillation loss: train() draws i uniformly over the student's steps, as
    the paper's t = i / N, and minimises it like L_simple. teacher: the model distilled, sampled
    on its own 2 x steps chain with its own settings (cfg_teacher: prediction, clip_x0), a
    conditional one guided with scale `guidance` (1: its labelled branch as it is)."""

    def __init__(self, cfg, teacher, cfg_teacher, steps, guidance=1.0):
        betas, timesteps = ddpm.GaussianDiffusion.from_config(cfg).respaced(student_timesteps(cfg.T, steps))
        super().__init__(betas=betas, timesteps=timesteps, var_type=cfg.var_type, clip_x0=cfg.clip_x0,
                         prediction=cfg.prediction)
        teacher_full = ddpm.GaussianDiffusion.from_config(cfg_teacher)
        self.teacher_chain = teacher_full.respace(student_timesteps(cfg.T, 2 * steps))
        if not np.array_equal(self.teacher_chain.timesteps[1::2], self.timesteps):
            raise ValueError(f"the trailing chains of {2 * steps} and {steps} steps on T={cfg.T} do not nest "
                             "(every other t of the teacher's is not the student's); halve from a power of two")
        self.teacher, self.guidance = teacher.eval().requires_grad_(False), guidance

    def teacher_network(self, y, device):
        """The teacher as a function of (x_t, t): guided at the fixed scale for labels y."""
        self.teacher.to(device)
        if not self.teacher.num_classes:
            return self.teacher
        return ddpm.ClassifierFreeGuidance(self.teacher, y, self.guidance)

    @torch.no_grad()
    def target(self, z_t, i, y=None):
        """x~: two deterministic DDIM steps of the teacher from z_t at the student's index i (the
        teacher's index 2i + 1, to 2i, to 2i - 1; -1 is the data), solved for the x_0 that one step
        of the student would need, all in float32."""
        z_t = z_t.float()
        network, chain, z = self.teacher_network(y, z_t.device), self.teacher_chain, z_t
        with torch.autocast(z_t.device.type, enabled=False):
            for k in (2 * i + 1, 2 * i):
                alpha, sigma, alpha_next, sigma_next = alphas_sigmas(chain, k, z)
                out = network(z, chain.network_t(k, z.device)).float()[:, :z.shape[1]]  # a variance: not used
                x_hat = x0_from_prediction(chain.prediction, z, out, alpha, sigma)
                if chain.clip_x0:  # as the teacher's sampler does
                    x_hat = x_hat.clamp(-1, 1)
                z = alpha_next * x_hat + sigma_next / sigma * (z - alpha * x_hat)
        alpha, sigma, alpha_2, sigma_2 = alphas_sigmas(self, i, z)  # t and t''
        return (z - sigma_2 / sigma * z_t) / (alpha_2 - sigma_2 / sigma * alpha)

    def weight(self, i, x):
        """Truncated SNR weighting, max(SNR_t, 1) = max(||x - x^||^2, ||eps - eps^||^2) / ||x - x^||^2."""
        abar = self._at(self.alphas_cumprod, i, x).view(-1)
        return (abar / (1 - abar)).clamp(min=1.0)

    def training_loss(self, model, x0, i, noise, y=None):
        """max(SNR_t, 1) || x~ - x_theta(z_t) ||^2 per image, averaged; y: the (dropped) labels."""
        z_t = self.q_sample(x0.float(), i, noise.float())
        x_target = self.target(z_t, i, y)
        t = self.network_t(i, z_t.device)
        out = (model(z_t, t) if y is None else model(z_t, t, y)).float()[:, :x0.shape[1]]  # the mean, not a variance
        x_pred = x0_from_prediction(self.prediction, z_t, out, *alphas_sigmas(self, i, z_t)[:2])
        return (self.weight(i, z_t) * ((x_pred - x_target) ** 2).mean(dim=(1, 2, 3))).mean()


# ----------------------------------------------------------------------------------------------
# The rounds


def rounds(from_steps, to_steps):
    """The students' step counts: from_steps / 2, / 4, .. down to to_steps."""
    if not (1 <= to_steps < from_steps and from_steps % to_steps == 0
            and (from_steps // to_steps) & (from_steps // to_steps - 1) == 0):
        raise ValueError(f"--from-steps {from_steps} --to-steps {to_steps}: each round halves the steps, so "
                         "--from-steps must be --to-steps times a power of two (2, 4, 8, ..)")
    steps, plan = from_steps // 2, []
    while steps >= to_steps:
        plan.append(steps)
        steps //= 2
    return plan


def distill(teacher_path, *, from_steps=None, to_steps=4, round_steps=2000, out="runs/distill",
            prediction="v", guidance=None, resume=False, overwrite=False, **settings):
    """Rounds of distillation from the checkpoint at teacher_path down to to_steps; round k
    writes out/<steps>-steps.pt and its run directory out/<steps>-steps/. settings: Config
    fields for every round (batch_size, lr, ..; default the teacher's). resume: finished rounds
    are kept, a stopped one continues exactly, the rest run."""
    teacher, cfg_teacher = ddpm.load_checkpoint(teacher_path)
    if cfg_teacher.distilled_steps and from_steps not in (None, cfg_teacher.distilled_steps):
        raise ValueError(f"--from-steps {from_steps}: '{teacher_path}' was distilled for "
                         f"{cfg_teacher.distilled_steps} steps, so its students start from those")
    from_steps = from_steps or cfg_teacher.distilled_steps or 256
    if from_steps > cfg_teacher.T:
        raise ValueError(f"--from-steps {from_steps}: the teacher has T={cfg_teacher.T} steps")
    plan = rounds(from_steps, to_steps)
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"--guidance {guidance}: use a number >= 0 (1: the plain conditional model)")
    if not cfg_teacher.num_classes and guidance is not None:
        raise ValueError(f"--guidance: '{teacher_path}' is unconditional (trained without --cond)")
    built_in = cfg_teacher.distilled_guidance  # a guided student as the teacher: its scale is in its weights
    if built_in != 1 and guidance not in (None, built_in):
        raise ValueError(f"--guidance {guidance:g}: '{teacher_path}' was distilled with guidance {built_in:g} "
                         "built in; distil it at that scale (leave --guidance out)")
    guidance = 1.0 if not cfg_teacher.num_classes else built_in if built_in != 1 else (
        core.GUIDANCE if guidance is None else guidance)
    core.say(f"distilling '{teacher_path}' in {len(plan)} rounds: {from_steps} -> "
             + " -> ".join(map(str, plan)) + " steps" + (f", guidance {guidance:g} built in" if guidance != 1 else ""))
    for k, steps in enumerate(plan):
        name = os.path.join(out, f"{steps}-steps")
        cfg = dataclasses.replace(
            cfg_teacher, **{"warmup": 0, "ema_decay": 0.0, **settings}, prediction=prediction, steps=round_steps,
            min_snr=0.0, cosine_lr=True, distilled_steps=steps, teacher=teacher_path, ckpt=name + ".pt",
            run_dir=name, distilled_guidance=guidance)
        check_config(cfg)
        saved = checkpoints.read_checkpoint(cfg.ckpt)["step"] if resume and os.path.exists(cfg.ckpt) else None
        core.say(f"round {k + 1}/{len(plan)}: {2 * steps} -> {steps} steps, {round_steps} optimizer steps, "
                 f"into {cfg.ckpt}")
        if saved is None or saved < round_steps:
            t0 = time.time()
            objective = Distillation(cfg, teacher, cfg_teacher, steps, guidance if built_in == 1 else 1.0)
            ddpm.train(cfg, resume=cfg.ckpt if saved is not None else None, overwrite=overwrite,
                       diffusion=objective, init=teacher)
            core.say(f"round {k + 1}/{len(plan)} took {time.time() - t0:.0f} s")
        teacher, cfg_teacher, teacher_path = *ddpm.load_checkpoint(cfg.ckpt), cfg.ckpt
        built_in = cfg_teacher.distilled_guidance
    core.say(f"done: '{teacher_path}' samples in {plan[-1]} DDIM steps: ddpm.py sample --ckpt {teacher_path}")
    return teacher_path


# ----------------------------------------------------------------------------------------------
# Command line: python ddpm.py distill

SETTINGS = {  # Config fields a round takes from the command line; None: the teacher's
    "batch_size": (int, "images per optimizer step (default: the teacher's)"),
    "lr": (float, "peak learning rate, annealed to 0 in each round by a cosine (default: the teacher's)"),
    "warmup": (int, "warm-up steps at the start of each round (default: 0)"),
    "ema_decay": (float, "EMA decay of the student's weights; the next round starts from the EMA "
                         "(default: 0, none: a round is short)"),
    "amp": (str, "the student's forward and backward in autocast; the teacher's target is float32 "
                 "(default: the teacher's)"),
    "seed": (int, "seed of the draws of each step (default: the teacher's)"),
    "save_every": (int, "checkpoint every N steps of a round (default: the teacher's)"),
    "sample_every": (int, "a grid of the student's samples every N steps (0: never) (default: the teacher's)"),
    "log_every": (int, "metrics every N steps (default: the teacher's)"),
    "device": (str, "auto, cpu, cuda or cuda:N (default: the teacher's)"),
    "num_workers": (int, "data loader processes, -1 automatic (default: the teacher's)"),
    "data_dir": (str, "where the teacher's data set is found (default: the teacher's)"),
}


def add_flags(commands):
    """The `distill` command among ddpm.py's sub-commands, and its flags."""
    parser = commands.add_parser("distill", help="halve a model's sampling steps in rounds (progressive "
                                                 "distillation, Salimans & Ho 2022)")
    parser.add_argument("--teacher", default="ckpt.pt", metavar="PATH",
                        help="the checkpoint to distil: trained, converted or a distilled student "
                             "(default: ckpt.pt)")
    parser.add_argument("--from-steps", type=int, default=None,
                        help="the teacher's DDIM steps the first round starts from (default: 256; a "
                             "distilled teacher: its steps)")
    parser.add_argument("--to-steps", type=int, default=4, help="the last student's steps (default: 4)")
    parser.add_argument("--round-steps", type=int, default=2000,
                        help="optimizer steps per round (Salimans & Ho: 50k on CIFAR-10) (default: 2000)")
    parser.add_argument("--out", default="runs/distill",
                        help="folder for each round's <steps>-steps.pt and run directory <steps>-steps/ "
                             "(default: runs/distill)")
    parser.add_argument("--prediction", choices=["v", "x0", "eps"], default="v",
                        help="what the student predicts; eps cannot give x_0 where abar_t is near 0 "
                             "(Salimans & Ho sec. 4) (default: v)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="a conditional teacher's classifier-free guidance scale, built into the "
                             f"students (default: {core.GUIDANCE:g}; a distilled teacher: its own)")
    for name, (kind, text) in SETTINGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text,
                            choices=list(flags.AMP_MODES) if name == "amp" else None)
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue: finished rounds are kept, a stopped one continues exactly from its "
                             "checkpoint, the others run (default: start anew)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoints and run files of an earlier distillation in --out "
                             "(default: refuse to)")


def run(args):
    """`ddpm.py distill` with its parsed flags."""
    for flag in ("from_steps", "to_steps", "round_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: use at least 1")
    settings = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    if args.resume and os.path.dirname(os.path.abspath(args.resume)) != os.path.abspath(args.out):
        raise ValueError(f"--resume {args.resume}: a distillation continues from its --out folder "
                         f"('{args.out}'); give the same --teacher and --out, and --resume alone")
    distill(args.teacher, from_steps=args.from_steps, to_steps=args.to_steps, round_steps=args.round_steps,
            out=args.out, prediction=args.prediction, guidance=args.guidance, resume=args.resume is not None,
            overwrite=args.overwrite, **settings)
