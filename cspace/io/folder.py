"""One safe-folder format for everything cspace writes: obstacle sets, preference classifiers,
flow, VAE and teacher weights.

A folder holds a manifest and payload files::

    manifest.json     {"format": NAME, "format_version": N,
                       "files": {FILE: {"bytes": SIZE, "sha256": HEX}, ...},
                       "saved": ISO-8601 time, ...the kind's own JSON fields}
    FILE ...          the payload: safetensors tensors, JSON records (never pickles)

:func:`write_folder` writes one through :func:`cspace.io.files.write_folder_atomic` (a temporary
sibling folder, then an atomic swap): an interruption leaves the old folder or the new one,
never a mix. An existing folder is replaced only when it is a folder of the same kind (in the
current or a legacy layout) or empty; entries in it that are not the kind's files (images kept
beside an obstacle set, a training checkpoint) are carried into the new folder.

:func:`read_folder` checks, in this order, and raises the kind's error (a subclass of
:class:`~cspace.io.errors.FolderError`, a ``ValueError``) naming the file and what to do:

1. the folder exists (else the kind's *missing* error: :class:`~cspace.io.errors.MissingWeightsError`
   for model weights, with the command that makes them);
2. ``manifest.json`` is a regular file (not a symbolic link) of at most
   :data:`MAX_MANIFEST_BYTES`, valid UTF-8 JSON, an object;
3. its ``format`` is the kind's and ``format_version`` lies in the range the kind reads;
4. every file of the ``files`` table has a plain name, is a regular file (not a symbolic link),
   has the listed size (checked *before* the file is read) and the listed SHA-256;
5. the kind's required files are listed.

A :class:`FolderKind` describes one kind; its older layouts are read by the legacy readers of
:mod:`cspace.io.legacy` (folders without ``manifest.json``, and manifests of an older
``format_version``), which return the same :class:`Folder` as the current layout, so each kind
decodes one layout only. :func:`migrate_folder` rewrites a legacy folder in the current format
with the same payload bytes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cspace.io.errors import FolderError
from cspace.io.files import sha256_hex, write_folder_atomic

__all__ = [
    "MANIFEST",
    "MAX_MANIFEST_BYTES",
    "RESERVED_FIELDS",
    "Folder",
    "FolderError",
    "FolderKind",
    "Legacy",
    "check_target",
    "folder_kind_of",
    "is_folder_of",
    "migrate_folder",
    "read_folder",
    "read_json_file",
    "read_regular_file",
    "verify_files",
    "write_folder",
]

MANIFEST = "manifest.json"
#: the largest manifest.json read (bulky records go into JSON payload files instead)
MAX_MANIFEST_BYTES = 1 << 20
#: manifest fields every kind shares (a kind's own fields use other names)
RESERVED_FIELDS = ("format", "format_version", "files", "saved")


@dataclass(frozen=True)
class Legacy:
    """An older layout of a kind, read by a function of :mod:`cspace.io.legacy`.

    Attributes:
        name: the layout, for messages (e.g. ``"cspace-flow v1 (config.json)"``).
        files: the files the layout consists of (replaced when the folder is rewritten).
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
    fix: str = ""
    missing: Callable[[Path, str], BaseException] | None = None
    legacy: tuple[Legacy, ...] = field(default=())

    @property
    def min_version(self) -> int:
        return min([self.version] + [lg.version for lg in self.legacy if lg.version is not None])

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

    ``legacy`` names the layout it was read from (None: the current one); ``version`` is the
    manifest's ``format_version`` after any upgrade (the kind's current version).
    """

    path: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]
    kind: FolderKind
    legacy: str | None = None

    @property
    def mpath(self) -> Path:
        return self.path / MANIFEST

    @property
    def fields(self) -> dict[str, Any]:
        """The kind's own manifest fields (without format, version, files, saved)."""
        return {k: v for k, v in self.manifest.items() if k not in RESERVED_FIELDS}

    def sha256(self, name: str) -> str:
        return self.manifest["files"][name]["sha256"]

    def require(self, *names: str) -> list[Any]:
        """The manifest fields ``names``; the kind's error if one is absent."""
        missing = [n for n in names if n not in self.manifest]
        if missing:
            raise self.kind.fail(f"{self.mpath} lacks a required field: {missing[0]!r}", self.mpath)
        return [self.manifest[n] for n in names]

    def json(self, name: str) -> Any:
        """A JSON payload file, parsed (the kind's error if it is not JSON)."""
        try:
            return json.loads(self.files[name].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self.kind.fail(
                f"{self.path / name} is corrupt or not JSON: {err}", self.path / name
            ) from err


# ---------------------------------------------------------------------- reading
def read_regular_file(
    path: Path, size: int | None, kind: FolderKind, *, max_size: int | None = None
) -> bytes:
    """The bytes of ``path``, a regular file (a symbolic link is refused) of exactly ``size``
    bytes, or of at most ``max_size`` bytes when ``size`` is None; sizes are checked before
    the file is read."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
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
        fd = os.open(path, flags)
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
    return data


def read_json_file(path: Path, kind: FolderKind) -> Any:
    """A JSON file of a folder of ``kind`` (a manifest, a legacy config): a regular file of at
    most :data:`MAX_MANIFEST_BYTES`, UTF-8 JSON; the kind's error otherwise."""
    data = read_regular_file(path, None, kind, max_size=MAX_MANIFEST_BYTES)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise kind.fail(f"{path} is corrupt or not JSON: {err}", path) from err


def _read_manifest(path: Path, kind: FolderKind) -> dict[str, Any]:
    mpath = path / MANIFEST
    manifest = read_json_file(mpath, kind)
    if not isinstance(manifest, dict) or manifest.get("format") != kind.format:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise kind.error(
            f"{mpath} is not a cspace {kind.what} manifest (format {got!r}, expected "
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
        raise kind.error(
            f"{path} has format_version {version!r}; this cspace reads {reads}{hint}", path
        )
    return version


def verify_files(path: Path, table: Any, kind: FolderKind, where: str = MANIFEST) -> dict:
    """Read and verify every file of a ``files`` table (name -> {"bytes", "sha256"})."""
    if not isinstance(table, dict):
        raise kind.fail(f"{path / where}: 'files' is not a table of files", path / where)
    out = {}
    for name, entry in table.items():
        if (
            not isinstance(name, str)
            or name in ("", ".", "..", MANIFEST)
            or "/" in name
            or "\\" in name
            or "\x00" in name
        ):
            raise kind.fail(f"{path / where} lists a file with a bad name {name!r}", path / where)
        ok = (
            isinstance(entry, dict)
            and type(entry.get("bytes")) is int
            and entry["bytes"] >= 0
            and isinstance(entry.get("sha256"), str)
        )
        if not ok:
            raise kind.fail(
                f"{path / where}: the manifest says {entry!r} for {name}, not "
                '{"bytes": SIZE, "sha256": HEX}',
                path / where,
            )
        data = read_regular_file(path / name, entry["bytes"], kind)
        if sha256_hex(data) != entry["sha256"]:
            raise kind.fail(
                f"checksum mismatch for {path / name}: the file changed after it was saved",
                path / name,
            )
        out[name] = data
    return out


def read_folder(path: str | os.PathLike, kind: FolderKind) -> Folder:
    """Read and verify a folder of ``kind`` (current or legacy layout); see the module
    docstring for the checks. Returns a :class:`Folder` in the current layout."""
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise kind.error(f"{path} is a file, not {kind.a_what} folder", path)
        raise kind.absent(path, "the folder is missing")
    if not os.path.lexists(path / MANIFEST):
        for lg in kind.legacy:
            if lg.detect is not None and lg.detect(path):
                return lg.read(path, kind)
        raise kind.absent(path, f"{MANIFEST} is missing")
    manifest = _read_manifest(path, kind)
    version = _check_version(path, manifest, kind)
    files = verify_files(path, manifest.get("files"), kind)
    folder = Folder(path, manifest, files, kind)
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


def folder_kind_of(path: str | os.PathLike, kind: FolderKind) -> Legacy | bool:
    """Whether ``path`` looks like a folder of ``kind`` without verifying it: True for the
    current layout (or an older manifest), the :class:`Legacy` layout for an old layout without
    a manifest, False otherwise."""
    path = Path(path)
    mpath = path / MANIFEST
    try:
        st = os.lstat(mpath)
        if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_MANIFEST_BYTES:
            manifest = json.loads(mpath.read_bytes().decode("utf-8"))
            return isinstance(manifest, dict) and manifest.get("format") == kind.format
        return False
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    for lg in kind.legacy:
        if lg.detect is not None and lg.detect(path):
            return lg
    return False


def is_folder_of(path: str | os.PathLike, kind: FolderKind) -> bool:
    """Whether ``path`` looks like a folder of ``kind`` (current or legacy layout)."""
    return bool(folder_kind_of(path, kind))


# ---------------------------------------------------------------------- writing
def _own_files(path: Path, kind: FolderKind, found: Legacy | bool) -> set[str]:
    """The entries of an existing folder of ``kind`` that belong to it (replaced on save)."""
    own = {MANIFEST, *kind.files}
    if isinstance(found, Legacy):
        return own | set(found.files)
    try:
        table = json.loads((path / MANIFEST).read_bytes().decode("utf-8")).get("files", {})
        own |= {n for n in table if isinstance(n, str)}
    except (OSError, ValueError, AttributeError):
        pass
    return own


def check_target(
    path: str | os.PathLike,
    kind: FolderKind,
    *,
    allow: Sequence[str] = (),
    payload: Sequence[str] = (),
) -> list[str]:
    """Check that :func:`write_folder` may write a folder of ``kind`` at ``path`` (call it
    before long work whose result goes there); returns the entries it would carry over.

    ``path`` may be absent, an empty folder, a folder of ``kind`` (any layout), or a folder
    holding only entries named in ``allow``; anything else raises the kind's error.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return []
    if path.is_symlink() or not path.is_dir():
        raise kind.error(f"{path} exists and is not a folder; choose another path (--out)", path)
    entries = sorted(p.name for p in path.iterdir())
    found = folder_kind_of(path, kind)
    own = _own_files(path, kind, found) if found else set()
    others = [n for n in entries if n not in own]
    if not found and any(n not in allow for n in others):
        raise kind.error(
            f"{path} is a non-empty folder that is not {kind.a_what}; refusing to overwrite it "
            "(choose another path or --out)",
            path,
        )
    return [n for n in others if n not in payload]


def write_folder(
    path: str | os.PathLike,
    kind: FolderKind,
    fields: Mapping[str, Any],
    payload: Mapping[str, bytes],
    *,
    allow: Sequence[str] = (),
) -> Path:
    """Write a folder of ``kind`` atomically: ``manifest.json`` (the shared fields, then
    ``fields``) and the ``payload`` files (name -> bytes); returns the path.

    An existing ``path`` must be a folder of the same kind (any layout) or empty, or hold only
    entries named in ``allow`` (e.g. a training checkpoint); anything else raises the kind's
    error and is left untouched. Entries of the existing folder that are not the kind's own
    files are carried into the new folder.
    """
    path = Path(path)
    bad = [k for k in fields if k in RESERVED_FIELDS]
    if bad:
        raise ValueError(f"manifest fields {bad} are reserved for the folder format")
    names = list(payload)
    for name in names:
        if name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name or name[0] == ".":
            raise ValueError(f"bad payload file name {name!r}")
    missing = [n for n in kind.files if n not in payload]
    if missing:
        raise ValueError(f"{kind.a_what} needs the payload files {missing}")
    carry = check_target(path, kind, allow=allow, payload=names)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise kind.error(f"no write permission in {parent}", parent)
    manifest = {
        "format": kind.format,
        "format_version": kind.version,
        **json.loads(json.dumps(dict(fields))),
        "files": {n: {"bytes": len(b), "sha256": sha256_hex(b)} for n, b in payload.items()},
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    files = {**payload, MANIFEST: (json.dumps(manifest, indent=1) + "\n").encode()}
    return write_folder_atomic(path, files, carry=carry)


def migrate_folder(
    path: str | os.PathLike, kind: FolderKind, update: Mapping[str, Any] | None = None
) -> Path:
    """Rewrite the folder ``path`` of ``kind`` (any layout it reads) in the current format,
    with the same payload bytes and its fields plus ``update``; returns the path."""
    folder = read_folder(path, kind)
    fields = {**folder.fields, **(update or {})}
    return write_folder(path, kind, fields, folder.files)
