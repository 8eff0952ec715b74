"""Ensemble benchmark: Dice per organ of each demo model and of the rank-aware ensemble.

On synthetic phantoms with exact truth (``medsegagent.dicom.phantom``), every
demo model of a modality runs once per phantom (through the in-process
executor, as the node runs them); then each scenario fuses their outputs the
way the pipeline does (``rank_key``, ``fusion_rules``, ``fuse_study`` with
the phantom image, ``resolve_overlaps``):

* ``clean`` -- the models as they are;
* ``failed M`` -- model M raised (no output; the ensemble lists it as dropped);
* ``emptied M`` -- M returned nothing;
* ``shifted S mm M`` -- M's maps moved S mm to the patient's left, for each
  S of ``--shifts-mm`` (default 3, 6, 10, 15; direction ``--shift-direction``):
  a plausible but wrong answer -- right shape, right size, wrong place;
* ``noisy M`` -- Gaussian noise (sigma 0.35, ``--noise``) added to M's probabilities.

A single model's Dice is its own output (threshold 0.5, overlaps by higher
probability), with no plausibility rules; the ensemble applies them.  The
criteria, per organ on the mean over phantoms:

* ``clean``: the ensemble is not worse than the best single member by more
  than 1 Dice point;
* a broken member: the ensemble *recovers* -- it is not worse than the best
  intact member by more than 1 Dice point.  The gap to the best of all
  members, the broken one included, is printed too ("strict"): a shifted
  model can still beat the other on an organ it segments much better.

A shift below 1.5 voxels of the finest axis (3 mm on the default 3.1 mm
phantoms) is reported but not judged: two members one voxel apart look like
two sound members to every image-based rule, and with two members nothing can
outvote it.

The script prints which criterion failed, per scenario and organ, and exits 1
if any did.

    python bench/bench_ensemble.py                       # CT and MR, 4 phantoms each
    python bench/bench_ensemble.py --modality CT --phantoms 2 --size 96 --slices 48

Writes ``bench/results/ensemble.md`` (``--out``) and prints the same tables.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from medsegagent.dicom.phantom import make_phantom
from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.backends import ModelSpec, Prediction
from medsegagent.models.ensemble import (
    MIN_MISPLACEMENT,
    MIN_STUDY_MISPLACEMENT,
    Member,
    StudyTarget,
    TargetResult,
    fuse_study,
    placement_evidence,
    resolve_overlaps,
)
from medsegagent.models.executor import InProcessExecutor, ModelCache, ModelTask
from medsegagent.models.registry import Dataset, ModelRef, load_registry
from medsegagent.models.resample import BoxedMap
from medsegagent.node.pipeline import MIN_STUDY_AGREEMENT, fusion_rules, rank_key

ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "aorta")
#: Phantom structures that make up each demo organ (the tumour lies in the liver).
PARTS = {"liver": ("liver", "liver_tumour")}
ORIENTATIONS = ("axial", "oblique", "sagittal", "coronal")
SHIFTS_MM = (3.0, 6.0, 10.0, 15.0)
SHIFT_DIRECTION = (1.0, 0.0, 0.0)  # towards the patient's left (LPS +x)
NOISE_SIGMA = 0.35
TOLERANCE = 0.01  # one Dice point
#: A shift below this many voxels (of the finest axis) is reported, not judged: two members one voxel
#: apart score like two sound members on the image, so no rule can tell which is right without a third.
JUDGED_SHIFT_VOXELS = 1.5
SEGMENTED = 0.5  # a model "segments" an organ from this Dice on


#: ``(scenario, broken model, mode, shift mm)``; mode and model are ``None`` in the clean run.
Scenario = tuple[str, str | None, str | None, float]


@dataclass
class Case:
    """One phantom: its truth per organ and each model's output on the source grid."""

    seed: int
    orientation: str
    geometry: Geometry
    image: np.ndarray
    truth: dict[str, np.ndarray]
    maps: dict[str, dict[str, BoxedMap]]  # model -> organ -> probability
    predictions: dict[str, Prediction]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (1.0 when both are empty)."""
    total = int(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 1.0


def break_map(
    boxed: BoxedMap,
    mode: str,
    geometry: Geometry,
    rng: np.random.Generator,
    shift_mm: tuple[float, float, float] = (15.0, 0.0, 0.0),
    sigma: float = NOISE_SIGMA,
) -> BoxedMap:
    """A deliberately broken copy of one model's map."""
    if mode == "emptied":
        return BoxedMap.empty(boxed.shape)
    if mode == "shifted":
        # The patient-space shift in (slice, row, column) index units of this grid.
        offset = (np.linalg.inv(geometry.affine[:3, :3]) @ np.asarray(shift_mm, float))[::-1]
        return BoxedMap.from_dense(ndimage.shift(boxed.dense(np.float32), offset, order=1), threshold=1e-3)
    if mode == "noisy":
        noisy = boxed.dense(np.float32) + rng.normal(0.0, sigma, boxed.shape).astype(np.float32)
        return BoxedMap.from_dense(np.clip(noisy, 0.0, 1.0))
    raise ValueError(mode)


def run_case(modality: str, seed: int, orientation: str, size: int, slices: int, executor, jobs) -> Case:
    """Make a phantom and run every model on it once."""
    phantom = make_phantom(modality, seed=seed, slices=slices, size=size, orientation=orientation)
    image, geometry = phantom.images[modality]
    volume = Volume(image, geometry, modality, f"2.25.{seed}")
    by_name = {name: value for value, name in phantom.label_names.items()}
    truth = {organ: np.isin(phantom.labels, [by_name[p] for p in PARTS.get(organ, (organ,))]) for organ in ORGANS}
    results = executor.run(jobs, volume)
    failed = {name: r.error for name, r in results.items() if not r.ok}
    if failed:
        raise RuntimeError(f"models failed on the clean run: {failed}")
    predictions = {name: r.prediction for name, r in results.items()}
    maps = {name: {organ: p.boxed(organ) for organ in ORGANS} for name, p in predictions.items()}
    return Case(seed, orientation, geometry, image, truth, maps, predictions)


def single_dice(case: Case, maps: dict[str, BoxedMap]) -> dict[str, float]:
    """Dice per organ of one model's own output (no plausibility rules)."""
    labels = resolve_overlaps([TargetResult(organ, maps[organ]) for organ in ORGANS])
    return {organ: dice(labels == i, case.truth[organ]) for i, organ in enumerate(ORGANS, start=1)}


def ensemble_dice(
    case: Case, dataset: Dataset, refs: dict[str, ModelRef], maps: dict[str, dict[str, BoxedMap] | None]
) -> tuple[dict[str, float], dict[str, dict], float]:
    """Dice per organ of the fusion, its decisions and its seconds; ``maps[model] is None`` for a failed model."""
    targets = []
    for organ in ORGANS:
        label = dataset.labels[organ]
        members = [
            Member(name, model_maps[organ], rank_key(dataset, label, refs[name], case.predictions[name]))
            for name, model_maps in maps.items()
            if model_maps is not None
        ]
        targets.append(StudyTarget(organ, members, fusion_rules(label)))
    t0 = time.perf_counter()
    results = fuse_study(
        targets,
        voxel_ml=case.geometry.voxel_volume_ml,
        shape=case.geometry.shape,
        image=case.image,
        min_study_agreement=MIN_STUDY_AGREEMENT,
    )
    labels = resolve_overlaps(results)
    seconds = time.perf_counter() - t0
    decisions = {}
    for organ, result in zip(ORGANS, results, strict=True):
        result.dropped.update({name: "model failed" for name, m in maps.items() if m is None})
        decisions[organ] = {"weights": result.weights, "dropped": result.dropped}
    fused = {organ: dice(labels == i, case.truth[organ]) for i, organ in enumerate(ORGANS, start=1)}
    return fused, decisions, seconds


def verdict(holds: bool, judged: bool) -> str:
    """Table cell of a criterion."""
    if not judged:
        return "not judged" + ("" if holds else " (no)")
    return "yes" if holds else "**no**"


def scenarios_of(names: list[str], shifts: list[float]) -> list[Scenario]:
    """``(scenario, broken model, mode, shift mm)``: clean, then every way of breaking every member."""
    out: list[Scenario] = [("clean", None, None, 0.0)]
    for name in names:
        out += [(f"failed {name}", name, "failed", 0.0), (f"emptied {name}", name, "emptied", 0.0)]
        out += [(f"shifted {mm:g} mm {name}", name, "shifted", mm) for mm in shifts]
        out.append((f"noisy {name}", name, "noisy", 0.0))
    return out


@dataclass
class Tally:
    """What one modality's runs collected, over phantoms and scenarios."""

    #: scenario -> model (or ``ensemble``) -> organ -> Dice per phantom.
    scores: dict[str, dict[str, dict[str, list[float]]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    )
    #: organ -> the models that got the highest weight in a clean run.
    top: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    #: scenario -> ``organ: model (reason)`` per member the ensemble dropped.
    drops: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    #: Mean Dice of each pair of clean models per phantom.
    agreement: list[float] = field(default_factory=list)
    #: |placement evidence| between the clean models, per target.
    sound_target: list[float] = field(default_factory=list)
    #: The same summed over a study, as the study rule sums it.
    sound_study: list[float] = field(default_factory=list)
    #: Seconds of each fusion.
    fusion_s: list[float] = field(default_factory=list)
    #: Finest voxel spacing (mm) of the phantoms.
    voxel_mm: float = float("inf")


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def bench_modality(modality: str, args: argparse.Namespace, out: list[str]) -> bool:
    """Run one modality; append its tables to ``out``; return whether every criterion held."""
    registry = load_registry(args.registry)
    dataset = registry.datasets[f"Demo_{modality}_Abdomen"]
    refs = {ref.name: ref for ref in dataset.models}
    missing = [name for name, ref in refs.items() if not ref.installed]
    if missing:
        out.append(f"## {modality}\n\nskipped: demo bundles not installed: {', '.join(missing)}\n")
        print(f"{modality}: demo bundles missing ({', '.join(missing)}); train them first", file=sys.stderr)
        return False
    names = sorted(refs)
    jobs = [ModelTask(ModelSpec.from_registry(ref, dataset), ORGANS) for ref in refs.values()]
    executor = InProcessExecutor(ModelCache(), workers=2)
    rng = np.random.default_rng(0)
    direction = np.asarray(args.shift_direction, float)
    direction /= np.linalg.norm(direction)
    scenarios = scenarios_of(names, args.shifts_mm)
    tally = Tally()
    t_start = time.perf_counter()
    for i in range(args.phantoms):
        seed, orientation = args.seed + i, ORIENTATIONS[i % len(ORIENTATIONS)]
        t0 = time.perf_counter()
        case = run_case(modality, seed, orientation, args.size, args.slices, executor, jobs)
        tally.voxel_mm = min(tally.voxel_mm, float(min(case.geometry.spacing)))
        _tally_sound_models(case, names, tally)
        for scenario in scenarios:
            maps = _scenario_maps(case, names, scenario, direction, rng, args.noise)
            _tally_scenario(case, dataset, refs, scenario[0], maps, tally)
        print(f"  {modality} phantom seed {seed} ({orientation}): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    lines = [f"## {modality} ({args.phantoms} phantoms, {args.size}x{args.size}x{args.slices})", ""]
    lines += _clean_report(names, tally)
    table, failures = _scenario_report(modality, names, scenarios, tally)
    lines += table
    lines += _drops_report(scenarios, tally)
    lines += [
        "",
        f"Fusion (`fuse_study` + `resolve_overlaps`) per study: mean {_mean(tally.fusion_s):.3f} s,"
        f" max {max(tally.fusion_s):.3f} s over {len(tally.fusion_s)} fusions.",
        "",
    ]
    lines += ["Criteria that failed:" if failures else "Criteria that failed: none.", ""]
    lines += [f"* {f}" for f in failures]
    lines += ["", f"{modality}: {time.perf_counter() - t_start:.0f} s", ""]
    out.extend(lines)
    print("\n".join(lines))
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return not failures


def _tally_sound_models(case: Case, names: list[str], tally: Tally) -> None:
    """How much the sound models agree per study, and how much placement evidence they raise against each other.

    The study rule's gate must sit below the first, the placement thresholds above the rest.
    """
    for a, b in [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]:
        shared = [o for o in ORGANS if case.maps[a][o].count() and case.maps[b][o].count()]
        pairs = [dice(case.maps[a][o].dense() > 0.5, case.maps[b][o].dense() > 0.5) for o in shared]
        tally.agreement.append(float(np.mean(pairs)) if pairs else float("nan"))
        found = [placement_evidence(case.maps[a][o], case.maps[b][o], case.image) for o in shared]
        evidence = [0.0 if p is None else p.against_a for p in found]
        tally.sound_target.extend(abs(e) for e in evidence)
        if evidence:
            tally.sound_study.append(abs(sum(evidence)) / np.sqrt(len(evidence)))


def _scenario_maps(
    case: Case,
    names: list[str],
    scenario: Scenario,
    direction: np.ndarray,
    rng: np.random.Generator,
    noise: float,
) -> dict[str, dict[str, BoxedMap] | None]:
    """Each model's maps in ``scenario``: the broken model's broken (``None``: it failed), the others' as they are."""
    _, broken, mode, mm = scenario
    maps: dict[str, dict[str, BoxedMap] | None] = {}
    for name in names:
        if name != broken:
            maps[name] = case.maps[name]
        elif mode == "failed":
            maps[name] = None
        else:
            shift = tuple(mm * direction)
            maps[name] = {
                o: break_map(m, mode, case.geometry, rng, shift, noise)  # type: ignore[arg-type]
                for o, m in case.maps[name].items()
            }
    return maps


def _tally_scenario(
    case: Case,
    dataset: Dataset,
    refs: dict[str, ModelRef],
    scenario: str,
    maps: dict[str, dict[str, BoxedMap] | None],
    tally: Tally,
) -> None:
    """Score each model alone and the ensemble on one phantom in one scenario; note what the ensemble dropped."""
    scores = tally.scores[scenario]
    for name, model_maps in maps.items():
        single = single_dice(case, model_maps) if model_maps is not None else dict.fromkeys(ORGANS, 0.0)
        for organ, value in single.items():
            scores[name][organ].append(value)
    fused, decisions, seconds = ensemble_dice(case, dataset, refs, maps)
    tally.fusion_s.append(seconds)
    for organ, value in fused.items():
        scores["ensemble"][organ].append(value)
        if scenario == "clean":
            weights = decisions[organ]["weights"]
            tally.top[organ].add(max(weights, key=weights.get) if weights else "-")
        for name, why in decisions[organ]["dropped"].items():
            tally.drops[scenario].append(f"{organ}: {name} ({why.split(' (')[0]})")


def _clean_report(names: list[str], tally: Tally) -> list[str]:
    """The clean run's table, the sound models' agreement and placement evidence, and who ranked first."""
    lines = ["Clean run, mean Dice over phantoms:", ""]
    header = "| organ | " + " | ".join(names) + " | ensemble | ensemble - best single | rank 1 |"
    lines += [header, "|" + "---|" * (len(names) + 4)]
    clean, top = tally.scores["clean"], tally.top
    for organ in ORGANS:
        singles = [_mean(clean[n][organ]) for n in names]
        ens = _mean(clean["ensemble"][organ])
        lines.append(
            f"| {organ} | "
            + " | ".join(f"{v:.3f}" for v in singles)
            + f" | **{ens:.3f}** | {ens - max(singles):+.3f} | {', '.join(sorted(top[organ]))} |"
        )
    ranks_first = {n: [o for o in ORGANS if top[o] == {n}] for n in names}
    return [
        *lines,
        "",
        "Agreement of the clean models per phantom (mean Dice over organs both segment): "
        + ", ".join(f"{v:.2f}" for v in tally.agreement)
        + f" (study rule gate: {MIN_STUDY_AGREEMENT}).",
        "",
        f"Placement evidence between the clean models: largest |e| per target {max(tally.sound_target, default=0):.2f}"
        f" (drop threshold {MIN_MISPLACEMENT}), largest |S| per study {max(tally.sound_study, default=0):.2f}"
        f" (drop threshold {MIN_STUDY_MISPLACEMENT}).",
        "",
        "Top-ranked (weight 2/3 of two) in the clean run: "
        + "; ".join(f"{n} for {len(o)} organs" for n, o in ranks_first.items())
        + ".",
    ]


def _scenario_report(
    modality: str, names: list[str], scenarios: list[Scenario], tally: Tally
) -> tuple[list[str], list[str]]:
    """The scenarios' table with a verdict per criterion, its notes, and the criteria that failed."""
    clean = tally.scores["clean"]
    segmented = [o for o in ORGANS if max(_mean(clean[n][o]) for n in names) >= SEGMENTED]
    lines = [
        "",
        "Scenarios (mean Dice over organs and phantoms; criteria per organ on phantom means; `recovers`: ensemble"
        f" >= best intact member - {TOLERANCE}, for `clean` the best member):",
        "",
        "| scenario | "
        + " | ".join(names)
        + " | ensemble | worst organ: ensemble - best intact | recovers | holds where a model segments the organ"
        + " | strict: ensemble - best of all members |",
        "|" + "---|" * (len(names) + 6),
    ]
    failures: list[str] = []
    unjudged: list[str] = []
    for scenario in scenarios:
        row, failed, judged = _scenario_row(modality, names, scenario, tally, segmented)
        lines.append(row)
        failures += failed
        if not judged:
            unjudged.append(scenario[0])
    if unjudged:
        voxel_mm = tally.voxel_mm
        lines += [
            "",
            f"Not judged (reported only): {', '.join(unjudged)} -- a shift below {JUDGED_SHIFT_VOXELS:g} voxels"
            f" ({JUDGED_SHIFT_VOXELS * voxel_mm:.1f} mm; finest voxel spacing {voxel_mm:.1f} mm). Two members one"
            " voxel apart score like two sound members on the image; only a third member could outvote it.",
        ]
    unsegmented = [o for o in ORGANS if o not in segmented]
    if unsegmented:
        lines += [
            "",
            f"No single model reaches Dice {SEGMENTED} on: {', '.join(unsegmented)} (clean run); the"
            " 'holds where a model segments the organ' column leaves those out.",
        ]
    return lines, failures


def _scenario_row(
    modality: str, names: list[str], scenario: Scenario, tally: Tally, segmented: list[str]
) -> tuple[str, list[str], bool]:
    """One scenario's table row, the criteria it failed, and whether it is judged at all."""
    name, broken, mode, mm = scenario
    table = tally.scores[name]
    judged = not (mode == "shifted" and mm < JUDGED_SHIFT_VOXELS * tally.voxel_mm)
    intact = [n for n in names if n != broken]
    gaps, strict = {}, {}
    for organ in ORGANS:
        ens = _mean(table["ensemble"][organ])
        gaps[organ] = ens - max(_mean(table[n][organ]) for n in intact)
        strict[organ] = ens - max(_mean(table[n][organ]) for n in names)
    worst = min(gaps, key=gaps.get)
    worst_strict = min(strict, key=strict.get)
    holds = gaps[worst] >= -TOLERANCE
    holds_segmented = all(gaps[o] >= -TOLERANCE for o in segmented)
    criterion = "ensemble >= best single member" if broken is None else "recovers the best intact member"
    failures = [
        f"{modality} {name}: {organ} {gap:+.3f} (criterion: {criterion} - {TOLERANCE}"
        + ("" if organ in segmented else f"; no model reaches Dice {SEGMENTED} on it")
        + ")"
        for organ, gap in gaps.items()
        if gap < -TOLERANCE and judged
    ]
    means = [_mean([v for o in ORGANS for v in table[n][o]]) for n in [*names, "ensemble"]]
    row = (
        f"| {name} | "
        + " | ".join(f"{v:.3f}" for v in means[:-1])
        + f" | **{means[-1]:.3f}** | {gaps[worst]:+.3f} ({worst}) | {verdict(holds, judged)}"
        + f" | {verdict(holds_segmented, judged)} | {strict[worst_strict]:+.3f} ({worst_strict}) |"
    )
    return row, failures, judged


def _drops_report(scenarios: list[Scenario], tally: Tally) -> list[str]:
    """Members the ensemble dropped per scenario, counted over phantoms."""
    lines = ["", "Members the ensemble dropped (organ: model (reason), over phantoms):", ""]
    for scenario, _, _, _ in scenarios:
        if tally.drops[scenario]:
            counted: dict[str, int] = defaultdict(int)
            for item in tally.drops[scenario]:
                counted[item] += 1
            summary = "; ".join(f"{k} x{v}" for k, v in sorted(counted.items()))
            lines.append(f"* {scenario}: {summary}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=["CT", "MR", "all"], default="all")
    parser.add_argument("--phantoms", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--seed", type=int, default=401, help="first phantom seed (training used 10000+)")
    parser.add_argument("--shifts-mm", type=float, nargs="+", default=list(SHIFTS_MM), help="sizes of the shifts")
    parser.add_argument(
        "--shift-direction", type=float, nargs=3, default=SHIFT_DIRECTION, help="LPS direction of the shifts"
    )
    parser.add_argument("--noise", type=float, default=NOISE_SIGMA, help="sigma of a 'noisy' member")
    parser.add_argument("--registry", type=Path, default=None, help="registry file (default: the packaged one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ensemble.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = [
        "# Ensemble benchmark",
        "",
        "`" + " ".join(["python bench/bench_ensemble.py", *(argv if argv is not None else sys.argv[1:])]) + "`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"python {platform.python_version()}. Broken members: shifts {', '.join(f'{v:g}' for v in args.shifts_mm)}"
        f" mm along LPS {tuple(args.shift_direction)}, noise sigma {args.noise}. Criteria: clean, ensemble >= best"
        f" single member - {TOLERANCE} per organ; a broken member, ensemble >= best intact member - {TOLERANCE}.",
        "",
    ]
    modalities = ["CT", "MR"] if args.modality == "all" else [args.modality]
    ok = all([bench_modality(m, args, out) for m in modalities])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
