"""``medsegagent phantom``: write a synthetic phantom study as DICOM.

Example::

    medsegagent phantom --modality CT --out /tmp/ph
    medsegagent phantom --modality PT+CT --out /tmp/pet --orientation coronal --multiframe
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .phantom import MODALITIES, ORIENTATIONS

#: Grid limits: below 8 pixels nothing is recognisable, above 1024 x 1024 x
#: 1000 a phantom needs tens of GB.
_MAX_SIZE, _MAX_SLICES = 1024, 1000
#: Names this command writes into OUT/dicom (a re-run replaces them).
_OWN_FILE = re.compile(r"(CT|MR|PT)_\d{4}\.dcm")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``phantom`` sub-command to ``subparsers``.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        From ``ArgumentParser.add_subparsers``.

    Returns
    -------
    argparse.ArgumentParser
        The sub-command's parser (its ``func`` is :func:`run`).
    """
    parser = subparsers.add_parser(
        "phantom",
        help="write a synthetic abdominal phantom study (DICOM + NIfTI truth)",
        description="Write a synthetic abdominal phantom patient as a DICOM study in OUT/dicom, with the exact "
        "ground truth in OUT/truth.nii.gz and OUT/labels.json.",
    )
    parser.add_argument("--modality", required=True, choices=MODALITIES, help="CT, MR (T1 VIBE) or PT+CT")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="patient seed (default 0)")
    parser.add_argument("--slices", type=int, default=64, help="number of slices (default 64)")
    parser.add_argument("--size", type=int, default=128, help="pixels per row and column (default 128)")
    parser.add_argument("--orientation", choices=ORIENTATIONS, default="axial", help="slice orientation")
    parser.add_argument(
        "--reverse-order", action="store_true", help="number instances against spatial order (reader test)"
    )
    parser.add_argument(
        "--multiframe",
        action="store_true",
        help="one multi-frame object per series (Enhanced CT; legacy converted MR/PET)",
    )
    parser.set_defaults(func=run)
    return parser


def _check(args: argparse.Namespace) -> str | None:
    """Return an error message for impossible arguments, else ``None``."""
    if args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    if not 8 <= args.size <= _MAX_SIZE:
        return f"--size must be between 8 and {_MAX_SIZE}, got {args.size}"
    if not 1 <= args.slices <= _MAX_SLICES:
        return f"--slices must be between 1 and {_MAX_SLICES}, got {args.slices}"
    out: Path = args.out
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    dicom_dir = out / "dicom"
    if dicom_dir.is_dir():
        foreign = [p.name for p in dicom_dir.iterdir() if not _OWN_FILE.fullmatch(p.name)]
        if foreign:
            return f"{dicom_dir} holds files not written by this command ({foreign[0]}, ...); choose another --out"
    return None


def _clear_previous(out: Path) -> None:
    """Remove a previous run's DICOM files so series of different runs never mix."""
    dicom_dir = out / "dicom"
    if dicom_dir.is_dir():
        for p in dicom_dir.iterdir():
            if _OWN_FILE.fullmatch(p.name):
                p.unlink()


def run(args: argparse.Namespace) -> int:
    """Make the phantom and write it; print one line per output.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed ``phantom`` arguments.

    Returns
    -------
    int
        0 on success, 2 for invalid arguments.
    """
    from .image_writer import MULTIFRAME_IODS, write_phantom
    from .phantom import make_phantom

    error = _check(args)
    if error:
        print(f"medsegagent phantom: error: {error}", file=sys.stderr)
        return 2
    _clear_previous(args.out)
    phantom = make_phantom(
        args.modality, seed=args.seed, slices=args.slices, size=args.size, orientation=args.orientation
    )
    files = write_phantom(phantom, args.out, reverse_order=args.reverse_order, multiframe=args.multiframe)
    for modality, paths in files.series.items():
        kind = MULTIFRAME_IODS[modality].split(" (")[0] if args.multiframe else f"{modality} single-frame"
        span = paths[0].name if len(paths) == 1 else f"{paths[0].name} .. {paths[-1].name}"
        print(f"{modality}: {len(paths)} file(s) {files.dicom_dir}/{span} ({kind}, {phantom.geometry.shape[0]} slices)")
    print(f"truth: {files.truth}")
    print(f"labels: {files.labels_json}")
    return 0
