# Every target works on a fresh clone: the ones that need Python depend on the venv.
PY := .venv/bin/python
DEMO := runs/demo
DEMO_STEPS := 600

.PHONY: install test test-fast mutants demo demo-check distill bench bench-gpu bench-ddp bench-solver bench-startup bench-web gpu-check clean

install: .venv/.installed node_modules/.installed

# onnxruntime-web for sample_web.py's page, pinned in package-lock.json; where npm is missing the
# rest installs and sample_web.py says what to run
node_modules/.installed: package.json package-lock.json
	@if command -v npm >/dev/null; then npm ci --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "make install: npm is missing, so onnxruntime-web (sample_web.py's page) is not installed; install Node.js and npm, then run 'npm ci'"; fi

.venv/.installed: requirements.txt requirements-dev.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# Everything (what CI runs): at most 10 minutes on 2 cores, ending with the 10 slowest tests and
# the wall time (docs/testing.md has the per-file budget). The test files run on one pytest-xdist
# worker per core (tests/conftest.py gives each worker its own cores); JOBS=1 runs them in turn.
JOBS := auto
XDIST = $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadfile --no-loadscope-reorder)
TIMED = start=$$(date +%s); $(1); rc=$$?; echo "$@: wall time $$(( $$(date +%s) - start )) s"; exit $$rc
test: install
	@$(call TIMED,$(PY) -m pytest $(XDIST))

# The edit loop, at most 2 minutes: all but the tests that train for minutes (marker `slow`) or
# run whole commands for seconds (marker `heavy`).
test-fast: install
	@$(call TIMED,$(PY) -m pytest $(XDIST) -m "not slow and not heavy")

# Plants known bugs in ddpm.py, sample_ort.py and export.py one at a time and checks that the
# tests without diffusers and without `slow` (the `heavy` ones included) catch every one
# (tests/mutants.py). About 45 minutes.
mutants: install
	$(PY) tests/mutants.py

# The embedded default: train `tiny` on the built-in shapes on a CPU, class-conditional, sample a
# grid with one row per class (classifier-free guidance 3) with the process pictures, export, and
# sample again through ONNX Runtime, all under runs/demo/. 3 min 26 s in fp32 on a 2-core Xeon,
# 4 min 25 s with torch held to AVX2 (docs/demo.md); where the CPU has bf16 units (AVX512-BF16 or
# AMX, detected) it trains in bf16, elsewhere in fp32 with a one-line note.
# The recipe departs from Ho et al. where it measurably draws cleaner shapes in this budget
# (docs/demo.md): class labels with guidance, v-prediction, cosine betas, min-SNR-5, cosine
# learning rate, attention at 8x8 instead of 16x16, the posterior variance (fixed_small), no EMA
# (a cosine learning rate run down to zero in a few hundred steps leaves the raw weights the
# better model), 50 ancestral sampling steps. DEMO_GUIDANCE=0 samples the model unconditionally.
# `make demo-check` runs it and judges both grids (tests/test_demo.py; make test runs a shorter one).
DEMO_GUIDANCE := 3
DEMO_AMP := bf16
DEMO_SAMPLING := --sampler ddpm --steps 50
demo: install
	$(PY) ddpm.py train --data shapes --model tiny --attn-resolutions 8 --var-type fixed_small --cond \
		--steps $(DEMO_STEPS) --batch-size 32 --lr 2e-3 --warmup 100 --cosine-lr --ema-decay 0 \
		--prediction v --schedule cosine --min-snr 5 --amp $(DEMO_AMP) --sample-every 0 --save-every 250 \
		--log-every 50 --out $(DEMO) --ckpt $(DEMO)/ckpt.pt --overwrite
	$(PY) ddpm.py sample --ckpt $(DEMO)/ckpt.pt --n 40 --class all --guidance $(DEMO_GUIDANCE) $(DEMO_SAMPLING) \
		--out $(DEMO)/samples.png --progress $(DEMO)/process.png --progress $(DEMO)/process.gif
	$(PY) export.py $(DEMO)/ckpt.pt -o $(DEMO)/ddpm.onnx
	$(PY) sample_ort.py --model $(DEMO)/ddpm.onnx --n 40 --class all --guidance $(DEMO_GUIDANCE) $(DEMO_SAMPLING) \
		--provider cpu --out $(DEMO)/samples_ort.png --progress $(DEMO)/process_ort.png \
		--progress $(DEMO)/process_ort.gif
	@echo "see it sample in a browser: $(PY) sample_web.py --model $(DEMO)/ddpm.onnx, then open http://127.0.0.1:8000/"

# The full demo, judged: both grids at least 90% clean shapes of the class asked for, guidance
# against none, classifier guidance (4 min 4 s on a 2-core Xeon with bf16 units, 2026-12-05).
demo-check: install
	DEMO_CHECK=full $(PY) -m pytest -p no:cacheprovider tests/test_demo.py

# Progressive distillation of the demo model (`make demo` first): rounds from 64 DDIM steps down
# to 4 (distill.py), then the judged table of teacher, solvers and students through PyTorch and
# ONNX Runtime (bench/distill.py; docs/distillation.md has the figures).
DISTILL := runs/distill
distill: install
	$(PY) distill.py --teacher $(DEMO)/ckpt.pt --from-steps 64 --to-steps 4 --round-steps 600 --lr 1e-3 \
		--sample-every 0 --log-every 50 --out $(DISTILL) --overwrite
	$(PY) bench/distill.py --teacher $(DEMO)/ckpt.pt --students $(DISTILL) --out $(DISTILL)/bench

# Speed, side by side in one run (bench/bench.py); writes bench/results/<machine>.json.
bench: install
	$(PY) bench/bench.py --device cpu

# The denoiser in Chromium (onnxruntime-web, WebAssembly 1 and 2 threads) beside native ONNX
# Runtime, tiny and cifar10 at batch 8 (bench/web.py; docs/web.md has the figures).
bench-web: install
	$(PY) bench/web.py

bench-gpu: install
	$(PY) bench/bench.py --device cuda

# GPU readiness (bench/gpu_check.py): every CUDA path run and measured in one go, at most 9 minutes on
# one H100/H200-class GPU; writes bench/results/gpu-check-<GPU>.json and prints the README's table.
# REHEARSE=1 runs the same script on the CPU with tiny sizes (about a minute; make test runs it).
gpu-check: install
	$(PY) bench/gpu_check.py $(if $(REHEARSE),--rehearse)

# Solver error: each sampler's distance to the probability-flow ODE's solution from the same x_T
# (bench/solver_error.py), for a trained checkpoint: make bench-solver CKPT=runs/demo/ckpt.pt
CKPT := $(DEMO)/ckpt.pt
bench-solver: install
	$(PY) bench/solver_error.py --ckpt $(CKPT)

# How long each command takes to answer --help (torch is imported only after the flags parse).
bench-startup: install
	$(PY) bench/startup.py

# Training on one process against a torchrun job of 2 on the same cores (bench/ddp.py).
bench-ddp: install
	$(PY) bench/ddp.py

clean:
	rm -rf .venv node_modules runs ckpt.pt samples.png ddpm.onnx
