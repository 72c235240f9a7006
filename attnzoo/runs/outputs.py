"""How attnzoo writes files: never half-written, with the mode the user's umask gives, never over a file it
did not create.

Every file is first written to a temporary beside it (``write_temporary``). In a run folder, which attnzoo
owns, it is then renamed into place (``replace``). Anywhere else (figures, charts, exports) it is hard-linked
to its final name, which fails when that name exists (``write_new``): even a file that appears between the
check and the write is never replaced. A name picked by attnzoo (a default, or one per image in an
output folder) moves on to ``NAME-2``, ``NAME-3``... when taken; a name the user gave (``--out FILE``) that
exists is an error.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import AttnzooError


def write_temporary(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` into a new file beside ``path`` (``.NAME.XXXXXXXX.tmp``) and return it; the caller
    renames or links it into place. The file is created with mode 0o666 and the kernel applies the umask (and
    any default ACL), as for any file a program creates; a ``write`` that puts another file in its place
    (safetensors writes its own temporary, mode 0600) gets that mode back. On failure nothing is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        mode = os.fstat(fd).st_mode & 0o7777
        os.close(fd)
        write(tmp)
        if os.stat(tmp).st_mode & 0o7777 != mode:
            os.chmod(tmp, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def replace(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)``, then rename it onto ``path``: a crash never leaves a half-written file. Only for files
    attnzoo owns (in a run folder, or a sweep folder)."""
    path = Path(path)
    tmp = write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_text(path: str | os.PathLike, text: str) -> Path:
    """``replace`` with UTF-8 text; file names that are not UTF-8 (surrogate escapes) keep their bytes."""
    return replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


def printable(text: str) -> str:
    """``text`` safe to show, on a terminal or in a figure: control characters (a folder name can hold an escape
    sequence that drives the terminal) and undecodable bytes (Python keeps them as surrogate escapes, which
    neither UTF-8 nor a font takes) shown as escapes, as Python's repr shows them."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def strict_json(value: Any) -> Any:
    """``value`` as strict JSON takes it: every NaN or infinity, at any depth, as None (null), tuples as lists,
    numpy numbers as Python's. JSON has no NaN, and strict parsers refuse the bare ``NaN`` Python writes."""
    import math

    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        value = value.item()  # a numpy scalar
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


OWN_MARK = "attnzoo"  # the PNG "Software" text of attnzoo's figures


def own_mark() -> dict[str, str]:
    """The metadata that marks a PNG as attnzoo's own figure."""
    from .. import __version__

    return {"Software": f"{OWN_MARK} {__version__}"}


def is_own_figure(image: Any) -> bool:
    """An opened PIL image that attnzoo drew (``own_mark``): an output, never data."""
    return str(getattr(image, "info", {}).get("Software", "")).startswith(OWN_MARK + " ")


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}  # read as data


def check_writable(path: Path, what: str, hint: str = "") -> None:
    """A folder can be made (or written) at ``path``: its nearest existing part is a folder this process can write
    in. Tried, not inferred from permission bits: root passes ``os.access`` on read-only places such as /proc."""
    import tempfile

    parent = path.absolute()
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        if parent == path.absolute():
            return  # an existing file at --out: the run folder's own check says so
        raise AttnzooError(f"{what} {path} cannot be made: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".attnzoo-write-test-", dir=parent))
    except OSError as e:
        verb = "written in" if path.exists() else "made"
        raise AttnzooError(f"{what} {path} cannot be {verb}: cannot write in {parent} "
                           f"({e.strerror or type(e).__name__}){hint}") from None


def _user_images(folder: Path, limit: int = 20) -> list[Path]:
    """Up to ``limit`` image files directly in ``folder`` that attnzoo did not draw."""
    from PIL import Image

    found = []
    try:
        entries = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    except OSError:
        return []
    for image in entries:
        try:
            with Image.open(image) as im:
                if is_own_figure(im):
                    continue
        except Exception:
            continue
        found.append(image)
        if len(found) >= limit:
            break
    return found


def refuse_data_folder(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
                       what: str = "--out") -> None:
    """Figures must not land where ``fit`` reads images: inside the run's data folder (``data_root``), or in a
    class folder (a folder of the user's images beside other such folders). One line, before any work."""
    refuse_inside_data(path, data_root, what)
    target = Path(path).absolute()
    place = target if target.is_dir() else target.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    images = _user_images(place)
    if not images or place.parent == place:
        return
    siblings = [d for d in place.parent.iterdir() if d.is_dir() and d != place and _user_images(d, 1)]
    if siblings:
        raise AttnzooError(f"{what} {path}: {place} holds images ({images[0].name}, ...) beside other folders of "
                           f"images ({siblings[0].name}/): it looks like a class folder of a data set, and figures "
                           f"there would be read as training images; choose another folder")


def refuse_inside_data(path: str | os.PathLike, data_root: str | os.PathLike | None, what: str = "--out") -> None:
    """The first half of ``refuse_data_folder``, for commands that learn the run's data folder after they have
    checked the class folders (once the run is read)."""
    if data_root is not None and Path(path).absolute().resolve().is_relative_to(Path(data_root).resolve()):
        raise AttnzooError(f"{what} {path} is inside the run's data folder {data_root}: figures there would be "
                           f"read as training images; choose another folder")


def _numbered(path: Path, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")


def write_new(path: str | os.PathLike, write: Callable[[Path], Any], *, fresh: bool = True) -> Path:
    """``write(tmp)``, then give it ``path``'s name without replacing anything; returns the name used.

    ``fresh``: a taken name moves on to ``NAME-2.SUFFIX`` and so on; else it is an ``AttnzooError``."""
    path = Path(path)
    tmp = write_temporary(path, write)
    try:
        n = 1
        while True:
            target = _numbered(path, n)
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                if not fresh:
                    raise AttnzooError(f"{target} already exists; attnzoo does not write over files: "
                                       f"choose another name") from None
                n += 1
    finally:
        tmp.unlink(missing_ok=True)


def existing_files(paths: Sequence[str | os.PathLike], what: str = "image") -> list[Path]:
    """The paths, each an existing file, or one line naming the first that is not."""
    out = [Path(p) for p in paths]
    for p in out:
        if not p.is_file():
            raise AttnzooError(f"{what} not found: {p}" if not p.exists() else f"{what} is not a file: {p}")
    return out


def check_new_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """A file name the user gave for a new file: an error now, before any work, when it cannot be one."""
    path = Path(path)
    if path.is_dir():
        raise AttnzooError(f"{what} {path} is a folder; give a file name")
    if path.exists() or path.is_symlink():
        raise AttnzooError(f"{what} {path} already exists; attnzoo does not write over files: choose a new name")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise AttnzooError(f"{what} {path}: {parent} is a file, not a folder")
    return path


def check_new_folder(path: str | os.PathLike, what: str = "--out") -> Path:
    """A folder the user named for attnzoo's files: new, or existing and empty; never one holding files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AttnzooError(f"{what} {path} is an existing file, not a folder; attnzoo does not write over files")
    if path.is_dir() and any(path.iterdir()):
        raise AttnzooError(f"{what} {path} already holds files; attnzoo writes only into a new or empty folder")
    return path


def per_image_outputs(images: Sequence[str | os.PathLike], out: str | os.PathLike | None,
                      default_folder: Path, suffix: str = ".png") -> tuple[list[Path], bool]:
    """Where the output for each input image goes, and whether those names may move on when taken.

    ``out`` is a file (``x.png``, one image only) or a folder (default ``default_folder``), in which each
    image gets ``<stem><suffix>``; images sharing a stem get ``-2``, ``-3``... so no output is written
    twice. An output that would replace one of the inputs, or an ``out`` that is an existing file, is an
    error before any work starts."""
    images = [Path(p) for p in images]
    inputs = {os.path.realpath(p) for p in images}
    if out is not None and Path(out).suffix.lower() == suffix and not Path(out).is_dir():
        if len(images) != 1:
            raise AttnzooError(f"--out {out} is one file, for one image; give a folder for {len(images)} images")
        target = check_new_file(out)
        if os.path.realpath(target) in inputs:
            raise AttnzooError(f"--out {out} is an input image; attnzoo does not write over files")
        return [target], False
    folder = Path(out) if out is not None else default_folder
    if folder.exists() and not folder.is_dir():
        raise AttnzooError(f"--out {folder} is an existing file, not a folder; attnzoo does not write over files")
    targets: list[Path] = []
    used: set[str] = set()
    for p in images:
        n, base = 1, folder / f"{p.stem}{suffix}"
        while str(_numbered(base, n)) in used:
            n += 1
        target = _numbered(base, n)
        used.add(str(target))
        if os.path.realpath(target) in inputs:
            raise AttnzooError(f"--out {folder} would put {target.name} over the input image {target}; "
                               f"choose another folder")
        targets.append(target)
    return targets, True
