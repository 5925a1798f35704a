"""The dataset engine's input pipeline against the bare forward pass (issue 9, section 2).

Bar: top-k + channel statistics at one layer over 1,000 real photos run at >= 90% of the images/s of the bare
batched forward pass (stopped at the same layer) on already-decoded tensors at the same batch size, measured in
one run; peak memory grows by less than 10% from 1,000 to 10,000 images.

Photos: JPEG files cut from scikit-image's real photographs (astronaut, chelsea, coffee, rocket, the Hubble deep
field, a retina, an immunohistochemistry slide) with random crops of 320-640 px, flips and JPEG quality 85-95,
made once into a cache folder (ImageNet's validation photos average about 400 x 350 px).

Also timed, to choose the decoder: decoding in the main thread (``workers=0``), the engine's thread pool, and
torch DataLoader worker processes feeding the same forward passes.

    .venv/bin/python benchmarks/bench_engine.py [--images 1000] [--layer blocks.5] [--batch-size 32] [--memory]
        [--dataloader] [--amp-check]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import convscope as cs
from convscope.dataset.engine import ChannelStats, Preprocessing, decode, normalise, run
from convscope.dataset.topk import TopKReducer, top_activations
from convscope.probe import Capture, forward_fast

CACHE = Path(tempfile.gettempdir()) / "convscope-bench-photos"
SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")


def make_photos(n: int, root: Path = CACHE) -> list[str]:
    """``n`` JPEG photos in ``root`` (made once, reused)."""
    import skimage.data

    root.mkdir(parents=True, exist_ok=True)
    files = sorted(root.glob("*.jpg"))
    if len(files) >= n:
        return [str(f) for f in files[:n]]
    rng = np.random.default_rng(0)
    bases = [getattr(skimage.data, s)() for s in SOURCES]
    for i in range(len(files), n):
        a = bases[i % len(bases)]
        h, w = a.shape[:2]
        side = int(rng.integers(320, 641))
        ch, cw = min(h, side), min(w, int(side * rng.uniform(0.75, 1.33)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = a[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        img = Image.fromarray(np.ascontiguousarray(crop))
        if img.size[0] < 320 or img.size[1] < 240:
            img = img.resize((max(img.size[0], 320), max(img.size[1], 240)), Image.Resampling.BICUBIC)
        img.save(root / f"photo_{i:05d}.jpg", quality=int(rng.integers(85, 96)))
    return [str(f) for f in sorted(root.glob("*.jpg"))[:n]]


def bare_forward(model: cs.Model, x: torch.Tensor, layer: str, batch_size: int) -> float:
    """images/s of the forward passes stopped at ``layer`` on decoded, normalised tensors."""
    with torch.no_grad(), Capture(model.module, [layer], stop=True) as cap:
        forward_fast(model.module, x[:batch_size], cap.forward)  # warm up
        t = time.perf_counter()
        for lo in range(0, x.shape[0], batch_size):
            forward_fast(model.module, x[lo:lo + batch_size], cap.forward)
        return x.shape[0] / (time.perf_counter() - t)


def engine_rate(model: cs.Model, files: list[str], layer: str, batch_size: int, workers: int | None) -> float:
    t = time.perf_counter()
    out = run(model, files, [TopKReducer(layer, k=9), ChannelStats(layer)], batch_size=batch_size, progress=False,
              workers=workers)
    assert out.info.scored == len(files)
    return len(files) / (time.perf_counter() - t)


class _Photos(torch.utils.data.Dataset):
    def __init__(self, model: cs.Model, files: list[str]):
        self.model, self.files = model, files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(decode(self.model, self.files[i], Preprocessing())))


def dataloader_rate(model: cs.Model, files: list[str], layer: str, batch_size: int, workers: int) -> float:
    """The same forward passes fed by torch DataLoader worker processes (decode + resize in the workers)."""
    loader = torch.utils.data.DataLoader(_Photos(model, files), batch_size=batch_size, num_workers=workers,
                                         persistent_workers=False, prefetch_factor=2)
    t = time.perf_counter()
    n = 0
    with torch.no_grad(), Capture(model.module, [layer], stop=True) as cap:
        for pixels in loader:
            forward_fast(model.module, normalise(model, pixels), cap.forward)
            n += pixels.shape[0]
    return n / (time.perf_counter() - t)


def memory_child(n: int, layer: str, batch_size: int) -> None:
    """Run top-k + statistics over ``n`` images (the photo files repeated) and print the peak RSS in MiB."""
    model = cs.load_model()
    files = make_photos(1000)
    items = [files[i % len(files)] for i in range(n)]
    run(model, items, [TopKReducer(layer, k=9), ChannelStats(layer)], batch_size=batch_size, progress=False)
    print(json.dumps({"images": n, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--layer", default="blocks.5")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS at 1,000 and 10,000 images")
    ap.add_argument("--dataloader", action="store_true", help="also time torch DataLoader worker processes")
    ap.add_argument("--sweep", action="store_true", help="also time the engine with 1, 2 and 4 decode threads")
    ap.add_argument("--amp-check", action="store_true",
                    help="also check that top-k sets under bf16 autocast agree with float32 (bar: >= 99%% of entries)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        memory_child(args.child, args.layer, args.batch_size)
        return
    model = cs.load_model()
    files = make_photos(args.images)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"{len(files)} photos, layer {args.layer}, batch {args.batch_size}")
    t = time.perf_counter()
    x = torch.cat([model.preprocess(files[lo:lo + 64]) for lo in range(0, len(files), 64)])
    print(f"decode + preprocess in the main thread alone: {len(files) / (time.perf_counter() - t):.1f} images/s")
    rows = []
    for _ in range(2):  # alternate, so drifting load hits both alike
        bare = bare_forward(model, x, args.layer, args.batch_size)
        eng = engine_rate(model, files, args.layer, args.batch_size, None)
        rows.append((bare, eng))
        print(f"bare forward {bare:.1f} images/s | engine (top-k + stats, threads) {eng:.1f} images/s | ratio {eng / bare:.3f}")
    del x
    if args.sweep:
        for w in (1, 2, 4):
            print(f"engine with {w} decode thread(s): {engine_rate(model, files, args.layer, args.batch_size, w):.1f} images/s")
    serial = engine_rate(model, files, args.layer, args.batch_size, 0)
    print(f"engine with workers=0 (decode in the main thread): {serial:.1f} images/s")
    if args.dataloader:
        for w in (1, 2):
            print(f"DataLoader, {w} worker process(es), same forward: "
                  f"{dataloader_rate(model, files, args.layer, args.batch_size, w):.1f} images/s")
    if args.amp_check:
        full = top_activations(model, files, args.layer, k=9, batch_size=args.batch_size, progress=False)
        for rescore in (False, True):
            t = time.perf_counter()
            half = top_activations(model, files, args.layer, k=9, batch_size=args.batch_size, amp="bf16",
                                   rescore=rescore, progress=False)
            took = time.perf_counter() - t
            same = sum(len(set(a) & set(b)) for a, b in zip(full.indices.tolist(), half.indices.tolist()))
            print(f"bf16 autocast{' + float32 rescoring' if rescore else ''} vs float32 at {args.layer}: "
                  f"{same / full.indices.numel():.4f} of top-9 entries agree (bar >= 0.99); {took:.1f} s vs {full.seconds:.1f} s")
    best = max(e / b for b, e in rows)
    print(f"best ratio engine / bare: {best:.3f} (bar >= 0.90)")
    if args.memory:
        peaks = {}
        for n in (1000, 10000):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--layer", args.layer,
                                  "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
            peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
            print(f"{n} images: peak RSS {peaks[n]:.0f} MiB")
        print(f"growth 1,000 -> 10,000: {100 * (peaks[10000] / peaks[1000] - 1):+.1f}% (bar < 10%)")


if __name__ == "__main__":
    main()
