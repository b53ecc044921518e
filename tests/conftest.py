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
