"""The diffkit command on tiny class- and text-conditional pipelines saved in temporary folders."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from diffkit.cli import main


def _gen(model_dir, out, *extra):
    return main(["generate", "--model", str(model_dir), "--out", str(out), "--steps", "3", "--no-progress", *extra])


def _pixels(path_or_bytes):
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(PIL.Image.open(source))


def _a1111(text: str) -> dict:
    """The settings line of an AUTOMATIC1111 'parameters' chunk as a dict."""
    return dict(item.split(": ", 1) for item in text.splitlines()[-1].split(", "))


APG = ("--guidance", "apg", "--apg-r", "2")


def test_generate_writes_seeded_pngs_with_parameters(model_dir, tmp_path):
    assert _gen(model_dir, tmp_path, "--label", "3,7", "-n", "4", "--seed", "10", *APG) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    images = ["label3-seed000010.png", "label3-seed000012.png", "label7-seed000011.png", "label7-seed000013.png"]
    assert names == ["grid.png", *images, "manifest.jsonl"]
    for i, label in enumerate([3, 7, 3, 7]):
        image = PIL.Image.open(tmp_path / f"label{label}-seed{10 + i:06d}.png")
        record = json.loads(image.text["diffkit"])
        assert (record["seed"], record["label"], record["first_seed"], record["labels"]) == (10 + i, label, 10, [3, 7])
        assert (record["steps"], record["solver"], record["guidance"], record["apg_r"]) == (3, "dpmpp_2m", "apg", 2.0)
        assert set(record["versions"]) == {"diffkit", "torch", "diffusers"}
        settings = _a1111(image.text["parameters"])
        assert settings["Seed"] == str(10 + i) and settings["Label"] == str(label)
        assert (settings["Steps"], settings["Sampler"], settings["Size"]) == ("3", "dpmpp_2m", "8x8")
    grid = PIL.Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 64, 2 * 64)  # 4 images: 2x2 tiles, 8x8 upscaled to 64x64
    first = PIL.Image.open(tmp_path / "label3-seed000010.png").convert("RGB").resize((64, 64), PIL.Image.NEAREST)
    assert np.array_equal(np.asarray(grid)[:64, :64], np.asarray(first))


def test_each_image_is_reproducible_alone_whatever_the_batching(model_dir, tmp_path):
    _gen(model_dir, tmp_path / "batch", "--label", "5", "-n", "3", "--seed", "0", "--batch-size", "3")
    _gen(model_dir, tmp_path / "pairs", "--label", "5", "-n", "3", "--seed", "0", "--batch-size", "2")
    _gen(model_dir, tmp_path / "alone", "--label", "5", "-n", "1", "--seed", "2")
    third = _pixels(tmp_path / "batch" / "label5-seed000002.png")
    assert np.array_equal(third, _pixels(tmp_path / "pairs" / "label5-seed000002.png"))
    assert np.array_equal(third, _pixels(tmp_path / "alone" / "label5-seed000002.png"))
    for name in ("label5-seed000000.png", "label5-seed000001.png"):
        assert np.array_equal(_pixels(tmp_path / "batch" / name), _pixels(tmp_path / "pairs" / name))
    assert not np.array_equal(third, _pixels(tmp_path / "batch" / "label5-seed000001.png"))


def test_existing_files_are_kept_unless_overwrite(model_dir, tmp_path, capsys):
    args = ("--label", "1", "-n", "2")
    assert _gen(model_dir, tmp_path, *args) == 0
    files = sorted(tmp_path.iterdir())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in files}
    capsys.readouterr()
    assert _gen(model_dir, tmp_path, *args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == files  # no temporary files left either
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in files} == before
    # a second run with the same seeds: replaced (os.replace gives new inodes), pixel for pixel the same
    assert _gen(model_dir, tmp_path, *args, "--overwrite") == 0
    target = tmp_path / "label1-seed000001.png"
    assert target.stat().st_ino != before[target][2]
    assert np.array_equal(_pixels(target), _pixels(before[target][0]))
    assert _gen(model_dir, tmp_path, *args, "--guidance-scale", "5", "--overwrite") == 0
    assert not np.array_equal(_pixels(target), _pixels(before[target][0]))


def test_text_model_names_files_by_prompt_and_keeps_commas_parseable(text_model_dir, tmp_path):
    prompt = "a red, round thing"
    assert _gen(text_model_dir, tmp_path, "--prompt", prompt, "--negative-prompt", "blurry", "-n", "2") == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["grid.png", "manifest.jsonl", "prompt0-seed000000.png", "prompt0-seed000001.png"]
    image = PIL.Image.open(tmp_path / "prompt0-seed000001.png")
    lines = image.text["parameters"].splitlines()
    assert lines[:2] == [prompt, "Negative prompt: blurry"]
    assert _a1111(image.text["parameters"])["Seed"] == "1"
    record = json.loads(image.text["diffkit"])
    assert (record["prompt"], record["negative_prompt"]) == (prompt, "blurry")
    assert (record["seed"], record["prompt_index"]) == (1, 0)


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--label", "10"], "out of range"),  # 10 is the null class, not a real one
        (["--label", "3,-1"], "out of range"),
        (["--label", "3", "--steps", "0"], "positive integer"),
        (["--label", "3", "--steps", "abc"], "positive integer"),
        (["--label", "3", "-n", "0"], "positive integer"),
        (["--label", "3", "--solver", "plms"], "invalid choice"),
        (["--label", "3", "--guidance", "pag"], "invalid choice"),
        ([], "--label"),
        (["--label", "3", "--prompt", "a cat"], "not allowed"),
        (["--prompt", "a cat"], "class-conditional"),
        (["--label", "3", "--negative-prompt", "blurry"], "needs --prompt"),
        (["--label", "3", "--eta", "1"], "needs --solver ddim"),
        (["--label", "3", "--height", "7"], "multiple of 2"),
        (["--label", "3", "--device", "nonsense"], "not a torch device"),
        pytest.param(["--label", "3", "--device", "cuda"], "no cuda device", marks=no_cuda),
        (["--label", "3", "--apg-eta", "2", "--guidance", "apg"], "eta must lie"),
        (["--label", "3", "--apg-r", "1"], "need --guidance apg"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys, args, needle):
    assert _gen(model_dir, tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_label_on_a_text_model_is_refused(text_model_dir, tmp_path, capsys):
    assert _gen(text_model_dir, tmp_path / "out", "--label", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text-conditional" in err


def test_missing_and_corrupt_models(model_dir, tmp_path, capsys):
    assert _gen(tmp_path / "nope", tmp_path / "o", "--label", "1") == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert _gen(broken, tmp_path / "o", "--label", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_env_prints_one_line_per_version(capsys):
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split(": ", 1)[0] for line in lines]
    assert names[:7] == ["diffkit", "torch", "diffusers", "transformers", "accelerate", "python", "cuda"]


def test_python_dash_m_reports_a_load_error_in_one_line(model_dir, tmp_path):
    """The real entry point, with the libraries' default logging (diffusers logs load errors before raising)."""
    broken = tmp_path / "no-weights"
    shutil.copytree(model_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    env = {k: v for k, v in os.environ.items() if k != "DIFFUSERS_VERBOSITY"} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "diffkit", "generate", "--model", str(broken), "--label", "2"]
    command += ["--out", str(tmp_path / "o")]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "safetensors" in result.stderr


def test_quantize_writes_a_loadable_model_that_generate_uses(model_dir, tmp_path, capsys):
    from diffkit import QuantizedModel, load_pipeline

    out = tmp_path / "q"
    args = ["quantize", "--model", str(model_dir), "--bits", "w4a8", "--calibration", "uniform", "-n", "16",
            "--steps", "4", "--out", str(out)]
    assert main(args) == 0
    pipe = load_pipeline(out)
    assert isinstance(pipe.unet, QuantizedModel)
    assert (pipe.unet.recipe["bits"], pipe.unet.recipe["calibration"], pipe.unet.recipe["n"]) == ("w4a8", "uniform", 16)
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    assert main(args) == 2  # never silently overwritten
    assert "exists" in capsys.readouterr().err and sorted(p.name for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]  # no staging folder left behind
    assert _gen(out, tmp_path / "img_q", "--label", "3", "-n", "2") == 0
    assert _gen(model_dir, tmp_path / "img_fp", "--label", "3", "-n", "2") == 0
    quantized, full = _pixels(tmp_path / "img_q" / "grid.png"), _pixels(tmp_path / "img_fp" / "grid.png")
    assert quantized.shape == full.shape and not np.array_equal(quantized, full)
    capsys.readouterr()
    assert _gen(model_dir, tmp_path / "img_bad", "--label", "3", "--int8-kernels") == 2  # a float model has none
    assert "needs a quantised model" in capsys.readouterr().err
