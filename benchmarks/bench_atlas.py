"""Atlas build time against the sum of its parts run one by one (issue 13's benchmark).

Builds the atlas of one layer (default ``blocks.4`` of the built-in model, 112 units) over N photos (the
engine benchmark's JPEGs, see ``bench_engine.py``) with ``build_atlas``, which shares one dataset pass between
top-k, statistics and the activation sample and renders visualisations and icons in batches; then runs the same
parts one by one as a user would without the atlas: three separate dataset passes (``top_activations``,
channel statistics, the activation sample), the projections, and every visualisation and icon rendered alone.
Prints both times per part. Then the page views of the built atlas (``bench_atlas_api.py --atlas``).

    .venv/bin/python benchmarks/bench_atlas.py [--images 1000] [--layer blocks.4] [--vis-steps 32] [--diversity 4]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import convscope as cs
from convscope.atlas import build_atlas
from convscope.atlas.build import ActivationSample, grouped_diversity, icon_objective
from convscope.dataset.engine import ChannelStats, run
from convscope.dataset.topk import top_activations
from convscope.synthesis.objectives import channel
from convscope.synthesis.render import render

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import make_photos  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--layer", default="blocks.4")
    ap.add_argument("--vis-size", type=int, default=96)
    ap.add_argument("--vis-steps", type=int, default=32)
    ap.add_argument("--diversity", type=int, default=4)
    ap.add_argument("--units", type=int, default=None, help="render only the first N units one by one (then scaled)")
    ap.add_argument("--out", default=None, help="atlas folder (default: a temporary one, removed)")
    args = ap.parse_args()
    model = cs.load_model()
    files = make_photos(args.images)
    folder = Path(tempfile.mkdtemp(prefix="convscope-atlas-photos-"))
    for f in files:
        (folder / Path(f).name).symlink_to(f)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="convscope-atlas-")) / "atlas"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(files)} photos, layer {args.layer}, "
          f"visualisations {args.vis_size} px x {args.vis_steps} steps, diversity {args.diversity}")
    store, total = timed(lambda: build_atlas(model, folder, [args.layer], out, vis_size=args.vis_size,
                                             vis_steps=args.vis_steps, diversity=args.diversity, icon_steps=args.vis_steps,
                                             flows=0, progress=False))
    stages = store.model()["provenance"]["stage_seconds"]
    print(f"build_atlas: {total:.1f} s  ({', '.join(f'{k} {v:.1f} s' for k, v in stages.items())})")

    # ---- the parts one by one
    parts: dict[str, float] = {}
    topk, parts["top-k pass"] = timed(lambda: top_activations(model, folder, args.layer, k=9, progress=False))
    _, parts["statistics pass"] = timed(lambda: run(model, folder, [ChannelStats(args.layer)], progress=False))
    sample, parts["sample pass"] = timed(lambda: run(model, folder, [ActivationSample(args.layer, 4)], progress=False).results[0])
    _, parts["projections"] = timed(lambda: topk.projected(model, topk.channels, method="guided", progress=False))
    c = len(topk.channels)
    n = min(c, args.units or c)
    common = {"size": args.vis_size, "steps": args.vis_steps, "seed": 0, "progress": False}

    def one_by_one() -> None:
        for u in range(n):
            render(model, channel(args.layer, u), batch=1, **common)
            render(model, -1.0 * channel(args.layer, u), batch=1, **common)
            if args.diversity > 1:
                render(model, channel(args.layer, [u] * args.diversity) + grouped_diversity(args.layer, args.diversity),
                       batch=args.diversity, **common)

    _, vis = timed(one_by_one)
    parts["visualisations"] = vis * c / n
    cells = store.atlas(args.layer)["cells"]
    vectors = sample["vectors"]
    means = [vectors[:8].mean(0) for _ in cells]  # the icon cost does not depend on which vector

    def icons() -> None:
        for v in means[: max(1, len(means) * n // c)]:
            render(model, icon_objective(args.layer, v[None]), batch=1, size=64, steps=args.vis_steps, seed=0, progress=False)

    _, ic = timed(icons)
    parts["icons"] = ic * len(means) / max(1, len(means) * n // c)
    alone = sum(parts.values())
    print("parts one by one: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
          + (f" (visualisations and icons timed on {n} of {c} units, scaled)" if n < c else ""))
    print(f"sum of the parts: {alone:.1f} s; build_atlas {total:.1f} s = {total / alone:.2f} of it "
          f"(the build also writes every picture and the index)")
    subprocess.run([sys.executable, str(Path(__file__).with_name("bench_atlas_api.py")), "--atlas", str(out),
                    "--requests", "30", "--no-export"], check=False)
    if not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
