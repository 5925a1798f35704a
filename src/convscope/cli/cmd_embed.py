"""``convscope embed FOLDER``: a 2-D map of a dataset by a layer's features, and nearest neighbours.

Parses options, calls :func:`convscope.dataset.embed.embed`, :meth:`~convscope.dataset.embed.Embedding.project`
and :meth:`~convscope.dataset.embed.Embedding.neighbours`; prints the coordinates (or JSON) on stdout and
writes the pictures atomically; progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..dataset.embed import ITERATIONS, MAP_SIZE, METHODS, METRICS, NEIGHBOURS, POOLS, THUMB, embed
from ..dataset.folder import ImageSource
from ..dataset.maps import INDEXES, MAX_POINTS, check_map_size
from ..errors import ConvscopeError
from ..files import check_output_path
from ..images import load_image
from ..options import bounded
from .common import (
    dataset_command,
    engine_kwargs,
    image_inputs,
    info,
    load_model_from_args,
    output_file,
    report_skipped,
    save,
    skipped_reported_once,
)

ORDER = 46
DEFAULT_PERPLEXITY = 30.0
#: Seeds every projection accepts (umap-learn's random_state is a 32-bit seed).
SEED_MAX = 2**32 - 1


def run_embed(args: argparse.Namespace) -> int:
    """Embed the images, save the features, draw the map and the neighbours, print the data.

    Every argument is checked before anything is computed or written: the image list, the output paths,
    the ``--neighbours`` query image (a query that cannot be read leaves no file behind) and whether the
    map method can take that many images (:func:`~convscope.dataset.maps.check_map_size`, ``--max-points``),
    so a set too large for t-SNE fails at once, not after every image has been embedded."""
    images = image_inputs(args.images)
    root = images if isinstance(images, str) else None
    out = output_file(args.output, "embedding-map.png")
    nn_out = output_file(args.neighbours_out, "neighbours.png") if args.neighbours else None
    if args.save:
        check_output_path(args.save, what="embedding file")
    if args.state:
        check_output_path(args.state, what="state file")
    if args.store:
        check_output_path(args.store, what="features file")
    streaming = engine_kwargs(args)
    check_map_size(args.method, len(ImageSource(images)), max_points=args.max_points)  # after the paths: one line each
    if args.neighbours:
        load_image(args.neighbours)  # an unreadable query fails now, not after the run and its files
    model = load_model_from_args(args)
    with skipped_reported_once():
        e = embed(model, images, args.layer, pool=args.pool, batch_size=args.batch_size, predict=args.predict or None,
                  progress=False if args.no_progress else None, state=args.state, store=args.store,
                  save_every=args.save_every, **streaming)
    report_skipped(e.skipped)
    info(f"{e} in {e.seconds:.1f} s")
    if e.interrupted:
        info(f"interrupted: continuing with the {len(e)} images done; "
             + ("run the same command again to embed the rest" if args.state else "use --state FILE to be able to resume"))
    if args.save:  # before the projection: a long t-SNE that is interrupted keeps the features
        _write_embedding(e, args.save)
    perplexity = args.perplexity
    if args.method == "tsne" and perplexity is None:
        perplexity = DEFAULT_PERPLEXITY
        if perplexity > (len(e) - 1) / 3:
            perplexity = max(1.0, (len(e) - 1) / 3)
            info(f"only {len(e)} images: t-SNE perplexity {perplexity:.3g} instead of {DEFAULT_PERPLEXITY:g} (set it with --perplexity)")
    options: dict[str, Any] = {}
    if args.method == "tsne":
        options = {"perplexity": perplexity, "iterations": args.iterations, "index": args.index}
    e.project(args.method, seed=args.seed, max_points=args.max_points, progress=False if args.no_progress else None,
              **options)
    if args.save:
        _write_embedding(e, args.save)  # now with the map's coordinates
    save(e.map_image(size=args.size, thumb=args.thumb), out, f"{args.method} map")
    found = None
    if args.neighbours:
        found = e.neighbours(args.neighbours, k=min(args.k, len(e)), metric=args.metric)
        save(e.neighbours_image(args.neighbours, k=min(args.k, len(e)), metric=args.metric), nn_out, "neighbours picture")
    if args.json:
        data = e.to_dict()
        data["root"] = None if root is None else os.path.abspath(root)
        data["perplexity"] = perplexity
        for p in data["points"]:
            p["source"] = _relative(p["source"], root)
        if found is not None:
            data["query"] = {"image": args.neighbours, "metric": args.metric, "k": len(found)}
            data["neighbours"] = [{"rank": n.rank, "index": n.index, "source": _relative(n.source, root), "distance": n.distance}
                                  for n in found]
        print(json.dumps(data, indent=1))
    else:
        _print_table(e, root, found, args)
    return 130 if e.interrupted else 0


def _write_embedding(e: Any, path: str) -> None:
    try:
        e.save(path)
    except OSError as exc:
        raise ConvscopeError(f"{path}: cannot write the embedding ({exc.strerror or exc})") from None
    info(f"features written to {os.path.abspath(path)} (+ .json)")


def _relative(source: str | None, root: str | None) -> str | None:
    if source is None or root is None or source.startswith("sample:"):
        return source
    return os.path.relpath(source, root)


def _print_table(e: Any, root: str | None, found: list | None, args: argparse.Namespace) -> None:
    print(f"{len(e)} images x {e.dims} features ({e.where}), {args.method} map")
    print(f"{'index':>5}  {'x':>10}  {'y':>10}  {'prediction':<24}  source")
    for i in range(len(e)):
        x, y = (float(v) for v in e.coords[i][:2])
        label = e.label(i)
        pred = "" if label is None else f"{label[:17]} {float(e.probabilities[i]):.0%}"
        print(f"{i:>5}  {x:>10.4g}  {y:>10.4g}  {pred:<24}  {_relative(e.sources[i], root) or '-'}")
    if found is not None:
        print(f"\nnearest to {args.neighbours} by {args.metric} distance:")
        for n in found:
            print(f"{n.rank:>5}  {n.distance:>10.4f}  {_relative(n.source, root) or n.index}")


#: One line for ``convscope --help``.
HELP = "a 2-D map (t-SNE, PCA, UMAP) of a folder by a layer's features; nearest neighbours"
#: What ``convscope embed --help`` says the command does.
DESCRIPTION = (
    "Stream every image of FOLDER (recursively, sorted) through the model and keep one feature vector per "
    "image: the penultimate features (input of the classifier) by default, or the global average/max pool of --layer. "
    "Draw a 2-D map of the set with thumbnails framed in the colour of the predicted class, and optionally the "
    "nearest neighbours of an image."
)


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add the ``embed`` parser."""
    p = dataset_command(subparsers, parents, "embed", save_every=True, help=HELP, description=DESCRIPTION,
                        func=run_embed, output="map picture (default embedding-map.png)", json_help="print every image's coordinates (and the neighbours) as JSON",
                        state=True, engine=True)
    p.add_argument("--store", default=None, metavar="FILE.npy",
                   help="write the features to FILE.npy as they are computed (row i = image i; default: STATE.features.npy "
                        "beside --state, else a temporary file)")
    p.add_argument("images", nargs="+", metavar="FOLDER", help="a folder of images (searched recursively), or image files / sample:NAME")
    p.add_argument("--layer", default=None, metavar="L", help="layer to pool (default: the classifier's input)")
    p.add_argument("--pool", choices=POOLS, default="avg", help="global pooling of feature maps (default avg)")
    p.add_argument("--predict", action="store_true", help="with --layer: run the whole network to colour the map by class")
    p.add_argument("--method", choices=METHODS, default="tsne", help="2-D projection (default tsne)")
    p.add_argument("--perplexity", type=bounded(float, 1, 1e6, name="--perplexity"), default=None, metavar="P",
                   help=f"t-SNE perplexity, at least 1 (default {DEFAULT_PERPLEXITY:g}, lowered to (N-1)/3 for small sets)")
    p.add_argument("--iterations", type=ITERATIONS.argtype("--iterations"), default=ITERATIONS.default, metavar="N",
                   help=f"t-SNE iterations ({ITERATIONS.range_text()}; default {ITERATIONS.default})")
    p.add_argument("--index", choices=("auto", *INDEXES), default="auto",
                   help="neighbour index of t-SNE's kNN graph: flat (exact), ivf or hnsw (approximate); "
                        "default auto: flat up to 200,000 images, hnsw beyond")
    p.add_argument("--max-points", type=bounded(int, 2, 2**40, name="--max-points"), default=None, metavar="N",
                   help=f"most images the map method takes (default: {MAX_POINTS['tsne']:,} for tsne and umap, "
                        "no limit for pca); checked before any image is embedded")
    p.add_argument("--seed", type=bounded(int, 0, SEED_MAX, name="--seed"), default=0, metavar="S",
                   help=f"random seed of the projection (0..{SEED_MAX}; default 0)")
    p.add_argument("--size", type=MAP_SIZE.argtype("--size"), default=MAP_SIZE.default, metavar="PX",
                   help=f"map width in pixels ({MAP_SIZE.range_text()}; default {MAP_SIZE.default})")
    p.add_argument("--thumb", type=THUMB.argtype("--thumb"), default=THUMB.default, metavar="PX",
                   help=f"thumbnail size in pixels ({THUMB.range_text()}; default {THUMB.default})")
    p.add_argument("--neighbours", default=None, metavar="IMAGE", help="also find the nearest neighbours of IMAGE")
    p.add_argument("--k", type=NEIGHBOURS.argtype("--k"), default=NEIGHBOURS.default, metavar="K",
                   help=f"neighbours to show ({NEIGHBOURS.range_text()}; default {NEIGHBOURS.default})")
    p.add_argument("--metric", choices=METRICS, default="cosine", help="neighbour distance (default cosine)")
    p.add_argument("--neighbours-out", default=None, metavar="FILE.png", help="neighbours picture (default neighbours.png)")
    p.add_argument("--save", default=None, metavar="FILE.pt", help="save the features (+ FILE.pt.json with the sources)")
