"""Offline by default: huggingface_hub reads these once at import, so set them before anything imports it.

Slow tests are marked ``@pytest.mark.slow`` and deselected by default; run them with ``pytest -m slow``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny class-conditional GuidedPipeline for the CLI tests: 10 classes (0..9) plus the null class, 8x8."""
    from diffusers import DPMSolverMultistepScheduler

    from diffkit.pipelines import GuidedPipeline
    from helpers import tiny_unet

    path = tmp_path_factory.mktemp("model") / "tiny"
    GuidedPipeline(tiny_unet(num_class_embeds=11), DPMSolverMultistepScheduler(prediction_type="v_prediction")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    """A saved tiny text-conditional GuidedPipeline (Stable Diffusion components) for the CLI tests."""
    from diffusers import DPMSolverMultistepScheduler

    from diffkit.pipelines import GuidedPipeline
    from helpers import tiny_text_components

    path = tmp_path_factory.mktemp("model") / "text"
    GuidedPipeline(scheduler=DPMSolverMultistepScheduler(), **tiny_text_components()).save_pretrained(path)
    return path
