"""Shared by the test files: the repository root on sys.path, a script runner, the checks that a
user's mistake ends in one sentence, never a traceback, and Gaussian data, whose optimal eps and
reverse process are closed forms (for the PyTorch and the ONNX Runtime samplers alike)."""
import contextlib
import io
import math
import os
import shutil
import subprocess
import sys

# `make test` runs the files on as many pytest-xdist workers as there are cores. Each worker, and
# every process it starts, keeps to its own share of the cores, set here before torch is
# imported: torch's and ONNX Runtime's threads, which spin while they wait, then never share a
# core with another worker's (measured: a training run beside the test suite, each with two
# threads on two cores, trained 20x slower than alone).
WORKER, WORKERS = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKER and WORKERS > 1 and hasattr(os, "sched_setaffinity"):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= WORKERS:
        os.sched_setaffinity(0, cores[int(WORKER.removeprefix("gw")) % WORKERS::WORKERS])

import numpy as np  # noqa: E402 (after the cores are chosen)
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The files that take longest go first, so that `--dist loadfile` never leaves one worker running
# the demo alone at the end while the other waits (measured: 22 minutes instead of 10 with
# test_demo.py scheduled in its alphabetical place). docs/testing.md gives each file's budget.
LONGEST_FIRST = ["test_demo.py", "test_evaluate.py", "test_train.py", "test_ddp.py", "test_onnx.py",
                 "test_core.py", "test_readme.py", "test_web.py", "test_gpu_check.py", "test_legacy.py", "test_bench.py",
                 "test_distill.py", "test_diffusers.py", "test_guidance.py", "test_hostile.py"]


def pytest_collection_modifyitems(items):
    if not WORKER:  # one process (JOBS=1, make mutants' -x runs): the files in their own order
        return
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order kept


def run_script(script, *args, cwd=None, env=None, timeout=600):
    """python ROOT/script args..., output captured."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def run_main(script, *args):
    """run_script's result, from the script's main() called in this process with the same command
    line: the path a user's command takes, without starting Python and importing torch again (a
    second or two on one core). For commands whose test needs no process of their own."""
    import importlib
    main = importlib.import_module(os.path.splitext(script)[0]).main
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def max_difference(a, b):
    """Largest difference between two training checkpoints' weights, EMA weights and Adam moments."""
    pairs = [(a[part][k], b[part][k]) for part in ("model", "ema") for k in a[part]]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    pairs += [(sa[k][m], sb[k][m]) for k in sa for m in ("exp_avg", "exp_avg_sq")]
    return max((x - y).abs().max().item() for x, y in pairs)


def no_space_left(*args, **kwargs):
    """Stands in for any write on a full disk (monkeypatched over a save or a writer)."""
    raise OSError(28, "No space left on device")


class SmallDisk:
    """A tmpfs of `size` bytes mounted at `path` (Linux, as root: CI's case), so that a write runs
    out of space the way it does on a real disk, partway through, under any library."""

    def __init__(self, path, size):
        self.path = path
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI runs as root and must mount a tmpfs: {r.stderr.strip()}")
            pytest.skip(f"mounting a small tmpfs needs root (CI runs as root): {r.stderr.strip()}")

    def fill(self, leave=0):
        """Fill the disk to all but `leave` bytes."""
        with contextlib.suppress(OSError), open(self.path / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        free = shutil.disk_usage(self.path).free
        assert free < 4096, free
        if leave:
            os.truncate(self.path / "filler", os.path.getsize(self.path / "filler") - leave)

    def unmount(self):
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> a SmallDisk at tmp_path/disk-N, unmounted after the test."""
    disks = []

    def make(size):
        disks.append(SmallDisk(tmp_path / f"disk-{len(disks)}", size))
        return disks[-1]
    yield make
    for disk in disks:
        disk.unmount()


def assert_clean_error(r, *fragments):
    """A finished subprocess failed with a message holding every fragment, and no traceback."""
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr, r.stderr
    for fragment in fragments:
        assert fragment in r.stderr, r.stderr
    print(r.stderr.strip().splitlines()[-1])


def refusal(main, argv, *fragments):
    """main(argv) run in this process must exit with a message (argparse's usage error or our
    'error: ...'), not raise anything else; returns the message, which holds every fragment."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    code = exit_info.value.code
    message = code if isinstance(code, str) else err.getvalue()
    assert code not in (0, None), f"{argv} was accepted"
    for fragment in fragments:
        assert fragment in message, f"{argv}: {message!r} lacks {fragment!r}"
    print(f"{' '.join(map(str, argv))[:70]:<70} -> {message.strip().splitlines()[-1][:150]}")
    return message


# -- Gaussian data: a closed-form answer for whole trajectories, needing no reference library --

MU, S = 0.3, 0.5  # data x_0 ~ N(MU, S^2) in every pixel
# (sampler, steps, var_type, eta): full and respaced chains, both variance types, DDIM's eta
SAMPLER_CASES = [("ddpm", 1000, "fixed_large", 0.0, "leading"), ("ddpm", 1000, "fixed_small", 0.0, "leading"),
                 ("ddpm", 100, "fixed_large", 0.0, "leading"), ("ddpm", 100, "fixed_small", 0.0, "trailing"),
                 ("ddim", 50, "fixed_large", 0.0, "leading"), ("ddim", 50, "fixed_large", 1.0, "leading"),
                 ("ddim", 20, "fixed_small", 0.5, "trailing")]


class GaussianOracle(torch.nn.Module):
    """The optimal eps for data N(MU, S^2): x_t ~ N(sqrt(abar) MU, abar S^2 + 1 - abar) and
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar). Fed the original t."""

    def __init__(self, betas):
        super().__init__()
        self.register_buffer("abar", torch.from_numpy(np.cumprod(1 - np.asarray(betas))))

    def forward(self, x_t, t):
        abar = self.abar[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * MU) / (abar * S * S + 1 - abar)


def implied_moments(betas, sampler, steps, var_type, eta, spacing="leading"):
    """Mean and variance of x_0 that the reverse process implies for x_T ~ N(0, 1) and the
    oracle: each step is affine, x_{t-1} = P x_t + Q + sigma z, so m <- P m + Q and
    v <- P^2 v + sigma^2. P and Q from eq. 11 (DDPM) and eq. 12 (DDIM), written out here."""
    T_ = len(betas)
    if sampler == "ddpm" and steps == T_:
        kept = np.arange(T_)
    elif spacing == "leading":  # 0, T/steps, ...
        kept = np.arange(steps) * (T_ // steps)
    else:  # trailing: ..., T - 1 - T/steps, T - 1
        kept = np.array(sorted(round(T_ - k * T_ / steps) - 1 for k in range(steps)))
    abar_all = np.cumprod(1 - np.asarray(betas))
    m, v = 0.0, 1.0
    for k in range(len(kept) - 1, -1, -1):
        abar = abar_all[kept[k]]
        abar_prev = abar_all[kept[k - 1]] if k > 0 else 1.0
        beta = 1 - abar / abar_prev
        A = math.sqrt(1 - abar) / (abar * S * S + 1 - abar)  # eps = A x_t + B
        B = -A * math.sqrt(abar) * MU
        if sampler == "ddpm":  # mu = (x_t - beta / sqrt(1 - abar) eps) / sqrt(alpha)
            c = beta / math.sqrt(1 - abar)
            P, Q = (1 - c * A) / math.sqrt(1 - beta), -c * B / math.sqrt(1 - beta)
            var = beta if var_type == "fixed_large" else beta * (1 - abar_prev) / (1 - abar)
            var = var if k > 0 else 0.0
        else:  # x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z
            sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            c = math.sqrt(1 - abar_prev - sigma ** 2)
            P = math.sqrt(abar_prev) * (1 - math.sqrt(1 - abar) * A) / math.sqrt(abar) + c * A
            Q = -math.sqrt(abar_prev) * math.sqrt(1 - abar) * B / math.sqrt(abar) + c * B
            var = sigma ** 2
        m, v = P * m + Q, P * P * v + var
    return m, v


def probe_inputs(n_steps, shape=(1, 1, 1)):
    """x_T and per-step noise for exact moments of an affine sampler: image 0 gets all zeros (its
    output is the mean), image 1 x_T = 1 (output - mean = x_T's coefficient a), image 2 + k noise 1
    at step k only (coefficient c_k). Then var = a^2 + sum c_k^2: no sampling error."""
    B = n_steps + 2
    x_T = np.zeros((B, *shape))
    x_T[1] = 1.0
    noise = np.zeros((n_steps, B, *shape))
    for k in range(n_steps):
        noise[k, 2 + k] = 1.0
    return x_T, noise


def probe_moments(out):
    """(mean, variance) from the outputs of probe_inputs, per pixel; shape (2, pixels)."""
    out = out.reshape(out.shape[0], -1)
    mean = out[0]
    coefs = out[1:] - mean
    return np.stack([mean, (coefs ** 2).sum(0)])


@pytest.fixture(scope="session")
def judge_cache(tmp_path_factory):
    """The folder where evaluate.py keeps the judge's classifier, one per test run and shared by its
    xdist workers: the first file that needs the judge trains it (about 50 s on one core), the rest
    wait for it and load it."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if WORKER else base) / "judge"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def shapes_judge(judge_cache):
    """evaluate.py's judge of the built-in shapes, shared by the test files that judge samples."""
    import fcntl

    import evaluate
    with open(judge_cache / "lock", "w") as lock:  # one worker trains it, the other waits and loads it
        fcntl.flock(lock, fcntl.LOCK_EX)
        model, accuracy = evaluate.shapes_judge(str(judge_cache))
    print(f"shapes classifier: accuracy {accuracy:.3f} on a fresh draw")
    assert accuracy > 0.95
    return model
