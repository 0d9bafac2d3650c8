"""Devices, precision, several processes (torchrun) and GPU memory: which device and autocast
dtype a run uses, joining the job, the one agreement per step, and
the search for the largest batch that fits (--batch-size auto / --grad-accum auto).

Every process of a job runs the same program on its share of each batch: with N processes and
K micro-batches each, process r takes micro-batches r K .. r K + K - 1 of the N K, and draws t,
eps, flips and dropout for micro-batch m from the seed of (seed, step, m), as a single process
with N K micro-batches does. DDP averages the gradients over the processes, so the optimizer
step is the same: the world size does not change the math. It never imports ddpm.py.
"""

import os

import torch
import torch.distributed as dist

import messages


def init(device, device_flag="auto"):
    """Under torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK): join the job's process group,
    NCCL with each process on its LOCAL_RANK's GPU, or gloo on CPUs. Returns (rank, world size,
    device); (0, 1, device) without torchrun. device_flag: the --device given, for messages."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device_flag.startswith("cuda:"):
            raise ValueError(f"--device {device_flag}: under torchrun each process uses the GPU "
                             "of its LOCAL_RANK; pass --device cuda (or auto)")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local}, but this machine has {torch.cuda.device_count()} "
                             "GPU(s): start at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def out_of_memory(e):
    """A sentence if e says that memory ran out (MemoryError, torch's allocator, CUDA), else None."""
    text = str(e)
    if isinstance(e, MemoryError) or isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text \
            or "not enough memory" in text:
        return ("out of memory: the sizes asked for do not fit (a smaller --n, --batch, --batch-size "
                f"or --image-size will) ({type(e).__name__}: {text.splitlines()[0][:120] if text else ''})")
    return None


def lost_a_peer(e):
    """Whether a collective failed because another process of the job stopped (NCCL raises a
    DistError; gloo a RuntimeError that says so)."""
    return isinstance(e, dist.DistError) or any(
        text in str(e) for text in ("Connection closed by peer", "Connection reset by peer"))


def agree(loss_sum, stop_signal, world):
    """(the mean loss over all processes, whether any process was asked to stop). One all-reduce
    per step, so all stop after the same step: torchrun passes Ctrl-C and SIGTERM on to each
    process, and they do not arrive at the same moment."""
    both = torch.stack([loss_sum.float(), torch.ones((), device=loss_sum.device) * (stop_signal is not None)])
    if world > 1:
        dist.all_reduce(both)
    total, stops = both.tolist()
    return total / world, stops > 0


def largest_batch(fits, limit):
    """The largest b <= limit with fits(b), doubling from 1 until a batch fails, then bisecting
    (fits(b) is False for a batch that runs out of memory); 0 if not even one image fits."""
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class FitsOnGPU:
    """fits(b): whether one micro-batch of b images runs forward and backward in GPU memory
    through loss(model, x0, y, step, micro), with reserve_bytes held back for what training adds
    later (Adam's moments, DDP's buckets)."""

    def __init__(self, loss, model, image_shape, reserve_bytes):
        self.loss, self.model, self.image_shape, self.reserve = loss, model, image_shape, reserve_bytes

    def __call__(self, batch):
        device = next(self.model.parameters()).device
        fits, held, x0 = True, None, None
        try:
            held = torch.empty(self.reserve, dtype=torch.uint8, device=device)
            x0 = torch.zeros((batch, *self.image_shape), device=device).contiguous(memory_format=torch.channels_last)
            self.loss(self.model, x0, torch.zeros(batch, dtype=torch.long), 0, 0).backward()
            torch.cuda.synchronize(device)
        except torch.OutOfMemoryError:
            fits = False
        del held, x0
        self.model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return fits


def split_batch(batch_size, grad_accum, micro_max, world):
    """(batch_size, grad_accum) for --batch-size auto (batch_size 0: micro-batches of micro_max,
    the --grad-accum given) or --grad-accum auto (grad_accum 0: --batch-size kept, the fewest
    micro-batches of at most micro_max)."""
    if micro_max < 1:
        raise ValueError("not even one image fits in GPU memory; try --grad-checkpoint, --amp bf16 "
                         "or a smaller model")
    if batch_size == 0:
        return micro_max * world * grad_accum, grad_accum
    per_process = batch_size // world  # k = per_process (micro-batches of 1) always fits
    return batch_size, min(k for k in range(1, per_process + 1)
                           if per_process % k == 0 and per_process // k <= micro_max)


def check_batch(batch_size, grad_accum, world, n_images):
    """That the batch splits into world processes x grad_accum micro-batches, and the data fills it."""
    if batch_size % (world * grad_accum):
        raise ValueError(f"--batch-size {batch_size} does not split into {world} process(es) x "
                         f"{grad_accum} micro-batch(es); use a multiple of {world * grad_accum}")
    if n_images < batch_size:
        raise ValueError(f"the dataset has {n_images} images, fewer than --batch-size {batch_size}")


def auto_batch(run, n_images):
    """(batch_size, grad_accum) of a run (ddpm.Run) whose config has one of them 0 (auto): the
    largest micro-batch that runs in GPU memory (the smallest GPU of the job decides), less 10%
    for fragmentation."""
    cfg, model = run.cfg, run.raw_model
    reserve = 3 * 4 * sum(p.numel() for p in model.parameters())  # Adam's two moments, DDP's gradient buckets
    fits = FitsOnGPU(run.micro_batch_loss, model, (cfg.in_channels, cfg.image_size, cfg.image_size), reserve)
    micro_max = largest_batch(fits, limit=n_images // run.world)
    if run.world > 1:
        micro_max = torch.tensor(micro_max, device=run.device)
        dist.all_reduce(micro_max, dist.ReduceOp.MIN)
        micro_max = int(micro_max)
    micro_max = max(1, micro_max * 9 // 10) if micro_max else 0
    batch_size, grad_accum = split_batch(cfg.batch_size, cfg.grad_accum, micro_max, run.world)
    messages.say(f"auto: micro-batches of up to {micro_max} images fit (90% of the largest that ran); "
                 f"--batch-size {batch_size} = {run.world} process(es) x {grad_accum} micro-batch(es) x "
                 f"{batch_size // (run.world * grad_accum)} images")
    return batch_size, grad_accum


# ----------------------------------------------------------------------------------------------
# The device and the precision of a run


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but no CUDA GPU is usable here")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX) and torch's kernels may use
    it; elsewhere bf16 autocast is emulated and slower than fp32. ATEN_CPU_CAPABILITY=avx2 holds
    torch's kernels to AVX2, as on a CPU without AVX-512: then it is False as well."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and \
        (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def amp_dtype(amp, device):
    """The autocast dtype training uses, or None for fp32 (nanoGPT's AMP: bf16 by default on
    CUDA, fp16 with a loss scaler; a CPU trains in fp32 unless --amp bf16 finds bf16 units)."""
    if device.type == "cuda":
        return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if amp == "fp16":
        raise ValueError("--amp fp16 needs CUDA (its loss scaler is CUDA's); on a CPU use --amp "
                         "bf16 or none")
    if amp == "bf16" and not cpu_has_bf16():
        messages.warn("--amp bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where it is "
                      "slower than fp32; training in fp32")
        return None
    return torch.bfloat16 if amp == "bf16" else None


def sampling_dtype(amp, device):
    """The autocast dtype of the network in sampling, or None for fp32 (the default, 'none'):
    'auto' is bf16 where it is native (CUDA, or a CPU with AVX512-BF16 or AMX), else fp32. The
    sampler's own arithmetic stays float32 (model_output casts the network's output back)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; on a CPU use --amp bf16, auto or none")
    return amp_dtype(amp, device)
