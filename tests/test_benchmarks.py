"""Every benchmark's --quick mode runs end to end, prints its table and writes its files."""

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _run(script, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| solver") and not line.startswith("| method")]


def test_bench_solvers_quick(tmp_path):
    stdout = _run("bench_solvers.py", tmp_path)
    rows = _table_rows(stdout)
    assert len(rows) == 4  # four solvers at 10 steps
    # the two loops sample the same thing on the real model: last column is max |diffkit - diffusers|
    assert all(float(r.strip("| ").split("|")[-1]) < 1e-3 for r in rows)
    assert (tmp_path / "bench_solvers_quick.md").read_text().strip().endswith(rows[-1].strip())
    assert (tmp_path / "bench_solvers_quick.png").stat().st_size > 0


def test_bench_guidance_quick(tmp_path):
    stdout = _run("bench_guidance.py", tmp_path)
    assert len(_table_rows(stdout)) == 1 + 1 + 2 * 3  # data, w = 1, then 3 methods at w = 4 and 12
    for name in ("bench_guidance_quick.md", "bench_guidance_quick.png", "guidance_cfg_w12_quick.png", "guidance_apg_w12_quick.png"):
        assert (tmp_path / name).stat().st_size > 0
