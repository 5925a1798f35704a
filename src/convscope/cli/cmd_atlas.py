"""``convscope atlas build IMAGES --layers L1,L2 -o ATLAS`` and ``convscope atlas export ATLAS --static OUT``.

The build (:func:`convscope.atlas.build_atlas`) fills an atlas folder with every unit's visualisations, dataset
examples, statistics and each layer's activation atlas; the export (:func:`convscope.atlas.export.export_static`)
writes it as plain files that open from ``file://``. ``convscope serve --atlas ATLAS`` browses it live.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..atlas.build import DIVERSITY, FLOWS, GRID, ICON_SIZE, MIN_COUNT, SAMPLES, VIS_SIZE, VIS_STEPS, K
from ..errors import ConvscopeError
from ..files import check_output_dir
from ..options import bounded
from .common import add_engine_options, engine_kwargs, info, load_model_from_args

ORDER = 62


def run_build(args: argparse.Namespace) -> int:
    check_output_dir(args.output, what="atlas folder")
    if not os.path.isdir(args.images):
        raise ConvscopeError(f"{args.images}: not a folder of images")
    if args.concepts is not None and not os.path.isdir(args.concepts):
        raise ConvscopeError(f"{args.concepts}: not a Broden-format concept folder")
    from ..atlas import build_atlas

    model = load_model_from_args(args)
    store = build_atlas(model, args.images, args.layers, args.output, concepts=args.concepts, k=args.k,
                        vis_size=args.vis_size, vis_steps=args.vis_steps, diversity=args.diversity,
                        negative=not args.no_negative, samples=args.samples, grid=args.grid, min_count=args.min_count,
                        icon_size=args.icon_size, icon_steps=args.icon_steps, flows=args.flows, batch_size=args.batch_size,
                        seed=args.seed, progress=False if args.no_progress else None, **engine_kwargs(args))
    page = store.model()
    prov = page.get("provenance") or {}
    info(f"atlas of {len(page['layers'])} layer(s) over {page['images']} images written to {args.output} "
         f"in {prov.get('seconds', 0):.0f} s; browse it with: convscope serve --atlas {args.output}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    check_output_dir(args.static, what="static site folder")
    from ..atlas.export import export_static

    out = export_static(args.atlas, args.static)
    info(f"static atlas written to {out}; open {os.path.join(out, 'index.html')} in a browser (no server needed)")
    return 0


HELP = "build a browsable atlas of a model's units and layers, or export one as a static site"


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("atlas", help=HELP, description="A Microscope-like atlas: `atlas build` fills a folder "
                              "with every unit's feature visualisations, top dataset examples (patches and projections), "
                              "statistics, concepts and each layer's activation atlas; `atlas export` writes it as plain "
                              "files; `convscope serve --atlas DIR` browses it.")
    sub = p.add_subparsers(dest="atlas_command", metavar="build|export", parser_class=type(p))
    b = sub.add_parser("build", parents=parents, help="build or extend an atlas (resumable, incremental)",
                       description="Stream IMAGES through the model once (the dataset engine: top-k, statistics and an "
                       "activation sample per layer share the passes), then render every unit's visualisations and each "
                       "layer's activation atlas into the folder -o. Rerunning with more layers or images reuses what "
                       "the folder holds; an interrupted build continues.")
    b.add_argument("images", metavar="IMAGES", help="folder of images (searched recursively; class sub-folders allowed)")
    b.add_argument("--layers", required=True, metavar="L1,L2", help="layers with feature maps, comma-separated")
    b.add_argument("-o", "--output", required=True, metavar="ATLAS", help="atlas folder to write (or extend)")
    b.add_argument("--concepts", default=None, metavar="BRODEN_DIR",
                   help="a Broden-format concept folder: each unit's Network Dissection concept and IoU")
    b.add_argument("--k", type=K.argtype("--k"), default=K.default, metavar="K",
                   help=f"dataset examples per unit ({K.range_text()}; default {K.default})")
    b.add_argument("--vis-size", type=VIS_SIZE.argtype("--vis-size"), default=VIS_SIZE.default, metavar="PX",
                   help=f"feature visualisation size ({VIS_SIZE.range_text()}; default {VIS_SIZE.default})")
    b.add_argument("--vis-steps", type=VIS_STEPS.argtype("--vis-steps"), default=VIS_STEPS.default, metavar="N",
                   help=f"optimisation steps per visualisation ({VIS_STEPS.range_text()}; default {VIS_STEPS.default})")
    b.add_argument("--diversity", type=DIVERSITY.argtype("--diversity"), default=DIVERSITY.default, metavar="N",
                   help=f"diverse samples per unit ({DIVERSITY.range_text()}; default {DIVERSITY.default})")
    b.add_argument("--no-negative", action="store_true", help="skip the negative visualisations")
    b.add_argument("--samples", type=SAMPLES.argtype("--samples"), default=SAMPLES.default, metavar="N",
                   help=f"activation vectors sampled per image for the layer atlas ({SAMPLES.range_text()}; default "
                   f"{SAMPLES.default})")
    b.add_argument("--grid", type=GRID.argtype("--grid"), default=None, metavar="N",
                   help=f"layer atlas grid side ({GRID.range_text()}; default from the sample count, at most 20)")
    b.add_argument("--min-count", type=MIN_COUNT.argtype("--min-count"), default=None, metavar="N",
                   help="samples a grid cell needs to get an icon (default from the sample count)")
    b.add_argument("--icon-size", type=ICON_SIZE.argtype("--icon-size"), default=ICON_SIZE.default, metavar="PX",
                   help=f"layer atlas icon size ({ICON_SIZE.range_text()}; default {ICON_SIZE.default})")
    b.add_argument("--icon-steps", type=VIS_STEPS.argtype("--icon-steps"), default=None, metavar="N",
                   help="optimisation steps per icon (default: --vis-steps)")
    b.add_argument("--flows", type=FLOWS.argtype("--flows"), default=FLOWS.default, metavar="N",
                   help=f"dataset images shown flowing through the layers ({FLOWS.range_text()}; default {FLOWS.default})")
    b.add_argument("--batch-size", type=bounded(int, 1, 4096, name="--batch-size"), default=32, metavar="N",
                   help="images per forward pass of the dataset pass (1..4096; default 32)")
    b.add_argument("--seed", type=bounded(int, 0, 2**31 - 1, name="--seed"), default=0,
                   help="seed of the visualisations and the activation sample (default 0)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_options(b)
    b.set_defaults(func=run_build)
    e = sub.add_parser("export", help="write an atlas as a static site (plain files, opens from file://)",
                       description="Copy the atlas's pages, data and pictures into OUT as plain files: open "
                       "OUT/index.html in a browser, no server needed.")
    e.add_argument("atlas", metavar="ATLAS", help="an atlas folder made by `convscope atlas build`")
    e.add_argument("--static", required=True, metavar="OUT", help="folder to write the static site into")
    e.set_defaults(func=run_export)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
