"""Published MONAI bundles, run with their own preprocessing, inferer and postprocessing.

A bundle of the MONAI Model Zoo describes its whole inference in
``configs/inference.json`` (or ``.yaml``): ``network_def``, a ``preprocessing``
Compose that starts with ``LoadImaged``, an ``inferer`` and a ``postprocessing``
Compose that ends with ``SaveImaged``.  :class:`PublishedBundleModel` parses
that file with MONAI's :class:`~monai.bundle.ConfigParser` and runs it the way
MONAI Deploy's ``MonaiBundleInferenceOperator`` does, with the file readers
and writers taken out:

1. the node's series (one per input channel, picked by the registry's
   ``inputs``) become :class:`~monai.data.MetaTensor` objects with the RAS
   affine and channel metadata ``LoadImaged`` would have given them, under the
   keys the bundle's ``LoadImaged`` fills;
2. the bundle's ``preprocessing`` (minus the loader), its ``inferer`` with
   ``network_def`` and the weights its ``CheckpointLoader`` names, and its
   ``postprocessing`` (minus the writers) run unchanged, so ``Invertd``
   brings the output back to the input's space;
3. the output becomes a :class:`~medsegagent.models.backends.Prediction` on
   the grid its affine describes (the source grid after ``Invertd``).

Outputs are probabilities where the postprocessing keeps them: when an
``Activationsd`` comes before its first ``AsDiscreted`` and nothing but
``AsDiscreted`` after it (``Activationsd``, ``Invertd``, ``AsDiscreted``), the
node stops there and fuses per-channel probabilities, already on the input's
grid.  Otherwise (discretised before ``Invertd``, or followed by label
re-coding or mask filters) the chain runs to its end and the node reads the
label map (or per-channel masks) it ends with.  Registry label values are
output channels, as ``configs/metadata.json``
(``network_data_format.outputs.pred.channel_def``) numbers them, which are
also the values of an argmax label map; a bundle that re-codes its labels
(BraTS: 1, 2, 4) is given the re-coded values.

A bundle's own code (``scripts/``) is imported under a private module name
(:func:`bundle_code_names`) and the config's references to it are renamed, so
bundles never share a ``scripts`` module and ``sys.path`` is left alone.

The registry describes only what the bundle cannot: which series feed which
input channel, the labels' codes and, in ``options``, ``config`` (another
``configs/`` file), ``weights`` (the file in ``models/`` to load), ``overrides``
(config id -> content, as ``monai.bundle run --id value``; e.g. a device a
config pins to CUDA) and ``contrast_phases`` (multi-phase CT inputs).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsegagent.dicom.nifti import geometry_from_affine
from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.backends import (
    ChannelError,
    ModelLoadError,
    ModelSpec,
    MonaiBundleModel,
    Prediction,
    SegmentationModel,
    StudyImages,
    _label_maps,
    _wanted,
    assemble_channels,
    bundle_config_file,
    load_weights,
    module_bytes,
    quiet_stdout,
    select_device,
)

log = logging.getLogger(__name__)

__all__ = [
    "BundleIO",
    "ContrastPhase",
    "OutputKind",
    "PublishedBundleModel",
    "bundle_code_names",
    "bundle_config_file",
    "contrast_phase",
    "load_bundle",
    "load_weights",
    "numpy_safe_globals",
]

#: Transforms that read or write files: the node feeds memory and takes memory back.
_LOADERS = frozenset({"LoadImage", "LoadImaged", "LoadImageD", "LoadImageDict"})
_WRITERS = frozenset({"SaveImage", "SaveImaged", "SaveImageD", "SaveImageDict"})


class OutputKind(StrEnum):
    """What the node reads from a bundle's postprocessing."""

    #: Per-channel probabilities: the chain stopped before its discretisation.
    PROBABILITIES = "probabilities"
    #: What the whole chain gives: one label map (values are labels) or a binary mask per channel.
    LABELS = "labels"


class ContrastPhase(StrEnum):
    """Contrast phase of a CT series, for bundles that take several phases as channels."""

    UNENHANCED = "unenhanced"
    ARTERIAL = "arterial"
    VENOUS = "venous"
    EXCRETORY = "excretory"


# Series descriptions as scanners and PACS rules write them; checked in this order.
_PHASE_PATTERNS: tuple[tuple[ContrastPhase, re.Pattern[str]], ...] = (
    (ContrastPhase.UNENHANCED, re.compile(r"\b(non[- ]?contrast|unenhanced|native|plain|pre[- ]?contrast|nc)\b")),
    (ContrastPhase.ARTERIAL, re.compile(r"\b(arterial|art|angio\w*|cta)\b")),  # before "late": late arterial
    # "late" alone is a late (excretory) phase; "late venous" is venous.
    (
        ContrastPhase.EXCRETORY,
        re.compile(r"\b(excret\w*|delay(ed|s)?|urograph\w*|pyelograph\w*|late(?!\s+(venous|portal|pv)\b))\b"),
    ),
    (ContrastPhase.VENOUS, re.compile(r"\b(venous|portal|pv|nephrograph\w*)\b")),
)


def contrast_phase(volume: Volume) -> ContrastPhase | None:
    """The contrast phase of a CT series from its Series Description, ``None`` when it names none.

    Parameters
    ----------
    volume : Volume
        A series of the study (``meta["SeriesDescription"]``).
    """
    text = str(volume.meta.get("SeriesDescription", "")).lower().replace("_", " ")
    return next((phase for phase, pattern in _PHASE_PATTERNS if pattern.search(text)), None)


@dataclass(frozen=True)
class BundleIO:
    """Where the node puts a bundle's inputs and finds its output.

    Attributes
    ----------
    image_keys : tuple of str
        Keys the bundle's ``LoadImaged`` filled with images (``("image",)``;
        the renal bundle: ``("artery", "vein", "excret")``).
    network_input : str
        Key of the preprocessed network input (the first input of ``network_data_format``).
    output : str
        Key of the network output in the postprocessing (the first output, ``pred``).
    input_channels : int
        Channels the network takes.
    channel_def : dict
        Output channel -> the bundle's name for it.
    meta_keys : dict
        Image key -> key of the meta dictionary the loader also filled (bundle
        code such as the renal bundle's ``ConcatImages`` reads it).
    channel_first : bool
        The loader added the channel axis (``ensure_channel_first``).
    """

    image_keys: tuple[str, ...]
    network_input: str
    output: str
    input_channels: int
    channel_def: Mapping[int, str]
    meta_keys: Mapping[str, str] = field(default_factory=dict)
    channel_first: bool = False


# --------------------------------------------------------------------------- loading


def load_bundle(spec: ModelSpec, device: str | None = None) -> SegmentationModel:
    """Load a MONAI bundle: a published one as it is published, a node demo bundle as before.

    A config with a ``preprocessing`` section and no ``medsegagent`` section is
    a published bundle (:class:`PublishedBundleModel`); the node's own demo
    bundles (a ``medsegagent`` section) and bare ``network_def`` bundles keep
    the registry-described preprocessing of
    :class:`~medsegagent.models.backends.MonaiBundleModel`.

    Parameters
    ----------
    spec : ModelSpec
        The model reference.
    device : str, optional
        Overrides ``spec.device``.
    """
    try:
        config_file = bundle_config_file(spec.path, spec.options.get("config"))
    except ModelLoadError as exc:
        raise ModelLoadError(f"model {spec.name}: {exc}") from None
    from monai.bundle import ConfigParser

    try:
        config = ConfigParser.load_config_files(config_file)  # as ConfigParser.read_config reads it
    except Exception as exc:
        raise ModelLoadError(f"model {spec.name}: cannot read {config_file}: {exc}") from exc
    if isinstance(config, dict) and "preprocessing" in config and "medsegagent" not in config:
        return PublishedBundleModel(spec, device, config=config)
    return MonaiBundleModel(spec, device)


def _target_name(item: object) -> str:
    """Class name of a config component (``monai.transforms.LoadImaged`` -> ``LoadImaged``), else ``""``."""
    target = item.get("_target_") if isinstance(item, dict) else None
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else ""


def _components(config: object, prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every component of a raw config with its id (``handlers::0``)."""
    if isinstance(config, dict):
        if "_target_" in config:
            yield prefix, config
        items: Iterator[tuple[Any, Any]] = iter(config.items())
    elif isinstance(config, list):
        items = iter(enumerate(config))
    else:
        return
    for key, value in items:
        yield from _components(value, f"{prefix}::{key}" if prefix else str(key))


# --------------------------------------------------------------------------- the bundle's own code

#: Bundle code is imported under private names (``scripts`` of two bundles must not meet in ``sys.modules``).
_PRIVATE_PREFIX = "_medsegagent_bundle_"
#: Private top-level name -> the bundle's package folder or module file.
_private_code: dict[str, Path] = {}
_finder_lock = threading.Lock()
#: Folders of a bundle that hold no code of it.
_NOT_CODE = frozenset({"configs", "models", "docs"})


class _BundleCodeFinder(importlib.abc.MetaPathFinder):
    """Finds a bundle's top-level packages under their private names; their submodules come from their folders."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        """The spec of a registered private name (a package with or without ``__init__.py``, or a module)."""
        where = _private_code.get(fullname)
        if where is None:
            return None
        if where.is_file():
            return importlib.util.spec_from_file_location(fullname, where)
        if (where / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(
                fullname, where / "__init__.py", submodule_search_locations=[str(where)]
            )
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)  # a namespace package
        spec.submodule_search_locations = [str(where)]
        return spec


def bundle_code_names(root: Path) -> dict[str, str]:
    """Register the bundle's own packages and modules (``scripts``) under private names, and return them.

    Each top-level folder holding ``.py`` files and each ``.py`` file of the
    bundle folder gets the name ``_medsegagent_bundle_<digest>_<name>``; the
    digest covers the folder and the code, so a bundle installed again with
    other code is imported afresh.  Nothing is added to ``sys.path``, and the
    modules stay importable for as long as the process runs (bundle code may
    import lazily, and relative imports inside it resolve to the same modules).

    Returns
    -------
    dict
        The bundle's plain name (``scripts``) -> its private module name.
    """
    names: dict[str, str] = {}
    for item in sorted(root.iterdir()):
        if item.is_file() and item.suffix == ".py":
            plain, sources = item.stem, [item]
        elif item.is_dir() and item.name not in _NOT_CODE:
            plain, sources = item.name, sorted(item.rglob("*.py"))
        else:
            continue
        if not sources or not plain.isidentifier():
            continue
        digest = hashlib.sha256(str(item.resolve()).encode())
        for source in sources:
            digest.update(source.relative_to(root).as_posix().encode() + b"\0" + source.read_bytes())
        names[plain] = private = f"{_PRIVATE_PREFIX}{digest.hexdigest()[:16]}_{plain}"
        _private_code[private] = item
    with _finder_lock:
        if not any(isinstance(f, _BundleCodeFinder) for f in sys.meta_path):
            sys.meta_path.append(_BundleCodeFinder())
    return names


def _rename_code(config: Any, names: Mapping[str, str], key: str = "") -> Any:
    """The raw config with the bundle's own module names (``scripts.x.Y``) replaced by their private names.

    ``_target_`` values that start with one and ``$`` expressions that name one
    (``$import scripts.x``, ``$scripts.x.f(...)``) are rewritten; quoted text
    and paths (``'/scripts/'``) are not.
    """
    if isinstance(config, dict):
        return {k: _rename_code(v, names, str(k)) for k, v in config.items()}
    if isinstance(config, list):
        return [_rename_code(v, names) for v in config]
    if not isinstance(config, str) or not names:
        return config
    alternatives = "|".join(re.escape(n) for n in names)
    if key == "_target_":
        return re.sub(rf"^({alternatives})(?=\.|$)", lambda m: names[m[1]], config)
    if config.startswith("$"):
        return re.sub(rf"(?<![\w.'\"/\\-])({alternatives})\b(?![/'\"-])", lambda m: names[m[1]], config)
    return config


def _plain_names(text: str, names: Mapping[str, str]) -> str:
    """``text`` (an error message) with the private module names replaced by the bundle's own."""
    for plain, private in names.items():
        text = text.replace(private, plain)
    return text


def numpy_safe_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` must allow to read numpy arrays, and nothing else.

    The DiNTS bundles' architecture code is a pickle of numpy arrays; since
    torch 2.6 ``torch.load`` refuses it unless these are allowed
    (``torch.serialization.safe_globals``).  Files pickled by numpy 1 name
    ``numpy.core``, by numpy 2 ``numpy._core``: both are allowed.
    """
    core = getattr(np, "_core", None) or np.core
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float16, np.float32, np.float64)
    allowed: list[Any] = [np.ndarray, np.dtype, *{type(np.dtype(k)) for k in kinds}]  # numpy 2: a class per dtype
    for name in ("_reconstruct", "scalar"):
        function = getattr(core.multiarray, name)
        allowed += [(function, f"numpy.core.multiarray.{name}"), (function, f"numpy._core.multiarray.{name}")]
    return allowed


@dataclass
class _Loaded:
    """What a bundle's ``LoadImaged`` would have put in the data dictionary."""

    keys: list[str] = field(default_factory=list)
    #: Image key -> key of its meta dictionary (``LoadImaged(image_only=False)`` adds one).
    meta_keys: dict[str, str] = field(default_factory=dict)
    #: ``LoadImaged(ensure_channel_first=True)``: the loader added the channel axis itself.
    channel_first: bool = False

    def add(self, parser: Any, id: str) -> None:
        """Read the settings of the ``LoadImaged`` at config ``id``."""

        def setting(name: str, default: Any) -> Any:
            return parser.get_parsed_content(f"{id}::{name}", default=default)

        keys = _as_list(setting("keys", []))
        metas = _as_list(setting("meta_keys", None)) or [None] * len(keys)
        postfix = setting("meta_key_postfix", "meta_dict")
        with_meta = not setting("image_only", True)
        self.channel_first |= bool(setting("ensure_channel_first", False))
        for key, meta in zip(keys, metas, strict=False):
            if key not in self.keys:
                self.keys.append(key)
            if with_meta:
                self.meta_keys[key] = meta or f"{key}_{postfix}"


def _as_list(value: Any) -> list[str]:
    """A config's key or keys as a list of str."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _activation(transform: Any, key: str) -> str | None:
    """What an ``Activationsd`` does to ``key``: ``softmax``, ``sigmoid``, ``other`` (a function) or ``None``."""
    keys = list(transform.keys)
    if key not in keys:
        return None
    i = keys.index(key)
    if transform.other[i] is not None:
        return "other"
    if transform.softmax[i]:
        return "softmax"
    return "sigmoid" if transform.sigmoid[i] else None


def _flag(parser: Any, id: str, default: bool) -> bool:
    """A boolean config item (``evaluator::amp``), ``default`` when absent."""
    try:
        return bool(parser.get_parsed_content(id, default=default))
    except Exception:  # an expression the node cannot evaluate: keep the default
        return default


# --------------------------------------------------------------------------- the model


class PublishedBundleModel:
    """A published MONAI bundle, run with its own ``preprocessing``, ``inferer`` and ``postprocessing``.

    See the module documentation for what the node replaces (file readers and
    writers) and what the registry adds (input series, labels, ``options``).

    Parameters
    ----------
    spec : ModelSpec
        The model reference; ``spec.path`` is the bundle folder.
    device : str, optional
        Overrides ``spec.device``; the bundle's ``device`` item is set to it.
    config : dict, optional
        The config file's content when the caller has read it already (:func:`load_bundle`).

    Raises
    ------
    ModelLoadError
        Missing files, a config MONAI cannot instantiate, weights that do not
        fit ``network_def``, or registry inputs/labels that do not fit the
        bundle's ``metadata.json``.
    """

    def __init__(self, spec: ModelSpec, device: str | None = None, *, config: Mapping[str, Any] | None = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.device = select_device(device or spec.device)
        self.channels = spec.channels
        self.root = Path(spec.path)
        self._lock = threading.Lock()  # one study at a time: networks and transforms hold state
        try:
            self.config_file = bundle_config_file(self.root, spec.options.get("config"))
        except ModelLoadError as exc:
            raise self._fail(str(exc)) from None
        self.metadata = self._metadata()
        self.code_names = bundle_code_names(self.root)
        parser = self._parser(config)
        loaded = self._drop_file_transforms(parser)
        self._instantiate(parser)
        self.io = self._io(loaded)
        self.phases = self._phases()
        self.kind, self.activation, self._stop = self._output_kind()
        self.labels = self._labels()
        # Mixed precision (on CUDA) only where the bundle's evaluator asks for it.
        self.amp = _flag(parser, "evaluator::amp", False)

    # ------------------------------------------------------------------ loading

    def _fail(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"model {self.name}: {message}")

    def _metadata(self) -> dict[str, Any]:
        path = self.root / "configs" / "metadata.json"
        try:
            metadata = json.loads(path.read_text())
        except OSError:
            raise self._fail(f"{path} is missing (a published bundle describes its inputs and outputs there)") from None
        except ValueError as exc:
            raise self._fail(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(metadata.get("network_data_format"), dict):
            raise self._fail(f"{path} has no network_data_format")
        return metadata

    def _parser(self, config: Mapping[str, Any] | None) -> Any:
        """The bundle's config with the node's ``bundle_root``, ``device``, overrides and private code names."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        try:
            parser.read_config(dict(config) if config is not None else str(self.config_file))
        except Exception as exc:
            raise self._fail(f"cannot read {self.config_file}: {exc}") from exc
        parser["bundle_root"] = str(self.root)
        parser["device"] = f"$torch.device('{self.device}')"
        overrides = self.spec.options.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise self._fail(f"options.overrides must map config ids to content, got {overrides!r}")
        try:
            parser.update({str(k): v for k, v in overrides.items()})
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise self._fail(f"options.overrides does not fit {self.config_file.name}: {exc}") from exc
        if self.code_names:
            parser.set(_rename_code(parser.get(), self.code_names))
        return parser

    def _drop_file_transforms(self, parser: Any) -> _Loaded:
        """Take ``LoadImaged`` out of the preprocessing and ``SaveImaged`` out of the postprocessing.

        Returns what the loader would have put in the data: its keys, in order,
        the meta-dict key of each (``image_only: false``), and whether it added
        the channel axis itself.
        """
        pre = parser.get("preprocessing::transforms")
        post = parser.get("postprocessing::transforms", [])
        if not isinstance(pre, list) or not isinstance(post, list):
            raise self._fail("preprocessing and postprocessing must each be a Compose with a list of transforms")
        loaded = _Loaded()
        try:
            for i, item in enumerate(pre):
                if _target_name(item) in _LOADERS:
                    loaded.add(parser, f"preprocessing::transforms::{i}")
        except Exception as exc:
            raise self._fail(f"cannot read the settings of the bundle's LoadImaged: {exc}") from exc
        if not loaded.keys:
            raise self._fail("its preprocessing has no LoadImaged: the node cannot tell where the image goes")
        parser["preprocessing::transforms"] = [t for t in pre if _target_name(t) not in _LOADERS]
        if post:
            parser["postprocessing::transforms"] = [t for t in post if _target_name(t) not in _WRITERS]
        return loaded

    def _instantiate(self, parser: Any) -> None:
        """Build the transforms, the inferer and the network, and load the weights its CheckpointLoader names."""
        from monai.inferers import SimpleInferer
        from monai.transforms import Compose

        try:
            # DiNTS prints while it builds: the node's stdout is for results.
            with torch.serialization.safe_globals(numpy_safe_globals()), quiet_stdout():
                self.preprocessing = parser.get_parsed_content("preprocessing")
                self.postprocessing = parser.get_parsed_content("postprocessing", default=Compose([]))
                self.inferer = parser.get_parsed_content("inferer", default=SimpleInferer())
                network = parser.get_parsed_content("network_def")
                weights = self._weights_file(parser)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise self._fail(f"MONAI cannot build {self.config_file.name}: {self._build_error(exc)}") from exc
        self.network = load_weights(network, weights, bundle=self.root, fail=self._fail).to(self.device).eval()

    def _build_error(self, exc: BaseException) -> str:
        """MONAI's message in the bundle's own names, with a hint where the fix is known."""
        chain = [exc]
        while chain[-1].__cause__ is not None and len(chain) < 8:
            chain.append(chain[-1].__cause__)
        message = _plain_names(str(exc), self.code_names)
        text = _plain_names(" ".join(str(e) for e in chain), self.code_names)
        if "cuda" in text.lower() and self.device.type != "cuda":
            return f"{message} (the config pins CUDA; set the item to '@device' in the registry's options.overrides)"
        own = [n for n in self.code_names if f"No module named '{n}" in text]
        if own:
            return (
                f"{message} (the bundle's code imports its own package {own[0]!r} by that name; the node imports "
                f"bundle code under a private name, so such an import must be relative: 'from . import x')"
            )
        return message

    def _weights_file(self, parser: Any) -> Path:
        """``options.weights`` in ``models/``, else the ``load_path`` of the bundle's CheckpointLoader."""
        if self.spec.options.get("weights"):
            return self.root / "models" / str(self.spec.options["weights"])
        for cid, component in _components(parser.get()):
            if _target_name(component) == "CheckpointLoader" and "load_path" in component:
                return Path(str(parser.get_parsed_content(f"{cid}::load_path")))
        return self.root / "models" / "model.pt"

    def _io(self, loaded: _Loaded) -> BundleIO:
        """The bundle's input and output keys and channels, from the transforms and ``metadata.json``."""
        read = {k for t in self.preprocessing.flatten().transforms for k in getattr(t, "keys", ())}
        # The loader may read a label for evaluation; the inputs are the images the preprocessing goes on with.
        image_keys = tuple(k for k in loaded.keys if k in read) or tuple(loaded.keys)
        fmt = self.metadata["network_data_format"]
        inputs, outputs = fmt.get("inputs") or {}, fmt.get("outputs") or {}
        if not inputs or not outputs:
            raise self._fail("metadata.json network_data_format lacks inputs or outputs")
        network_input, output = next(iter(inputs)), next(iter(outputs))
        described = outputs[output].get("channel_def") or outputs[output].get("label_def") or {}
        channel_def = {int(k): str(v) for k, v in described.items()}
        wanted = max(1, len(self.channels))
        if len(image_keys) > 1 and len(image_keys) != wanted:
            raise self._fail(
                f"the bundle loads {len(image_keys)} images {list(image_keys)}, the registry lists "
                f"{wanted} input channel(s)"
            )
        channels = int(inputs[network_input].get("num_channels", len(image_keys)))
        if channels != wanted:
            names = inputs[network_input].get("channel_def") or {}
            raise self._fail(
                f"the network takes {channels} input channel(s) {dict(names) or ''}, the registry's "
                f"dataset lists {wanted}: list them in its inputs, in this order"
            )
        metas = {k: v for k, v in loaded.meta_keys.items() if k in image_keys}
        return BundleIO(image_keys, network_input, output, channels, channel_def, metas, loaded.channel_first)

    def _phases(self) -> tuple[ContrastPhase, ...]:
        raw = self.spec.options.get("contrast_phases") or ()
        try:
            phases = tuple(ContrastPhase(str(p)) for p in raw)
        except ValueError:
            allowed = ", ".join(p.value for p in ContrastPhase)
            raise self._fail(f"options.contrast_phases {list(raw)}: each must be one of {allowed}") from None
        if phases and len(phases) != self.io.input_channels:
            raise self._fail(
                f"options.contrast_phases names {len(phases)} phases for {self.io.input_channels} channels"
            )
        return phases

    def _output_kind(self) -> tuple[OutputKind, str, int | None]:
        """Probabilities when the postprocessing only discretises after its activation and inversion.

        Returns the kind, the activation (``softmax`` adds a label's channels,
        ``sigmoid`` takes their maximum) and where to stop the chain.
        """
        from monai.transforms import Activationsd, AsDiscreted

        steps = list(self.postprocessing.transforms)
        cut = next((i for i, t in enumerate(steps) if isinstance(t, AsDiscreted)), len(steps))
        activated = [t for t in steps[:cut] if isinstance(t, Activationsd)]
        kinds = [_activation(t, self.io.output) for t in activated]
        activation = "softmax" if "softmax" in kinds else "sigmoid"
        # Probabilities only from a plain softmax or sigmoid (an ``other=`` function gives something else).
        plain = bool(kinds) and all(k in ("softmax", "sigmoid") for k in kinds)
        if plain and all(isinstance(t, AsDiscreted) for t in steps[cut:]):
            return OutputKind.PROBABILITIES, activation, cut
        if cut == len(steps) and not activated:
            raise self._fail(
                "its postprocessing neither activates (Activationsd) nor discretises (AsDiscreted) the network output"
            )
        return OutputKind.LABELS, activation, None

    def _labels(self) -> dict[str, tuple[int, ...]]:
        """Registry label -> output channels or label-map values (from channel_def when the registry has none)."""
        defined = self.io.channel_def
        if not self.spec.labels:
            labels = {name: (k,) for k, name in sorted(defined.items()) if name.lower() != "background"}
            if not labels:
                raise self._fail("neither the registry nor metadata.json (channel_def) names its output labels")
            return labels
        if self.kind is OutputKind.PROBABILITIES:
            for name, values in self.spec.labels.items():
                bad = [v for v in values if v not in defined or defined[v].lower() == "background"]
                if bad:
                    raise self._fail(
                        f"registry label {name!r} maps to output channel(s) {bad}, which metadata.json "
                        f"does not define as a structure (channel_def: {dict(defined)})"
                    )
        return dict(self.spec.labels)

    @property
    def memory_bytes(self) -> int:
        """Parameters and buffers of the network."""
        return module_bytes(self.network)

    # ------------------------------------------------------------------ inference

    def predict(self, images: Volume | StudyImages, labels: Collection[str] | None = None) -> Prediction:
        """Run the bundle on the study; maps come back on the grid the postprocessing leaves them on.

        Raises
        ------
        ChannelError
            When the study lacks a series an input channel needs.
        """
        images = StudyImages.of(images)
        wanted = _wanted(self.name, self.labels, labels)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        data = self._inputs(images)
        cuda = self.device.type == "cuda"
        with self._lock, torch.inference_mode():
            data = self.preprocessing(data)
            seconds["preprocess"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            image = data[self.io.network_input]
            # The network sees a plain tensor (MetaTensor bookkeeping on every layer costs more than a small
            # 2D network); the output gets the input's metadata back, as sliding_window_inference gives it.
            batch = torch.as_tensor(image)[None].to(self.device)
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=cuda and self.amp):
                pred = self.inferer(batch, self.network)
            if isinstance(pred, list | tuple | dict):  # several heads: the first is the segmentation
                pred = next(iter(pred.values())) if isinstance(pred, dict) else pred[0]
            seconds["inference"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            data[self.io.output] = _like(pred[0].float(), image)
            data = self.postprocessing(data, end=self._stop)
        out = data[self.io.output]
        grid = _output_grid(out, images.primary.geometry)
        array = torch.as_tensor(out).detach().cpu().float().permute(0, 3, 2, 1)  # (C, x, y, z) -> (C, z, y, x)
        maps = self._maps(array, wanted)
        seconds["postprocess"] = time.perf_counter() - t0
        return Prediction(
            self.name,
            grid,
            images.primary.geometry,
            maps,
            interpolation="linear" if self.kind is OutputKind.PROBABILITIES else "nearest",
            seconds=seconds,
            device=str(self.device),
        )

    def _maps(self, array: torch.Tensor, wanted: Sequence[str]) -> dict[str, np.ndarray]:
        """Per registry label: the probability, or the mask of its channels or label-map values."""
        labels = {name: self.labels[name] for name in wanted}
        if self.kind is OutputKind.PROBABILITIES:
            return _label_maps(self.name, array, labels, self.activation)
        if array.shape[0] == 1 and len(self.io.channel_def) != 1:
            # Invertd may interpolate a label map; the nearest label is what a viewer of its file would show.
            values = torch.round(array[0]).to(torch.int64).numpy()
            return {name: np.isin(values, list(v)).astype(np.uint8) for name, v in labels.items()}
        masks = _label_maps(self.name, (array > 0.5).float(), labels, "sigmoid")
        return {name: (mask > 0.5).astype(np.uint8) for name, mask in masks.items()}

    def _inputs(self, images: StudyImages) -> dict[str, Any]:
        """The study as the bundle's loader would have given it: MetaTensors under its image keys."""
        grid = images.primary.geometry
        # No normalisation: the bundle does its own.
        if self.phases:
            stack = np.concatenate([assemble_channels(v, (), grid) for v in self._phase_series(images)])
        else:
            stack = assemble_channels(images, self.channels, grid)
        source = images.primary.series_instance_uid
        keys = self.io.image_keys
        if len(keys) == 1:
            # One loader key for several files stacks them as channels, as LoadImaged does.
            arrays = {keys[0]: stack if len(stack) > 1 or self.io.channel_first else stack[0]}
        else:
            arrays = {key: stack[i : i + 1] if self.io.channel_first else stack[i] for i, key in enumerate(keys)}
        data: dict[str, Any] = {key: _meta_tensor(array, grid, source) for key, array in arrays.items()}
        for key, meta_key in self.io.meta_keys.items():
            data[meta_key] = dict(data[key].meta)
        return data

    def _phase_series(self, images: StudyImages) -> list[Volume]:
        """One CT series per contrast phase the bundle takes, in channel order."""
        found = [(v, contrast_phase(v)) for v in images.volumes if v.modality == "CT"]
        picked = {phase: next((v for v, p in found if p is phase), None) for phase in self.phases}
        missing = [phase.value for phase, v in picked.items() if v is None]
        if missing:
            have = "; ".join(
                f"'{v.meta.get('SeriesDescription', '')}' ({p.value if p else 'no phase named'})" for v, p in found
            )
            raise ChannelError(
                f"model {self.name} needs CT series of the {', '.join(p.value for p in self.phases)} phases;"
                f" missing: {', '.join(missing)} (CT series of the study: {have or 'none'};"
                " the phase is read from each series' Series Description)"
            )
        return [v for v in picked.values() if v is not None]


# --------------------------------------------------------------------------- arrays and grids


def _like(tensor: torch.Tensor, image: Any) -> Any:
    """``tensor`` with the metadata and transform trace of ``image`` (a MetaTensor), as MONAI's inferers give it."""
    from monai.data import MetaTensor

    if not isinstance(image, MetaTensor):
        return tensor
    return MetaTensor(tensor, meta=dict(image.meta), applied_operations=list(image.applied_operations))


def _meta_tensor(array: np.ndarray, geometry: Geometry, source: str) -> Any:
    """A ``(z, y, x)`` or ``(C, z, y, x)`` array as ``LoadImage`` returns a file: ``(x, y, z)``, RAS affine."""
    from monai.data import MetaTensor
    from monai.utils import MetaKeys, SpaceKeys

    channels = array.ndim == 4
    data = np.ascontiguousarray(array.transpose((0, 3, 2, 1) if channels else (2, 1, 0)), dtype=np.float32)
    affine = torch.as_tensor(geometry.nifti_affine(), dtype=torch.float64)
    meta = {
        MetaKeys.ORIGINAL_AFFINE: affine.clone(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(data.shape[-3:]),
        MetaKeys.ORIGINAL_CHANNEL_DIM: 0 if channels else "no_channel",
        MetaKeys.SPACE: SpaceKeys.RAS,
        "filename_or_obj": source,
    }
    return MetaTensor(torch.from_numpy(data), affine=affine, meta=meta)


def _output_grid(out: Any, source: Geometry) -> Geometry:
    """The grid of a ``(C, x, y, z)`` output: its MetaTensor affine (RAS), or ``source`` when it has none."""
    shape_ijk = (int(out.shape[1]), int(out.shape[2]), int(out.shape[3]))
    affine = getattr(out, "affine", None)
    if affine is None:
        if shape_ijk[::-1] != source.shape:
            raise ValueError(
                f"the bundle's output {shape_ijk[::-1]} has no affine and is not on the source grid {source.shape}"
            )
        return source
    grid = geometry_from_affine(shape_ijk, np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64))
    return source if grid.same_grid(source) else grid
