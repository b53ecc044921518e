"""Where diffkit's shipped artefacts live (installed as ``diffkit.assets``, package data of the wheel).

Every path to something that ships with diffkit comes from here, so an installed wheel and a source checkout
find the same files. Benchmark tables and figures also live in this folder of the checkout but are not
package data.
"""

from pathlib import Path


ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "default"  # the embedded default pipeline (diffusers format)
CLASSIFIER = ROOT / "classifier"  # the digits classifier behind the metrics
MODALITY_ADAPTERS = ROOT / "modalities"  # T2I-Adapters for the default model, one folder per modality
UPSR_MODEL = ROOT / "upsr"  # UpscalePipeline, x2 for 8x8 coloured digits (scripts/bench_upsr.py, seed 0)


def cards_folder() -> Path:
    """The shipped experiment cards (``diffkit.cards``)."""
    from diffkit import cards

    return Path(cards.__file__).resolve().parent


def shipped_card(name: str) -> Path | None:
    """The shipped card called ``name`` (``elr_label_noise`` or ``elr_label_noise.json``), or None."""
    folder = cards_folder()
    for candidate in (name, f"{name}.json", f"{name}.toml"):
        path = folder / candidate
        if "/" not in name and "\\" not in name and path.is_file() and path.suffix in (".json", ".toml"):
            return path
    return None
