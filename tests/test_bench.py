"""The benchmark harness itself (tiny model, a few steps) so it cannot rot. Numbers from this
run mean nothing; real numbers come from `make bench`."""
import json

import pytest

from conftest import run_script

pytestmark = pytest.mark.diffusers  # the benchmark's peer is diffusers' UNet2DModel


def test_bench_quick_prints_table_and_writes_json(tmp_path):
    r = run_script("bench/bench.py", "--quick", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    names = [line.split("|")[2].strip() for line in table[1:]]
    print("\n".join(table))
    for expected in ("PyTorch eager fp32", "ORT CPU fp32, IO binding", "diffusers eager fp32", "ours fp32",
                     "diffusers fp32"):
        assert expected in names, names
    result = json.load(open(tmp_path / "quick.json"))
    assert len(result["rows"]) == len(names) and result["forward_gflops"] > 0
    assert all(row["rate"] > 0 and 0 < row["utilization"] for row in result["rows"])
