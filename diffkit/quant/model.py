"""Post-training quantisation of a diffusers denoising network (PTQ4DM, Shang et al. CVPR 2023; Q-Diffusion's shortcut
split): UNet2DModel, UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel or any diffusers model.

``quantize_model`` copies the network, splits a UNet's decoder shortcuts, quantises every Conv2d/Linear weight
per output channel (the first and last layers at 8 bits), then runs the calibration set through it and sets one
input range per layer.

Not implemented: AdaRound / BRECQ block reconstruction (Q-Diffusion's, and PTQ4DM's optional QDrop path); the
released PTQ4DM DNTC script does not run it, so W8A8 is PTQ4DM as released, but 4-bit-weight results here are
round-to-nearest after the range search, without the reconstruction that Q-Diffusion's W4 numbers rely on. The result is a ``QuantizedModel``: a diffusers model component that saves integer
weights and ranges as safetensors plus a JSON recipe, and loads back through ``from_pretrained``.
"""

import copy

import diffusers
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .calibration import CalibrationSet, _map, build_calibration_set, denoising_network
from .layers import QuantizedLayer, SplitShortcut
from .scales import METHODS, activation_range, one_sided, symmetric_range


BIT_WIDTHS = {"w8a8": (8, 8), "w4a8": (4, 8)}
ACT_CALIBRATIONS = ("pooled", "symmetric_ema")
EMA_MOMENTUM = 0.9  # QDrop's update_quantize_range: running = 0.1 * new + 0.9 * running
SAMPLES_PER_LAYER = 2**16  # observed input values kept per layer (per batch for "symmetric_ema") for the search


def find_io_layers(model: nn.Module, inputs: dict, sample_name: str) -> tuple[list[str], str]:
    """(the Conv2d / Linear layers that read the network input x_t itself, the last one to run), by one forward.

    PTQ4DM keeps the first and last layers' weights at 8 bits; here "first" is the layer that reads x_t (a UNet's
    conv_in, SD3's patch embedding, Flux's x_embedder), not the timestep MLP that may run before it.
    """
    sample, readers, order, hooks = inputs[sample_name], [], [], []

    def hook(name):
        def record(module, args):
            order.append(name)
            if args and args[0] is sample:
                readers.append(name)

        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        model(**inputs, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError(f"{type(model).__name__} ran no Conv2d or Linear layer: nothing to quantise")
    return sorted(set(readers)), order[-1]


def find_shortcut_splits(model: nn.Module, *example_args, **example_kwargs) -> dict[str, int]:
    """{name of a decoder ResNet's conv_shortcut: channels of h in its cat[h, skip] input}, found by one forward.

    A decoder block concatenates the running features h with one encoder skip before each ResNet; h has the
    block input's channels for the first ResNet and the previous ResNet's output channels after that.
    """
    splits, hooks = {}, []

    def on_up_block(name, block):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            for i, resnet in enumerate(block.resnets):
                if getattr(resnet, "conv_shortcut", None) is not None:
                    h = hidden.shape[1] if i == 0 else block.resnets[i - 1].out_channels
                    splits[f"{name}.resnets.{i}.conv_shortcut"] = h

        return hook

    for name, block in model.named_modules():
        if name.startswith("up_blocks.") and name.count(".") == 1 and hasattr(block, "resnets"):
            hooks.append(block.register_forward_pre_hook(on_up_block(name, block), with_kwargs=True))
    try:
        with torch.no_grad():
            model(*example_args, **example_kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return splits


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _structure(model: nn.Module, recipe: dict) -> nn.Module:
    """Apply a recipe's splits and quantised-layer slots to a float model, in place (weights untouched)."""
    for name, split in recipe["splits"].items():
        _replace(model, name, SplitShortcut(model.get_submodule(name), split))
    for name, (weight_bits, act_bits) in recipe["layers"].items():
        _replace(model, name, QuantizedLayer(model.get_submodule(name), weight_bits, act_bits))
    return model


class QuantizedModel(ModelMixin, ConfigMixin):
    """A diffusers model (``base_class`` with ``base_config``) with quantised layers as given by ``recipe``.

    Calls go straight to the wrapped model, and ``config`` is the wrapped model's, so a pipeline uses it
    exactly as it used the float UNet.
    """

    @register_to_config
    def __init__(self, base_class: str = "UNet2DModel", base_config: dict | None = None, recipe: dict | None = None):
        super().__init__()
        model_class = getattr(diffusers, base_class, None)
        if model_class is None or base_config is None or recipe is None:
            raise ValueError(f"QuantizedModel needs a diffusers model class (got {base_class!r}), its config and a recipe")
        self.model = _structure(model_class.from_config(base_config), recipe)
        self._int8 = None  # the compiled int8 model, see use_int8_kernels

    @property
    def config(self):  # noqa: D102 - the wrapped model's, so pipelines read sample_size etc. as before
        return self.model.config

    @property
    def recipe(self) -> dict:
        return self._internal_dict["recipe"]

    def forward(self, *args, **kwargs):
        if self._int8 is not None:
            from torch._inductor import config

            with config.patch(freezing=True):  # weights become constants: what lets inductor prepack int8 kernels
                return self._int8(*args, **kwargs)
        return self.model(*args, **kwargs)

    def use_int8_kernels(self, enabled: bool = True, reduce_range: bool | None = None) -> "QuantizedModel":
        """Run on oneDNN int8 kernels (x86 CPU) instead of the float simulation: the quantised layers become
        quantize / dequantize ops and the model is compiled by torch.compile (inductor, freezing), which fuses
        them into int8 convolutions and matmuls. The first call compiles (minutes on a small CPU).

        ``reduce_range`` (default: when the CPU lacks VNNI) spreads inputs over 7 bits, see
        ``QuantizedLayer.use_int8_graph``. Inference only (under ``torch.no_grad``).
        """
        if reduce_range is None:
            reduce_range = not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
        for module in self.model.modules():
            if isinstance(module, QuantizedLayer):
                module.use_int8_graph(enabled, reduce_range)
        # kept out of the module tree, so state_dict and save_pretrained see each weight once
        self.__dict__["_int8"] = torch.compile(self.model) if enabled else None
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)  # e.g. class_embedding, for the Denoiser's hooks


def _to(inputs: dict, device) -> dict:
    return {k: _map(v, lambda t: t.to(device)) for k, v in inputs.items()}


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calibration: CalibrationSet,
    bits: str = "w8a8",
    method: str = "lp",
    split_shortcuts: bool = True,
    batch_size: int | None = None,
    samples_per_layer: int | None = SAMPLES_PER_LAYER,
    act_calibration: str = "pooled",
    generator: torch.Generator | None = None,
) -> QuantizedModel:
    """Quantise a copy of a diffusers model (a UNet or a transformer) on a calibration set; the original is left
    as it is. Every Conv2d and Linear is quantised; the layers that read x_t keep float inputs and, with the
    last layer, 8-bit weights.

    ``bits``: "w8a8" or "w4a8"; ``method``: "absmax", "percentile" or "lp" (PTQ4DM's p = 2.4 search) for the
    weight ranges and, with ``act_calibration="pooled"``, the input ranges: one search per layer over
    ``samples_per_layer`` input values drawn from the whole calibration set, run with float inputs, in batches
    of ``batch_size`` (128). ``act_calibration="symmetric_ema"`` is the released PTQ4DM code's procedure instead:
    the set runs in batches of ``batch_size`` (256, as there) with every layer already quantising its input, and
    at each batch each layer searches its input's range symmetrically (``scales.symmetric_range``; one-sided for
    a tensor that is all >= 0 or all <= 0 on the first batch) and keeps an exponential moving average (momentum
    0.9) of it. The search is over ``samples_per_layer`` random values of the batch (``None``: all of them), its
    candidate ranges from the whole batch's max |x|.
    """
    if bits not in BIT_WIDTHS:
        raise ValueError(f"bits must be one of {sorted(BIT_WIDTHS)}, got {bits!r}")
    if method not in METHODS:
        raise ValueError(f"range method must be one of {METHODS}, got {method!r}")
    if act_calibration not in ACT_CALIBRATIONS:
        raise ValueError(f"act_calibration must be one of {ACT_CALIBRATIONS}, got {act_calibration!r}")
    if act_calibration == "symmetric_ema" and method != "lp":
        raise ValueError(f"act_calibration='symmetric_ema' is PTQ4DM's Lp search; it needs method='lp', got {method!r}")
    if not isinstance(calibration, CalibrationSet) or len(calibration) == 0:
        raise ValueError("calibration must be a non-empty CalibrationSet (see build_calibration_set)")
    if samples_per_layer is not None and (not isinstance(samples_per_layer, int) or samples_per_layer < 1):
        raise ValueError(f"samples_per_layer must be a positive integer or None, got {samples_per_layer!r}")
    batch_size = batch_size or (256 if act_calibration == "symmetric_ema" else 128)
    weight_bits, act_bits = BIT_WIDTHS[bits]
    generator = generator or torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    work = copy.deepcopy(model).float().eval()
    example = _to(calibration.inputs(slice(0, 1)), device)
    splits = find_shortcut_splits(work, **example) if split_shortcuts else {}
    for name, split in splits.items():
        _replace(work, name, SplitShortcut(work.get_submodule(name), split))
    readers, last = find_io_layers(work, example, calibration.sample_name)

    # weights: quantised once, per output channel
    layers = {}
    for name, module in list(work.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            layer_bits = (8 if name in readers or name == last else weight_bits, None if name in readers else act_bits)
            _replace(work, name, QuantizedLayer.from_float(module, *layer_bits, method))
            layers[name] = layer_bits
    quantized = {name: work.get_submodule(name) for name, (_, bits) in layers.items() if bits is not None}

    def subsample(values, count):
        keep = torch.randperm(len(values), generator=generator)[:count]
        return values[keep.to(values.device)].float().cpu()

    if act_calibration == "pooled":
        # observe every layer's float input over the calibration set (weights already quantised), keeping a
        # uniform random subset of values per layer, then choose each range
        observed = {name: [] for name in quantized}
        batches = -(-len(calibration) // batch_size)
        per_batch = None if samples_per_layer is None else -(-samples_per_layer // batches)

        def observe(name):
            def hook(module, args):
                values = args[0].detach().flatten()
                observed[name].append(subsample(values, per_batch) if per_batch else values.float().cpu())

            return hook

        for layer in quantized.values():
            layer.quantize_input = False
    else:
        state = {name: {} for name in quantized}

        def observe(name):
            def hook(module, args):  # runs before the layer quantises this batch's input with the updated range
                x = args[0].detach().float()
                values = x.flatten() if samples_per_layer is None else subsample(x.flatten(), samples_per_layer)
                side = state[name].setdefault("side", one_sided(x))
                low, high = symmetric_range(values, act_bits, side, bound=x.abs().max().cpu())
                if "range" in state[name]:
                    old_low, old_high = state[name]["range"]
                    low = (1 - EMA_MOMENTUM) * low + EMA_MOMENTUM * old_low
                    high = (1 - EMA_MOMENTUM) * high + EMA_MOMENTUM * old_high
                state[name]["range"] = (low, high)
                module.set_input_range(low.to(module.input_scale.device), high.to(module.input_scale.device))

            return hook

    hooks = [layer.register_forward_pre_hook(observe(name)) for name, layer in quantized.items()]
    try:
        for inputs in calibration.batches(batch_size):
            work(**_to(inputs, device), return_dict=False)
    finally:
        for hook in hooks:
            hook.remove()
    if act_calibration == "pooled":
        for name, layer in quantized.items():
            layer.set_input_range(*activation_range(torch.cat(observed[name]), act_bits, method))
            layer.quantize_input = True

    recipe = {"bits": bits, "act_bits": act_bits, "method": method, "act_calibration": act_calibration,
              "splits": splits, "layers": layers}
    result = QuantizedModel(type(model).__name__, dict(model.config), recipe)
    result.model.load_state_dict(work.state_dict())
    return result.to(device).eval()


def quantize_pipeline(pipe, bits: str = "w8a8", calibration: str = "ndtc", n: int = 1024, method: str = "lp",
                      split_shortcuts: bool = True, act_calibration: str = "pooled", generator: torch.Generator | None = None,
                      **calibration_kwargs):
    """Quantise the pipeline's denoising network (``pipe.unet`` or ``pipe.transformer``) in place (PTQ4DM) and
    return the pipeline.

    The calibration set is built by running the pipeline itself (``calibration``: one of ``POLICIES``; ``n``
    rows; ``calibration_kwargs`` go to ``build_calibration_set``, e.g. ``num_inference_steps``, ``batch_size``,
    ``prompts=[...]`` or ``prompt_embeds=``). The recipe, with the calibration settings, is saved with the model.
    """
    name, model = denoising_network(pipe)
    if isinstance(model, QuantizedModel):
        raise ValueError(f"this pipeline's {name} is already quantised")
    for label, value, allowed in (("bits", bits, sorted(BIT_WIDTHS)), ("range method", method, METHODS),
                                  ("act_calibration", act_calibration, ACT_CALIBRATIONS)):
        if value not in allowed:  # refused before the calibration run, not after it
            raise ValueError(f"{label} must be one of {allowed}, got {value!r}")
    generator = generator or torch.Generator().manual_seed(0)
    calib = build_calibration_set(pipe, n, calibration, generator=generator, **calibration_kwargs)
    quantized = quantize_model(model, calib, bits, method, split_shortcuts, act_calibration=act_calibration,
                               generator=generator)
    quantized.register_to_config(recipe={**quantized.recipe, "calibration": calibration, "n": n})
    pipe.register_modules(**{name: quantized})
    return pipe
