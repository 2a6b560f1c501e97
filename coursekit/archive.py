"""Submissions that arrive as zip files (a Gradescope or LMS download, a student's
upload), unpacked without trusting them: only notebooks come out, never outside
the folder they are unpacked into, never through a link, and never more bytes
than a notebook could honestly need."""
from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from coursekit.notebook import MAX_NOTEBOOK_BYTES

MAX_ARCHIVE_BYTES = 2 * 1024**3     # everything a zip unpacks to
MAX_MEMBERS = 10_000
MAX_RATIO = 200                     # compressed -> uncompressed, beyond what JSON text reaches
_CHUNK = 1 << 20


@dataclass
class Unpacked:
    notebooks: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # what was refused, and why


def unpack(archive: Path, into: Path) -> Unpacked:
    result = Unpacked()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        result.problems.append(f"{archive.name} is not a readable zip file ({exc})")
        return result
    with zf:
        members = zf.infolist()
        if len(members) > MAX_MEMBERS:
            result.problems.append(f"{archive.name} holds {len(members)} files, over the limit of {MAX_MEMBERS}")
            return result
        budget = MAX_ARCHIVE_BYTES
        for info in members:
            why = _refusal(info)
            if why:
                result.problems.append(f"{archive.name}: {info.filename!r} was not unpacked: {why}")
                continue
            if info.is_dir() or not info.filename.endswith(".ipynb") or _is_clutter(info.filename):
                continue
            target = into.joinpath(*PurePosixPath(info.filename).parts)
            try:
                budget -= _extract(zf, info, target, min(budget, MAX_NOTEBOOK_BYTES))
            except _TooLarge as exc:
                target.unlink(missing_ok=True)
                result.problems.append(f"{archive.name}: {info.filename!r} was not unpacked: {exc}")
                continue
            result.notebooks.append(target)
    return result


def _is_clutter(name: str) -> bool:
    """Jupyter's checkpoints and macOS metadata: never a submission."""
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts)


class _TooLarge(Exception):
    pass


def _refusal(info: zipfile.ZipInfo) -> str:
    path = PurePosixPath(info.filename.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        return "its path leads outside the archive"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "it is a symbolic link"
    if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > _CHUNK:
        return f"it would expand {info.file_size // info.compress_size}-fold (a zip bomb?)"
    return ""


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limit: int) -> int:
    """Copy one member, counting the bytes really written: the sizes a zip declares
    are the attacker's to choose."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(info) as source, open(target, "wb") as sink:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                raise _TooLarge(f"it unpacks to more than {limit // 2**20} MB")
            sink.write(chunk)
    return written
