"""diffkit generate at scale (resume, prompts files, manifest, several processes), diffkit eval and diffkit train,
on tiny models in temporary folders."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest
import torch

from diffkit.cli import main
from diffkit.folders import read_manifest, scan_folder
from test_cli import _gen


pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _in(folder: Path, monkeypatch) -> Path:
    """Run from ``folder`` (PNG records hold --out, so runs compared byte for byte write to the same relative name)."""
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    return folder / "gen"


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- generate ------------------------------------------------------------------------------------------------------


def test_resume_after_a_kill_writes_only_the_missing_and_incomplete_images(model_dir, tmp_path, capsys, monkeypatch):
    """What a kill leaves: some images, one cut short mid-write (its temporary file), one whole file truncated on
    disk afterwards, no grid and no manifest. --resume makes exactly those and ends byte for byte like a run that
    was never interrupted; the complete images are not touched."""
    args = ("--label", "1,4", "-n", "7", "--seed", "3", "--batch-size", "2")
    whole = _in(tmp_path / "whole", monkeypatch)
    assert _gen(model_dir, "gen", *args) == 0
    killed = _in(tmp_path / "killed", monkeypatch)
    assert _gen(model_dir, "gen", *args) == 0
    for name in ("label1-seed000007.png", "label4-seed000008.png", "grid.png", "manifest.jsonl"):
        (killed / name).unlink()
    (killed / ".label1-seed000007.png.x1y2.tmp").write_bytes(b"\x89PNG half")  # save_png_atomic's temporary
    (killed / ".manifest.jsonl.a1b2.tmp").write_text('{"file": "label1-seed')
    cut = killed / "label4-seed000004.png"
    cut.write_bytes(cut.read_bytes()[:-40])  # the pixel data cut short: the file is incomplete
    kept = killed / "label1-seed000003.png"
    before = (kept.stat().st_ino, kept.stat().st_mtime_ns)
    capsys.readouterr()
    assert _gen(model_dir, "gen", *args, "--resume") == 0
    assert "wrote 3 images (kept 4 from before)" in capsys.readouterr().out
    assert _files(killed) == _files(whole)
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == before
    assert not list(killed.glob(".*"))
    # resuming a finished run writes no image again
    assert _gen(model_dir, "gen", *args, "--resume") == 0
    assert _files(killed) == _files(whole)


def test_resume_refuses_other_settings_and_foreign_files(model_dir, tmp_path, capsys):
    assert _gen(model_dir, tmp_path, "--label", "2", "-n", "2") == 0
    capsys.readouterr()
    assert _gen(model_dir, tmp_path, "--label", "2", "-n", "3", "--guidance-scale", "5", "--resume") == 2
    err = capsys.readouterr().err
    assert "other settings (guidance_scale 3.0, now 5.0)" in err and err.count("\n") == 1
    assert not (tmp_path / "label2-seed000002.png").exists()  # refused before any work
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "label2-seed000001.png")
    assert _gen(model_dir, tmp_path, "--label", "2", "-n", "3", "--resume") == 2
    assert "not written by diffkit" in capsys.readouterr().err
    assert _gen(model_dir, tmp_path, "--label", "2", "--resume", "--overwrite") == 2
    assert "give one" in capsys.readouterr().err


@pytest.mark.slow
def test_a_process_killed_by_the_os_resumes_to_the_uninterrupted_files(model_dir, tmp_path, monkeypatch):
    """SIGKILL while a real `diffkit generate` writes, then --resume: byte-identical PNGs, grid and manifest."""
    args = ["--label", "0,1,2", "-n", "60", "--seed", "5", "--batch-size", "1", "--steps", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "diffkit", "generate", "--model", str(model_dir), "--no-progress", *args]
    killed = _in(tmp_path / "killed", monkeypatch)
    process = subprocess.Popen(command + ["--out", "gen"], env=env, stderr=subprocess.PIPE, cwd=killed.parent)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(killed.glob("label*.png"))) < 10:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list(killed.glob("label*.png")))
    assert 10 <= written < 60, "the run ended before it could be killed"
    assert main(["generate", "--model", str(model_dir), "--no-progress", *args, "--out", "gen", "--resume"]) == 0
    whole = _in(tmp_path / "whole", monkeypatch)
    assert main(["generate", "--model", str(model_dir), "--no-progress", *args, "--out", "gen"]) == 0
    assert _files(killed) == _files(whole)


def test_two_processes_write_the_same_files_as_one(model_dir, tmp_path, monkeypatch):
    """accelerate's launcher with 2 CPU processes (gloo): each writes its share; the files, the grid and the
    manifest are byte for byte those of one process."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not on PATH")
    args = ["generate", "--model", str(model_dir), "--label", "3,8", "-n", "5", "--steps", "3", "--batch-size", "2",
            "--no-progress", "--out", "gen"]
    one = _in(tmp_path / "one", monkeypatch)
    assert main(args) == 0
    two = _in(tmp_path / "two", monkeypatch)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "diffkit", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=two.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _files(two) == _files(one)
    assert len(_files(one)) == 5 + 2


def test_launched_cpu_processes_share_one_state(tmp_path):
    """Without a GPU a bare PartialState() leaves each launched process alone (DistributedType.NO, 1 process), so
    every one did all the work and the files of the test above were written twice, racing; process_state joins them."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not on PATH")
    script = tmp_path / "state.py"
    # one write per line (print writes its pieces separately, and the two processes share the pipe)
    script.write_text("import sys\nfrom diffkit.distributed import process_state\ns = process_state()\n"
                      "sys.stdout.write(f'process {s.process_index} of {s.num_processes}\\n')\nsys.stdout.flush()\n")
    # launched as a user does on a CPU machine, without ACCELERATE_USE_CPU (on a GPU machine the CPU must be asked for)
    env = {**{k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), **({"ACCELERATE_USE_CPU": "1"} if torch.cuda.is_available() else {})}
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("process")) == [
        "process 0 of 2", "process 1 of 2"]


def test_the_manifest_lists_what_was_written_and_eval_reads_its_labels(model_dir, tmp_path, capsys):
    assert _gen(model_dir, tmp_path, "--label", "3,7", "-n", "4", "--seed", "10", "--no-grid") == 0
    assert not (tmp_path / "grid.png").exists()
    records = read_manifest(tmp_path / "manifest.jsonl")
    assert records == [{"file": f"label{label}-seed{seed:06d}.png", "seed": seed, "label": label}
                       for seed, label in zip(range(10, 14), [3, 7, 3, 7])]
    assert scan_folder(tmp_path).labels == [3, 7, 3, 7]
    # a second run into the same folder adds its images; a file listed twice is described by its last line
    assert _gen(model_dir, tmp_path, "--label", "5", "-n", "2", "--seed", "0") == 0
    assert len(read_manifest(tmp_path / "manifest.jsonl")) == 6 and len(scan_folder(tmp_path)) == 6


def test_prompts_files_text_and_jsonl(model_dir, text_model_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    assert _gen(text_model_dir, tmp_path / "text", "--prompts-file", str(tmp_path / "prompts.txt")) == 0
    assert read_manifest(tmp_path / "text" / "manifest.jsonl") == [
        {"file": "prompt0-seed000000.png", "seed": 0, "prompt": "a red circle"},
        {"file": "prompt1-seed000001.png", "seed": 1, "prompt": "a blue square"}]  # -n: one image a prompt
    assert _gen(text_model_dir, tmp_path / "cycled", "--prompts-file", str(tmp_path / "prompts.txt"), "-n", "3") == 0
    assert sorted(p.name for p in (tmp_path / "cycled").glob("prompt*")) == [
        "prompt0-seed000000.png", "prompt0-seed000002.png", "prompt1-seed000001.png"]
    record = json.loads(PIL.Image.open(tmp_path / "cycled" / "prompt1-seed000001.png").text["diffkit"])
    assert record["prompt"] == "a blue square" and record["seed"] == 1
    # the same prompt and seed from a prompts file and from --prompt: the same pixels
    assert _gen(text_model_dir, tmp_path / "single", "--prompt", "a blue square", "-n", "2") == 0
    assert (PIL.Image.open(tmp_path / "single" / "prompt0-seed000001.png").tobytes()
            == PIL.Image.open(tmp_path / "cycled" / "prompt1-seed000001.png").tobytes())
    lines = [{"prompt": "a cat", "seed": 42, "negative_prompt": "blurry"}, {"prompt": "a dog"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert _gen(text_model_dir, tmp_path / "jsonl", "--prompts-file", str(tmp_path / "p.jsonl"), "--seed", "7") == 0
    image = PIL.Image.open(tmp_path / "jsonl" / "prompt0-seed000042.png")
    assert image.text["parameters"].splitlines()[:2] == ["a cat", "Negative prompt: blurry"]
    assert (tmp_path / "jsonl" / "prompt1-seed000008.png").is_file()  # no seed: --seed + its line index
    (tmp_path / "labels.jsonl").write_text('{"label": 3, "seed": 100}\n{"label": 9}\n')
    assert _gen(model_dir, tmp_path / "labels", "--prompts-file", str(tmp_path / "labels.jsonl")) == 0
    assert sorted(p.name for p in (tmp_path / "labels").glob("label*")) == ["label3-seed000100.png", "label9-seed000001.png"]


@pytest.mark.parametrize("content, name, extra, needle", [
    ('{"prompt": "a"}\n{"label": 1}\n', "p.jsonl", [], "mix of"),
    ('{"prompt": "a"}\nnot json\n', "p.jsonl", [], "line 2: not JSON"),
    ('{"prompt": "a", "steps": 3}\n', "p.jsonl", [], "unknown key 'steps'"),
    ('{"label": 1, "seed": -1}\n', "p.jsonl", [], '"seed" must be an integer'),
    ('{"label": 12}\n', "p.jsonl", [], "line 1: label 12 is out of range"),
    ('{"prompt": "a"}\n', "p.jsonl", [], "has prompts but this model is class-conditional"),
    ('{"label": 1}\n', "p.jsonl", ["-n", "3"], "leave -n out"),
    ('{"label": 1, "seed": 4}\n{"label": 2}\n{"label": 1, "seed": 4}\n', "p.jsonl", [], "lines 1 and 3 both make"),
    ("\n\n", "p.txt", [], "holds no prompts"),
])
def test_bad_prompts_files_are_one_line_and_write_nothing(model_dir, tmp_path, capsys, content, name, extra, needle):
    (tmp_path / name).write_text(content)
    assert _gen(model_dir, tmp_path / "out", "--prompts-file", str(tmp_path / name), *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


# -- eval and train ------------------------------------------------------------------------------------------------


def test_eval_command_prints_a_table_and_writes_json(model_dir, tmp_path, capsys):
    assert _gen(model_dir, tmp_path / "gen", "--label", "0,1,2,3,4,5,6,7,8,9", "-n", "20", "--steps", "2") == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "gen"), "--json", str(tmp_path / "scores.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "20 generated vs 500 reference images, digits features" in out and "| FD |" in out and "| recall |" in out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n_generated"] == 20 and scores["fd"] > 0 and 0 <= scores["class_accuracy"] <= 1
    assert main(["eval", str(tmp_path / "gen"), "--json", str(tmp_path / "scores.json"), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "mine.json").write_text("{}")
    assert main(["eval", str(tmp_path / "gen"), "--json", str(tmp_path / "mine.json"), "--overwrite", "--no-progress"]) == 2
    assert "not written by diffkit" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_command_trains_resumes_and_the_model_generates(tmp_path, capsys):
    recipe = {
        "name": "tiny", "data": {"source": "digits"}, "conditioning": {"type": "class"},
        "model": {"class": "UNet2DModel", "sample_size": 16, "in_channels": 3, "out_channels": 3,
                  "block_out_channels": [8, 16], "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
                  "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "num_class_embeds": 11},
        "scheduler": {"class": "DPMSolverMultistepScheduler", "prediction_type": "v_prediction"},
        "training": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1},
    }
    (tmp_path / "tiny.json").write_text(json.dumps(recipe))
    run = ["train", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(run + ["--stop-after", "2"]) == 0
    assert "to step 2 of 4" in capsys.readouterr().out
    assert main(run) == 0
    assert "to step 4 of 4 (resumed at step 2)" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "run" / "model"), "--label", "3", "-n", "1", "--steps", "2",
                 "--out", str(tmp_path / "images"), "--no-progress"]) == 0
    recipe["training"]["steps"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(recipe))
    assert main(["train", str(tmp_path / "bad.json"), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "training.steps must be an int >= 1" in err and err.count("\n") == 1 and not (tmp_path / "run2").exists()
    assert main(["train", "nonexistent", "--out", str(tmp_path / "run3")]) == 2
    assert "bundled name (default)" in capsys.readouterr().err
