"""Attribution benchmark runner: every method's time, pass count and ratio to its peer.

``.venv/bin/python benchmarks/attribution.py [--quick] [--threads N] [--only perturbation|gradients_cam]
[--vgg-size 224]``

Runs ``bench_perturbation`` (occlusion against Captum, RISE) and, when present, the gradient/CAM
benchmarks of ``bench_gradients_cam`` (its ``all_rows(quick)`` rows are merged into the table when it
offers that function, else its ``main`` is called and prints its own table), all in this one
process, CPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller settings: a smoke run, not the reported numbers"
    )
    parser.add_argument("--only", choices=("perturbation", "gradients_cam"), help="run one group")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for every peer (default: torch's choice)"
    )
    parser.add_argument(
        "--vgg-size",
        type=int,
        default=224,
        help="perturbation: VGG-16 input size in px (0: leave that slow row out)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    import bench_perturbation as perturbation

    rows = []
    if args.only in (None, "perturbation"):
        rows += perturbation.all_rows(args.quick, args.vgg_size)
    other = None
    if (
        args.only in (None, "gradients_cam")
        and (Path(__file__).resolve().parent / "bench_gradients_cam.py").exists()
    ):
        other = importlib.import_module("bench_gradients_cam")
        if hasattr(other, "all_rows"):
            rows += other.all_rows(args.quick)
            other = None
    print(perturbation.table(rows))
    if other is not None:
        import inspect

        print()
        if inspect.signature(other.main).parameters:
            other.main(["--quick"] if args.quick else [])
        else:
            other.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
