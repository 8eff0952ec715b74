"""Sub-commands of the node: ``segment`` and ``demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medsegagent.dicom.seg import SegType

#: Exit status for a study the pipeline refused (bad input, nothing to do).
EXIT_REFUSED = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segment`` and ``demo`` to the CLI."""
    seg = subparsers.add_parser(
        "segment",
        help="segment a DICOM folder offline and write a DICOM-SEG",
        description="Read the image series in DICOM_DIR, route TEXT to models, run them, fuse and write a SEG.",
    )
    seg.add_argument("dicom_dir", type=Path, metavar="DICOM_DIR")
    seg.add_argument("text", metavar="TEXT", help='the request, e.g. "liver and both kidneys"')
    seg.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR")
    seg.add_argument("--collection", help="route within one registry collection (e.g. demo)")
    seg.add_argument("--seg-type", choices=[t.value for t in SegType], default=SegType.BINARY.value)
    seg.add_argument("--registry", type=Path, help="registry.yaml to use instead of the installed one")
    seg.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    seg.add_argument("--sr", action="store_true", help="also write a TID 1500 volume report (sr.dcm)")
    seg.add_argument("--preview-sc", action="store_true", help="also write the preview as a Secondary Capture")
    seg.set_defaults(func=run_segment)

    demo = subparsers.add_parser(
        "demo",
        help="run the embedded default end to end: phantom study -> node over DICOM -> SEG",
        description="Make a synthetic CT study, send it to the node over DICOM, segment it with the demo models.",
    )
    demo.add_argument(
        "--out", type=Path, default=Path("medsegagent-demo"), help="work folder (default ./medsegagent-demo)"
    )
    demo.add_argument("--request", default=None, help="instruction text (default: the demo organs)")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--modality", choices=["CT", "MR"], default="CT", help="modality of the phantom study")
    demo.add_argument(
        "--real",
        action="store_true",
        help="real-scan mode: Colin27, a real T1 MRI (Debian mricron-data), skull-stripped by HD-BET and deepbet",
    )
    demo.set_defaults(func=run_demo_command)

    serve = subparsers.add_parser(
        "serve",
        help="run the node: DICOM listener, job processing, delivery, HTTP API",
        description="Run the node with a YAML configuration (see docs/node.md).",
    )
    serve.add_argument("--config", type=Path, required=True, metavar="FILE")
    serve.set_defaults(func=run_serve)


def run_segment(args: argparse.Namespace) -> int:
    """``medsegagent segment``."""
    from medsegagent.models.registry import RegistryError, load_registry
    from medsegagent.node.pipeline import OutputOptions, PipelineError, RunContext, segment_folder

    try:
        registry = load_registry(args.registry)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    outputs = OutputOptions(seg_type=SegType(args.seg_type), volume_report=args.sr, preview_sc=args.preview_sc)
    context = RunContext.in_process(
        registry,
        device=args.device,
        outputs=outputs,
        progress=lambda message: print(f"  {message}", file=sys.stderr, flush=True),
    )
    try:
        result = segment_folder(args.dicom_dir, args.text, args.out, context, collection=args.collection)
    except PipelineError as exc:
        print(f"error ({exc.reason.value}): {exc}", file=sys.stderr)
        return EXIT_REFUSED
    for seg in result.report["segments"]:
        print(
            f"{seg['number']:>3}  {seg['label']:<28} {seg['volume_ml']:10.1f} mL{'  (empty)' if seg['empty'] else ''}"
        )
    print(f"SEG: {result.seg_path}\nreport: {result.report_path}\npreview: {result.preview_path}")
    extra = [name for name in result.report.get("outputs", []) if name not in ("seg.dcm", "preview.png")]
    if extra:
        print("also: " + ", ".join(str(args.out / name) for name in extra))
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    """``medsegagent demo``."""
    from medsegagent.dicom.realdata import RealDataError
    from medsegagent.node.demo import DEFAULT_REQUEST, REAL_REQUEST, run_demo, run_real_demo, summary
    from medsegagent.node.dispatch import DeliveryError
    from medsegagent.node.pipeline import PipelineError

    study = "real MRI (Colin27)" if args.real else "phantom study"
    print(f"MedSegAgent demo: {study} -> node (DICOM) -> plan -> models -> ensemble -> DICOM-SEG", file=sys.stderr)
    try:
        if args.real:
            outcome = run_real_demo(args.out, request=args.request or REAL_REQUEST)
        else:
            request = args.request or DEFAULT_REQUEST
            outcome = run_demo(args.out, request=request, seed=args.seed, modality=args.modality)
    except (PipelineError, RealDataError, DeliveryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(summary(outcome))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """``medsegagent serve``: run until SIGINT/SIGTERM."""
    import logging
    import signal
    import threading

    from medsegagent.node.api import TokenMissingError
    from medsegagent.node.config import ConfigError, load_config
    from medsegagent.node.scu import quiet_pynetdicom
    from medsegagent.node.service import Node

    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    quiet_pynetdicom(verbose=logging.getLogger().level <= logging.DEBUG)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    node = Node(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        node.start()
    except (TokenMissingError, OSError, RuntimeError) as exc:  # token, port taken, data dir in use, intake pool
        print(f"error: {exc}", file=sys.stderr)
        node.stop()
        return EXIT_REFUSED
    print(
        f"medsegagent node {config.node.ae_title} listening on {config.node.host}:{node.scp.port}"
        + (f", HTTP API on http://{config.http.host}:{node.http_port}" if node.http_port else ""),
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    node.stop()
    return 0
