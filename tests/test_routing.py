"""Routing: grammar, coarse-to-fine matching, the plan contract, the bench and the CLI.

The router (and its encoder) is built once per session.  The hand-written test
set ``tests/data/routing_requests.jsonl`` is scored with the same bench as the
paper's file; the hard cases are repeated here as individual tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from medsegagent.models import parse
from medsegagent.models.bench_routing import load_cases, run_bench, score_query
from medsegagent.models.registry import load_registry
from medsegagent.models.routing import Plan, Router, UnmatchedKind, admits

DATA = Path(__file__).parent / "data" / "routing_requests.jsonl"
DEV = Path(__file__).parent / "data" / "routing_dev.jsonl"
DEV_ALL = Path(__file__).parent / "data" / "routing_dev_all.jsonl"
DEV_BLIND = Path(__file__).parent / "data" / "routing_dev_blind" / "requests.jsonl"
DEV_BLIND2 = Path(__file__).parent / "data" / "routing_dev_blind2" / "requests.jsonl"
DEV_BLIND3 = Path(__file__).parent / "data" / "routing_dev_blind3" / "requests.jsonl"
DEV_BLIND4 = Path(__file__).parent / "data" / "routing_dev_blind4" / "requests.jsonl"
DEV_BLIND5 = Path(__file__).parent / "data" / "routing_dev_blind5" / "requests.jsonl"
DEV_BLIND6 = Path(__file__).parent / "data" / "routing_dev_blind6" / "requests.jsonl"
DEV_BLIND7 = Path(__file__).parent / "data" / "routing_dev_blind7" / "requests.jsonl"
DEV_BLIND8 = Path(__file__).parent / "data" / "routing_dev_blind8" / "requests.jsonl"
DEV_BLIND9 = Path(__file__).parent / "data" / "routing_dev_blind9" / "requests.jsonl"
DEV_BLIND10 = Path(__file__).parent / "data" / "routing_dev_blind10" / "requests.jsonl"
DEV_BLIND11 = Path(__file__).parent / "data" / "routing_dev_blind11" / "requests.jsonl"
COLLECTION = "medsegagent-23"


@pytest.fixture(scope="session")
def registry():
    return load_registry()


@pytest.fixture(scope="session")
def router(registry):
    r = Router(registry)
    r.warm_up()  # encoder + label embeddings (cached on disk after the first run)
    return r


def plan(router: Router, text: str, modality: str | None = None, collection: str | None = COLLECTION) -> Plan:
    return router.plan(text, modality, collection=collection)


# ---------------------------------------------------------------------------- the test set


def test_own_set_scores_with_the_bench(router):
    result = run_bench(DATA, collection=COLLECTION, router=router)
    assert result.n >= 150
    failures = [(f["query"], f["modality"], f["expected"], f["predicted"]) for f in result.failures]
    assert result.strict >= 0.97, failures
    assert result.hit_rate >= 0.98
    assert result.p50_ms < 10.0


def test_development_set_scores_with_the_bench(router):
    # routing_dev.jsonl = the rule-written set plus requests of the kinds issue #14 lists
    # (lexicon synonyms, uncovered structures, echo, L/R, "whole gland", a lesion head over a list).
    result = run_bench(DEV, collection=COLLECTION, router=router)
    failures = [(f["query"], f["modality"], f["expected"], f["predicted"]) for f in result.failures]
    assert result.strict >= 0.99, failures
    negatives = [c for c in load_cases(DEV) if not c["expected_datasets"]]
    wrong = [c["query"] for c in negatives if plan(router, c["query"], c.get("modality")).selection]
    assert len(negatives) >= 40 and len(wrong) <= 0.05 * len(negatives), wrong


@pytest.mark.parametrize(
    "text, modality, refused",
    [
        ("anterior cruciate ligament", "MR", "'cruciate ligament'"),
        ("MR KNEE - MENISCI", None, "'meniscus'"),
        ("peripheral zone of the prostate", "MR", "peripheral"),
        ("left ventricle on the echocardiogram", None, "in US"),
    ],
)
def test_known_but_uncovered_structures_are_refused_by_name(router, text, modality, refused):
    p = plan(router, text, modality)
    assert p.selection == {}
    assert any(refused in u.reason for u in p.unmatched), p.unmatched


def test_lesion_head_distributes_over_a_list_and_header_organ_is_the_target(router):
    p = plan(router, "abdominal tumours - liver, kidney and adrenal", "CT")
    assert p.selection == {"Adrenal-ACC-Ki67-Seg": [1], "KiTS23": [3], "LiTS": [2]}
    assert plan(router, "MR PROSTATE - WHOLE GLAND").selection == plan(router, "prostate", "MR").selection
    assert plan(router, "kidneys L/R", "CT").selection == plan(router, "left and right kidney", "CT").selection


def test_modality_is_never_wrong_and_empty_selections_have_reasons(router, registry):
    # Property over every request of the set: a selected dataset always accepts the
    # study's modality (a CT named only in the text admits PET/CT datasets too); a
    # request expecting nothing selects nothing and says why.
    for case in load_cases(DATA):
        p = plan(router, case["query"], case.get("modality"))
        if p.modality:
            for name in p.selection:
                dataset = registry.datasets[name]
                assert admits(dataset, p.modality, p.modality_source), (case["query"], name, p.modality)
                if case.get("modality"):
                    assert dataset.accepts(p.modality), (case["query"], name, p.modality)
        if not case["expected_datasets"]:
            assert p.selection == {}, case["query"]
            assert p.unmatched and all(u.reason for u in p.unmatched), case["query"]
        for values in p.selection.values():
            assert values == sorted(set(values))


def test_set_file_is_well_formed():
    cases = load_cases(DATA)
    queries = [(c["query"], c.get("modality")) for c in cases]
    assert len(queries) == len(set(queries))
    nothing = [c for c in cases if not c["expected_datasets"]]
    header_only = [c for c in cases if c.get("modality") and c["query"] and not parse.detect_modality(c["query"])[0]]
    assert len(nothing) >= 20 and len(header_only) >= 60


# ---------------------------------------------------------------------------- hard cases


def test_organ_is_not_its_lesion(router):
    # Similarity alone prefers "liver tumor" for this sentence; the grammar + label kinds do not.
    p = plan(router, "segment the liver in this MR")
    assert p.selection == {"AMOS22_Task2": [6], "TotalSegmentator_MRI": [5]}
    ct = plan(router, "liver", "CT")
    assert ct.selection["LiTS"] == [1]  # the organ label, not liver_tumour (2)
    assert plan(router, "liver tumour", "CT").selection == {"LiTS": [2]}
    assert plan(router, "kidney tumor", "CT").selection == {"KiTS23": [3]}
    assert "KiTS23" not in plan(router, "kidney cysts", "CT").selection


def test_composite_region_labels(router):
    # KiTS23's "kidney and masses" [1,2,3] has the synonym "kidneys": the kidney is the whole label
    # (every blind set, and KiTS23's own evaluation region); the public benchmark expects [1].
    assert plan(router, "kidneys", "CT").selection["KiTS23"] == [1, 2, 3]
    assert plan(router, "renal masses", "CT").selection == {"KiTS23": [2, 3]}
    assert plan(router, "kidney and masses", "CT").selection == {"KiTS23": [1, 2, 3]}
    assert plan(router, "uterus", "CT").selection == {"AMOS22_Task2": [15]}


def test_a_composite_labels_part_is_its_values_minus_the_other_parts(tmp_path):
    # Without a synonym naming the part, "kidney and masses" = [1,2,3] and "kidney masses" =
    # [2,3] in one dataset: the kidney alone is [1].
    labels = {
        "kidney and masses": {"value": [1, 2, 3], "kind": "organ", "type": ["SCT", "64033007", "Kidney"]},
        "kidney masses": {"value": [2, 3], "kind": "lesion", "type": ["SCT", "4147007", "Mass"]},
    }
    for shade, label in enumerate(labels.values()):
        label.update(category=["SCT", "91723000", "Anatomical Structure"], color=[185, 102, 83 + shade])
    dataset = {
        "description": "a kidney dataset",
        "collections": ["test"],
        "modalities": ["CT"],
        "inputs": [{"channel": 0, "modality": "CT"}],
        "regions": ["abdomen"],
        "labels": labels,
        "models": [],
    }
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"schema_version": 1, "datasets": {"Renal": dataset}}))
    own = Router(load_registry(path), use_encoder=False)
    assert own.plan("kidneys", "CT").selection == {"Renal": [1]}
    assert own.plan("kidney and masses", "CT").selection == {"Renal": [1, 2, 3]}


def test_an_organ_with_its_lesion_is_the_organ_of_every_dataset_and_the_lesion(router):
    # Held-out convention 3 (an organ is not its lesion): "liver and its metastases" is the liver
    # wherever a dataset segments it, and the liver tumour (LiTS: liver 1, tumour 2). Until round
    # fifteen the liver came only from the datasets that segment both.
    selection = plan(router, "liver and its metastases", "CT").selection
    assert selection["LiTS"] == [1, 2] and selection["WORD"] == [1] and selection["AMOS22_Task2"] == [6]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("left kidney", {"AMOS22_Task2": [3], "TotalSegmentator_MRI": [3]}),
        ("R kidney", {"AMOS22_Task2": [2], "TotalSegmentator_MRI": [2]}),
        ("kidney (L)", {"AMOS22_Task2": [3], "TotalSegmentator_MRI": [3]}),
        ("both kidneys", {"AMOS22_Task2": [2, 3], "TotalSegmentator_MRI": [2, 3]}),
        ("left and right adrenal", {"AMOS22_Task2": [11, 12], "TotalSegmentator_MRI": [8, 9]}),
    ],
)
def test_laterality(router, text, expected):
    assert plan(router, text, "MR").selection == expected


def test_a_sided_request_never_takes_the_other_side_or_a_both_sides_label(router):
    p = plan(router, "left adrenal gland", "CT")
    assert "WORD" not in p.selection  # WORD's adrenal label covers both glands
    assert p.selection["AMOS22_Task2"] == [12]


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("T10 through L2", [30, 31, 32, 33, 34]),
        ("all lumbar vertebrae", [27, 28, 29, 30, 31]),
        ("fourth lumbar vertebra", [28]),
        ("3rd rib", [93, 96]),
        ("left ribs 3 to 5", [96, 97, 98]),
        ("floating ribs on the right", [114, 115]),
        ("all ribs except the 12th", [v for v in range(92, 116) if v not in (105, 115)]),
        ("the whole spine", list(range(26, 51))),
    ],
)
def test_ordinals_ranges_and_groups(router, text, values):
    assert plan(router, text, "CT").selection == {"TotalSegmentator_v2": values}


def test_t1_is_a_sequence_or_a_vertebra_by_context(router):
    assert parse.detect_modality("T1 post-contrast MRI")[0] == "MR:T1C"
    assert parse.detect_modality("T1-weighted brain")[0] == "MR:T1"
    assert plan(router, "T1 vertebra", "CT").selection == {"TotalSegmentator_v2": [43]}
    assert plan(router, "T1 to T3 vertebrae on CT", None).selection == {"TotalSegmentator_v2": [41, 42, 43]}


@pytest.mark.parametrize(
    ("text", "modality"),
    [
        ("CT ABD/PEL W CON - LIVER + SPLEEN VOLUMETRY", "CT"),
        ("pet/ct whole body", "PT+CT"),
        ("FDG PET and CT", "PT+CT"),
        ("FLAIR", "MR:FLAIR"),
        ("DWI and ADC", "MR"),
        ("breast US", "US"),
        ("help us segment the liver", None),
        ("cine MR", "MR"),
    ],
)
def test_modality_hints(text, modality):
    assert parse.detect_modality(text)[0] == modality


def test_caller_modality_overrides_the_text(router):
    p = plan(router, "liver on CT", "MR")
    assert p.modality == "MR" and p.modality_source == "caller"
    assert set(p.selection) == {"AMOS22_Task2", "TotalSegmentator_MRI"}


def test_uncovered_target_is_unmatched_with_the_reason(router):
    p = plan(router, "coronary arteries", "MR")
    assert p.selection == {}
    (u,) = p.unmatched
    assert u.kind is UnmatchedKind.OTHER_MODALITY
    assert "MR" in u.reason and "ImageCAS" in u.reason
    p = plan(router, "liver and quadriceps", "CT")
    assert set(p.selection) >= {"TotalSegmentator_v2"} and 48 not in p.selection["TotalSegmentator_v2"]
    assert [u.target for u in p.unmatched] == ["quadriceps"]


@pytest.mark.parametrize("text", ["what's the weather today", "hello", "please order lunch", "", "appendix"])
def test_nonsense_selects_nothing(router, text):
    p = plan(router, text, "CT")
    assert p.selection == {} and p.unmatched


def test_abbreviations_synonyms_typos(router):
    ivc = plan(router, "IVC", "CT").selection
    assert ivc == plan(router, "inferior vena cava", "CT").selection == plan(router, "postcava", "CT").selection
    assert plan(router, "suprarenal glands", "MR").selection == plan(router, "adrenal glands", "MR").selection
    assert plan(router, "pancrease", "CT").selection == plan(router, "pancreas", "CT").selection
    # A tie at one edit (heart or hard) goes to the word with the same consonants.
    assert plan(router, "hart", "CT").selection == plan(router, "heart", "CT").selection
    assert plan(router, "PROSTRATE", "MR").selection == {"AMOS22_Task2": [15], "TotalSegmentator_MRI": [17]}
    assert plan(router, "LV RV MYO", "MR").selection == {"MM-WHS": [1, 3, 5], "MMs": [1, 2, 3]}
    assert plan(router, "ICH", "CT").selection == {"Instance22": [1]}
    assert plan(router, "GTVp, GTVnd", "PT+CT").selection == {"HECKTOR2022": [1, 2]}


def test_encoder_reads_words_the_grammar_does_not_know(router):
    # "thyroidea" (Latin) is no lexicon or registry word; the encoder maps it to the thyroid
    # concept, and the grammar then applies modality and datasets as for any target.
    p = plan(router, "thyroidea", "CT")
    assert p.selection == {"SegRap2023_Task1": [53], "TotalSegmentator_v2": [17]}
    assert any(str(e.get("method", "")).startswith("encoder") for e in p.explain)
    # Far from every label: nothing, with the similarity in the explanation.
    p = plan(router, "cerebellar hemispheres", "CT")
    assert p.selection == {} and p.unmatched


def test_worklist_header_is_context(router):
    p = plan(router, "MR BRAIN W/WO - TUMOR", None)
    assert p.selection == {"BraTS21": [1, 2, 3]}
    assert "head" in p.regions


def test_collections_and_installed_only(router, registry):
    demo = router.plan("liver and spleen", "CT", collection="demo")
    assert set(demo.selection) <= {d.name for d in registry.in_collection("demo")}
    assert demo.selection
    everything = router.plan("breast lesion", "US")
    assert everything.selection == {"TDSC-ABUS2023": [1]}
    assert plan(router, "breast lesion", "US").selection == {}  # not in the paper's 23
    inst = router.plan("liver", "CT", installed_only=True)
    for name in inst.selection:
        assert registry.datasets[name].installed_models
    with pytest.raises(ValueError, match="collection"):
        router.plan("liver", "CT", collection="no-such-collection")


def test_plan_json_contract(router):
    p = plan(router, "left kidney and liver tumour", "CT")
    data = json.loads(p.dumps())
    assert {"selection", "targets", "unmatched", "missing_models", "explain", "modality"} <= set(data)
    t = data["targets"][0]
    assert {"target", "laterality", "kind", "candidates"} <= set(t)
    c = t["candidates"][0]
    assert {"dataset", "labels", "values", "score", "installed", "models"} <= set(c)
    assert data["targets"][1]["kind"] == "lesion"
    stages = [e.get("stage") for e in data["explain"]]
    assert stages[0] == "modality" and "target" in stages
    # Missing models name the dataset and how to install it.
    assert {m["dataset"] for m in data["missing_models"]} == set(data["selection"])
    assert all(m["install_hint"] for m in data["missing_models"])


@pytest.mark.parametrize("text", ["left kidney and liver tumour", "all ribs except 12", "liver and quadriceps", ""])
def test_a_stored_plan_reads_back_as_the_plan(router, text):
    # A job stores its plan as JSON and runs it later (after a restart too): the round trip loses nothing.
    p = plan(router, text, "CT")
    back = Plan.from_json(json.loads(p.dumps()))
    assert back.to_json() == p.to_json()
    assert back.selection == p.selection and all(isinstance(u.kind, UnmatchedKind) for u in back.unmatched)
    assert [c.values for t in back.targets for c in t.candidates] == [c.values for t in p.targets for c in t.candidates]


def test_module_level_plan_function(registry):
    from medsegagent.models.routing import plan as plan_fn

    p = plan_fn("spleen", "MR", collection=COLLECTION, registry=registry)
    assert p.selection == {"AMOS22_Task2": [1], "TotalSegmentator_MRI": [1]}


# ---------------------------------------------------------------------------- metrics


def test_paper_metric():
    assert score_query({"A": [1, 2]}, {"A": [2, 1]}) == 1.0
    assert score_query({"A": [1], "B": [2]}, {"A": [1], "C": [3]}) == pytest.approx(1 / 3)
    assert score_query({"A": [[1, 2], 3]}, {"A": [1, 2, 3]}) == 1.0
    assert score_query({}, {}) == 1.0
    assert score_query({}, {"A": [1]}) == 0.0


# ---------------------------------------------------------------------------- encoder


def test_encoder_reproduces_sentence_transformers(router):
    # Reference similarities measured with sentence-transformers on this model (FIELD-NOTES).
    enc = router._get_encoder()
    a, b, c = enc.encode(["segment the liver in this MR", "liver tumor", "liver"])
    assert float(a @ b) == pytest.approx(0.579, abs=2e-3)
    assert float(a @ c) == pytest.approx(0.572, abs=2e-3)
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("text", ["uterine fibroids", "vocal cord polyp"])
def test_a_partly_read_target_below_the_threshold_is_unmatched(router, text):
    # The grammar reads only one word (uterus, glottis); the encoder scores the whole phrase
    # against that concept's terms, and below the one threshold the target is refused.
    p = plan(router, text, "MR" if "uter" in text else "CT")
    assert p.selection == {}
    assert any("threshold" in u.reason or "no dataset" in u.reason for u in p.unmatched), p.unmatched
    assert any("threshold" in str(e.get("method", "")) for e in p.explain), p.explain


def test_dev_set_over_the_whole_registry(router):
    # Requests written over the full registry, expectations computed from its type codes
    # (tests/data/routing_dev_all.py), never from the router.
    result = run_bench(DEV_ALL, collection=None, router=router)
    assert result.n >= 540
    assert result.strict >= 0.95, result.strict  # 0.935 (555 rows) round 8, 0.946 round 14, 0.953 round 23


def test_blind_dev_set_over_the_whole_registry(router):
    # Written without sight of the rules (tests/data/routing_dev_blind/README.md), open to the
    # router's engineers. Its misses that remain are mostly where its conventions and the public
    # benchmark's disagree (docs/routing.md, round eight).
    result = run_bench(DEV_BLIND, collection=None, router=router)
    assert result.n >= 500
    assert result.strict >= 0.94, result.strict  # 0.735 baseline (fec671e), 0.897 round 8, 0.948 round 23
    assert result.negatives_correct >= 0.98, result.negatives_correct


def test_second_blind_dev_set_over_the_whole_registry(router):
    # From other phrasing sources (report sentences, order entry, protocol names, TG-263, FDI teeth,
    # corrections), written without sight of the rules (tests/data/routing_dev_blind2/README.md).
    result = run_bench(DEV_BLIND2, collection=None, router=router)
    assert result.n >= 500
    assert result.strict >= 0.88, result.strict  # 0.691 untuned (86bbd00), 0.773 after round nine, 0.883 round 24
    assert result.negatives_correct >= 0.95, result.negatives_correct


def test_third_blind_dev_set_over_the_whole_registry(router):
    # Weighted to the held-out set's weak categories (lay, typo, worklist, multi, exclusion), written
    # without sight of the rules (tests/data/routing_dev_blind3/README.md); round twelve tuned on its
    # even rows only (docs/routing.md).
    result = run_bench(DEV_BLIND3, collection=None, router=router)
    assert result.n >= 400
    assert result.strict >= 0.92, result.strict  # 0.732 untuned (b44697b), 0.80 after round twelve, 0.932 round 23
    assert result.negatives_correct >= 0.93, result.negatives_correct


def test_fourth_blind_dev_set_over_the_whole_registry(router):
    # Written in session eight without sight of the rules (tests/data/routing_dev_blind4/README.md):
    # round thirteen was measured on it untouched (0.780 -> 0.786), round fourteen tuned on its even
    # rows only, round fifteen on all of them (docs/routing.md).
    result = run_bench(DEV_BLIND4, collection=None, router=router)
    assert result.n >= 450
    assert result.strict >= 0.96, result.strict  # 0.780 untuned (8efc881), 0.854 round 14, 0.965 round 24
    assert result.negatives_correct >= 0.97, result.negatives_correct


def test_fifth_blind_dev_set_over_the_whole_registry(router):
    # Written in session nine without sight of the rules (tests/data/routing_dev_blind5/README.md):
    # round fifteen tuned on its even rows only; the odd rows are its measure (docs/routing.md).
    result = run_bench(DEV_BLIND5, collection=None, router=router)
    assert result.n >= 600
    assert result.strict >= 0.88, result.strict  # 0.684 untuned (3e5ac57), 0.769 round 15, 0.888 round 23
    assert result.negatives_correct >= 0.90, result.negatives_correct  # 0.867 untuned, 0.916


def test_sixth_blind_dev_set_over_the_whole_registry(router):
    # Written in session ten without sight of the rules (tests/data/routing_dev_blind6/README.md)
    # and never opened by the router engineer: round seventeen's measure (docs/routing.md).
    result = run_bench(DEV_BLIND6, collection=None, router=router)
    assert result.n >= 600
    assert result.strict >= 0.81, result.strict  # 0.640 untuned (4021bec), 0.659 round 18, 0.817 round 24
    assert result.negatives_correct >= 0.84, result.negatives_correct  # 0.857 both


def test_seventh_blind_dev_set_over_the_whole_registry(router):
    # Written in session eleven without sight of the rules (tests/data/routing_dev_blind7/README.md):
    # the measure of rounds nineteen and twenty, opened for round twenty-one (docs/routing.md).
    result = run_bench(DEV_BLIND7, collection=None, router=router)
    assert result.n >= 700
    assert result.strict >= 0.85, result.strict  # 0.692 untuned (5d2b2c1), 0.706 unread at 39e0e68, 0.856 round 24
    assert result.negatives_correct >= 0.86, result.negatives_correct  # 0.893 untuned


def test_eighth_blind_dev_set_over_the_whole_registry(router):
    # Written in session twelve without sight of the rules (tests/data/routing_dev_blind8/README.md):
    # the measure of rounds twenty-one to twenty-three, opened for round twenty-four (docs/routing.md).
    result = run_bench(DEV_BLIND8, collection=None, router=router)
    assert result.n >= 650
    assert result.strict >= 0.70, result.strict  # 0.606 untuned (39e0e68), 0.661 unread after round 23, 0.707 round 24
    assert result.negatives_correct >= 0.84, result.negatives_correct  # 0.857 untuned


def test_ninth_blind_dev_set_over_the_whole_registry(router):
    # Written in session fourteen without sight of the rules (tests/data/routing_dev_blind9/README.md):
    # the measure of round twenty-four, opened for round twenty-five (docs/routing.md).
    result = run_bench(DEV_BLIND9, collection=None, router=router)
    assert result.n >= 650
    assert result.strict >= 0.90, result.strict  # 0.852 untuned (783f070), 0.864 unread after round 24, 0.919 round 25
    assert result.negatives_correct >= 0.93, result.negatives_correct  # 0.930 untuned, 0.956 round 25


def test_tenth_blind_dev_set_over_the_whole_registry(router):
    # Written in session fifteen without sight of the rules (tests/data/routing_dev_blind10/README.md):
    # the measure of round twenty-five, opened for round twenty-six (docs/routing.md).
    result = run_bench(DEV_BLIND10, collection=None, router=router)
    assert result.n >= 700
    assert result.strict >= 0.85, result.strict  # 0.853 untuned (3d6c876), 0.865 unread after round 25
    assert result.negatives_correct >= 0.91, result.negatives_correct  # 0.924 untuned, 0.929 after round 25


def test_eleventh_blind_dev_set_over_the_whole_registry(router):
    # Written in session sixteen without sight of the rules (tests/data/routing_dev_blind11/README.md)
    # and never opened by the router engineer: the measure of round twenty-six on (docs/routing.md).
    result = run_bench(DEV_BLIND11, collection=None, router=router)
    assert result.n >= 650
    assert result.strict >= 0.83, result.strict  # 0.847 untuned (3ea6821)
    assert result.negatives_correct >= 0.88, result.negatives_correct  # 0.902 untuned


def test_embedding_cache_is_keyed_and_reused(tmp_path, router):
    from medsegagent.models.encoder import cached_embeddings

    class Counting:
        path = Path("fake-model")
        calls = 0

        def encode(self, strings):
            Counting.calls += 1
            return np.ones((len(strings), 4), np.float32)

    enc = Counting()
    first = cached_embeddings(["a", "b"], key="hash1", encoder=enc, directory=tmp_path)
    again = cached_embeddings(["a", "b"], key="hash1", encoder=enc, directory=tmp_path)
    other = cached_embeddings(["a", "b"], key="hash2", encoder=enc, directory=tmp_path)
    changed = cached_embeddings(["a", "c"], key="hash1", encoder=enc, directory=tmp_path)
    assert Counting.calls == 3 and first.shape == again.shape == other.shape == changed.shape == (2, 4)
    assert len(list(tmp_path.glob("*.npy"))) == 3


# ---------------------------------------------------------------------------- CLI


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from medsegagent.node.cli import main

    code = main(args)
    return code, capsys.readouterr().out


def test_cli_plan_json(capsys):
    code, out = _cli(["plan", "both kidneys", "--modality", "MR", "--collection", COLLECTION, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["selection"] == {"AMOS22_Task2": [2, 3], "TotalSegmentator_MRI": [2, 3]}
    assert "explain" not in data
    code, out = _cli(["plan", "both kidneys", "--modality", "MR", "--explain"], capsys)
    assert code == 0 and "selection:" in out and "explain:" in out


def test_cli_plan_jsonl_keeps_order(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [
        {"query": "spleen", "modality": "MR"},
        {"query": "liver tumour on CT", "modality": None},
        {"query": "hello"},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out_file = tmp_path / "out.jsonl"
    code, _ = _cli(["plan", "--jsonl", str(src), "--collection", COLLECTION, "-o", str(out_file)], capsys)
    assert code == 0
    plans = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [p["text"] for p in plans] == [r["query"] for r in rows]
    assert plans[1]["selection"] == {"LiTS": [2]} and plans[2]["selection"] == {}


def test_cli_bench_routing_json(capsys):
    code, out = _cli(["bench", "routing", str(DATA), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert {"hit_rate", "strict", "soft", "p50_ms", "p95_ms", "startup_s", "n"} <= set(data)
    assert data["collection"] == COLLECTION and data["strict"] >= 0.97


def test_bench_group_is_shared_and_extensible():
    import argparse

    from medsegagent.models import routing_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    routing_cli.register(sub)
    bench = routing_cli.get_bench_subparsers(sub)
    assert bench is routing_cli.get_bench_subparsers(sub)
    extra = bench.add_parser("seg")
    extra.set_defaults(func=lambda a: 0)
    assert parser.parse_args(["bench", "seg"]).bench_command == "seg"
    assert parser.parse_args(["bench", "routing", "x.jsonl"]).collection == COLLECTION


def test_public_benchmark_meets_the_target_when_present(router):
    # Scored only (never used to build rules); skipped where the shared file is absent.
    path = Path(
        os.environ.get("MEDSEGAGENT_PUBLIC_BENCH", "/work/shared/benchmarks/medsegagent-model-selection-343.jsonl")
    )
    if not path.is_file():
        pytest.skip("public routing benchmark not available")
    result = run_bench(path, collection=COLLECTION, router=router)
    assert result.strict >= 0.95


def test_encoder_runs_one_thread_per_pass_and_leaves_torch_as_it_was(router):
    # Latency (#14): a phrase's pass runs on one intra-op thread (on a busy host two threads'
    # barrier cost 100-500 ms a pass), and the process-wide count is restored for model threads.
    import torch

    enc = router._get_encoder()
    before_threads, before_passes = torch.get_num_threads(), enc.forward_passes
    seen: list[int] = []
    hook = enc._model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        enc.encode(["thyroidea gland"])
    finally:
        hook.remove()
    assert seen == [1]
    assert torch.get_num_threads() == before_threads
    assert enc.forward_passes == before_passes + 1
    # A phrase already read in this process costs no second pass.
    plan(router, "thyroidea", "CT")
    passes = enc.forward_passes
    again = plan(router, "thyroidea", "CT")
    assert enc.forward_passes == passes and again.selection


def test_a_request_makes_one_encoder_pass_for_all_its_phrases(router, monkeypatch):
    # Latency (#14): a pass costs ~10 ms on one thread and each further short phrase in it ~1-2 ms,
    # so the first phrase a request needs takes the request's other phrases along.
    enc = router._get_encoder()
    asked: list[str] = []
    encode_phrase = router._encode_phrase
    monkeypatch.setattr(router, "_encode_phrase", lambda phrase: asked.append(phrase) or encode_phrase(phrase))
    before = enc.forward_passes
    result = plan(router, "the cobalt screws in the lower jaw; seroma and granulation tissue are not wanted", "CT")
    assert len(set(asked)) >= 4  # a neighbour reading, a description and the two exclusions
    assert enc.forward_passes == before + 1
    assert result.selection == {}


_SEEDED_PLANS = """
import json
from medsegagent.models.registry import load_registry
from medsegagent.models.routing import Router
router = Router(load_registry())
plans = [router.plan(q).to_json() for q in ("heart", "iliac vessels", "segment the heart chambers", "lungs")]
for p in plans:
    p.pop("elapsed_ms", None)
print(json.dumps(plans))
"""


def test_a_plan_does_not_depend_on_the_hash_seed():
    """Plans are stored with jobs and compared across restarts: no set-walk order may leak into them."""
    import subprocess
    import sys

    def plans(seed: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        return subprocess.run([sys.executable, "-c", _SEEDED_PLANS], env=env, capture_output=True, text=True,
                              check=True, timeout=300).stdout  # fmt: skip

    outputs = {plans(seed) for seed in ("1", "2", "3")}
    assert len(outputs) == 1 and json.loads(outputs.pop())[0]["targets"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # an indexed head keeps its indices when bare numbers follow
        ("ribs 11 and 12", {(("rib",), frozenset({"11"})), (("rib",), frozenset({"12"}))}),
        # a bare class noun takes the qualifiers of the one before it
        (
            "common iliac arteries and veins",
            {(("artery", "common", "iliac"), None), (("common", "iliac", "vein"), None)},
        ),
        # bare lesions under a one-organ worklist header are that organ's
        ("MR LIVER - SEGMENT LESIONS", {(("lesion", "liver"), None)}),
        # "skeletal muscle" is its own concept, not the bone adjective plus a filler word
        ("skeletal muscle", {(("striated",), None)}),
    ],
)
def test_structure_rules_of_round_five(text: str, expected: set) -> None:
    parsed = parse.parse_request(text)
    assert {(t.concept.core, t.concept.index) for t in parsed.targets} == expected


@pytest.mark.parametrize(
    "text, dataset, values",
    [
        # an exclusion by "without" / "not" (but not "without contrast")
        # (KiTS23: the kidney with its masses [1,2,3] less the tumour [3]; the cysts stay)
        ("kidneys without the tumours", "KiTS23", [1, 2]),
        ("bladder, not the prostate", "AMOS22_Task2", [14]),
        ("CT abdomen without contrast - liver", "LiTS", [1]),
        # excluding one side of a paired structure leaves the other side only
        ("kidneys except the left kidney", "AMOS22_Task2", [2]),
        # a leading side holds for the next items that name none
        ("right kidney and adrenal", "AMOS22_Task2", [2, 11]),
        # number words and ordinals in ranges (TotalSegmentator: L1 31, L2 30, L3 29)
        ("the first three lumbar vertebrae", "TotalSegmentator_v2", [29, 30, 31]),
        ("ribs seven to nine", "TotalSegmentator_v2", [100, 101, 102, 110, 111, 112]),
        # a referral sentence
        ("Requesting a segmentation of the right kidney only.", "WORD", [4]),
        # an organ and its own lesion are two targets
        ("liver and liver lesions", "LiTS", [1, 2]),
    ],
)
def test_list_grammar_exclusions_sides_and_number_words(router, text, dataset, values):
    assert plan(router, text, "CT").selection.get(dataset) == values


@pytest.mark.parametrize(
    "text, dataset, values",
    [
        # words a clause away from the structure do not put its reading in doubt (round thirteen)
        ("my husband's spleen got hurt in the car crash, can you outline it", "WORD", [2]),
        ("can you work out my liver volume", "LiTS", [1]),
        # an order's priority is when, not what ("stat" was read as subcutaneous adipose tissue)
        ("spleen stat", "WORD", [2]),
        ("Wilms tumour of the left kidney", "KiTS23", [3]),
        ("left ilium", "TotalSegmentator_v2", [77]),
    ],
)
def test_round_thirteen_readings(router, text, dataset, values):
    selection = plan(router, text, "CT").selection
    assert selection.get(dataset) == values, selection


@pytest.mark.parametrize(
    "text",
    [
        "water on the lungs",  # the unknown word before a preposition is what lies at the lungs
        "femoral artery",  # a class noun last is the head: not the femur and every artery
        "segment the hepatic artery",
        "vertebral arteries",  # known to the lexicon, segmented by no dataset
        "descending aorta",  # no longer corrected to "ascending aorta"
        "pls process asap",  # a bare "process" is a class noun, too vague to stand alone
    ],
)
def test_round_thirteen_refusals(router, text):
    p = plan(router, text, "CT")
    assert p.selection == {}, p.selection
    assert text == "pls process asap" or p.unmatched, p.unmatched


@pytest.mark.parametrize(
    "text",
    [
        "liver and spleen; don't need the spleen",  # contractions are spelt out
        "liver and spleen; spleen isn't needed",
        "liver and spleen, no need for the spleen",
        "liver and spleen, leave the spleen out",
        "liver and spleen but leave the spleen alone",
        "liver and spleen, ignore the spleen",
        "liver and spleen but exclude spleen",
        "liver and spleen - spleen can be skipped",
        "liver and spleen, spleen excluded",
        "liver, spleen and kidneys - everything but the spleen and kidneys",
    ],
)
def test_every_way_to_write_an_exclusion(router, text):
    assert plan(router, text, "CT").selection.get("WORD") == [1]


def test_a_group_followed_by_an_exclusion_only_is_the_request(router):
    # "OARs: parotids, brainstem" makes the group word a header; an exclusion after it does not.
    selection = plan(router, "all abdominal organs but the spleen", "CT").selection
    assert selection["WORD"] and 2 not in selection["WORD"]  # WORD: spleen = 2
    assert plan(router, "kidneys, but only the left", "CT").selection.get("WORD") == [3]


def test_t1_and_t2_together_are_two_sequences(router):
    assert parse.parse_request("T1 and T2 brain tumour").modality_hint == "MR"
    assert parse.parse_request("T1 to T2").targets[0].concept.index == frozenset({"T1", "T2"})


@pytest.mark.parametrize("text", ["the four heart chambers", "CT CARDIAC FUNCTION - chambers and LV myocardium"])
def test_a_group_stays_in_its_region(router, text):
    # The heart's chambers are ventricles and atria, never the brain's ventricle
    # (TotalSegmentator brain_structures: ventricle = 10).
    selection = plan(router, text, "CT", collection=None).selection
    assert "TotalSegmentator_brain_structures" not in selection
    assert selection["MM-WHS"][:4] in ([1, 2, 3, 4], [2, 3, 4, 5])


def test_a_description_is_read_by_its_definition(router):
    # A structure described, not named: the encoder compares the phrase with the lexicon's
    # plain-language definitions (docs/routing.md, "Descriptions").
    p = plan(router, "the cord of nerves that runs inside my backbone", "CT", collection=None)
    assert p.selection.get("TotalSegmentator_v2") == [79]  # spinal cord
    assert any(str(e.get("method", "")).startswith("description:") for e in p.explain), p.explain


@pytest.mark.parametrize(
    "text, dataset, labels",
    [
        # a concept's other descriptions (lexicon `descriptions`) are compared like its definition,
        # counting DESCRIPTION_HANDICAP less
        ("the lymph glands in the centre of my chest", "LNQ2023", ["mediastinal lymph nodes"]),
        (
            "the big flat muscles on my back below the armpits",
            "TotalSegmentator_abdominal_muscles",
            ["latissimus_dorsi_right", "latissimus_dorsi_left"],
        ),
        (
            "the soft floppy part at the back of the roof of her mouth",
            "TotalSegmentator_head_glands_cavities",
            ["soft_palate"],
        ),
        # "the organ ..." with a clause describes one organ; "abdominal organs" stay the group
        (
            "the organ under his left ribs that swelled up when he had glandular fever",
            "TotalSegmentator_v2",
            ["spleen"],
        ),
        # ... but a description of something else where a structure is stays no description of it
        ("the cobalt screws in the lower jaw", "TotalSegmentator_v2", []),
        ("the big muscle at the back of my thigh", "TotalSegmentator_thigh_shoulder_muscles", []),
    ],
)
def test_a_description_is_read_by_any_of_its_concepts_descriptions(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    "text",
    [
        "the tube I pee through",  # the urethra: defined, but no dataset segments it
        "the big muscle at the back of my thigh",  # two definitions too close to choose
        "please do the usual for this patient",  # no description of anything
    ],
)
def test_a_description_of_nothing_covered_selects_nothing(router, text):
    assert plan(router, text, "CT", collection=None).selection == {}


def test_gtv_primary_and_nodal_are_both_tumour_volumes(router):
    assert plan(router, "GTV primary and nodal", "PT+CT", collection=None).selection == {"HECKTOR2022": [1, 2]}
    assert plan(router, "tongue piercing", "CT", collection=None).selection == {}  # a noun in -ing stays


@pytest.mark.parametrize(
    "text, dataset, values",
    [
        # a header's side goes to the targets below it that have sides (WORD: femur head L 15, R 16)
        ("CT HIP RT - FEMORAL HEAD", "WORD", [16]),
        ("CT HIP RT - FEMORAL HEAD, BLADDER", "WORD", [14, 16]),
        ("CT PELVIS LT - FEMORAL HEADS", "WORD", [15]),
        ("CT PELVIS - FEMORAL HEADS", "WORD", [15, 16]),
        # "RT" before planning words is radiotherapy, not the right side
        ("CT CHEST W - BREAST (RT PLAN)", "TotalSegmentator_breasts", [1]),
        # "T1" listed with other levels is a vertebra (TotalSegmentator: C5 46, C6 45, C7 44, T1 43)
        ("C5, C6, C7 and T1", "TotalSegmentator_v2", [43, 44, 45, 46]),
        # every exclusion of a list counts, not only the first (WORD: liver 1, spleen 2, R 4, L 3)
        ("right kidney; not the left kidney, not the liver, not the spleen", "WORD", [4]),
        ("the whole lumbar spine but L5", "TotalSegmentator_v2", [28, 29, 30, 31]),
        # a header's organ less what the body excludes
        ("MR LIVER - LESIONS NOT WANTED", "LiTS", [1]),
        # discourse, not a series: no first segment of the liver
        ("First the liver. Then the spleen.", "WORD", [1, 2]),
        ("first three right ribs", "TotalSegmentator_v2", [93, 106, 107]),
        # anatomists' abbreviations and Latin sides
        ("renal v.", "renalStructures_CECT_segmentation", [2]),
        ("sup. mesenteric a.", "TotalSegmentator_renal_arteries", [2]),
        ("clavicula dextra", "TotalSegmentator_v2", [74]),
        # words that carry one structure on into the next make a list (TotalSegmentator: aorta 52,
        # common iliac arteries 65 and 66)
        ("aorta down through both CIAs", "TotalSegmentator_v2", [52, 65, 66]),
        ("The sternum needs doing. Costal cartilages too.", "TotalSegmentator_v2", [116, 117]),
        ("caudate lobe of the liver", "TotalSegmentator_liver_segments", [1]),  # Couinaud I
        ("rt glut med", "TotalSegmentator_v2", [83]),  # gluteus medius right
        ("my son broke his right collarbone playing rugby", "TotalSegmentator_v2", [74]),
    ],
)
def test_readings_of_rounds_thirteen_and_fourteen(router, text, dataset, values):
    # Over the whole registry; each row is one mechanism (docs/routing.md, rounds 13 and 14).
    assert plan(router, text, "CT", collection=None).selection.get(dataset) == values


@pytest.mark.parametrize(
    "text, dataset, values",
    [
        # a letter beside a slash is shorthand, not a side: both lungs' lobes (TotalSegmentator 10-14)
        ("CT CHEST R/O PE - LUNGS", "TotalSegmentator_v2", [10, 11, 12, 13, 14]),
        # a full side word before a full stop ends the sentence; it is not an abbreviation's dot
        ("liver and left. kidneys too", "WORD", [1, 3, 4]),
        # a class letter after "type" is no artery: the aorta, without the dissection
        ("aortic dissection type A. aorta please", "TotalSegmentator_v2", [52]),
        # "drop" excludes only where a clause opens; "drop metastases" is a finding
        ("liver and spleen; drop metastases", "WORD", [1, 2]),
        ("liver and spleen; remove the spleen", "WORD", [1]),
        ("liver, don\u2019t do the spleen", "WORD", [1]),  # a typographic apostrophe
        # an extent word inside a relative clause describes; it makes no list (WORD: oesophagus 7)
        ("the pipe that carries food down to the stomach", "WORD", [7]),
        # "S7" beside the liver is a Couinaud segment, not a sacral level
        ("liver S7 and S8", "TotalSegmentator_liver_segments", [7, 8]),
        ("Couinaud S4a", "TotalSegmentator_liver_segments", [4]),
    ],
)
def test_shorthand_that_is_not_what_it_looks_like(router, text, dataset, values):
    assert plan(router, text, "CT", collection=None).selection.get(dataset) == values


def test_a_couinaud_segment_beside_t2_leaves_t2_a_sequence():
    assert parse.parse_request("Couinaud S7 on T2").modality_hint == "MR:T2"


@pytest.mark.parametrize(
    "text, dataset, values",
    [
        # an exclusion lasts until a colon or a dash, as until a comma (WORD: liver 1, spleen 2, kidneys 3 4)
        ("leave the kidneys out: liver and spleen", "WORD", [1, 2]),
        ("Not the left kidney - just the right one.", "WORD", [4]),
        ("SCMs but none of the scalenes", "TotalSegmentator_headneck_muscles", [1, 2]),
        # an exclusion only the encoder read removes nothing the lexicon read (TotalSegmentator:
        # portal and splenic vein 64, which is also the hepatic veins' nearest term)
        ("portal vein (not the hepatic veins)", "TotalSegmentator_v2", [64]),
        # arrows separate a worklist's parts (C1-C7: TotalSegmentator 44-50)
        ("72125 CT C-SPINE W/O CONTRAST>>LEVELS C1-C7", "TotalSegmentator_v2", [44, 45, 46, 47, 48, 49, 50]),
        # contrast phases say when, not what
        ("Abdomen_Liver_Triphase / segment IV volume", "TotalSegmentator_liver_segments", [4]),
        # an enlargement named by its combining form is the organ's volume
        ("CT ABD W - HEPATOMEGALY/SPLENOMEGALY VOLS", "WORD", [1, 2]),
        ("hepatosplenomegaly", "TotalSegmentator_v2", [1, 5]),
        # groups of the lexicon: the forearm's bones, the brain's lobes
        ("the two forearm bones and the carpus", "TotalSegmentator_appendicular_bones", [7, 8, 9]),
        ("all four lobes of the cerebrum", "TotalSegmentator_brain_structures", [12, 13, 14, 15]),
        # an adjective describes the structure to segment
        ("fractured left femur", "TotalSegmentator_v2", [75]),
    ],
)
def test_readings_of_round_fifteen(router, text, dataset, values):
    # Over the whole registry; each row is one mechanism (docs/routing.md, round 15).
    assert plan(router, text, "CT", collection=None).selection.get(dataset) == values


@pytest.mark.parametrize("text", ["breast implants", "rib fractures", "the break in my arm bone"])
def test_a_phrase_the_lexicon_knows_whole_is_not_split_into_covered_parts(router, text):
    # "breast implants" is neither the breast nor the hip implant; a fracture is a finding no
    # dataset segments: each is refused by name.
    p = plan(router, text, "CT", collection=None)
    assert p.selection == {}, p.selection
    assert [u.kind.value for u in p.unmatched] == ["not_covered"]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Please burn my liver CT onto a disc for a second opinion.", "'burn' asks for another task"),
        ("Anonymise the pancreas study before the trial upload.", "'anonymise' asks for another task"),
        ("Fuse the PET with the MR of the prostate.", "'fuse' asks for another task"),
        # withdrawn, whatever it names
        ("Cancel the spleen segmentation - patient declined the study.", "'cancel' withdraws the request"),
        # a result that exists, beside a segmentation word too
        ("Re-send the liver SEG to PACS, the first one never arrived.", "'resend' asks for another task"),
        ("Please review the kidney contours and approve them.", "'approve' asks for another task"),
        ("No segmentation: consent for AI processing was withdrawn (pancreas).", "'consent' withdraws the request"),
        ("Who contoured the parotids?", "'who' asks a question"),
    ],
)
def test_a_request_for_another_task_is_refused_as_one(router, text, reason):
    p = plan(router, text, "CT", collection=None)
    assert p.selection == {}
    assert [(u.kind, u.reason) for u in p.unmatched] == [
        (UnmatchedKind.NOT_SEGMENTATION, f"not a segmentation request: {reason}")
    ]


def test_a_segmentation_word_keeps_a_request_with_another_task_word_a_segmentation(router):
    assert parse.parse_request("segment the liver and export the mask").other_task is None
    assert parse.parse_request("C3-C7 for the fusion").other_task is None  # spinal fusion is surgery
    assert plan(router, "liver and spleen, then send the masks to PACS", "CT").selection.get("WORD") == [1, 2]


@pytest.mark.parametrize("text", ["aorta on the angiogram", "cath lab coronary angiogram: the coronaries"])
def test_catheter_angiography_is_a_modality_no_dataset_accepts(router, text):
    p = plan(router, text, None, collection=None)
    assert p.modality == "XA" and p.selection == {}
    assert parse.parse_request("coronary CT angiogram").modality_hint == "CT"


@pytest.mark.parametrize(
    "text, values",
    [
        # TotalSegmentator tissue_4_types: subcutaneous 1, torso (visceral) 2, skeletal muscle 3, intermuscular 4
        ("SAT/VAT", [1, 2]),
        ("subcutaneous fat, visceral fat and skeletal muscle", [1, 2, 3]),
        ("IMAT", [4]),
    ],
)
def test_body_composition_compartments(router, text, values):
    assert plan(router, text, "CT", collection=None).selection.get("TotalSegmentator_tissue_4_types") == values


@pytest.mark.parametrize(
    "text, dataset, values",
    [
        # an order form's check boxes (WORD: liver 1, spleen 2)
        ("[x] Liver [x] Spleen [ ] Kidneys [ ] Pancreas", "WORD", [1, 2]),
        # a drop-down's arrow is no Couinaud segment V (TotalSegmentator: sacrum 25, hips 77 78)
        ("Body part: Pelvis v ; Structures v : Hip bone L, Hip bone R, Sacrum", "TotalSegmentator_v2", [25, 77, 78]),
        # "VS" alone or before what is measured is a vestibular schwannoma
        ("MR IAMS W/WO GAD - VS VOLUME", "CrossMoDA2023", [1, 2]),
        ("Gluteal muscles excl. minimus", "TotalSegmentator_v2", [80, 81, 82, 83]),
        # a nodule no organ is named for is the lung's
        ("nodules and any pleural effusion", "TotalSegmentator_lung_nodules", [2]),
        # numbers that go on a numbered series end it (TotalSegmentator: liver 5, right ribs 9, 10: 112, 113)
        ("R ribs 9+10 and liver", "TotalSegmentator_v2", [5, 112, 113]),
        # beside ribs, L and R are sides (left ribs 5-8: 98-101); a side before numbered items holds
        ("ribs L5-8", "TotalSegmentator_v2", [98, 99, 100, 101]),
        ("?# sternum and L 4th/5th ribs", "TotalSegmentator_v2", [97, 98, 116]),
        # an item closed by "not" is an exclusion; "this time" orders nothing
        ("Only the right kidney, the left one not.", "WORD", [4]),
        ("Last time both kidneys were done; this time the right one is not needed.", "WORD", [3]),
        ("el four and el five", "TotalSegmentator_v2", [27, 28]),  # dictated levels
    ],
)
def test_readings_of_round_fifteen_order_forms_and_shorthand(router, text, dataset, values):
    selection = plan(router, text, "MR:T1C" if "IAMS" in text else "CT", collection=None).selection
    assert selection.get(dataset) == values


def test_an_unplaced_nodule_is_the_lungs_but_a_placed_one_is_its_organs(router):
    assert plan(router, "nodules", "CT", collection=None).selection == {"TotalSegmentator_lung_nodules": [2]}
    assert plan(router, "thyroid nodule", "CT", collection=None).selection == {}


@pytest.mark.parametrize(
    "text, dataset, values",
    [
        ("ok computer segment aorta comma inferior vena cava full stop", "TotalSegmentator_v2", [52, 63]),
        ("Ta for this - GB, liver and pancreas when you get a chance this arvo.", "TotalSegmentator_v2", [4, 5, 7]),
        ("CT LARYNX - HYOID + THYROID CART", "TotalSegmentator_headneck_bones_vessels", [2, 3]),
        # a lesion of an organ's part is the organ's lesion where no dataset segments the part's
        ("CT CHEST W/O (71250) - NODULE F/U RUL", "TotalSegmentator_lung_nodules", [2]),
        ("CT RENAL MASS (4-PHASE) - MASS CHARACTERISATION/SEG", "KiTS23", [2, 3]),
        ("All the left ribs bar the first.", "TotalSegmentator_v2", list(range(95, 106))),
        ("solid organs - liver, spleen, kidneys - spleen not needed", "WORD", [1, 3, 4]),
        # an indication ends at a colon: the list after it is the request
        ("Abductor weakness after THR: gluteus medius and minimus", "TotalSegmentator_v2", [82, 83, 84, 85]),
        ("the dental crowns", "TotalSegmentator_teeth", [9]),
        ("the dental bridge", "TotalSegmentator_teeth", [8]),
    ],
)
def test_readings_of_round_fifteen_dictation_and_worklists(router, text, dataset, values):
    assert plan(router, text, "CT", collection=None).selection.get(dataset) == values


def test_rt_in_a_simulation_header_is_radiotherapy_not_the_right_side(router):
    p = plan(router, "CT SIM H&N RT - OARS: PAROTIDS, CORD, BRAINSTEM", "CT", collection=None)
    assert p.selection["TotalSegmentator_head_glands_cavities"] == [7, 8]  # both parotids


@pytest.mark.parametrize(
    "text, dataset, values",
    [
        # a routing rule's condition matches studies; its action, when it names a structure, is the request
        ("Mirth route seg-renal: OBR-4 contains 'RT KIDNEY' -> task = segment right kidney", "WORD", [4]),
        ("Lua: if string.find(tags.StudyDescription, 'SPLEEN') then SendToModality(id, 'AISEG') end", "WORD", [2]),
        # a procedure the study is for is no target, though it names a tooth
        ("right mandibular canal, for the wisdom tooth extraction", "TotalSegmentator_teeth", [4]),
    ],
)
def test_routing_rules_and_purposes(router, text, dataset, values):
    assert plan(router, text, "CT", collection=None).selection.get(dataset) == values


@pytest.mark.parametrize(
    "text, dataset, values",
    [
        # "for" after words that name nothing introduces the object, not a purpose (WORD: liver 1, spleen 2)
        ("Reporting registrar asks for liver, spleen and both kidneys", "WORD", [1, 2, 3, 4]),
        ("we would be grateful for volumes of the left kidney and of the bladder", "WORD", [3, 14]),
        (
            "colour the frontal, parietal, temporal and occipital lobes",
            "TotalSegmentator_brain_structures",
            [12, 13, 14, 15],
        ),
    ],
)
def test_readings_of_round_sixteen(router, text, dataset, values):
    assert plan(router, text, "CT", collection=None).selection.get(dataset) == values


def test_an_organs_adjective_before_a_class_nouns_item_takes_the_noun(router):
    # "femoral and popliteal arteries" are two arteries no dataset segments, not the femur.
    p = plan(router, "femoral and popliteal arteries for the bypass", "CT", collection=None)
    assert p.selection == {}
    assert [u.target for u in p.unmatched] == ["femoral arteries", "popliteal arteries"]


@pytest.mark.parametrize(
    "text, dataset, values",
    [
        # found in review of round fifteen: each was read wrongly by a new rule
        ("Segment the abdominal organs, excluding: spleen", "WORD", [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]),
        ("CT CHEST W MIP - LUNG NODULES", "TotalSegmentator_lung_nodules", [2]),  # a reformat in a header
        ("liver and spleen, send results to PACS", "WORD", [1, 2]),  # delivery is no other task
        ("I'd like the liver, then the spleen", "WORD", [1, 2]),  # "like ... then" is no routing rule
        ("post nephrectomy: right kidney", "WORD", [4]),  # a purpose ends at a colon
        ("liver, spleen and kidneys, you can ignore the kidneys", "WORD", [1, 2]),
        ("CT LIVER - nodules", "LiTS", [2]),  # the header's organ before the lung's default
        ("Liver [x] Spleen [ ] Kidneys [x]", "WORD", [1, 3, 4]),  # boxes after their items
        ("is the spleen enlarged or not", "WORD", [2]),
        ("CT ABDO RT KIDNEY PARTIAL NEPHRECTOMY PLANNING - kidney and tumour", "WORD", [4]),
        ("liver segments IV and V; spleen", "TotalSegmentator_liver_segments", [4, 5]),
        ("Segment the liver lesion to be resected", "LiTS", [2]),
        ("L1 and 12th ribs", "TotalSegmentator_v2", [31, 105, 115]),  # L1 stays a vertebra
    ],
)
def test_readings_the_review_of_round_fifteen_found_wrong(router, text, dataset, values):
    assert plan(router, text, "CT", collection=None).selection.get(dataset) == values


@pytest.mark.parametrize(
    "text, dataset, never",
    [
        ("liver mets, FH", "WORD", {15, 16}),  # FH is family history, not the femoral heads
        ("left femur (AO 32-A)", "TotalSegmentator_v2", {52}),  # AO is a fracture class, not the aorta
        ("VATS planning: right upper lobe", "TotalSegmentator_tissue_4_types", {2}),  # an operation, not VAT
    ],
)
def test_order_entry_shorthand_that_is_no_structure(router, text, dataset, never):
    assert not set(plan(router, text, "CT", collection=None).selection.get(dataset, [])) & never


def test_versus_a_prior_is_no_vestibular_schwannoma(router):
    assert "CrossMoDA2023" not in plan(router, "MR brain - tumour volume (vs. prior)", "MR:T1C").selection
    assert parse.parse_request("cochlea and round window").other_task is None


def _values(router, dataset: str, *labels: str) -> list[int]:
    return sorted(v for name in labels for v in router.registry[dataset].label_values(name))


@pytest.mark.parametrize(
    "text, dataset, labels",
    [
        # a word that names a structure only with the next item's noun takes that noun
        (
            "the thyroid and cricoid cartilages",
            "TotalSegmentator_headneck_bones_vessels",
            ["thyroid_cartilage", "cricoid_cartilage"],
        ),
        # ... but a lesion takes none, and two names of one structure stay two items
        (
            "kidney and renal cysts",
            "TotalSegmentator_total_v3",
            ["kidney_right", "kidney_left", "kidney_cyst_left", "kidney_cyst_right"],
        ),
        ("lungs and pulmonary arteries", "TotalSegmentator_lung_nodules", ["lung"]),
        # exclusions written as "with the exception of", "out", "we do not need"
        (
            "Couinaud 1 to 4 with the exception of segment 1",
            "TotalSegmentator_liver_segments",
            ["liver_segment_2", "liver_segment_3", "liver_segment_4"],
        ),
        ("cerebellum and brainstem, fourth ventricle out", "TotalSegmentator_ventricle_parts", []),
        (
            "cerebellum and brainstem, fourth ventricle out",
            "TotalSegmentator_brain_structures",
            ["brainstem", "cerebellum"],
        ),
        ("Only the nodules please, the lung itself we do not need.", "TotalSegmentator_lung_nodules", ["lung_nodules"]),
        ("Thyroid please; disregard the parathyroids.", "TotalSegmentator_total_v3", ["thyroid_gland"]),
        # a numbered segment beside the liver is a Couinaud segment, not the command "segment"
        (
            "Segment the liver, segments 5 to 8 and the hepatic vessels.",
            "TotalSegmentator_liver_segments",
            ["liver_segment_5", "liver_segment_6", "liver_segment_7", "liver_segment_8"],
        ),
        ('Template "Upper abdo organs" = liver; spleen', "WORD", ["liver", "spleen"]),
        # a bare lesion before the one organ named is that organ's
        ("Segment the mass and the left kidney", "LiTS", []),
        ("Segment the mass and the left kidney", "renalStructures_CECT_segmentation", ["renal_neoplasm"]),
    ],
)
def test_readings_of_round_seventeen(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


def test_disregard_that_is_still_a_correction(router):
    assert (
        "spleen_ct_segmentation" in plan(router, "liver. disregard that, the spleen", "CT", collection=None).selection
    )
    assert plan(router, "spleen please. disregard, wrong patient", "CT", collection=None).selection == {}


@pytest.mark.parametrize(
    "text, dataset, labels",
    [
        # items without commas
        (
            "the eyes the lenses and the optic nerves",
            "TotalSegmentator_oculomotor_muscles",
            ["eyeball_right", "eyeball_left", "optic_nerve_left", "optic_nerve_right"],
        ),
        ("left masseter left temporalis", "TotalSegmentator_head_muscles", ["masseter_left", "temporalis_left"]),
        # a side before the first numbered item holds for the series; "L and R" is both sides
        (
            "spleen plus left 9th, 10th and 11th ribs",
            "TotalSegmentator_v2",
            ["spleen", "rib_left_9", "rib_left_10", "rib_left_11"],
        ),
        ("optic nerves L and R", "TotalSegmentator_head_glands_cavities", ["optic_nerve_left", "optic_nerve_right"]),
        (
            "Right side ribs except number 11 and number 12",
            "TotalSegmentator_v2",
            [f"rib_right_{n}" for n in range(1, 11)],
        ),
        # "cord" alone is the spinal cord, not a vocal cord
        ("parotids both sides and the cord", "SegRap2023_Task1", ["Parotid_L", "Parotid_R", "SpinalCord"]),
        # an HL7 field's one-letter code is no side
        ("NTE|1|L|Please seg spleen", "TotalSegmentator_v2", ["spleen"]),
        # context readings
        (
            "?AAA leak. Seg aorta + both iliacs stat.",
            "TotalSegmentator_v2",
            ["aorta", "iliac_artery_left", "iliac_artery_right"],
        ),
        ("aorta and both iliac veins", "TotalSegmentator_v2", ["aorta", "iliac_vena_left", "iliac_vena_right"]),
        ("CT TAVI PLANNING - ANNULUS", "TotalSegmentator_aorta_annulus", ["annulus_proper"]),
        (
            "CT SINUS LTD - MAXILLARY + FRONTAL",
            "TotalSegmentator_craniofacial_structures",
            ["sinus_maxillary", "sinus_frontal"],
        ),
        ("CT SINUS LTD - MAXILLARY + FRONTAL", "TotalSegmentator_brain_structures", []),
        ("frontal lobe and frontal sinus", "TotalSegmentator_brain_structures", ["frontal_lobe"]),
        (
            "arch vessels: innominate, both subclavians",
            "TotalSegmentator_v2",
            ["brachiocephalic_trunk", "subclavian_artery_left", "subclavian_artery_right"],
        ),
        # a description of an organ is no group of organs
        ("the organ that makes insulin, I'm diabetic", "TotalSegmentator_v2", ["pancreas"]),
        # a plan's site opening the request is context
        (
            "Oropharynx plan, OARs: left parotid, oral cavity",
            "SegRap2023_Task1",
            ["OralCavity", "Parotid_L"],
        ),
        (
            "Oropharynx plan, OARs: left parotid, oral cavity",
            "TotalSegmentator_head_glands_cavities",
            ["parotid_gland_left"],
        ),
        (
            "Please delineate both parotid glands for the radiotherapy plan.",
            "SegRap2023_Task1",
            ["Parotid_L", "Parotid_R"],
        ),
        # a DICOM attribute's tag and keyword name the form
        ("(0040,0254) PerformedProcedureStepDescription: MR PROSTATE - WHOLE GLAND", "Prostate_T2", ["prostate"]),
    ],
)
def test_readings_of_round_eighteen(router, text, dataset, labels):
    modality = "MR:T2" if dataset == "Prostate_T2" else "CT"
    got = plan(router, text, modality, collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    "text, dataset, labels",
    [
        # a relative clause after a structure's name says something about it
        ("the breast bone where they opened my chest", "TotalSegmentator_v2", ["sternum"]),
        ("the nerve cable that runs down inside my spine", "TotalSegmentator_v2", ["spinal_cord"]),
        # ... while a description keeps its clause: no structure is named before "that"
        ("the bag under the liver that stores bile", "TotalSegmentator_v2", ["gallbladder"]),
        # a label's name written as one word; a word that reads as nothing takes no head noun
        (
            "Laryngectomy flap planning: sternothyroid and thyrohyoid muscles",
            "TotalSegmentator_headneck_muscles",
            ["sterno_thyroid_left", "sterno_thyroid_right", "thyrohyoid_left", "thyrohyoid_right"],
        ),
        ("Laryngectomy flap planning: sternothyroid and thyrohyoid muscles", "TotalSegmentator_v2", []),
        # ... but only when every part is a word of that name ("tailbone" is no tail of a bone)
        ("my tailbone", "TotalSegmentator_v2", []),
        # who asks is no structure: no spinal cord for "Spinal surgeons"
        (
            "Spinal surgeons: L4, L5 and the sacrum for pedicle screw planning.",
            "TotalSegmentator_v2",
            ["sacrum", "vertebrae_L4", "vertebrae_L5"],
        ),
        # a class noun under a one-structure worklist header is that structure's
        ("CT TMJS BILAT (OPEN/CLOSED) - JOINTS", "SegRap2023_Task1", ["TMjoint_L", "TMjoint_R"]),
        ("CT LIVER - VESSELS", "TotalSegmentator_liver_vessels", ["liver_vessels"]),
        # an excluded pronoun excludes what the item before it names
        ("liver and spleen, the spleen was removed so skip it", "TotalSegmentator_v2", ["liver"]),
        (
            "Pancreas only; the cyst is being followed in another study, leave it out.",
            "pancreas_ct_dints_segmentation",
            ["pancreas"],
        ),
        # words of time are no anatomy ("months" is not "mouth", "last" not "lat") ...
        (
            "True and false lumen volumes every 6 months",
            "TotalSegmentator_aortic_dissection",
            ["aorta_true_lumen", "aorta_false_lumen"],
        ),
        (
            "frontal and temporal lobes - the temporal ones were done last week, drop them",
            "TotalSegmentator_brain_structures",
            ["frontal_lobe"],
        ),
        # ... while "the last" of a series is its final member
        ("the last lumbar vertebra", "TotalSegmentator_v2", ["vertebrae_L5"]),
        ("my lowest rib on the left", "TotalSegmentator_v2", ["rib_left_12"]),
        # "muscle" beside the fat compartments is the skeletal muscle tissue
        (
            "CT ABDOMEN SARCOPENIA - MUSCLE + SUBCUT FAT",
            "TotalSegmentator_tissue_types",
            ["subcutaneous_fat", "skeletal_muscle"],
        ),
        # the grammar's generic nouns are words: "component" does not doubt "THA"
        ("THA component", "TotalSegmentator_hip_implant", ["hip_implant"]),
        # "X with Y excluded" excludes Y only
        ("Liver volumetry with the tumour excluded from the volume", "LiTS", ["liver"]),
        # booking, scheduling and questions about people ask for another task
        ("Book a follow-up CT of the liver in 6 months.", "TotalSegmentator_v2", []),
        ("Who reported the CT of his liver?", "TotalSegmentator_v2", []),
        # clinical and radiotherapy shorthand, with and without a side (lexicon data)
        ("seg LIJV", "TotalSegmentator_headneck_bones_vessels", ["internal_jugular_vein_left"]),
        ("LK please", "TotalSegmentator_v2", ["kidney_left"]),
        ("NPx, OPx, HPx", "TotalSegmentator_head_glands_cavities", ["nasopharynx", "oropharynx", "hypopharynx"]),
        (
            "EO and IO both sides",
            "TotalSegmentator_abdominal_muscles",
            ["external_oblique_left", "external_oblique_right", "internal_oblique_left", "internal_oblique_right"],
        ),
        ("Segment PDAC.", "pancreas_ct_dints_segmentation", ["pancreatic_tumor"]),
        # a long misspelt word is checked as the grammar corrected it, a short one as written
        ("galbladder plz", "TotalSegmentator_v2", ["gallbladder"]),
        ("(0040,0007) SPS Desc: CT CHEST ROUTINE", "TotalSegmentator_vertebrae_body", []),
        # "inside" places a structure like "under" does; a lay name of the trachea
        ("team want the nerve cord inside his spine outlined", "TotalSegmentator_v2", ["spinal_cord"]),
        ("the air pipe in his neck being squashed - please outline it", "TotalSegmentator_v2", ["trachea"]),
        # a purpose written first ends where the request begins
        (
            "For the prosthesis planning we want femur left, femur right",
            "TotalSegmentator_v2",
            ["femur_left", "femur_right"],
        ),
        # "sx" (sinister) is the left side
        ("Parotid sx, for the radiotherapy.", "TotalSegmentator_head_glands_cavities", ["parotid_gland_left"]),
        # "epigastric" is a place, not the digastric muscle
        ("Epigastric pain: please show the gallbladder and pancreas", "TotalSegmentator_head_muscles", []),
        # "no need" closes an item as "not needed" does; "keep" is a request word
        ("Left adrenal please, the right adrenal is normal no need.", "TotalSegmentator_v2", ["adrenal_gland_left"]),
        ("remove kidneys; keep liver, spleen.", "TotalSegmentator_v2", ["liver", "spleen"]),
        # what is measured on a structure, a fracture's shorthand, a RIS code: no structure
        ("CT CHEST WO 71250 RT RIBS 4-6 FX", "TotalSegmentator_v2", ["rib_right_4", "rib_right_5", "rib_right_6"]),
        ("CT LEFT THIGH WO CONTRAST - FEMUR LENGTH AND ROTATION", "TotalSegmentator_v2", ["femur_left"]),
        # context readings: PVs beside the left atrium, a prosthesis in a hip study
        ("PA + PVs", "TotalSegmentator_lung_vessels", ["lung_arteries", "lung_veins"]),
        ("CT HIP MARS - prosthesis", "TotalSegmentator_hip_implant", ["hip_implant"]),
        # a form's item numbers are no segment numbers
        ("CRF item 14 (organs for volume): [1] spleen [2] liver", "TotalSegmentator_liver_segments", []),
        ("1) liver 2) spleen", "TotalSegmentator_v2", ["liver", "spleen"]),
        # deleting a segmentation, a question why, vetting, translating: other tasks
        ("Please delete the liver segmentation sent in error - wrong patient.", "TotalSegmentator_v2", []),
        ("Why did the kidney segmentation job fail last night?", "TotalSegmentator_v2", []),
        ("Kindly translate the kidney CT report into Arabic.", "TotalSegmentator_v2", []),
        # sides in French and Spanish
        ("The adrenal gland, right side (droite), please.", "TotalSegmentator_v2", ["adrenal_gland_right"]),
        ("Humerus izquierdo - the left humerus please.", "TotalSegmentator_v2", ["humerus_left"]),
        # a later "the cyst" is the cyst named before, with its side
        (
            "Cyst on the left kidney getting bigger - they want the cyst measured.",
            "TotalSegmentator_kidney_cysts",
            ["kidney_cyst_left"],
        ),
        # review: a structure for or to a requester stays; a lesion in a relative clause is the
        # structure's; a form's "Why:" field is no question
        ("liver for the surgeon", "TotalSegmentator_v2", ["liver"]),
        ("the kidney that has the cyst", "TotalSegmentator_v2", ["kidney_cyst_left", "kidney_cyst_right"]),
        ("Why: staging. Segment liver and spleen", "TotalSegmentator_v2", ["liver", "spleen"]),
        # an anatomical word is not another's typo ("abductor" is not "adductor")
        ("Abductor insufficiency: gluteus medius and minimus", "TotalSegmentator_thigh_shoulder_muscles", []),
    ],
)
def test_readings_of_rounds_nineteen_and_twenty(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    "text, dataset, labels",
    [
        # a faxed referral's letters read as digits ("1" for I or l, "0" for O)
        ("CT ABDO: SPLEEN AND L1VER", "TotalSegmentator_v2", ["spleen", "liver"]),
        ("gal1bladder please", "TotalSegmentator_v2", ["gallbladder"]),
        ("0esophagus", "TotalSegmentator_v2", ["esophagus"]),
        ("T12 and L1 vertebrae", "TotalSegmentator_v2", ["vertebrae_L1", "vertebrae_T12"]),
        # the plural of a misspelt name; an English plural is no typo of a structure
        ("both pattellas", "TotalSegmentator_appendicular_bones", ["patella"]),
        ("psoas muscles. Cheers", "TotalSegmentator_headneck_bones_vessels", []),
        # a DICOM UID is no list of indices; the node that a routing rule names is no lymph node
        ("series 1.2.840.113619.2.55; targets=left kidney", "TotalSegmentator_v2", ["kidney_left"]),
        ("route to seg-node: spleen", "LNQ2023", []),
        # an eye's own sides, only beside a word of the eye; "dextral"; a comparison of the sides
        ("globe OS", "TotalSegmentator_head_glands_cavities", ["eye_left"]),
        ("optic nerve OD", "TotalSegmentator_head_glands_cavities", ["optic_nerve_right"]),
        ("os coxae", "TotalSegmentator_v2", ["hip_left", "hip_right"]),
        ("kidney (sinistral)", "TotalSegmentator_v2", ["kidney_left"]),
        ("left optic nerve (swelling L>R)", "TotalSegmentator_head_glands_cavities", ["optic_nerve_left"]),
        # the patient's side, not the image's; a side described, then named
        ("adrenal on the screen's right (patient's left)", "TotalSegmentator_v2", ["adrenal_gland_left"]),
        ("the femur on the operated side (left)", "TotalSegmentator_v2", ["femur_left"]),
        ("L hemipelvis", "TotalSegmentator_v2", ["hip_left"]),
        # a form's side field gives the side of its organ
        ("Laterality: RIGHT | Organ: ADRENAL", "TotalSegmentator_v2", ["adrenal_gland_right"]),
        # worklist and report shorthand (lexicon data)
        (
            "pl eff and pericard eff",
            "TotalSegmentator_pleural_pericard_effusion",
            ["pleural_effusion", "pericardial_effusion"],
        ),
        ("A_Brachioceph", "TotalSegmentator_v2", ["brachiocephalic_trunk"]),
        ("sICH", "TotalSegmentator_cerebral_bleed", ["intracerebral_hemorrhage"]),
        ("FEM x2", "TotalSegmentator_v2", ["femur_left", "femur_right"]),
        # Latin names and synonyms (lexicon data)
        ("glandula suprarenalis dextra", "TotalSegmentator_v2", ["adrenal_gland_right"]),
        ("capita femorum", "WORD", ["femur left", "femur right"]),
    ],
)
def test_readings_of_round_twenty_one(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    "text, dataset, labels",
    [
        # work done before, and an organ that is gone, are exclusions
        ("Liver and spleen; the spleen was already segmented by the fellow.", "TotalSegmentator_v2", ["liver"]),
        (
            "Kidneys only (gallbladder and pancreas contoured by hand)",
            "TotalSegmentator_v2",
            ["kidney_right", "kidney_left"],
        ),
        ("Duodenum and stomach - stomach resected in 2021.", "TotalSegmentator_v2", ["duodenum"]),
        ("Kidneys, left only - the right one was taken out.", "TotalSegmentator_v2", ["kidney_left"]),
        ("the spleen was removed", "TotalSegmentator_v2", []),
        ("the spleen, to be removed next week", "TotalSegmentator_v2", ["spleen"]),
        # a struck item, a form's no, a list of non-targets, "don't bother with it"
        ("Liver, ~~Spleen~~, Pancreas", "TotalSegmentator_v2", ["liver", "pancreas"]),
        ("Liver: Yes | Spleen: No | Pancreas: n/a", "TotalSegmentator_v2", ["liver"]),
        ("Targets: aorta. Exclusions: IVC, portal vein.", "TotalSegmentator_v2", ["aorta"]),
        ("Aorta please. The IVC looks normal, don't bother with it.", "TotalSegmentator_v2", ["aorta"]),
        # under a one-structure header, the structure's own kind is the structure
        ("CT HUMERUS RT - BONE SEG", "TotalSegmentator_v2", ["humerus_right"]),
        # skull stripping is the brain's mask; "vv" the veins; a pericardial collection its effusion
        ("skull-strip the head CT", "TotalSegmentator_v2", ["brain"]),
        (
            "SVC and brachiocephalic vv",
            "TotalSegmentator_v2",
            ["superior_vena_cava", "brachiocephalic_vein_left", "brachiocephalic_vein_right"],
        ),
        ("pericardial collection", "TotalSegmentator_pleural_pericard_effusion", ["pericardial_effusion"]),
        # ventricles in a study of the head are the brain's, chambers beside the heart's parts the heart's
        ("VP shunt check: ventricles", "MM-WHS", []),
        ("VP shunt check: ventricles", "TotalSegmentator_brain_structures", ["ventricle"]),
        ("chambers and myocardium", "TotalSegmentator_brain_structures", []),
        (
            "hydrocephalus: 3rd and 4th ventricles",
            "TotalSegmentator_ventricle_parts",
            ["third_ventricle", "fourth_ventricle"],
        ),
        # spelt by ear two edits off; a tie that sound does not settle goes to the structure
        ("trakea", "TotalSegmentator_v2", ["trachea"]),
        ("left kindey", "TotalSegmentator_v2", ["kidney_left"]),
        ("live donor: left kidney", "TotalSegmentator_v2", ["kidney_left"]),
        ("Chest pain clinic: the coronary tree", "WORD", []),  # "clinic" is no "colonic"
        ("aotra and both maxillary antra", "TotalSegmentator_v2", ["aorta"]),  # a swap of neighbours wins the tie
        # an epidural is a procedure; roman segments "from V to VIII" in a liver or hepatectomy request
        ("Lumbar epidural L3 to L5", "TotalSegmentator_v2", ["vertebrae_L5", "vertebrae_L4", "vertebrae_L3"]),
        (
            "Left liver, segments from II to IV",
            "TotalSegmentator_liver_segments",
            ["liver_segment_2", "liver_segment_3", "liver_segment_4"],
        ),
        # dental notations: Palmer, Universal (when named), the arches; a sinus lift is a procedure
        (
            "CBCT: UL1 and LR8",
            "TotalSegmentator_teeth",
            ["upper_left_central_incisor_fdi21", "lower_right_third_molar_fdi48"],
        ),
        ("CBCT - tooth #30, Universal numbering", "TotalSegmentator_teeth", ["lower_right_first_molar_fdi46"]),
        ("CBCT: lower dental arch", "TotalSegmentator_craniofacial_structures", ["teeth_lower"]),
        ("CBCT for sinus lift: right maxillary sinus", "TotalSegmentator_aortic_sinuses", []),
        # synonyms and other languages' names (lexicon data)
        ("the lingual bone and the thyroid body", "TotalSegmentator_headneck_bones_vessels", ["hyoid"]),
        ("rotula and perone", "TotalSegmentator_appendicular_bones", ["patella", "fibula"]),
        # the review of round twenty-two: none of these loses its structure
        (
            "Segment the remaining lung after the right upper lobe was resected",
            "TotalSegmentator_v2",
            [
                "lung_upper_lobe_left",
                "lung_lower_lobe_left",
                "lung_upper_lobe_right",
                "lung_middle_lobe_right",
                "lung_lower_lobe_right",
            ],
        ),
        ("IRB approval obtained: segment the pancreas", "TotalSegmentator_v2", ["pancreas"]),
        (
            "Patient consented. Segment the liver; the old request was withdrawn",
            "TotalSegmentator_v2",
            ["liver"],
        ),
        ("Segment the prostate and bladder on the CBCT, fraction 12 of 20", "TotalSegmentator_teeth", []),
        (
            "CBCT: tooth #19 (Universal numbering), 2 mm margin",
            "TotalSegmentator_teeth",
            ["lower_left_first_molar_fdi36"],
        ),
        ("Exclusions: none, please segment the liver and spleen", "TotalSegmentator_v2", ["spleen", "liver"]),
        ("Cardiac CT: the ventricles; history of cerebral infarct", "TotalSegmentator_brain_structures", []),
        ("CTA head: the SCA aneurysm", "TotalSegmentator_v2", []),
        # series adjectives with no noun after them take the one before them
        (
            "left lung lobes - upper and lower. Right lung: n/a",
            "TotalSegmentator_v2",
            ["lung_upper_lobe_left", "lung_lower_lobe_left"],
        ),
    ],
)
def test_readings_of_round_twenty_two(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


def test_several_named_sequences_leave_out_a_model_of_another_sequence(router):
    # "ADC, DWI and FLAIR" make the modality MR; a T1-only model (ISLES22 ATLAS) cannot read them.
    result = plan(router, "the stroke lesions on ADC, DWI and FLAIR", None, collection=None)
    assert result.modality == "MR" and "ISLES22" in result.selection
    assert "ISLES22_ATLAS" not in result.selection
    stage = next(step for step in result.explain if step["stage"] == "modality")
    assert "the request names MR:ADC, MR:DWI, MR:FLAIR" in stage["dropped"]["ISLES22_ATLAS"]
    # a model of one of the sequences named stays
    assert "BraTS21" in plan(router, "brain tumour on T1 and FLAIR", None, collection=None).selection


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # a request of its own after a heading: the lesion is the reason, not the list's head noun
        (
            "Staging for a neuroendocrine tumour - please segment the pancreas, the liver and the adrenals.",
            "TotalSegmentator_v2",
            ["adrenal_gland_right", "adrenal_gland_left", "liver", "pancreas"],
        ),
        ("abdominal tumours - liver and pancreas", "TotalSegmentator_v2", []),
        # excluding the organ around a lesion keeps the lesion of a label holding both
        ("Right renal tumour only, not the kidney", "KiTS23", ["kidney tumor"]),
        ("Kidney masses only, the kidney itself not needed", "KiTS23", ["kidney masses"]),
        # the airway tree is the airways with the trachea, not the airway walls
        ("tracheobronchial tree", "TotalSegmentator_lung_vessels", ["lung_airways"]),
        ("CT AIRWAYS INSP/EXP - BRONCHIAL TREE", "TotalSegmentator_lung_vessels_LEGACY", ["lung_trachea_bronchia"]),
        ("bronchial walls", "TotalSegmentator_lung_vessels", ["lung_airways_wall"]),
        # a systemic artery of the airways is no lung artery
        ("bronchial artery embolisation planning", "TotalSegmentator_lung_vessels", []),
        # the sinuses of Valsalva are all three, the non-coronary one too
        (
            "CT TAVR PLANNING - ANNULUS AND SINUSES OF VALSALVA",
            "TotalSegmentator_aortic_sinuses",
            ["right_coronary_cusp", "left_coronary_cusp", "non_coronary_cusp"],
        ),
        ("left sinus of Valsalva", "TotalSegmentator_aortic_sinuses", ["left_coronary_cusp"]),
        # lay names (a lexicon term may hold a place: "water on the lungs")
        ("water on the lungs", "TotalSegmentator_pleural_pericard_effusion", ["pleural_effusion"]),
        ("glands on top of the kidneys", "WORD", ["adrenal"]),
        ("my cheek sinuses", "TotalSegmentator_craniofacial_structures", ["sinus_maxillary"]),
        (
            "my chewing muscles",
            "TotalSegmentator_head_muscles",
            [
                f"{m}_{side}"
                for m in ("masseter", "temporalis", "lateral_pterygoid", "medial_pterygoid")
                for side in ("left", "right")
            ],
        ),
        # request verbs and list words are no structure; "the two kidneys" are both
        ("Surgeons asking for stomach and colon", "TotalSegmentator_v2", ["stomach", "colon"]),
        (
            "cardiac profile should also include myocardium - full list LV RV",
            "TotalSegmentator_heartchambers_highres",
            ["heart_myocardium", "heart_ventricle_left", "heart_ventricle_right"],
        ),
        ("Segmentation of the two kidneys", "TotalSegmentator_v2", ["kidney_right", "kidney_left"]),
        # a bowel's loops are the bowel; lexicon names of deep-brain and intracranial structures
        ("small bowel loops", "TotalSegmentator_v2", ["small_bowel"]),
        ("lenticular nuclei", "TotalSegmentator_brain_structures", ["lentiform_nucleus"]),
        # Roman numerals after "segments" are Couinaud's
        ("segments VI and VII", "TotalSegmentator_liver_segments", ["liver_segment_6", "liver_segment_7"]),
        (
            "Segments V to VIII, segment VI excepted",
            "TotalSegmentator_liver_segments",
            ["liver_segment_5", "liver_segment_7", "liver_segment_8"],
        ),
        # a finding's words describe the structure; they do not hide it
        ("Trachae narrowing? please segment", "TotalSegmentator_v2", ["trachea"]),
        ("Known multinodular thyriod, please measure.", "TotalSegmentator_v2", ["thyroid_gland"]),
        ("CTPA - PE QUANT", "FUMPE", ["Pulmonary Embolism"]),
        # the mediastinum is a structure too (a region word alone); an expansion's filler goes
        ("mediastinum", "TotalSegmentator_trunk_cavities", ["mediastinum"]),
        ("CT mediastinum - lymph nodes", "TotalSegmentator_trunk_cavities", []),
        ("SCM muscles", "TotalSegmentator_headneck_muscles", ["sternocleidomastoid_right", "sternocleidomastoid_left"]),
        ("CT AORTA ANGIO - AORTIC DISSECTION FALSE LUMEN", "TotalSegmentator_aortic_dissection", ["aorta_false_lumen"]),
        # names written without separators are a list before they are a description
        ("liver spleen kidneys pls", "TotalSegmentator_v2", ["spleen", "kidney_right", "kidney_left", "liver"]),
        # the review of round twenty-three: none of these changes its reading
        ("rt parotid oar", "TotalSegmentator_head_glands_cavities", ["parotid_gland_right"]),
        ("8 year old kid with a left humerus fracture: the humerus", "KiTS23", []),
        ("Metastases: please segment liver and adrenals", "LiTS", ["liver_tumour"]),
        ("Could you segment, I need the spleen volume", "TotalSegmentator_liver_segments", []),
        ("lung segmentectomy planning S6", "TotalSegmentator_liver_segments", []),
        ("liver primary", "SegRap2023_Task2", []),
        ("fat deposits in the liver", "LiTS", []),
        ("kidneys but not the cysts and label the tumours separately", "KiTS23", ["kidney and masses"]),
        # order entry's "kid" beside a side or a volume is the kidney; elsewhere a child
        ("lt kid vol pre donor nephrectomy", "TotalSegmentator_v2", ["kidney_left"]),
        ("my kid's CT: the liver please", "TotalSegmentator_v2", ["liver"]),
        # the caudate of a liver request is Couinaud segment I
        (
            "Couinaud I to IV, leave out the caudate.",
            "TotalSegmentator_liver_segments",
            ["liver_segment_2", "liver_segment_3", "liver_segment_4"],
        ),
        ("thalamus and caudate", "TotalSegmentator_brain_structures", ["caudate_nucleus", "thalamus"]),
        # "coronary" asks for no non-coronary cusp; a form's "info" is no inferior structure
        ("CTA CORONARY ARTERIES W CONTRAST + CORONARY SEG", "TotalSegmentator_aortic_sinuses", []),
        ('Relevant clinical info: "ACC staging - segment the adrenal tumour"', "AMOS22_Task2", []),
        ("TKV (ADPKD), both sides", "TotalSegmentator_v2", ["kidney_right", "kidney_left"]),
        ("CT ABDOMEN - LIVER IRON / VOLUME", "TotalSegmentator_v2", ["liver"]),
        # RT before a site and a planning word is radiotherapy: both optic nerves
        (
            '(0018,1030) ProtocolName = "RT_BRAIN_OAR" | requested: optic nerves',
            "TotalSegmentator_head_glands_cavities",
            ["optic_nerve_left", "optic_nerve_right"],
        ),
        # a patient's part of the back is a segment of the spine; a hand's or foot's bones are a group
        ("my lower back bones", "TotalSegmentator_v2", [f"vertebrae_L{n}" for n in range(1, 6)]),
        ("the bones in my neck", "TotalSegmentator_v2", [f"vertebrae_C{n}" for n in range(1, 8)]),
        ("all the bones in my foot", "TotalSegmentator_appendicular_bones", ["tarsal", "metatarsal", "phalanges_feet"]),
        # ("airway and pulmonary arteries" are not the airways' arteries)
        ("CT thorax: airway and pulmonary arteries", "ATM22", ["pulmonary airway"]),
    ],
)
def test_readings_of_round_twenty_three(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "modality", "labels"),
    [
        # the enhancing tumour named by its enhancement; the contrast agent is no structure
        ("post-gadolinium enhancing component", "MR:T1C", ["enhancing_tumor"]),
        ("Post-gad T1: enhancing component (RANO)", "MR:T1C", ["enhancing_tumor"]),
        # "not just X" adds X; "no need for X separately" keeps X inside its whole
        ("whole tumour, not just the enhancing part", "MR:FLAIR", ["whole_tumor"]),
        ("Whole tumour on FLAIR - no need for the core or enhancing parts separately", "MR:FLAIR", ["whole_tumor"]),
    ],
)
def test_readings_of_round_twenty_three_on_brain_tumour_mr(router, text, modality, labels):
    assert plan(router, text, modality, collection=None).selection.get("BraTS21") == _values(router, "BraTS21", *labels)


@pytest.mark.parametrize(
    ("text", "modality", "labels"),
    [
        # a capital VS that compares nothing is the vestibular schwannoma
        ("T2 CISS: cochlea and VS", None, ["intra-meatal tumor", "extra-meatal tumor", "cochlea"]),
        ("liver VS spleen", "MR", []),
        ("T1+Gd: the intracanalicular part of the VS only", "MR:T1C", ["intra-meatal tumor"]),
        # a cerebellopontine angle schwannoma is the whole tumour
        ("cerebellopontine angle schwannoma", "MR:T2", ["intra-meatal tumor", "extra-meatal tumor"]),
    ],
)
def test_readings_of_round_twenty_three_on_vestibular_schwannoma(router, text, modality, labels):
    got = plan(router, text, modality, collection=None).selection.get("CrossMoDA2023", [])
    assert got == _values(router, "CrossMoDA2023", *labels)


@pytest.mark.parametrize(
    ("text", "modality"),
    [
        ("restricted diffusion lesion", "MR:DWI"),
        ("DWI trace: area of restricted diffusion", "MR:DWI"),
        ("ADC map - acute ischaemic lesion", "MR:ADC"),
        ("b1000 diffusion lesion", "MR:DWI"),
        ("lesion", "MR:ADC"),
    ],
)
def test_a_lesion_without_an_organ_on_diffusion_mr_is_the_stroke_models(router, text, modality):
    # "Restricted diffusion" is the finding (not the sequence's name); a lesion with no organ goes
    # to the models made for the study's sequence (ISLES lists DWI and ADC), not to one taking any MR.
    result = plan(router, text, modality, collection=None)
    assert result.selection == {"ISLES22": [1]}
    if text == "lesion":
        step = next(s for s in result.explain if s.get("target") == "lesion")
        assert "made for MR:ADC" in step["label"]["TotalSegmentator_liver_lesions_mr"]["reason"]


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # "primary" as a noun is the primary tumour; an adjective or "GTV primary" stays as it was
        ("oropharyngeal primary on PET/CT", "HECKTOR2022", ["GTVp"]),
        ("primary and nodal volumes for RT planning", "HECKTOR2022", ["GTVp", "GTVnd"]),
        ("GTV primary and nodal", "HECKTOR2022", ["GTVp", "GTVnd"]),
        ("PET-positive neck nodes only", "HECKTOR2022", ["GTVnd"]),
        # deposits and active disease on PET are its lesions
        ("melanoma staging PET: every FDG-avid deposit", "AutoPET", ["tumor"]),
        ("restaging after 2 cycles ABVD: metabolically active disease", "AutoPET", ["tumor"]),
        ("PET: hypermetabolic deposits - seg for SUV / MTV.", "AutoPET", ["tumor"]),
    ],
)
def test_readings_of_round_twenty_three_on_pet_ct(router, text, dataset, labels):
    got = plan(router, text, "PT+CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "whole"),
    [
        ("Oesophageal cancer RT: oesophagus, heart, lungs, cord", True),
        ("targets: heart; lungs (bilateral)", True),
        ("heart + pericardial effusion", True),
        # a structure left out names the organ among others too
        ("heart, no coronaries", True),
        ("lungs only, skip the nodules", True),
        ("the heart", False),
        ("both lungs", False),
        # one structure, named twice, is no list
        ("heart seg for the cardiac dose", False),
    ],
)
def test_an_organ_listed_with_other_structures_is_wanted_whole(router, text, whole):
    # Asked for alone, the heart brings its chambers (whole-heart segmentation) and a lung the
    # lobes of a dataset without a lung label; in a list, each organ is one structure.
    selection = plan(router, text, "CT", collection=None).selection
    chambers = {"MM-WHS", "TotalSegmentator_heartchambers_highres"} & set(selection)
    lobes = set(_values(router, "TotalSegmentator_v2", *_LOBES)) & set(selection.get("TotalSegmentator_v2", []))
    if whole:
        assert not chambers and not lobes
    else:
        assert chambers if "heart" in text else lobes


_LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)


def test_the_parts_left_out_of_a_list_say_why(router):
    result = plan(router, "heart and lungs", "CT", collection=None)
    heart = next(step for step in result.explain if step.get("target") == "heart")
    assert heart["label"]["MM-WHS"]["selected"] is False
    assert "wanted whole" in heart["label"]["MM-WHS"]["reason"]
    assert result.selection["TotalSegmentator_v2"] == sorted(_values(router, "TotalSegmentator_v2", "heart"))
    assert result.selection["CT-ORG"] == _values(router, "CT-ORG", "Lungs")


@pytest.mark.parametrize(
    "text", ["NM DMSA SCAN 78700 - SEGMENT BOTH KIDNEYS", "Thyroid uptake scan (Tc-99m) - the thyroid"]
)
def test_a_nuclear_medicine_study_is_refused_by_its_modality(router, text):
    # The text names the modality (no caller modality): nuclear medicine, which no dataset accepts.
    result = plan(router, text, None, collection=None)
    assert result.modality == "NM"
    assert result.selection == {}
    assert {u.kind for u in result.unmatched} == {UnmatchedKind.OTHER_MODALITY}


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # a list item from the verb that hands its structures over: who asks and why come before it
        (
            "Study note: hepatobiliary audit still needs the gallbladder and the pancreas",
            "TotalSegmentator_v2",
            ["gallbladder", "pancreas"],
        ),
        (
            "Trial imaging: at week 12 the core lab will contour the spleen and the liver",
            "TotalSegmentator_v2",
            ["spleen", "liver"],
        ),
        (
            "the nightly batch of 3D work covered the left kidney and the stomach",
            "TotalSegmentator_v2",
            ["kidney_left", "stomach"],
        ),
        # (a verb without an article after it, or with nothing before it, cuts nothing)
        ("segment the liver", "TotalSegmentator_v2", ["liver"]),
        ("liver segment 4", "TotalSegmentator_liver_segments", ["liver_segment_4"]),
        # shorthand: a word without vowels by its consonants, a cut-short name by its start
        ("kdny + pncrs vols", "TotalSegmentator_v2", ["pancreas", "kidney_right", "kidney_left"]),
        ("gllbldr seg", "TotalSegmentator_v2", ["gallbladder"]),
        ("liv + spl volumes", "TotalSegmentator_v2", ["spleen", "liver"]),
        ("oesoph and trach", "TotalSegmentator_v2", ["esophagus", "trachea"]),
        # (an operation's acronym and a patient's "pat" stay what they are)
        ("CT CHEST - LUNG LOBES PRE LVRS", "TotalSegmentator_v2", list(_LOBES)),
        ("pat's spleen please", "TotalSegmentator_v2", ["spleen"]),
    ],
)
def test_readings_of_round_twenty_four(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "modality", "selected"),
    [
        # a lesion graded on an organ's reporting scale is that organ's
        ("PI-RADS 5 lesion, please segment it", "MR:T2", {}),
        ("Bosniak IIF cyst, segment the cyst", "CT", {"TotalSegmentator_kidney_cysts": None}),
        ("LI-RADS 4 lesion volume", "CT", {"LiTS": ["liver_tumour"]}),
    ],
)
def test_a_lesion_graded_on_an_organs_scale_is_that_organs(router, text, modality, selected):
    result = plan(router, text, modality, collection=None)
    if not selected:
        assert result.selection == {}
    for dataset, labels in selected.items():
        assert dataset in result.selection
        if labels is not None:
            assert result.selection[dataset] == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # a patient's description ends where their story about it begins
        ("the large blood vessel leaving my heart has got wider", "TotalSegmentator_v2", ["aorta"]),
        # clinical and Latin names, and words that were "corrected" into others
        ("solitary lung nodule", "TotalSegmentator_lung_nodules", ["lung_nodules"]),
        ("precaval and postcaval veins", "TotalSegmentator_v2", ["superior_vena_cava", "inferior_vena_cava"]),
        ("os innominatum, right", "TotalSegmentator_v2", ["hip_right"]),
        ("auricular appendage of the left atrium", "TotalSegmentator_v2", ["atrial_appendage_left"]),
        ("the false lumen", "TotalSegmentator_aortic_dissection", ["aorta_false_lumen"]),
        ("visceral adipose depots", "TotalSegmentator_tissue_types", ["torso_fat"]),
        ("the vascular tree of the liver", "TotalSegmentator_liver_vessels", ["liver_vessels"]),
    ],
)
def test_readings_of_round_twenty_four_in_other_words(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # a class noun alone is read by what the phrase says of it, with the side of its place
        ("the nerve behind my right eye that carries sight to the brain", "SegRap2023_Task1", ["OpticNerve_R"]),
        # a lesion's relative clause says whose it is
        ("the tumour that has spread into her liver", "LiTS", ["liver_tumour"]),
        ("Please work out the size of the spleen", "TotalSegmentator_v2", ["spleen"]),
        # a contrast phase is when, not the arteries or the portal vein
        ("HCC: liver and viable tumour on the late arterial phase", "LiTS", ["liver", "liver_tumour"]),
        ("CT CAP portal venous - spleen volume", "TotalSegmentator_v2", ["spleen"]),
        ("portal venous system", "TotalSegmentator_v2", ["portal_vein_and_splenic_vein"]),
        # ranges: German-style thoracic levels, Roman Couinaud numerals "through"
        ("Th11-L1 vertebrae", "TotalSegmentator_v2", ["vertebrae_L1", "vertebrae_T12", "vertebrae_T11"]),
        (
            "Couinaud segments V through VIII",
            "TotalSegmentator_liver_segments",
            [f"liver_segment_{n}" for n in range(5, 9)],
        ),
        # a slip one letter from two names of one structure is that structure
        ("prostat and bladder", "TotalSegmentator_v2", ["urinary_bladder", "prostate"]),
    ],
)
def test_readings_of_round_twenty_four_second_batch(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "modality", "dataset", "labels"),
    [
        # PET: an SUV threshold says which lesions count; sites, others and measurability say nothing
        ("PET: every lesion over SUV 3", None, "AutoPET", ["tumor"]),
        ("all FDG-avid disease sites on the PET/CT", "PT+CT", "AutoPET", ["tumor"]),
        ("the index lesion and all other measurable lesions", "PT", "AutoPET", ["tumor"]),
        # the oropharynx's subsites place an oropharyngeal cancer
        ("tonsillar primary", "PT+CT", "HECKTOR2022", ["GTVp"]),
        ("base of tongue primary tumour", "PT+CT", "HECKTOR2022", ["GTVp"]),
    ],
)
def test_readings_of_round_twenty_four_on_pet(router, text, modality, dataset, labels):
    got = plan(router, text, modality, collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


def test_the_tonsil_alone_is_still_refused(router):
    assert plan(router, "the tonsils", "CT", collection=None).selection == {}


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # descriptions: the nearest definition now stands when it leads the next concept's by 0.04
        ("the nerves running from my eyes back to my brain", "SegRap2023_Task1", ["OpticNerve_L", "OpticNerve_R"]),
        ("the little bag tucked under his liver", "TotalSegmentator_v2", ["gallbladder"]),
    ],
)
def test_descriptions_of_round_twenty_four(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


def test_a_clause_alone_describes_no_structure(router):
    # "where things get stuck when I swallow" follows the structure it speaks of; alone, it is no description
    result = plan(router, "my gullet, where food sticks when I swallow", "CT", collection=None)
    assert set(result.selection) == set(plan(router, "my gullet", "CT", collection=None).selection)


@pytest.mark.parametrize(
    ("text", "modality", "dataset", "labels"),
    [
        # PET words for nodal and total tumour burden
        ("hypermetabolic lymph nodes in the neck", "PT+CT", "HECKTOR2022", ["GTVnd"]),
        ("whole-body total metabolic tumour volume", "PT+CT", "AutoPET", ["tumor"]),
        ("restaging: all FDG avid disease", "PT+CT", "AutoPET", ["tumor"]),
        # the haemorrhages by their abbreviations and a patient's words
        ("acute SDH, volume please", "CT", "Instance22", ["Intracranial Hemorrhage"]),
        ("the blood clot on my brain", "CT", "Instance22", ["Intracranial Hemorrhage"]),
        # the eye's muscles as a group, with a side
        (
            "right extraocular muscles",
            "CT",
            "TotalSegmentator_oculomotor_muscles",
            [
                "superior_rectus_muscle_right",
                "inferior_rectus_muscle_right",
                "medial_rectus_muscle_right",
                "lateral_rectus_muscle_right",
                "superior_oblique_muscle_right",
                "inferior_oblique_muscle_right",
            ],
        ),
        # a worklist header's side reaches names written without separators
        ("CT SHOULDER LT - HUMERUS SCAPULA", "CT", "TotalSegmentator_v2", ["humerus_left", "scapula_left"]),
        # a misspelt side word is still a side
        ("kidneys bilaterall", "CT", "TotalSegmentator_v2", ["kidney_right", "kidney_left"]),
        # the liver's functional divisions (Brisbane 2000) are their Couinaud segments
        (
            "right hemiliver volume",
            "CT",
            "TotalSegmentator_liver_segments",
            [f"liver_segment_{n}" for n in (5, 6, 7, 8)],
        ),
        (
            "left lateral section of the liver",
            "CT",
            "TotalSegmentator_liver_segments",
            ["liver_segment_2", "liver_segment_3"],
        ),
        ("right liver lesion", "CT", "LiTS", ["liver_tumour"]),
    ],
)
def test_readings_of_round_twenty_four_third_batch(router, text, modality, dataset, labels):
    got = plan(router, text, modality, collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # a whole written before " - " and then only its parts heads them
        ("Spine - L1 to L5", "TotalSegmentator_v2", [f"vertebrae_L{n}" for n in range(1, 6)]),
        ("Liver - segments 5 to 8", "TotalSegmentator_liver_segments", [f"liver_segment_{n}" for n in range(5, 9)]),
        ("Liver - segments 5 to 8", "TotalSegmentator_v2", []),
        # (a structure that is no part of it stays a target of its own)
        ("Liver - spleen too", "TotalSegmentator_v2", ["spleen", "liver"]),
    ],
)
def test_a_whole_heading_its_parts(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "selected"),
    [
        # an unknown word that makes the reading a kind of it: the nearest term's concept
        ("Wilms tumour", {"KiTS23", "renalStructures_CECT_segmentation"}),
        # a known structure no dataset segments is refused by name, not read as any cyst
        ("Baker's cyst behind the right knee", set()),
    ],
)
def test_eponymous_lesions(router, text, selected):
    assert set(plan(router, text, "CT", collection=None).selection) == selected


@pytest.mark.parametrize(
    ("text", "selected"),
    [
        # an adenocarcinoma is a cancer; colorectal liver metastases are the liver's tumours
        ("pancreatic adenocarcinoma", {"pancreas_ct_dints_segmentation"}),
        ("colorectal liver metastases", {"LiTS", "TotalSegmentator_liver_lesions", "TotalSegmentator_liver_vessels"}),
        # an adenoma is benign, no carcinoma: known, and segmented by no dataset
        ("lipid-rich adrenal adenoma", set()),
    ],
)
def test_readings_of_round_twenty_four_tumour_words(router, text, selected):
    assert set(plan(router, text, "CT", collection=None).selection) == selected


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # "contralateral" and "ipsilateral" are the side they mean when one side is named
        ("Right renal tumour; please segment the contralateral kidney", "TotalSegmentator_v2", ["kidney_left"]),
        (
            "left adrenal nodule - and the ipsilateral kidney",
            "TotalSegmentator_v2",
            ["kidney_left"],
        ),
        ("the contralateral kidney", "TotalSegmentator_v2", []),
    ],
)
def test_a_relative_side_is_the_side_it_means(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # a letter glued to a number is a level, never the end of a word heard in two ("vertabra L3")
        ("lumbar vertabra L3", "TotalSegmentator_v2", ["vertebrae_L3"]),
        # the brachial plexus is known, and segmented by no dataset ("brachial" was corrected to tracheal)
        ("Brachial_Plex_L, Brachial_Plex_R", "TotalSegmentator_v2", []),
    ],
)
def test_readings_of_round_twenty_four_spelling(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "selected", "only"),
    [
        # a several-word term's words in another order are still the term ("heart sac") ...
        ("the sac around my heart", {"TotalSegmentator_trunk_cavities"}, True),
        # ... and the heart itself is still the heart (and its parts where only they are segmented)
        ("the heart", {"MM-WHS", "TotalSegmentator_heartchambers_highres", "TotalSegmentator_total_v3"}, False),
    ],
)
def test_a_terms_words_in_another_order(router, text, selected, only):
    got = set(plan(router, text, "CT", collection=None).selection)
    assert got == selected if only else selected <= got


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # a position alone names nothing: no upper teeth in an upper-abdominal list, no central
        # incisor in a central line; a side before a series adjective goes along with it
        ("upper abdominal organs: the spleen, not the liver", "TotalSegmentator_teeth", []),
        ("Central line planning: segment the IJVs", "TotalSegmentator_teeth", []),
        ("left upper and lower lobes", "TotalSegmentator_teeth", []),
        ("left upper and lower lobes", "TotalSegmentator_v2", ["lung_upper_lobe_left", "lung_lower_lobe_left"]),
        # (and "line" is no misspelt lien, the spleen)
        ("L IJV for line insertion", "TotalSegmentator_v2", []),
        # a bare "the vertebrae" where levels are named is the vertebrae at those levels
        ("Chance fracture at L2 - vertebra segmentation", "TotalSegmentator_v2", ["vertebrae_L2"]),
        ("Pott disease T9-T10, segment both vertebrae", "TotalSegmentator_v2", ["vertebrae_T9", "vertebrae_T10"]),
        # an FDI range runs along one quadrant
        (
            "teeth 21 to 23",
            "TotalSegmentator_teeth",
            ["upper_left_central_incisor_fdi21", "upper_left_lateral_incisor_fdi22", "upper_left_canine_fdi23"],
        ),
        (
            "CBCT: teeth 34-36",
            "TotalSegmentator_teeth",
            ["lower_left_first_premolar_fdi34", "lower_left_second_premolar_fdi35", "lower_left_first_molar_fdi36"],
        ),
        # a count after an article is all of a series, not an index
        ("all eight Couinaud segments", "TotalSegmentator_liver_segments", [f"liver_segment_{n}" for n in range(1, 9)]),
        ("the five bones of my lower back", "TotalSegmentator_v2", [f"vertebrae_L{n}" for n in range(1, 6)]),
        # a verb of motion after a structure's name gives its course
        ("the spinal cord running down my neck", "TotalSegmentator_v2", ["spinal_cord"]),
        # a region word before "cavity" names the cavity
        (
            "thoracic cavity and abdominal cavity",
            "TotalSegmentator_trunk_cavities",
            ["thoracic_cavity", "abdominal_cavity"],
        ),
        # a class noun placed by a structure is read by its description, among members of its class
        ("the gland in front of my windpipe", "TotalSegmentator_v2", ["thyroid_gland"]),
        ("the muscles down either side of my spine", "TotalSegmentator_v2", ["autochthon_left", "autochthon_right"]),
        # a class noun with an eponym is no member the registry names; the nearest term with
        # another position is no neighbour
        ("vein of Galen", "renalStructures_CECT_segmentation", []),
        ("inferior mesenteric artery", "TotalSegmentator_renal_arteries", []),
        # an abbreviation spelt out in brackets is what the brackets say
        ("SMA at L3 (skeletal muscle area)", "TotalSegmentator_renal_arteries", []),
        ("SMA at L3 (skeletal muscle area)", "TotalSegmentator_tissue_types", ["skeletal_muscle"]),
    ],
)
def test_readings_of_round_twenty_five(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "modality", "dataset", "labels"),
    [
        # PET lesions: uptake, residual and suspicion say which lesions, not which structure
        ("residual avid masses after chemo", "PT", "AutoPET", ["tumor"]),
        ("hot spots suspicious for lymphoma", "PT", "AutoPET", ["tumor"]),
        ("staging PET: the primary and any avid metastatic foci", "PT+CT", "AutoPET", ["tumor"]),
        # a metastasis is not the primary named before it
        ("melanoma PET: primary tumour and metastases", "PT", "AutoPET", ["tumor"]),
        # an MR sequence named with its plane is no vertebral level, and "T2-weighted" one word
        (
            "sagittal T2 lumbar spine: L2-L4 vertebrae",
            "MR:T2",
            "TotalSegmentator_vertebrae_mr",
            ["vertebrae_L2", "vertebrae_L3", "vertebrae_L4"],
        ),
        ("T2-weighted glioma", "MR:T2", "BraTS21", ["whole_tumor"]),
    ],
)
def test_readings_of_round_twenty_five_by_modality(router, text, modality, dataset, labels):
    got = plan(router, text, modality, collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # names: the Rolandic fissure, secondaries, a gland named with its class
        ("the Rolandic fissure", "TotalSegmentator_brain_structures", ["central_sulcus"]),
        ("secondaries in the liver", "LiTS", ["liver_tumour"]),
        (
            "submaxillary salivary glands",
            "TotalSegmentator_head_glands_cavities",
            ["submandibular_gland_right", "submandibular_gland_left"],
        ),
        # a liver's segmental anatomy is Couinaud's; "dual phase" is how the images were taken
        (
            "CT LIVER - SEGMENTAL ANATOMY PRE RESECTION",
            "TotalSegmentator_liver_segments",
            [f"liver_segment_{n}" for n in range(1, 9)],
        ),
        ("CT PANCREAS DUAL PHASE - OUTLINE", "TotalSegmentator_v2", ["pancreas"]),
        # a term with its place in it keeps the place ("fat under the skin")
        ("the fat just under my skin", "TotalSegmentator_tissue_types", ["subcutaneous_fat"]),
        ("how much fat is there under my skin", "TotalSegmentator_tissue_types", ["subcutaneous_fat"]),
        # words that name nothing may describe a lesion; a class noun's description stays an organ's
        ("the water bubbles on my kidneys", "TotalSegmentator_kidney_cysts", ["kidney_cyst_left", "kidney_cyst_right"]),
        ("the little glands that sit on top of my kidneys", "Adrenal-ACC-Ki67-Seg", []),
    ],
)
def test_readings_of_round_twenty_five_in_other_words(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "modality", "dataset", "labels"),
    [
        # an organ's lesion called by another lesion word is the PET lesion on a whole-body PET
        ("myeloma PET: the focal bone lesions", "PT", "AutoPET", ["tumor"]),
        ("myeloma PET: the focal bone lesions", "CT", "AutoPET", []),
        # an infinitive of purpose is the why
        (
            "CT of the PET/CT: the liver, to check the reference uptake in the heart",
            "CT",
            "TotalSegmentator_v2",
            ["liver"],
        ),
        # a list item that opens with "from" goes on describing the one before it
        ("the largest artery in the body, from the heart down into the tummy", "CT", "TotalSegmentator_v2", ["aorta"]),
    ],
)
def test_readings_of_round_twenty_five_lesions_and_clauses(router, text, modality, dataset, labels):
    got = plan(router, text, modality, collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # a group placed by another structure is the member its place describes
        (
            "the spit glands just in front of the ears",
            "TotalSegmentator_head_glands_cavities",
            ["parotid_gland_left", "parotid_gland_right"],
        ),
        (
            "the saliva glands under the jaw",
            "TotalSegmentator_head_glands_cavities",
            ["submandibular_gland_right", "submandibular_gland_left"],
        ),
        # (a modality is no place)
        (
            "the spit glands on CT",
            "TotalSegmentator_head_glands_cavities",
            ["parotid_gland_left", "parotid_gland_right", "submandibular_gland_right", "submandibular_gland_left"],
        ),
    ],
)
def test_a_groups_place_says_which_member(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "dataset", "labels"),
    [
        # the organ named with the organs at risk is the treated site, never one of them ...
        ("prostate RT OARs - bladder and rectum", "TotalSegmentator_v2", ["urinary_bladder"]),
        # ... unless it is named as one
        ("the spinal cord as an organ at risk", "TotalSegmentator_v2", ["spinal_cord"]),
        # an item read in two body areas is read in the one its list shares
        ("TAVI planning: annulus, LVOT and sinuses", "TotalSegmentator_craniofacial_structures", []),
        (
            "TAVI planning: annulus, LVOT and sinuses",
            "TotalSegmentator_aortic_sinuses",
            ["left_ventricular_outflow_tract", "right_coronary_cusp", "left_coronary_cusp", "non_coronary_cusp"],
        ),
        # (a structure that spans areas keeps every dataset that names it)
        ("the coronaries and the aorta", "AMOS22_Task2", ["aorta"]),
    ],
)
def test_readings_of_round_twenty_five_in_lists(router, text, dataset, labels):
    got = plan(router, text, "CT", collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "modality", "dataset", "labels"),
    [
        # a compartment is a generic noun: "SAT compartment" is the subcutaneous fat
        ("the SAT compartment at L3", "CT", "TotalSegmentator_tissue_types", ["subcutaneous_fat"]),
        (
            "posterior compartment of the thigh",
            "CT",
            "TotalSegmentator_thigh_shoulder_muscles",
            ["thigh_posterior_compartment_left", "thigh_posterior_compartment_right"],
        ),
        # "not collected" leaves an item out
        ("skeletal muscle; fat compartments not collected", "CT", "TotalSegmentator_tissue_types", ["skeletal_muscle"]),
        # AIS is an acute ischaemic stroke
        ("AIS lesion", "MR:DWI", "ISLES22", ["stroke lesion"]),
    ],
)
def test_readings_of_round_twenty_five_abbreviations(router, text, modality, dataset, labels):
    got = plan(router, text, modality, collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "modality", "dataset", "labels"),
    [
        # a grade on a reporting scale is no index, and a response scale is a findings word
        ("Deauville 5 lesions", "PT", "AutoPET", ["tumor"]),
        ("Bosniak IIF cyst", "CT", "TotalSegmentator_kidney_cysts", ["kidney_cyst_left", "kidney_cyst_right"]),
        # PET quantities and words of uptake say which lesions, not which structure
        ("total lesion glycolysis", "PT", "AutoPET", ["tumor"]),
        ("SUV-hot lesions", "PT", "AutoPET", ["tumor"]),
        ("all PSMA-positive disease", "PT", "AutoPET", ["tumor"]),
        ("metabolically active lymph nodes in the neck", "PT", "HECKTOR2022", ["GTVnd"]),
    ],
)
def test_readings_of_round_twenty_five_on_pet(router, text, modality, dataset, labels):
    got = plan(router, text, modality, collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


@pytest.mark.parametrize(
    ("text", "modality", "dataset", "labels"),
    [
        # an eponymous disease is the context: the structure written with it is the target
        (
            "Scheuermann's disease T7 to T9",
            "CT",
            "TotalSegmentator_v2",
            ["vertebrae_T7", "vertebrae_T8", "vertebrae_T9"],
        ),
        ("Kawasaki syndrome: the coronary arteries", "CT", "ImageCAS", ["Coronary Artery"]),
        ("Jefferson fracture of the atlas", "CT", "TotalSegmentator_v2", ["vertebrae_C1"]),
        # ... but a known word before the noun is no eponym ("DOTATATE-avid disease" is PET disease)
        ("all DOTATATE-avid disease", "PT", "AutoPET", ["tumor"]),
        # an extent after a structure's name ("from ... to ...") is its course, not another target
        ("the oesophagus from the cricopharyngeus down to the cardia", "CT", "TotalSegmentator_v2", ["esophagus"]),
        ("tracheal lumen from the larynx to the carina", "CT", "TotalSegmentator_v2", ["trachea"]),
        # a description's rare words shared with a definition choose between near definitions
        ("the flat bone down the middle of his chest", "CT", "TotalSegmentator_v2", ["sternum"]),
        # lay spine parts, a count "of my", a pronoun inside, a position of its own
        ("the bones in the small of her back", "CT", "TotalSegmentator_v2", [f"vertebrae_L{n}" for n in range(1, 6)]),
        ("all five of the lumbar vertebrae", "CT", "TotalSegmentator_v2", [f"vertebrae_L{n}" for n in range(1, 6)]),
        ("the liver and all the metastases inside it", "CT", "LiTS", ["liver", "liver_tumour"]),
        ("at the level of L3: skeletal muscle, then subcutaneous fat", "CT", "TotalSegmentator_v2", []),
        (
            "at the level of L3: skeletal muscle, then subcutaneous fat",
            "CT",
            "TotalSegmentator_tissue_types",
            ["skeletal_muscle", "subcutaneous_fat"],
        ),
        ("oropharyngeal primary and the positive nodes", "PT", "HECKTOR2022", ["GTVp", "GTVnd"]),
        # PET: a grade range is no index; timing, VOIs and lymphoma abbreviations say which lesions
        ("Deauville 4-5 lesions", "PT+CT", "HECKTOR2022", []),
        ("DLBCL baseline", "PT+CT", "AutoPET", ["tumor"]),
        ("lymphoma baseline, all nodes", "PT", "AutoPET", ["tumor"]),
        ("CT of the PET/CT: a spleen VOI for the reference", "CT", "TotalSegmentator_v2", ["spleen"]),
        # a group of muscles with its members
        (
            "the pharyngeal constrictor muscles",
            "CT",
            "TotalSegmentator_headneck_muscles",
            [f"{level}_pharyngeal_constrictor" for level in ("superior", "middle", "inferior")],
        ),
        # radiotherapy shorthand: "SC" beside organs at risk, "ONs", "SCA"; "SC fat" stays fat
        ("BS, SC and both parotids", "CT", "TotalSegmentator_v2", ["spinal_cord"]),
        ("SC fat at L3", "CT", "TotalSegmentator_tissue_types", ["subcutaneous_fat"]),
        (
            "ONs, globes and lenses",
            "CT",
            "TotalSegmentator_head_glands_cavities",
            ["eye_left", "eye_right", "eye_lens_left", "eye_lens_right", "optic_nerve_left", "optic_nerve_right"],
        ),
        ("R SCA", "CT", "TotalSegmentator_v2", ["subclavian_artery_right"]),
        # the visceral fat's other names; a term with its place in it, placed further
        ("visceral adipose compartment at L3", "CT", "TotalSegmentator_tissue_4_types", ["torso_fat"]),
        ("the fat under the skin of his belly", "CT", "TotalSegmentator_tissue_4_types", ["subcutaneous_fat"]),
        # vessels no dataset segments are no neighbour's: the SMV is no SMA, the ECA no common carotid
        ("the superior mesenteric vein before the Whipple", "CT", "TotalSegmentator_renal_arteries", []),
        ("external carotid artery, right side", "CT", "TotalSegmentator_v2", []),
        ("hepatic veins for the TIPS", "CT", "TotalSegmentator_v2", []),
        ("vena portae hepatis", "CT", "TotalSegmentator_v2", ["portal_vein_and_splenic_vein"]),
        # fluoroscopy and technetium studies are modalities no dataset accepts
        ("stomach on the barium meal", None, "TotalSegmentator_v2", []),
        ("thyroid, technetium uptake", None, "TotalSegmentator_v2", []),
        # a modality after an article qualifies the noun after it, and ends no list item
        (
            "the upper thoracic levels on the MR spine, T1 to T4",
            "MR",
            "TotalSegmentator_vertebrae_mr",
            ["vertebrae_T1", "vertebrae_T2", "vertebrae_T3", "vertebrae_T4"],
        ),
        # a radionuclide is no lung lobe; a PICC is a device; a bone's adjective with "bone" is that bone
        ("Lu-177 dosimetry: the spleen", "CT", "TotalSegmentator_v2", ["spleen"]),
        ("the PICC tip", "CT", "KiTS23", []),
        ("sternal bone", "CT", "TotalSegmentator_v2", ["sternum"]),
        ("left coxal bone", "CT", "TotalSegmentator_v2", ["hip_left"]),
        # a position with a region and a side names nothing ("upper left" is no tooth here)
        ("CT EXTREMITY UPPER LEFT WO", "CT", "TotalSegmentator_teeth", []),
        # a relative clause goes on past "with"; "on both sides of" places the item before it
        (
            "the glands that swelled with his mumps, on both sides of his face",
            "CT",
            "TotalSegmentator_head_glands_cavities",
            ["parotid_gland_left", "parotid_gland_right"],
        ),
        (
            "the organ behind my stomach that stopped working with my diabetes",
            "CT",
            "TotalSegmentator_v2",
            ["pancreas"],
        ),
        # the heart's upper chambers receive (atria), its lower ones pump (ventricles)
        (
            "the upper right chamber of his heart",
            "CT",
            "TotalSegmentator_heartchambers_highres",
            ["heart_atrium_right"],
        ),
        (
            "the bottom right chamber of the heart",
            "CT",
            "TotalSegmentator_heartchambers_highres",
            ["heart_ventricle_right"],
        ),
        # ... and past "and" before a body region
        (
            "the large vein that carries blood up to the heart from the legs and belly",
            "CT",
            "TotalSegmentator_v2",
            ["inferior_vena_cava"],
        ),
        # the whole lesion is not the part of it named before
        ("tumour core, then the whole tumour", "MR:T1C", "BraTS21", ["whole_tumor"]),
        ("the enhancing tumour and the entire tumour", "MR:T1C", "BraTS21", ["whole_tumor"]),
        # an eponymous inflammation names its organ
        ("Riedel's thyroiditis: the gland", "CT", "TotalSegmentator_v2", ["thyroid_gland"]),
    ],
)
def test_readings_of_round_twenty_six(router, text, modality, dataset, labels):
    got = plan(router, text, modality, collection=None).selection.get(dataset, [])
    assert got == _values(router, dataset, *labels)


def test_individually_says_how_not_what(router):
    # "individually" is a function word: "all the ribs individually" is every rib, each its own label
    # (it was an unknown word, and the phrase was left to the encoder, which read nothing)
    got = plan(router, "all the ribs individually", "CT", collection=None).selection
    ribs = [
        e.name for e in router.registry.datasets["TotalSegmentator_v2"].labels.values() if e.name.startswith("rib_")
    ]
    assert sorted(got.get("TotalSegmentator_v2", [])) == sorted(_values(router, "TotalSegmentator_v2", *ribs))
    assert len(ribs) == 24


@pytest.mark.parametrize(
    ("text", "modality", "selected"),
    [
        # a bare lesion on a CT, with no organ or region named anywhere, says not whose it is ...
        ("please outline the mass", "CT", set()),
        ("all tumours, thanks", "CT", set()),
        # ... unless a header, an organ or a region names it, or the study is a whole-body PET
        ("CT LIVER - LESIONS", "CT", {"LiTS"}),
        ("abdominal tumours", "CT", {"LiTS"}),
        ("lesions", "PT", {"AutoPET"}),
    ],
)
def test_a_lesion_with_no_organ_on_a_ct_is_too_vague(router, text, modality, selected):
    result = plan(router, text, modality, collection=None)
    assert selected <= set(result.selection)
    if not selected:
        assert result.selection == {}
        assert {u.kind for u in result.unmatched} == {UnmatchedKind.TOO_VAGUE}
