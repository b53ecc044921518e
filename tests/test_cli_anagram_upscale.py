"""``diffkit anagram`` and ``diffkit upscale``: files, PNG metadata, view pairing, one-line errors, --overwrite."""

import json
import re

import numpy as np
import PIL.Image
import pytest

from diffkit.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


def _anagram(model_dir, out, *extra):
    return main(["anagram", "--model", str(model_dir), "--out", str(out), "--steps", "3", "--no-progress", *extra])


def test_anagram_writes_every_view_of_every_anagram(model_dir, tmp_path, capsys):
    assert _anagram(model_dir, tmp_path / "a", "--label", "6", "--view", "rot90", "--label", "9", "-n", "2",
                    "--seed", "5", "--rectify") == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["anagram0000-seed000005-view0-identity.png", "anagram0000-seed000005-view1-rot90.png",
                     "anagram0001-seed000006-view0-identity.png", "anagram0001-seed000006-view1-rot90.png", "grid.png"]
    upright = np.asarray(PIL.Image.open(tmp_path / "a" / files[0]))
    turned = np.asarray(PIL.Image.open(tmp_path / "a" / files[1]))
    assert np.array_equal(turned, np.rot90(upright, 1))  # the same image, as the rot90 view shows it
    with PIL.Image.open(tmp_path / "a" / files[1]) as image:
        record = json.loads(image.text["diffkit"])
        assert "Anagram: identity=6, rot90=9, View: rot90" in image.text["parameters"]
    assert record["conditions"] == [["identity", "label", 6], ["rot90", "label", 9]] and record["rectify"] is True
    # anagram i depends on its seed alone: the second anagram again, alone, from seed 6
    assert _anagram(model_dir, tmp_path / "b", "--label", "6", "--view", "rot90", "--label", "9", "--seed", "6",
                    "--rectify") == 0
    again = np.asarray(PIL.Image.open(tmp_path / "b" / "anagram0000-seed000006-view0-identity.png"))
    assert np.array_equal(again, np.asarray(PIL.Image.open(tmp_path / "a" / files[2])))
    assert "wrote 2 anagrams" in capsys.readouterr().out


def test_anagram_overwrite_rules(model_dir, tmp_path, capsys):
    args = ("--label", "1", "--view", "vflip", "--label", "7")
    assert _anagram(model_dir, tmp_path / "o", *args) == 0
    assert _anagram(model_dir, tmp_path / "o", *args) == 2
    assert "exists" in capsys.readouterr().err
    assert _anagram(model_dir, tmp_path / "o", *args, "--overwrite") == 0
    foreign = tmp_path / "o" / "anagram0000-seed000000-view0-identity.png"
    PIL.Image.new("RGB", (8, 8)).save(foreign)
    assert _anagram(model_dir, tmp_path / "o", *args, "--overwrite") == 2
    assert "not written by diffkit" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--label", "6"], "give at least two conditions"),
        (["--label", "6", "--view", "rot90"], "--view rot90 names no condition"),
        (["--label", "6", "--view", "blur", "--label", "9"], "--view blur: unknown view 'blur'"),
        (["--view", "rot90", "--view", "vflip", "--label", "9"], "is followed by another --view"),
        (["--label", "6", "--prompt", "a cat"], "not both"),
        (["--label", "6", "--view", "rot90", "--label", "12"], "--label must lie in \\[0, 9\\]"),
        (["--prompt", "a", "--view", "rot90", "--prompt", "b"], "class-conditional: use --label"),
        (["--prompt", "a", "--view", "rot90", "--prompt", "b", "--balance"], "--balance .* needs --label"),
        (["--label", "6", "--view", "rot90", "--label", "9", "--steps", "0"], "--steps: must be a positive integer"),
    ],
)
def test_anagram_errors_are_one_line(model_dir, tmp_path, capsys, args, message):
    assert _anagram(model_dir, tmp_path / "e", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not (tmp_path / "e").exists()  # nothing written, no empty folder left


def test_upscale_writes_a_png_with_its_record(tmp_path, capsys):
    low = tmp_path / "digit.png"
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(low)
    assert main(["upscale", str(low), "--simulate", "--out", str(tmp_path / "up.png")]) == 0
    with PIL.Image.open(tmp_path / "up.png") as image:
        assert image.size == (16, 16)  # 16 -> 8 (simulated) -> 16
        assert "Upscale: x2, Noise weighting: UPSR" in image.text["parameters"]
        assert json.loads(image.text["diffkit"])["simulate"] is True
    assert main(["upscale", str(low), "--no-weighting", "--out", str(tmp_path / "up2.png")]) == 0
    assert PIL.Image.open(tmp_path / "up2.png").size == (32, 32)
    assert main(["upscale", str(low), "--out", str(tmp_path / "up2.png")]) == 2
    assert "exists" in capsys.readouterr().err


def test_upscale_errors(tmp_path, capsys, model_dir):
    odd = tmp_path / "odd.png"
    PIL.Image.new("RGB", (15, 16)).save(odd)
    assert main(["upscale", str(odd), "--simulate", "--out", str(tmp_path / "x.png")]) == 2
    assert "multiples of 2" in capsys.readouterr().err
    assert main(["upscale", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["upscale", str(odd), "--model", str(model_dir), "--out", str(tmp_path / "x.png")]) == 2
    assert "needs an UpscalePipeline, got GuidedPipeline" in capsys.readouterr().err
    assert main(["upscale", str(odd), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must name a .png file" in capsys.readouterr().err
