# Every target works on a fresh clone: the ones that need Python depend on the venv.
PY := .venv/bin/python
DEMO := runs/demo

.PHONY: install test demo bench bench-gpu clean

install: .venv/.installed

.venv/.installed: requirements.txt requirements-dev.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

test: install
	$(PY) -m pytest

# The embedded default: train `tiny` on the built-in shapes on a CPU, sample, export, and
# sample again through ONNX Runtime. About 8 minutes on 2 cores.
demo: install
	$(PY) ddpm.py train --data shapes --model tiny --steps 1500 --batch-size 32 --lr 1e-3 \
		--warmup 100 --ema-decay 0.995 --sample-every 500 --save-every 500 --log-every 50 \
		--out $(DEMO) --ckpt $(DEMO)/ckpt.pt
	$(PY) ddpm.py sample --ckpt $(DEMO)/ckpt.pt --n 64 --sampler ddim --steps 100 --out $(DEMO)/samples.png

clean:
	rm -rf .venv runs ckpt.pt samples.png ddpm.onnx
