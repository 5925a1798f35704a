"""Perturbation benchmarks: occlusion (exact incremental, approximate) against Captum, and RISE.

Run through ``benchmarks/attribution.py`` (prints the table) or alone:
``.venv/bin/python benchmarks/bench_perturbation.py [--quick]``.

Each row times our call and the peer in the same process, CPU, one image. Wall-clock time is what is
compared; CPU time of this process is printed too because the machine may be shared.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import convscope as cs

#: our calls are timed as the fastest of this many runs; each Captum setting runs once and the
#: fastest setting is reported (so the peer also gets a best-of-several)
REPEAT = 2


@dataclass
class Row:
    method: str
    config: str
    ours_s: float
    ours_cpu_s: float
    passes: str
    peer: str
    peer_s: float | None
    check: str
    peer_cpu_s: float | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.peer_s is None else self.peer_s / self.ours_s

    @property
    def cpu_ratio(self) -> float | None:
        return None if self.peer_cpu_s is None else self.peer_cpu_s / self.ours_cpu_s


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[object, float, float]:
    """(result, wall seconds, process CPU seconds) of the fastest of ``repeat`` calls."""
    best = None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        run = (out, time.perf_counter() - t0, time.process_time() - c0)
        if best is None or run[1] < best[1]:
            best = run
    return best


def captum_occlusion(
    module: torch.nn.Module, x: torch.Tensor, target: int, window: int, stride: int, per_eval: int
) -> torch.Tensor:
    from captum.attr import Occlusion

    occ = Occlusion(lambda z: module(z).softmax(dim=1))
    with torch.no_grad():
        out = occ.attribute(
            x,
            sliding_window_shapes=(3, window, window),
            strides=(3, stride, stride),
            baselines=0.0,
            target=target,
            perturbations_per_eval=per_eval,
        )
    return out[:, 0]


def best_captum(module, x, target, window, stride, per_evals) -> tuple[torch.Tensor, float, int, float]:
    """Captum Occlusion at each ``perturbations_per_eval``; returns (map, best wall time, best setting,
    its CPU time)."""
    best = None
    for pe in per_evals:
        out, wall, cpu = timed(lambda pe=pe: captum_occlusion(module, x, target, window, stride, pe))
        if best is None or wall < best[1]:
            best = (out, wall, pe, cpu)
    return best


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1])


def occlusion_rows(quick: bool = False, vgg_size: int = 224) -> list[Row]:
    rows: list[Row] = []
    model = cs.load_model()
    x = model.preprocess(cs.sample_image("chelsea"))
    window, stride = 16, 8
    per_evals = (16,) if quick else (8, 16, 32)
    cs.attribute(model, x[:, :, :64, :64], "occlusion", window=16, stride=16)  # warm-up
    exact, wall, cpu = timed(
        lambda: cs.attribute(model, x, "occlusion", window=window, stride=stride), REPEAT
    )
    ref, peer_wall, pe, peer_cpu = best_captum(
        model.module, x, int(exact.target[0]), window, stride, per_evals
    )
    cfg = f"built-in 224px w{window} s{stride}"
    rows.append(
        Row(
            "occlusion (exact, incremental)",
            cfg,
            wall,
            cpu,
            f"{exact.extras['copies_evaluated']} copies, {exact.extras['computed_fraction']:.0%} of conv MACs",
            f"Captum Occlusion ppe={pe}",
            peer_wall,
            f"max rel diff {rel_diff(exact.raw, ref):.1e}",
            peer_cpu,
        )
    )
    approx, awall, acpu = timed(
        lambda: cs.attribute(model, x, "occlusion", window=window, stride=stride, approximate=True), REPEAT
    )
    checks = [f"corr with exact {corr(approx.raw, exact.raw):.4f}"]
    for other in ("coffee", "rocket") if not quick else ():
        xo = model.preprocess(cs.sample_image(other))
        ex = cs.attribute(model, xo, "occlusion", window=window, stride=stride)
        ap = cs.attribute(model, xo, "occlusion", window=window, stride=stride, approximate=True)
        checks.append(f"{other} {corr(ap.raw, ex.raw):.4f}")
    rows.append(
        Row(
            "occlusion (approximate, tau=0.5)",
            cfg,
            awall,
            acpu,
            f"{approx.extras['copies_evaluated']} copies, {approx.extras['computed_fraction']:.0%} of conv MACs",
            f"Captum Occlusion ppe={pe}",
            peer_wall,
            ", ".join(checks),
            peer_cpu,
        )
    )

    if vgg_size:
        rows.append(vgg_row(vgg_size if not quick else 64, quick))
    return rows


def probe_per_eval(module: torch.nn.Module, x: torch.Tensor, settings: tuple[int, ...]) -> tuple[int, str]:
    """Captum's cost per occluded copy is one forward pass of a batch of ``perturbations_per_eval``
    copies; this times one such batch for each setting (a short probe instead of whole Captum runs,
    used for the slow VGG-16 224 px row) and returns the fastest setting and a note."""
    per_copy = {}
    with torch.no_grad():
        for pe in settings:
            batch = x.expand(pe, -1, -1, -1).contiguous()
            module(batch[:1])
            t0 = time.perf_counter()
            module(batch)
            per_copy[pe] = (time.perf_counter() - t0) / pe
    best = min(per_copy, key=per_copy.get)
    note = ", ".join(f"ppe={k}: {1000 * v:.0f} ms/copy" for k, v in per_copy.items())
    return best, note


def vgg_row(size: int, quick: bool = False) -> Row:
    """Exact occlusion on torchvision VGG-16 (random weights) at ``size`` px against Captum. At 224 px
    Captum runs once, at the ``perturbations_per_eval`` chosen by :func:`probe_per_eval`."""
    import torchvision

    window, stride = 16, 8
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval()
    xv = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    ours, vwall, vcpu = timed(
        lambda: cs.attribute(vgg, xv, "occlusion", window=window, stride=stride), 1 if size >= 160 else REPEAT
    )
    if quick:
        settings, note = (16,), ""
    elif size >= 160:
        pe, note = probe_per_eval(vgg, xv, (4, 8, 16))
        settings, note = (pe,), f" (chosen by a probe: {note})"
    else:
        settings, note = (8, 16), ""
    ref, vpeer, vpe, vpeer_cpu = best_captum(vgg, xv, int(ours.target[0]), window, stride, settings)
    return Row(
        "occlusion (exact, incremental)",
        f"VGG-16 random {size}px w{window} s{stride}",
        vwall,
        vcpu,
        f"{ours.extras['copies_evaluated']} copies, {ours.extras['computed_fraction']:.0%} of conv MACs",
        f"Captum Occlusion ppe={vpe}{note}",
        vpeer,
        f"max rel diff {rel_diff(ours.raw, ref):.1e}",
        vpeer_cpu,
    )


def rise_rows(quick: bool = False) -> list[Row]:
    model = cs.load_model()
    x = model.preprocess(cs.sample_image("chelsea"))
    masks = 50 if quick else 250
    a, wall, cpu = timed(lambda: cs.attribute(model, x, "rise", masks=masks, batch_size=16))
    return [
        Row(
            "rise",
            f"built-in 224px {masks} masks",
            wall,
            cpu,
            f"{a.forward_passes} forward",
            "-",
            None,
            f"{1000 * wall / masks:.1f} ms per mask",
        )
    ]


def all_rows(quick: bool = False, vgg_size: int = 224) -> list[Row]:
    """Every perturbation row; ``vgg_size`` 0 leaves the (slow) VGG-16 row out."""
    return occlusion_rows(quick, vgg_size) + rise_rows(quick)


def table(rows: list[Row]) -> str:
    head = (
        "| method | config | ours (s) | passes | peer | peer (s) | ratio | CPU ours / peer (s) | CPU ratio | check |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        peer_s = f"{r.peer_s:.2f}" if r.peer_s is not None else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        cpu = (
            f"{r.ours_cpu_s:.2f} / {r.peer_cpu_s:.2f}"
            if r.peer_cpu_s is not None
            else f"{r.ours_cpu_s:.2f} / -"
        )
        cpu_ratio = f"{r.cpu_ratio:.2f}x" if r.cpu_ratio is not None else "-"
        lines.append(
            f"| {r.method} | {r.config} | {r.ours_s:.2f} | {r.passes} | {r.peer} | {peer_s} | {ratio} | {cpu} | {cpu_ratio} | {r.check} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller settings (a smoke run, not the reported numbers)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--vgg-size", type=int, default=224, help="VGG-16 input size in px (0: leave the VGG-16 row out)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(table(all_rows(args.quick, args.vgg_size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
