"""One safe-folder format for everything cspace writes: obstacle sets, preference classifiers,
flow, VAE and teacher weights.

A folder holds a manifest, immutable payload files named by their content, and a lock file::

    manifest.json     {"format": NAME, "format_version": N,
                       "files": {NAME: {"file": STORED, "bytes": SIZE, "sha256": HEX}, ...},
                       "superseded": [STORED, ...], "saved": ISO-8601 time,
                       ...the kind's own JSON fields}
    STORED ...        the payload (safetensors tensors, JSON records; never pickles): the
                      logical file NAME = STEM.EXT is stored as STEM-HASH.EXT, HASH the first
                      12 hex digits of its SHA-256 (e.g. model-a4796c521142.safetensors)
    .cspace-lock      the writers' lock (an empty file)

**Saving** (:func:`write_folder`), one mechanism for every kind:

1. take the folder's lock: an exclusive ``fcntl.flock`` on ``.cspace-lock`` (the folder is
   created first if it is new), so writers of one folder, in any process, run one at a time;
2. check the folder again under the lock: a folder of the same kind (any layout), or empty, or
   holding only entries the caller allows;
3. write each payload file under a temporary name (``.cspace-tmp-*``), fsync it, and rename it
   to its stored name. A stored file is never changed once it exists (its name is its content);
4. write ``manifest.json`` the same way and rename it over the old one **last**: one
   ``os.replace`` of one file is the commit point; then fsync the folder;
5. clean up, still under the lock: temporary files of writers that died, stored files of the
   kind named by no manifest (a dead writer's), and the files the *previous* manifest listed
   as ``superseded``. The files of the version just replaced are kept (and listed as
   ``superseded`` in the new manifest), so that a reader that read the previous manifest still
   finds them; the next save removes them.

Whatever moment a writer dies at, the folder holds the old manifest with all its files, or the
new one with all of its files; a first save to a new path that dies leaves a folder without a
manifest, which does not load (and which the next save takes over). Entries that are not the
kind's own (images kept beside an obstacle set, a training checkpoint) are never touched.

**Reading** (:func:`read_folder`) takes no lock. It checks, in this order, and raises the
kind's error (a subclass of :class:`~cspace.io.errors.FolderError`, a ``ValueError``) naming the
file, the field and what to do:

1. the folder exists (else the kind's *missing* error: :class:`~cspace.io.errors.MissingWeightsError`
   for model weights, with the command that makes them);
2. ``manifest.json`` is a regular file (not a symbolic link, a FIFO or a device) of at most
   :data:`MAX_MANIFEST_BYTES`, UTF-8 JSON nested at most :data:`MAX_JSON_DEPTH` levels
   (:func:`cspace.io.untrusted.parse_json`), an object;
3. its ``format`` is the kind's and ``format_version`` lies in the range the kind reads;
4. every file of the ``files`` table has a plain name and the stored name its checksum gives,
   is a regular file, has the listed size (checked *before* the file is read) and the listed
   SHA-256;
5. the kind's required files are listed.

When a read fails while the manifest changed under it (a writer committed a new version and a
later one removed the files the reader was about to read), the read starts over, up to
:data:`READ_ATTEMPTS` times. The kinds then check the type and range of every field they use
(:func:`check_int`, :func:`check_number`, :func:`check_str_list`, ...), so a crafted manifest
gives an error naming the field, never an ``OverflowError`` or a ``TypeError``.

A :class:`FolderKind` describes one kind; its older layouts are read by the legacy readers of
:mod:`cspace.io.legacy` (folders without ``manifest.json``, and manifests of an older
``format_version``: before version 3 the payload files had their plain names), which return the
same :class:`Folder` as the current layout, so each kind decodes one layout only.
:func:`migrate_folder` rewrites a legacy folder in the current format.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import math
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cspace.io.errors import FolderError
from cspace.io.files import sha256_hex
from cspace.io.untrusted import MAX_JSON_DEPTH, FormatError, parse_json

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: writers are not serialised there
    fcntl = None

__all__ = [
    "LOCK_FILE",
    "MANIFEST",
    "MAX_JSON_DEPTH",
    "MAX_MANIFEST_BYTES",
    "READ_ATTEMPTS",
    "RESERVED_FIELDS",
    "STORED_NAMES_FROM",
    "TMP_PREFIX",
    "Folder",
    "FolderError",
    "FolderKind",
    "Legacy",
    "check_int",
    "check_number",
    "check_str",
    "check_str_list",
    "check_target",
    "folder_kind_of",
    "folder_lock",
    "is_folder_of",
    "migrate_folder",
    "read_folder",
    "read_json_file",
    "read_regular_file",
    "stored_name",
    "verify_files",
    "write_folder",
]

MANIFEST = "manifest.json"
#: the writers' lock file inside every folder
LOCK_FILE = ".cspace-lock"
#: the prefix of a writer's temporary files (removed by the next save when a writer died)
TMP_PREFIX = ".cspace-tmp-"
#: the largest manifest.json read (bulky records go into JSON payload files instead)
MAX_MANIFEST_BYTES = 1 << 20
#: manifest fields every kind shares (a kind's own fields use other names)
RESERVED_FIELDS = ("format", "format_version", "files", "saved", "superseded")
#: the first format_version whose payload files are stored under content-addressed names
STORED_NAMES_FROM = 3
#: how many times a read starts over when the folder changed while it was being read
READ_ATTEMPTS = 20
#: how long a writer waits for another writer of the same folder before giving up (seconds)
LOCK_TIMEOUT_S = 600.0
_HASH_CHARS = 12
_STORED = re.compile(r"^(?P<stem>[^.]+)-(?P<hash>[0-9a-f]{12})(?P<ext>\..+)?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 24
_MISSING = object()
# reads never follow a symbolic link nor wait on a FIFO
_READ_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_BINARY", 0)
)


@dataclass(frozen=True)
class Legacy:
    """An older layout of a kind, read by a function of :mod:`cspace.io.legacy`.

    Attributes:
        name: the layout, for messages (e.g. ``"cspace-flow v1 (config.json)"``).
        files: the files the layout consists of (removed by the second save over it).
        detect: for layouts without ``manifest.json``: whether a folder is in this layout.
        read: ``read(path, kind) -> Folder`` in the current layout (verified).
        version: for older manifests of the same format: the ``format_version`` it reads;
            ``read`` is then ``read(folder, kind) -> Folder`` on the verified old folder.
    """

    name: str
    files: tuple[str, ...]
    read: Callable[..., Folder]
    detect: Callable[[Path], bool] | None = None
    version: int | None = None


@dataclass(frozen=True)
class FolderKind:
    """What :func:`read_folder` and :func:`write_folder` need to know about one kind.

    Attributes:
        format: the manifest's ``format`` name.
        version: the ``format_version`` written (and the newest read).
        what: the noun in "not a cspace WHAT manifest".
        a_what: the noun phrase in "is not A_WHAT" (e.g. "an obstacle set").
        error: the kind's :class:`FolderError` subclass.
        files: payload files every folder of the kind holds.
        optional: payload files some folders of the kind hold (a VAE's VF projection): not
            required, but the kind's own, so that a save takes over a folder a dead writer left
            with only such a file, and removes one the new version no longer lists.
        fix: what to do about a damaged folder (appended to errors).
        missing: ``missing(path, detail) -> Exception`` for an absent folder (or one without a
            manifest and not in a legacy layout); default: ``error``.
        legacy: the older layouts still read.
    """

    format: str
    version: int
    what: str
    a_what: str
    error: type[FolderError]
    files: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    fix: str = ""
    missing: Callable[[Path, str], BaseException] | None = None
    legacy: tuple[Legacy, ...] = field(default=())

    @property
    def min_version(self) -> int:
        return min([self.version] + [lg.version for lg in self.legacy if lg.version is not None])

    @property
    def own_names(self) -> frozenset[str]:
        """The plain names of the kind's payload files, now and in its older layouts."""
        names = set(self.files) | set(self.optional)
        for lg in self.legacy:
            names.update(lg.files)
        names.discard(MANIFEST)
        return frozenset(names)

    def fail(self, message: str, path: str | os.PathLike | None = None) -> FolderError:
        """The kind's error with ``fix`` appended."""
        text = f"{message}; {self.fix}" if self.fix else message
        return self.error(text, path)

    def absent(self, path: Path, detail: str) -> BaseException:
        if self.missing is not None:
            return self.missing(path, detail)
        return self.error(f"{path} is not {self.a_what}: {detail}", path)


@dataclass
class Folder:
    """A verified folder: its manifest (the kind's fields and the shared ones) and payload.

    ``files`` maps each logical file name (``model.safetensors``) to its bytes; ``stored`` maps
    it to the name of the file on disk where that differs (``model-<hash>.safetensors``, or
    ``index.faiss`` for the embeddings of an older obstacle set). ``legacy`` names the layout
    it was read from (None: the current one).
    """

    path: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]
    kind: FolderKind
    legacy: str | None = None
    stored: dict[str, str] = field(default_factory=dict)

    @property
    def mpath(self) -> Path:
        return self.path / MANIFEST

    @property
    def fields(self) -> dict[str, Any]:
        """The kind's own manifest fields (without format, version, files, saved, superseded)."""
        return {k: v for k, v in self.manifest.items() if k not in RESERVED_FIELDS}

    def file(self, name: str) -> Path:
        """The path of the logical file ``name`` on disk (for messages)."""
        return self.path / self.stored.get(name, name)

    def sha256(self, name: str) -> str:
        return self.manifest["files"][name]["sha256"]

    def require(self, *names: str) -> list[Any]:
        """The manifest fields ``names``; the kind's error if one is absent."""
        missing = [n for n in names if n not in self.manifest]
        if missing:
            raise self.kind.fail(f"{self.mpath} lacks a required field: {missing[0]!r}", self.mpath)
        return [self.manifest[n] for n in names]

    def get(self, name: str, default: Any = _MISSING) -> Any:
        """The manifest field ``name`` (``default`` when absent; the kind's error when absent
        and no default is given)."""
        if name in self.manifest:
            return self.manifest[name]
        if default is _MISSING:
            raise self.kind.fail(f"{self.mpath} lacks a required field: {name!r}", self.mpath)
        return default

    def json(self, name: str) -> Any:
        """A JSON payload file, parsed with the limits of :func:`read_json_file` on depth (its
        size is the verified size of the file); the kind's error if it is not such JSON."""
        data = self.files[name]
        try:
            return parse_json(data, max_bytes=len(data), max_depth=MAX_JSON_DEPTH)
        except FormatError as err:
            where = self.file(name)
            raise self.kind.fail(f"{where} is corrupt or not JSON: {err}", where) from None


# ---------------------------------------------------------------------- checks of fields
def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _field_error(kind: FolderKind, where: Path, name: str, want: str, value: Any) -> FolderError:
    return kind.fail(f"{where}: field {name!r} must be {want}; got {_show(value)}", where)


def check_int(value: Any, name: str, where: Path, kind: FolderKind, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi] (a JSON integer: not a float, a bool or a string); the
    kind's error naming ``name`` and ``where`` otherwise."""
    if type(value) is not int or not lo <= value <= hi:
        raise _field_error(kind, where, name, f"an integer in [{lo}, {hi}]", value)
    return value


def check_number(
    value: Any,
    name: str,
    where: Path,
    kind: FolderKind,
    lo: float = -math.inf,
    hi: float = math.inf,
    *,
    none: bool = False,
) -> float | None:
    """``value`` as a finite float in [lo, hi] (None passes when ``none``); the kind's error
    naming the field otherwise."""
    if value is None and none:
        return None
    ok = type(value) in (int, float) and math.isfinite(value) and lo <= value <= hi
    if not ok:
        want = f"a finite number in [{lo}, {hi}]" + (" or null" if none else "")
        raise _field_error(kind, where, name, want, value)
    return float(value)


def check_str(value: Any, name: str, where: Path, kind: FolderKind) -> str:
    """``value`` as a str; the kind's error naming the field otherwise."""
    if not isinstance(value, str):
        raise _field_error(kind, where, name, "a string", value)
    return value


def check_str_list(
    value: Any, name: str, where: Path, kind: FolderKind, n: int | None = None
) -> list[str]:
    """``value`` as a list of ``n`` strings (any length when ``n`` is None)."""
    count = "" if n is None else f"{n} "
    if not isinstance(value, list) or (n is not None and len(value) != n):
        got = f"{len(value)} entries" if isinstance(value, list) else _show(value)
        raise kind.fail(
            f"{where}: field {name!r} must be a list of {count}strings; got {got}", where
        )
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise _field_error(kind, where, f"{name}[{i}]", "a string", v)
    return value


# ---------------------------------------------------------------------- reading
def read_regular_file(
    path: Path, size: int | None, kind: FolderKind, *, max_size: int | None = None
) -> bytes:
    """The bytes of ``path``, a regular file (a symbolic link, a FIFO, a device or a folder is
    refused) of exactly ``size`` bytes, or of at most ``max_size`` bytes when ``size`` is
    None; sizes are checked before the file is read."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise kind.fail(f"{path} is missing", path) from None
    if stat.S_ISLNK(st.st_mode):
        raise kind.fail(
            f"{path} is a symbolic link, not a regular file: refusing to follow it (copy the "
            "file itself into the folder)",
            path,
        )
    if not stat.S_ISREG(st.st_mode):
        raise kind.fail(f"{path} is not a regular file", path)
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise kind.fail(f"{path} is missing", path) from None
    except OSError as err:
        raise kind.fail(f"{path} cannot be opened: {err}", path) from err
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise kind.fail(f"{path} is not a regular file", path)
        if size is not None and st.st_size != size:
            raise kind.fail(
                f"{path} has {st.st_size} bytes but the manifest says {size}: truncated or "
                "replaced",
                path,
            )
        if max_size is not None and st.st_size > max_size:
            raise kind.fail(
                f"{path} has {st.st_size} bytes, more than the {max_size} such a file may have",
                path,
            )
        data = fh.read(st.st_size + 1)
    if size is not None and len(data) != size:
        raise kind.fail(
            f"{path} has {len(data)} bytes but the manifest says {size}: truncated or replaced "
            "(it changed while being read)",
            path,
        )
    if max_size is not None and len(data) > max_size:
        raise kind.fail(
            f"{path} grew beyond the {max_size} bytes such a file may have while being read", path
        )
    return data


def _parse_json(data: bytes, path: Path, kind: FolderKind) -> Any:
    try:
        return parse_json(data, max_bytes=MAX_MANIFEST_BYTES, max_depth=MAX_JSON_DEPTH)
    except FormatError as err:
        raise kind.fail(f"{path} is corrupt or not JSON: {err}", path) from None


def read_json_file(path: Path, kind: FolderKind) -> Any:
    """A JSON file of a folder of ``kind`` (a manifest, a legacy config): a regular file of at
    most :data:`MAX_MANIFEST_BYTES`, UTF-8 JSON nested at most :data:`MAX_JSON_DEPTH` levels;
    the kind's error otherwise."""
    return _parse_json(read_regular_file(path, None, kind, max_size=MAX_MANIFEST_BYTES), path, kind)


def _check_manifest(manifest: Any, mpath: Path, kind: FolderKind) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != kind.format:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise kind.error(
            f"{mpath} is not a cspace {kind.what} manifest (format {_show(got)}, expected "
            f"{kind.format!r})",
            mpath,
        )
    return manifest


def _check_version(path: Path, manifest: dict, kind: FolderKind) -> int:
    version = manifest.get("format_version")
    lo, hi = kind.min_version, kind.version
    if type(version) is not int or not lo <= version <= hi:
        newer = type(version) is int and version > hi
        hint = f" (upgrade cspace to read newer {kind.what} folders)" if newer else ""
        reads = f"version {hi}" if lo == hi else f"versions {lo}..{hi}"
        shown = repr(version) if len(repr(version)) <= 40 else repr(version)[:37] + "..."
        raise kind.error(
            f"{path} has format_version {shown}; this cspace reads {reads}{hint}", path
        )
    return version


def stored_name(name: str, sha256: str) -> str:
    """The name a payload file ``name`` = STEM.EXT with this SHA-256 is stored under:
    STEM-HASH.EXT, HASH the first 12 hex digits of the digest."""
    stem, dot, ext = name.partition(".")
    return f"{stem}-{sha256[:_HASH_CHARS]}{dot}{ext}"


def _plain(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", MANIFEST)
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
    )


def verify_files(
    path: Path, table: Any, kind: FolderKind, where: str = MANIFEST, *, stored: bool = False
) -> dict[str, bytes]:
    """Read and verify every file of a ``files`` table (name -> {"bytes", "sha256"}, and with
    ``stored`` the ``"file"`` it is stored under, which must be :func:`stored_name`'s)."""
    if not isinstance(table, dict):
        raise kind.fail(f"{path / where}: 'files' is not a table of files", path / where)
    out = {}
    for name, entry in table.items():
        if not _plain(name) or name.startswith("."):
            raise kind.fail(
                f"{path / where} lists a file with a bad name {name!r:.80}", path / where
            )
        keys = {"file", "bytes", "sha256"} if stored else {"bytes", "sha256"}
        ok = (
            isinstance(entry, dict)
            and keys <= set(entry)
            and type(entry.get("bytes")) is int
            and entry["bytes"] >= 0
            and isinstance(entry.get("sha256"), str)
            and _HEX64.match(entry["sha256"]) is not None
        )
        if not ok:
            want = (
                '{"file": STORED, "bytes": SIZE, "sha256": HEX}'
                if stored
                else ('{"bytes": SIZE, "sha256": HEX}')
            )
            raise kind.fail(
                f"{path / where}: the manifest says {entry!r:.200} for {name}, not {want}",
                path / where,
            )
        fname = name
        if stored:
            fname = entry["file"]
            if fname != stored_name(name, entry["sha256"]):
                raise kind.fail(
                    f"{path / where}: {name} is stored as {fname!r:.80}, but a file with its "
                    f"checksum is stored as {stored_name(name, entry['sha256'])!r}",
                    path / where,
                )
        data = read_regular_file(path / fname, entry["bytes"], kind)
        if sha256_hex(data) != entry["sha256"]:
            raise kind.fail(
                f"checksum mismatch for {path / fname}: the file changed after it was saved",
                path / fname,
            )
        out[name] = data
    return out


def _stored_map(table: dict, stored: bool) -> dict[str, str]:
    return {n: e["file"] for n, e in table.items()} if stored else {}


def _read_once(path: Path, kind: FolderKind, seen: list) -> Folder:
    try:  # one stat: a folder created between two checks is not taken for a file
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise kind.absent(path, "the folder is missing" + _old_copies(path)) from None
    if not stat.S_ISDIR(mode):
        raise kind.error(f"{path} is a file, not {kind.a_what} folder", path)
    mpath = path / MANIFEST
    if not os.path.lexists(mpath):
        seen.append(None)
        for lg in kind.legacy:
            if lg.detect is not None and lg.detect(path):
                return lg.read(path, kind)
        raise kind.absent(path, f"{MANIFEST} is missing" + _old_copies(path))
    raw = read_regular_file(mpath, None, kind, max_size=MAX_MANIFEST_BYTES)
    seen.append(raw)
    manifest = _check_manifest(_parse_json(raw, mpath, kind), mpath, kind)
    version = _check_version(path, manifest, kind)
    stored = version >= STORED_NAMES_FROM
    table = manifest.get("files")
    files = verify_files(path, table, kind, stored=stored)
    folder = Folder(path, manifest, files, kind, stored=_stored_map(table, stored))
    if version < kind.version:
        for lg in kind.legacy:
            if lg.version == version:
                folder = lg.read(folder, kind)
                break
        else:  # pragma: no cover - min_version comes from the legacy versions
            raise kind.error(f"{path}: no reader for format_version {version}", path)
    absent = [n for n in kind.files if n not in folder.files]
    if absent:
        raise kind.fail(
            f"{folder.mpath} does not list {absent[0]}: {kind.a_what} needs "
            f"{', '.join(kind.files)}",
            folder.mpath,
        )
    return folder


def _read_small(path: Path, limit: int) -> bytes | None:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes (a symbolic
    link is not followed, a FIFO not waited on), else None; OSError when it cannot be opened."""
    with os.fdopen(os.open(path, _READ_FLAGS), "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        data = fh.read(limit + 1)
    return data if len(data) <= limit else None


def _peek_manifest(path: Path) -> bytes | str | None:
    """The manifest's bytes now (None: absent; a string for an unreadable one)."""
    try:
        data = _read_small(path / MANIFEST, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"unreadable: {err}"
    return "unreadable" if data is None else data


def _old_copies(path: Path) -> str:
    """A hint naming folders that cspace before format version 3 left beside ``path`` when a
    save was interrupted between its two renames (``.NAME.old-*``: the previous folder)."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        old = sorted(p.name for p in parent.glob(f".{glob.escape(path.name)}.old-*"))
    except OSError:
        return ""
    if not old:
        return ""
    return (
        f" ({parent / old[-1]} holds the copy an interrupted save of an older cspace left: "
        f"rename it to {path.name} to recover it)"
    )


def read_folder(path: str | os.PathLike, kind: FolderKind) -> Folder:
    """Read and verify a folder of ``kind`` (current or legacy layout); see the module
    docstring for the checks. Returns a :class:`Folder` in the current layout.

    Readers take no lock: a read that fails while a writer commits a new version (the manifest
    changed since the read began) starts over, up to :data:`READ_ATTEMPTS` times.
    """
    path = Path(path)
    for attempt in range(READ_ATTEMPTS):
        seen: list = []
        try:
            return _read_once(path, kind, seen)
        except (FolderError, FileNotFoundError):
            if attempt + 1 == READ_ATTEMPTS or not seen or _peek_manifest(path) == seen[0]:
                raise
        time.sleep(0.001 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def folder_kind_of(path: str | os.PathLike, kind: FolderKind) -> Legacy | bool:
    """Whether ``path`` looks like a folder of ``kind`` without verifying it: True for the
    current layout (or an older manifest), the :class:`Legacy` layout for an old layout without
    a manifest, False otherwise."""
    manifest = _manifest_of(Path(path))
    if manifest is not None:
        return isinstance(manifest, dict) and manifest.get("format") == kind.format
    if os.path.lexists(Path(path) / MANIFEST):
        return False
    for lg in kind.legacy:
        if lg.detect is not None and lg.detect(Path(path)):
            return lg
    return False


def _manifest_of(path: Path) -> Any:
    """The parsed manifest of ``path`` (bounded), None when absent or unreadable."""
    try:
        data = _read_small(path / MANIFEST, MAX_MANIFEST_BYTES)
        if data is None:
            return None
        return parse_json(data, max_bytes=MAX_MANIFEST_BYTES, max_depth=MAX_JSON_DEPTH)
    except (OSError, FormatError):
        return None


def is_folder_of(path: str | os.PathLike, kind: FolderKind) -> bool:
    """Whether ``path`` looks like a folder of ``kind`` (current or legacy layout)."""
    return bool(folder_kind_of(path, kind))


# ---------------------------------------------------------------------- writing
def _own_stored(name: str, own: frozenset[str] | set[str]) -> bool:
    """Whether ``name`` is a stored (content-addressed) name of one of the files ``own``."""
    m = _STORED.match(name)
    return m is not None and m["stem"] + (m["ext"] or "") in own


@dataclass
class _Version:
    """The version of a folder that a save replaces: the files its readers read (kept by the
    save) and the files its manifest lists as superseded (removed by the save)."""

    files: set[str] = field(default_factory=set)
    superseded: set[str] = field(default_factory=set)


def _current_version(path: Path, kind: FolderKind, found: Legacy | bool) -> _Version:
    out = _Version()
    if isinstance(found, Legacy):
        out.files = {n for n in found.files if os.path.lexists(path / n)}
        return out
    if not found:
        return out
    manifest = _manifest_of(path)
    out.files.add(MANIFEST)
    table = manifest.get("files") if isinstance(manifest, dict) else None
    if isinstance(table, dict):
        for name, entry in table.items():  # before version 3: files under their plain names
            n = entry.get("file") if isinstance(entry, dict) and "file" in entry else name
            if _plain(n):
                out.files.add(n)
    superseded = manifest.get("superseded") if isinstance(manifest, dict) else None
    if isinstance(superseded, list):
        out.superseded = {n for n in superseded if _plain(n)}
    return out


def _own_entries(path: Path, kind: FolderKind, found: Legacy | bool, entries: list[str]) -> set:
    """The entries of the folder ``path`` that belong to ``kind`` (replaced or removed by a
    save): its manifest and files in any layout, the lock file, temporary files and stored
    files of dead writers."""
    own = {LOCK_FILE} | {n for n in entries if n.startswith(TMP_PREFIX)}
    names = set(kind.own_names)
    if found:
        own |= {MANIFEST, *kind.files}
        version = _current_version(path, kind, found)
        own |= version.files | version.superseded
        names |= {n for n in version.files if _STORED.match(n) is None}
    if found or LOCK_FILE in entries:  # a first save that died leaves its lock file
        own |= {n for n in entries if _own_stored(n, names)}
    return own


def check_target(
    path: str | os.PathLike,
    kind: FolderKind,
    *,
    allow: Sequence[str] = (),
    payload: Sequence[str] = (),
) -> list[str]:
    """Check that :func:`write_folder` may write a folder of ``kind`` at ``path`` (call it
    before long work whose result goes there); returns the entries it keeps (not the kind's).

    ``path`` may be absent, an empty folder (or one holding only what a save that died left),
    a folder of ``kind`` (any layout), or a folder holding only entries named in ``allow``;
    anything else raises the kind's error.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return []
    if path.is_symlink() or not path.is_dir():
        raise kind.error(f"{path} exists and is not a folder; choose another path (--out)", path)
    entries = sorted(os.listdir(path))
    found = folder_kind_of(path, kind)
    own = _own_entries(path, kind, found, entries)
    others = [n for n in entries if n not in own]
    if not found and any(n not in allow for n in others):
        raise kind.error(
            f"{path} is a non-empty folder that is not {kind.a_what}; refusing to overwrite it "
            "(choose another path or --out)",
            path,
        )
    return [n for n in others if n not in payload]


def _flock(fd: int, lock: Path, kind: FolderKind, timeout: float) -> None:
    if fcntl is None:  # pragma: no cover - not POSIX
        return
    deadline = time.monotonic() + timeout
    wait = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise kind.error(
                    f"another process has been saving to {lock.parent} for more than "
                    f"{timeout:.0f} s (it holds {lock}); wait for it or stop it",
                    lock,
                ) from None
            time.sleep(wait)
            wait = min(2 * wait, 0.05)


@contextlib.contextmanager
def folder_lock(
    path: str | os.PathLike, kind: FolderKind, timeout: float = LOCK_TIMEOUT_S
) -> Iterator[None]:
    """Hold the writers' lock of the folder ``path`` (created, with the folder, if absent):
    an exclusive ``fcntl.flock`` on ``path/.cspace-lock``, so that writers in any process (or
    thread) run one at a time. Readers take no lock. The lock is released when the block ends
    or the process dies."""
    path = Path(path)
    lock = path / LOCK_FILE
    flags = (
        os.O_RDWR
        | os.O_CREAT
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    while True:
        try:
            os.makedirs(path, exist_ok=True)
        except FileExistsError:
            raise kind.error(
                f"{path} exists and is not a folder; choose another path", path
            ) from None
        except OSError as err:
            raise kind.error(f"cannot create the folder {path}: {err}", path) from err
        try:
            fd = os.open(lock, flags, 0o644)
        except FileNotFoundError:  # the folder was removed in between: make it again
            continue
        except OSError as err:
            raise kind.error(f"cannot open the lock file {lock}: {err}", lock) from err
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise kind.error(f"{lock} is not a regular file; remove it", lock)
            _flock(fd, lock, kind, timeout)
            try:
                now = os.stat(lock, follow_symlinks=False)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            break
        os.close(fd)  # the lock file was removed while this writer waited: take the new one
    try:
        yield
    finally:
        os.close(fd)


def _write_file(folder: Path, name: str, data: bytes) -> None:
    """``folder/name`` := ``data`` through a fsynced temporary file and ``os.replace``."""
    tmp = folder / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:_CHUNK]) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, folder / name)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that cannot sync folders
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file (or one of this module's temporary folders); errors are ignored."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def _remove_temporary(path: Path) -> None:
    """Remove the temporary files in ``path`` (under the lock: no writer is using them)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            if name.startswith(TMP_PREFIX):
                _remove(path / name)


def _collect(path: Path, kind: FolderKind, keep: set[str], stale: set[str], own: set[str]):
    """Remove what no reader needs any more: temporary files, stored files of the kind that
    ``keep`` does not name (a dead writer's, older versions'), and the ``stale`` files (the
    previous manifest's superseded list) when they are the kind's own names."""
    try:
        entries = os.listdir(path)
    except OSError:
        return
    for name in entries:
        if name in keep:
            continue
        ours = _own_stored(name, own) or (name in stale and (name in own or _own_stored(name, own)))
        if name.startswith(TMP_PREFIX) or ours:
            _remove(path / name)


def write_folder(
    path: str | os.PathLike,
    kind: FolderKind,
    fields: Mapping[str, Any],
    payload: Mapping[str, bytes],
    *,
    allow: Sequence[str] = (),
) -> Path:
    """Write a folder of ``kind``: ``manifest.json`` (the shared fields, then ``fields``) and
    the ``payload`` files (name -> bytes); returns the path. Crash-safe and serialised with
    other writers (the module docstring says how).

    An existing ``path`` must be a folder of the same kind (any layout) or empty, or hold only
    entries named in ``allow`` (e.g. a training checkpoint); anything else raises the kind's
    error and is left untouched. Entries that are not the kind's own files are kept.
    """
    path = Path(path)
    bad = [k for k in fields if k in RESERVED_FIELDS]
    if bad:
        raise ValueError(f"manifest fields {bad} are reserved for the folder format")
    names = list(payload)
    for name in names:
        if not _plain(name) or name[0] == ".":
            raise ValueError(f"bad payload file name {name!r}")
    missing = [n for n in kind.files if n not in payload]
    if missing:
        raise ValueError(f"{kind.a_what} needs the payload files {missing}")
    check_target(path, kind, allow=allow, payload=names)  # refuse before creating anything
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    where = path if path.is_dir() else parent  # files are written inside the folder
    if not os.access(where, os.W_OK):
        raise kind.error(f"no write permission in {where}", where)
    digests = {n: sha256_hex(b) for n, b in payload.items()}
    stored = {n: stored_name(n, digests[n]) for n in names}
    body = json.loads(json.dumps(dict(fields)))
    created = not os.path.lexists(path)
    own = set(kind.own_names) | set(names)
    written: list[str] = []
    committed = False
    with folder_lock(path, kind):
        previous = _Version()
        try:
            check_target(path, kind, allow=allow, payload=names)  # again, under the lock
            found = folder_kind_of(path, kind)
            previous = _current_version(path, kind, found)
            keep = {*stored.values(), MANIFEST, LOCK_FILE}
            manifest = {
                "format": kind.format,
                "format_version": kind.version,
                **body,
                "files": {
                    n: {"file": stored[n], "bytes": len(payload[n]), "sha256": digests[n]}
                    for n in names
                },
                "superseded": sorted(previous.files - keep),
                "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            for n in names:
                _write_file(path, stored[n], payload[n])
                written.append(stored[n])
            _write_file(path, MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
            committed = True  # the new version is the folder's
            _fsync_dir(path)
            if created:
                _fsync_dir(parent)
        except BaseException:
            _remove_temporary(path)
            if not committed:  # files of this save that no manifest names
                for name in written:
                    if name not in previous.files:
                        _remove(path / name)
            if created:
                with contextlib.suppress(OSError):
                    if set(os.listdir(path)) <= {LOCK_FILE}:  # nothing but the lock: undo
                        os.unlink(path / LOCK_FILE)
                        os.rmdir(path)
            raise
        _collect(path, kind, keep=keep | previous.files, stale=previous.superseded, own=own)
    return path


def migrate_folder(
    path: str | os.PathLike, kind: FolderKind, update: Mapping[str, Any] | None = None
) -> Path:
    """Rewrite the folder ``path`` of ``kind`` (any layout it reads) in the current format,
    with the same payload (older obstacle sets: the embeddings of their index) and its fields
    plus ``update``; returns the path."""
    folder = read_folder(path, kind)
    fields = {**folder.fields, **(update or {})}
    return write_folder(path, kind, fields, folder.files)
