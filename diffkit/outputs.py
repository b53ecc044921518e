"""Where diffkit may write, checked before any work starts; what ``--overwrite`` may replace.

The rule: diffkit only ever replaces what diffkit itself wrote. A PNG it wrote carries a ``diffkit`` text
chunk; a folder it wrote (a saved pipeline) carries ``diffkit_manifest.json`` listing every file in it. A
folder is replaced only when every file in it is diffkit's, and never when it is the current directory, one of
its parents, the home directory, a file system root or a git checkout. New content is written beside the
target and renamed into place, so an interrupted run never leaves half a file or half a model.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import PIL.Image

from .images import write_text_atomic


MANIFEST = "diffkit_manifest.json"


class OutputError(ValueError):
    """An output location diffkit refuses to write (reported as one line by the CLI)."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_parent(path: Path, option: str) -> None:
    """``path`` can be created: the nearest existing folder above it is a folder we can create files in."""
    _check_can_write_in(_nearest_existing(path.parent if path.parent != path else path), path, option)


def _check_can_write_in(folder: Path, path: Path, option: str) -> None:
    if not folder.is_dir():
        raise OutputError(f"{option} {str(path)!r}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {str(path)!r}: cannot write in {folder} (permission denied or read-only)")


def written_by_diffkit_png(path: Path) -> bool:
    try:
        with PIL.Image.open(path) as image:
            return image.format == "PNG" and "diffkit" in getattr(image, "text", {})
    except (OSError, PIL.UnidentifiedImageError, ValueError):
        return False


def check_output_file(out: str, overwrite: bool, option: str = "--out", suffix: str = ".png") -> Path:
    """A file to write: ends in ``suffix``; if it exists it is replaced only with ``overwrite`` and only when diffkit
    wrote it."""
    if not str(out).strip():
        raise OutputError(f"{option} is empty; give a {suffix} file name")
    path = Path(out).expanduser()
    if path.suffix.lower() != suffix:
        raise OutputError(f"{option} must name a {suffix} file, got {out!r}")
    if path.is_dir():
        raise OutputError(f"{option} {out!r} is a folder; give a {suffix} file name")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputError(f"{path} exists; pass --overwrite to replace it")
        if path.is_symlink() or not written_by_diffkit_png(path):
            raise OutputError(f"{path} was not written by diffkit; --overwrite only replaces diffkit's own files")
    check_writable_parent(path, option)
    return path


def check_output_files(folder: Path, names, overwrite: bool) -> None:
    """Files to write inside ``folder``: existing ones are replaced only with ``overwrite`` and only when diffkit
    wrote them."""
    existing = [folder / name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]} exists ({len(existing)} files would be replaced); pass --overwrite")
    for path in existing:
        if path.is_symlink() or not written_by_diffkit_png(path):
            raise OutputError(f"{path} was not written by diffkit; --overwrite only replaces diffkit's own files")


def check_output_folder(out: str, option: str = "--out") -> Path:
    """A folder to write files into (they are checked one by one with ``check_output_files``)."""
    if not str(out).strip():
        raise OutputError(f"{option} is empty; give a folder")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {out!r} is a file, not a folder")
    if path.is_dir():
        _check_can_write_in(path, path, option)
    else:
        check_writable_parent(path, option)
    return path


def _protected(path: Path) -> str | None:
    """Why a folder must never be replaced as a whole, or None."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current folder or one of its parents"
    if resolved == Path.home().resolve() or resolved in Path.home().resolve().parents:
        return "it is the home folder or one of its parents"
    if resolved == Path(resolved.anchor):
        return "it is a file system root"
    if (resolved / ".git").exists():
        return "it is a git checkout"
    package = Path(__file__).resolve().parent
    if resolved == package or resolved in package.parents:
        return "it holds diffkit itself"
    return None


def _manifest_files(folder: Path) -> set[str] | None:
    """The files diffkit's manifest in ``folder`` lists (itself included), or None without a readable one."""
    try:
        return set(json.loads((folder / MANIFEST).read_text())["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _foreign_entries(folder: Path) -> list[Path]:
    """Files and folders in ``folder`` that diffkit did not write: not in its manifest (nor a folder holding a listed
    file), or, in a pipeline folder saved before manifests existed, outside the components its model_index.json
    names; everything, when it has neither."""
    entries = sorted(folder.rglob("*"))
    listed = _manifest_files(folder)
    if listed is not None:
        folders = {parent.as_posix() for name in listed for parent in Path(name).parents}
        return [p for p in entries if p.relative_to(folder).as_posix() not in (folders if p.is_dir() else listed)]
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict):
        return entries
    components = {k for k in index if not k.startswith("_")} | {"adapters"}

    def in_pipeline(path: Path) -> bool:  # model_index.json, a component folder or anything inside one
        rel = path.relative_to(folder)
        return rel.as_posix() == "model_index.json" or (rel.parts[0] in components and (len(rel.parts) > 1 or path.is_dir()))

    return [p for p in entries if not in_pipeline(p)]


def check_replaceable_folder(out: str, overwrite: bool, option: str = "--out") -> Path:
    """A folder to be written as a whole (a saved pipeline): absent, or with ``overwrite`` a folder diffkit wrote."""
    if not str(out).strip():
        raise OutputError(f"{option} is empty; give a folder")
    path = Path(out).expanduser()
    why = _protected(path)
    if why:
        raise OutputError(f"{option} {out!r} cannot be written as a model folder: {why}")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputError(f"{path} exists; pass --overwrite to replace it")
        if path.is_symlink() or not path.is_dir():
            raise OutputError(f"{path} is not a folder diffkit wrote; --overwrite only replaces diffkit's own folders")
        foreign = _foreign_entries(path)
        if foreign:
            raise OutputError(f"{path} holds files diffkit did not write (e.g. {foreign[0].relative_to(path)}); "
                              "--overwrite only replaces diffkit's own folders")
    check_writable_parent(path, option)
    return path


def write_folder_atomic(out: Path, write, command: str) -> None:
    """``write(staging)`` fills a new folder beside ``out``; its manifest is added and it replaces ``out`` (checked
    with ``check_replaceable_folder``) by renames, so an interrupted run leaves the old folder or the new one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        write(staging)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        from . import __version__

        write_text_atomic(staging / MANIFEST, json.dumps({"written_by": f"diffkit {__version__}", "command": command,
                                                          "files": files}, indent=1))
        _make_ordinary(staging)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(staging, out)
    except BaseException:
        if old is not None and not out.exists():  # put the previous folder back
            os.replace(old / out.name, out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _make_ordinary(folder: Path) -> None:
    """mkdtemp makes 0700 folders; a written model is an ordinary folder (0777 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def output_folder(path: Path):
    """Create ``path`` (and missing parents) for the duration of a run; if the run fails, remove the folders it
    created that are still empty, so a failed run leaves nothing behind."""
    created = []
    probe = path
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise
