"""Every command against its bad inputs, in-process: exit 2 (130 for an interrupt), one line on stderr that names
the problem, no traceback, and nothing written, changed or deleted in the folder it runs in."""

import hashlib
import json
import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from diffkit.cli import main
from diffkit.pipelines import GuidedPipeline
from helpers import tiny_unet


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny class-conditional model (10 classes + null, 8x8) and broken or hostile copies of it."""
    root = tmp_path_factory.mktemp("models")
    good = root / "tiny"
    GuidedPipeline(tiny_unet(num_class_embeds=11), DPMSolverMultistepScheduler(prediction_type="v_prediction")).save_pretrained(good)
    index = json.loads((good / "model_index.json").read_text())

    def variant(name, content):
        folder = root / name
        shutil.copytree(good, folder)
        (folder / "model_index.json").write_text(json.dumps(content))
        return folder

    variant("as_list", [index])
    variant("utils", {**index, "_class_name": "utils"})
    variant("class_list", {**index, "_class_name": ["evil_pipe", "EvilPipe"]})
    evil = variant("evil", {**index, "unet": ["evil_unet", "EvilUNet"]})
    (evil / "unet" / "evil_unet.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('RAN').write_text('x')\n"
        "from diffusers import UNet2DModel\nclass EvilUNet(UNet2DModel):\n    pass\n"
    )
    return root


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """The folder the command runs in: a user's project with files that must survive."""
    (tmp_path / "main.py").write_text("print('mine')\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lib.py").write_text("x = 1\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me\n")
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "repo" / "code.py").write_text("y = 2\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".bashrc").write_text("# mine\n")
    PIL.Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "digit.png")
    PIL.Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "foreign.png")  # a PNG diffkit did not write
    (tmp_path / "out" / "label1-seed000000.png").parent.mkdir()
    PIL.Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "out" / "label1-seed000000.png")
    (tmp_path / "card_bad_lr.json").write_text(json.dumps({
        "name": "bad", "paper": "-", "task": "classify", "methods": {"a": {}}, "baseline": "a", "seeds": [0],
        "metric": "test_accuracy", "metrics": ["test_accuracy"], "expected": "-",
        "data": "sklearn_digits", "model": "mlp", "optimizer": {"name": "sgd", "lr": "abc"}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                               p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _run_refused(argv, sandbox, capsys, needle, code=2):
    before = _snapshot(sandbox)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert needle in err, err
    assert _snapshot(sandbox) == before  # nothing written, changed or deleted
    return err


M = "{model}"  # replaced by the tiny model's folder
GEN = ["generate", "--model", M, "--steps", "2", "--no-progress", "--label", "1"]
QUANT = ["quantize", "--model", M, "-n", "4", "--steps", "2"]

CASES = {
    # generate: numbers
    "inf scale": (GEN + ["--guidance-scale", "inf"], "--guidance-scale"),
    "nan scale": (GEN + ["--guidance-scale", "nan"], "--guidance-scale"),
    "huge scale": (GEN + ["--guidance-scale", "1e30", "--out", "fresh"], "NaN or inf"),
    "nan rescale": (GEN + ["--guidance-rescale", "nan"], "--guidance-rescale"),
    "seed too big": (GEN + ["--seed", "99999999999999999999"], "--seed"),
    "negative seed": (GEN + ["--seed", "-1"], "--seed"),
    "seed run past the end": (GEN + ["--seed", str(2**63 - 1), "-n", "2"], "--seed"),
    "too many images": (GEN + ["-n", "100000000"], "--num-images"),
    "too many steps": (GEN + ["--steps", "1000"], "--steps"),
    "zero height": (GEN + ["--height", "0"], "--height"),
    "fractional label": (["generate", "--model", M, "--label", "3.7"], "--label"),
    "eta without ddim": (GEN + ["--eta", "0.5"], "--eta"),
    "negative eta": (GEN + ["--solver", "ddim", "--eta", "-1"], "--eta"),
    # generate: where it writes
    "empty out": (GEN + ["--out", ""], "--out"),
    "out is a file": (GEN + ["--out", "main.py"], "--out"),
    "overwrite a foreign png": (GEN + ["-n", "1", "--seed", "0", "--out", "out", "--overwrite"], "not written by diffkit"),
    "existing without overwrite": (GEN + ["-n", "1", "--seed", "0", "--out", "out"], "--overwrite"),
    # generate: models that cannot load
    "model is a file": (["generate", "--model", "digit.png", "--label", "1"], "is a file"),
    "mistyped local folder": (["generate", "--model", "models/mine", "--label", "1"], "does not exist"),
    "index is a list": (["generate", "--model", "{root}/as_list", "--label", "1"], "JSON object"),
    "class name utils": (["generate", "--model", "{root}/utils", "--label", "1"], "unknown pipeline class"),
    "class name a list": (["generate", "--model", "{root}/class_list", "--label", "1"], "must be a class name"),
    "component from the folder": (["generate", "--model", "{root}/evil", "--label", "1"], "--model"),
    # restore
    "sr factor does not divide": (["restore", "digit.png", "--model", M, "--operator", "sr:3", "--out", "r.png"],
                                  "--operator"),
    "unknown operator": (["restore", "digit.png", "--model", M, "--operator", "warp", "--out", "r.png"], "--operator"),
    "nan sigma": (["restore", "digit.png", "--operator", "sr:2", "--sigma-y", "nan", "--out", "r.png"], "--sigma-y"),
    "negative sigma": (["restore", "digit.png", "--operator", "sr:2", "--sigma-y", "-1", "--out", "r.png"], "--sigma-y"),
    "missing image": (["restore", "nothing.png", "--model", M, "--operator", "sr:2", "--out", "r.png"], "cannot read image"),
    "not an image": (["restore", "main.py", "--model", M, "--operator", "sr:2", "--out", "r.png"], "cannot read image"),
    "restore out not png": (["restore", "digit.png", "--operator", "sr:2", "--out", "r.jpg"], "--out"),
    "restore over a foreign png": (["restore", "digit.png", "--operator", "sr:2", "--out", "foreign.png", "--overwrite"],
                                   "not written by diffkit"),
    # complete
    "strength not a number": (["complete", "digit.png", "--mask-half", "top", "--strength", "edges=abc", "--out", "c.png"],
                              "--strength"),
    "strength nan": (["complete", "digit.png", "--mask-half", "top", "--control-from-image", "edges", "--strength",
                      "edges=nan", "--out", "c.png"], "--strength"),
    "unknown modality": (["complete", "digit.png", "--mask-half", "top", "--control-from-image", "depth", "--out", "c.png"],
                         "--control-from-image"),
    "negative blend steps": (["complete", "digit.png", "--mask-half", "top", "--blend-steps", "-1", "--out", "c.png"],
                             "--blend-steps"),
    "missing control": (["complete", "digit.png", "--mask-half", "top", "--control", "edges=none.png", "--out", "c.png"],
                        "--control edges"),
    "cond_tau above 1": (["complete", "digit.png", "--mask-half", "top", "--cond-tau", "1.5", "--out", "c.png"],
                         "--cond-tau"),
    "step cap without the official rule": (["complete", "digit.png", "--mask-half", "top", "--blend-step-cap", "10",
                                            "--out", "c.png"], "--blend-step-cap"),
    "step cap zero": (["complete", "digit.png", "--mask-half", "top", "--blend-step-rule", "official",
                       "--blend-step-cap", "0", "--out", "c.png"], "--blend-step-cap"),
    # quantize: never delete what diffkit did not write
    "quantize into the current folder": (QUANT + ["--out", ".", "--overwrite"], "current folder"),
    "quantize over a parent": (QUANT + ["--out", "..", "--overwrite"], "current folder"),
    "quantize over the home folder": (QUANT + ["--out", "home", "--overwrite"], "home folder"),
    "quantize over a checkout": (QUANT + ["--out", "repo", "--overwrite"], "git checkout"),
    "quantize over a user's folder": (QUANT + ["--out", "notes", "--overwrite"], "did not write"),
    "quantize over a file": (QUANT + ["--out", "main.py", "--overwrite"], "not a folder"),
    "quantize empty out": (QUANT + ["--out", ""], "--out"),
    "quantize existing without overwrite": (QUANT + ["--out", "notes"], "--overwrite"),
    # train, eval, upscale, anagram, prompts files
    "train into the current folder": (["train", "default", "--out", ".", "--overwrite"], "no diffkit training run"),
    "train over a user's folder": (["train", "default", "--out", "notes", "--overwrite"], "no diffkit training run"),
    "train out is a file": (["train", "default", "--out", "main.py"], "is a file"),
    "train unknown recipe": (["train", "no_such_recipe", "--out", "run"], "no_such_recipe"),
    "eval a missing folder": (["eval", "nowhere", "--no-progress"], "does not exist"),
    "eval json over a file": (["eval", "notes", "--json", "main.py", "--overwrite"], "--json"),
    "upscale over a foreign png": (["upscale", "digit.png", "--out", "foreign.png", "--overwrite"], "not written by diffkit"),
    "upscale out not png": (["upscale", "digit.png", "--out", "main.py"], "--out"),
    "anagram blur view": (["anagram", "--model", M, "--view", "identity", "--label", "1", "--view", "blur", "--label", "2",
                           "--out", "fresh"], "--view blur"),
    "anagram view without a condition": (["anagram", "--model", M, "--view", "identity", "--out", "fresh"], "--view"),
    "prompts on a class model": (["generate", "--model", M, "--prompts-file", "main.py"], "class-conditional"),
    "missing prompts file": (["generate", "--model", M, "--prompts-file", "none.txt"], "--prompts-file"),
    # harness
    "unknown card": (["harness", "run", "no_such_card"], "no card file"),
    "card with a text lr": (["harness", "run", "card_bad_lr.json"], "lr"),
    "report without results": (["harness", "report", "--results", "none.jsonl"], "--results"),
    "results is a folder": (["harness", "run", "diffgrad_1d", "--results", "src"], "--results"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_in_one_line_and_nothing_written(name, models, sandbox, capsys):
    argv, needle = CASES[name]
    argv = [a.replace(M, str(models / "tiny")).replace("{root}", str(models)) for a in argv]
    err = _run_refused(argv, sandbox, capsys, needle)
    assert len(err) < 400  # no walls of timesteps or tensors
    assert not (models / "evil" / "unet" / "RAN").exists()  # code shipped with a model never runs


def test_overwrite_replaces_only_what_diffkit_wrote(models, sandbox, capsys):
    """--overwrite on a quantised model folder diffkit wrote replaces it; the same flag on a folder with one extra
    user file refuses and keeps everything."""
    out = sandbox / "q"
    argv = [a.replace(M, str(models / "tiny")) for a in QUANT] + ["--out", "q"]
    assert main(argv) == 0
    assert (out / "diffkit_manifest.json").is_file() and oct(out.stat().st_mode & 0o777) != "0o700"
    first = _snapshot(out)
    assert main(argv + ["--overwrite", "--seed", "1"]) == 0
    assert _snapshot(out) != first and set(_snapshot(out)) == set(first)
    (out / "mine.txt").write_text("a user's file\n")
    _run_refused(argv + ["--overwrite"], sandbox, capsys, "did not write")
    assert not [p for p in sandbox.iterdir() if p.name.startswith(".q.")]  # no staging folders left


def test_interrupt_exits_130_and_leaves_only_complete_files(models, sandbox, capsys, monkeypatch):
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = GuidedPipeline.__call__
    monkeypatch.setattr(GuidedPipeline, "__call__", interrupted)
    argv = [a.replace(M, str(models / "tiny")) for a in GEN] + ["-n", "4", "--batch-size", "2", "--out", "run"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: interrupted")
    written = sorted(p.name for p in (sandbox / "run").iterdir())
    assert written == ["label1-seed000000.png", "label1-seed000001.png"]  # the first batch, whole; no temp files


# -- the Python API: refuse, never coerce, never return NaN or black ---------------------------------------------

@pytest.fixture(scope="module")
def default_pipes():
    import diffkit
    from diffkit.pipelines import AdjointDPMPipeline, InverseProblemPipeline, ModalityBlendPipeline

    guided = diffkit.load_pipeline()
    guided.set_progress_bar_config(disable=True)
    blend = ModalityBlendPipeline.from_pipe(guided)
    blend.load_adapters(names=["edges"])
    pipes = {"guided": guided, "adjoint": AdjointDPMPipeline.from_pipe(guided),
             "inverse": InverseProblemPipeline.from_pipe(guided), "blend": blend}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def _digits():
    from diffkit.data import colored_digits

    return colored_digits("test")[0][:2]


API_CASES = {
    "fractional label": ("guided", dict(class_labels=[3.7]), "class_labels must be integers"),
    "float label tensor": ("guided", dict(class_labels=torch.tensor([3.0])), "class_labels must be integers"),
    "bool steps": ("guided", dict(class_labels=[3], num_inference_steps=True), "num_inference_steps"),
    "zero height": ("guided", dict(class_labels=[3], height=0), "height must be a positive multiple"),
    "eta without ddim": ("guided", dict(class_labels=[3], eta=0.5), "eta"),
    "inf scale": ("guided", dict(class_labels=[3], guidance_scale=float("inf")), "guidance_scale"),
    "huge scale": ("guided", dict(class_labels=[3], guidance_scale=1e30, num_inference_steps=3), "NaN or inf"),
    "huge latents": ("guided", dict(class_labels=[3], latents=torch.full((1, 3, 16, 16), 1e30), num_inference_steps=3),
                     "NaN or inf"),
    "generator list too short": ("guided", dict(class_labels=[3, 4], generator=[torch.Generator()]), "generator"),
    "adjoint nan latents": ("adjoint", dict(class_labels=[3], latents=torch.full((1, 3, 16, 16), float("nan"))), "NaN"),
    "adjoint bool steps": ("adjoint", dict(class_labels=[3], num_inference_steps=True), "num_inference_steps"),
}


@pytest.mark.parametrize("name", sorted(API_CASES))
def test_api_refuses_bad_input(name, default_pipes):
    which, kwargs, match = API_CASES[name]
    with pytest.raises(ValueError, match=match):
        default_pipes[which](**kwargs)


@pytest.mark.parametrize("method", ["red_diff", "pigdm", "dps"])
def test_inverse_methods_refuse_absurd_measurements(method, default_pipes):
    """NaN is refused up front; a measurement of 1e30 drives RED-Diff and PiGDM to NaN, which is an error, not a
    black image (DPS normalises its step by the residual, so its result stays finite: garbage in, garbage out)."""
    from diffkit.inverse import make_operator

    op = make_operator("sr:2")
    if method != "dps":
        with pytest.raises(ValueError, match="NaN or inf"):
            default_pipes["inverse"](torch.full((1, 3, 8, 8), 1e30), op, method=method, num_inference_steps=3)
    with pytest.raises(ValueError, match="NaN or inf"):
        default_pipes["inverse"](torch.full((1, 3, 8, 8), float("nan")), op, method=method, num_inference_steps=3)


def test_blending_refuses_nan_strength_and_out_of_range_images(default_pipes):
    from diffkit.blend import extract

    digits = _digits()
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1
    controls = {"edges": extract("edges", digits)}
    with pytest.raises(ValueError, match="adapter_conditioning_scale"):
        default_pipes["blend"](digits, mask, control_images=controls, adapter_conditioning_scale=float("nan"))
    with pytest.raises(ValueError, match=r"image must hold values in \[-1, 1\]"):
        default_pipes["blend"](torch.full_like(digits, 1e30), mask)
    with pytest.raises(ValueError, match=r"control_images\['edges'\] must hold values"):
        default_pipes["blend"](digits, mask, control_images={"edges": controls["edges"] * 1e30})


def test_read_only_output_is_refused_before_any_work(models, sandbox, capsys, monkeypatch):
    """A folder the user cannot write in is found before the model loads, and the message names it, not a temp file
    (os.access is what decides; patched here because the tests may run as root)."""
    import os

    from diffkit.outputs import os as outputs_os

    locked = sandbox / "notes"
    real_access = os.access
    monkeypatch.setattr(outputs_os, "access", lambda path, mode: False if Path(path).resolve() == locked else real_access(path, mode))
    loads = []
    monkeypatch.setattr("diffkit.cli.common.load_model", lambda *a, **k: loads.append(1))
    argv = [a.replace(M, str(models / "tiny")) for a in GEN] + ["--out", "notes"]
    err = _run_refused(argv, sandbox, capsys, "cannot write in")
    assert "--out 'notes': cannot write in notes" in err and ".tmp" not in err and not loads


def test_an_error_after_a_progress_bar_starts_prints_on_its_own_line(sandbox, capsys):
    """A run that fails once its bar is drawn closes the bar first: the error is the last line, whole."""
    (sandbox / "mixed").mkdir()
    for i in range(4):
        PIL.Image.new("RGB", (16, 16)).save(sandbox / "mixed" / f"a{i}.png")
    PIL.Image.new("RGB", (8, 8)).save(sandbox / "mixed" / "b.png")
    assert main(["eval", "mixed"]) == 2
    err = capsys.readouterr().err
    assert "it/s]" in err  # the bar was drawn
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "one size" in last and err.count("error: ") == 1, err
