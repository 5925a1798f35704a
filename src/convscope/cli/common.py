"""Options and helpers shared by every subcommand: model selection, device, images, output paths.

Commands import from here (never from another ``cmd_*.py``): :func:`model_options` (the parent parser
every command takes), :func:`load_model_from_args`, :func:`parse_target`, :func:`output_file` (checks
``-o`` before any work), :func:`save` (atomic write plus a line on stderr), :func:`positive_int`,
:func:`image_stem`, :func:`slug` and :func:`info`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..dataset.engine import AMP_DTYPES, ENGINES
from ..dataset.engine import WORKERS as ENGINE_WORKERS
from ..dataset.folder import BATCH_SIZE as DATASET_BATCH_SIZE
from ..dataset.folder import SAVE_EVERY, SkippedImagesWarning, skipped_summary
from ..errors import ConvscopeError
from ..files import check_output_path
from ..images import IMAGE_SUFFIXES
from ..models import Model, default_layer, load_model
from ..options import INT_LIMIT, Option, bounded
from ..render import save_image

#: Largest class count accepted by ``--num-classes`` (the biggest public label sets have ~22k classes).
MAX_CLASSES = 1_000_000


def positive_int(text: str) -> int:
    """argparse ``type=``: a whole number from 1 to 2**63 - 1 (argparse turns the error into one line, exit 2).
    Options with a natural maximum (sizes, counts that allocate) use :func:`~convscope.options.bounded` instead."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > INT_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {INT_LIMIT}, got {value}")
    return value


positive_int.option = Option(int, None, "a whole number >= 1", minimum=1)  # type: ignore[attr-defined]  # its bounds, for tests


def model_options() -> argparse.ArgumentParser:
    """A parent parser with the options every command takes."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="M",
                   help="built-in (default), a torchvision name (resnet50), timm:NAME, or a model file")
    g.add_argument("--weights", default="DEFAULT", metavar="W",
                   help="pretrained weights for named models: DEFAULT, a torchvision weights name, or 'none' for random")
    g.add_argument("--arch", default=None, help="architecture of a state_dict or safetensors file")
    g.add_argument("--num-classes", type=bounded(int, 1, MAX_CLASSES, name="--num-classes"), default=None, metavar="N",
                   help=f"number of classes of a model file's head (1..{MAX_CLASSES:,})")
    g.add_argument("--labels", default=None, metavar="FILE", help="text file with one class name per line")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow model files that unpickle Python objects (runs code from the file: trusted files only)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def load_model_from_args(args: argparse.Namespace) -> Model:
    """The model the ``--model/--weights/--arch/--num-classes/--labels/--trust-pickle/--device`` options name."""
    weights = None if str(args.weights).lower() in ("none", "random") else args.weights
    labels = None
    if args.labels:
        try:
            with open(args.labels, encoding="utf-8") as f:
                labels = [line.strip() for line in f if line.strip()]
        except OSError as exc:
            raise ConvscopeError(f"{args.labels}: cannot read labels ({exc.strerror})") from None
    return load_model(
        args.model,
        weights=weights,
        arch=args.arch,
        num_classes=args.num_classes,
        labels=labels,
        device=args.device,
        trust=args.trust_pickle,
    )


def parse_target(text: str | None, model: Model) -> int | None:
    """``--target`` as a class index or a label name (None: the top prediction)."""
    if text is None:
        return None
    return model.class_index(text)


def slug(text: str) -> str:
    """``text`` with runs of characters unsafe in file names replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")


def image_stem(source: str) -> str:
    """A file-name-safe short name for an image argument (``sample:chelsea`` -> ``chelsea``)."""
    name = source.split(":", 1)[1] if source.startswith("sample:") else os.path.splitext(os.path.basename(source))[0]
    return slug(name) or "image"


def output_file(path: str | None, default: str, suffixes: Iterable[str] = IMAGE_SUFFIXES, *, what: str = "output") -> str:
    """``-o`` or the default name, checked before any work: a known suffix (default: the image suffixes),
    not a directory, a folder that exists (or can be made) and is writable. Raises
    :class:`~convscope.files.OutputPathError` (one line, exit 2); creates nothing."""
    out = path or default
    check_output_path(out, suffixes, what=what)
    return out


def save(picture: Any, path: str, what: str) -> None:
    """Write ``picture`` atomically and say where on stderr; write errors become one-line user errors."""
    try:
        save_image(picture, path)
    except OSError as exc:
        raise ConvscopeError(f"{path}: cannot write the {what} ({exc.strerror or exc})") from None
    info(f"{what} written to {os.path.abspath(path)}")


def info(message: str) -> None:
    """Progress and result lines for people go to stderr; data goes to stdout."""
    print(message, file=sys.stderr)


# ============================================================================ dataset commands
# Shared by topk, embed, dissect, bias and evolution (streaming runs over many images).


def add_dataset_options(p: argparse.ArgumentParser, *, output: str, json_help: str, state: bool = False,
                        batch_size: bool = True, engine: bool = False, save_every: bool = False) -> None:
    """The options every dataset command takes, declared once: ``--batch-size`` (bounded like the Python
    API's ``batch_size``), ``--state FILE`` (resumable runs only), ``-o/--output`` (``output``: its help),
    ``--json`` and ``--no-progress``; with ``engine``, the dataset engine's (:func:`add_engine_options`); with
    ``save_every``, ``--save-every N`` (how often ``--state`` is written)."""
    if engine:
        add_engine_options(p)
    if batch_size:
        p.add_argument("--batch-size", type=DATASET_BATCH_SIZE.argtype("--batch-size"), default=DATASET_BATCH_SIZE.default,
                       metavar="N", help=f"images per forward pass ({DATASET_BATCH_SIZE.range_text()}; default "
                       f"{DATASET_BATCH_SIZE.default})")
    if state:
        p.add_argument("--state", default=None, metavar="FILE",
                       help="save progress to FILE (+ FILE.json) as the run goes; the same command again resumes it")
    if save_every:
        p.add_argument("--save-every", type=SAVE_EVERY.argtype("--save-every"), default=SAVE_EVERY.default, metavar="N",
                       help=f"with --state: save every N batches ({SAVE_EVERY.range_text()}; default {SAVE_EVERY.default})")
    p.add_argument("-o", "--output", default=None, metavar="FILE.png", help=output)
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The dataset engine's options (:func:`convscope.dataset.engine.run`): ``--engine local|ray``, ``--address``,
    ``--workers``, ``--amp`` and ``--num-gpus``; :func:`engine_kwargs` turns them into keyword arguments."""
    g = p.add_argument_group("dataset engine")
    g.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this process (CPU or --device cuda); ray: a Ray cluster (pip install convscope[ray])")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="with --engine ray: the cluster to join (e.g. 10.0.0.1:6379 or auto; default: start a local Ray)")
    g.add_argument("--workers", type=ENGINE_WORKERS.argtype("--workers"), default=None, metavar="N",
                   help=f"image decode threads ({ENGINE_WORKERS.range_text()}; 0: decode in the main thread; "
                   "default min(8, cores))")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None,
                   help="autocast the forward passes (bf16 on CPU or CUDA, fp16 on CUDA); default float32")
    g.add_argument("--num-gpus", type=bounded(float, 0, 64, name="--num-gpus"), default=None, metavar="G",
                   help="with --engine ray: GPUs per actor (e.g. 1, or 0.5 to share one between two actors)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the dataset engine named by :func:`add_engine_options`'s options."""
    if args.engine != "ray" and (args.address is not None or args.num_gpus is not None):
        raise ConvscopeError("--address and --num-gpus need --engine ray")
    return {"engine": args.engine, "address": args.address, "workers": args.workers, "amp": args.amp,
            "num_gpus": args.num_gpus}


def check_run_outputs(args: argparse.Namespace) -> None:
    """``-o`` (when given) and ``--state FILE`` of a resumable layer run (topk, dissect) checked before any
    work: one line, exit 2, when either cannot be written. The default ``-o`` name waits for the layer
    (:func:`layer_and_output`)."""
    if args.output:
        output_file(args.output, "")
    if args.state is not None:
        check_output_path(args.state, what="state file")


def layer_and_output(args: argparse.Namespace, model: Model, name: str) -> tuple[str, str]:
    """The layer (``--layer`` or the last spatial one) and the picture path (``-o`` or ``NAME-LAYER.png``,
    checked) of a run over one layer of ``model`` (topk, dissect)."""
    layer = args.layer or default_layer(model, "cam")
    return layer, output_file(args.output, f"{name}-{slug(layer)}.png")


def image_inputs(items: list[str] | None) -> Any:
    """Image arguments of a dataset command: ``None`` for none, one folder as itself, otherwise the list of
    image files / ``sample:NAME`` (a folder among several is a user error)."""
    if not items:
        return None
    if len(items) == 1 and not items[0].startswith("sample:"):
        if not os.path.exists(items[0]):
            raise ConvscopeError(f"{items[0]}: no such folder or file")
        if os.path.isdir(items[0]):
            return items[0]
    for item in items:
        if os.path.isdir(item):
            raise ConvscopeError(f"{item}: give one folder, or a list of image files")
    return items


@contextlib.contextmanager
def skipped_reported_once() -> Iterator[None]:
    """Silence :class:`~convscope.dataset.folder.SkippedImagesWarning` inside (the command reports the
    skipped files itself, in one line, with :func:`report_skipped`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)
        yield


def report_skipped(skipped: Sequence[tuple[int, str]]) -> None:
    """One line on stderr: how many files were unreadable and why (the first three)."""
    if skipped:
        info(skipped_summary(skipped))


def finish_run(result: Any, state: str | None) -> int:
    """The closing lines of a resumable run (topk, dissect: the files skipped, images done, time, where the state
    is) and its exit code: 130 when interrupted."""
    report_skipped(result.skipped)
    info(f"{result.processed - len(result.skipped)} images in {result.seconds:.1f} s" + (f"; state in {state}" if state else ""))
    if result.interrupted:
        info("interrupted: " + ("run the same command again to continue" if state else "rerun with --state FILE to be able to resume"))
        return 130
    return 0


def dataset_command(subparsers: Any, parents: list[argparse.ArgumentParser], name: str, *, help: str, description: str,
                    func: Any, output: str, json_help: str, state: bool = False, batch_size: bool = True,
                    engine: bool = False, save_every: bool = False) -> argparse.ArgumentParser:
    """Add the parser of a dataset command with the options they all take (:func:`add_dataset_options`) and its
    ``func``; the command adds its own options to the parser returned."""
    p = subparsers.add_parser(name, parents=parents, help=help, description=description)
    add_dataset_options(p, output=output, json_help=json_help, state=state, batch_size=batch_size, engine=engine,
                        save_every=save_every)
    p.set_defaults(func=func)
    return p
