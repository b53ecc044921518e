"""Load any diffkit (or diffusers) pipeline from a local folder or a Hub repo id, offline from the cache.

``diffusers.DiffusionPipeline.from_pretrained`` cannot resolve diffkit's classes from ``model_index.json``;
this reads ``_class_name`` and dispatches to the right class. Weights load as safetensors only.
"""

import json
from pathlib import Path

import diffusers


ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "default"


def _model_index(path_or_repo_id: str, revision: str | None, cache_dir) -> dict:
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{local} is not a pipeline folder: it has no model_index.json")
    elif local.exists() or path_or_repo_id.startswith((".", "/", "~")) or path_or_repo_id.count("/") != 1:
        raise FileNotFoundError(f"model folder {path_or_repo_id!r} does not exist (and it is not a Hub repo id)")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = hf_hub_download(path_or_repo_id, "model_index.json", revision=revision, cache_dir=cache_dir)
        except Exception as err:  # offline without a cached copy, unknown repo, ...
            raise FileNotFoundError(f"cannot load {path_or_repo_id!r} from the Hub or its cache: {err}") from err
    try:
        return json.loads(Path(index).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index} is not valid JSON: {err}") from err


def load_pipeline(path_or_repo_id: str | Path | None = None, *, revision: str | None = None, cache_dir=None, **kwargs):
    """Load a pipeline by the ``_class_name`` in its model_index.json; ``None`` loads the embedded default model.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``). Hub repo ids resolve from the local cache when
    ``HF_HUB_OFFLINE=1``.
    """
    from diffkit.pipelines import PIPELINES

    path_or_repo_id = str(path_or_repo_id if path_or_repo_id is not None else DEFAULT_MODEL)
    class_name = _model_index(path_or_repo_id, revision, cache_dir).get("_class_name")
    cls = PIPELINES.get(class_name) or getattr(diffusers, str(class_name), None)
    if cls is None:
        raise ValueError(f"unknown pipeline class {class_name!r} in model_index.json; known: {sorted(PIPELINES)}")
    return cls.from_pretrained(path_or_repo_id, revision=revision, cache_dir=cache_dir, use_safetensors=True, **kwargs)
