"""The tail every benchmark script shares: a markdown table, printed and written beside its figure.

``scripts/bench_*.py`` measure; this writes what they measured: ``<out>/<name>.md`` (the table) and
``<name>.png`` (the figure or image grid), with ``_quick`` appended in ``--quick`` mode so a quick run never
replaces the full run's results. Writes are atomic.
"""

from pathlib import Path

from .images import save_figure_atomic, save_png_atomic, write_text_atomic


def markdown_table(header: list[str], rows: list[list], note: str = "") -> str:
    """A markdown table (cells already formatted as text), with an optional note line above it."""
    lines = [note, ""] if note else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out_dir, name: str, quick: bool, table: str, figure=None, images: dict | None = None) -> Path:
    """Print ``table`` and write it as ``<name>.md``; ``figure`` (a matplotlib figure) as ``<name>.png``; ``images``
    ({stem: PIL image}) as ``<stem>.png``. Returns the folder."""
    print(table)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    write_text_atomic(out / f"{name}{suffix}.md", table)
    if figure is not None:
        save_figure_atomic(figure, out / f"{name}{suffix}.png")
    for stem, image in (images or {}).items():
        save_png_atomic(image, out / f"{stem}{suffix}.png")
    return out
