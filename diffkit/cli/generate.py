"""``diffkit generate``: images from a class- or text-conditional model, one seeded PNG each.

``--model`` takes a diffkit folder or any standard diffusers Stable Diffusion 1.x / 2.x, SDXL, SD3 or Flux folder or
Hub repo id (loaded as a GuidedPipeline over its components); the solver and guidance scale default to the model's
(its scheduler; its family's diffusers default scale).

Image i uses seed + i (or the seed its line of ``--prompts-file`` gives), so every image can be regenerated alone;
under ``accelerate launch`` the images are split across processes, each on its own accelerator. Memory does not grow
with ``-n``: images go to disk as they are made, the jobs are computed one at a time, and grid.png shows the first
64. ``--resume`` makes only the images that are missing or incomplete (a killed run then ends with exactly the files
an uninterrupted run writes), and ``manifest.jsonl`` lists what was written (file, seed, label or prompt), which
``diffkit eval`` reads. Everything that can be refused is refused before the model runs or a file is written.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..distributed import process_share, process_state
from ..folders import MANIFEST, read_manifest
from ..guidance import GUIDANCES, make_guidance
from ..images import image_grid, save_png_atomic
from ..outputs import check_output_files, check_output_folder, output_folder
from ..solvers import SOLVERS
from . import common
from .common import UsageError


GRID_IMAGES = 64  # grid.png shows the first images only, so the last step's memory does not grow with -n
# the settings an image's pixels depend on: --resume keeps an existing image only where these match
RESULT_KEYS = ("model", "revision", "steps", "solver", "guidance", "guidance_scale", "guidance_rescale", "apg_eta", "apg_r",
               "apg_momentum", "eta", "height", "width", "dtype", "int8_kernels", "seed", "label", "prompt", "negative_prompt")


def add_parser(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    gen = sub.add_parser("generate", help="generate images", formatter_class=fmt)
    gen.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    gen.add_argument("--revision", default=None, help="Hub revision")
    what = gen.add_mutually_exclusive_group()
    what.add_argument("--label", type=common.labels, default=None, help="class label(s), e.g. 7 or 3,7 (cycled)")
    what.add_argument("--prompt", default=None, help="text prompt (text-conditional models)")
    what.add_argument("--prompts-file", default=None, metavar="FILE",
                      help="one prompt a line (cycled over -n images; -n defaults to one image a prompt), or .jsonl "
                           "with one image a line: {\"prompt\" or \"label\", optional \"negative_prompt\", \"seed\"}")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("-n", "--num-images", type=common.num_images, default=None, help="default: 16")
    gen.add_argument("--steps", type=common.positive_int, default=25)
    gen.add_argument("--solver", choices=sorted(SOLVERS), default=None,
                     help="default: the model's scheduler (its class and sigma options)")
    gen.add_argument("--guidance", choices=sorted(GUIDANCES) + ["none"], default="cfg")
    gen.add_argument("--guidance-scale", type=common.finite_float, default=None,
                     help="default: the model family's (3 pixel models, 7.5 SD, 5 SDXL, 7 SD3, 1 Flux: its true CFG off)")
    gen.add_argument("--guidance-rescale", type=common.finite_float, default=0.0, help="CFG-rescale phi")
    gen.add_argument("--apg-eta", type=common.finite_float, default=0.0, help="APG: weight of the parallel component")
    gen.add_argument("--apg-r", type=common.finite_float, default=0.0, help="APG: norm threshold r (0 = no clamp)")
    gen.add_argument("--apg-momentum", type=common.finite_float, default=0.0, help="APG: momentum beta (< 0 = reverse)")
    gen.add_argument("--eta", type=common.non_negative_float, default=0.0, help="DDIM stochasticity (--solver ddim)")
    gen.add_argument("--seed", type=common.seed, default=0, help="image i uses seed + i")
    gen.add_argument("--batch-size", type=common.positive_int, default=16)
    gen.add_argument("--height", type=common.positive_int, default=None)
    gen.add_argument("--width", type=common.positive_int, default=None)
    gen.add_argument("--device", default=None, help="default: this process's accelerator, else the CPU")
    gen.add_argument("--dtype", choices=sorted(common.DTYPES), default="fp32")
    gen.add_argument("--int8-kernels", action="store_true",
                     help="run a quantised model (diffkit quantize) on oneDNN int8 kernels; compiles first (minutes)")
    gen.add_argument("--out", default="out", help="output folder")
    gen.add_argument("--overwrite", action="store_true", help="replace images diffkit wrote there before")
    gen.add_argument("--resume", action="store_true",
                     help="keep the images a run with these settings already wrote completely; make the rest")
    gen.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    gen.add_argument("--no-progress", action="store_true")
    gen.set_defaults(run=run)


def _guidance_kwargs(args) -> dict:
    if args.guidance == "apg":
        return {"eta": args.apg_eta, "norm_threshold": args.apg_r, "momentum": args.apg_momentum}
    if (args.apg_eta, args.apg_r, args.apg_momentum) != (0.0, 0.0, 0.0):
        raise UsageError("--apg-eta/--apg-r/--apg-momentum need --guidance apg")
    return {}


def _check_args(args) -> None:
    """What can be refused before loading a model; flags that would be silently ignored count as errors."""
    if args.label is None and args.prompt is None and args.prompts_file is None:
        raise UsageError("give --label (class-conditional model), --prompt or --prompts-file (text model)")
    if args.negative_prompt is not None and args.prompt is None and args.prompts_file is None:
        raise UsageError("--negative-prompt needs --prompt or --prompts-file")
    if args.eta != 0.0 and args.solver != "ddim":
        raise UsageError("--eta needs --solver ddim")
    if args.resume and args.overwrite:
        raise UsageError("--resume keeps the images already written and --overwrite replaces them: give one")
    args.lines = _read_prompts_file(args) if args.prompts_file is not None else None
    if args.num_images is None:
        args.num_images = len(args.lines) if args.lines is not None else 16
    elif args.lines is not None and _is_jsonl(args.prompts_file):
        raise UsageError("--num-images: a .jsonl --prompts-file has one image a line; leave -n out")
    common.check_seed_range(args.seed, args.num_images)
    if args.lines is not None and _is_jsonl(args.prompts_file):  # two lines must not make one file
        made = {}
        for i, entry in enumerate(args.lines):
            name = _job(args, i)["file"]
            if name in made:
                raise UsageError(f"--prompts-file {args.prompts_file}: lines {made[name]} and {entry['line']} both make "
                                 f"{name} (the same label and seed)")
            made[name] = entry["line"]
    if args.guidance != "none":
        scale = 3.0 if args.guidance_scale is None else args.guidance_scale  # the rule's own checks; the model's default comes later
        make_guidance(args.guidance, scale, args.guidance_rescale, **_guidance_kwargs(args))


def _is_jsonl(path: str) -> bool:
    return Path(path).suffix.lower() == ".jsonl"


def _read_prompts_file(args) -> list[dict]:
    """The lines of --prompts-file: {"prompt"} per text line; per JSONL line its "prompt" or "label", optional
    "negative_prompt" and "seed" (checked here, with the line number, before any model loads)."""
    path = args.prompts_file
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--prompts-file: cannot read {path!r}: {err}") from None
    if not _is_jsonl(path):
        lines = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"--prompts-file {path} line {number}: not JSON") from None
            if not isinstance(entry, dict):
                raise UsageError(f"--prompts-file {path} line {number}: must be an object like {{\"prompt\": ...}}")
            unknown = sorted(set(entry) - {"prompt", "label", "negative_prompt", "seed"})
            if unknown or ("prompt" in entry) == ("label" in entry):
                raise UsageError(f"--prompts-file {path} line {number}: give \"prompt\" or \"label\" (with optional "
                                 f"\"negative_prompt\", \"seed\"){'; unknown key ' + repr(unknown[0]) if unknown else ''}")
            if "prompt" in entry and not isinstance(entry["prompt"], str):
                raise UsageError(f"--prompts-file {path} line {number}: \"prompt\" must be a string")
            if "label" in entry and (not isinstance(entry["label"], int) or isinstance(entry["label"], bool)):
                raise UsageError(f"--prompts-file {path} line {number}: \"label\" must be an integer")
            if "negative_prompt" in entry and ("label" in entry or not isinstance(entry["negative_prompt"], str)):
                raise UsageError(f"--prompts-file {path} line {number}: \"negative_prompt\" must be a string, with a prompt")
            seed = entry.get("seed")
            if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= common.MAX_SEED):
                raise UsageError(f"--prompts-file {path} line {number}: \"seed\" must be an integer in [0, 2^63 - 1]")
            entry["line"] = number
            lines.append(entry)
        if len({"label" in entry for entry in lines}) > 1:
            raise UsageError(f"--prompts-file {path}: mix of \"label\" and \"prompt\" lines; a model takes one kind")
    if not lines:
        raise UsageError(f"--prompts-file {path} holds no prompts")
    return lines


def _job(args, i: int) -> dict:
    """Image i: its seed, its label or prompt (with the prompt's index), its file name."""
    seed = args.seed + i
    lines = getattr(args, "lines", None)
    if lines is not None:
        jsonl = _is_jsonl(args.prompts_file)
        index = i if jsonl else i % len(lines)
        entry = lines[index]
        seed = entry.get("seed", seed) if jsonl else seed
        if "label" in entry:
            return {"seed": seed, "label": entry["label"], "file": f"label{entry['label']}-seed{seed:06d}.png"}
        job = {"seed": seed, "prompt_index": index, "prompt": entry["prompt"], "file": f"prompt{index}-seed{seed:06d}.png"}
        negative = entry.get("negative_prompt", args.negative_prompt)
        return {**job, "negative_prompt": negative} if negative is not None else job
    if args.label is not None:
        label = args.label[i % len(args.label)]
        return {"seed": seed, "label": label, "file": f"label{label}-seed{seed:06d}.png"}
    return {"seed": seed, "prompt_index": 0, "file": f"prompt0-seed{seed:06d}.png"}  # --prompt takes one prompt


class Jobs:
    """The run's images, each computed when asked for (nothing of size -n is built but the prompts file's lines)."""

    def __init__(self, args):
        self.args = args

    def __len__(self) -> int:
        return self.args.num_images

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return _job(self.args, i)

    def writes(self, record: dict) -> bool:
        """Whether this run writes the file a manifest record describes (image i has seed --seed + i, except in a
        .jsonl prompts file, whose lines name their seeds)."""
        if self.args.lines is not None and _is_jsonl(self.args.prompts_file):
            if not hasattr(self, "_files"):
                self._files = {self[i]["file"] for i in range(len(self))}
            return record.get("file") in self._files
        i = record.get("seed", -1) - self.args.seed if isinstance(record.get("seed"), int) else -1
        return 0 <= i < len(self) and self[i]["file"] == record.get("file")


def _call_kwargs(args, batch: list[dict]) -> dict:
    if "label" in batch[0]:
        condition = {"class_labels": [job["label"] for job in batch]}
    elif getattr(args, "lines", None) is not None:
        negatives = [job.get("negative_prompt") for job in batch]
        condition = {"prompt": [job["prompt"] for job in batch],
                     "negative_prompt": None if all(n is None for n in negatives) else [n or "" for n in negatives]}
    else:
        condition = {"prompt": [args.prompt] * len(batch), "negative_prompt": args.negative_prompt}
    return dict(
        **condition,
        num_inference_steps=args.steps,
        guidance=None if args.guidance == "none" else args.guidance,
        guidance_scale=args.guidance_scale,
        guidance_kwargs=_guidance_kwargs(args),
        guidance_rescale=args.guidance_rescale,
        solver=args.solver,
        eta=args.eta,
        height=args.height,
        width=args.width,
        # one CPU generator per image: its noise depends on its seed alone, not on the batch or the device
        generator=[torch.Generator().manual_seed(job["seed"]) for job in batch],
        output_type="pil",
    )


def _png_text(args, job, image) -> dict:
    """A1111-style 'parameters' plus diffkit's full JSON; the run's --label list and first seed stay in the
    record, "label" and "seed" are this image's."""
    parameters = (
        f"Steps: {args.steps}, Sampler: {args.sampler}, Guidance: {args.guidance}, CFG scale: {args.guidance_scale}, "
        f"Seed: {job['seed']}, Size: {image.width}x{image.height}, Model: {args.model or 'diffkit-default'}"
    )
    if "label" in job:
        parameters += f", Label: {job['label']}"
    else:  # A1111 puts the prompts on their own lines before the settings, so commas in them parse
        prompt, negative = job.get("prompt", args.prompt), job.get("negative_prompt", args.negative_prompt)
        negative = f"\nNegative prompt: {negative}" if negative else ""
        parameters = f"{prompt}{negative}\n{parameters}"
    record = {k: v for k, v in vars(args).items()
              if k not in ("command", "overwrite", "resume", "no_grid", "no_progress", "run", "lines", "sampler")}
    record["solver"] = args.sampler
    record["labels"], record["first_seed"] = record.pop("label"), record.pop("seed")
    record.update(job, versions=common.versions())
    return {"parameters": parameters, "diffkit": json.dumps(record)}


def _check_model(pipe, args) -> None:
    """Refuse what the model cannot do before any file is written: the pipeline's own input checks on a call
    like the first batch's (labels, height / width, steps, guidance, ...)."""
    from ..pipelines import GuidedPipeline

    if not isinstance(pipe, GuidedPipeline):
        raise UsageError(f"diffkit generate needs a GuidedPipeline model, got {type(pipe).__name__}")
    if args.prompt is not None and pipe.num_classes is not None:
        raise UsageError("this model is class-conditional: use --label, not --prompt")
    if args.label is not None and pipe.num_classes is None:
        raise UsageError("this model is text-conditional: use --prompt, not --label")
    if args.label is not None:
        bad = [label for label in args.label if not 0 <= label < pipe.num_classes]
        if bad:
            raise UsageError(f"--label {bad[0]} is out of range for this model (0..{pipe.num_classes - 1})")
    if args.lines is not None:
        wants_labels = "label" in args.lines[0]
        if wants_labels and pipe.num_classes is None:
            raise UsageError("--prompts-file has labels but this model is text-conditional")
        if not wants_labels and pipe.num_classes is not None:
            raise UsageError("--prompts-file has prompts but this model is class-conditional: give labels")
        for entry in args.lines:
            if wants_labels and not 0 <= entry["label"] < pipe.num_classes:
                raise UsageError(f"--prompts-file line {entry['line']}: label {entry['label']} is out of range for this "
                                 f"model (0..{pipe.num_classes - 1})")
    if args.guidance_scale is None:
        args.guidance_scale = pipe.default_guidance_scale  # recorded with the images as the value used
    first = [_job(args, i) for i in range(min(args.num_images, args.batch_size))]
    kwargs = _call_kwargs(args, first)
    try:
        pipe.check_inputs(**kwargs)
        # the solver the model's scheduler resolves to, recorded with the images (the call itself passes None)
        args.sampler = pipe.solver_setup(args.solver, args.steps, *pipe.check_size(args.height, args.width)).solver
    except ValueError as err:
        raise UsageError(_option_message(str(err))) from None


def _option_message(message: str) -> str:
    """A pipeline's message in the CLI's words (its parameters are the CLI's options)."""
    for name, option in (("num_inference_steps", "--steps"), ("guidance_scale", "--guidance-scale"), ("height", "--height"),
                         ("width", "--width"), ("eta", "--eta"), ("class_labels", "--label")):
        message = message.replace(name, option)
    return message


def _kept_on_resume(path: Path, args, job: dict) -> bool:
    """--resume: whether an existing image stays. It stays when it is a complete PNG (every chunk's checksum, the
    image data's included) that diffkit wrote with this run's settings; an incomplete one of diffkit's is made
    again; anything else is refused, as without --resume."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            record = image.info.get("diffkit") if image.format == "PNG" else None  # the text chunks before the pixels
    except (OSError, PIL.UnidentifiedImageError, ValueError):
        record = None
    if record is None or path.is_symlink():
        raise UsageError(f"{path} was not written by diffkit; --resume only keeps or completes diffkit's own images")
    try:
        with PIL.Image.open(path) as image:
            image.verify()
    except Exception:
        return False
    try:
        written = json.loads(record)
    except json.JSONDecodeError:
        return False
    expected = json.loads(_png_text(args, job, _Size(written.get("width"), written.get("height")))["diffkit"])
    differ = [k for k in RESULT_KEYS if written.get(k) != expected.get(k)]
    if differ:
        raise UsageError(f"{path} was written with other settings ({differ[0]} {written.get(differ[0])!r}, now "
                         f"{expected.get(differ[0])!r}); --resume only completes a run with the same settings "
                         "(--overwrite replaces it)")
    return True


class _Size:
    """Stands in for an image in ``_png_text`` when only the record's settings matter."""

    def __init__(self, width, height):
        self.width, self.height = width, height


def _remove_temporaries(out: Path) -> None:
    """The temporary files a killed run left beside its images, grid and manifest (each is written as
    ``.NAME.<random>.tmp`` and renamed into place; only a killed process leaves one behind)."""
    for path in out.glob(".*.tmp"):
        name = path.name[1:].rsplit(".", 2)[0]
        if name.endswith(".png") or name == MANIFEST:
            path.unlink(missing_ok=True)


def _write_manifest(out: Path, jobs) -> None:
    """This run's records (file, seed, label or prompt), in image order, after the records of earlier runs into the
    folder for other files: the old lines are streamed into a new file, then this run's, then the new file replaces
    the old, so a killed run never leaves a torn manifest and a resumed run lists each of its images once."""
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as new:
            if (out / MANIFEST).is_file():
                for record in read_manifest(out / MANIFEST):
                    if not jobs.writes(record):
                        new.write(json.dumps(record) + "\n")
            for i in range(len(jobs)):
                job = jobs[i]
                record = {"file": job["file"], "seed": job["seed"]}
                record.update({k: job[k] for k in ("label", "prompt", "negative_prompt") if k in job})
                new.write(json.dumps(record) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_outputs(out: Path, jobs, args) -> range | list[int]:
    """Refuse what may not be written, before any work; returns the images to make (all, or with --resume those
    missing or incomplete)."""
    if not args.resume:
        check_output_files(out, (jobs[i]["file"] for i in range(len(jobs))), args.overwrite)
        if (out / "grid.png").exists() and not args.no_grid:
            check_output_files(out, ["grid.png"], args.overwrite)
        return range(len(jobs))
    todo = [i for i in range(len(jobs))
            if not ((out / jobs[i]["file"]).exists() and _kept_on_resume(out / jobs[i]["file"], args, jobs[i]))]
    if (out / "grid.png").exists() and not args.no_grid:
        check_output_files(out, ["grid.png"], overwrite=True)  # the grid is diffkit's own: it is redrawn
    return todo


def run(args) -> None:
    state = process_state()
    _check_args(args)
    device = common.device(args.device, state)
    out = check_output_folder(args.out)
    pipe = common.load_model(args.model, revision=args.revision, dtype=common.DTYPES[args.dtype])
    _check_model(pipe, args)
    if args.int8_kernels:
        from ..quant import QuantizedModel

        if not isinstance(pipe.unet, QuantizedModel):
            raise UsageError("--int8-kernels needs a quantised model (make one with `diffkit quantize`)")
        if device.type != "cpu":
            raise UsageError(f"--int8-kernels runs on x86 CPUs only, not on {device}")
        pipe.unet.use_int8_kernels()
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    jobs = Jobs(args)
    todo = _check_outputs(out, jobs, args)
    # no process writes before all have checked, or a slow one would find the others' new files and fail alone
    state.wait_for_everyone()

    with output_folder(out):
        if args.resume and state.is_main_process:
            _remove_temporaries(out)
        mine = [todo[i] for i in process_share(len(todo), state)] if args.resume else process_share(len(todo), state)
        with tqdm(total=len(mine), desc="images", disable=args.no_progress or not state.is_main_process) as bar:
            for start in range(0, len(mine), args.batch_size):
                batch = [jobs[i] for i in mine[start : start + args.batch_size]]
                for job, image in zip(batch, pipe(**_call_kwargs(args, batch)).images):
                    save_png_atomic(image, out / job["file"], _png_text(args, job, image))
                bar.update(len(batch))
        state.wait_for_everyone()
        if state.is_main_process:  # the other processes' images exist only on disk: read back a bounded sample
            _write_manifest(out, jobs)
            if not args.no_grid:
                shown = [out / jobs[i]["file"] for i in range(min(len(jobs), GRID_IMAGES))]
                save_png_atomic(image_grid(_read_images(shown)), out / "grid.png", {"diffkit": "grid"})
            kept = len(jobs) - len(todo)
            print(f"wrote {len(todo)} images{f' (kept {kept} from before)' if kept else ''}"
                  f"{'' if args.no_grid else ' and grid.png'} and {MANIFEST} to {out}")


def _read_images(paths: list[Path]) -> list:
    import PIL.Image

    images = []
    for path in paths:
        with PIL.Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images
