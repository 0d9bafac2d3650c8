"""Plant known bugs, one at a time, and check that the tests catch every one.

  python tests/mutants.py            # all mutants (make mutants), about 45 minutes on 2 cores
  python tests/mutants.py 3 7        # only these

Each mutant edits one line of ddpm.py, sample_ort.py or export.py in a temporary copy of the
repository, then runs `pytest -m "not diffusers and not slow" -x` there: the tests that need
neither the reference library nor minutes of training. A mutant the tests do not catch is a
hole in them; the script lists those and exits 1. (Not collected by pytest: no test_ prefix.)
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
    ("ddpm.py", "return np.linspace(scale * 1e-4, scale * 0.02, T", "return np.linspace(scale * 1e-4, scale * 0.021, T",
     "linear beta_T 0.021"),
    ("ddpm.py", "        s = 0.008\n", "        s = 0.08\n", "cosine offset s 0.08"),
    ("ddpm.py", "return self._at(self.sqrt_alphas_cumprod, i, x0) * x0",
     "return self._at(np.sqrt(self.alphas), i, x0) * x0", "q_sample with alpha for alpha-bar"),
    # posterior and reverse process
    ("ddpm.py", "self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev)",
     "self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod)", "posterior mean: abar_t for abar_{t-1}"),
    ("ddpm.py", "self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev)",
     "self.posterior_variance = betas * (1.0 - self.alphas_cumprod)", "beta-tilde with abar_t"),
    ("ddpm.py", "return mean + nonzero * variance.sqrt() * noise, pred_x0",
     "return mean + nonzero * 1.5 * variance.sqrt() * noise, pred_x0", "p_sample sigma x 1.5"),
    ("ddpm.py", "return mean + nonzero * variance.sqrt() * noise, pred_x0",
     "return mean + variance.sqrt() * noise, pred_x0", "noise on the last step"),
    ("ddpm.py", 'if self.var_type == "fixed_large":', 'if self.var_type != "fixed_large":', "variance types swapped"),
    ("ddpm.py", "x_prev = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - sigma ** 2).sqrt() * eps",
     "x_prev = abar_prev.sqrt() * pred_x0 + 0.9 * (1 - abar_prev - sigma ** 2).sqrt() * eps", "DDIM eps term x 0.9"),
    ("ddpm.py", "x_prev = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - sigma ** 2).sqrt() * eps",
     "x_prev = abar_prev.sqrt() * pred_x0 + (1 - abar_prev).sqrt() * eps", "DDIM without sigma^2 in the eps term"),
    ("ddpm.py", "sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()",
     "sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt()", "DDIM sigma without its last factor"),
    ("ddpm.py", "            eps = self.predict_eps_from_x0(x_t, i, pred_x0)  #",
     "            pass  #", "DDIM keeps the eps of the unclipped x_0"),
    ("ddpm.py", "return pred_x0.clamp(-1, 1) if (self.clip_x0 if clip is None else clip) else pred_x0",
     "return pred_x0.clamp(-1, 0.9) if (self.clip_x0 if clip is None else clip) else pred_x0", "clip range"),
    ("ddpm.py", "betas = 1.0 - abar / np.append(1.0, abar[:-1])", "betas = 1.0 - abar", "respaced betas"),
    ("ddpm.py", "return self._table(self.timesteps, device, torch.long)[i.to(device)]", "return i.to(device)",
     "network fed the chain index, not the original t"),
    ("ddpm.py", "    return np.arange(steps) * (T // steps)\n", "    return np.arange(steps) * (T // steps) + 1\n",
     "DDIM timesteps shifted by one"),
    ("ddpm.py", "indices = range(chain.num_timesteps - 1, -1, -1)", "indices = range(chain.num_timesteps - 1, 0, -1)",
     "the last reverse step skipped"),
    ("ddpm.py", "if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):", "if eta < 0 or eta > 1:",
     "eta nan accepted"),
    # U-Net
    ("ddpm.py", "return torch.cat([torch.sin(args), torch.cos(args)], dim=1)",
     "return torch.cat([torch.cos(args), torch.sin(args)], dim=1)", "time embedding [cos, sin]"),
    ("ddpm.py", "                      / (half - 1))", "                      / half)", "time embedding frequencies"),
    ("ddpm.py", "return self.conv(F.pad(x, (0, 1, 0, 1)))", "return self.conv(F.pad(x, (1, 0, 1, 0)))",
     "Downsample pads left/top"),
    ("ddpm.py", "h = h + self.temb_proj(F.silu(temb))[:, :, None, None]", "h = h + self.temb_proj(temb)[:, :, None, None]",
     "no swish on the time embedding"),
    ("ddpm.py", "h = F.scaled_dot_product_attention(q, k, v)", "h = F.scaled_dot_product_attention(q, k, v, scale=1.0)",
     "attention without C^-1/2"),
    ("ddpm.py", "h = self.run_block(block, torch.cat([h, hs.pop()], dim=1), temb)",
     "h = self.run_block(block, torch.cat([hs.pop(), h], dim=1), temb)",
     "skip concatenated [skip, h]"),
    ("ddpm.py", "return self.conv_out(F.silu(self.norm_out(h)))", "return self.conv_out(self.norm_out(h))",
     "no swish before conv_out"),
    # training
    ("ddpm.py", "return F.mse_loss(out, noise.float())", "return F.mse_loss(out, x0.float())", "L_simple against x_0"),
    ("ddpm.py", '"v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}', '"v": abar.sqrt() * noise + (1 - abar).sqrt() * x0}',
     "v target with +x_0"),
    ("ddpm.py", '"v": clipped / (snr + 1)', '"v": clipped / snr', "min-SNR weight of v as of eps"),
    ("ddpm.py", "        return (1 - abar).sqrt() * x_t + abar.sqrt() * out\n",
     "        return abar.sqrt() * x_t + (1 - abar).sqrt() * out\n", "eps from v with the roots swapped"),
    ("ddpm.py", "        return np.sort(np.round(np.arange(T, 0, -T / steps)).astype(int) - 1)",
     "        return np.sort(np.round(np.arange(T - 1, 0, -T / steps)).astype(int) - 1)", "trailing starts at T-2"),
    ("ddpm.py", "list(model.parameters()), 1 - decay)", "list(model.parameters()), decay)", "EMA weights swapped"),
    ("ddpm.py", "return cfg.lr * (step + 1) / cfg.warmup", "return cfg.lr * step / cfg.warmup", "warm-up starts at 0"),
    ("ddpm.py", "max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float(\"inf\")", "max_norm = cfg.grad_clip",
     "--grad-clip 0 zeroes the gradients"),
    ("ddpm.py", "return int(np.random.SeedSequence([seed, step, micro])", "return int(np.random.SeedSequence([seed, micro])",
     "the same t and eps at every step"),
    ("ddpm.py", "            raise KeyboardInterrupt\n        self.signal = signum",
     "            raise KeyboardInterrupt\n        raise KeyboardInterrupt", "a signal stops mid-step"),
    ("ddpm.py", "        if part in state and not all(", "        if False and not all(", "non-finite weights saved"),
    ("ddpm.py", "            raise Diverged(f\"the weights after step {at_step} give a loss of {check.item()}\")",
     "            pass", "diverged weights saved"),
    ("ddpm.py", "\n            os.remove(os.path.join(folder, f))", "\n            pass", "stale temp files kept"),
    ("ddpm.py", "if stop_asked or step == cfg.steps or (cfg.save_every", "if step == cfg.steps or (cfg.save_every",
     "a signal does not save"),
    ("ddpm.py", "ips = imgs_since / max(t_pause - t_last - paused, 1e-9)", "ips = imgs_since / max(t_pause - t_last, 1e-9)",
     "img/s counts sampling and saving"),
    # data and pictures
    ("ddpm.py", "x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)",
     "x = ((x.float().clamp(-1, 1) + 1) * 127).round().to(torch.uint8)", "to_uint8 scale"),
    ("ddpm.py", "    return x / 127.5 - 1.0\n", "    return x / 255.0\n", "data in [0, 1]"),
    ("ddpm.py", "            arr = arr / 257.0", "            arr = arr / 256.0", "16-bit scale"),
    # sample_ort.py
    ("sample_ort.py", "variance = betas if var_type == \"fixed_large\" else betas * (1.0 - abar_prev) / (1.0 - abar)",
     "variance = betas", "ORT fixed_small uses beta_t"),
    ("sample_ort.py", "        s[0] = 0.0  # no noise on the last step (t = 0)\n", "", "ORT noise on the last step"),
    ("sample_ort.py", "        return np.sort(np.round(np.arange(T, 0, -T / steps)).astype(int) - 1)",
     "        return np.sort(np.round(np.arange(T, 0, -T / steps)).astype(int))", "ORT trailing off by one"),
    ("sample_ort.py", "c3 = np.sqrt(1 - abar_prev - sigma ** 2)", "c3 = np.sqrt(1 - abar_prev)", "ORT DDIM c3 without sigma^2"),
    ("sample_ort.py", "c2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)", "c2 = (1.0 - abar_prev) * alphas / (1.0 - abar)",
     "ORT posterior coefficient c2"),
    ("sample_ort.py", "betas = 1.0 - abar_kept / np.append(1.0, abar_kept[:-1])", "betas = 1.0 - abar_kept",
     "ORT respaced betas"),
    ("sample_ort.py", "self.t.update_inplace(np.full(N, t, dtype=np.int64))",
     "self.t.update_inplace(np.full(N, timesteps[0], dtype=np.int64))", "ORT network always fed the first t"),
    ("sample_ort.py", "self.noise.update_inplace(np.ascontiguousarray(noise_fn(k, shape)",
     "self.noise.update_inplace(np.ascontiguousarray(noise_fn(0, shape)", "ORT reuses the first noise"),
    ("sample_ort.py", "return np.round((x + 1) * 127.5).astype(np.uint8)", "return np.round((x + 1) * 127).astype(np.uint8)",
     "ORT to_uint8 scale"),
    ("sample_ort.py", "\"clip_x0\": meta[\"ddpm.clip_x0\"] == \"true\"", "\"clip_x0\": meta[\"ddpm.clip_x0\"] != \"true\"",
     "ORT clip flag inverted"),
    ("sample_ort.py", "    if not 0 <= eta <= 1:  # also refuses nan", "    if eta < 0 or eta > 1:", "ORT eta nan accepted"),
    # export.py's step graph and metadata
    ("export.py", "[-1.0]),\n                  oh.make_tensor(\"hi\", onnx.TensorProto.FLOAT, [], [1.0])",
     "[-1.0]),\n                  oh.make_tensor(\"hi\", onnx.TensorProto.FLOAT, [], [2.0])", "step graph clips at 2"),
    ("export.py", "oh.make_node(\"Div\", [\"a_x_minus_x0\", \"b\"], [\"eps_used\"])",
     "oh.make_node(\"Mul\", [\"a_x_minus_x0\", \"b\"], [\"eps_used\"])", "step graph eps' multiplied by b"),
    ("export.py", "oh.make_node(\"Mul\", [\"c2\", x], [\"t2\"])", "oh.make_node(\"Mul\", [\"c2\", \"pred_x0\"], [\"t2\"])",
     "step graph c2 times x_0"),
    ("export.py", "oh.make_node(\"Mul\", [\"c3\", \"eps_used\"], [\"t3\"])", "oh.make_node(\"Mul\", [\"c3\", \"eps\"], [\"t3\"])",
     "step graph uses the unclipped eps"),
    ("export.py", "\"ddpm.clip_x0\": \"true\" if cfg.clip_x0 else \"false\"", "\"ddpm.clip_x0\": \"true\"",
     "metadata always says clip"),
    ("export.py", "\"ddpm.betas\": json.dumps(betas.tolist())", "\"ddpm.betas\": json.dumps(betas.astype(np.float32).tolist())",
     "metadata betas rounded to float32"),
    # the variational bound and learned variances (issue 11)
    ("ddpm.py", "cdf_plus = standard_normal_cdf(inv_std * (x0 - mean + 1.0 / 255))",
     "cdf_plus = standard_normal_cdf(inv_std * (x0 - mean + 2.0 / 255))", "decoder bin twice as wide above"),
    ("ddpm.py", "self.fixed_large_log_variance = np.log(np.append(first, betas[1:]))",
     "self.fixed_large_log_variance = np.log(betas)", "fixed_large decoder variance beta_1, not beta-tilde_1"),
    ("ddpm.py", "    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)",
     "    return 0.5 * (-1.0 + log_var1 - log_var2 + torch.exp(log_var1 - log_var2)", "KL log-variances swapped"),
    ("ddpm.py", "eps = eps_from_prediction(self.prediction, x_t, out.detach(),",
     "eps = eps_from_prediction(self.prediction, x_t, out,", "L_hybrid without the stop-gradient"),
    ("ddpm.py", "            w = (var_v + 1) / 2\n", "            w = (1 - var_v) / 2\n", "learned variance interpolates backwards"),
    ("ddpm.py", "        return terms.sum(dim=1) + prior, prior, terms", "        return terms.sum(dim=1), prior, terms",
     "bound without L_T"),
    ("sample_ort.py", "columns += [g, np.log(np.append(first, posterior[1:])), np.log(betas)]",
     "columns += [g, np.log(betas), np.log(np.append(first, posterior[1:]))]", "ORT learned variance bounds swapped"),
    ("export.py", "oh.make_node(\"Mul\", [\"log_var\", \"half\"], [\"log_std\"])",
     "oh.make_node(\"Identity\", [\"log_var\"], [\"log_std\"])", "step graph: learned variance as std"),
    # conditional generation (issue 12)
    ("ddpm.py", "        eps = out_u[:, :C] + s * (out_c[:, :C] - out_u[:, :C])",
     "        eps = out_c[:, :C] + s * (out_c[:, :C] - out_u[:, :C])", "guidance around the conditional branch"),
    ("ddpm.py", "        return torch.cat([eps, out_c[:, C:]], dim=1)", "        return torch.cat([eps, out_u[:, C:]], dim=1)",
     "guided learned variance from the unconditional branch"),
    ("ddpm.py", "                y = torch.full_like(t, self.num_classes)", "                y = torch.zeros_like(t)",
     "'no label' is class 0"),
    ("ddpm.py", "        dropped = torch.rand(y.shape[0]) < cfg.p_uncond", "        dropped = torch.rand(y.shape[0]) < 0",
     "labels never dropped in training"),
    ("ddpm.py", "            eps = eps - self._at(self.sqrt_one_minus_alphas_cumprod, i, x_t) * classifier_grad(x_t, t)",
     "            eps = eps - self._at(self.sqrt_alphas_cumprod, i, x_t) * classifier_grad(x_t, t)",
     "classifier guidance scaled by sqrt(abar)"),
    ("export.py", "        nodes += [oh.make_node(\"Sub\", [eps_c, eps_u], [\"eps_diff\"]),",
     "        nodes += [oh.make_node(\"Sub\", [eps_u, eps_c], [\"eps_diff\"]),", "ORT guidance away from the class"),
    ("sample_ort.py", "        self.y.update_inplace(np.concatenate([labels, null]) if self.guided else labels)",
     "        self.y.update_inplace(np.concatenate([null, labels]) if self.guided else labels)",
     "ORT branches in the wrong halves"),
    # several processes (issue 13)
    ("ddpm.py", "loss = loss_of(model, x0, y, step, rank * cfg.grad_accum + k) / cfg.grad_accum",
     "loss = loss_of(model, x0, y, step, k) / cfg.grad_accum", "every process draws micro-batch 0's t and eps"),
    ("ddpm.py", "self.part = slice(rank * batch_size // world, (rank + 1) * batch_size // world)",
     "self.part = slice(0, batch_size // world)", "every process trains on the first part of the batch"),
    ("ddpm.py", "    return total / world, stops > 0", "    return total / world, signum is not None",
     "a stop is not agreed between the processes"),
    ("ddpm.py", "            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)",
     "            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False)",
     "grad checkpointing draws new dropout masks"),
    ("ddpm.py", "        group.update(optimizer.defaults)", "        pass", "a resume keeps the old optimizer's settings"),
    # DPM-Solver++ and device noise (issue 14)
    ("ddpm.py", "self.dpm_half_ratio[1:-1] = h[:-1] / (2 * h[1:])", "self.dpm_half_ratio[1:-1] = h[1:] / (2 * h[:-1])",
     "DPM-Solver++'s step-size ratio inverted"),
    ("ddpm.py", "* (pred_x0 - prev_x0)", "* (prev_x0 - pred_x0)", "DPM-Solver++'s correction with the wrong sign"),
    ("sample_ort.py", "r[1:-1] = h[:-1] / (2 * h[1:])", "r[1:-1] = h[1:] / (2 * h[:-1])",
     "sample_ort's DPM-Solver++ table with the ratio inverted"),
    ("export.py", 'oh.make_node("Mul", ["c4", "prev_x0"], ["t4"])', 'oh.make_node("Mul", ["c4", "pred_x0"], ["t4"])',
     "the multistep graph ignores its state"),
    ("sample_ort.py", "j = k % len(self.step_bindings)", "j = 0", "DPM-Solver++'s state buffers never swap"),
    ("sample_ort.py", "    ort.set_seed(seed)", "    ort.set_seed(0)", "device noise ignores the seed"),
]

COMMAND = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not diffusers and not slow",
           "tests/test_core.py", "tests/test_onnx.py", "tests/test_convert.py", "tests/test_train.py",
           "tests/test_bound.py", "tests/test_guidance.py", "tests/test_ddp.py"]


def main(argv):
    chosen = [int(a) for a in argv] or range(len(MUTANTS))
    missed = []
    for n in chosen:
        path, old, new, what = MUTANTS[n]
        with tempfile.TemporaryDirectory() as tmp:
            for name in os.listdir(ROOT):
                if name.endswith(".py") or name in ("tests", "pyproject.toml"):
                    src = os.path.join(ROOT, name)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(tmp, name))
            text = open(os.path.join(tmp, path)).read()
            if text.count(old) != 1:
                raise SystemExit(f"mutant {n} ({what}): the text to replace occurs {text.count(old)} times in {path}")
            with open(os.path.join(tmp, path), "w") as f:
                f.write(text.replace(old, new))
            t0 = time.time()
            r = subprocess.run(COMMAND, cwd=tmp, capture_output=True, text=True)
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
