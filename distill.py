"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2): a student learns to take in one deterministic DDIM step the two
steps its teacher takes, then becomes the next round's teacher, so each round halves the steps.

In the paper's symbols alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t) (not ddpm.py's alpha_t =
1 - beta_t; the code says sqrt_abar and sqrt_1m_abar). The student's step goes from t to t'', the
teacher's two steps through t' between them:

    z_t   = alpha_t x + sigma_t eps                                       x from the data
    z_t'  = alpha_t'  x_eta(z_t)  + sigma_t'  / sigma_t  (z_t  - alpha_t  x_eta(z_t))    the teacher's
    z_t'' = alpha_t'' x_eta(z_t') + sigma_t'' / sigma_t' (z_t' - alpha_t' x_eta(z_t'))   two DDIM steps
    x~    = (z_t'' - sigma_t'' / sigma_t z_t) / (alpha_t'' - sigma_t'' / sigma_t alpha_t)
    L     = max(alpha_t^2 / sigma_t^2, 1) || x~ - x_theta(z_t) ||^2      (truncated SNR weighting)

x~ is the x_0 for which one DDIM step from z_t lands on z_t''. The teacher's two steps are its own
sampler's (ddpm.GaussianDiffusion.model_output and ddim_step, eta 0): x_eta, its x_0 prediction, is
clipped to [-1, 1] where its sampler clips it (clip_x0), all in float32 whatever --amp is. The
last step lands on the data (t'' = 0: alpha = 1, sigma = 0, so x~ = z_t''). At the first step
(t = T, abar near 0) an eps network cannot give x_0, so the student predicts v by default
(--prediction v; Salimans & Ho sec. 4), starting from the teacher's weights whatever they predict.

The chains: a student of N steps keeps the t's of DDIM's trailing spacing (schedules.spaced_timesteps,
Lin et al. 2023), which start at t = T - 1 where x_T is pure noise, as the paper's grid t = i / N
does; the teacher's 2N-step chain contains them as every other step. Each round is a normal
training run of ddpm.py (train(): exact resume, signals, metrics.jsonl, TensorBoard, progress)
whose objective is this loss, and writes a normal checkpoint that records its steps
(Config.distilled_steps), which the samplers then use by default and require.

A conditional teacher distils with classifier-free guidance fixed (Meng et al. 2023, in its
simplest form): the target is the guided teacher, so the student's labelled branch is guided at
that scale (Config.distilled_guidance); labels dropped with p_uncond keep the unconditional branch.

    python distill.py --teacher ckpt.pt --from-steps 256 --to-steps 4   # -> runs/distill/4-steps.pt
"""

import argparse
import dataclasses
import math
import os
import time

import sampling
from config import AMP_MODES, PREDICTIONS


SETTINGS = {  # Config fields a round takes from the command line; None: the teacher's (or ROUND_DEFAULTS)
    "steps": (int, "optimizer steps per round (Salimans & Ho: 50k on CIFAR-10) (default: 2000)"),
    "prediction": (str, "what the student predicts; eps cannot give x_0 where abar_t is near 0 "
                        "(Salimans & Ho sec. 4) (default: v)"),
    "batch_size": (int, "images per optimizer step (default: the teacher's)"),
    "grad_accum": (int, "micro-batches per optimizer step and process (under torchrun each takes "
                        "batch_size / (processes x grad_accum) images) (default: the teacher's)"),
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
ROUND_DEFAULTS = {"steps": 2000, "prediction": "v", "warmup": 0, "ema_decay": 0.0}  # not the teacher's


def parser():
    """distill.py's flags."""
    p = argparse.ArgumentParser(prog="distill.py", description="Halve a model's sampling steps in rounds "
                                "(progressive distillation, Salimans & Ho 2022).")
    p.add_argument("--teacher", default="ckpt.pt", metavar="PATH",
                   help="the checkpoint to distil: trained, converted or a distilled student (default: ckpt.pt)")
    p.add_argument("--from-steps", type=int, default=None,
                   help="the teacher's DDIM steps the first round starts from (default: 256; a "
                        "distilled teacher: its steps)")
    p.add_argument("--to-steps", type=int, default=4, help="the last student's steps (default: 4)")
    p.add_argument("--out", default="runs/distill",
                   help="folder for each round's <steps>-steps.pt and run directory <steps>-steps/ "
                        "(default: runs/distill)")
    p.add_argument("--guidance", type=float, default=None,
                   help="a conditional teacher's classifier-free guidance scale, built into the "
                        f"students (default: {sampling.GUIDANCE:g}; a distilled teacher: its own)")
    for name, (kind, text) in SETTINGS.items():
        flag = "--round-steps" if name == "steps" else "--" + name.replace("_", "-")
        choices = {"amp": list(AMP_MODES), "prediction": list(PREDICTIONS)}.get(name)
        p.add_argument(flag, dest=name, type=kind, default=None, help=text, choices=choices)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue: finished rounds are kept, a stopped one continues exactly from its "
                        "checkpoint, the others run (default: start anew)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoints and run files of an earlier distillation in --out "
                        "(default: refuse to)")
    return p


if __name__ == "__main__":  # --help and a malformed flag are answered before torch loads (seconds)
    parser().parse_args()

import numpy as np
import torch

import checkpoints
import ddpm
import messages
import schedules
from config import check_config


def student_timesteps(T, steps):
    """The t's a student of `steps` steps samples at: DDIM's trailing spacing."""
    return schedules.spaced_timesteps(T, steps, "trailing")


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
                eps, x0, _ = chain.model_output(network, z, k)  # a learned variance: not used
                z, _ = chain.ddim_step(z, k, eps, x0, torch.zeros_like(z))
        # the student's t and t'' (index i - 1: the data at i = 0)
        sqrt_abar, sqrt_1m_abar = self.at(self.sqrt_alphas_cumprod, i, z), self.at(self.sqrt_one_minus_alphas_cumprod, i, z)
        sqrt_abar_2 = self.at(self.sqrt_alphas_cumprod_prev, i, z)
        ratio = self.at(self.sqrt_one_minus_alphas_cumprod_prev, i, z) / sqrt_1m_abar  # sigma_t'' / sigma_t
        return (z - ratio * z_t) / (sqrt_abar_2 - ratio * sqrt_abar)

    def weight(self, i, x):
        """Truncated SNR weighting, max(SNR_t, 1) = max(||x - x^||^2, ||eps - eps^||^2) / ||x - x^||^2."""
        abar = self.at(self.alphas_cumprod, i, x).view(-1)
        return (abar / (1 - abar)).clamp(min=1.0)

    def training_loss(self, model, x0, i, noise, y=None):
        """max(SNR_t, 1) || x~ - x_theta(z_t) ||^2 per image, averaged; y: the (dropped) labels."""
        z_t = self.q_sample(x0.float(), i, noise.float())
        x_target = self.target(z_t, i, y)
        t = self.network_t(i, z_t.device)
        out, _ = ddpm.split_output((model(z_t, t) if y is None else model(z_t, t, y)).float(), x0.shape[1])
        x_pred = self.x0_from_output(z_t, i, out)
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


def distill(teacher_path, from_steps=None, to_steps=4, *, out="runs/distill", guidance=None, resume=False,
            overwrite=False, settings=None):
    """Rounds of distillation from the checkpoint at teacher_path, from from_steps (None: 256, or
    a distilled teacher's steps) down to to_steps; round k writes out/<steps>-steps.pt and its run
    directory out/<steps>-steps/. settings: Config fields for every round (steps, the optimizer
    steps of a round, default 2000; prediction, default v; batch_size, lr, ..: default the
    teacher's). resume: finished rounds are kept, a stopped one continues exactly, the rest run."""
    settings = {**ROUND_DEFAULTS, **(settings or {})}
    round_steps = settings["steps"]
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
        sampling.GUIDANCE if guidance is None else guidance)
    messages.say(f"distilling '{teacher_path}' in {len(plan)} rounds: {from_steps} -> "
                 + " -> ".join(map(str, plan)) + " steps" + (f", guidance {guidance:g} built in" if guidance != 1 else ""))
    for k, steps in enumerate(plan):
        name = os.path.join(out, f"{steps}-steps")
        cfg = dataclasses.replace(cfg_teacher, **settings, min_snr=0.0, cosine_lr=True, distilled_steps=steps,
                                  teacher=teacher_path, ckpt=name + ".pt", run_dir=name, distilled_guidance=guidance)
        check_config(cfg)
        saved = checkpoints.read_checkpoint(cfg.ckpt)["step"] if resume and os.path.exists(cfg.ckpt) else None
        messages.say(f"round {k + 1}/{len(plan)}: {2 * steps} -> {steps} steps, {round_steps} optimizer steps, "
                     f"into {cfg.ckpt}")
        if saved is None or saved < round_steps:
            t0 = time.time()
            objective = Distillation(cfg, teacher, cfg_teacher, steps, guidance if built_in == 1 else 1.0)
            ddpm.train(cfg, resume=cfg.ckpt if saved is not None else None, overwrite=overwrite,
                       diffusion=objective, init=teacher)
            messages.say(f"round {k + 1}/{len(plan)} took {time.time() - t0:.0f} s")
        teacher, cfg_teacher, teacher_path = *ddpm.load_checkpoint(cfg.ckpt), cfg.ckpt
        built_in = cfg_teacher.distilled_guidance
    messages.say(f"done: '{teacher_path}' samples in {plan[-1]} DDIM steps: python ddpm.py sample --ckpt {teacher_path}")
    return teacher_path


def run(args):
    """distill.py with its parsed flags."""
    for flag, value in (("--from-steps", args.from_steps), ("--to-steps", args.to_steps),
                        ("--round-steps", args.steps), ("--batch-size", args.batch_size),
                        ("--grad-accum", args.grad_accum)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: use at least 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out '{args.out}' is a file; distill.py writes a folder of rounds there "
                         "(<steps>-steps.pt and <steps>-steps/ each): give a folder")
    if args.resume and os.path.dirname(os.path.abspath(args.resume)) != os.path.abspath(args.out):
        raise ValueError(f"--resume {args.resume}: a distillation continues from its --out folder "
                         f"('{args.out}'); give the same --teacher and --out, and --resume alone")
    settings = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    distill(args.teacher, args.from_steps, args.to_steps, out=args.out, guidance=args.guidance,
            resume=args.resume is not None, overwrite=args.overwrite, settings=settings)


def main(argv=None):
    ddpm.run_command(run, parser().parse_args(argv))


if __name__ == "__main__":
    main()
