"""The executor: concurrency, per-model failure and timeout, the LRU model cache, and its use by the pipeline."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
import yaml

from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.backends import ModelLoadError, ModelSpec, Prediction, StudyImages, load_model
from medsegagent.models.executor import Executor, InProcessExecutor, ModelCache, ModelTask
from medsegagent.models.registry import load_registry

MiB = 2**20


def _volume(shape=(6, 8, 8)) -> Volume:
    geo = Geometry(shape, (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (2.0, 1.0, 1.0))
    return Volume(np.zeros(shape, np.float32), geo, "CT", "1.2.3")


class FakeModel:
    """Answers 'ball' everywhere after ``delay`` seconds, or raises ``fail``."""

    def __init__(self, name: str, *, delay: float = 0.0, fail: Exception | None = None, memory_mb: float = 0.0):
        self.name = name
        self.labels = {"ball": (1,)}
        self.device = torch.device("cpu")
        self.delay, self.fail, self.memory_mb = delay, fail, memory_mb
        self.calls = 0

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_mb * MiB)

    def predict(self, images, labels=None) -> Prediction:
        self.calls += 1
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        geo = StudyImages.of(images).primary.geometry
        return Prediction(self.name, geo, geo, {"ball": np.ones(geo.shape, np.float32)})


def _spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, backend="torchscript", path=f"/models/{name}", labels={"ball": (1,)})


def _loader(behaviour: dict[str, dict], loads: list[str] | None = None, load_delay: float = 0.0):
    def load(spec: ModelSpec, device: str | None) -> FakeModel:
        time.sleep(load_delay)
        if loads is not None:
            loads.append(spec.name)
        options = behaviour.get(spec.name, {})
        if "load_error" in options:
            raise ModelLoadError(options["load_error"])
        return FakeModel(spec.name, **options)

    return load


def test_in_process_executor_is_an_executor():
    assert isinstance(InProcessExecutor(), Executor)


@pytest.mark.parametrize(("workers", "concurrent"), [(2, True), (1, False)])
def test_models_run_concurrently(workers, concurrent):
    cache = ModelCache(loader=_loader({"a": {"delay": 0.4}, "b": {"delay": 0.4}}))
    executor = InProcessExecutor(cache, workers=workers)
    t0 = time.perf_counter()
    results = executor.run([ModelTask(_spec("a")), ModelTask(_spec("b"))], _volume())
    wall = time.perf_counter() - t0
    assert [r.status for r in results.values()] == ["ok", "ok"]
    assert (wall < 0.75) if concurrent else (wall >= 0.8)


def test_failure_and_timeout_fail_only_their_model():
    behaviour = {
        "good": {},
        "crashes": {"fail": RuntimeError("CUDA out of memory")},
        "hangs": {"delay": 5.0},
        "broken": {"load_error": "model broken: weights missing"},
    }
    executor = InProcessExecutor(ModelCache(loader=_loader(behaviour)), workers=4, timeout_s=0.5)
    t0 = time.perf_counter()
    results = executor.run([ModelTask(_spec(name)) for name in behaviour], _volume())
    assert time.perf_counter() - t0 < 2.0  # nobody waits for the hung model
    assert list(results) == ["good", "crashes", "hangs", "broken"]
    assert results["good"].ok and results["good"].prediction.labels == ["ball"]
    assert (results["crashes"].status, results["crashes"].error) == ("failed", "CUDA out of memory")
    assert (results["hangs"].status, results["hangs"].error) == ("timeout", "timed out after 0.5 s")
    assert (results["broken"].status, results["broken"].error) == ("failed", "model broken: weights missing")


def test_a_hung_model_gives_its_worker_back():
    """One worker: the job queued behind a hung model still runs once the hung one times out."""
    executor = InProcessExecutor(ModelCache(loader=_loader({"hangs": {"delay": 5.0}})), workers=1, timeout_s=0.3)
    results = executor.run([ModelTask(_spec("hangs")), ModelTask(_spec("next"))], _volume())
    assert results["hangs"].status == "timeout" and results["next"].ok


def test_job_timeout_overrides_the_executors():
    executor = InProcessExecutor(ModelCache(loader=_loader({"slow": {"delay": 0.6}})), timeout_s=0.1)
    assert executor.run([ModelTask(_spec("slow"), timeout_s=5.0)], _volume())["slow"].ok


def test_cache_loads_each_model_once_even_when_asked_concurrently():
    loads: list[str] = []
    cache = ModelCache(loader=_loader({}, loads, load_delay=0.2))
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(_spec("a")))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["a"] and len({id(model) for model, _ in got}) == 1
    assert sorted(loaded for _, loaded in got) == [False, False, False, True]
    executor = InProcessExecutor(cache)
    result = executor.run([ModelTask(_spec("a"))], _volume())["a"]
    assert result.ok and result.seconds["load"] == 0.0  # served from the cache


def test_cache_evicts_least_recently_used_within_its_budget():
    behaviour = {name: {"memory_mb": 400} for name in "abc"}
    behaviour["huge"] = {"memory_mb": 5000}
    loads: list[str] = []
    cache = ModelCache(memory_budget_mb=1000, loader=_loader(behaviour, loads))
    cache.get(_spec("a"))
    cache.get(_spec("b"))
    cache.get(_spec("a"))  # a is now the most recently used
    cache.get(_spec("c"))  # 1200 MiB > 1000: b goes
    assert cache.names == ["a", "c"] and cache.used_bytes == 800 * MiB
    cache.get(_spec("huge"))  # larger than the budget: used, not kept, and nothing else evicted for it
    assert cache.names == ["a", "c"]
    cache.get(_spec("b"))
    assert loads == ["a", "b", "c", "huge", "b"]
    with pytest.raises(ValueError):
        ModelCache(memory_budget_mb=-1)


def test_cache_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEDSEGAGENT_MODEL_CACHE_MB", "123")
    assert ModelCache().budget_bytes == 123 * MiB


def test_one_task_per_model():
    with pytest.raises(ValueError, match="one task per model"):
        InProcessExecutor(ModelCache(loader=_loader({}))).run([ModelTask(_spec("a")), ModelTask(_spec("a"))], _volume())


# --------------------------------------------------------------------------- through the pipeline


def _threshold_bundle(path):
    """A MONAI bundle whose 'liver' is CT tissue above 100 HU (no training: hand-set 1x1x1 convolution)."""
    (path / "configs").mkdir(parents=True)
    (path / "models").mkdir()
    network = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}
    section = {"labels": {"liver": 1}, "size": [32, 32, 16], "intensity": {"kind": "ct_window", "window": [0, 200]}}
    (path / "configs" / "inference.json").write_text(json.dumps({"network_def": network, "medsegagent": section}))
    conv = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = 20.0
        conv.bias[1] = -10.0
    torch.save(conv.state_dict(), path / "models" / "model.pt")
    return path


def test_segment_study_reports_a_timed_out_member_and_keeps_the_other(phantom_factory, tmp_path):
    """The CT demo dataset's two references point at test bundles; one of them hangs."""
    from medsegagent.node.pipeline import RunContext, segment_folder

    registry_file = load_registry().path
    data = yaml.safe_load(registry_file.read_text())
    bundle = _threshold_bundle(tmp_path / "bundle")
    for dataset in ("Demo_CT_Abdomen", "Demo_MR_Abdomen"):
        for ref in data["datasets"][dataset]["models"]:
            ref["location"] = str(bundle)
    custom = tmp_path / "registry.yaml"
    custom.write_text(yaml.safe_dump(data, sort_keys=False))
    registry = load_registry(custom)

    def loader(spec: ModelSpec, device: str | None):
        if spec.name == "demo_ct_unet_bn":
            return FakeModel(spec.name, delay=5.0)
        return load_model(spec, device)

    executor = InProcessExecutor(ModelCache(loader=loader), timeout_s=2.0)
    _, files = phantom_factory("CT")
    result = segment_folder(
        files.dicom_dir, "liver", tmp_path / "out", RunContext(registry, executor), collection="demo"
    )
    models = {m["name"]: m for m in result.report["models"]}
    assert models["demo_ct_unet"]["status"] == "ok" and models["demo_ct_unet"]["device"] == "cpu"
    assert set(models["demo_ct_unet"]["seconds"]) >= {"load", "run", "preprocess", "inference", "to_source"}
    assert models["demo_ct_unet_bn"] == {
        "name": "demo_ct_unet_bn",
        "status": "failed",
        "error": "timed out after 2 s",
        "timeout": True,
    }
    segment = result.report["segments"][0]
    assert segment["dropped"]["demo_ct_unet_bn"] == "model failed: timed out after 2 s"
    assert set(segment["ranks"]) == {"demo_ct_unet"}
    assert set(result.report["timings_s"]) >= {"read", "plan", "inference", "ensemble", "write"}
    assert (tmp_path / "out" / "seg.dcm").is_file()
