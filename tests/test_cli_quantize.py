"""`diffkit quantize` on text models: calibration prompts from --prompt / --prompts-file reach the calibration run
(the CLI's model equals the API's on the same prompts), and models that cannot take prompts, or text models given
none, are refused in one line before any work."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffkit import QuantizedModel, load_pipeline
from diffkit.cli import main
from diffkit.pipelines import GuidedPipeline
from diffkit.quant import quantize_pipeline
from helpers import tiny_text_components, tiny_unet


SETTINGS = ["--bits", "w8a8", "--calibration", "ndtc", "-n", "8", "--steps", "2", "--batch-size", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "sd"
    GuidedPipeline(scheduler=DDIMScheduler(), **tiny_text_components()).save_pretrained(path)
    return path


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


def test_prompts_reach_the_calibration(text_model_dir, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("two dogs\n\na blue house\n", encoding="utf-8")
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(text_model_dir), *SETTINGS, "--prompt", "a red cat", "--prompts-file",
            str(prompts_file), "--out", str(out)]
    assert main(argv) == 0
    ours = load_pipeline(out).unet
    assert isinstance(ours, QuantizedModel) and ours.recipe["calibration"] == "ndtc"

    pipe = load_pipeline(text_model_dir)
    pipe.set_progress_bar_config(disable=True)
    quantize_pipeline(pipe, "w8a8", "ndtc", n=8, num_inference_steps=2, batch_size=2,
                      generator=torch.Generator().manual_seed(3), prompts=["a red cat", "two dogs", "a blue house"])
    theirs = pipe.unet.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    assert all(torch.equal(value, theirs[key]) for key, value in ours.state_dict().items())

    # other prompts (from a .jsonl file, as generate reads one) give other activation ranges: they are not ignored
    jsonl = tmp_path / "other.jsonl"
    jsonl.write_text('{"prompt": "zzz"}\n', encoding="utf-8")
    other = tmp_path / "q_other"
    assert main(["quantize", "--model", str(text_model_dir), *SETTINGS, "--prompts-file", str(jsonl), "--out", str(other)]) == 0
    assert not all(torch.equal(value, theirs[key]) for key, value in load_pipeline(other).unet.state_dict().items())


def test_a_text_model_needs_prompts(text_model_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(text_model_dir), *SETTINGS, "--out", str(tmp_path / "q")]) == 2
    _one_line_error(capsys, "text model", "--prompt", "--prompts-file")
    assert not (tmp_path / "q").exists()


def test_a_model_without_a_text_encoder_takes_no_prompts(tmp_path, capsys):
    path = tmp_path / "classes"
    GuidedPipeline(tiny_unet(num_class_embeds=11), DDIMScheduler()).save_pretrained(path)
    assert main(["quantize", "--model", str(path), *SETTINGS, "--prompt", "a cat", "--out", str(tmp_path / "q")]) == 2
    _one_line_error(capsys, "no text encoder")
    parts = tiny_text_components()
    GuidedPipeline(parts["unet"], DDIMScheduler(), vae=parts["vae"]).save_pretrained(tmp_path / "embeds_only")
    argv = ["quantize", "--model", str(tmp_path / "embeds_only"), *SETTINGS, "--prompt", "a cat", "--out", str(tmp_path / "q")]
    assert main(argv) == 2
    _one_line_error(capsys, "text_encoder", "prompt_embeds")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("name, content, needle", [
    ("prompts.txt", "\n \n", "holds no prompt"),
    ("prompts.txt", None, "cannot read"),
    ("prompts.jsonl", '{"prompt": "a cat", "seed": 3}\n', "prompts only, not 'seed'"),
    ("prompts.jsonl", '{"label": 3}\n', "prompts only, not 'label'"),
])
def test_a_bad_prompts_file_is_refused(text_model_dir, tmp_path, capsys, name, content, needle):
    prompts_file = tmp_path / name
    if content is not None:
        prompts_file.write_text(content, encoding="utf-8")
    argv = ["quantize", "--model", str(text_model_dir), *SETTINGS, "--prompts-file", str(prompts_file),
            "--out", str(tmp_path / "q")]
    assert main(argv) == 2
    _one_line_error(capsys, "--prompts-file", needle)
