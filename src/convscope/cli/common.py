"""Options and helpers shared by every subcommand: model selection, device, images, output paths."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import ConvscopeError


def model_options() -> argparse.ArgumentParser:
    """A parent parser with the options every command takes."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="M",
                   help="built-in (default), a torchvision name (resnet50), timm:NAME, or a model file")
    g.add_argument("--weights", default="DEFAULT", metavar="W",
                   help="pretrained weights for named models: DEFAULT, a torchvision weights name, or 'none' for random")
    g.add_argument("--arch", default=None, help="architecture of a state_dict or safetensors file")
    g.add_argument("--num-classes", type=int, default=None, help="number of classes of a model file's head")
    g.add_argument("--labels", default=None, metavar="FILE", help="text file with one class name per line")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow model files that unpickle Python objects (runs code from the file: trusted files only)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def load_model_from_args(args: argparse.Namespace):
    from ..models import load_model

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


def parse_target(text: str | None, model: Any) -> int | None:
    """``--target`` as a class index or a label name (None: the top prediction)."""
    if text is None:
        return None
    return model.class_index(text)


def output_path(path: str | None, default: str) -> str:
    return path or default


def info(message: str) -> None:
    """Progress and result lines for people go to stderr; data goes to stdout."""
    print(message, file=sys.stderr)
