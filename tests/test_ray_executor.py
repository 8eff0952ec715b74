"""The Ray executor on a private local Ray: the same answers as in-process, and its faults.

Each Ray test starts a small local Ray (one CPU, 200 MB object store, no
dashboard, bound to 127.0.0.1) under its own temporary folder and stops every
process of it at the end (checked).  Models are tiny hand-set MONAI bundles
(a 1x1x1 convolution thresholding HU) or fakes, so the time goes to Ray, not
to inference.  The node's handling of an unavailable cluster is tested
without Ray.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml

from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.backends import ModelSpec, Prediction, StudyImages
from medsegagent.models.executor import InProcessExecutor, ModelCache, ModelTask
from medsegagent.models.ray_executor import ClusterUnavailable, ModelPlacement, RayExecutor
from medsegagent.models.registry import load_registry
from medsegagent.node.config import ConfigError, ExecutorKind, parse_config
from medsegagent.node.jobs import JobState
from medsegagent.node.pipeline import RunContext, segment_folder
from medsegagent.node.service import Node, build_executor
from tests.conftest import wait_for

# -- processes ----------------------------------------------------------------------------------


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _holds_file_under(pid: int, folder: str) -> bool:
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folder + "/"):
                    return True
    return False


def ray_processes(*markers: str, folder: str | None = None) -> set[int]:
    """Live processes whose command line holds every marker (or that hold a file under ``folder``: Ray renames
    its workers and agents, whose logs stay open in the session folder), and their descendants."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                if (markers and all(m.encode() in cmdline for m in markers)) or (
                    folder is not None and _holds_file_under(int(entry), folder)
                ):
                    found.add(int(entry))
    parents = _parents()
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found and pid not in found}
        found |= children
        grew = bool(children)
    return {pid for pid in found if _alive(pid)}


def kill_processes(pids: set[int], timeout: float = 15.0) -> None:
    """SIGKILL ``pids`` (only these: never Ray processes of anyone else) and wait until they are gone."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture
def ray_tmp():
    """A short temporary folder for one Ray session (Unix socket paths are limited to 107 bytes).

    At the end every process started under it is killed, and the test fails if any had been left running.
    """
    folder = tempfile.mkdtemp(prefix="msray", dir="/tmp")
    yield folder
    stop_ray_session(folder)
    shutil.rmtree(folder, ignore_errors=True)


def stop_ray_session(folder: str, grace: float = 10.0) -> None:
    """Stop every process of the Ray session(s) under ``folder`` and check that none is left.

    Ray's agents exit a few seconds after their raylet; what is still there after ``grace`` is killed.
    """
    deadline = time.monotonic() + grace
    while ray_processes(folder, folder=folder) and time.monotonic() < deadline:
        time.sleep(0.25)
    kill_processes(ray_processes(folder, folder=folder))
    left = ray_processes(folder, folder=folder)
    assert not left, f"Ray processes still running: {sorted(left)}"


def local_ray(folder: str) -> dict:
    """A small private local Ray: one CPU, 200 MB object store, under ``folder``."""
    return {"num_cpus": 1, "object_store_mb": 200, "temp_dir": folder}


def _by_value() -> None:
    # Ray workers receive the fakes and loaders of this module by value: they may not import ``tests``.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- models -------------------------------------------------------------------------------------


def threshold_bundle(path: Path, low_hu: float) -> Path:
    """A MONAI bundle whose 'liver' is CT tissue above ``low_hu`` (no training: a hand-set 1x1x1 convolution)."""
    (path / "configs").mkdir(parents=True)
    (path / "models").mkdir()
    network = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}
    section = {"labels": {"liver": 1}, "size": [32, 32, 16], "intensity": {"kind": "ct_window", "window": [-200, 300]}}
    (path / "configs" / "inference.json").write_text(json.dumps({"network_def": network, "medsegagent": section}))
    conv = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = 40.0  # logit 0 at the threshold; intensity is (HU + 200) / 500
        conv.bias[1] = -40.0 * (low_hu + 200.0) / 500.0
    torch.save(conv.state_dict(), path / "models" / "model.pt")
    return path


def demo_registry(tmp_path: Path):
    """The packaged registry with the two demo CT models replaced by threshold bundles (100 and 60 HU)."""
    data = yaml.safe_load(load_registry().path.read_text())
    refs = data["datasets"]["Demo_CT_Abdomen"]["models"]
    for ref, low in zip(refs, (100.0, 60.0), strict=False):
        ref["location"] = str(threshold_bundle(tmp_path / f"bundle-{ref['name']}", low))
    custom = tmp_path / "registry.yaml"
    custom.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_registry(custom)


class FakeModel:
    """Answers 'ball' everywhere after ``delay`` s, or raises ``fail``; marks each prediction in ``marks``."""

    def __init__(self, name: str, *, delay: float = 0.0, fail: str | None = None, marks: str | None = None):
        self.name = name
        self.labels = {"ball": (1,)}
        self.device = torch.device("cpu")
        self.delay, self.fail, self.marks = delay, fail, marks
        self.memory_bytes = 0

    def predict(self, images, labels=None) -> Prediction:
        if self.marks:
            Path(self.marks, f"{self.name}.{os.getpid()}.{time.monotonic_ns()}").touch()
        time.sleep(self.delay)
        if self.fail is not None:
            raise RuntimeError(self.fail)
        geo = StudyImages.of(images).primary.geometry
        return Prediction(self.name, geo, geo, {"ball": np.ones(geo.shape, np.float32)})


def fake_loader(behaviour: dict, spec: ModelSpec, device: str | None) -> FakeModel:
    options = dict(behaviour.get(spec.name, {}))
    if "load_error" in options:
        raise RuntimeError(options["load_error"])
    return FakeModel(spec.name, **options)


def spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, backend="torchscript", path=f"/models/{name}", labels={"ball": (1,)})


def volume(shape=(6, 8, 8)) -> Volume:
    geo = Geometry(shape, (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (2.0, 1.0, 1.0))
    return Volume(np.zeros(shape, np.float32), geo, "CT", "1.2.3")


def marks(folder: Path, model: str) -> list[int]:
    """Process ids that started a prediction of ``model``, in order."""
    found = sorted(folder.glob(f"{model}.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    return [int(p.name.split(".")[1]) for p in found]


# -- configuration (no Ray) -----------------------------------------------------------------------


def test_executor_section_builds_the_configured_executor():
    default = parse_config({})
    assert default.executor.kind is ExecutorKind.INPROCESS
    built = build_executor(default)
    assert isinstance(built, InProcessExecutor) and built.workers == 2
    config = parse_config(
        {
            "executor": {
                "kind": "ray",
                "address": "ray://127.0.0.1:10001",
                "num_gpus_per_model": 0.5,
                "replicas": 2,
                "models": {"demo_ct_unet": {"prefer": "gpu_a", "num_gpus": 1}},
            }
        }
    )
    executor = build_executor(config)
    assert isinstance(executor, RayExecutor) and executor.address == "ray://127.0.0.1:10001"
    assert executor.num_gpus_per_model == 0.5 and executor.replicas == 2
    assert executor.placement["demo_ct_unet"] == ModelPlacement(num_gpus=1, prefer="gpu_a")
    with pytest.raises(ConfigError) as err:
        parse_config({"executor": {"kind": "spark", "address": "a b", "models": {"x": {"gpus": 1}}}})
    text = str(err.value)
    assert "executor.kind" in text and "executor.address" in text and "executor.models.x" in text


def test_node_requeues_a_study_while_the_cluster_is_unavailable(phantom_factory, tmp_path):
    """The job store keeps the study: re-queued, then failed-retryable, then run once the executor is back."""
    registry = demo_registry(tmp_path)
    config = parse_config(
        {
            "node": {"data_dir": str(tmp_path / "var"), "collection": "demo", "min_free_disk_mb": 1},
            "http": {"enabled": False},
            "executor": {"max_job_attempts": 2, "retry_delay_s": 0},
        }
    )
    node = Node(config, registry=registry)
    _, files = phantom_factory("CT")
    study_uid = pydicom.dcmread(next(iter(files.dicom_dir.rglob("*.dcm"))), stop_before_pixels=True).StudyInstanceUID
    shutil.copytree(files.dicom_dir, node.spool_dir / study_uid)

    class Down:
        def run(self, jobs, images):
            raise ClusterUnavailable("the Ray head 127.0.0.1:6379 is unreachable")

        def close(self) -> None:
            pass

    node.executor = Down()
    created = node.store.create_job(study_uid, explicit_request="liver")
    first = node.process(node.store.claim_next())
    assert first.id == created.id and first.state is JobState.RECEIVED
    assert "cluster unavailable (will retry)" in first.error
    second = node.process(node.store.claim_next())
    assert second.state is JobState.FAILED and "retry with POST" in second.error
    node.store.retry(second.id)
    node.executor = InProcessExecutor(ModelCache())
    done = node.process(node.store.claim_next())
    assert done.state is JobState.DELIVERED and done.attempts == 3  # no destinations: done once written
    assert (Path(done.result_dir) / "seg.dcm").is_file()


# -- Ray ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_path_matches_the_in_process_path_end_to_end(phantom_factory, tmp_path, ray_tmp):
    """``segment_folder`` with either executor: identical labels, reports and SEG pixel data."""
    registry = demo_registry(tmp_path)
    _, files = phantom_factory("CT")
    run = functools.partial(segment_folder, files.dicom_dir, "liver", collection="demo")
    local = run(tmp_path / "in-process", RunContext(registry, InProcessExecutor(ModelCache())))
    with RayExecutor(num_cpus_per_model=0.5, local=local_ray(ray_tmp)) as executor:
        remote = run(tmp_path / "ray", RunContext(registry, executor))
        nodes = executor.actor_nodes()
        assert set(executor.placements) == {"demo_ct_unet", "demo_ct_unet_bn"}
    assert local.labels.any() and np.array_equal(local.labels, remote.labels)
    for key in ("segments", "skipped_targets"):
        assert local.report[key] == remote.report[key]
    assert [(m["name"], m["status"], m["device"]) for m in local.report["models"]] == [
        (m["name"], m["status"], m["device"]) for m in remote.report["models"]
    ]
    assert len(local.report["segments"][0]["weights"]) == 2  # both models voted
    assert pydicom.dcmread(local.seg_path).PixelData == pydicom.dcmread(remote.seg_path).PixelData
    assert sorted(nodes) == ["demo_ct_unet", "demo_ct_unet_bn"] and all(len(v) == 1 for v in nodes.values())


@pytest.mark.slow
def test_failures_and_timeouts_as_in_process_and_models_stay_loaded(ray_tmp):
    _by_value()
    behaviour = {
        "good": {},
        "crashes": {"fail": "CUDA out of memory"},
        "hangs": {"delay": 120.0},
        "broken": {"load_error": "model broken: weights missing"},
    }
    loader = functools.partial(fake_loader, behaviour)
    jobs = [ModelTask(spec(name)) for name in behaviour]
    expected = InProcessExecutor(ModelCache(loader=loader), workers=4, timeout_s=2.0).run(jobs, volume())
    with RayExecutor(num_cpus_per_model=0.2, timeout_s=2.0, loader=loader, local=local_ray(ray_tmp)) as executor:
        # Connected from a thread that then ends (as a node's worker thread may): the local Ray must outlive it.
        connector = threading.Thread(target=executor.connect)
        connector.start()
        connector.join()
        t0 = time.monotonic()
        results = executor.run(jobs, volume())
        assert time.monotonic() - t0 < 90  # actor start-up, not the hung model's two minutes
        assert "hangs" not in executor.actor_nodes()  # the hung model's actor was killed
        again = executor.run([ModelTask(spec("good"))], volume())["good"]
    assert list(results) == list(expected)
    assert [(r.status, r.error) for r in results.values()] == [(r.status, r.error) for r in expected.values()]
    assert results["good"].prediction.labels == ["ball"]
    assert again.ok and again.seconds["load"] == 0.0  # kept loaded in its actor


@pytest.mark.slow
def test_a_lost_worker_process_costs_only_its_part(ray_tmp, tmp_path):
    """The actor of one model is killed mid-prediction: Ray restarts it, the call is retried, the study completes."""
    _by_value()
    loader = functools.partial(fake_loader, {"victim": {"delay": 4.0, "marks": str(tmp_path)}, "steady": {}})
    executor = RayExecutor(num_cpus_per_model=0.5, loader=loader, local=local_ray(ray_tmp))
    outcome: dict = {}
    worker = threading.Thread(
        target=lambda: outcome.update(executor.run([ModelTask(spec("victim")), ModelTask(spec("steady"))], volume()))
    )
    try:
        worker.start()
        wait_for(lambda: marks(tmp_path, "victim"), 120, "the victim's prediction to start")
        first = marks(tmp_path, "victim")[0]
        kill_processes({first})
        worker.join(120)
        assert not worker.is_alive()
        assert outcome["victim"].ok and outcome["steady"].ok
        pids = marks(tmp_path, "victim")
        assert len(pids) >= 2 and pids[-1] != first  # retried in a fresh actor process
    finally:
        executor.close()


@pytest.mark.slow
def test_a_lost_head_raises_cluster_unavailable_and_the_process_survives(ray_tmp, tmp_path):
    """GCS killed mid-study: ``run`` raises within the grace time, Ray's 60 s driver kill never comes, and the
    next study runs on a fresh local Ray."""
    _by_value()
    loader = functools.partial(fake_loader, {"slow": {"delay": 60.0, "marks": str(tmp_path)}, "quick": {}})
    executor = RayExecutor(
        num_cpus_per_model=0.5, head_grace_s=3.0, probe_interval_s=0.5, loader=loader, local=local_ray(ray_tmp)
    )
    outcome: dict = {}

    def study() -> None:
        try:
            executor.run([ModelTask(spec("slow")), ModelTask(spec("quick"))], volume())
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=study)
    try:
        worker.start()
        wait_for(lambda: marks(tmp_path, "slow"), 120, "the slow prediction to start")
        gcs = ray_processes(ray_tmp, "gcs_server")
        assert gcs
        kill_processes(gcs)
        killed_at = time.monotonic()
        worker.join(60)
        assert not worker.is_alive()
        assert isinstance(outcome.get("error"), ClusterUnavailable)
        assert time.monotonic() - killed_at < 40  # well before the slow model would have finished
        import ray

        assert not ray.is_initialized()  # disconnected cleanly
        kill_processes(ray_processes(ray_tmp, folder=ray_tmp))  # what is left of the dead session
        result = executor.run([ModelTask(spec("quick"))], volume())["quick"]  # a fresh local Ray
        assert result.ok
        # Past the 60 s after which Ray would have terminated a driver still attached to the dead GCS.
        time.sleep(max(0.0, 65 - (time.monotonic() - killed_at)))
        assert executor.run([ModelTask(spec("quick"))], volume())["quick"].ok
    finally:
        executor.close()
