"""Several processes with torchrun (gloo on this CPU): the world size does not change the math
(2 processes == 1 process with 2 micro-batches, to float tolerance), a SIGTERM stops every process
after the same step with one save and the job resumes exactly, in training and in a distillation
round alike, and a process that fails stops the job with its message. Also the single-process pieces of scaling out: --grad-checkpoint,
--optimizer adamw, --batch-size auto's search, TensorBoard events."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import distill
import distributed
import ddpm
from conftest import ROOT, max_difference, refusal

# 16x16 tiny with dropout, flips and class labels (dropped at p_uncond): every per-micro-batch draw
# the issue names is exercised. Global batch 8.
FLAGS = ["--data", "shapes", "--model", "tiny", "--image-size", "16", "--dropout", "0.1", "--cond",
         "--batch-size", "8", "--warmup", "2", "--ema-decay", "0.9", "--sample-every", "0",
         "--save-every", "1000", "--log-every", "1", "--num-workers", "0", "--no-tensorboard"]
STEPS = 12
# torchrun gives each process 1 thread; the 1-process reference runs on 1 thread too, so its
# kernels sum in the same order and only DDP's all-reduce could differ. (Across thread counts the
# kernels' float32 sums differ in the last bits, and Adam turns that noise into whole steps of
# lr on the parameters whose true gradient is 0: biases before a GroupNorm of one channel per
# group, as in `tiny`. Measured: 1.5e-4 at 2 threads against 1.)
TOLERANCE = 1e-6


def launch(script, *args, cwd, popen=False):
    """torchrun --standalone --nproc-per-node 2 script args, in cwd, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def torchrun(tmp_path, name, *args, popen=False):
    """ddpm.py train FLAGS args on 2 processes, into tmp_path/name and tmp_path/name.pt."""
    return launch(os.path.join(ROOT, "ddpm.py"), "train", *FLAGS, "--out", tmp_path / name,
                  "--ckpt", tmp_path / f"{name}.pt", *args, cwd=tmp_path, popen=popen)


def single_process(tmp_path, name, *args, threads=None):
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        ddpm.main(["train", *FLAGS, "--out", str(tmp_path / name), "--ckpt",
                   str(tmp_path / f"{name}.pt"), *map(str, args)])
    finally:
        torch.set_num_threads(before)
    return torch.load(tmp_path / f"{name}.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """A straight 2-process run of STEPS steps: its folder and checkpoint."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    r = torchrun(tmp_path, "two", "--steps", STEPS)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path, r, torch.load(tmp_path / "two.pt", weights_only=True)


@pytest.mark.heavy
def test_two_processes_give_the_weights_of_one_with_two_micro_batches(two_processes, tmp_path):
    _, r, two = two_processes
    one = single_process(tmp_path, "one", "--steps", STEPS, "--grad-accum", 2, threads=1)
    other_seed = single_process(tmp_path, "seed1", "--steps", STEPS, "--grad-accum", 2, "--seed", 1)
    worst = max_difference(two, one)
    apart = max_difference(one, other_seed)
    print(f"max |2 processes - 1 process x 2 micro-batches| = {worst:.2e} over weights, EMA and "
          f"Adam after {STEPS} steps (another seed: {apart:.2e})")
    assert two["step"] == one["step"] == STEPS
    assert worst < TOLERANCE < apart
    assert "2 processes" in r.stdout and r.stdout.count("pre-flight ok") == 1  # rank 0 speaks


@pytest.mark.heavy
def test_only_rank_0_writes_the_log(two_processes):
    tmp_path, _, _ = two_processes
    rows = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # each step once, in order
    assert all(row["img_per_s"] > 0 for row in rows)


def process_of_rank(torchrun_pid, rank):
    """The pid of the process torchrun started for `rank` (its environment says RANK=rank)."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environment = f.read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if parent == torchrun_pid and f"RANK={rank}".encode() in environment:
            return int(entry)
    raise AssertionError(f"torchrun {torchrun_pid} has no process of rank {rank}")


def stop_rank_1_and_resume(command, log, ckpt, straight):
    """command(*more, popen=): a straight 2-process run of STEPS steps writing the metrics `log`
    and the checkpoint `ckpt`. SIGTERM to rank 1 once the first step is logged: every process must
    stop after the same step, rank 0 saving it once; the command again with --resume must end on
    exactly the weights of `straight`, the run that was not stopped."""
    p = command(popen=True)
    deadline = time.time() + 120
    while not (log.exists() and log.stat().st_size) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.kill(process_of_rank(p.pid, 1), signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert ckpt.exists(), err[-3000:]
    saved = torch.load(ckpt, weights_only=True)["step"]
    print(f"SIGTERM to rank 1 after step 1 was logged: torchrun exit {p.returncode}, rank 0 saved "
          f"step {saved} of {STEPS}")
    assert 0 < saved < STEPS, err[-3000:]
    assert err.count("SIGTERM: saved step") == 1 and f"saved step {saved} " in err, err[-3000:]
    rows = [json.loads(line)["step"] for line in open(log)]
    assert rows == list(range(1, saved + 1))
    r = command("--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {saved} of {STEPS}" in r.stdout
    resumed = torch.load(ckpt, weights_only=True)
    worst = max_difference(resumed, straight)
    print(f"max |stopped at {saved} and resumed - straight| at step {STEPS} = {worst}")
    assert resumed["step"] == STEPS and worst == 0.0


@pytest.mark.heavy
def test_sigterm_to_one_process_stops_all_saves_once_and_the_job_resumes_exactly(two_processes):
    """The signal reaches rank 1 only (a scheduler that signals one machine). (torchrun passes a
    Ctrl-C or SIGTERM it gets on to every process; this is the harder case.)"""
    tmp_path, _, straight = two_processes
    stop_rank_1_and_resume(lambda *more, popen=False: torchrun(tmp_path, "stopped", "--steps", STEPS, *more, popen=popen),
                           tmp_path / "stopped" / "metrics.jsonl", tmp_path / "stopped.pt", straight)


# -- a distillation round under torchrun: the two-process model above as its teacher ------------------

DISTILL = ["--from-steps", "4", "--to-steps", "2", "--round-steps", STEPS, "--batch-size", "8", "--lr", "5e-4",
           "--log-every", "1", "--save-every", "1000", "--sample-every", "0", "--num-workers", "0"]


def distill_torchrun(tmp_path, name, *args, popen=False):
    """distill.py of tmp_path/two.pt on 2 processes, one round (4 -> 2 steps) into tmp_path/name."""
    return launch(os.path.join(ROOT, "distill.py"), "--teacher", tmp_path / "two.pt", "--out", tmp_path / name,
                  *DISTILL, *args, cwd=tmp_path, popen=popen)


@pytest.fixture(scope="module")
def two_process_student(two_processes):
    tmp_path, _, _ = two_processes
    r = distill_torchrun(tmp_path, "distilled")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path, r, torch.load(tmp_path / "distilled" / "2-steps.pt", weights_only=True)


@pytest.mark.heavy
def test_a_distillation_round_on_two_processes_gives_the_student_of_one_with_two_micro_batches(
        two_process_student, tmp_path):
    teacher_dir, r, two = two_process_student
    students = {}
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process
    try:
        for name, more in (("one", []), ("seed1", ["--seed", "1"])):
            distill.main(["--teacher", str(teacher_dir / "two.pt"), "--out", str(tmp_path / name),
                          *map(str, DISTILL), "--grad-accum", "2", *more])
            students[name] = torch.load(tmp_path / name / "2-steps.pt", weights_only=True)
    finally:
        torch.set_num_threads(before)
    worst, apart = max_difference(two, students["one"]), max_difference(students["one"], students["seed1"])
    print(f"distillation, max |2 processes - 1 process x 2 micro-batches| = {worst:.2e} over weights and "
          f"Adam after {STEPS} steps of a 4 -> 2 round (another seed: {apart:.2e})")
    assert two["step"] == students["one"]["step"] == STEPS and two["config"]["distilled_steps"] == 2
    assert worst <= 1e-5 < apart
    assert "2 processes" in r.stdout and r.stdout.count("round 1/1: 4 -> 2 steps") == 1  # rank 0 speaks


@pytest.mark.heavy
def test_sigterm_to_one_process_of_a_distillation_stops_both_and_the_round_resumes_exactly(two_process_student):
    tmp_path, _, straight = two_process_student
    stop_rank_1_and_resume(lambda *more, popen=False: distill_torchrun(tmp_path, "stopped-distill", *more, popen=popen),
                           tmp_path / "stopped-distill" / "2-steps" / "metrics.jsonl",
                           tmp_path / "stopped-distill" / "2-steps.pt", straight)


@pytest.mark.heavy
def test_a_failing_process_stops_the_job_with_its_message(tmp_path):
    """Rank 1 fails at its third step (a stand-in for a bad disk or GPU on one machine)."""
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {ROOT!r})
import ddpm
if os.environ["RANK"] == "1":
    loss = ddpm.GaussianDiffusion.training_loss
    calls = []
    def failing(*args, **kw):
        calls.append(1)
        if len(calls) > 3:  # the pre-flight and two steps
            raise ValueError("the disk of rank 1 is gone")
        return loss(*args, **kw)
    ddpm.GaussianDiffusion.training_loss = failing
ddpm.main()
""")
    t0 = time.time()
    r = launch(script, "train", *FLAGS, "--steps", "50", "--out", tmp_path / "run", "--ckpt", tmp_path / "ckpt.pt",
               cwd=tmp_path)
    print(f"exit {r.returncode} after {time.time() - t0:.1f} s; "
          + " | ".join(line for line in r.stderr.splitlines() if line.startswith("rank ")))
    assert r.returncode != 0
    assert "rank 1: error: the disk of rank 1 is gone" in r.stderr, r.stderr[-3000:]
    assert "rank 0: stopped, because another process of this torchrun job stopped" in r.stderr, \
        r.stderr[-3000:]


# -- single-process pieces ---------------------------------------------------------------------

def test_grad_checkpoint_gives_the_same_gradients_and_recomputes(monkeypatch):
    """Same loss and gradients (dropout replayed), and the blocks really run again in backward."""
    cfg = ddpm.make_config("tiny", image_size=16, dropout=0.3)
    torch.manual_seed(0)
    model = ddpm.UNet(cfg).train()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 200, 500, 999])
    calls = []
    monkeypatch.setattr(ddpm.AttnBlock, "forward",
                        lambda self, h, f=ddpm.AttnBlock.forward: calls.append(1) or f(self, h))
    grads = []
    for checkpointed in (False, True):
        model.grad_checkpoint = checkpointed
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)  # the dropout masks
        out = model(x, t)
        (out ** 2).mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()], len(calls)))
    (out0, g0, calls0), (out1, g1, calls1) = grads
    worst = max((a - b).abs().max().item() for a, b in zip(g0, g1))
    print(f"grad checkpointing: max |gradient difference| {worst:.1e}; attention blocks run "
          f"{calls0} times without, {calls1} with")
    assert torch.equal(out0, out1) and worst < 1e-6
    assert calls1 == 2 * calls0 > 0


@pytest.mark.heavy
def test_adamw_decays_the_weights_apart_from_the_adaptive_step(tmp_path):
    """One step from the same weights and gradients: AdamW's weights are Adam's minus lr wd w_0
    (Loshchilov & Hutter, Algorithm 2, with the schedule multiplier 1)."""
    lr, wd = 1e-3, 0.5
    common = ["--steps", 1, "--warmup", 0, "--lr", lr, "--grad-clip", 0]
    adam = single_process(tmp_path, "adam", *common)
    adamw = single_process(tmp_path, "adamw", *common, "--optimizer", "adamw", "--weight-decay", wd)
    torch.manual_seed(0)
    w0 = ddpm.build_model(ddpm.config_from_dict(adam["config"])).state_dict()
    worst = max((adamw["model"][k] - (adam["model"][k] - lr * wd * w0[k])).abs().max().item()
                for k in w0)
    decay = max((adamw["model"][k] - adam["model"][k]).abs().max().item() for k in w0)
    print(f"max |AdamW - (Adam - lr wd w_0)| = {worst:.1e} (float32 rounding of weights up to "
          f"{max(w.abs().max().item() for w in w0.values()):.2f}); the decay itself moves them {decay:.1e}")
    assert worst < 1e-6 < decay / 100
    group = adamw["optimizer"]["param_groups"][0]
    assert group["decoupled_weight_decay"] and group["weight_decay"] == wd


@pytest.mark.heavy
def test_adamw_defaults_to_pytorchs_decay_and_a_resume_takes_the_new_settings(tmp_path, capsys):
    single_process(tmp_path, "run", "--steps", 1)
    state = single_process(tmp_path, "run", "--steps", 2, "--resume", "--optimizer", "adamw")
    group = state["optimizer"]["param_groups"][0]
    assert state["config"]["optimizer"] == "adamw" and state["config"]["weight_decay"] == 0.01
    assert group["decoupled_weight_decay"] and group["weight_decay"] == 0.01
    assert "optimizer was adam in the checkpoint and is adamw now" in capsys.readouterr().out


def test_largest_batch_finds_the_edge_and_auto_splits_the_batch():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 100
    assert distributed.largest_batch(fits, limit=10_000) == 100
    assert len(tried) <= 16  # doubling to 128, then bisecting
    assert distributed.largest_batch(lambda b: b <= 100, limit=40) == 40  # no more than the data
    assert distributed.largest_batch(lambda b: False, limit=40) == 0
    assert distributed.split_batch(0, 2, 24, world=2) == (96, 2)  # 24 per micro-batch, 2 x 2 of them
    assert distributed.split_batch(512, 0, 100, world=2) == (512, 4)  # 256 per process: 4 x 64
    assert distributed.split_batch(512, 0, 256, world=2) == (512, 1)
    with pytest.raises(ValueError, match="not even one image"):
        distributed.split_batch(512, 0, 0, world=1)


@pytest.mark.parametrize("argv, fragment", [
    (["--batch-size", "auto"], "need CUDA"),
    (["--grad-accum", "auto"], "need CUDA"),
    (["--batch-size", "auto", "--grad-accum", "auto"], "only one of them can be auto"),
    (["--batch-size", "lots"], "neither a whole number nor auto"),
    (["--optimizer", "sgd"], "invalid choice"),
    (["--weight-decay", "-1"], "--weight-decay -1.0 must be at least 0"),
])
def test_scaling_mistakes_are_sentences(tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    refusal(ddpm.main, ["train", "--model", "tiny", "--image-size", "16", "--steps", "1",
                        "--device", "cpu", *argv], fragment)


def next_second():
    """TensorBoard reads a folder's event files in the order of their names: the second they were
    opened, the host, the process and a per-process counter compared as text (".10" before ".9"),
    so two runs of one process within a second can be read in the wrong order (xdist workers run
    many files in one process). A user's runs are seconds apart; these are made to be."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


@pytest.mark.heavy
def test_tensorboard_events_hold_the_logged_numbers_and_the_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    flags = [f for f in FLAGS if f != "--no-tensorboard"]
    ddpm.main(["train", *flags, "--steps", "3", "--sample-every", "3", "--T", "25", "--out",
               str(tmp_path / "run"), "--ckpt", str(tmp_path / "ckpt.pt")])  # one grid, 25 steps
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0}).Reload()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    for name in ("loss", "lr", "grad_norm", "img_per_s"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
        assert logged == [(row["step"], pytest.approx(row[name], rel=1e-6)) for row in rows]
    grids = events.Images("samples")
    print(f"TensorBoard: {len(rows)} steps of 4 scalars, grids at steps {[g.step for g in grids]} "
          f"({grids[0].width}x{grids[0].height})")
    assert [g.step for g in grids] == [3] and grids[0].width == grids[0].height == 8 * 18 + 2
    # a new run in the same folder (--overwrite) hides the old run's points, as metrics.jsonl drops them
    next_second()
    ddpm.main(["train", *flags, "--steps", "2", "--seed", "1", "--overwrite", "--out",
               str(tmp_path / "run"), "--ckpt", str(tmp_path / "ckpt.pt")])
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == \
        [(row["step"], row["loss"]) for row in rows] and len(rows) == 2
    # resuming from an older checkpoint (step 2) of a run logged to step 3 drops the points after 2

    shutil.copy(tmp_path / "ckpt.pt", tmp_path / "at2.pt")
    next_second()
    ddpm.main(["train", "--resume", "--steps", "3", "--ckpt", str(tmp_path / "ckpt.pt")])
    next_second()
    ddpm.main(["train", "--resume", "--steps", "3", "--lr", "1e-3", "--ckpt", str(tmp_path / "at2.pt")])
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [row["lr"] for row in rows] == [pytest.approx(v) for v in (2e-4 / 2, 2e-4, 1e-3)]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/lr")] == \
        [(row["step"], row["lr"]) for row in rows]
