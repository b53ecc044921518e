"""Load any diffkit (or diffusers) pipeline from a local folder or a Hub repo id, offline from the cache.

``diffusers.DiffusionPipeline.from_pretrained`` cannot resolve diffkit's classes from ``model_index.json``;
this reads ``_class_name`` and dispatches to the right class. Nothing in a model folder is trusted: weights
load as safetensors only, no code from the folder or the Hub is ever run (``trust_remote_code`` and
``custom_pipeline`` are refused), and a malformed ``model_index.json`` is refused with one clear line.
"""

import json
from pathlib import Path

import diffusers

from diffkit.assets import DEFAULT_MODEL


# keywords of diffusers' from_pretrained that would import and run Python code shipped with a model
REMOTE_CODE_KEYWORDS = ("trust_remote_code", "custom_pipeline", "custom_revision")


def _looks_local(path_or_repo_id: str) -> bool:
    """A Hub repo id is exactly "owner/name"; anything else, or an "owner/name" whose first part is a local
    folder, is meant as a local path (a mistyped folder is reported as a missing folder, not a Hub miss)."""
    parts = path_or_repo_id.replace("\\", "/").split("/")
    if path_or_repo_id.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts):
        return True
    return Path(parts[0]).expanduser().is_dir()


def _model_index(path_or_repo_id: str, revision: str | None, cache_dir) -> dict:
    local = Path(path_or_repo_id).expanduser()
    if local.is_file():
        raise FileNotFoundError(f"{path_or_repo_id!r} is a file; a model is a folder holding model_index.json")
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{local} is not a pipeline folder: it has no model_index.json")
    elif _looks_local(path_or_repo_id):
        raise FileNotFoundError(f"model folder {path_or_repo_id!r} does not exist")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = hf_hub_download(path_or_repo_id, "model_index.json", revision=revision, cache_dir=cache_dir)
        except Exception as err:  # offline without a cached copy, unknown repo, ...
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise FileNotFoundError(
                f"{path_or_repo_id!r} is not a local folder, and as a Hub repo id diffkit cannot load it from the Hub or "
                f"its cache: {reason}"
            ) from err
    try:
        content = json.loads(Path(index).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{index} is not valid JSON: {err}") from err
    if not isinstance(content, dict):
        raise ValueError(f"{index} must hold a JSON object, got a {type(content).__name__}")
    return content


# diffusers text-to-image pipelines whose folders load as a GuidedPipeline over the same components
DIFFUSERS_TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


def pipeline_class(class_name) -> type:
    """The pipeline class a model_index.json names: a diffkit pipeline; GuidedPipeline for a Stable Diffusion 1.x / 2.x,
    SDXL, SD3 or Flux folder (``DIFFUSERS_TEXT_PIPELINES``); else the diffusers pipeline class."""
    from . import PIPELINES

    if not isinstance(class_name, str):
        raise ValueError(f"_class_name in model_index.json must be a class name, got {class_name!r}")
    if class_name in DIFFUSERS_TEXT_PIPELINES:
        return PIPELINES["GuidedPipeline"]
    cls = PIPELINES.get(class_name) or getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ValueError(
            f"unknown pipeline class {class_name!r} in model_index.json (_class_name); diffkit's are {sorted(PIPELINES)}, "
            "or any diffusers pipeline class"
        )
    return cls


def load_pipeline(path_or_repo_id: str | Path | None = None, *, revision: str | None = None, cache_dir=None, **kwargs):
    """Load a pipeline by the ``_class_name`` in its model_index.json; ``None`` loads the embedded default model.

    A standard diffusers Stable Diffusion 1.x / 2.x, SDXL, SD3 or Flux folder (or Hub repo) loads as a
    ``GuidedPipeline`` over its components (the safety checker, feature extractor and image encoder are not loaded;
    text encoders a folder lacks stay ``None``); other diffusers classes load as themselves.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``). Hub repo ids resolve from the local cache when
    ``HF_HUB_OFFLINE=1``. Code shipped with a model is never run: ``trust_remote_code`` and ``custom_pipeline``
    are refused, and a component whose library is a module inside the folder is refused by diffusers.
    """
    remote = sorted(k for k in REMOTE_CODE_KEYWORDS if k in kwargs)
    if remote:
        raise ValueError(
            f"{remote[0]} is not accepted: diffkit never runs code that ships with a model. Load such a pipeline with "
            "diffusers yourself if you trust it, then wrap it with a diffkit pipeline's from_pipe"
        )
    if "use_safetensors" in kwargs and kwargs["use_safetensors"] is not True:
        raise ValueError("use_safetensors must be True: diffkit loads weights from safetensors only")
    kwargs.pop("use_safetensors", None)
    path_or_repo_id = str(path_or_repo_id if path_or_repo_id is not None else DEFAULT_MODEL)
    if not path_or_repo_id.strip():
        raise ValueError("path_or_repo_id is empty; give a model folder or a Hub repo id (None: the default model)")
    cls = pipeline_class(_model_index(path_or_repo_id, revision, cache_dir).get("_class_name"))
    return cls.from_pretrained(path_or_repo_id, revision=revision, cache_dir=cache_dir, use_safetensors=True, **kwargs)
