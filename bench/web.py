"""The denoiser in Chromium (onnxruntime-web, WebAssembly with 1 and 2 threads) beside ONNX
Runtime's CPU provider in Python, at batch 8, in one run: the tiny model and the cifar10
preset's U-Net (weights perturbed at random: speed does not depend on them). Issue 35's goal:
WebAssembly at 2 threads >= 0.5x native.

  python bench/web.py                 # make bench-web; writes bench/results/web-<cpu>.json
  python bench/web.py --reps 5 --models tiny

Needs Debian's chromium and chromium-driver and onnxruntime-web (npm ci), as tests/test_web.py.
"""

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ddpm  # noqa: E402
import export  # noqa: E402
import sample_ort  # noqa: E402
from startup import cpu_name  # noqa: E402

MODELS = {"tiny": dict(preset="tiny", image_size=32), "cifar10": dict(preset="cifar10")}


def exported(name, folder):
    settings = dict(MODELS[name])
    cfg = ddpm.make_config(settings.pop("preset"), **settings)
    torch.manual_seed(0)
    model = ddpm.UNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = os.path.join(folder, f"{name}.onnx")
    denoiser = export.Denoiser(model, torch.float32, cfg).eval()
    export.export_module(denoiser, cfg, path, denoiser, check=False)
    return path, cfg


def native_ms(path, cfg, batch, reps, threads):
    options = sample_ort.session_options()
    options.intra_op_num_threads = threads
    session = sample_ort.ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {"x_t": np.random.default_rng(0).standard_normal((batch, 3, cfg.image_size, cfg.image_size), dtype=np.float32),
             "t": np.full(batch, 500, np.int64)}
    session.run(None, feeds)
    start = time.perf_counter()
    for _ in range(reps):
        session.run(None, feeds)
    return 1000 * (time.perf_counter() - start) / reps


def browser_ms(driver, path, batch, reps, threads):
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample_web.py"), "--model", path, "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://\S+/", server.stdout.readline()).group(0)
        driver.get(f"{url}?threads={threads}")
        deadline = time.time() + 300
        while not driver.execute_script("return window.ddpm && window.ddpm.ready()"):
            if time.time() > deadline:
                raise SystemExit(f"the page did not load {path}")
            time.sleep(0.2)
        return driver.execute_async_script("const done = arguments[2];"
                                           "window.ddpm.timeCalls(arguments[0], arguments[1]).then(done)", batch, reps)
    finally:
        server.terminate()
        server.wait(10)


def main():
    p = argparse.ArgumentParser(description="onnxruntime-web in Chromium against native ONNX Runtime.")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="(default: tiny cifar10)")
    p.add_argument("--batch", type=int, default=8, help="images per denoiser call (default: 8)")
    p.add_argument("--reps", type=int, default=10, help="timed calls of each (default: 10)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder of the JSON (default: bench/results)")
    args = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(1200)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models:
                path, cfg = exported(name, tmp)
                row = {"model": name, "batch": args.batch}
                for threads in (1, 2):
                    row[f"native_{threads}t_ms"] = native_ms(path, cfg, args.batch, args.reps, threads)
                    timed = browser_ms(driver, path, args.batch, args.reps, threads)
                    assert timed["threads"] == threads and timed["isolated"], timed
                    row[f"wasm_{threads}t_ms"] = timed["ms"]
                for key in [k for k in row if k.endswith("_ms")]:
                    row[key.replace("_ms", "_img_steps_per_s")] = 1000 * args.batch / row[key]
                row["wasm_2t_vs_native"] = row["native_2t_ms"] / row["wasm_2t_ms"]
                row["wasm_1t_vs_native_1t"] = row["native_1t_ms"] / row["wasm_1t_ms"]
                rows.append(row)
                print(f"{name}, batch {args.batch}: native ONNX Runtime {row['native_1t_ms']:.0f} ms (1 thread), "
                      f"{row['native_2t_ms']:.0f} ms (2); WebAssembly {row['wasm_1t_ms']:.0f} ms (1), "
                      f"{row['wasm_2t_ms']:.0f} ms (2): 2 threads {row['wasm_2t_vs_native']:.2f}x native "
                      f"(goal >= 0.5x), 1 thread {row['wasm_1t_vs_native_1t']:.2f}x", flush=True)
    finally:
        driver.quit()
    cpu = cpu_name()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "web-" + "".join(c if c.isalnum() else "_" for c in cpu)[:40] + ".json")
    with open(path, "w") as f:
        json.dump({"cpu": cpu, "cores": os.cpu_count(), "date": datetime.date.today().isoformat(),
                   "chromium": subprocess.run(["chromium", "--version"], capture_output=True, text=True).stdout.strip(),
                   "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
