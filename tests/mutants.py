"""Plant known bugs, one at a time, and check that the tests catch every one.

  python tests/mutants.py            # all mutants (make mutants), about 45 minutes on 2 cores
  python tests/mutants.py 3 7        # only these

Each mutant edits a line of ddpm.py, the files beside it (schedules.py, sampling.py, pictures.py,
files.py, data.py, checkpoints.py, distributed.py, runlog.py), distill.py, sample_ort.py or
export.py in a temporary copy of the repository, then runs `pytest -m "not diffusers and not
slow" -x` there: the tests that need neither the reference library nor minutes of training, the
mutated file's own test file first. First a control run on an unchanged copy must pass. A mutant
the tests do not catch is a hole in them; the script lists those and exits 1. (Not collected by
pytest: no test_ prefix.)
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, the exact text, its replacement, what the bug is)
MUTANTS = [
    # schedules and the forward process
    ('schedules.py', 'return np.linspace(scale * 1e-4, scale * 0.02, T',
     'return np.linspace(scale * 1e-4, scale * 0.021, T', 'linear beta_T 0.021'),
    ('schedules.py', '        offset = 0.008\n',
     '        offset = 0.08\n', 'cosine offset s 0.08'),
    ('ddpm.py', 'return self.at(self.sqrt_alphas_cumprod, i, x0) * x0',
     'return self.at(np.sqrt(self.alphas), i, x0) * x0', 'q_sample with alpha for alpha-bar'),
    # posterior and reverse process
    ('schedules.py', 'self.posterior_mean_coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)',
     'self.posterior_mean_coef1 = betas * np.sqrt(abar) / (1.0 - abar)', 'posterior mean: abar_t for abar_{t-1}'),
    ('schedules.py', 'self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)',
     'self.posterior_variance = betas * (1.0 - abar) / (1.0 - abar)', 'beta-tilde with abar_t'),
    ('schedules.py', 'self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(self.alphas) / (1.0 - abar)',
     'self.posterior_mean_coef2 = (1.0 - abar_prev) * self.alphas / (1.0 - abar)', 'posterior coefficient of x_t'),
    ('ddpm.py', 'return mean + nonzero * variance.sqrt() * noise, pred_x0',
     'return mean + nonzero * 1.5 * variance.sqrt() * noise, pred_x0', 'p_sample sigma x 1.5'),
    ('ddpm.py', 'return mean + nonzero * variance.sqrt() * noise, pred_x0',
     'return mean + variance.sqrt() * noise, pred_x0', 'noise on the last step'),
    ('ddpm.py', 'if self.var_type == "fixed_large":',
     'if self.var_type != "fixed_large":', 'variance types swapped'),
    ('ddpm.py', 'pred_x0 + self.at(eps_coef, i, x_t) * eps',
     'pred_x0 + 0.9 * self.at(eps_coef, i, x_t) * eps', 'DDIM eps term x 0.9'),
    ('schedules.py', 'self._ddim[eta] = (sigma, np.sqrt(1 - abar_prev - sigma ** 2))',
     'self._ddim[eta] = (sigma, np.sqrt(1 - abar_prev))', 'DDIM without sigma^2 in the eps term'),
    ('schedules.py', 'sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))',
     'sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar))', 'DDIM sigma without its last factor'),
    ('ddpm.py', '            eps = self.predict_eps_from_x0(x_t, i, pred_x0)\n',
     '            pass\n', 'DDIM keeps the eps of the unclipped x_0'),
    ('ddpm.py', 'return x0.clamp(-1, 1) if (self.clip_x0 if clip is None else clip) else x0',
     'return x0.clamp(-1, 0.9) if (self.clip_x0 if clip is None else clip) else x0', 'clip range'),
    ('schedules.py', 'return 1.0 - abar / np.append(1.0, abar[:-1]), self.timesteps[kept]',
     'return 1.0 - abar, self.timesteps[kept]', 'respaced betas'),
    ('ddpm.py', 'return self._table(self.timesteps, device, torch.long)[i.to(device)]',
     'return i.to(device)', 'network fed the chain index, not the original t'),
    ('schedules.py', '        return np.arange(num_steps) * (T // num_steps)\n',
     '        return np.arange(num_steps) * (T // num_steps) + 1\n', 'DDIM timesteps shifted by one'),
    ('ddpm.py', 'indices = range(self.num_timesteps - 1, -1, -1)',
     'indices = range(self.num_timesteps - 1, 0, -1)', 'the last reverse step skipped'),
    ('sampling.py', 'if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):',
     'if eta < 0 or eta > 1:', 'eta nan accepted'),
    # U-Net
    ('ddpm.py', 'return torch.cat([torch.sin(args), torch.cos(args)], dim=1)',
     'return torch.cat([torch.cos(args), torch.sin(args)], dim=1)', 'time embedding [cos, sin]'),
    ('ddpm.py', '                      / (half - 1))',
     '                      / half)', 'time embedding frequencies'),
    ('ddpm.py', 'return self.conv(F.pad(x, (0, 1, 0, 1)))',
     'return self.conv(F.pad(x, (1, 0, 1, 0)))', 'downsample pads left/top'),
    ('ddpm.py', 'h = h + self.temb_proj(F.silu(temb))[:, :, None, None]',
     'h = h + self.temb_proj(temb)[:, :, None, None]', 'no SiLU before temb_proj'),
    ('ddpm.py', 'h = F.scaled_dot_product_attention(q, k, v)',
     'h = F.scaled_dot_product_attention(q, k, v, scale=1.0)', 'attention without 1/sqrt(C)'),
    ('ddpm.py', 'h = self.run_block(block, torch.cat([h, hs.pop()], dim=1), temb)',
     'h = self.run_block(block, torch.cat([hs.pop(), h], dim=1), temb)', 'skip concatenated first'),
    ('ddpm.py', 'return self.conv_out(F.silu(self.norm_out(h)))',
     'return self.conv_out(self.norm_out(h))', 'no SiLU before conv_out'),
    # losses
    ('ddpm.py', 'loss = F.mse_loss(out, noise.float())',
     'loss = F.mse_loss(out, x0.float())', 'L_simple against x_0'),
    ('ddpm.py', '"v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}',
     '"v": abar.sqrt() * noise + (1 - abar).sqrt() * x0}', 'v target with the wrong sign'),
    ('ddpm.py', '"v": clipped / (snr + 1)',
     '"v": clipped / snr', 'min-SNR weight of v as of eps'),
    ('ddpm.py', '            return self.at(self.sqrt_one_minus_alphas_cumprod, i, x_t) * x_t + \\\n                self.at(self.sqrt_alphas_cumprod, i, x_t) * out\n',
     '            return self.at(self.sqrt_alphas_cumprod, i, x_t) * x_t + \\\n                self.at(self.sqrt_one_minus_alphas_cumprod, i, x_t) * out\n', 'eps from v with the coefficients swapped'),
    ('schedules.py', '        return np.sort(np.round(np.arange(T, 0, -T / num_steps)).astype(int) - 1)',
     '        return np.sort(np.round(np.arange(T - 1, 0, -T / num_steps)).astype(int) - 1)', 'trailing starts at T-2'),
    # training
    ('ddpm.py', 'list(model.parameters()), 1 - decay)',
     'list(model.parameters()), decay)', 'EMA weights swapped'),
    ('ddpm.py', 'return cfg.lr * (step + 1) / cfg.warmup',
     'return cfg.lr * step / cfg.warmup', 'warm-up starts at 0'),
    ('ddpm.py', 'max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")',
     'max_norm = cfg.grad_clip', '--grad-clip 0 zeroes the gradients'),
    ('ddpm.py', 'return int(np.random.SeedSequence([seed, step, micro])',
     'return int(np.random.SeedSequence([seed, micro])', 'the same t and eps at every step'),
    ('checkpoints.py', '            raise KeyboardInterrupt\n        self.signal = signum',
     '            raise KeyboardInterrupt\n        raise KeyboardInterrupt', 'a signal stops mid-step'),
    ('checkpoints.py', '        if part in state and not all(',
     '        if False and not all(', 'non-finite weights saved'),
    ('ddpm.py', '        raise Diverged(f"the weights after step {step} give a loss of {check.item()}")',
     '        pass', 'diverged weights saved'),
    ('files.py', '\n            os.remove(os.path.join(folder, f))',
     '\n            pass', 'stale temp files kept'),
    ('ddpm.py', 'if stop_asked or step == cfg.steps or (cfg.save_every',
     'if step == cfg.steps or (cfg.save_every', 'a signal does not save'),
    ('runlog.py', '"img_per_s": self.images / max(clock() - self.since - self.paused_s, 1e-9)',
     '"img_per_s": self.images / max(clock() - self.since, 1e-9)', 'img/s counts sampling and saving'),
    ('ddpm.py', 'loss, stop_asked = distributed.agree(loss_sum, stop and stop.signal, self.world)',
     'loss, stop_asked = distributed.agree(loss_sum, None, self.world)', 'a signal is never seen by the loop'),
    # data and pictures
    ('pictures.py', 'return np.round((x + 1) * 127.5).astype(np.uint8)',
     'return np.round((x + 1) * 127).astype(np.uint8)', 'to_uint8 scale'),
    ('data.py', '    return x / 127.5 - 1.0\n',
     '    return x / 255.0\n', 'data in [0, 1]'),
    ('data.py', '            arr = arr / 257.0',
     '            arr = arr / 256.0', '16-bit scale'),
    # the step tables (schedules.chain_coefficients) and sample_ort.py
    ('schedules.py', 'std = np.sqrt(chain.betas if var_type == "fixed_large" else chain.posterior_variance)',
     'std = np.sqrt(chain.betas)', 'ORT fixed_small uses beta_t'),
    ('schedules.py', 's = zeros.copy() if var_type == "learned_range" else np.append(0.0, std[1:])',
     's = zeros.copy() if var_type == "learned_range" else std', 'ORT noise on the last step'),
    ('schedules.py', 'columns = [a, b, w * (1 + r), chain.dpm_sigma_ratio, -w * r]',
     'columns = [a, b, w * (1 + r), chain.dpm_sigma_ratio, w * r]', 'ORT DPM-Solver++ table: c4 with the wrong sign'),
    ('schedules.py', 'columns += [g, chain.posterior_log_variance_clipped, chain.log_betas]',
     'columns += [g, chain.log_betas, chain.posterior_log_variance_clipped]', 'ORT learned variance bounds swapped'),
    ('sample_ort.py', 'self.t.update_inplace(np.full(N, t, dtype=np.int64))',
     'self.t.update_inplace(np.full(N, timesteps[0], dtype=np.int64))', 'ORT network always fed the first t'),
    ('sample_ort.py', 'self.noise.update_inplace(np.ascontiguousarray(noise_fn(k, shape)',
     'self.noise.update_inplace(np.ascontiguousarray(noise_fn(0, shape)', 'ORT reuses the first noise'),
    ('sample_ort.py', '"clip_x0": meta["ddpm.clip_x0"] == "true"',
     '"clip_x0": meta["ddpm.clip_x0"] != "true"', 'ORT clip flag inverted'),
    ('sample_ort.py', 'pred_x0 = coef[0] * x_t - coef[1] * eps[:B]',
     'pred_x0 = coef[0] * x_t + coef[1] * eps[:B]', 'format-1 pictures: x_0 with the wrong sign'),
    # export.py's update graphs and metadata
    ('export.py', '(("lo", -1.0), ("hi", 1.0))',
     '(("lo", -1.0), ("hi", 2.0))', 'update graphs clip at 2'),
    ('export.py', 'oh.make_node("Div", ["a_x_minus_x0", "b"], ["eps_used"])',
     'oh.make_node("Mul", ["a_x_minus_x0", "b"], ["eps_used"])', "step graph eps' multiplied by b"),
    ('export.py', 'oh.make_node("Mul", ["c2", x], ["t2"])',
     'oh.make_node("Mul", ["c2", "pred_x0"], ["t2"])', 'step graph c2 times x_0'),
    ('export.py', 'oh.make_node("Mul", ["c3", "eps_used"], ["t3"])',
     'oh.make_node("Mul", ["c3", "eps"], ["t3"])', 'step graph uses the unclipped eps'),
    ('export.py', '"ddpm.clip_x0": "true" if cfg.clip_x0 else "false"',
     '"ddpm.clip_x0": "true"', 'metadata always says clip'),
    ('export.py', '"ddpm.betas": json.dumps(betas.tolist())',
     '"ddpm.betas": json.dumps(betas.astype(np.float32).tolist())', 'metadata betas rounded to float32'),
    ('export.py', 'oh.make_node("Mul", ["log_var", "half"], ["log_std"])',
     'oh.make_node("Identity", ["log_var"], ["log_std"])', 'step graph: learned variance as std'),
    # the variational bound and learned variances
    ('ddpm.py', 'cdf_plus = standard_normal_cdf(inv_std * (x0 - mean + 1.0 / 255))',
     'cdf_plus = standard_normal_cdf(inv_std * (x0 - mean + 2.0 / 255))', 'decoder bin twice as wide above'),
    ('schedules.py', 'self.fixed_large_log_variance = np.log(np.append(first, betas[1:]))',
     'self.fixed_large_log_variance = np.log(betas)', 'fixed_large decoder variance beta_1, not beta-tilde_1'),
    ('ddpm.py', '    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)',
     '    return 0.5 * (-1.0 + log_var1 - log_var2 + torch.exp(log_var1 - log_var2)', 'KL log-variances swapped'),
    ('ddpm.py', 'self.x0_from_output(x_t, i, out.detach())',
     'self.x0_from_output(x_t, i, out)', 'L_hybrid without the stop-gradient'),
    ('ddpm.py', '            w = (var_v + 1) / 2\n',
     '            w = (1 - var_v) / 2\n', 'learned variance interpolates backwards'),
    ('ddpm.py', '        return terms.sum(dim=1) + prior, prior, terms',
     '        return terms.sum(dim=1), prior, terms', 'bound without L_T'),
    # conditional generation
    ('ddpm.py', 'guided = pred_u + self.s * (pred_c - pred_u)',
     'guided = pred_c + self.s * (pred_c - pred_u)', 'guidance around the conditional branch'),
    ('ddpm.py', '(pred_c, var_c), (pred_u, _) = split_output(out_c, x_t.shape[1]), split_output(out_u, x_t.shape[1])',
     '(pred_c, _), (pred_u, var_c) = split_output(out_c, x_t.shape[1]), split_output(out_u, x_t.shape[1])', 'guided learned variance from the unconditional branch'),
    ('ddpm.py', '                y = torch.full_like(t, self.num_classes)',
     '                y = torch.zeros_like(t)', "'no label' is class 0"),
    ('ddpm.py', '            dropped = torch.rand(y.shape[0]) < cfg.p_uncond',
     '            dropped = torch.rand(y.shape[0]) < 0', 'labels never dropped in training'),
    ('ddpm.py', 'eps = eps - self.at(self.sqrt_one_minus_alphas_cumprod, i, x_t) * classifier_grad(x_t, t)',
     'eps = eps - self.at(self.sqrt_alphas_cumprod, i, x_t) * classifier_grad(x_t, t)', 'classifier guidance scaled by sqrt(abar)'),
    ('export.py', 'nodes += [oh.make_node("Sub", ["eps_c", "eps_u"], ["eps_diff"]),',
     'nodes += [oh.make_node("Sub", ["eps_u", "eps_c"], ["eps_diff"]),', 'ORT guidance away from the class'),
    ('sample_ort.py', '        self.y.update_inplace(np.concatenate([labels, null]) if self.guided else labels)',
     '        self.y.update_inplace(np.concatenate([null, labels]) if self.guided else labels)', 'ORT branches in the wrong halves'),
    # several processes
    ('ddpm.py', 'self.micro_batch_loss(self.model, x0, y, step, self.rank * cfg.grad_accum + k)',
     'self.micro_batch_loss(self.model, x0, y, step, k)', "every process draws micro-batch 0's t and eps"),
    ('data.py', 'self.part = slice(rank * batch_size // world, (rank + 1) * batch_size // world)',
     'self.part = slice(0, batch_size // world)', 'every process trains on the first part of the batch'),
    ('distributed.py', '    return total / world, stops > 0',
     '    return total / world, stop_signal is not None', 'a stop is not agreed between the processes'),
    ('ddpm.py', '            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)',
     '            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False)', 'grad checkpointing draws new dropout masks'),
    ('checkpoints.py', '        group.update(optimizer.defaults)',
     '        pass', "a resume keeps the old optimizer's settings"),
    # DPM-Solver++ and device noise
    ('schedules.py', 'self.dpm_half_ratio[1:-1] = h[:-1] / (2 * h[1:])',
     'self.dpm_half_ratio[1:-1] = h[1:] / (2 * h[:-1])', "DPM-Solver++'s step-size ratio inverted"),
    ('ddpm.py', '* (pred_x0 - prev_x0)',
     '* (prev_x0 - pred_x0)', "DPM-Solver++'s correction with the wrong sign"),
    ('export.py', 'oh.make_node("Mul", ["c4", "prev_x0"], ["t4"])',
     'oh.make_node("Mul", ["c4", "pred_x0"], ["t4"])', 'the multistep graph ignores its state'),
    ('sample_ort.py', 'j = k % len(self.step_bindings)',
     'j = 0', "DPM-Solver++'s state buffers never swap"),
    ('sample_ort.py', '    ort.set_seed(seed)',
     '    ort.set_seed(0)', 'device noise ignores the seed'),
    # files from before the redesign (issue 23)
    ('config.py', 'RENAMED_FIELDS = {"model": "preset", "out": "run_dir"}',
     'RENAMED_FIELDS = {}', "old checkpoints' config names ignored"),
    # progressive distillation (distill.py)
    ('distill.py', 'for k in (2 * i + 1, 2 * i):',
     'for k in (2 * i, 2 * i - 1):', "distillation target: the teacher's steps one index early"),
    ('distill.py', 'sqrt_abar, sqrt_1m_abar = self.at(self.sqrt_alphas_cumprod, i, z), self.at(self.sqrt_one_minus_alphas_cumprod, i, z)',
     'sqrt_abar, sqrt_1m_abar = chain.at(chain.sqrt_alphas_cumprod, i, z), chain.at(chain.sqrt_one_minus_alphas_cumprod, i, z)', "distillation target: the teacher's abar at the student's index"),
    ('distill.py', 'ratio = self.at(self.sqrt_one_minus_alphas_cumprod_prev, i, z) / sqrt_1m_abar',
     'ratio = sqrt_1m_abar / self.at(self.sqrt_one_minus_alphas_cumprod_prev, i, z)', 'distillation target: the sigma ratio inverted'),
    ('distill.py', 'network, chain, z = self.teacher_network(y, z_t.device), self.teacher_chain, z_t',
     'network, chain, z = self.teacher_network(y, z_t.device), self, z_t', "the teacher stepped on the student's chain"),
    ('distill.py', 'return (abar / (1 - abar)).clamp(min=1.0)',
     'return (abar / (1 - abar)).clamp(max=1.0)', 'distillation weight min(SNR, 1)'),
    ('distill.py', 'return (abar / (1 - abar)).clamp(min=1.0)',
     'return abar / (1 - abar) + 1', 'distillation weight SNR + 1'),
    ('ddpm.py', '            return self.at(self.sqrt_alphas_cumprod, i, x_t) * x_t - \\\n                self.at(self.sqrt_one_minus_alphas_cumprod, i, x_t) * out\n',
     '            return self.at(self.sqrt_alphas_cumprod, i, x_t) * x_t + \\\n                self.at(self.sqrt_one_minus_alphas_cumprod, i, x_t) * out\n', 'x_0 from v with a wrong sign'),
    ('distill.py', 'guidance if built_in == 1 else 1.0)',
     'guidance)', "a guided student's guidance applied again when it teaches"),
    ('sampling.py', '    return Sampler("ddim", steps, 0.0, "trailing")',
     '    return Sampler("ddim", steps, 0.0, "leading")', 'a student sampled on the leading grid'),
    # the code consolidated by the restructure (issue 33): the output split, x_0 and eps from the
    # network's output, the samplers' loop and noise, guidance
    ('ddpm.py', 'return out[:, :channels], (out[:, channels:] if out.shape[1] > channels else None)',
     'return out[:, :channels], (out[:, :channels] if out.shape[1] > channels else None)', "the learned variance read from the prediction's channels"),
    ('ddpm.py', '        return (x_t - self.at(self.sqrt_alphas_cumprod, i, x_t) * out) / \\\n',
     '        return (x_t - self.at(self.sqrt_one_minus_alphas_cumprod, i, x_t) * out) / \\\n', 'eps from an x_0 output with sqrt(1 - abar) for sqrt(abar)'),
    ('ddpm.py', 'x_prev, pred_x0 = self.dpm_solver_step(x, i, x0, pred_x0)',
     'x_prev, pred_x0 = self.dpm_solver_step(x, i, x0, x0)', "DPM-Solver++ never sees the previous step's x_0"),
    ('ddpm.py', 'return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)',
     'return torch.randn(shape, device=self.device, dtype=self.dtype)', 'the sampling noise ignores its generator (the seed)'),
    ('ddpm.py', '            return eps, self.x0_from_output(x_t, i, out), var_v\n',
     '            return eps, self.predict_x0_from_eps(x_t, i, eps), var_v\n', 'the samplers take x_0 from v through eps'),
    ('ddpm.py', '        if getattr(model, "num_classes", 0):\n            model = ClassifierFreeGuidance(model, self.y, self.scale)',
     '        if getattr(model, "num_classes", 0):\n            model = ClassifierFreeGuidance(model, self.y, 1.0)', "classifier-free guidance's scale ignored"),
]

COMMAND = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not diffusers and not slow",
           "tests/test_tables.py", "tests/test_core.py", "tests/test_onnx.py", "tests/test_legacy.py",
           "tests/test_convert.py", "tests/test_train.py", "tests/test_bound.py", "tests/test_guidance.py",
           "tests/test_ddp.py", "tests/test_distill.py"]


def command_for(path):
    """COMMAND with the mutated file's own test file (tests/test_<name>.py) first, where there is one."""
    own = f"tests/test_{os.path.splitext(path)[0]}.py"
    files = [a for a in COMMAND if a.startswith("tests/")]
    if own not in files:
        return COMMAND
    return COMMAND[:-len(files)] + [own] + [f for f in files if f != own]


def copy_repository(tmp):
    """The top-level .py files (ddpm.py and the files beside it), tests/ and pyproject.toml."""
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("tests", "pyproject.toml"):
            src = os.path.join(ROOT, name)
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(tmp, name))


def control():
    """The same tests on an unchanged copy must pass: a copy that fails for another reason (a file
    not copied, a broken import) would count every mutant as caught."""
    with tempfile.TemporaryDirectory() as tmp:
        copy_repository(tmp)
        t0 = time.time()
        r = subprocess.run(COMMAND, cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit("control run (no mutant) failed, so no mutant result would mean anything:\n"
                             + r.stdout[-3000:] + r.stderr[-2000:])
        print(f"control: no mutant, {r.stdout.strip().splitlines()[-1]} ({time.time() - t0:.0f}s)", flush=True)


def main(argv):
    chosen = [int(a) for a in argv] or range(len(MUTANTS))
    for n in chosen:  # every mutant's text before any run: a stale one fails in seconds
        path, old, _, what = MUTANTS[n]
        count = open(os.path.join(ROOT, path)).read().count(old)
        if count != 1:
            raise SystemExit(f"mutant {n} ({what}): the text to replace occurs {count} times in {path}")
    control()
    missed = []
    for n in chosen:
        path, old, new, what = MUTANTS[n]
        with tempfile.TemporaryDirectory() as tmp:
            copy_repository(tmp)
            text = open(os.path.join(tmp, path)).read()
            if text.count(old) != 1:
                raise SystemExit(f"mutant {n} ({what}): the text to replace occurs {text.count(old)} times in {path}")
            with open(os.path.join(tmp, path), "w") as f:
                f.write(text.replace(old, new))
            t0 = time.time()
            r = subprocess.run(command_for(path), cwd=tmp, capture_output=True, text=True)
            failed = [line.split(" - ")[0] for line in r.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
            caught = r.returncode != 0 and failed
            print(f"{n:2d} {'caught' if caught else 'MISSED'} in {time.time() - t0:4.0f}s  {path}: {what}"
                  + (f"  <- {failed[0].split('::', 1)[-1]}" if caught else ""), flush=True)
            if not caught:
                missed.append(what)
    print(f"\n{len(chosen) - len(missed)} of {len(chosen)} planted bugs caught by "
          f"pytest -m 'not diffusers and not slow'" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
