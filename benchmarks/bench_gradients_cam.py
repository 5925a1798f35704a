"""Speed of the gradient and CAM methods against their peers, on the built-in model (224 px, CPU).

    .venv/bin/python benchmarks/bench_gradients_cam.py            # everything (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_gradients_cam.py --quick    # skip the slow Score-CAM / Ablation-CAM peers

Each line: method, our time, our passes per image, the peer's time (at its best setting among those
tried) and the ratio peer / ours (> 1: we are faster). Every peer runs in the same process, on the
same input and target; the outputs are compared (max relative difference or map correlation).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

import convscope as cs

warnings.filterwarnings("ignore")


def best_time(fn, repeat: int = 3) -> tuple[float, object]:
    """Minimum wall time over ``repeat`` runs (one warm-up run first) and the last result."""
    out = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def once(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def corr(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def row(name: str, ours: float, passes: str, peer_name: str, peer: float | None, check: str) -> None:
    ratio = f"{peer / ours:6.2f}x" if peer else "     -"
    peer_s = f"{peer:8.3f} s" if peer else "         -"
    print(f"{name:34s} {ours:8.3f} s  {passes:>12s}   {peer_name:38s} {peer_s}  {ratio}   {check}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the slow many-pass peers")
    args = parser.parse_args()
    from captum.attr import IntegratedGradients, LayerGradCam, NoiseTunnel, Saliency
    from pytorch_grad_cam import AblationCAM, GradCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = cs.load_model()
    module = model.module
    x = model.preprocess(cs.sample_image("chelsea"))
    target = 282
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {x.device}; built-in model, chelsea, target {target}")
    print(f"{'method':34s} {'ours':>10s}  {'passes/img':>12s}   {'peer':38s} {'peer time':>10s}  {'ratio':>7s}   check")

    # --- one forward + backward (to the input, parameters frozen): the floor of every gradient method
    def fwd_bwd():
        with cs.guard(module, freeze=True):
            xi = x.detach().requires_grad_(True)
            s = module(xi)[0, target]
            return torch.autograd.grad(s, xi)[0]

    t_fb, _ = best_time(fwd_bwd, 5)
    row("forward + backward (reference)", t_fb, "1+1", "", None, "")

    # --- Grad-CAM
    t_gc, a = best_time(lambda: cs.attribute(model, x, "gradcam", target=target), 5)
    t_gc_top, a_top = best_time(lambda: cs.attribute(model, x, "gradcam"), 5)
    t_cap, ref = best_time(lambda: LayerGradCam(module, model.layer("bn2")).attribute(x, target=target), 5)
    row("gradcam (target given)", t_gc, f"{a.forward_passes}+{a.backward_passes}", "Captum LayerGradCam", t_cap,
        f"rel diff {rel(a.raw, ref.squeeze(1).clamp(min=0)):.1e}; vs fwd+bwd {t_gc / t_fb:.2f}x")
    peer = GradCAM(model=module, target_layers=[model.layer("bn2")])
    t_pg, ref2 = best_time(lambda: peer(input_tensor=x, targets=[ClassifierOutputTarget(target)]), 5)
    row("gradcam (top class)", t_gc_top, f"{a_top.forward_passes}+{a_top.backward_passes}", "pytorch-grad-cam GradCAM", t_pg,
        f"corr {corr(a_top.map, ref2):.4f}; vs fwd+bwd {t_gc_top / t_fb:.2f}x")
    peer.activations_and_grads.release()

    # --- saliency
    t_s, a = best_time(lambda: cs.attribute(model, x, "saliency", target=target), 5)
    t_p, ref = best_time(lambda: Saliency(module).attribute(x, target=target, abs=False), 5)
    row("saliency", t_s, "1+1", "Captum Saliency(abs=False)", t_p, f"rel diff {rel(a.raw, ref):.1e}")

    # --- integrated gradients (32 steps, zero baseline, Gauss-Legendre: Captum's default rule) and
    # smoothgrad (16 samples): every setting runs interleaved with the others, best of 3 rounds
    steps, samples = 32, 16
    sigma = float(0.15 * (x.max() - x.min()))
    # convscope feeds the model channels-last input on the CPU (faster oneDNN convolutions); the peers get
    # the input as the user holds it (NCHW) and, for comparison, channels-last input prepared by hand
    xcl = x.contiguous(memory_format=torch.channels_last)
    runs = {
        ("ig", "ours", 8): lambda: cs.attribute(model, x, "integrated_gradients", steps=steps, baseline="zero", target=target, batch_size=8),
        ("ig", "ours", 16): lambda: cs.attribute(model, x, "integrated_gradients", steps=steps, baseline="zero", target=target, batch_size=16),
        ("ig", "peer", None): lambda: IntegratedGradients(module).attribute(x, target=target, n_steps=steps),
        ("ig", "peer", 8): lambda: IntegratedGradients(module).attribute(x, target=target, n_steps=steps, internal_batch_size=8),
        ("ig", "peer", 16): lambda: IntegratedGradients(module).attribute(x, target=target, n_steps=steps, internal_batch_size=16),
        ("ig", "peer-nhwc", None): lambda: IntegratedGradients(module).attribute(xcl, target=target, n_steps=steps),
        ("ig", "peer-nhwc", 8): lambda: IntegratedGradients(module).attribute(xcl, target=target, n_steps=steps, internal_batch_size=8),
        ("sg", "ours", 8): lambda: cs.attribute(model, x, "smoothgrad", samples=samples, target=target, batch_size=8),
        ("sg", "ours", 16): lambda: cs.attribute(model, x, "smoothgrad", samples=samples, target=target, batch_size=16),
        ("sg", "peer", None): lambda: NoiseTunnel(Saliency(module)).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, stdevs=sigma, target=target, abs=False),
        ("sg", "peer", 8): lambda: NoiseTunnel(Saliency(module)).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, stdevs=sigma, target=target, abs=False, nt_samples_batch_size=8),
        ("sg", "peer-nhwc", 8): lambda: NoiseTunnel(Saliency(module)).attribute(
            xcl, nt_type="smoothgrad", nt_samples=samples, stdevs=sigma, target=target, abs=False, nt_samples_batch_size=8),
        ("sg", "peer-nhwc", 16): lambda: NoiseTunnel(Saliency(module)).attribute(
            xcl, nt_type="smoothgrad", nt_samples=samples, stdevs=sigma, target=target, abs=False, nt_samples_batch_size=16),
    }
    times = {k: float("inf") for k in runs}
    results = {}
    for _ in range(3):
        for key, fn in runs.items():
            t, results[key] = once(fn)
            times[key] = min(times[key], t)

    def best(kind: str, who: str):
        key = min((k for k in runs if k[0] == kind and k[1] == who), key=lambda k: times[k])
        return key[2], times[key], results[key]

    bs, t_ig, a = best("ig", "ours")
    pbs, t_p, ref = best("ig", "peer")
    row(f"integrated_gradients steps={steps} bs={bs}", t_ig, f"{a.forward_passes}+{a.backward_passes}",
        f"Captum IG internal_batch_size={pbs}", t_p, f"rel diff {rel(a.raw, ref):.1e}")
    pbs, t_p, ref = best("ig", "peer-nhwc")
    row("  (same, peer given channels-last input)", t_ig, "", f"Captum IG NHWC internal_batch_size={pbs}", t_p, f"rel diff {rel(a.raw, ref):.1e}")
    bs, t_sg, a = best("sg", "ours")
    pbs, t_p, ref = best("sg", "peer")
    row(f"smoothgrad samples={samples} bs={bs}", t_sg, f"{a.forward_passes}+{a.backward_passes}",
        f"Captum NoiseTunnel(Saliency) bs={pbs}", t_p, "same estimator, different noise draws")
    pbs, t_p, ref = best("sg", "peer-nhwc")
    row("  (same, peer given channels-last input)", t_sg, "", f"Captum NoiseTunnel NHWC bs={pbs}", t_p, "")

    # --- Score-CAM at bn2 (1280 channels)
    mine = {bs: once(lambda bs=bs: cs.attribute(model, x, "scorecam", layer="bn2", target=target, batch_size=bs))
            for bs in (16, 32)}
    sbs = min(mine, key=lambda k: mine[k][0])
    t_sc, a = mine[sbs]
    if args.quick:
        row("scorecam bn2", t_sc, f"{a.forward_passes}", "(peer skipped: --quick)", None, f"distinct masks {int(a.extras['distinct_masks'][0])}")
    else:
        peers = {}
        for bs in (16, 64):
            with ScoreCAM(model=module, target_layers=[model.layer("bn2")]) as peer:
                peer.batch_size = bs
                peers[bs] = once(lambda peer=peer: peer(input_tensor=x, targets=[ClassifierOutputTarget(target)]))
        b = min(peers, key=lambda k: peers[k][0])
        t_p, ref = peers[b]
        row(f"scorecam bn2 batch={sbs}", t_sc, f"{a.forward_passes}", f"pytorch-grad-cam ScoreCAM batch={b}", t_p,
            f"corr {corr(a.map, ref):.4f}; distinct masks {int(a.extras['distinct_masks'][0])}/1280")

    # --- Ablation-CAM at bn2
    t_ab, a = once(lambda: cs.attribute(model, x, "ablationcam", layer="bn2", target=target, batch_size=64))
    if args.quick:
        row("ablationcam bn2", t_ab, f"{a.forward_passes}", "(peer skipped: --quick)", None, "")
    else:
        with AblationCAM(model=module, target_layers=[model.layer("bn2")], batch_size=64) as peer:
            t_p, ref = once(lambda: peer(input_tensor=x, targets=[ClassifierOutputTarget(target)]))
        row("ablationcam bn2 (tail only)", t_ab, f"{a.forward_passes}", "pytorch-grad-cam AblationCAM batch=64", t_p,
            f"corr {corr(a.map, ref):.4f}; ablated {int(a.extras['ablated'][0])}/1280")


if __name__ == "__main__":
    main()
