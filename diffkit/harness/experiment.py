"""Run a card: every method of a card for one seed, each from the same data split and the same initial weights,
returning one record per run (card, method, seed, metrics, wall time, versions)."""

import platform
import time

import torch
from accelerate import Accelerator

from .. import __version__
from .adadagrad import StepsToTarget
from .attribution import signal_mass
from .binary import BinaryDiagnostics, binary_layers
from .condensation import evaluate_synset
from .cards import MODEL_LAYER_KEYS, component_spec, method_config
from .diffgrad import function_1d, global_minimum_1d
from .loop import HOOK_POINTS, accuracy, gather_rows, train
from .models import mlp
from .data import HarnessData, inr_grid
from .noise2score import image_psnr
from .shift import ShiftDiagnostics, ShiftLinear
from .statsq import LevelFlips
from .registry import (ALGORITHMS, DATA_METHODS, DATASETS, IMAGE_SETS, INITIALIZERS, INR_TARGETS, LAYERS, LOSSES,
                       MODELS, NOISES, OPTIMIZERS)


def versions() -> dict:
    import accelerate

    return {"diffkit": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


def _build(registry, spec, *context):
    name, params = component_spec(spec, registry.kind)
    return registry.build(name, *context, **params)


def build_data(config: dict, seed: int):
    name, params = component_spec(config["data"], "data")
    methods = params.pop("methods", [])
    data = DATASETS.build(name, seed, **params)
    for method in methods:
        data = _build(DATA_METHODS, method, data, seed)
    return data


def build_model(config: dict, data, epochs: int):
    """The model and the hooks its layers need (ReSTE's annealing, binary, shift and level-flip diagnostics); a
    ``reparam`` layer (weight compander) is applied to the built model."""
    name, params = component_spec(config["model"], "model")
    hooks, layers = [], {}
    for key in MODEL_LAYER_KEYS:
        if key in params:
            layers[key], layer_hooks = _build(LAYERS, params.pop(key), epochs)
            hooks += layer_hooks
    reparam = layers.pop("reparam", None)
    model = MODELS.build(name, data.num_features, data.num_classes, **params, **layers)
    if reparam is not None:
        reparam(model)
    if binary_layers(model):
        hooks.append(BinaryDiagnostics())
    if any(isinstance(m, ShiftLinear) for m in model.modules()):
        hooks.append(ShiftDiagnostics())
    if any(hasattr(m, "integer_weight") for m in model.modules()):
        hooks.append(LevelFlips())
    return model, hooks


@torch.no_grad()
def _noisy_train_fit(model, data, accelerator) -> float:
    """Share of the relabelled training samples whose (wrong) noisy label the model predicts: memorisation."""
    flipped = data.y_train != data.train_extra["y_clean"]
    device = accelerator.device
    return accuracy(model, data.x_train[flipped].to(device), data.y_train[flipped].to(device), accelerator)


def _classify(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    budget = config["budget"]
    data = build_data(config, seed)
    torch.manual_seed(seed)  # the same initial weights for every method of this seed
    model, hooks = build_model(config, data, budget["epochs"])
    optimizer = _build(OPTIMIZERS, config["optimizer"], model.parameters())
    gather = accelerator.gather if accelerator.num_processes > 1 else None
    criterion = _build(LOSSES, config.get("loss", "ce"), len(data.y_train), data.num_classes, gather)
    algorithm = _build(ALGORITHMS, config.get("algorithm", "erm"))
    if any(hasattr(algorithm, point) for point in HOOK_POINTS):  # an algorithm with hook methods (CGA) is a hook too
        hooks.append(algorithm)
    if budget["target_accuracy"] is not None:
        hooks.append(StepsToTarget(data.x_test, data.y_test, budget["target_accuracy"], budget["eval_steps"]))
    state = train(model, data, optimizer=optimizer, criterion=criterion, epochs=budget["epochs"],
                  batch_size=budget["batch_size"], seed=seed, algorithm=algorithm, hooks=hooks,
                  eval_every=budget["eval_every"], accelerator=accelerator, progress=progress)
    net, device = state.unwrapped_model.eval(), accelerator.device
    metrics = {"test_accuracy": accuracy(net, data.x_test.to(device), data.y_test.to(device), accelerator),
               "train_loss": state.history[-1]["train_loss"], **state.logs}
    evaluated = [h["test_accuracy"] for h in state.history if "test_accuracy" in h]
    if evaluated:
        metrics["best_test_accuracy"] = max(evaluated)
    if "signal_mask" in data.test_extra:
        def mass(x, y, mask):
            return signal_mass(net, x, y, mask)

        tensors = (data.x_test.to(device), data.y_test.to(device), data.test_extra["signal_mask"].to(device))
        metrics["signal_mass"] = gather_rows(mass, len(data.y_test), accelerator, *tensors).nanmean().item()
    if "y_clean" in data.train_extra:
        metrics["noisy_train_fit"] = _noisy_train_fit(net, data, accelerator)
    accelerator.free_memory()
    return metrics


class PSNRCurve:
    """Hook: PSNR of the model's fit to the whole target before every ``every``-th step and at the end, in dB with
    the target's peak-to-peak range as the peak."""

    def __init__(self, data, every: int):
        if not (isinstance(every, int) and every > 0):
            raise ValueError(f"eval_steps must be a positive int, got {every!r}")
        self.data, self.every, self.curve = data, every, []

    @torch.no_grad()
    def _evaluate(self, state) -> None:
        device = state.accelerator.device
        x, y = self.data.x_train.to(device), self.data.y_train.to(device)
        mse = (state.unwrapped_model(x) - y).square().mean()
        self.curve.append([state.step, (10 * torch.log10((y.max() - y.min()) ** 2 / mse)).item()])

    def on_step_start(self, state) -> None:
        if state.step % self.every == 0:
            self._evaluate(state)

    def on_train_end(self, state) -> None:
        self._evaluate(state)


def _inr(config: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    """Fit an implicit neural representation (coordinates -> values) full-batch for ``budget.steps`` steps."""
    budget = config["budget"]
    target = _build(INR_TARGETS, config["data"])
    data = inr_grid(target)
    name, params = component_spec(config["model"], "model")
    init = params.pop("init", "siren")
    torch.manual_seed(seed)
    model = MODELS.build(name, data.num_features, 1, **params)
    _build(INITIALIZERS, init, model, target, torch.Generator().manual_seed(seed))
    optimizer = _build(OPTIMIZERS, config["optimizer"], model.parameters())
    curve = PSNRCurve(data, budget["eval_steps"])

    def mse(prediction, y, index=None):
        return (prediction - y).square().mean()

    train(model, data, optimizer=optimizer, criterion=mse, epochs=budget["steps"], batch_size=len(data.y_train),
          seed=seed, hooks=[curve], accelerator=accelerator, progress=progress)
    values = [v for _, v in curve.curve]
    quarter = next(v for step, v in curve.curve if step >= budget["steps"] // 4)
    return {"psnr": values[-1], "best_psnr": max(values), "psnr_quarter": quarter, "curves": {"psnr": curve.curve}}


def _denoise(config: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    """Train a denoiser on noisy images (Noise2Score sees only those; the supervised reference also the clean ones)
    and report the mean per-image PSNR of its estimate and of the noisy input on the held-out images, both clipped to
    [0, 1] as the reference's ``forward_psnr`` clips its estimate, so clipping alone earns no gain."""
    budget = config["budget"]
    name, params = component_spec(config["data"], "data")
    noise = _build(NOISES, params.pop("noise"))
    clean_train, clean_test = IMAGE_SETS.build(name, **params)
    # the noise draw is fixed per seed, like a data set of noisy photographs; the same for every method of a seed
    data = HarnessData(noise.sample(clean_train, 50_000 + 2 * seed), clean_train,
                       noise.sample(clean_test, 50_001 + 2 * seed), clean_test, num_classes=0)
    name, params = component_spec(config["model"], "model")
    torch.manual_seed(seed)
    channels = clean_train.shape[1]
    model = MODELS.build(name, channels, channels, **params)
    optimizer = _build(OPTIMIZERS, config["optimizer"], model.parameters())
    criterion = _build(LOSSES, config.get("loss", "mse"), len(clean_train), 0, None)
    algorithm = _build(ALGORITHMS, config["algorithm"])
    state = train(model, data, optimizer=optimizer, criterion=criterion, epochs=budget["epochs"],
                  batch_size=budget["batch_size"], seed=seed, algorithm=algorithm, accelerator=accelerator,
                  progress=progress)
    device = accelerator.device
    y, x = data.x_test.to(device), data.y_test.to(device)
    estimate = algorithm.estimate(state.unwrapped_model.eval(), y, noise)
    psnr, noisy = image_psnr(estimate.clamp(0, 1), x).mean().item(), image_psnr(y.clamp(0, 1), x).mean().item()
    return {"psnr": psnr, "psnr_noisy": noisy, "psnr_gain": psnr - noisy}


def _grow(config: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    """A ``grow`` card: erm trains the MLP of twice the members' width from scratch for ``budget.epochs``; a growth
    algorithm trains two template members for ``member_epochs`` each, grows them, and trains the grown MLP for the
    remaining epochs (a fresh optimizer, as for a new network), so every method takes the same number of steps."""
    budget = config["budget"]
    data = build_data(config, seed)
    name, params = component_spec(config["model"], "model")
    criterion = _build(LOSSES, config.get("loss", "ce"), len(data.y_train), data.num_classes, None)
    algorithm = _build(ALGORITHMS, config.get("algorithm", "erm"))
    device = accelerator.device

    def fit(model, epochs, run_seed):
        optimizer = _build(OPTIMIZERS, config["optimizer"], model.parameters())
        state = train(model, data, optimizer=optimizer, criterion=criterion, epochs=epochs,
                      batch_size=budget["batch_size"], seed=run_seed, hooks=(), eval_every=budget["eval_every"],
                      accelerator=accelerator, progress=progress)
        return state.unwrapped_model.eval(), state

    def test_accuracy(model):
        return accuracy(model, data.x_test.to(device), data.y_test.to(device), accelerator)

    torch.manual_seed(seed)  # the same members (and so the same grown diagonal) for every growth method of a seed
    metrics = {}
    if hasattr(algorithm, "grow"):
        members = [MODELS.build(name, data.num_features, data.num_classes, **params) for _ in range(2)]
        # the members see the data in different orders, as two independently trained networks would
        members = [fit(m, algorithm.member_epochs, 2 * seed + i)[0] for i, m in enumerate(members)]
        model = algorithm.grow(*members, torch.Generator().manual_seed(seed)).to(device)
        metrics["members_test_accuracy"] = sum(map(test_accuracy, members)) / 2
        metrics["grown_test_accuracy"] = test_accuracy(model)
        epochs = budget["epochs"] - algorithm.member_epochs
    else:
        p = MODELS.check(name, params)
        model, epochs = mlp(data.num_features, data.num_classes, [2 * p["hidden"]] * p["depth"]), budget["epochs"]
    net, state = fit(model, epochs, seed)
    metrics.update(test_accuracy=test_accuracy(net), train_loss=state.history[-1]["train_loss"])
    evaluated = [h["test_accuracy"] for h in state.history if "test_accuracy" in h]
    if evaluated:
        metrics["best_test_accuracy"] = max(evaluated)
    accelerator.free_memory()
    return metrics


def condensed_set(config: dict, seed: int, device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Build one method's condensed set (random real images, DC or DCC) from the standardised training images of
    a ``condense`` card's data. Returns the set (``x_syn``, ``y_syn``, in standardised units), the matching-loss
    ``curve``, the standardised test set, ``make_net`` and the standardisation ``mean`` / ``std``."""
    data = build_data(config, seed)
    if data.image_shape is None:
        raise ValueError(f"a condense card needs an image data set, got {config['data']!r}")
    x, x_test = data.x_train.view(-1, *data.image_shape), data.x_test.view(-1, *data.image_shape)
    mean, std = x.mean(), x.std()  # DC normalises images by the training set's statistics
    x, x_test = ((x - mean) / std).to(device), ((x_test - mean) / std).to(device)
    name, params = component_spec(config["model"], "model")

    def make_net():
        return MODELS.build(name, data.image_shape, data.num_classes, **params)

    condensation = _build(ALGORITHMS, config["algorithm"])
    torch.manual_seed(seed)  # the same sequence of networks for DC and DCC
    x_syn, y_syn, curve = condensation.build(x, data.y_train.to(device), data.num_classes, make_net,
                                             torch.Generator().manual_seed(seed), progress)
    return {"x_syn": x_syn, "y_syn": y_syn, "curve": curve, "x_test": x_test, "y_test": data.y_test.to(device),
            "make_net": make_net, "mean": mean.item(), "std": std.item()}


def _condense(config: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    """A ``condense`` card: build the condensed set, train ``budget.eval_models`` fresh networks on it (DC's
    ``evaluate_synset``) and report their mean test accuracy. The data split, the networks' initialisations and the
    evaluation seeds are shared by every method of a seed."""
    budget = config["budget"]
    built = condensed_set(config, seed, accelerator.device, progress)
    accuracies = []
    for i in range(budget["eval_models"]):
        torch.manual_seed(90_000 + 100 * seed + i)  # evaluation networks independent of how the set was made
        accuracies.append(evaluate_synset(built["x_syn"], built["y_syn"], built["x_test"], built["y_test"],
                                          built["make_net"], epochs=budget["epochs"],
                                          generator=torch.Generator().manual_seed(i)))
    metrics = {"test_accuracy": sum(accuracies) / len(accuracies),
               "test_accuracy_min": min(accuracies), "test_accuracy_max": max(accuracies)}
    if built["curve"]:
        metrics["final_matching_loss"] = built["curve"][-1][1]
        metrics["curves"] = {"matching_loss": built["curve"]}
    return metrics


def _function_1d(config: dict, card: dict) -> dict:
    """diffGrad's analytical experiment: minimise each 1-D function from x0; x and the gap to the global minimum."""
    budget, metrics = config["budget"], {}
    for name in card["data"]["functions"]:
        f = function_1d(name)
        x = torch.tensor([float(budget["x0"])], dtype=torch.float64, requires_grad=True)
        optimizer = _build(OPTIMIZERS, config["optimizer"], [x])
        for _ in range(budget["steps"]):
            optimizer.zero_grad()
            f(x).sum().backward()
            optimizer.step()
        metrics[f"{name}_x"] = x.item()
        metrics[f"{name}_gap"] = f(x.detach()).item() - global_minimum_1d(name)[1]
    return metrics


def run_method(card: dict, method: str, seed: int, accelerator: Accelerator | None = None, progress: bool = True) -> dict:
    """Train and evaluate one method of a (validated) card for one seed; returns the result record."""
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    config = method_config(card, method)
    accelerator = accelerator or Accelerator()
    start = time.perf_counter()
    if card["task"] == "function_1d":
        metrics = _function_1d(config, card)
    elif card["task"] == "inr":
        metrics = _inr(config, seed, accelerator, progress)
    elif card["task"] == "denoise":
        metrics = _denoise(config, seed, accelerator, progress)
    elif card["task"] == "grow":
        metrics = _grow(config, seed, accelerator, progress)
    elif card["task"] == "condense":
        metrics = _condense(config, seed, accelerator, progress)
    else:
        metrics = _classify(config, card, seed, accelerator, progress)
    curves = metrics.pop("curves", None)
    record = {
        "card": card["name"], "method": method, "seed": seed,
        "metrics": {k: metrics[k] for k in card["metrics"] if k in metrics},
        "wall_s": round(time.perf_counter() - start, 3),
        "baseline": card["baseline"], "metric": card["metric"], "paper": card["paper"], "expected": card["expected"],
        "num_processes": accelerator.num_processes, "threads": torch.get_num_threads(), "versions": versions(),
    }
    if curves:  # per-step curves (batch size, accuracy) ride along in the record; the report summarises them
        record["curves"] = curves
    return record
