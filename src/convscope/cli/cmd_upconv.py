"""``convscope upconv-train IMAGES --layer L -o net.pt``: train an up-convolutional decoder of a layer.

Dosovitskiy & Brox (CVPR 2016). Parses options, calls :func:`convscope.synthesis.upconv.train_upconv`
(resumable: the same command continues from ``-o``), prints the held-out reconstruction error; progress and
messages go to stderr. The decoder inverts images (``convscope invert IMAGE --method upconv --net net.pt``)
and is a generator for DGN-AM (``convscope visualize OBJECTIVE --generator net.pt``).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..files import check_output_path
from ..synthesis.bounds import SEED
from ..synthesis.upconv import (
    FEATURE_WEIGHT,
    SAVE_EVERY,
    STEPS,
    TRAIN_SIZE,
    UPCONV_BATCH,
    UPCONV_LR,
    WIDTH,
    train_upconv,
)
from .common import image_inputs, info, load_model_from_args

ORDER = 78

#: Suffixes of decoder files.
NET_SUFFIXES = (".pt", ".pth")


def run_upconv_train(args: argparse.Namespace) -> int:
    check_output_path(args.output, NET_SUFFIXES, what="decoder file")
    images = image_inputs(args.images)
    model = load_model_from_args(args)
    net = train_upconv(model, images, args.layer, output=args.output, steps=args.steps, size=args.size,
                       batch_size=args.batch_size, lr=args.lr, feature_weight=args.feature_weight, width=args.width,
                       save_every=args.save_every, seed=args.seed, resume=not args.restart,
                       progress=False if args.no_progress else None)
    held = f"; held-out pixel MSE {net.held_out[-1]:.4f}" if net.held_out else ""
    info(f"decoder of {net.layer} at {net.size[0]}x{net.size[1]} px, step {net.step}{held}; written to {args.output}")
    if net.interrupted:
        raise KeyboardInterrupt  # saved above; exit 130
    return 0


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "upconv-train", parents=parents,
        help="train an up-convolutional network that inverts a layer (Dosovitskiy & Brox 2016)",
        description="Train a decoder from LAYER's features back to the image on IMAGES (pixel loss, optionally a "
        "feature loss), saved atomically to -o as it goes; running the same command again continues it.")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="a folder of training images (searched recursively), or image files / sample:NAME")
    p.add_argument("--layer", required=True, metavar="L", help="layer whose features are inverted")
    p.add_argument("-o", "--output", required=True, metavar="NET.pt", help="decoder file to write (and resume from): .pt or .pth")
    p.add_argument("--steps", type=STEPS.argtype("--steps"), default=STEPS.default, metavar="N",
                   help=f"Adam steps in all ({STEPS.range_text()}; default {STEPS.default})")
    p.add_argument("--size", type=TRAIN_SIZE.argtype("--size"), default=None, metavar="PX",
                   help=f"training image side ({TRAIN_SIZE.range_text()}; default: the model's input size)")
    p.add_argument("--batch-size", type=UPCONV_BATCH.argtype("--batch-size"), default=UPCONV_BATCH.default, metavar="N",
                   help=f"images per step ({UPCONV_BATCH.range_text()}; default {UPCONV_BATCH.default})")
    p.add_argument("--lr", type=UPCONV_LR.argtype("--lr"), default=UPCONV_LR.default, help=f"Adam learning rate ({UPCONV_LR.range_text()})")
    p.add_argument("--feature-weight", type=FEATURE_WEIGHT.argtype("--feature-weight"), default=0.0, metavar="W",
                   help="weight of the feature loss next to the pixel loss (default 0: pixel loss only)")
    p.add_argument("--width", type=WIDTH.argtype("--width"), default=WIDTH.default, metavar="C",
                   help=f"channels of the decoder's first layers ({WIDTH.range_text()}; default {WIDTH.default})")
    p.add_argument("--save-every", type=SAVE_EVERY.argtype("--save-every"), default=SAVE_EVERY.default, metavar="N",
                   help=f"save every N steps (default {SAVE_EVERY.default})")
    p.add_argument("--seed", type=SEED.argtype("--seed"), default=0, help="seed of the initialisation and the batches (default 0)")
    p.add_argument("--restart", action="store_true", help="start from scratch even if -o holds a decoder of this run")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_upconv_train)
