"""GPU check: the demo models on CUDA (float16 autocast, optionally sliding window) against the CPU.

For a person with a GPU: runs each installed demo bundle of a modality on a
phantom in-process on the CPU and on CUDA -- the whole grid, and with the
sliding window forced (``options.roi_size`` / ``overlap``, as a registry
reference would set it) -- and prints, per model and path, the Dice of the
CUDA masks against the CPU masks of the same path (the worst label), the
largest probability difference, and the warm inference seconds on each
device.  CUDA runs under float16 autocast, so masks should agree to Dice
>= 0.99, not bit for bit.  The sliding-window rows compare patches with
patches: the demo networks normalise over their whole grid (instance norm),
so patches change their answer on any device.

    python bench/gpu_check.py                    # CT demo models, 64 x 192 x 192 phantom
    python bench/gpu_check.py --modality MR --size 256 --slices 96

Exits 0 with a message when no CUDA device is present; 1 when a comparison
falls below ``--min-dice``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from medsegagent.dicom.phantom import make_phantom
from medsegagent.dicom.volume import Volume
from medsegagent.models.backends import ModelSpec, Prediction, load_model
from medsegagent.models.registry import load_registry


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (1.0 when both are empty)."""
    total = int(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 1.0


def timed_predict(spec: ModelSpec, device: str, volume: Volume, repeats: int) -> tuple[Prediction, float]:
    """Load once, predict once to warm up, then the best of ``repeats`` warm predictions (seconds)."""
    model = load_model(spec, device)
    prediction = model.predict(volume)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        prediction = model.predict(volume)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return prediction, best


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=["CT", "MR"], default="CT")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--seed", type=int, default=901)
    parser.add_argument("--roi", type=int, nargs=3, default=(48, 48, 32), help="(x, y, z) sliding-window patch")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--min-dice", type=float, default=0.99)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}); nothing to check on this machine")
        return 0
    print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    registry = load_registry(None)
    dataset = registry.datasets[f"Demo_{args.modality}_Abdomen"]
    refs = [ref for ref in dataset.models if ref.installed]
    if not refs:
        print(f"no installed demo bundle for {args.modality}; train them first")
        return 0
    phantom = make_phantom(args.modality, seed=args.seed, slices=args.slices, size=args.size)
    image, geometry = phantom.images[args.modality]
    volume = Volume(image, geometry, args.modality, f"2.25.{args.seed}")
    rows = []
    ok = True
    for ref in refs:
        spec = ModelSpec.from_registry(ref, dataset)
        windowed = replace(spec, options={**spec.options, "roi_size": list(args.roi), "overlap": args.overlap})
        for path, variant in (("whole grid", spec), (f"sliding window {tuple(args.roi)}", windowed)):
            cpu, cpu_s = timed_predict(variant, "cpu", volume, args.repeats)
            cuda, cuda_s = timed_predict(variant, "cuda", volume, args.repeats)
            worst, worst_label, max_diff = 1.0, "-", 0.0
            for label, probability in cpu.maps.items():
                value = dice(cuda.maps[label] > 0.5, probability > 0.5)
                max_diff = max(max_diff, float(np.abs(cuda.maps[label] - probability).max()))
                if value < worst:
                    worst, worst_label = value, label
            ok &= worst >= args.min_dice
            rows.append((ref.name, path, worst, worst_label, max_diff, cpu_s, cuda_s))
    print()
    print("| model | path | worst Dice CUDA vs CPU (label) | max abs prob diff | CPU s | CUDA s (fp16) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, path, worst, label, max_diff, cpu_s, cuda_s in rows:
        print(
            f"| {name} | {path} | {worst:.4f} ({label}) | {max_diff:.3g} | {cpu_s:.2f} | {cuda_s:.3f} |"
            f" {cpu_s / cuda_s:.1f}x |"
        )
    print()
    print(f"phantom {args.modality} {args.size}x{args.size}x{args.slices}; criterion: Dice >= {args.min_dice}")
    print("OK" if ok else "FAILED: CUDA masks differ from the CPU's")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
