"""The ten MONAI Model Zoo bundles, run as published through the node.

Each test builds a bundle folder from the published files in
``shared/fixtures/monai-model-zoo`` (configs, metadata, scripts; never copied
into the project) and gives it weights of the bundle's own architecture:
``network_def`` instantiated by MONAI's ConfigParser, every parameter zeroed
and the bias of the output layer set so that one known channel wins
everywhere.  The right answer is then known: that channel's registry label
covers the whole input and every other label is empty.  What runs is the
real thing: the registry entry of ``registry.d/monai-zoo.yaml``, the bundle's
own preprocessing, inferer (a hook on the network sees its patches) and
postprocessing, on a crop of a phantom small enough for one inferer window.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml

from medsegagent.dicom.image_writer import deterministic_uid, phantom_study_info, write_series
from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.backends import ChannelError, ModelLoadError, ModelSpec, StudyImages, load_model
from medsegagent.models.monai_bundle import (
    ContrastPhase,
    OutputKind,
    PublishedBundleModel,
    _components,
    _rename_code,
    bundle_config_file,
    contrast_phase,
    numpy_safe_globals,
)
from medsegagent.models.registry import load_registry
from medsegagent.models.resample import sub_geometry
from tests.conftest import dice

ZOO = Path(
    os.environ.get("MEDSEG_ZOO_FIXTURES")
    or Path(__file__).resolve().parents[1].parent / "shared/fixtures/monai-model-zoo"
)


def _fixture(name: str) -> Path:
    folder = ZOO / name
    if not (folder / "configs" / "metadata.json").is_file():
        pytest.fail(f"MONAI Model Zoo fixture {folder} is missing (set MEDSEG_ZOO_FIXTURES)")
    return folder


# --------------------------------------------------------------------------- studies


def _crop(volume: Volume, centre_lps: tuple[float, float, float], extent_mm: float, **meta: str) -> Volume:
    """The part of ``volume`` within ``extent_mm / 2`` of ``centre_lps`` along each grid axis."""
    geometry = volume.geometry
    centre = geometry.lps_to_index(np.asarray(centre_lps))[::-1]  # (slice, row, column)
    half = [extent_mm / 2 / s for s in geometry.spacing]
    box = tuple(
        slice(max(0, round(c - h)), min(n, round(c + h) + 1))
        for c, h, n in zip(centre, half, geometry.shape, strict=True)
    )
    return Volume(
        volume.array[box].copy(),
        sub_geometry(geometry, box),
        volume.modality,
        deterministic_uid(volume.series_instance_uid, *map(str, meta.values())),
        meta={**volume.meta, **meta},
    )


def _phantom_volume(phantom_factory, modality: str) -> Volume:
    phantom, _ = phantom_factory(modality)
    image, geometry = phantom.images[modality]
    return Volume(image, geometry, modality, deterministic_uid(phantom.uid_key, modality), meta={})


@dataclass(frozen=True)
class Study:
    """What a bundle is run on, and what its network must have been given."""

    images: StudyImages
    #: Checks the first network input the hook saw (channel order, values).
    check_input: Callable[[torch.Tensor], None] = lambda tensor: None
    #: Voxels of the primary series the winning label must cover.
    body: np.ndarray | None = None


def ct_study(phantom_factory, extent_mm: float) -> Study:
    ct = _crop(_phantom_volume(phantom_factory, "CT"), (0.0, 0.0, 0.0), extent_mm, SeriesDescription="CT ABDOMEN")
    return Study(StudyImages(ct), body=ct.array > -500)


def ct_edge_study(phantom_factory, extent_mm: float) -> Study:
    """The anterior abdominal wall: air in front of the body, which CropForegroundd crops away."""
    ct = _crop(_phantom_volume(phantom_factory, "CT"), (0.0, -130.0, 0.0), extent_mm, SeriesDescription="CT ABDOMEN")
    body = ct.array > -250  # CropForegroundd's foreground: > 0 after the bundle's -250..400 HU window
    assert body.any() and not body.all()
    return Study(StudyImages(ct), body=body)


def mr_t2_study(phantom_factory, extent_mm: float) -> Study:
    mr = _crop(_phantom_volume(phantom_factory, "MR"), (0.0, 0.0, 0.0), extent_mm, SeriesDescription="t2_tse_tra")
    return Study(StudyImages(mr), body=np.ones(mr.geometry.shape, bool))


def cine_study(phantom_factory, extent_mm: float) -> Study:
    mr = _crop(_phantom_volume(phantom_factory, "MR"), (0.0, 0.0, 0.0), extent_mm, SeriesDescription="cine sax")
    return Study(StudyImages(mr), body=np.ones(mr.geometry.shape, bool))


def brats_study(phantom_factory, extent_mm: float) -> Study:
    """Four MR series told apart by their headers only, each with a different number of empty slices."""
    mr = _crop(_phantom_volume(phantom_factory, "MR"), (0.0, 0.0, 0.0), extent_mm)
    series = {}
    for blank, description in enumerate(("T1 post contrast", "T1 native", "T2 TSE", "FLAIR")):
        array = mr.array.copy()
        array[: blank * 2] = 0.0  # NormalizeIntensityd(nonzero=True) keeps these zero
        series[description] = Volume(
            array, mr.geometry, "MR", deterministic_uid(mr.series_instance_uid, description),
            meta={"SeriesDescription": description},
        )  # fmt: skip
    expected = [int((v.array != 0).sum()) for v in series.values()]  # bundle order: T1c, T1, T2, FLAIR
    flair, t1c, t1, t2 = (series[d] for d in ("FLAIR", "T1 post contrast", "T1 native", "T2 TSE"))

    def check(tensor: torch.Tensor) -> None:
        assert [int((tensor[0, c] != 0).sum()) for c in range(4)] == expected

    return Study(StudyImages(flair, (t2, t1c, t1)), check, np.ones(mr.geometry.shape, bool))


PHASES = {"CT ART 1mm": 0.0, "CT PV 1mm": 150.0, "CT DELAYED 10min": 300.0}


def renal_study(phantom_factory, extent_mm: float, descriptions: tuple[str, ...] = tuple(PHASES)) -> Study:
    """Three contrast phases of one CT study (each brighter than the last), the venous one routed."""
    ct = _crop(_phantom_volume(phantom_factory, "CT"), (0.0, 0.0, 0.0), extent_mm)
    series = [
        Volume(ct.array + PHASES[d], ct.geometry, "CT", deterministic_uid(ct.series_instance_uid, d),
               meta={"SeriesDescription": d})
        for d in descriptions
    ]  # fmt: skip
    primary = next((v for v in series if "PV" in v.meta["SeriesDescription"]), series[0])

    def check(tensor: torch.Tensor) -> None:
        means = [float(tensor[0, c].mean()) for c in range(3)]  # arterial, venous, excretory
        assert means[0] < means[1] < means[2], means

    return Study(StudyImages(primary, tuple(v for v in series if v is not primary)), check, ct.array > -500)


# --------------------------------------------------------------------------- bundles


@dataclass(frozen=True)
class Case:
    """One published bundle: its weights file, the channel made to win, and the study it runs on."""

    weights: str
    winner: int
    label: str
    study: Callable[..., Study]
    extent_mm: float
    patch: tuple[int, ...]
    kind: OutputKind
    value_range: tuple[float, float] | None = (0.0, 1.0)


# Extents keep each preprocessed image within one inferer window (96 voxels at the bundle's spacing).
CASES = {
    "spleen_ct_segmentation": Case(
        "models/model.pt", 1, "spleen", ct_study, 120, (1, 1, 96, 96, 96), OutputKind.PROBABILITIES
    ),
    "swin_unetr_btcv_segmentation": Case(
        "models/model.pt", 6, "liver", ct_study, 120, (1, 1, 96, 96, 96), OutputKind.PROBABILITIES
    ),
    "wholeBody_ct_segmentation": Case(
        "models/model.pt", 5, "liver", ct_study, 120, (1, 1, 96, 96, 96), OutputKind.LABELS, (-1.0, 1.0)
    ),
    "pancreas_ct_dints_segmentation": Case(
        "models/model.pt", 2, "pancreatic_tumor", ct_study, 80, (1, 1, 96, 96, 96), OutputKind.PROBABILITIES
    ),
    "multi_organ_segmentation": Case(
        "models/model.pt", 4, "spleen", ct_study, 80, (1, 1, 96, 96, 96), OutputKind.PROBABILITIES
    ),
    "pediatric_abdominal_ct_segmentation": Case(
        "models/dynunet_FT.pt", 2, "spleen", ct_edge_study, 120, (1, 1, 96, 96, 96), OutputKind.PROBABILITIES
    ),
    "renalStructures_CECT_segmentation": Case(
        "models/model.pt", 5, "renal_parenchyma", renal_study, 60, (1, 3, 96, 96, 96), OutputKind.LABELS
    ),
    "brats_mri_segmentation": Case(
        "models/model.pt", 1, "whole_tumor", brats_study, 60, (1, 4, 240, 240, 160), OutputKind.LABELS, None
    ),
    "prostate_mri_anatomy": Case(
        "models/model.pt", 2, "peripheral_zone", mr_t2_study, 40, (1, 1, 96, 96, 96), OutputKind.LABELS, None
    ),
    "ventricular_short_axis_3label": Case(
        "models/model.pt", 3, "rv_pool", cine_study, 60, (1, 1, 256, 256), OutputKind.PROBABILITIES
    ),
}


def _reference(name: str) -> ModelSpec:
    """The registry's model reference for a bundle."""
    dataset = load_registry().datasets[name]
    (ref,) = dataset.models
    return ModelSpec.from_registry(ref, dataset)


def _metadata(name: str) -> dict:
    """The bundle's published ``configs/metadata.json``."""
    return json.loads((_fixture(name) / "configs" / "metadata.json").read_text())


def _dints_architecture(path: Path) -> None:
    """An architecture code as the DiNTS bundles publish it (``scripts/search.py``: ``dints_space.decode()``).

    Numpy arrays for 12 blocks x 4 depths: node activations, active paths and
    each path's cell operation; here a chain of 3x3x3 convolutions at the top
    resolution (searching one takes minutes).  The published files were
    pickled by numpy 1, whose arrays name ``numpy.core``, not numpy 2's
    ``numpy._core``: the file is written that way.
    """
    blocks, depths = 12, 4
    node_a = np.zeros((blocks + 1, depths))
    node_a[:, 0] = 1
    arch_a = np.zeros((blocks, 3 * depths - 2))
    arch_a[:, 0] = 1  # path 0: top resolution to top resolution
    arch_c = np.ones((blocks, 3 * depths - 2), dtype=np.int64)  # operation 1: conv_3x3x3
    code = {"node_a": node_a, "arch_code_a": arch_a, "arch_code_a_max": arch_a, "arch_code_c": arch_c}
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(code, buffer)
    with zipfile.ZipFile(buffer) as saved, zipfile.ZipFile(path, "w") as published:
        for entry in saved.infolist():
            data = saved.read(entry.filename)
            if entry.filename.endswith("/data.pkl"):  # protocol 2: GLOBAL opcodes name modules as text
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            published.writestr(entry, data)


def build_bundle(name: str, root: Path, winner: int, weights: str) -> Path:
    """A bundle folder from the published files, with weights of its architecture in which ``winner`` wins."""
    from monai.bundle import ConfigParser

    source = _fixture(name)
    bundle = root / name
    shutil.copytree(source / "configs", bundle / "configs")
    for extra in ("scripts", "LICENSE", "large_files.yml", "large_files.yaml"):
        if (source / extra).is_dir():
            shutil.copytree(source / extra, bundle / extra)
        elif (source / extra).is_file():
            shutil.copy2(source / extra, bundle / extra)
    spec = _reference(name)
    parser = ConfigParser()
    parser.read_config(str(bundle_config_file(bundle)))
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')", **spec.options.get("overrides", {})})
    if "arch_ckpt_path" in parser:
        _dints_architecture(Path(parser.get_parsed_content("arch_ckpt_path")))
    with torch.serialization.safe_globals(numpy_safe_globals()):  # the DiNTS architecture code holds numpy arrays
        network = parser.get_parsed_content("network_def")
    pred = _metadata(name)["network_data_format"]["outputs"]["pred"]
    outputs = len(pred.get("channel_def") or pred["label_def"])
    with torch.no_grad():
        # All-zero weights make every layer's output constant (norms give 0), so the logits are the output
        # layer's bias: +5 for the winner, -5 for every other channel, softmax or sigmoid alike.
        for parameter in network.parameters():
            parameter.zero_()
        convs = (torch.nn.Conv2d, torch.nn.Conv3d)
        last = [
            m for m in network.modules() if isinstance(m, convs) and m.out_channels == outputs and m.bias is not None
        ]
        last[-1].bias.fill_(-5.0)
        last[-1].bias[winner] = 5.0
    (bundle / weights).parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), bundle / weights)
    return bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Callable[[str], Path]:
    """``bundles(name)``: the bundle built for ``CASES[name]`` (once per module)."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("zoo")

    def get(name: str) -> Path:
        if name not in built:
            case = CASES[name]
            built[name] = build_bundle(name, root, case.winner, case.weights)
        return built[name]

    return get


def _load(name: str, bundle: Path) -> PublishedBundleModel:
    spec = _reference(name)
    model = load_model(replace(spec, path=bundle), "cpu")
    assert isinstance(model, PublishedBundleModel)
    return model


def _words(text: str) -> str:
    return " ".join(re.split(r"[^a-z0-9]+", text.lower())).strip()


# --------------------------------------------------------------------------- every bundle


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_published_bundle_runs_through_the_node(name, bundles, phantom_factory):
    case = CASES[name]
    model = _load(name, bundles(name))
    study = case.study(phantom_factory, case.extent_mm)
    seen: list[torch.Tensor] = []
    model.network.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))

    prediction = model.predict(study.images)

    # The bundle's own inferer fed the network patches of its roi (the 2D bundle: one per slice).
    assert tuple(seen[0].shape) == case.patch
    if len(case.patch) == 4:
        assert len(seen) == study.images.primary.geometry.shape[0]
    if case.value_range is not None:  # the bundle's own intensity transform ran
        low, high = case.value_range
        assert low - 1e-4 <= float(seen[0].min()) < float(seen[0].max()) <= high + 1e-4
    study.check_input(seen[0])
    # Invertd returned the output to the source grid; probabilities where the postprocessing keeps them.
    primary = study.images.primary.geometry
    assert prediction.grid.same_grid(primary) and prediction.target.same_grid(primary)
    assert model.kind is case.kind
    assert prediction.interpolation == ("linear" if case.kind is OutputKind.PROBABILITIES else "nearest")
    # The registry's labels, the winning channel mapped by channel_def to the label that names it.
    spec = _reference(name)
    assert set(prediction.maps) == set(spec.labels)
    assert _words(model.io.channel_def[case.winner]) in _words(case.label)
    winner = prediction.maps[case.label] > 0.5
    body = study.body if study.body is not None else np.ones(primary.shape, bool)
    assert winner[body].mean() > 0.99
    for label, values in prediction.maps.items():
        if label != case.label:
            assert float(values.max()) < 0.5, label
    assert set(prediction.seconds) >= {"preprocess", "inference", "postprocess"}


@pytest.mark.slow
def test_cropforeground_is_inverted_onto_the_source_grid(bundles, phantom_factory):
    """The paediatric bundle crops to the body; the inverse leaves the air in front of it unlabelled."""
    name = "pediatric_abdominal_ct_segmentation"
    model = _load(name, bundles(name))
    study = ct_edge_study(phantom_factory, 120)
    spleen = model.predict(study.images).maps["spleen"] > 0.5
    air_rows = ~study.body.any(axis=(0, 2))  # rows (anterior-posterior) with no body voxel at all
    assert air_rows.any()
    assert not spleen[:, air_rows, :].any()
    assert spleen[study.body].all()


# --------------------------------------------------------------------------- geometry


def _oblique_ball(modality: str, description: str, values: tuple[float, float]) -> tuple[Volume, np.ndarray]:
    """A ball off the centre of a tilted, sagittal-ish grid: its centre lies 4.7, 11.6 and 9.3 mm along the axes."""
    a, b = np.radians(25), np.radians(15)
    row = np.array([0.0, np.cos(a), np.sin(a)])
    col = np.array([np.sin(b), -np.sin(a) * np.cos(b), np.cos(a) * np.cos(b)])
    col -= row * (row @ col)
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    shape, spacing = (28, 36, 40), (3.5, 2.5, 2.0)
    origin = -(normal * (shape[0] - 1) / 2 * spacing[0] + col * (shape[1] - 1) / 2 * spacing[1])
    origin -= row * (shape[2] - 1) / 2 * spacing[2]
    geometry = Geometry(shape, origin, row, col, normal, spacing)
    truth = np.linalg.norm(geometry.voxel_centres() - np.array([12.0, -8.0, 6.0]), axis=-1) <= 20.0
    array = np.where(truth, *values).astype(np.float32)
    return Volume(array, geometry, modality, "2.25.1", meta={"SeriesDescription": description}), truth


@dataclass(frozen=True)
class Threshold:
    """A 1x1(x1) convolution in which channel ``winner`` wins where the preprocessed image exceeds ``level``."""

    dims: int
    outputs: int
    winner: int
    level: float
    label: str
    modality: str
    description: str
    values: tuple[float, float]  # inside the ball, outside


THRESHOLDS = {
    # -57..164 HU window to 0..1: the ball 1, the rest 0.17.
    "spleen_ct_segmentation": Threshold(3, 2, 1, 0.5, "spleen", "CT", "ball", (150.0, -40.0)),
    # A label map: argmax, KeepLargestConnectedComponentd, then Invertd with bilinear interpolation.
    "prostate_mri_anatomy": Threshold(3, 3, 2, 0.0, "peripheral_zone", "MR", "t2_tse_tra", (400.0, 100.0)),
    # 2D: SliceInferer runs the network on each acquired slice; no reorientation.
    "ventricular_short_axis_3label": Threshold(2, 4, 3, 0.5, "rv_pool", "MR", "cine sax", (400.0, 100.0)),
}


def _threshold_bundle(name: str, root: Path) -> tuple[ModelSpec, Threshold]:
    """The bundle's published configs with a thresholding network (``options.overrides``) and its weights."""
    case = THRESHOLDS[name]
    bundle = root / name
    shutil.copytree(_fixture(name) / "configs", bundle / "configs")
    conv = (torch.nn.Conv2d, torch.nn.Conv3d)[case.dims - 2](1, case.outputs, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-10.0)
        conv.bias[0] = 0.0  # the background wins where the image is below the level
        conv.weight[case.winner, 0] = 20.0
        conv.bias[case.winner] = -20.0 * case.level
    (bundle / "models").mkdir()
    torch.save(conv.state_dict(), bundle / "models" / "model.pt")
    spec = _reference(name)
    network = {"_target_": f"torch.nn.Conv{case.dims}d", "in_channels": 1, "out_channels": case.outputs}
    overrides = {**spec.options.get("overrides", {}), "network_def": {**network, "kernel_size": 1}}
    return replace(spec, path=bundle, options={**spec.options, "overrides": overrides}), case


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_published_transforms_and_their_inverse_put_the_output_where_the_input_was(name, tmp_path):
    """Orientationd, Spacingd or SliceInferer, and Invertd, on an oblique off-centre ball.

    A flip of any axis would move the ball by twice its offset along that axis
    (the check below shows that this alone costs the Dice threshold).
    """
    spec, case = _threshold_bundle(name, tmp_path)
    volume, truth = _oblique_ball(case.modality, case.description, case.values)
    for axis in range(3):
        assert dice(np.flip(truth, axis), truth) < 0.9
    model = load_model(spec, "cpu")
    seen: list[torch.Tensor] = []
    model.network.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))

    prediction = model.predict(volume)

    assert prediction.grid.same_grid(volume.geometry)
    assert dice(prediction.maps[case.label] > 0.5, truth) > 0.9
    if case.dims == 2:  # one acquired slice per network call, in order (ScaleIntensityd: the ball is 1)
        assert [int((s > 0.5).sum()) for s in seen] == [int(truth[k].sum()) for k in range(truth.shape[0])]
        assert model.amp is False  # no evaluator asks for mixed precision


# --------------------------------------------------------------------------- the bundle's own code


def _code_bundle(root: Path, name: str, value: str, *, package: bool, absolute: bool = False) -> ModelSpec:
    """The spleen bundle's configs plus its own ``scripts.tags.Tag`` transform, which imports lazily.

    ``package``: ``scripts`` has an ``__init__.py`` (else a folder of modules);
    ``absolute``: that ``__init__.py`` imports its own package as ``scripts``.
    """
    bundle = root / name
    shutil.copytree(_fixture("spleen_ct_segmentation") / "configs", bundle / "configs")
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["imports"].append("$import scripts.tags")
    config["preprocessing"]["transforms"].append({"_target_": "scripts.tags.Tag", "keys": "@image_key"})
    config_file.write_text(json.dumps(config))
    scripts = bundle / "scripts"
    scripts.mkdir()
    if package:
        (scripts / "__init__.py").write_text("import scripts.later\n" if absolute else "from . import tags\n")
    (scripts / "tags.py").write_text(
        "from monai.transforms import MapTransform\n\n\n"
        "class Tag(MapTransform):\n"
        "    def __call__(self, data):\n"
        "        from .later import VALUE  # first imported when the transform runs\n\n"
        "        return {**data, 'tag': VALUE}\n"
    )
    (scripts / "later.py").write_text(f"VALUE = {value!r}\n")
    (bundle / "models").mkdir()
    torch.save(torch.nn.Conv3d(1, 2, 1).state_dict(), bundle / "models" / "model.pt")
    spec = _reference("spleen_ct_segmentation")
    network = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}
    return replace(spec, name=name, path=bundle, options={"overrides": {"network_def": network}})


def test_each_bundles_scripts_is_its_own_module_and_stays_importable(tmp_path):
    path, plain = list(sys.path), sys.modules.get("scripts")
    first = load_model(_code_bundle(tmp_path, "first", "one", package=True), "cpu")
    second = load_model(_code_bundle(tmp_path, "second", "two", package=False), "cpu")  # no __init__.py
    # Nothing process-wide changed: no sys.path entry, no module called scripts.
    assert sys.path == path and sys.modules.get("scripts") is plain
    tags = [m.preprocessing.transforms[-1] for m in (first, second)]
    assert type(tags[0]) is not type(tags[1])
    assert all(type(tag).__module__.startswith("_medsegagent_bundle_") for tag in tags)
    # Each runs its own code, imported lazily after loading.
    assert [tag({"image": 0})["tag"] for tag in tags] == ["one", "two"]
    volume, _ = _oblique_ball("CT", "ball", (150.0, -40.0))
    assert first.predict(volume).grid.same_grid(volume.geometry)


def test_bundle_code_importing_itself_by_its_plain_name_is_a_clear_error(tmp_path):
    spec = _code_bundle(tmp_path, "absolute", "one", package=True, absolute=True)
    with pytest.raises(ModelLoadError, match=r"imports its own package 'scripts'.*must be relative") as caught:
        load_model(spec, "cpu")
    assert "_medsegagent_bundle_" not in str(caught.value)  # messages name the bundle's own modules


def test_config_names_of_bundle_code_are_renamed_and_nothing_else():
    config = {
        "imports": ["$import scripts.tags", "$import os"],
        "t": {"_target_": "scripts.tags.Tag", "keys": "scripts"},
        "expression": "$scripts.tags.f(@bundle_root + '/scripts/x.py', 'scripts')",
        "other": {"_target_": "myscripts.X"},
    }
    assert _rename_code(config, {"scripts": "P"}) == {
        "imports": ["$import P.tags", "$import os"],
        "t": {"_target_": "P.tags.Tag", "keys": "scripts"},
        "expression": "$P.tags.f(@bundle_root + '/scripts/x.py', 'scripts')",
        "other": {"_target_": "myscripts.X"},
    }


def test_activation_with_its_own_function_is_not_read_as_probabilities(tmp_path):
    spec = _code_bundle(tmp_path, "tanh", "one", package=True)
    tanh = {"_target_": "Activationsd", "keys": "pred", "other": "$torch.tanh"}
    overrides = {**spec.options["overrides"], "postprocessing::transforms::0": tanh}
    model = load_model(replace(spec, options={"overrides": overrides}), "cpu")
    assert model.kind is OutputKind.LABELS
    plain = load_model(spec, "cpu")
    assert plain.kind is OutputKind.PROBABILITIES and plain.activation == "softmax"


# --------------------------------------------------------------------------- inputs the study lacks


@pytest.mark.slow
def test_missing_contrast_phase_is_named(bundles, phantom_factory):
    name = "renalStructures_CECT_segmentation"
    model = _load(name, bundles(name))
    study = renal_study(phantom_factory, 60, descriptions=("CT ART 1mm", "CT DELAYED 10min"))
    with pytest.raises(ChannelError, match=r"missing: venous .*'CT ART 1mm' \(arterial\)"):
        model.predict(study.images)


@pytest.mark.slow
def test_missing_mr_sequence_is_named(bundles, phantom_factory):
    name = "brats_mri_segmentation"
    model = _load(name, bundles(name))
    images = brats_study(phantom_factory, 60).images
    without_flair = StudyImages(images.others[0], images.others[1:])
    with pytest.raises(ChannelError, match=r"input channel 3 needs a MR:FLAIR series"):
        model.predict(without_flair)


@pytest.mark.parametrize(
    ("description", "phase"),
    [
        ("CT ABD ART 1.0 B30f", ContrastPhase.ARTERIAL),
        ("Late arterial", ContrastPhase.ARTERIAL),
        ("Portal venous 3mm", ContrastPhase.VENOUS),
        ("NEPHROGRAPHIC", ContrastPhase.VENOUS),
        ("Delayed 10 min", ContrastPhase.EXCRETORY),
        ("Delay 10 min", ContrastPhase.EXCRETORY),
        ("CT ABD DELAY", ContrastPhase.EXCRETORY),
        ("Late phase", ContrastPhase.EXCRETORY),
        ("Late venous", ContrastPhase.VENOUS),
        ("late portal venous 70s", ContrastPhase.VENOUS),
        ("Urographic phase", ContrastPhase.EXCRETORY),
        ("Non-contrast", ContrastPhase.UNENHANCED),
        ("CT ABDOMEN", None),
    ],
)
def test_contrast_phase_from_series_description(description, phase):
    geometry = Geometry((1, 2, 2), np.zeros(3), np.eye(3)[0], np.eye(3)[1], np.eye(3)[2], (1.0, 1.0, 1.0))
    volume = Volume(np.zeros((1, 2, 2), np.float32), geometry, "CT", "2.25.2", meta={"SeriesDescription": description})
    assert contrast_phase(volume) is phase


# --------------------------------------------------------------------------- errors an administrator can act on


@pytest.mark.slow
def test_missing_or_foreign_weights_are_reported(bundles, tmp_path):
    name = "spleen_ct_segmentation"
    bundle = tmp_path / name
    shutil.copytree(bundles(name), bundle)
    (bundle / "models" / "model.pt").unlink()
    spec = _reference(name)
    with pytest.raises(ModelLoadError, match=r"model\.pt is missing \(large_files\.yml gives its URL\)"):
        load_model(replace(spec, path=bundle), "cpu")
    torch.save(torch.nn.Conv3d(1, 2, 1).state_dict(), bundle / "models" / "model.pt")
    with pytest.raises(ModelLoadError, match="does not fit network_def"):
        load_model(replace(spec, path=bundle), "cpu")


@pytest.mark.slow
def test_registry_inputs_must_match_the_network(bundles):
    name = "brats_mri_segmentation"
    spec = _reference(name)
    with pytest.raises(ModelLoadError, match=r"takes 4 input channel\(s\).*lists 1"):
        load_model(replace(spec, path=bundles(name), channels=spec.channels[:1]), "cpu")


@pytest.mark.slow
def test_registry_label_on_a_background_channel_is_refused(bundles):
    name = "spleen_ct_segmentation"
    spec = _reference(name)
    with pytest.raises(ModelLoadError, match=r"'spleen' maps to output channel\(s\) \[0\]"):
        load_model(replace(spec, path=bundles(name), labels={"spleen": (0,)}), "cpu")


# --------------------------------------------------------------------------- the registry entries


def test_every_bundle_has_a_registry_entry_with_its_source_and_licence():
    registry = load_registry()
    zoo = {d.name: d for d in registry.in_collection("monai-zoo")}
    assert set(zoo) == set(CASES)
    for name, dataset in zoo.items():
        (ref,) = dataset.models
        metadata = _metadata(name)
        assert ref.backend == "monai_bundle" and ref.location == f"${{MEDSEG_MODELS}}/{name}"
        assert ref.source is not None and ref.source.kind == "monai_bundle"
        assert ref.source.url.endswith(f"/hosting_storage_v1/{name}_v{metadata['version']}.zip")
        licence = (_fixture(name) / "LICENSE").read_text()
        assert ref.licence is not None and ref.licence.name.split("-")[0].split(",")[0] in licence
        described = metadata["network_data_format"]["inputs"]["image"]["num_channels"]
        assert len(dataset.inputs) == described, name


def _code_files(bundle: Path) -> list[str]:
    """What loading a bundle runs or trusts: its configs, metadata, weight list and scripts."""
    patterns = ("configs/inference*", "configs/metadata.json", "large_files.y*ml", "scripts/*.py")
    return sorted(p.relative_to(bundle).as_posix() for pattern in patterns for p in bundle.glob(pattern))


def test_registry_pins_each_bundles_code_to_the_published_files():
    """Every config and script of a bundle has its published SHA-256 in the registry (``models install`` checks it)."""
    commit = "dfae206df112837d817e78d3727c9f32b3b52e82"  # shared/fixtures/monai-model-zoo/README.md
    for dataset in load_registry().in_collection("monai-zoo"):
        (ref,) = dataset.models
        folder = _fixture(dataset.name)
        listed = {f.path: f for f in ref.source.files}
        assert sorted(listed) == _code_files(folder), dataset.name
        for path, entry in listed.items():
            assert entry.sha256 == hashlib.sha256((folder / path).read_bytes()).hexdigest(), path
            assert entry.url.endswith(f"/{commit}/models/{dataset.name}/{path}"), entry.url


@pytest.mark.slow
def test_install_refuses_a_bundle_whose_config_differs_from_the_published_one(tmp_path, monkeypatch):
    from medsegagent.models.catalogue import Catalogue, CatalogueError, Problem

    monkeypatch.setenv("MEDSEG_MODELS", str(tmp_path / "models"))
    name = "spleen_ct_segmentation"
    carried = tmp_path / "carried" / name
    shutil.copytree(_fixture(name), carried)
    for entry in yaml.safe_load((carried / "large_files.yml").read_text())["large_files"]:
        (carried / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        (carried / entry["path"]).write_bytes(b"weights")  # present: nothing to download
    config = carried / "configs" / "inference.json"
    config.write_text(config.read_text().replace('"$import os"', '"$import os", "$__import__(\'os\').getpid()"'))
    registry = load_registry()
    (ref,) = registry.datasets[name].models
    with pytest.raises(CatalogueError, match=r"configs/inference\.json") as caught:
        Catalogue(registry).install(ref, origin=carried)
    assert caught.value.problem is Problem.HASH_MISMATCH
    assert not (tmp_path / "models" / name).exists()


def test_registry_names_the_weights_file_the_bundle_loads():
    """``options.weights`` (default ``model.pt``) is the file the bundle's CheckpointLoader loads from ``models/``."""
    from monai.bundle import ConfigParser

    for dataset in load_registry().in_collection("monai-zoo"):
        (ref,) = dataset.models
        parser = ConfigParser()
        parser.read_config(str(bundle_config_file(_fixture(dataset.name))))
        parser.update({"bundle_root": "/bundle", **ref.options.get("overrides", {})})
        (loader,) = [cid for cid, c in _components(parser.get()) if c["_target_"].endswith("CheckpointLoader")]
        load_path = parser.get_parsed_content(f"{loader}::load_path")
        assert os.path.normpath(load_path) == f"/bundle/models/{ref.options.get('weights', 'model.pt')}", dataset.name


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_segment_study_with_the_spleen_bundle_writes_a_coded_seg(bundles, phantom_factory, tmp_path):
    from medsegagent.node.pipeline import RunContext, segment_folder

    name = "spleen_ct_segmentation"
    raw = yaml.safe_load((Path(load_registry().path).resolve().parent / "registry.d" / "monai-zoo.yaml").read_text())
    entry = raw["datasets"][name]
    entry["models"][0]["location"] = str(bundles(name))
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text(yaml.safe_dump({"schema_version": 1, "datasets": {name: entry}}, sort_keys=False))
    registry = load_registry(registry_file)

    phantom, _ = phantom_factory("CT")
    ct = _crop(_phantom_volume(phantom_factory, "CT"), (0.0, 0.0, 0.0), 100)
    dicom_dir = tmp_path / "dicom"
    write_series(
        ct.array, ct.geometry, "CT", dicom_dir, study=phantom_study_info(phantom), series_number=2,
        series_description="CT ABDOMEN", frame_of_reference_uid=deterministic_uid(phantom.uid_key, "frame"),
    )  # fmt: skip
    result = segment_folder(dicom_dir, "segment the spleen", tmp_path / "out", RunContext.in_process(registry))

    report = result.report
    assert [(m["name"], m["status"]) for m in report["models"]] == [(name, "ok")]
    seg = pydicom.dcmread(result.seg_path)
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Spleen"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    # The constant network labels the whole crop: the SEG's spleen is the study's volume.
    assert report["segments"][0]["volume_ml"] == pytest.approx(ct.array.size * ct.geometry.voxel_volume_ml, rel=0.02)
