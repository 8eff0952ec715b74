"""Train the demo models on synthetic phantoms and save them as MONAI bundles.

The node ships small demo networks so that ``medsegagent demo`` works with no
download: two residual U-Nets per task (instance norm + PReLU default; batch norm + PReLU +
dropout), each trained from its own initialisation
(CT abdomen organs, MR abdomen organs).  This script reproduces them::

    python -m medsegagent.models.train_demo --task all --out models/bundles

Training data are phantoms (:mod:`medsegagent.dicom.phantom`) in random
orientations and sizes, resampled to the same axis-aligned model grid the
backend uses at inference time (:func:`~medsegagent.models.resample.model_grid`),
so preprocessing is shared code, not a copy.  Validation Dice on held-out
seeds is written into each bundle's metadata.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsegagent.dicom.phantom import make_phantom
from medsegagent.models.backends import normalise_intensity
from medsegagent.models.resample import foreground_mask, model_grid, resample

log = logging.getLogger(__name__)

#: Demo label set (channel = label value); the phantom's tumour counts as liver.
DEMO_LABELS = {"liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4, "pancreas": 5, "aorta": 6}
#: Phantom label value -> demo label value.
PHANTOM_TO_DEMO = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 1}
#: Axis-aligned model grid, (x, y, z) voxels.
GRID_SIZE = (96, 80, 48)
INTENSITY = {"CT": {"kind": "ct_window", "window": [-200, 300]}, "MR": {"kind": "zscore"}}
ORIENTATIONS = ("axial", "axial", "coronal", "sagittal", "oblique")


@dataclass(frozen=True)
class Architecture:
    """A network definition in MONAI bundle config syntax."""

    key: str
    network_def: dict


ARCHITECTURES = (
    Architecture(
        "unet",
        {
            "_target_": "monai.networks.nets.UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": len(DEMO_LABELS) + 1,
            "channels": [8, 16, 32, 64],
            "strides": [2, 2, 2],
            "num_res_units": 1,
            "norm": "instance",
        },
    ),
    # The same topology with batch norm, PReLU and dropout: trained from its own
    # initialisation it makes different errors, which is what the ensemble needs.
    # (SegResNet, Attention and Basic U-Nets were tried: their full-resolution
    # blocks cost 5-6x more per step on a 2-core CPU, and a 4-filter SegResNet did
    # not converge in the step budget.)
    Architecture(
        "unet_bn",
        {
            "_target_": "monai.networks.nets.UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": len(DEMO_LABELS) + 1,
            "channels": [8, 16, 32, 64],
            "strides": [2, 2, 2],
            "num_res_units": 1,
            "act": "PRELU",
            "norm": "batch",
            "dropout": 0.1,
        },
    ),
)


def make_sample(modality: str, seed: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One training pair on the model grid: normalised image and demo labels."""
    orientation = str(rng.choice(ORIENTATIONS))
    size = int(rng.choice([64, 96, 128]))
    slices = int(rng.integers(24, 64))
    phantom = make_phantom(modality, seed=seed, slices=slices, size=size, orientation=orientation)
    image, geometry = phantom.images[modality]
    grid = model_grid(geometry, GRID_SIZE, foreground_mask(image))
    x = resample(image, geometry, grid, fill=float(image.min()))
    lut = np.zeros(256, np.uint8)
    for src, dst in PHANTOM_TO_DEMO.items():
        lut[src] = dst
    y = resample(lut[phantom.labels].astype(np.float32), geometry, grid, mode="nearest").astype(np.int64)
    return normalise_intensity(x, INTENSITY[modality]), y


def dice_per_label(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of every demo label between two label maps."""
    out = {}
    for name, value in DEMO_LABELS.items():
        a, b = pred == value, truth == value
        denom = a.sum() + b.sum()
        out[name] = float(2 * (a & b).sum() / denom) if denom else 1.0
    return out


def train_one(
    modality: str,
    arch: Architecture,
    train: list[tuple[np.ndarray, np.ndarray]],
    val: list[tuple[np.ndarray, np.ndarray]],
    iterations: int,
    seed: int,
    device: str = "cpu",
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train ``arch`` on ``train`` and return it (on the CPU) with its validation Dice."""
    from monai.bundle import ConfigParser
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    parser = ConfigParser({"network_def": arch.network_def})
    net = parser.get_parsed_content("network_def").to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=iterations, pct_start=0.1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(seed)
    net.train()
    started = time.perf_counter()
    for step in range(iterations):
        batch = [train[i] for i in rng.choice(len(train), size=2, replace=False)]
        # Intensity jitter only: flips would swap left and right organs.
        x = np.stack([b[0] * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05) for b in batch])[:, None]
        y = np.stack([b[1] for b in batch])[:, None]
        loss = loss_fn(net(torch.from_numpy(x.astype(np.float32)).to(device)), torch.from_numpy(y).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == iterations - 1:
            log.info(
                "%s %s step %d/%d loss %.4f (%.0f s)",
                modality,
                arch.key,
                step + 1,
                iterations,
                loss.item(),
                time.perf_counter() - started,
            )
    net.eval()
    scores: dict[str, list[float]] = {name: [] for name in DEMO_LABELS}
    with torch.inference_mode():
        for x, y in val:
            pred = net(torch.from_numpy(x)[None, None].to(device)).argmax(1)[0].cpu().numpy()
            for name, value in dice_per_label(pred, y).items():
                scores[name].append(value)
    return net.cpu(), {name: round(float(np.mean(v)), 4) for name, v in scores.items()}


def save_bundle(
    out_dir: Path,
    name: str,
    modality: str,
    arch: Architecture,
    net: torch.nn.Module,
    dice: dict[str, float],
    iterations: int,
    n_train: int,
) -> Path:
    """Write a MONAI bundle (configs/metadata.json, configs/inference.json, models/model.pt)."""
    import monai

    bundle = out_dir / name
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    (bundle / "docs").mkdir(parents=True, exist_ok=True)
    inference = {
        "network_def": arch.network_def,
        "medsegagent": {
            "labels": DEMO_LABELS,
            "size": list(GRID_SIZE),
            "grid": "axis-aligned LPS box covering the source (medsegagent.models.resample.model_grid)",
            "crop_foreground": True,
            "intensity": INTENSITY[modality],
        },
    }
    metadata = {
        "version": "0.1.0",
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "name": name,
        "task": f"Demo {modality} abdominal organ segmentation on synthetic phantoms",
        "description": "Trained by medsegagent.models.train_demo on synthetic phantoms; not for clinical use.",
        "authors": "MedSegAgent node developers",
        "copyright": "Apache-2.0",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": modality,
                    "num_channels": 1,
                    "spatial_shape": list(reversed(GRID_SIZE)),
                    "dtype": "float32",
                    "value_range": [0, 1] if modality == "CT" else [],
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(DEMO_LABELS) + 1,
                    "spatial_shape": list(reversed(GRID_SIZE)),
                    "dtype": "float32",
                    "channel_def": {"0": "background", **{str(v): k for k, v in DEMO_LABELS.items()}},
                }
            },
        },
        "validation_dice": dice,
        "training": {"iterations": iterations, "phantoms": n_train, "script": "medsegagent.models.train_demo"},
    }
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, bundle / "models" / "model.pt")
    (bundle / "docs" / "README.md").write_text(
        f"# {name}\n\nDemo {modality} abdominal organ model ({arch.key}), trained on synthetic phantoms by "
        f"`python -m medsegagent.models.train_demo`. Validation Dice on held-out phantoms:\n\n"
        + "".join(f"- {k}: {v:.3f}\n" for k, v in dice.items())
        + "\nNot for clinical use.\n"
    )
    return bundle


def main(argv: list[str] | None = None) -> int:
    """Command line: train and save the demo bundles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["ct", "mr", "all"], default="all")
    parser.add_argument("--arch", choices=[a.key for a in ARCHITECTURES] + ["all"], default="all")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "bundles")
    parser.add_argument("--phantoms", type=int, default=32, help="training phantoms per task")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    modalities = ["CT", "MR"] if args.task == "all" else [args.task.upper()]
    archs = [a for a in ARCHITECTURES if args.arch in ("all", a.key)]
    for modality in modalities:
        t0 = time.perf_counter()
        rng = np.random.default_rng(args.seed)
        # Seeds 10_000+ are training phantoms; the demo and tests use small seeds, never seen here.
        train = [make_sample(modality, 10_000 + i, rng) for i in range(args.phantoms)]
        val = [make_sample(modality, 20_000 + i, rng) for i in range(6)]
        log.info("%s: %d training phantoms in %.0f s", modality, len(train), time.perf_counter() - t0)
        for arch in archs:
            t0 = time.perf_counter()
            # Each architecture starts from its own initialisation (same-shaped convs would otherwise match).
            arch_seed = args.seed + [a.key for a in ARCHITECTURES].index(arch.key)
            net, dice = train_one(modality, arch, train, val, args.iterations, arch_seed, args.device)
            name = f"demo_{modality.lower()}_{arch.key}"
            path = save_bundle(args.out, name, modality, arch, net, dice, args.iterations, len(train))
            log.info("%s: saved %s in %.0f s, validation Dice %s", modality, path, time.perf_counter() - t0, dice)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
