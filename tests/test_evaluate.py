"""diffkit.evaluate and diffkit.folders: image sets on disk scored in batches, against in-memory computations."""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from diffkit import metrics
from diffkit.data import colored_digits
from diffkit.evaluate import evaluate, feature_extractor
from diffkit.folders import read_images, read_manifest, scan_folder, to_model_space, to_uint8
from diffkit.images import save_png_atomic, to_pil
from standin_features import StandInFeatures


pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _write(folder: Path, images: torch.Tensor, labels=None, layout: str = "classes") -> None:
    """PNG files in class sub-folders ("classes"), flat ("flat"), or flat with a generate-style manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, image in enumerate(to_pil(images)):
        if layout == "classes":
            (folder / str(int(labels[i]))).mkdir(exist_ok=True)
            save_png_atomic(image, folder / str(int(labels[i])) / f"{i:05d}.png")
        else:
            save_png_atomic(image, folder / f"{i:05d}.png")
            records.append({"file": f"{i:05d}.png", "seed": i, **({"label": int(labels[i])} if labels is not None else {})})
    if layout == "manifest":
        (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def digit_sets(tmp_path_factory):
    """The held-out digits in class sub-folders, and 300 training digits (other colours) with a manifest."""
    root = tmp_path_factory.mktemp("sets")
    held, held_labels = colored_digits("test", seed=1)
    _write(root / "held", held, held_labels, "classes")
    train, train_labels = colored_digits("train", seed=5)
    train, train_labels = train[::15][:300], train_labels[::15][:300]
    _write(root / "gen", train, train_labels, "manifest")
    return root, (held, held_labels), (train, train_labels)


def test_folder_layouts(tmp_path):
    images = torch.rand(6, 3, 4, 4) * 2 - 1
    _write(tmp_path / "a", images, [3, 3, 7, 7, 7, 9], "classes")
    found = scan_folder(tmp_path / "a")
    assert found.labels == [3, 3, 7, 7, 7, 9] and found.class_names == ["3", "7", "9"]
    assert torch.equal(read_images(found.paths), to_uint8(images))  # PNG round trip is the 8-bit rounding
    for i, name in enumerate(["cat", "dog"]):  # names that are not numbers: sorted order
        (tmp_path / "b" / name).mkdir(parents=True)
        save_png_atomic(to_pil(images[:1])[0], tmp_path / "b" / name / "x.png")
    assert scan_folder(tmp_path / "b").labels == [0, 1]
    _write(tmp_path / "c", images, None, "flat")
    assert scan_folder(tmp_path / "c").labels is None and len(scan_folder(tmp_path / "c")) == 6
    save_png_atomic(to_pil(images[:1])[0], tmp_path / "a" / "stray.png")
    with pytest.raises(ValueError, match="both at its top and in sub-folders"):
        scan_folder(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        scan_folder(tmp_path / "empty")


def test_manifest_lists_the_set_last_record_wins_and_a_torn_line_is_ignored(tmp_path):
    images = torch.rand(3, 3, 4, 4) * 2 - 1
    _write(tmp_path, images, [1, 2, 3], "manifest")
    save_png_atomic(to_pil(images[:1])[0], tmp_path / "grid.png")  # not in the manifest: not in the set
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write(json.dumps({"file": "00001.png", "label": 5}) + "\n" + '{"file": "000')
    found = scan_folder(tmp_path)
    assert [p.name for p in found.paths] == ["00000.png", "00001.png", "00002.png"] and found.labels == [1, 5, 3]
    (tmp_path / "00002.png").unlink()
    with pytest.raises(ValueError, match="lists 1 images that are missing, e.g. 00002.png"):
        scan_folder(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"file": "a.png"}\nnot json\n{"file": "b.png"}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_manifest(tmp_path / "manifest.jsonl")


def test_read_images_refuses_mixed_sizes_and_unreadable_files(tmp_path):
    save_png_atomic(to_pil(torch.zeros(1, 3, 4, 4))[0], tmp_path / "a.png")
    save_png_atomic(to_pil(torch.zeros(1, 3, 4, 6))[0], tmp_path / "b.png")
    with pytest.raises(ValueError, match="needs one size"):
        read_images([tmp_path / "a.png", tmp_path / "b.png"])
    assert read_images([tmp_path / "a.png", tmp_path / "b.png"], resolution=2).shape == (2, 3, 2, 2)
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        read_images([tmp_path / "c.png"])


def test_a_set_against_itself_scores_zero_fd_and_full_precision_recall(digit_sets):
    root, (held, labels), _ = digit_sets
    result = evaluate(root / "held", "held-out", progress=False)
    assert result["n_generated"] == result["n_reference"] == 500
    assert abs(result["fd"]) < 1e-6 and result["precision"] == result["recall"] == 1.0
    # the classifier's agreement, on the 8-bit images, equals the in-memory computation
    expected = metrics.class_accuracy(to_model_space(to_uint8(held)), labels)
    assert result["class_accuracy"] == pytest.approx(expected, abs=1e-6) and expected > 0.95
    assert result["reference_class_accuracy"] == pytest.approx(expected, abs=1e-6)


def test_streamed_scores_equal_the_in_memory_metrics(digit_sets):
    """FD from features streamed 32 images at a time equals FD of all features at once; precision / recall the
    dense computation; accuracy uses the labels of generate's manifest."""
    root, (held, held_labels), (gen, gen_labels) = digit_sets
    result = evaluate(root / "gen", root / "held", batch_size=32, progress=False)
    gen_feats = metrics.classifier_features(to_model_space(to_uint8(gen)))
    held_feats = metrics.classifier_features(to_model_space(to_uint8(held)))
    assert result["fd"] == pytest.approx(metrics.frechet_distance(gen_feats, held_feats), rel=1e-6)
    assert (result["precision"], result["recall"]) == metrics.precision_recall_dense(held_feats, gen_feats, k=3)
    assert result["class_accuracy"] == pytest.approx(
        metrics.class_accuracy(to_model_space(to_uint8(gen)), gen_labels), abs=1e-6)
    assert 0 < result["fd"] and result["features"] == "digits"
    lean = evaluate(root / "gen", root / "held", batch_size=500, precision_recall=False, class_accuracy=False, progress=False)
    assert lean["fd"] == pytest.approx(result["fd"], rel=1e-6)  # float32 features vary with the batch
    assert lean["precision"] is None and lean["class_accuracy"] is None


def test_a_user_named_feature_network(digit_sets):
    """A stand-in network given as a module or as 'module:name' gives FD on its own features."""
    root, (held, _), (gen, _) = digit_sets
    network = StandInFeatures()
    with torch.no_grad():
        expected = metrics.frechet_distance(network(to_uint8(gen)), network(to_uint8(held)))
    by_module = evaluate(root / "gen", root / "held", features=network, class_accuracy=False, progress=False)
    by_name = evaluate(root / "gen", root / "held", features="standin_features:StandInFeatures", class_accuracy=False,
                       progress=False)
    assert by_module["fd"] == pytest.approx(expected, rel=1e-6) and by_name["fd"] == pytest.approx(expected, rel=1e-6)
    assert by_name["features"] == "stand-in"
    digits_fd = evaluate(root / "gen", root / "held", class_accuracy=False, precision_recall=False, progress=False)["fd"]
    assert abs(digits_fd - expected) > 1e-3  # another network, another number: the option is not ignored


def test_fd_equals_torchmetrics_on_the_same_features(digit_sets):
    """torchmetrics' FID with a custom feature module (sums of features and outer products, then its own matrix
    square root) on the same images."""
    fid = pytest.importorskip("torchmetrics.image.fid")
    root, (held, _), (gen, _) = digit_sets

    class Module(StandInFeatures):
        num_features = 12

    metric = fid.FrechetInceptionDistance(feature=Module(), normalize=False)
    metric.update(to_uint8(held), real=True)
    metric.update(to_uint8(gen), real=False)
    ours = evaluate(root / "gen", root / "held", features=Module(), class_accuracy=False, progress=False)["fd"]
    assert ours == pytest.approx(metric.compute().item(), rel=1e-5)  # measured: 2.5e-8 apart


def test_fd_equals_torch_fidelity_on_the_same_features():
    fidelity = pytest.importorskip("torch_fidelity.metric_fid")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g, dtype=torch.float64)
    b = torch.randn(300, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    stats = [fidelity.fid_features_to_statistics(x) for x in (a, b)]
    expected = fidelity.fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_inception_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs torch-fidelity"):  # and never reaches for the network
            feature_extractor("inception")
        return
    with pytest.raises(FileNotFoundError, match="never downloads"):
        feature_extractor("inception")
    assert not any(tmp_path.rglob("*.pth"))


def test_bad_arguments_are_named(digit_sets, tmp_path):
    root, _, _ = digit_sets
    with pytest.raises(ValueError, match="features must be"):
        evaluate(root / "gen", features="nonsense", progress=False)
    with pytest.raises(ValueError, match="cannot import"):
        evaluate(root / "gen", features="standin_features:Nothing", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(root / "gen", batch_size=0, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(tmp_path / "none", progress=False)
    _write(tmp_path / "tiny", torch.zeros(3, 3, 16, 16), None, "flat")
    with pytest.raises(ValueError, match="more than 3 images"):
        evaluate(tmp_path / "tiny", progress=False)
    with pytest.raises(ValueError, match=r"\(50, D\) tensor"):
        evaluate(root / "held", features=lambda x: x.float().flatten(), class_accuracy=False, batch_size=50, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_score_like_one(digit_sets, tmp_path):
    """Each process reads its half of the files; features, statistics and counts are gathered."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not on PATH")
    root, _, _ = digit_sets
    script = tmp_path / "score.py"
    script.write_text(
        "import json, sys\nfrom accelerate import PartialState\nfrom diffkit.evaluate import evaluate\n"
        f"result = evaluate({str(root / 'gen')!r}, {str(root / 'held')!r}, batch_size=40, progress=False)\n"
        f"if PartialState().is_main_process:\n    open({str(tmp_path / 'two.json')!r}, 'w').write(json.dumps(result))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = evaluate(root / "gen", root / "held", batch_size=40, progress=False)
    assert two["fd"] == pytest.approx(one["fd"], rel=1e-9)
    assert (two["precision"], two["recall"], two["class_accuracy"]) == (one["precision"], one["recall"], one["class_accuracy"])
    assert two["n_generated"] == one["n_generated"] == 300
