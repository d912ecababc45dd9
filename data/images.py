"""Reading images and masks from disk: which Pillow modes are accepted and how they become numbers.

Images become float32 RGB in [0, 1]:
- 8-bit modes (1, L, P, RGB, RGBA, RGBX, LA, CMYK) go through Pillow's own conversion to RGB,
  resized bicubic in 8 bits, then / 255 (the formula the project always used, so 8-bit files give
  bit-identical tensors). Alpha is dropped, not composited: the colour channels
  are what the camera recorded, and compositing would need a background colour we cannot know.
- 16-bit grey (I;16, I;16L, I;16B, I;16N) is divided by 65535 and resized bicubic in float ('F'
  mode, one channel at a time), so no precision is lost before the model sees it.
- 16-bit colour PNG/TIFF, which Pillow would cut to 8 bits (its high byte), is decoded with OpenCV
  instead, divided by 65535 and resized the same way.
- 32-bit integer grey (I) is scaled by its bit depth when the file states it (TIFF BitsPerSample
  <= 16; PNG and PNM, whose 'I' images Pillow scales to 16 bits), else refused: a guess from the
  pixel values would make a dark image bright or the reverse.
- Float (F) and any other mode are refused with the file and the mode in the message: a float
  image has no range that tells where white is.
The float resize runs Pillow's two bicubic passes (width, then height) and clips to [0, 1] after each,
as the 8-bit resize does, only without rounding. So an 8-bit file and its 16-bit twin agree within
1/255 at the stored size, and within 1.125/255 once resized (the 8-bit path rounds after each pass).

Masks: any non-zero pixel is a defect (colour channels; alpha ignored), whatever the bit depth,
so 0/1, 0/255 and 16-bit masks all work. Masks are binarised at full resolution first, then
resized nearest-neighbour.

Orientation: an EXIF Orientation tag (JPEG, PNG eXIf or its ImageMagick text form, TIFF, WebP, MPO)
is applied on every read of an image or a mask, before any resize, so what is scored is what a viewer
shows (a phone photo taken upright is stored sideways with Orientation 6). Sizes (W, H) are those of
the upright picture everywhere, header_size included. Values outside 1..8 are ignored, as viewers do.
"""
from __future__ import annotations

import functools
import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from data.meta import DatasetError

# Only modes whose conversion to RGB we have checked on files (LAB TIFFs, for one, did not round-trip).
EIGHT_BIT_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "LA", "CMYK"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Masks: modes whose values compare with 0 directly (the scale does not matter for "non-zero").
MASK_PLAIN_MODES = frozenset({"1", "L", "I", "F"}) | SIXTEEN_BIT_MODES
# Exceptions a Pillow decoder raises on a damaged or foreign file (PNG CRC errors are SyntaxError).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                 Image.DecompressionBombError)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _open(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        im = Image.open(path)
        if im.format == "TIFF" and getattr(im, "tag_v2", {}).get(ExifTags.Base.Orientation) in (5, 6, 7, 8):
            # Pillow (13) turns such a TIFF itself on load, but scrambles the pixels of one it memory-maps
            # (uncompressed L, RGBA, I;16 opened by path); decoding from memory avoids the map
            im.close()
            im = Image.open(io.BytesIO(path.read_bytes()))
        return im
    except DECODE_ERRORS as e:
        raise DatasetError(f"cannot read {what} {path}: {_one_line(e)}") from e


# EXIF Orientation -> the transpose that shows the stored pixels upright (the EXIF 2.3 table, as Pillow's
# ImageOps.exif_transpose and browsers apply it); 1 and unknown values: as stored
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
_SWAPS_AXES = {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
               Image.Transpose.ROTATE_270}
_PNG_EXIF_TEXT = b"Raw profile type exif"  # ImageMagick's form of EXIF in a PNG text chunk


def _png_exif_after_data(path: Path) -> bool:
    """True when a PNG holds EXIF after its image data (an eXIf or ImageMagick text chunk), which Pillow
    only sees once the pixels are decoded. Walks the chunk headers; reads no pixel data."""
    with open(path, "rb") as f:
        f.seek(8)
        after_data = False
        while True:
            head = f.read(8)
            if len(head) < 8:
                return False
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                return False
            data_start = f.tell()
            after_data = after_data or kind == b"IDAT"
            if after_data and kind == b"eXIf":
                return True
            if after_data and kind in (b"tEXt", b"zTXt", b"iTXt") \
                    and f.read(len(_PNG_EXIF_TEXT) + 1) == _PNG_EXIF_TEXT + b"\0":
                return True
            f.seek(data_start + length + 4)  # past the data and its CRC


@functools.cache
def pillow_orients(fmt: str) -> bool:
    """True when this Pillow applies the EXIF orientation itself when it decodes `fmt` (TIFF in recent
    versions: its size is then upright at open, its pixels once loaded). Probed once per format on a
    small in-memory file, so older and newer Pillows are both read right."""
    if fmt not in ("JPEG", "MPO", "PNG", "TIFF", "WEBP"):
        return False
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 3  # rotated 180 degrees: the right half should come out on the left
    buf = io.BytesIO()
    stored = np.zeros((8, 16), np.uint8)
    stored[:, 8:] = 255
    try:
        Image.fromarray(stored).save(buf, "JPEG" if fmt == "MPO" else fmt, exif=exif)
        with Image.open(buf) as im:
            return bool(np.asarray(im.convert("L"))[4, 2] > 127)
    except (OSError, KeyError, ValueError):  # a format this Pillow cannot write: it cannot orient it either
        return False


Turn = Image.Transpose | None


def orientation(im: Image.Image, path: Path) -> tuple[Turn, Turn, tuple[int, int]]:
    """(the transpose the file's EXIF Orientation asks for, the part of it still to apply to the pixels
    Pillow decodes, the size of the pixels as stored). Pillow applies it itself for some formats."""
    turn = None
    if not (im.format == "PNG" and "exif" not in im.info and "Raw profile type exif" not in im.info
            and not _png_exif_after_data(path)):  # a PNG without EXIF: spare the decode getexif() would do
        try:
            value = im.getexif().get(ExifTags.Base.Orientation)
        except DECODE_ERRORS:  # unreadable EXIF: shown as stored, by viewers too
            value = None
        turn = UPRIGHT.get(value) if type(value) is int else None
    if turn is not None and im.format and pillow_orients(im.format):
        return turn, None, upright_size(im.size, turn)  # im.size is upright already: swap back
    return turn, turn, im.size


def upright_size(wh: tuple[int, int], method: Image.Transpose | None) -> tuple[int, int]:
    return (wh[1], wh[0]) if method in _SWAPS_AXES else wh


def transpose_array(arr: np.ndarray, method: Image.Transpose | None) -> np.ndarray:
    """Pillow's Image.transpose on an (H, W, ...) array (16-bit and float data Pillow cannot transpose)."""
    T = Image.Transpose
    if method is None:
        return arr
    out = {T.FLIP_LEFT_RIGHT: lambda a: a[:, ::-1], T.FLIP_TOP_BOTTOM: lambda a: a[::-1],
           T.ROTATE_180: lambda a: a[::-1, ::-1], T.ROTATE_90: lambda a: np.rot90(a, 1),
           T.ROTATE_270: lambda a: np.rot90(a, -1), T.TRANSPOSE: lambda a: a.swapaxes(0, 1),
           T.TRANSVERSE: lambda a: a[::-1, ::-1].swapaxes(0, 1)}[method](arr)
    return np.ascontiguousarray(out)


def _int_depth(im: Image.Image) -> int | None:
    """Bit depth of the data in a mode-'I' image, when the file says so."""
    if im.format in ("PNG", "PPM"):
        return 16  # PNG has at most 16 bits per sample; Pillow rescales PNM maxval to 16 bits
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258)
        bits = bits[0] if isinstance(bits, tuple) else bits
        return bits if isinstance(bits, int) and 1 <= bits <= 16 else None
    return None


def check_image_mode(im: Image.Image, path: Path) -> None:
    """Refuse (by file and mode) an image whose values we could not scale to [0, 1] correctly."""
    if im.mode in EIGHT_BIT_MODES or im.mode in SIXTEEN_BIT_MODES:
        return
    if im.mode == "I" and _int_depth(im):
        return
    why = {"F": "floating-point pixels have no defined white level",
           "I": "32-bit integer pixels of unknown bit depth"}.get(im.mode, "this mode is not supported")
    raise DatasetError(f"cannot read image {path}: Pillow mode {im.mode!r} ({why}); save it as 8- or "
                       f"16-bit PNG")


def _to_rgb8(im: Image.Image) -> Image.Image:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # direct P -> RGB warns about palette transparency
    return im.convert("RGB")


def _resize_float(arr: np.ndarray, size: int | None) -> np.ndarray:
    """(H, W) float32 in [0, 1] -> (size, size): Pillow 'F' mode keeps 16-bit precision. The two passes
    are separate so the overshoot is clipped between them, as the 8-bit resize does."""
    if not size:
        return arr
    im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
    for wh in ((size, im.height), (size, size)):
        if im.size != wh:
            im = Image.fromarray(np.clip(np.asarray(im.resize(wh, Image.BICUBIC)), 0.0, 1.0), mode="F")
    return np.asarray(im)


def _colour16(im: Image.Image) -> bool:
    """True for colour data stored with 16 bits per sample, which Pillow would read as 8 bits."""
    if im.mode not in ("RGB", "RGBA") or not im.tile:
        return False
    args = im.tile[0][3]
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return isinstance(rawmode, str) and rawmode.rsplit(";", 1)[-1] in ("16B", "16L", "16N")


def _read_colour16(path: Path, wh: tuple[int, int]) -> np.ndarray:
    import cv2  # only for this case; a project dependency already (data/synthetic.py)

    arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)  # fromfile: any path encoding
    if arr is None or arr.dtype != np.uint16 or arr.shape[1::-1] != wh:
        raise DatasetError(f"cannot read image {path}: 16-bit colour data that OpenCV could not decode")
    if arr.ndim == 2:
        arr = arr[..., None]
    rgb = arr[..., :3][..., ::-1] if arr.shape[2] >= 3 else np.repeat(arr[..., :1], 3, axis=2)  # BGR(A)
    return rgb.astype(np.float32) / 65535


def read_image(path: str | os.PathLike, size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) float32 RGB in [0, 1], upright (EXIF orientation applied), resized to size x size (None:
    as stored), and the upright picture's (W, H)."""
    path = Path(path)
    im = _open(path, "image")
    try:
        with im:
            check_image_mode(im, path)
            colour16 = _colour16(im)  # before the orientation: reading late PNG EXIF loads the pixels
            turn, left, stored_wh = orientation(im, path)
            wh = upright_size(stored_wh, turn)
            if colour16:  # OpenCV's IMREAD_UNCHANGED ignores the orientation: all of it is applied here
                rgb16 = transpose_array(_read_colour16(path, stored_wh), turn)
                return np.stack([_resize_float(rgb16[..., c], size) for c in range(3)], -1), wh
            if im.mode in EIGHT_BIT_MODES:
                rgb = _to_rgb8(im)
                if left is not None:
                    rgb = rgb.transpose(left)
                if size:
                    rgb = rgb.resize((size, size), Image.BICUBIC)
                return np.asarray(rgb, dtype=np.float32) / 255.0, wh
            raw = transpose_array(np.asarray(im), left)
            depth = 16 if im.mode in SIXTEEN_BIT_MODES else _int_depth(im)
            top = 2 ** depth - 1
            if im.mode == "I" and (raw.min() < 0 or raw.max() > top):
                raise DatasetError(f"cannot read image {path}: Pillow mode 'I' holds values "
                                   f"{raw.min()}..{raw.max()} outside its {depth}-bit range")
            grey = _resize_float(raw.astype(np.float32) / top, size)
            return np.repeat(grey[..., None], 3, axis=2), wh
    except DECODE_ERRORS as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"cannot read image {path}: {_one_line(e)}") from e


def _mask_nonzero(im: Image.Image, path: Path) -> np.ndarray:
    if im.mode in MASK_PLAIN_MODES:
        return np.asarray(im) != 0
    if im.mode in ("LA", "La"):
        return np.asarray(im)[..., 0] != 0
    if im.mode in ("RGB", "RGBX", "RGBA", "RGBa"):
        return (np.asarray(im)[..., :3] != 0).any(-1)
    if im.mode in EIGHT_BIT_MODES:  # palette and other colour spaces: judge the colour they stand for
        return (np.asarray(_to_rgb8(im)) != 0).any(-1)
    raise DatasetError(f"cannot read mask {path}: Pillow mode {im.mode!r} is not supported; save it as a "
                       f"grey PNG (0 = normal, non-zero = defect)")


def read_mask(path: str | os.PathLike, size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W) bool defect mask (non-zero = defect), upright (EXIF orientation applied, as for images),
    resized nearest to size x size, and the upright mask's (W, H)."""
    path = Path(path)
    im = _open(path, "mask")
    try:
        with im:
            turn, left, stored_wh = orientation(im, path)
            wh = upright_size(stored_wh, turn)
            defect = transpose_array(_mask_nonzero(im, path), left)
    except DECODE_ERRORS as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"cannot read mask {path}: {_one_line(e)}") from e
    if size and defect.shape != (size, size):
        # Binarised first, so nearest keeps every defect value whatever its level was.
        small = Image.fromarray(defect.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
        defect = np.asarray(small) > 0
    return defect, wh


def header_size(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """The upright (W, H) (EXIF orientation applied) from the file header, without decoding pixels; images
    also get their mode checked."""
    path = Path(path)
    im = _open(path, what)
    with im:
        if what == "image":
            check_image_mode(im, path)
        turn, _, stored_wh = orientation(im, path)
        return upright_size(stored_wh, turn)


def size_mismatch(mask_path, mask_wh, img_path, img_wh) -> str:
    return (f"mask {mask_path} is {mask_wh[0]}x{mask_wh[1]} but its image {img_path} is "
            f"{img_wh[0]}x{img_wh[1]} (width x height); a mask must have its image's size")


def check_items(root: str | os.PathLike, meta: dict, allow_empty_masks: bool = False) -> None:
    """Indexer checks on the files behind meta: every image readable in a supported mode; each mask
    readable, of its image's size and (unless allowed) not empty. Raises DatasetError (one line)."""
    root = Path(root)
    empty = []
    for split in meta:
        for items in meta[split].values():
            for it in items:
                img = root / it["img_path"]
                img_wh = header_size(img, "image")
                if not it["mask_path"]:
                    continue
                mask = root / it["mask_path"]
                defect, mask_wh = read_mask(mask, None)
                if mask_wh != img_wh:
                    raise DatasetError(size_mismatch(mask, mask_wh, img, img_wh))
                if it["anomaly"] and not defect.any():
                    empty.append(it["mask_path"])
    if not empty:
        return
    shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
    text = f"{len(empty)} anomalous image(s) under {root} have an empty mask (no non-zero pixel): {shown}"
    if not allow_empty_masks:
        raise DatasetError(f"{text}; fix the masks, or pass --allow-empty-masks to index them anyway")
    print(f"warning: {text}; kept because of --allow-empty-masks", file=sys.stderr)
