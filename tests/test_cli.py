"""The diffkit command on a tiny class-conditional pipeline saved in a temporary folder."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from diffusers import DPMSolverMultistepScheduler

from diffkit.cli import main
from diffkit.pipelines import GuidedPipeline
from helpers import tiny_unet


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    GuidedPipeline(tiny_unet(num_class_embeds=11), DPMSolverMultistepScheduler(prediction_type="v_prediction")).save_pretrained(path)
    return path


def _gen(model_dir, out, *extra):
    return main(["generate", "--model", str(model_dir), "--out", str(out), "--steps", "3", "--no-progress", *extra])


def _pixels(path):
    return np.asarray(PIL.Image.open(path))


def test_generate_writes_seeded_pngs_with_parameters(model_dir, tmp_path):
    assert _gen(model_dir, tmp_path / "a", "--label", "3,7", "-n", "4", "--seed", "10", "--guidance", "apg", "--apg-r", "2") == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["grid.png", "label3-seed000010.png", "label3-seed000012.png", "label7-seed000011.png", "label7-seed000013.png"]
    image = PIL.Image.open(tmp_path / "a" / "label7-seed000013.png")
    record = json.loads(image.text["diffkit"])
    assert record["seed"] == 13 and record["label"] == 7 and record["steps"] == 3 and record["solver"] == "dpmpp_2m"
    assert record["guidance"] == "apg" and record["apg_r"] == 2.0
    assert "Seed: 13" in image.text["parameters"] and "Steps: 3" in image.text["parameters"]
    assert PIL.Image.open(tmp_path / "a" / "grid.png").size == (2 * 64, 2 * 64)


def test_each_image_is_reproducible_alone_whatever_the_batching(model_dir, tmp_path):
    _gen(model_dir, tmp_path / "batch", "--label", "5", "-n", "3", "--seed", "0", "--batch-size", "3")
    _gen(model_dir, tmp_path / "ones", "--label", "5", "-n", "3", "--seed", "0", "--batch-size", "1")
    _gen(model_dir, tmp_path / "alone", "--label", "5", "-n", "1", "--seed", "2")
    third = _pixels(tmp_path / "batch" / "label5-seed000002.png")
    assert np.array_equal(third, _pixels(tmp_path / "ones" / "label5-seed000002.png"))
    assert np.array_equal(third, _pixels(tmp_path / "alone" / "label5-seed000002.png"))
    assert not np.array_equal(third, _pixels(tmp_path / "batch" / "label5-seed000001.png"))


def test_existing_files_are_kept_unless_overwrite(model_dir, tmp_path, capsys):
    assert _gen(model_dir, tmp_path, "--label", "1", "-n", "1") == 0
    target = tmp_path / "label1-seed000000.png"
    before = (target.read_bytes(), target.stat().st_mtime_ns)
    capsys.readouterr()
    assert _gen(model_dir, tmp_path, "--label", "1", "-n", "1", "--seed", "0") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before
    assert _gen(model_dir, tmp_path, "--label", "1", "-n", "1", "--guidance-scale", "5", "--overwrite") == 0
    assert target.read_bytes() != before[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--label", "11"], "out of range"),
        (["--label", "3", "--steps", "0"], "positive integer"),
        (["--label", "3", "-n", "0"], "positive integer"),
        (["--label", "3", "--solver", "plms"], "invalid choice"),
        (["--label", "3", "--guidance", "pag"], "invalid choice"),
        ([], "--label"),
        (["--label", "3", "--apg-eta", "2", "--guidance", "apg"], "eta must lie"),
        (["--label", "3", "--apg-r", "1"], "need --guidance apg"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys, args, needle):
    assert _gen(model_dir, tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err and "Traceback" not in err


def test_missing_and_corrupt_models(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--label", "1", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in model_dir.rglob("*"):
        dest = broken / item.relative_to(model_dir)
        dest.mkdir(exist_ok=True) if item.is_dir() else dest.write_bytes(item.read_bytes())
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert main(["generate", "--model", str(broken), "--label", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "o").exists()  # nothing written


def test_python_dash_m_entry_point(model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(
        [sys.executable, "-m", "diffkit", "generate", "--model", str(model_dir), "--label", "2", "-n", "2", "--steps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env,
    )
    assert ok.returncode == 0 and (tmp_path / "label2-seed000001.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "diffkit", "generate", "--steps", "-3"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
