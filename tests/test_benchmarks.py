"""Every benchmark's --quick mode runs end to end, prints its table and writes its files."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


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
    # The two loops sample the same thing on the real model (columns max |diffkit - diffusers| and the float32
    # floor, how far diffusers moves when the noise moves by one ulp). Euler and Heun run in VE
    # coordinates, where this model's first sigma is 2e4 and rounding in either loop is amplified: they must agree
    # to within a few times that floor (tests/test_solvers.py has their exact equivalence at sane scales).
    cells = {r.strip("| ").split("|")[0].strip(): [float(c) for c in r.strip("| ").split("|")[-4:-2]] for r in rows}
    assert cells["ddim"][0] < 1e-4 and cells["dpmpp_2m"][0] < 1e-4, cells
    for solver in ("euler", "heun"):
        diff, floor = cells[solver]
        assert diff <= 3 * floor + 1e-5, (solver, cells)
    # and diffkit in float32 is no further from the exact (float64) walk of the same grid than diffusers is
    exact = {r.strip("| ").split("|")[0].strip(): [float(c) for c in r.strip("| ").split("|")[-2:]] for r in rows}
    for solver in ("ddim", "dpmpp_2m", "euler"):
        assert exact[solver][1] <= 1.5 * exact[solver][0] + 1e-5, (solver, exact)
    assert (tmp_path / "bench_solvers_quick.md").read_text().strip().endswith(rows[-1].strip())
    assert (tmp_path / "bench_solvers_quick.png").stat().st_size > 0


def test_bench_guidance_quick(tmp_path):
    stdout = _run("bench_guidance.py", tmp_path)
    rows = _table_rows(stdout)
    assert len(rows) == 1 + 1 + 2 * 3  # data, w = 1, then 3 methods at w = 4 and 12
    evals = {r.split("|")[1].strip() + r.split("|")[2].strip(): float(r.split("|")[-3]) for r in rows[1:]}
    assert evals["none1"] == 25 and evals["CFG12"] == evals["APG12"] == 50  # APG adds no network evaluations
    for name in ("bench_guidance_quick.md", "bench_guidance_quick.png", "guidance_cfg_w12_quick.png", "guidance_apg_w12_quick.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_adjoint_quick(tmp_path):
    stdout = _run("bench_adjoint.py", tmp_path)
    rows = [r for r in _table_rows(stdout) if not r.startswith("| backend")]
    assert len(rows) == 5 * 2  # five methods at 10 and 25 steps
    cells = {(r.split("|")[1].strip(), int(r.split("|")[2])): [float(v) for v in r.split("|")[3:6]] for r in rows}
    # checkpointed backprop through the same sampler converges to the fine-step reference, and the adjoint
    # agrees with it; the adjoint's memory stays flat with the steps while plain autograd's grows
    assert cells["checkpoint", 25][2] < cells["checkpoint", 10][2]
    assert cells["adjoint", 25][2] < 0.1
    assert cells["adjoint", 25][1] <= 1.2 * cells["adjoint", 10][1]
    assert cells["autograd", 25][1] > 1.5 * cells["autograd", 10][1]
    for name in ("bench_adjoint_quick.md", "bench_adjoint_quick.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_inverse_quick(tmp_path):
    stdout = _run("bench_inverse.py", tmp_path)
    rows = [r.split("|") for r in stdout.splitlines() if r.startswith("| sigma_y")]
    main = {(r[1].strip(), r[2].strip(), r[3].strip()): float(r[5].split()[0]) for r in rows if len(r) == 10}  # "mean ± std"
    assert len(main) == 2 * 3 * 5 + 6  # two noise levels x three tasks x five rows, and the earlier deepinv rows
    for task in ("inpaint half", "deblur"):  # the prior adds what the noisy measurement lacks, even at 15 steps
        for method in ("RED-Diff, tuned", "DPS, tuned"):
            assert main["sigma_y = 0.05", task, method] > main["sigma_y = 0.05", task, "pseudo-inverse"] + 2, (task, method)
    differences = [r for r in rows if len(r) == 7]  # the paired-difference table: one row per setting and task
    assert len(differences) == 6 and all("[" in cell for r in differences for cell in r[3:6])
    for name in ("bench_inverse_quick.md", "bench_inverse_quick.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_dfm_quick(tmp_path):
    stdout = _run("bench_dfm.py", tmp_path)
    rows = {tuple(c.strip() for c in r.split("|")[1:3]): r for r in _table_rows(stdout)
            if r.count("|") == 9 and not r.startswith("| world")}
    ratio = {key: float(r.split("|")[6]) for key, r in rows.items()}
    coverage = {key: r.split("|")[3].strip() for key, r in rows.items()}
    to_regressor = {key: float(r.split("|")[5]) for key, r in rows.items()}
    for world in ("GP", "bimodal"):
        assert ratio[world, "regressor"] == 0.0 and to_regressor[world, "regressor"] == 0.0  # deterministic, itself
        assert ratio[world, "DFM"] > 0.5  # DFM samples vary off the context window
        assert coverage[world, "observation diffusion"] != "100%"  # observations alone never show the whole signal
        assert 0.8 < ratio[world, "exact posterior"] < 1.2
    for name in ("bench_dfm_quick.md", "bench_dfm_quick.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_quant_quick(tmp_path):
    stdout = _run("bench_quant.py", tmp_path)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in _table_rows(stdout) if not r.startswith("| model")}
    assert len(rows) == 11  # FP32 and two bit widths x (four calibrations + the symmetric EMA search)
    size = lambda name: float(rows[name][4].split()[0])  # noqa: E731
    for variant in ("ndtc", "ndtc as coded", "uniform", "naive", "ndtc, symmetric EMA"):
        w8, w4 = rows[f"W8A8 {variant} (simulated)"], rows[f"W4A8 {variant} (simulated)"]
        assert float(w8[2].split()[0]) > float(w4[2].split()[0]) and float(w8[3]) > float(w4[3])  # more bits, less drift
        assert size(f"W4A8 {variant} (simulated)") < size(f"W8A8 {variant} (simulated)") < 0.3 * size("FP32")
    for name in ("bench_quant_quick.md", "bench_quant_quick.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_blend_quick(tmp_path):
    stdout = _run("bench_blend.py", tmp_path)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in _table_rows(stdout)}
    assert len(rows) == 11  # none, three single modalities, two sums, five blends
    psnr = {name: float(cells[2].split(" ± ")[0]) for name, cells in rows.items()}
    # the modalities are computed from the whole digit: every guided row fed at every step recovers the masked half
    # better than plain completion (the shipped adapters steer the UNet; blending moves the main trajectory toward them)
    for name, value in psnr.items():
        if name != "none" and "cond_tau" not in name:
            assert value > psnr["none"] + 2, (name, psnr)
    for name, cells in rows.items():  # blending rows report the loss its gradient steps removed, others none
        removed = cells[5]
        assert (removed == "-") == (not name.startswith("CMB")), (name, removed)
        if removed != "-":
            assert float(removed.split("%")[0]) > 0, (name, removed)
    for name in ("bench_blend_quick.md", "bench_blend_quick.png", "bench_blend_images_quick.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_anagram_quick(tmp_path):
    stdout = _run("bench_anagram.py", tmp_path)
    rows = [r.split("|") for r in _table_rows(stdout) if r.count("|") == 11 and not r.startswith("| views")]
    assert len(rows) == 2 * 4  # two view sets x (Geng, + NVR, + NVB + NVR, official rho)
    max_abs = {(r[1].strip(), r[2].strip()): float(r[9]) for r in rows}
    for views in ("rot90", "vflip"):
        for method in ("Geng mean", "+ NVR", "+ NVB + NVR"):
            assert max_abs[views, method] < 2  # samples stay in the data range
        # the official rho = mean(eps_i eps_j) divides a c != 1 residual by alpha = 5e-5 at the first step
        assert max_abs[views, "+ NVR (official rho)"] > 100
    assert (tmp_path / "bench_anagram_quick.md").stat().st_size > 0
    assert (tmp_path / "bench_anagram_quick.png").stat().st_size > 0


def test_bench_upsr_quick(tmp_path):
    stdout = _run("bench_upsr.py", tmp_path)
    rows = {r.split("|")[1].strip(): r.split("|")[2:-1] for r in _table_rows(stdout) if r.count("|") == 8}
    assert list(rows) == ["bicubic", "g alone", "ResShift", "UPSR", "RED-Diff", "DPS"]
    for cells in rows.values():
        assert all(math.isfinite(float(c.split("+-")[0].rstrip("% "))) for c in cells)
    differences = [r for r in _table_rows(stdout) if r.startswith("| PSNR") or r.startswith("| SSIM")]
    assert len(differences) == 4  # PSNR, SSIM, PSNR low-u, PSNR high-u
    assert (tmp_path / "bench_upsr_quick.md").stat().st_size > 0 and (tmp_path / "bench_upsr_quick.png").stat().st_size > 0


def test_bench_realmodels_quick(tmp_path):
    """Every family's GuidedPipeline.from_pipe gives its diffusers pipeline's images; the time ratio is measured."""
    stdout = _run("bench_realmodels.py", tmp_path)
    rows = {r.split("|")[1].strip(): r.split("|")[2:-1] for r in _table_rows(stdout) if not r.startswith("| family")}
    assert sorted(rows) == ["flux", "sd", "sd3", "sdxl"], rows
    for family, cells in rows.items():
        assert float(cells[1]) < 1e-4, (family, cells)  # max |diffkit - diffusers| on images in [0, 1]
        assert 0 < float(cells[4]) < 10, (family, cells)  # a measured time ratio, not a placeholder
    for name in ("bench_realmodels_quick.md", "bench_realmodels_quick.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_realmodels_gpu_mode_needs_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # the refusal is for machines without CUDA
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_realmodels.py"), "--gpu", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--gpu needs a CUDA device" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # a dozen subprocesses and a 2-process launch: 5.5 minutes on the shared 2 cores
def test_bench_scale_quick(tmp_path):
    stdout = _run("bench_scale.py", tmp_path)
    rows = [r for r in stdout.splitlines() if r.startswith("| ") and not r.startswith(("| n |", "| N |", "| processes"))]
    assert len(rows) == 1 + 2 + 1 + 2  # imports, two n, one precision / recall size, training on 1 and 2 processes
    assert rows[3].rstrip().endswith("| yes |")  # the blocked k-NN gives the N x N result
    cells = [float(c) for c in rows[2].strip("| ").split("|")[7:10]]  # FD, precision, recall of generated digits
    assert cells[0] > 0 and 0 <= cells[1] <= 1 and 0 <= cells[2] <= 1
    assert [r.split("|")[1].strip() for r in rows[4:]] == ["1", "2"]
    for name in ("bench_scale_quick.md", "bench_scale_quick.png"):
        assert (tmp_path / name).stat().st_size > 0
