"""sample_web.py and its page (web/) in headless Chromium, driven by selenium: the step tables
against schedules.step_table, one denoiser call and whole trajectories against ONNX Runtime in
Python (sample_ort.Runner) with x_T and every step's noise injected through the page's test hook
(window.ddpm), and the sentences for a wrong file. Needs Debian's chromium and chromium-driver
and onnxruntime-web (npm ci); elsewhere these tests skip with the install command, and with
CI=true a missing browser fails them."""
import base64
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_clean_error, run_script
import ddpm
import export
import sample_ort
import sample_web
import schedules
from schedules import Sampler

INSTALL = "apt-get install chromium chromium-driver; make install (pip's selenium, npm's onnxruntime-web)"


def browser_missing():
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    for name in ("chromium", "chromedriver"):
        if not shutil.which(name):
            return f"{name} is not on PATH"
    try:
        sample_web.check_installed()
    except ValueError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def browser():
    missing = browser_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser tests, but {missing} ({INSTALL})")
        pytest.skip(f"{missing}; to run the browser tests: {INSTALL}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(300)
    yield driver
    driver.quit()


class Page:
    """sample_web.py serving one model on a free port, and the browser on its page."""

    def __init__(self, driver, model):
        self.server = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample_web.py"), "--model", str(model),
                                        "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.server.stdout.readline()
        match = re.search(r"http://\S+/", line)
        assert match, f"sample_web.py did not print its URL: {line!r} {self.server.stderr.read()[-2000:]}"
        self.url, self.driver = match.group(0), driver
        driver.get(self.url)
        self.wait("return window.ddpm && (window.ddpm.ready() || document.getElementById('message').className == 'error')")

    def wait(self, script, timeout=120):
        deadline = time.time() + timeout
        while not self.driver.execute_script(script):
            assert time.time() < deadline, f"the page did not get there: {self.message()}"
            time.sleep(0.1)

    def message(self):
        return self.driver.execute_script("return document.getElementById('message').textContent")

    def call(self, expression, *args):
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"Promise.resolve({expression}).then(done, e => done({{error: String(e.message || e)}}));", *args)

    def close(self):
        self.server.terminate()
        self.server.wait(10)


def b64(a):
    return base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes()).decode()


def f32(s, shape):
    return np.frombuffer(base64.b64decode(s), np.float32).reshape(shape)


def perturbed_export(path, **fields):
    """A tiny 8x8 U-Net, every weight perturbed (a fresh one outputs eps = 0), exported."""
    cfg = dataclasses.replace(ddpm.make_config("tiny", image_size=8, attn_resolutions=(4,)), **fields)
    torch.manual_seed(0)
    model = ddpm.UNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    denoiser = export.Denoiser(model, torch.float32, cfg).eval()
    export.export_module(denoiser, cfg, str(path), denoiser)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("web")
    return {"uncond": perturbed_export(d / "uncond.onnx"),
            "cond": perturbed_export(d / "cond.onnx", num_classes=3, class_names=("a", "b", "c")),
            "student": perturbed_export(d / "student.onnx", num_classes=3, class_names=("a", "b", "c"),
                                        distilled_steps=4, distilled_guidance=2.0),
            "legacy": os.path.join(ROOT, "tests", "legacy", "cond.onnx")}


@pytest.fixture(scope="module")
def pages(browser, models):
    opened = {}

    def page(name):
        if name not in opened:
            for other in opened.values():
                other.close()
            opened.clear()
            opened[name] = Page(browser, models[name])
        return opened[name]
    yield page
    for p in opened.values():
        p.close()


pytestmark = pytest.mark.heavy  # a browser and a server per model: not in make test-fast


def test_step_tables_equal_pythons_to_float32(pages, models):
    page = pages("uncond")
    betas = sample_ort.open_sessions(str(models["uncond"]), "cpu")[2]["betas"]
    cosine = schedules.get_betas("cosine", 1000)
    worst = 0
    for b, name, sampler in [(betas, "linear", Sampler("ddpm")), (betas, "linear", Sampler("ddpm", 20)),
                             (betas, "linear", Sampler("ddim", 10)), (betas, "linear", Sampler("ddim", 16, 0.5, "trailing")),
                             (betas, "linear", Sampler("dpm++", 10)), (betas, "linear", Sampler("dpm++", 7, 0, "linspace")),
                             (cosine, "cosine", Sampler("ddpm", 250)), (cosine, "cosine", Sampler("ddim", 33, 1.0, "trailing"))]:
        for var_type in schedules.VAR_TYPES:
            request = {"name": sampler.name, "steps": sampler.steps, "eta": sampler.eta, "spacing": sampler.spacing}
            js = page.driver.execute_script("return window.ddpm.table(arguments[0], arguments[1], arguments[2])",
                                            request, var_type, b.tolist())
            timesteps, coefs = schedules.step_table(b, sampler, var_type)
            assert js["timesteps"] == timesteps.tolist(), (name, sampler)
            theirs = np.array(js["coefs"], np.float32)
            ulps = np.abs(theirs.view(np.int32).astype(np.int64) - coefs.view(np.int32).astype(np.int64))
            ulps = np.where(theirs == coefs, 0, ulps).max()  # -0 == 0 (JSON has no -0)
            worst = max(worst, ulps)
            assert theirs.shape == coefs.shape and ulps <= 1, (name, sampler, var_type, ulps)
    print(f"step tables: at most {worst} float32 ulp from schedules.step_table")


def test_one_denoiser_call_matches_onnx_runtime(pages, models):
    page = pages("cond")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 8, 8), dtype=np.float32)
    y = [0, 1, 2, 3, 0, 1, 2, 3]  # 3: no label
    session = sample_ort.open_sessions(str(models["cond"]), "cpu")[0]
    want = session.run(["eps"], {"x_t": x, "t": np.full(8, 417, np.int64), "y": np.array(y, np.int64)})[0]
    got = page.call("window.ddpm.eps(arguments[0], arguments[1], arguments[2], 8)", b64(x), 417, y)
    err = np.abs(f32(got, x.shape) - want).max()
    print(f"denoiser in Chromium (WebAssembly) vs ONNX Runtime in Python, batch 8: max |diff| {err:.1e}")
    assert err <= 1e-4


def python_trajectory(path, sampler, x_T, noise, labels=None, guidance=None):
    """sample_ort.Runner's x_t before each step and its x_0, fed x_T and the noise."""
    (denoiser, step, meta, device), (sampler, scale, _) = sample_ort.open_for_sampling(
        str(path), sampler, guidance, None if labels is None else "0", provider="cpu")
    guided = labels is not None and scale not in (0, 1)
    runner = sample_ort.Runner(denoiser, step, x_T.shape, device, meta["num_classes"], scale if guided else None,
                               clip_x0=meta["clip_x0"])
    if labels is not None and scale != 0:
        runner.set_labels(labels)
    seen = []

    class Every:
        def wants(self, k):
            return True

        def __call__(self, k, t, x_t, pred_x0):
            seen.append(x_t)
    timesteps, coefs = schedules.step_table(meta["betas"], sampler, meta["var_type"])
    x0 = runner.run(x_T, timesteps, coefs, lambda k, shape: noise[k], process=Every())
    return np.stack(seen), x0, len(timesteps)


@pytest.mark.parametrize("name,sampler,steps,classes", [
    ("uncond", "ddpm", 20, None), ("uncond", "ddim", 10, None), ("uncond", "dpm++", 10, None),
    ("cond", "ddim", 10, 1), ("cond", "ddpm", 20, "all"), ("student", None, None, 2), ("legacy", "ddim", 10, 1)])
def test_trajectories_match_sample_ort(pages, models, name, sampler, steps, classes):
    """Every step's x within 1e-3 of sample_ort.py's and the final uint8 images within one level
    on at least 99% of the pixels; the student in the 4 steps both decide on their own."""
    page = pages(name)
    n = 6
    request = {"sampler": {"name": sampler, "steps": steps, "eta": 0, "spacing": None}, "n": n,
               "classes": classes, "guidance": 2.0 if name == "student" else 3.0}
    labels = None if classes is None else (np.repeat([0, 1, 2], 2) if classes == "all" else np.full(n, classes))
    size = 8
    rng = np.random.default_rng(1)
    x_T = rng.standard_normal((n, 3, size, size), dtype=np.float32)
    noise = rng.standard_normal((20, n, 3, size, size), dtype=np.float32)
    got = page.call("window.ddpm.sample(arguments[0], arguments[1], arguments[2])", request, b64(x_T),
                    [b64(z) for z in noise])
    assert "error" not in got, got
    want_steps, want_x0, n_steps = python_trajectory(models[name], Sampler(sampler, steps), x_T, noise, labels,
                                                     request["guidance"] if classes is not None else None)
    steps_js = np.stack([f32(s, x_T.shape) for s in got["steps"]])
    x0_js = f32(got["final"], x_T.shape)
    assert got["n"] == n and len(got["steps"]) == n_steps, (got["sampler"], n_steps)
    err = max(np.abs(steps_js - want_steps).max(), np.abs(x0_js - want_x0).max())
    a, b = (np.clip(np.round((x + 1) * 127.5), 0, 255) for x in (x0_js, want_x0))
    close = np.mean(np.abs(a - b) <= 1)
    print(f"{name} {got['sampler']['name']} {n_steps} steps: max |page - sample_ort.py| over the steps {err:.1e}, "
          f"final uint8 within 1 level on {100 * close:.2f}% of pixels")
    assert err <= 1e-3 and close >= 0.99


def test_sampling_on_the_page_draws_and_a_screenshot_is_kept(pages):
    page = pages("cond")
    d = page.driver
    d.execute_script("document.getElementById('steps').value = 20; document.getElementById('n').value = 9;"
                     "document.getElementById('class').value = 'all';")
    d.find_element("id", "sample").click()
    page.wait("return document.getElementById('stats').textContent.includes('images/s')")
    stats = d.execute_script("return document.getElementById('stats').textContent")
    inked = d.execute_script("const c = document.getElementById('x0'); const a = c.getContext('2d')"
                             ".getImageData(0, 0, c.width, c.height).data; let k = 0;"
                             "for (let i = 0; i < a.length; i += 4) k += a[i] != 255; return [c.width, k];")
    report = os.path.join(ROOT, "runs", "test-report")
    os.makedirs(report, exist_ok=True)
    d.save_screenshot(os.path.join(report, "web-page.png"))
    print(f"{stats}; the x_0 grid is {inked[0]} px wide with {inked[1]} non-white pixels; "
          f"screenshot in runs/test-report/web-page.png")
    assert "9 images x 20 ddpm steps" in stats and inked[1] > 9 * 8 * 8 * 0.5
    assert page.message() == ""


def test_a_wrong_file_is_a_sentence_on_the_page_and_from_sample_web(pages, tmp_path):
    noise_graph = tmp_path / "noise.onnx"
    noise_graph.write_bytes(base64.b64decode(sample_ort.NOISE_GRAPH))
    r = run_script("sample_web.py", "--model", str(noise_graph), "--port", "0")
    assert_clean_error(r, "not one written by export.py")
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    assert_clean_error(run_script("sample_web.py", "--model", str(text)), "not an ONNX model")
    page = pages("uncond")
    for path, words in ((noise_graph, "not a model written by export.py"), (text, "not a model written by export.py")):
        page.driver.find_element("id", "file").send_keys(str(path))
        page.wait("return document.getElementById('message').className == 'error'")
        print(f"{path.name}: {page.message()}")
        assert words in page.message()
        page.driver.execute_script("document.getElementById('message').className = ''")


def test_webgpu_runs_or_says_why_not(browser, models):
    """The WebGPU switch: headless Chromium without a GPU offers no adapter, and the page says so
    in a sentence and samples on WebAssembly; with one, it samples on WebGPU."""
    page = Page(browser, models["uncond"])
    try:
        browser.get(page.url + "?backend=webgpu")
        page.wait("return window.ddpm && window.ddpm.ready()")
        print(page.message())
        assert "ready: WebGPU" in page.message() or "offers no WebGPU adapter" in page.message()
        got = page.call("window.ddpm.sample(arguments[0], arguments[1], arguments[2])",
                        {"sampler": {"name": "ddim", "steps": 2, "eta": 0, "spacing": None}, "n": 1, "classes": None,
                         "guidance": 3.0}, b64(np.zeros((1, 3, 8, 8))), [b64(np.zeros((1, 3, 8, 8)))] * 2)
        assert "error" not in got and np.isfinite(f32(got["final"], (1, 3, 8, 8))).all(), got
    finally:
        page.close()


def test_a_page_without_onnxruntime_web_says_so(browser, models, tmp_path):
    run_script("sample_web.py", "--model", str(models["uncond"]), "--build", str(tmp_path / "site"))
    shutil.rmtree(tmp_path / "site" / "ort")
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"], cwd=tmp_path / "site",
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = re.search(r"port (\d+)", server.stdout.readline()).group(1)
        browser.get(f"http://127.0.0.1:{port}/")
        deadline = time.time() + 30
        while "could not start" not in browser.execute_script("return document.getElementById('message').textContent"):
            assert time.time() < deadline
            time.sleep(0.1)
        print(browser.execute_script("return document.getElementById('message').textContent"))
    finally:
        server.terminate()
        server.wait(10)


def test_build_writes_a_static_folder(models, tmp_path):
    r = run_script("sample_web.py", "--model", str(models["uncond"]), "--build", str(tmp_path / "site"))
    assert r.returncode == 0, r.stderr
    written = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "site") for d, _, fs in os.walk(tmp_path / "site") for f in fs)
    assert written == sorted(["_headers", "app.js", "diffusion.js", "index.html", "model.onnx"]
                             + [f"ort/{f}" for f in sample_web.ORT_FILES]), written
    assert (tmp_path / "site" / "model.onnx").read_bytes() == models["uncond"].read_bytes()
