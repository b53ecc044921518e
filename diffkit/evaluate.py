"""Score a folder of generated images against a reference set: FD, precision / recall and class accuracy.

``evaluate(generated, reference)`` reads both sets from disk in batches of ``batch_size`` images, maps each
batch to features and forgets the pixels: FD is accumulated as a running mean and covariance
(``metrics.FeatureStats``, O(D^2) memory), precision / recall keeps the features (O(N D)) and runs the blocked
k-NN of ``metrics.precision_recall`` (O(N k)). Under ``accelerate launch`` each process takes a contiguous share
of the files and the statistics are combined.

Features come from the digits classifier by default (``"digits"``: its 128-dim penultimate layer on 16x16 images,
diffkit's FD), from Inception-v3 (``"inception"``: torch-fidelity's FID network, only from a weights file already
on disk, never downloaded), or from any network the user names: an ``nn.Module`` or a callable taking uint8
(N, 3, H, W) images and returning (N, D) features, or ``"package.module:name"`` importing one (a class or
function without arguments that returns it).
"""

import copy
import importlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics
from .classifier import load_classifier
from .distributed import gather_rows, process_share, process_state
from .folders import ImageSet, read_images, scan_folder, to_model_space, to_uint8


HELD_OUT = "held-out"
# torch-fidelity's FID Inception weights, under the name its downloader gives them
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class DigitsFeatures(torch.nn.Module):
    """The digits classifier's penultimate features (diffkit's FD embedding) of uint8 images resized to 16x16."""

    name = "digits"

    def __init__(self, classifier=None):
        super().__init__()
        # a copy: moving it to a device must not move the cached classifier that other code shares
        self.classifier = copy.deepcopy(classifier if classifier is not None else load_classifier())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(digits_input(images))


def digits_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as the digits classifier sees them: [-1, 1], resized to 16x16 (bilinear, antialiased)."""
    x = to_model_space(images)
    if x.shape[-2:] != (16, 16):
        x = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    return x


def _inception_weights(path: str | None) -> Path:
    candidates = [Path(path)] if path else [
        Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints" / INCEPTION_WEIGHTS
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no Inception weights at {candidates[0]}; diffkit never downloads them: put torch-fidelity's "
                            f"{INCEPTION_WEIGHTS} there or name the file with features='inception:/path/to/weights.pth'")


def inception_features(weights_path: str | None = None) -> torch.nn.Module:
    """torch-fidelity's FID Inception-v3 (2048-dim pool features of uint8 images, resized to 299 inside), loaded
    from a weights file on disk."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError(f"features 'inception' needs torch-fidelity and its dependencies (pip install torch-fidelity): "
                          f"{err}") from None
    weights = _inception_weights(weights_path)
    network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))

    class Inception(torch.nn.Module):
        name = "inception"

        def __init__(self):
            super().__init__()
            self.network = network.eval()

        def forward(self, images):
            return self.network(images)[0]

    return Inception()


def feature_extractor(spec: str | Callable = "digits") -> Callable:
    """A feature network from its name (``"digits"``, ``"inception"``, ``"inception:/path/weights.pth"``), an
    importable ``"package.module:name"``, or a module / callable given directly."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"features must be a name, 'package.module:name' or a callable, got {spec!r}")
    if spec == "digits":
        return DigitsFeatures()
    if spec == "inception" or spec.startswith("inception:"):
        return inception_features(spec.partition(":")[2] or None)
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"features must be 'digits', 'inception[:weights.pth]' or 'package.module:name', got {spec!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"features {spec!r}: cannot import {attribute!r} from {module_name!r}: {err}") from None
    if isinstance(obj, type) or (not isinstance(obj, torch.nn.Module) and callable(obj) and _takes_no_arguments(obj)):
        obj = obj()  # a class or a factory
    if not callable(obj):
        raise TypeError(f"features {spec!r} is not callable")
    return obj


def _takes_no_arguments(fn) -> bool:
    import inspect

    try:
        return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                   for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


def _merge_stats(stats: metrics.FeatureStats, state) -> metrics.FeatureStats:
    """The FeatureStats of all processes' rows, merged in process order."""
    if state.num_processes == 1:
        return stats
    count = gather_rows(torch.tensor([[float(stats.count)]], dtype=torch.float64), state)
    mean = gather_rows(stats.mean[None], state)
    scatter = gather_rows(stats.scatter[None], state)
    merged = metrics.FeatureStats(len(stats.mean))
    for c, m, s in zip(count[:, 0].tolist(), mean, scatter):
        other = metrics.FeatureStats(len(stats.mean))
        other.count, other.mean, other.scatter = int(c), m, s
        merged.merge(other)
    return merged


class _Batches:
    """An image set as uint8 batches: files from disk, or the held-out digits (made at [-1, 1], rounded to 8 bits
    as a PNG stores them)."""

    def __init__(self, source: str | Path, what: str):
        self.what = what
        if str(source) == HELD_OUT:
            from .data import colored_digits

            images, labels = colored_digits("test", seed=1)
            self.images, self.set = to_uint8(images), ImageSet([], labels.tolist())
        else:
            self.images, self.set = None, scan_folder(source)

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.set)

    def batches(self, rows: range, batch_size: int):
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            images = self.images[start:stop] if self.images is not None else read_images(self.set.paths[start:stop])
            labels = torch.tensor(self.set.labels[start:stop]) if self.set.labels is not None else None
            yield images, labels


@torch.no_grad()
def _scan(source: _Batches, features: Callable, classifier, keep_features: bool, batch_size: int, state, device,
          progress: bool):
    """Stream one set through the feature network (and the classifier): merged FeatureStats, the gathered features
    (if kept) and (correct, total) class counts."""
    stats, kept = None, []
    correct = total = 0
    rows = process_share(len(source), state)
    bar = tqdm(total=rows.stop - rows.start, desc=f"features ({source.what})", disable=not (progress and state.is_main_process))
    for images, labels in source.batches(rows, batch_size):
        feats = features(images.to(device)).float().cpu()
        if feats.ndim != 2 or len(feats) != len(images):
            raise ValueError(f"the feature network must map {len(images)} images to a ({len(images)}, D) tensor, got "
                             f"shape {tuple(feats.shape)}")
        stats = stats or metrics.FeatureStats(feats.shape[1])
        stats.update(feats)
        if keep_features:
            kept.append(feats)
        if classifier is not None and labels is not None:
            correct += (classifier(digits_input(images.to(device))).argmax(1).cpu() == labels).sum().item()
            total += len(labels)
        bar.update(len(images))
    bar.close()
    # a process may have no rows (more processes than images): the feature size comes from the others
    dim = int(gather_rows(torch.tensor([[len(stats.mean) if stats else 0]]), state).max())
    stats = _merge_stats(stats or metrics.FeatureStats(dim), state)
    counts = gather_rows(torch.tensor([[correct, total]], dtype=torch.float64), state).sum(0).tolist()
    gathered = gather_rows(torch.cat(kept) if kept else torch.zeros(0, dim), state) if keep_features else None
    return stats, gathered, counts


def evaluate(
    generated: str | Path,
    reference: str | Path = HELD_OUT,
    *,
    features: str | Callable = "digits",
    k: int = 3,
    batch_size: int = 250,
    precision_recall: bool = True,
    class_accuracy: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """FD, precision / recall and class accuracy of the images in folder ``generated`` against ``reference`` (a
    folder, or ``"held-out"``: the 500 held-out coloured digits).

    Returns ``{"fd", "precision", "recall", "class_accuracy", "reference_class_accuracy", "n_generated",
    "n_reference", "features", "k"}``; precision / recall are ``None`` when ``precision_recall=False`` (then memory
    does not grow with the number of images), class accuracies ``None`` where a set has no labels (a
    ``diffkit generate`` folder has them in its manifest; a reference folder in its class sub-folders).
    """
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (isinstance(k, int) and k > 0):
        raise ValueError(f"k must be a positive int, got {k!r}")
    state = process_state()
    device = state.device if device is None else torch.device(device)  # by default each process its accelerator
    gen, ref = _Batches(generated, "generated"), _Batches(reference, "reference")
    for source in (gen, ref):
        if len(source) <= max(k, 1):
            raise ValueError(f"the {source.what} set needs more than {max(k, 1)} images, got {len(source)}")
    network = feature_extractor(features)
    if isinstance(network, torch.nn.Module):
        network = network.to(device).eval()
    classifier = load_classifier(device=str(device)) if class_accuracy else None
    results = {}
    for source in (gen, ref):
        results[source.what] = _scan(source, network, classifier, precision_recall, batch_size, state, device, progress)
    (gen_stats, gen_feats, gen_counts), (ref_stats, ref_feats, ref_counts) = results["generated"], results["reference"]
    precision = recall = None
    if precision_recall:
        precision, recall = metrics.precision_recall(ref_feats, gen_feats, k=k)
    return {
        "fd": metrics.frechet_distance(gen_stats, ref_stats),
        "precision": precision,
        "recall": recall,
        "class_accuracy": gen_counts[0] / gen_counts[1] if gen_counts[1] else None,
        "reference_class_accuracy": ref_counts[0] / ref_counts[1] if ref_counts[1] else None,
        "n_generated": len(gen),
        "n_reference": len(ref),
        "features": getattr(network, "name", type(network).__name__),
        "k": k,
    }
