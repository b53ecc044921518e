"""Recipes: one JSON or TOML file that says how to train a diffusion model, and ``train`` that follows it.

A recipe names a diffusers backbone and its config (``model``: ``UNet2DModel`` or ``DiTTransformer2DModel``), a
diffusers scheduler (``scheduler``: a VP one, e.g. ``DPMSolverMultistepScheduler`` with its ``prediction_type``, or
``FlowMatchEulerDiscreteScheduler`` for flow matching), the data (``data``: the bundled digits or an image folder
whose class sub-folders are labels), the conditioning (``conditioning``: by class, with the null class for
classifier-free guidance, or none), an optional ``vae`` (a diffusers AutoencoderKL folder: the model then learns
its latents), and the optimisation (``optimizer``: AdamW; ``lr_schedule``; ``training``; ``sampling`` for the grids
written while training). ``validate_recipe`` refuses unknown sections, keys, classes and config arguments and
checks that model, data and conditioning agree, before anything is built; defaults are filled in.

``load_recipe("default")`` is the recipe of the shipped default model (assets/default): ``build_model`` and
``build_scheduler`` build its UNet and scheduler, ``train`` retrains it. Bundled recipes live in
``diffkit/recipes/``.
"""

import copy
import inspect
import json
import math
import shutil
import tomllib
from pathlib import Path

import torch

from .folders import read_images, scan_folder, to_model_space


RECIPES = Path(__file__).resolve().parent / "recipes"
MODEL_CLASSES = ("UNet2DModel", "DiTTransformer2DModel")
REQUIRED = ("name", "model", "scheduler", "data", "training")
OPTIONAL = ("description", "conditioning", "vae", "optimizer", "lr_schedule", "sampling")
DATA_DEFAULTS = {
    "digits": {"split": "train", "set": "mnist", "colors": "random", "color_seed": 0},
    "folder": {"path": None, "resolution": None, "random_flip": False},
}
CONDITIONING_DEFAULTS = {"class": {"p_uncond": 0.1}, "none": {}}
OPTIMIZER_DEFAULTS = {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}  # AdamW
LR_SCHEDULES = ("constant", "cosine")
LR_SCHEDULE_DEFAULTS = {"name": "constant", "warmup_steps": 0}
TRAINING_DEFAULTS = {"steps": None, "batch_size": None, "gradient_accumulation_steps": 1, "max_grad_norm": 1.0,
                     "mixed_precision": None, "ema_decay": 0.999, "seed": 0, "checkpoint_every": 500,
                     "keep_checkpoints": 2, "log_every": 50, "timestep_sampling": "uniform"}
SAMPLING_DEFAULTS = {"every": 0, "num_images": 16, "num_inference_steps": 25, "guidance_scale": 3.0, "seed": 0,
                     "solver": None}
MIXED_PRECISION = (None, "no", "fp16", "bf16")
# what may change between a run and its resume: where and how often it writes, not what it computes
NOT_FINGERPRINTED = {"training": ("checkpoint_every", "keep_checkpoints", "log_every"), "sampling": None,
                     "description": None}


# -- reading and checking ------------------------------------------------------------------------------------------


def load_recipe(name_or_path: str | Path) -> dict:
    """A bundled recipe by name (``"default"``) or a ``.json`` / ``.toml`` file, validated, defaults filled in."""
    path = Path(name_or_path)
    if path.suffix not in (".json", ".toml"):
        bundled = RECIPES / f"{name_or_path}.json"
        if not bundled.is_file():
            names = sorted(p.stem for p in RECIPES.glob("*.json"))
            raise ValueError(f"recipe must be a .json or .toml file or a bundled name ({', '.join(names)}), got {str(name_or_path)!r}")
        path = bundled
    if not path.is_file():
        raise FileNotFoundError(f"no recipe at {path}")
    text = path.read_text()
    try:
        recipe = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"recipe {path} is not valid {path.suffix[1:].upper()}: {err}") from None
    return validate_recipe(recipe, source=str(path))


def _section(recipe: dict, name: str, defaults: dict, source: str) -> dict:
    value = recipe.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {name} must be a table, got {value!r}")
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ValueError(f"{source}: {name} has unknown key {unknown[0]!r}; allowed: {', '.join(sorted(defaults))}")
    return {**copy.deepcopy(defaults), **value}


def _named_section(recipe: dict, name: str, key: str, table: dict, default: str | None, source: str) -> dict:
    """A section chosen by one of its keys (``data.source``, ``conditioning.type``), each choice with its defaults."""
    value = recipe.get(name, {key: default} if default else None)
    chosen = value.get(key) if isinstance(value, dict) else value
    if not isinstance(value, dict) or chosen not in table:
        raise ValueError(f"{source}: {name}.{key} must be one of {', '.join(table)}, got {chosen!r}")
    return {key: value[key], **_section({name: {k: v for k, v in value.items() if k != key}}, name, table[value[key]], source)}


def _component_class(spec, where: str, allowed: tuple | None, base) -> tuple[type, dict]:
    """A ``{"class": name, **config}`` table: the diffusers class and its config, checked against __init__."""
    import diffusers

    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise ValueError(f"{where} must be a table with a 'class' (a diffusers class name), got {spec!r}")
    name = spec["class"]
    cls = getattr(diffusers, name, None)
    if (allowed is not None and name not in allowed) or not (isinstance(cls, type) and issubclass(cls, base)):
        what = f"one of {', '.join(allowed)}" if allowed else f"a diffusers {base.__name__} class"
        raise ValueError(f"{where}.class must be {what}, got {name!r}")
    config = {k: v for k, v in spec.items() if k != "class"}
    parameters = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(config) - set(parameters) - {"self"})
    if unknown:
        raise ValueError(f"{where}: {name} has no argument {unknown[0]!r}; allowed: "
                         f"{', '.join(p for p in parameters if p not in ('self', 'kwargs'))}")
    return cls, config


def _check_number(value, where: str, kind=(int, float), low=None, high=None, low_open=False) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" if low is not None else ""
        bound += f"{' and ' if bound else ''}<= {high}" if high is not None else ""
        kind_name = "an int" if kind is int else "a number"
        raise ValueError(f"{where} must be {kind_name}{' ' + bound if bound else ''}, got {value!r}")


def validate_recipe(recipe: dict, source: str = "recipe") -> dict:
    """Check a recipe's sections, names, config arguments and numbers; returns it with defaults filled in."""
    from diffusers import ModelMixin, SchedulerMixin

    if not isinstance(recipe, dict):
        raise TypeError(f"{source} must be a table/object, got {type(recipe).__name__}")
    missing = [k for k in REQUIRED if k not in recipe]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}")
    unknown = sorted(set(recipe) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"{source} has unknown section {unknown[0]!r}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
    if not (isinstance(recipe["name"], str) and recipe["name"]):
        raise ValueError(f"{source}: name must be a non-empty string, got {recipe['name']!r}")
    out = {"name": recipe["name"], "description": str(recipe.get("description", ""))}
    _component_class(recipe["model"], f"{source}: model", MODEL_CLASSES, ModelMixin)
    _component_class(recipe["scheduler"], f"{source}: scheduler", None, SchedulerMixin)
    out["model"], out["scheduler"] = copy.deepcopy(recipe["model"]), copy.deepcopy(recipe["scheduler"])
    out["data"] = _named_section(recipe, "data", "source", DATA_DEFAULTS, None, source)
    out["conditioning"] = _named_section(recipe, "conditioning", "type", CONDITIONING_DEFAULTS, "none", source)
    out["vae"] = recipe.get("vae")
    if out["vae"] is not None and not (isinstance(out["vae"], str) and out["vae"]):
        raise ValueError(f"{source}: vae must be the path of a diffusers AutoencoderKL folder, got {out['vae']!r}")
    out["optimizer"] = _section(recipe, "optimizer", OPTIMIZER_DEFAULTS, source)
    out["lr_schedule"] = _section(recipe, "lr_schedule", LR_SCHEDULE_DEFAULTS, source)
    out["training"] = _section(recipe, "training", TRAINING_DEFAULTS, source)
    out["sampling"] = _section(recipe, "sampling", SAMPLING_DEFAULTS, source)

    data, training, sampling, opt = out["data"], out["training"], out["sampling"], out["optimizer"]
    if data["source"] == "digits":
        if data["split"] not in ("train", "all"):
            raise ValueError(f"{source}: data.split must be 'train' or 'all' (the test split is held out), got {data['split']!r}")
        if data["set"] not in ("mnist", "sklearn"):
            raise ValueError(f"{source}: data.set must be 'mnist' or 'sklearn', got {data['set']!r}")
        if data["colors"] not in ("random", "fixed"):
            raise ValueError(f"{source}: data.colors must be 'random' (new colours every batch) or 'fixed', got {data['colors']!r}")
        _check_number(data["color_seed"], f"{source}: data.color_seed", int, 0)
    else:
        if not (isinstance(data["path"], str) and data["path"]):
            raise ValueError(f"{source}: data.path must name an image folder, got {data['path']!r}")
        _check_number(data["resolution"], f"{source}: data.resolution", int, 1)
        if not isinstance(data["random_flip"], bool):
            raise ValueError(f"{source}: data.random_flip must be true or false, got {data['random_flip']!r}")
    if out["conditioning"]["type"] == "class":
        _check_number(out["conditioning"]["p_uncond"], f"{source}: conditioning.p_uncond", (int, float), 0, 1)
    _check_number(opt["lr"], f"{source}: optimizer.lr", (int, float), 0, low_open=True)
    _check_number(opt["eps"], f"{source}: optimizer.eps", (int, float), 0, low_open=True)
    _check_number(opt["weight_decay"], f"{source}: optimizer.weight_decay", (int, float), 0)
    if not (isinstance(opt["betas"], list) and len(opt["betas"]) == 2):
        raise ValueError(f"{source}: optimizer.betas must be a list of two numbers in [0, 1), got {opt['betas']!r}")
    for beta in opt["betas"]:
        _check_number(beta, f"{source}: optimizer.betas", (int, float), 0, 0.999999)
    if out["lr_schedule"]["name"] not in LR_SCHEDULES:
        raise ValueError(f"{source}: lr_schedule.name must be one of {', '.join(LR_SCHEDULES)}, got {out['lr_schedule']['name']!r}")
    _check_number(out["lr_schedule"]["warmup_steps"], f"{source}: lr_schedule.warmup_steps", int, 0)
    for key in ("steps", "batch_size", "gradient_accumulation_steps", "keep_checkpoints", "log_every"):
        _check_number(training[key], f"{source}: training.{key}", int, 1)
    for key in ("checkpoint_every", "seed"):
        _check_number(training[key], f"{source}: training.{key}", int, 0)
    if training["max_grad_norm"] is not None:
        _check_number(training["max_grad_norm"], f"{source}: training.max_grad_norm", (int, float), 0, low_open=True)
    if training["ema_decay"] is not None:
        _check_number(training["ema_decay"], f"{source}: training.ema_decay", float, 0, low_open=True)
        if training["ema_decay"] >= 1:
            raise ValueError(f"{source}: training.ema_decay must be below 1, got {training['ema_decay']!r}")
    if training["mixed_precision"] not in MIXED_PRECISION:
        raise ValueError(f"{source}: training.mixed_precision must be one of no, fp16, bf16 (or absent: the "
                         f"launcher's), got {training['mixed_precision']!r}")
    from .training import FLOW_TIMESTEP_SAMPLING

    if training["timestep_sampling"] not in FLOW_TIMESTEP_SAMPLING:
        raise ValueError(f"{source}: training.timestep_sampling must be one of {', '.join(FLOW_TIMESTEP_SAMPLING)}, "
                         f"got {training['timestep_sampling']!r}")
    if training["timestep_sampling"] != "uniform" and not is_flow(out):
        raise ValueError(f"{source}: training.timestep_sampling {training['timestep_sampling']!r} is for flow matching; "
                         "a VP scheduler draws integer timesteps uniformly")
    for key in ("every", "seed"):
        _check_number(sampling[key], f"{source}: sampling.{key}", int, 0)
    for key in ("num_images", "num_inference_steps"):
        _check_number(sampling[key], f"{source}: sampling.{key}", int, 1)
    _check_number(sampling["guidance_scale"], f"{source}: sampling.guidance_scale", (int, float), 0)
    _check_agreement(out, source)
    if sampling["every"]:  # the grids' walk: the scheduler's own (if diffkit reproduces it) or sampling.solver
        from .solvers import solver_for

        try:
            solver_for(build_scheduler(out), sampling["num_inference_steps"], solver=sampling["solver"])
        except ValueError as err:
            raise ValueError(f"{source}: sampling: {err} (sampling.solver names one of diffkit's solvers)") from None
    return out


def is_flow(recipe: dict) -> bool:
    """Whether the recipe trains a flow-matching model (a FlowMatch scheduler, or flow sigmas) rather than a VP one."""
    from .schedule import is_flow_config

    scheduler = recipe["scheduler"]
    return is_flow_config({**{k: v for k, v in scheduler.items() if k != "class"}, "_class_name": scheduler["class"]})


def _check_agreement(recipe: dict, source: str) -> None:
    """Model, scheduler, data, conditioning and VAE must fit together; these need no data on disk."""
    model, scheduler = recipe["model"], recipe["scheduler"]
    if not is_flow(recipe):
        from .denoiser import PREDICTION_TYPES

        prediction = scheduler.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"{source}: scheduler.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction!r}")
    conditional = recipe["conditioning"]["type"] == "class"
    if model["class"] == "UNet2DModel":
        embeds = model.get("num_class_embeds")
        if not conditional and embeds is not None:
            raise ValueError(f"{source}: an unconditional recipe needs model.num_class_embeds absent, got {embeds!r}")
        if conditional and not (isinstance(embeds, int) and embeds >= 2):
            raise ValueError(f"{source}: class conditioning needs model.num_class_embeds = classes + 1 (the last is the "
                             f"null class for guidance), got {embeds!r}")
        if model.get("class_embed_type") is not None:
            raise ValueError(f"{source}: model.class_embed_type must be absent (labels index num_class_embeds)")
    else:
        if "num_embeds_ada_norm" not in model:
            raise ValueError(f"{source}: a DiTTransformer2DModel needs model.num_embeds_ada_norm = the number of classes "
                             "(0 for an unconditional model); its extra embedding is the null class")
        if model.get("out_channels") not in (None, model.get("in_channels", 4)):
            raise ValueError(f"{source}: model.out_channels must equal in_channels (no learned variance)")
    if recipe["data"]["source"] == "digits" and recipe["vae"] is None:
        if model.get("sample_size") != 16 or model.get("in_channels") != 3:
            raise ValueError(f"{source}: the bundled digits are 16x16 RGB: model.sample_size must be 16 and in_channels 3, "
                             f"got {model.get('sample_size')!r} and {model.get('in_channels')!r}")


# -- building ------------------------------------------------------------------------------------------------------


def build_model(recipe: dict) -> torch.nn.Module:
    """The recipe's backbone, freshly initialised (from the global torch seed). For a DiT, diffusers' per-block
    label dropout is switched off: the training loop drops labels once per sample, as DiT's own code does."""
    import diffusers
    from diffusers.models.embeddings import LabelEmbedding

    config = {k: v for k, v in recipe["model"].items() if k != "class"}
    model = getattr(diffusers, recipe["model"]["class"])(**config)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def build_scheduler(recipe: dict):
    """The recipe's diffusers scheduler (it carries the noise schedule and prediction type into the saved model)."""
    import diffusers

    config = {k: v for k, v in recipe["scheduler"].items() if k != "class"}
    return getattr(diffusers, recipe["scheduler"]["class"])(**config)


def build_unet() -> torch.nn.Module:
    """The shipped default model's UNet2DModel (untrained), from ``load_recipe("default")``."""
    return build_model(load_recipe("default"))


def build_default_scheduler():
    """The shipped default model's scheduler, from ``load_recipe("default")``."""
    return build_scheduler(load_recipe("default"))


def load_vae(path: str | Path):
    """A diffusers AutoencoderKL from its folder, or from the ``vae`` sub-folder of a pipeline folder."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if (path / "model_index.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no AutoencoderKL at {path} (a folder with config.json and safetensors weights)")
    return AutoencoderKL.from_pretrained(path, use_safetensors=True).eval().requires_grad_(False)


class TrainingData:
    """The recipe's images: ``batch(n, generator)`` draws n with replacement and returns [-1, 1] float images and
    their labels (or None). Bundled digits are recoloured every batch (``colors: random``) or keep one colouring."""

    def __init__(self, spec: dict):
        self.spec = spec
        if spec["source"] == "digits":
            from .data import IMAGE_SIZE, NUM_CLASSES, colorize, gray_digits

            self.ink, self.labels = gray_digits(spec["split"], source=spec["set"])
            self.colorize, self.resolution, self.num_classes = colorize, IMAGE_SIZE, NUM_CLASSES
            self.fixed = colorize(self.ink, torch.Generator().manual_seed(spec["color_seed"])) if spec["colors"] == "fixed" else None
        else:
            found = scan_folder(spec["path"])
            self.paths, self.resolution = found.paths, spec["resolution"]
            self.labels = torch.tensor(found.labels) if found.labels is not None else None
            self.num_classes = int(self.labels.max()) + 1 if self.labels is not None else None

    def __len__(self) -> int:
        return len(self.labels) if self.spec["source"] == "digits" else len(self.paths)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = torch.randint(0, len(self), (n,), generator=generator)
        labels = self.labels[index] if self.labels is not None else None
        if self.spec["source"] == "digits":
            images = self.fixed[index] if self.fixed is not None else self.colorize(self.ink[index], generator)
            return images, labels
        images = to_model_space(read_images([self.paths[i] for i in index.tolist()], self.resolution))
        if self.spec["random_flip"]:
            flip = torch.rand(n, generator=generator) < 0.5
            images[flip] = images[flip].flip(-1)
        return images, labels


def _check_with_data(recipe: dict, data: TrainingData, vae, source: str = "recipe") -> None:
    """What needs the data and the VAE: channels, size and the number of classes."""
    model = recipe["model"]
    channels = vae.config.latent_channels if vae is not None else 3
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    in_channels = model.get("in_channels", 3 if model["class"] == "UNet2DModel" else 4)
    if in_channels != channels or model.get("out_channels", in_channels) not in (None, channels):
        raise ValueError(f"{source}: model.in_channels and out_channels must be {channels} "
                         f"({'the VAE latent channels' if vae is not None else 'RGB'}), got {in_channels}")
    if data.resolution % factor or model.get("sample_size") != data.resolution // factor:
        raise ValueError(f"{source}: model.sample_size must be {data.resolution // factor} (the {data.resolution}-pixel "
                         f"images{' over the VAE factor ' + str(factor) if vae is not None else ''}), got {model.get('sample_size')!r}")
    if recipe["conditioning"]["type"] == "class":
        if data.num_classes is None:
            raise ValueError(f"{source}: class conditioning needs labelled data: put the images in class sub-folders")
        expected = data.num_classes + 1 if model["class"] == "UNet2DModel" else data.num_classes
        key = "num_class_embeds" if model["class"] == "UNet2DModel" else "num_embeds_ada_norm"
        if model.get(key) != expected:
            raise ValueError(f"{source}: model.{key} must be {expected} for the {data.num_classes} classes of the data"
                             f"{' plus the null class' if key == 'num_class_embeds' else ''}, got {model.get(key)!r}")
    elif model["class"] == "DiTTransformer2DModel" and model.get("num_embeds_ada_norm") != 0:
        raise ValueError(f"{source}: an unconditional DiT needs model.num_embeds_ada_norm = 0 (only the null class), "
                         f"got {model.get('num_embeds_ada_norm')!r}")


def lr_lambda(recipe: dict):
    """The learning-rate factor at optimizer step s: linear warm-up over ``warmup_steps``, then constant or a cosine
    decay to 0 at the last step (the default model's schedule: min(1, (s + 1) / warmup) (1 + cos(pi s / steps)) / 2)."""
    warmup, steps, name = recipe["lr_schedule"]["warmup_steps"], recipe["training"]["steps"], recipe["lr_schedule"]["name"]

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        return ramp * (0.5 * (1 + math.cos(math.pi * step / steps)) if name == "cosine" else 1.0)

    return factor


# -- sampling ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(model, scheduler, *, labels: torch.Tensor | None = None, num_images: int | None = None,
           num_inference_steps: int = 25, guidance_scale: float = 3.0, generator: torch.Generator | None = None,
           vae=None, null_label: int | None = None, solver: str | None = None) -> torch.Tensor:
    """Images in [-1, 1] from a trained backbone (UNet2DModel or DiT) and its scheduler, on diffkit's solvers: the
    walk that reproduces the scheduler (``diffkit.solvers.solver_for``; DPM-Solver++(2M) for the default model, Euler
    on the flow grid for FlowMatchEulerDiscreteScheduler), or ``solver`` on the scheduler's grid. With ``labels`` and
    ``null_label``, classifier-free guidance at ``guidance_scale``; a DiT without classes gets its null label."""
    from .denoiser import Denoiser
    from .guidance import make_guidance
    from .solvers import solver_for

    setup = solver_for(scheduler, num_inference_steps, solver=solver)
    device = next(model.parameters()).device
    n = len(labels) if labels is not None else num_images
    size = model.config.sample_size
    x = torch.randn((n, model.config.in_channels, size, size), generator=generator).to(device)
    cond = uncond = None
    if labels is not None:
        cond = {"class_labels": labels.to(device)}
        if null_label is not None and guidance_scale != 1:
            uncond = {"class_labels": torch.full_like(labels, null_label).to(device)}
    elif type(model).__name__ == "DiTTransformer2DModel":
        cond = {"class_labels": torch.zeros(n, dtype=torch.long, device=device)}
    guidance = make_guidance("cfg", guidance_scale) if uncond is not None else None
    denoiser = Denoiser.from_pipeline_components(_PerSampleTimesteps(model), scheduler)
    x = setup.fn(denoiser, setup.grid.init_noise_scale * x, setup.grid, cond=cond, uncond=uncond, guidance=guidance,
                 **setup.options)
    if vae is not None:
        shift = vae.config.shift_factor or 0.0
        x = vae.decode((x / vae.config.scaling_factor + shift).to(vae.dtype), return_dict=False)[0]
    return x.float().clamp(-1, 1)


class _PerSampleTimesteps(torch.nn.Module):
    """The solvers pass one timestep for the batch; a DiT (unlike a UNet) wants one per sample."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, **kwargs):
        return self.model(x, t.reshape(-1).expand(len(x)) if t.numel() == 1 else t, **kwargs)


# -- training ------------------------------------------------------------------------------------------------------


RUN_FILES = ("checkpoints", "samples", "model", "recipe.json", "training_log.json")


def fingerprint(recipe: dict, num_processes: int) -> dict:
    """What a checkpoint must agree on to be resumed: the recipe without its bookkeeping keys, and the number of
    processes (each draws its own batches, so another count is another run)."""
    kept = copy.deepcopy(recipe)
    for section, keys in NOT_FINGERPRINTED.items():
        if keys is None:
            kept.pop(section, None)
        else:
            for key in keys:
                kept[section].pop(key, None)
    return {"recipe": kept, "num_processes": num_processes}


def _refuse_foreign_folder(run_dir: Path, overwrite: bool) -> None:
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ValueError(f"output {run_dir} exists and is not a folder")
    entries = [p.name for p in run_dir.iterdir()]
    foreign = sorted(set(entries) - set(RUN_FILES))
    if entries and not (run_dir / "recipe.json").is_file():
        raise ValueError(f"output folder {run_dir} is not empty and holds no diffkit training run (no recipe.json); "
                         "choose another folder")
    if foreign:
        raise ValueError(f"output folder {run_dir} holds {foreign[0]!r}, which diffkit train did not write; choose another folder")
    if overwrite:
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def save_trained(out: Path, model, scheduler, vae=None) -> None:
    """The trained model as a diffusers folder, written beside ``out`` and renamed into place (with diffkit's file
    manifest, so ``--overwrite`` of other commands knows it as diffkit's). A UNet2DModel (VP or flow matching) becomes
    a GuidedPipeline folder (``diffkit generate --model out``); a DiT its ``transformer``, ``scheduler`` and ``vae``
    sub-folders (diffusers' component layout; sample it with ``diffkit.recipe.sample``)."""
    from .outputs import write_folder_atomic

    def write(folder: Path) -> None:
        if type(model).__name__ == "UNet2DModel":
            from .pipelines import GuidedPipeline

            GuidedPipeline(unet=model, scheduler=scheduler, vae=vae).save_pretrained(folder)
            return
        model.save_pretrained(folder / "transformer")
        scheduler.save_pretrained(folder / "scheduler")
        if vae is not None:
            vae.save_pretrained(folder / "vae")

    write_folder_atomic(out, write, "train")


def train(recipe: dict | str | Path, out: str | Path, *, resume: bool = True, overwrite: bool = False,
          stop_after: int | None = None, progress: bool = True, accelerator=None):
    """Train what ``recipe`` says into the run folder ``out``: ``out/model`` (the EMA weights as a diffusers
    folder), ``out/checkpoints/step-N``, ``out/samples/step-N.png``, ``out/recipe.json`` and
    ``out/training_log.json``. A run folder with checkpoints resumes from the newest (``resume=False`` refuses to
    continue one; ``overwrite=True`` deletes what a previous run wrote first). Returns the ``FitResult``.

    ``batch_size`` is per process and micro-batch: a step sees batch_size x processes x accumulation images.
    """
    from accelerate import Accelerator

    from .denoiser import Denoiser
    from .images import image_grid, save_png_atomic, to_pil, write_text_atomic
    from .training import diffusion_loss, fit

    recipe = load_recipe(recipe) if isinstance(recipe, (str, Path)) else validate_recipe(recipe)
    out = Path(out)
    _refuse_foreign_folder(out, overwrite)
    checkpoints = out / "checkpoints"
    if not resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ValueError(f"{out} holds checkpoints of an earlier run; resume it, or pass overwrite to start afresh")
    training = recipe["training"]
    accelerator = accelerator or Accelerator(mixed_precision=training["mixed_precision"])
    data = TrainingData(recipe["data"])
    vae = load_vae(recipe["vae"]).to(accelerator.device) if recipe["vae"] is not None else None
    _check_with_data(recipe, data, vae)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "recipe.json", json.dumps(recipe, indent=1) + "\n")

    torch.manual_seed(training["seed"])  # the initial weights
    model, scheduler = build_model(recipe), build_scheduler(recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["optimizer"]["lr"], betas=tuple(recipe["optimizer"]["betas"]),
                                  eps=recipe["optimizer"]["eps"], weight_decay=recipe["optimizer"]["weight_decay"])
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe))
    conditional = recipe["conditioning"]["type"] == "class"
    null_label = (data.num_classes if conditional else 0)
    is_dit = recipe["model"]["class"] == "DiTTransformer2DModel"
    # the noise schedule and prediction type the scheduler describes (FlowMatch: the flow path, velocity targets)
    objective = Denoiser.from_pipeline_components(None, scheduler)
    flow_options = {"timestep_sampling": training["timestep_sampling"], "shift": scheduler.config.get("shift", 1.0)}

    def loss_fn(net, step, generator):
        x0, labels = data.batch(training["batch_size"], generator)
        x0 = x0.to(accelerator.device)
        if vae is not None:
            with torch.no_grad():
                latents = vae.encode(x0.to(vae.dtype)).latent_dist.sample(generator)
            x0 = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        cond = {}
        if conditional:
            labels = labels.clone()
            labels[torch.rand(len(labels), generator=generator) < recipe["conditioning"]["p_uncond"]] = null_label
            cond["class_labels"] = labels.to(accelerator.device)
        elif is_dit:
            cond["class_labels"] = torch.zeros(len(x0), dtype=torch.long, device=accelerator.device)
        return diffusion_loss(net, objective.schedule, objective.prediction_type, x0, cond, generator,
                              **(flow_options if objective.schedule.path == "flow" else {}))

    sampling = recipe["sampling"]

    def sample_fn(net, step):
        generator = torch.Generator().manual_seed(sampling["seed"])
        labels = torch.arange(sampling["num_images"]) % data.num_classes if conditional else None
        images = sample(net, scheduler, labels=labels, num_images=sampling["num_images"],
                        num_inference_steps=sampling["num_inference_steps"], guidance_scale=sampling["guidance_scale"],
                        generator=generator, vae=vae, null_label=null_label if conditional else None,
                        solver=sampling["solver"])
        (out / "samples").mkdir(exist_ok=True)
        ncols = data.num_classes if conditional and sampling["num_images"] % data.num_classes == 0 else None
        save_png_atomic(image_grid(to_pil(images), ncols=ncols), out / "samples" / f"step-{step:07d}.png")

    result = fit(
        model, loss_fn, optimizer=optimizer, steps=training["steps"], lr_scheduler=lr_scheduler, seed=training["seed"],
        accelerator=accelerator, gradient_accumulation_steps=training["gradient_accumulation_steps"],
        max_grad_norm=training["max_grad_norm"], ema_decay=training["ema_decay"], checkpoint_dir=checkpoints,
        checkpoint_every=training["checkpoint_every"], keep_checkpoints=training["keep_checkpoints"], resume=resume,
        fingerprint=fingerprint(recipe, accelerator.num_processes), stop_after=stop_after,
        sample_fn=sample_fn if sampling["every"] else None, sample_every=sampling["every"],
        log_every=training["log_every"], progress=progress, desc=f"train {recipe['name']}",
    )
    if accelerator.is_main_process:
        log = {"recipe": recipe["name"], "steps": result.step, "resumed_from": result.resumed_from,
               "num_processes": accelerator.num_processes, "log": result.log}
        write_text_atomic(out / "training_log.json", json.dumps(log, indent=1) + "\n")
        if result.step == training["steps"]:
            save_trained(out / "model", result.averaged_model().to("cpu"), scheduler, vae.to("cpu") if vae is not None else None)
    accelerator.wait_for_everyone()
    return result
