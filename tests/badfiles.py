"""A generated folder of the messy files real image folders contain, with what attnzoo must make of each.

``make_bad_folder(root)`` writes train/ + valid/ with classes ``cat``, ``dog`` and ``owl`` (one image),
``empty`` (a class folder with nothing in it), and returns ``(usable, skipped)``: the files that must be
trained on, and ``{file: reason fragment}`` for the ones that must be left out.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# The kinds of bad or awkward input the tests below cover (the README's tally counts this list).
KINDS = [
    "zero-byte file", "truncated JPEG", "truncated PNG", "text file with a .jpg extension", ".txt file",
    ".DS_Store", "Thumbs.db", "CMYK JPEG", "16-bit greyscale PNG", "palette PNG with transparency", "RGBA PNG",
    "greyscale JPEG", "decompression-bomb PNG (refused before decoding)", "EXIF-rotated JPEG",
    "upper-case extensions (.JPG, .PNG)", "PNG data under a .jpg name", "symlink to an image",
    "broken symlink", "empty class folder", "class with a single image",
]


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3)).astype(np.uint8)
    im = Image.fromarray(arr)
    return im if mode == "RGB" else im.convert(mode)


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A valid 1-bit PNG of side x side pixels (400M > PIL's limit) that is only a few kB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def exif_rotated_jpeg(path: Path) -> Path:
    """A 40x20 image, left half red, stored with EXIF orientation 6 (display rotated 90 degrees clockwise):
    shown correctly it is 20 wide and 40 tall with the red half on top."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (220, 20, 20)
    arr[:, 20:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    path.write_bytes(jpeg_bytes(Image.fromarray(arr), exif=exif.tobytes()))
    return path


def sixteen_bit_png(path: Path) -> Path:
    """A 16-bit greyscale gradient (0..65535): read as 8 bits it must span 0..255, not saturate at 255."""
    arr = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1))
    Image.fromarray(arr).save(path)  # uint16 -> mode I;16
    return path


def transparent_palette_png(path: Path) -> Path:
    """A palette PNG whose palette index 0 is fully transparent (left half) and index 1 opaque blue."""
    im = Image.new("P", (16, 8), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (8, 0, 16, 8))
    im.save(path, transparency=0)
    return path


def make_bad_folder(root: Path, n: int = 6) -> tuple[list[Path], dict[Path, str]]:
    usable: list[Path] = []
    skipped: dict[Path, str] = {}
    for split, count in (("train", n), ("valid", 2)):
        for c, (seed, colour) in {"cat": (1, (220, 40, 40)), "dog": (2, (40, 40, 220))}.items():
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(count):
                im = noise(24, 24, seed * 100 + i)
                im.paste(colour, (4, 4, 16, 16))
                usable.append(d / f"{i}.png")
                im.save(usable[-1])
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    (root / "train" / "empty").mkdir()
    (root / "train" / "owl").mkdir()
    noise(24, 24, 7).save(root / "train" / "owl" / "only.png")
    usable.append(root / "train" / "owl" / "only.png")

    (cat / "zero.jpg").write_bytes(b"")
    skipped[cat / "zero.jpg"] = "empty file"
    (cat / "cut.jpg").write_bytes(jpeg_bytes(noise(64, 64, 3))[:700])
    skipped[cat / "cut.jpg"] = "cannot be decoded"
    buf = io.BytesIO()
    noise(64, 64, 4).save(buf, "PNG")
    (dog / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    skipped[dog / "cut.png"] = "cannot be decoded"
    (dog / "fake.jpg").write_text("this is not a picture\n")
    skipped[dog / "fake.jpg"] = "cannot be decoded"
    (cat / "notes.txt").write_text("labels by hand")
    skipped[cat / "notes.txt"] = "not an image file"
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    skipped[cat / ".DS_Store"] = "not an image file"
    (dog / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    skipped[dog / "Thumbs.db"] = "not an image file"
    bomb_png(dog / "bomb.png")
    skipped[dog / "bomb.png"] = "decompression-bomb"
    os.symlink(root / "nowhere.png", cat / "dangling.png")
    skipped[cat / "dangling.png"] = "broken symlink"

    (cat / "cmyk.jpg").write_bytes(jpeg_bytes(noise(30, 20, 5, "CMYK")))
    sixteen_bit_png(dog / "deep.png")
    transparent_palette_png(cat / "palette.png")
    noise(20, 20, 8, "RGBA").save(dog / "rgba.png")
    (dog / "grey.jpg").write_bytes(jpeg_bytes(noise(20, 20, 9, "L")))
    exif_rotated_jpeg(cat / "rotated.jpg")
    (cat / "UPPER.JPG").write_bytes(jpeg_bytes(noise(20, 20, 10)))
    noise(20, 20, 11).save(dog / "LOUD.PNG")
    noise(20, 20, 12).save(dog / "really_png.jpg", "PNG")
    os.symlink(cat / "0.png", dog / "linked.png")
    usable += [cat / "cmyk.jpg", dog / "deep.png", cat / "palette.png", dog / "rgba.png", dog / "grey.jpg",
               cat / "rotated.jpg", cat / "UPPER.JPG", dog / "LOUD.PNG", dog / "really_png.jpg", dog / "linked.png"]
    return usable, skipped
