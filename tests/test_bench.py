"""The benchmark harness itself (tiny model, a few steps) so it cannot rot. Numbers from this
run mean nothing; real numbers come from `make bench`. The peak is checked all the same: it is
measured on the model's own convolutions, so no row may be above 100% of it, and the model's
largest convolution layer alone must run at it (a peak timed on another kernel, as the n=2048
matmul that read 167% was, or FLOPs counted another way, fails that)."""
import copy
import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import checkpoints
import ddpm
from bench import bench
from conftest import run_script


@pytest.mark.slow  # half a minute: make test runs it, make test-fast leaves it out
@pytest.mark.diffusers  # the benchmark's peer is diffusers' UNet2DModel
def test_bench_quick_prints_table_and_writes_json(tmp_path):
    r = run_script("bench/bench.py", "--quick", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    names = [line.split("|")[2].strip() for line in table[1:]]
    print(r.stdout)
    for expected in ("PyTorch eager fp32", "ORT CPU fp32, IO binding", "diffusers eager fp32", "ours fp32",
                     "diffusers fp32"):
        assert expected in names, names
    result = json.load(open(tmp_path / "quick.json"))
    assert len(result["rows"]) == len(names) and result["forward_gflops"] > 0
    for peak in result["conv_peaks"]:
        assert peak["tflops"] > 0 and "conv" in peak["reached_by"], peak
    for row in result["rows"]:
        # each row's memory is its own worker's
        assert row["rate"] > 0 and row["process_peak_mb"] > 0 and row["peak_mem_mb"] >= 0, row
        if row["precision"] == "int8":  # no FLOP peak
            assert row["peak_tflops"] is None and row["utilization"] is None, row
        else:  # written so that NaN fails too
            assert 0 < row["utilization"] <= 1.0, (
                f"{row['contender']}: {100 * row['utilization']:.0f}% of the peak, "
                f"{row['tflops']:.4f} of {row['peak_tflops']:.4f} TFLOP/s")


@pytest.mark.heavy
def test_peak_is_what_the_models_largest_convolution_reaches():
    """The model's Conv2d layer with the most FLOPs, called as the model calls it (NCHW, or
    channels-last: the peak takes the better) and counted by the flop counter on that call, runs
    at the peak measured on its shape, within the noise of timing. A peak timed on another kernel
    (the n=2048 matmul that read 167%) or with FLOPs counted another way (MACs, per image) falls
    outside, and so does a peak that leaves out the model's largest shape."""
    cfg = ddpm.make_config("tiny")
    model = ddpm.UNet(cfg).eval()
    batch = 8
    inputs = {}  # Conv2d -> the input it got in one forward

    def record(layer, args, output):  # returns None: a hook's return value would replace the output
        inputs[layer] = args[0]
    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size), torch.zeros(batch, dtype=torch.long))
    for h in hooks:
        h.remove()

    def flops(layer, x):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            layer(x)
        return counter.get_total_flops()
    layer = max(inputs, key=lambda m: flops(m, inputs[m]))
    x = inputs[layer]
    shape = bench.ConvShape(tuple(x.shape), tuple(layer.weight.shape), layer.bias is not None, layer.stride,
                            layer.padding, layer.dilation, layer.groups)
    assert dataclasses.replace(shape, x=(1,) + shape.x[1:]) in bench.dominant_convs(model, cfg)
    layouts = [(layer, x), (copy.deepcopy(layer).to(memory_format=torch.channels_last),
                            x.contiguous(memory_format=torch.channels_last))]
    rate = peak = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two cores that other jobs share time out of step
    try:
        for _ in range(3):  # turn about, so that a disturbed moment cannot favour one of the two
            for conv, conv_x in layouts:
                with torch.no_grad():
                    rate = max(rate, flops(conv, conv_x) / bench.best_seconds(lambda: conv(conv_x), "cpu"))
            found, what = bench.conv_peak([shape], batch, "cpu", "fp32")
            peak = max(peak, found)
    finally:
        torch.set_num_threads(threads)
    print(f"the model's {shape}: {rate / 1e9:.1f} GFLOP/s; peak {peak / 1e9:.1f} GFLOP/s ({what}), 1 thread")
    assert 0.8 <= rate / peak <= 1.25, f"the model's largest convolution runs at {100 * rate / peak:.0f}% of the peak"


@pytest.mark.heavy
def test_solver_error_harness(tmp_path):
    """bench/solver_error.py end to end on a small untrained model (T = 50, unclipped): the table,
    the JSON, the reference at distance 0 from itself in DDIM at T steps, and an fp32 export run
    through ONNX Runtime at distance ~0 from PyTorch with the same sampler."""
    import export
    cfg = ddpm.make_config("tiny", image_size=8, T=50, clip_x0=False, attn_resolutions=())
    torch.manual_seed(0)
    checkpoints.save_checkpoint(str(tmp_path / "ckpt.pt"), checkpoints.checkpoint_state(cfg, ddpm.UNet(cfg).eval()))
    export.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "m.onnx"))
    r = run_script("bench/solver_error.py", "--ckpt", tmp_path / "ckpt.pt", "--n", 2, "--steps", 5, 50,
                   "--spacings", "leading", "--onnx", tmp_path / "m.onnx", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    print("\n".join(line for line in r.stdout.splitlines() if line.startswith("|")))
    rows = json.load(open(next(tmp_path.glob("solver_error-*.json"))))["rows"]
    by = {(row["runtime"].split(" (")[0], row["sampler"], row["steps"]): row for row in rows}
    assert by["PyTorch fp32", "ddim", 50]["rms"] < 1e-6  # DDIM at T leading steps is the reference
    assert by["PyTorch fp32", "ddim", 5]["rms"] > 1e-3 and by["PyTorch fp32", "dpm++", 5]["rms"] > 1e-4
    # float32 kernels differ; an untrained network amplifies that over 20 steps (measured 1e-4)
    assert by["ORT fp32", "ddim", 20]["rms_vs_pytorch"] < 2e-3 and by["ORT fp32", "dpm++", 20]["rms_vs_pytorch"] < 2e-3
