"""Image and mask reading (data/images.py through data/dataset.py): every Pillow mode either read with
the right scale or refused by file and mode; 8-bit RGB images and 0/255 masks exactly as before."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import load_image, load_mask
from data.images import header_size, read_mask

SIZES = (16, 37, 224)


def picture(h=29, w=41, seed=0):
    """A smooth colour picture plus noise, so resizing has something to interpolate."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 200 + 20
    return np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8)


def old_image(path, s):
    # The formula load_image used before 16-bit support; 8-bit files must keep giving exactly this.
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB").resize((s, s), Image.BICUBIC), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)


def old_mask(path, s):
    with Image.open(path) as im:
        im = im.convert("L")
        if s:
            im = im.resize((s, s), Image.NEAREST)
        return torch.from_numpy((np.asarray(im) > 127).astype(np.float32))


def test_8bit_images_are_bit_identical_to_the_old_formula(tmp_path):
    rgb = picture()
    files = {"rgb.png": Image.fromarray(rgb), "grey.png": Image.fromarray(rgb[..., 0]),
             "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., 1]])),
             "palette.png": Image.fromarray(rgb).quantize(32), "photo.jpg": Image.fromarray(rgb)}
    for name, im in files.items():
        im.save(tmp_path / name)
        for s in SIZES:
            assert torch.equal(load_image(tmp_path / name, s), old_image(tmp_path / name, s)), (name, s)


def test_0_255_masks_are_bit_identical_to_the_old_formula(tmp_path):
    m = np.zeros((29, 41), np.uint8)
    m[5:17, 9:30] = 255
    m[20, 3] = 255  # one-pixel defect: nearest may keep or drop it, the same way as before
    Image.fromarray(m).save(tmp_path / "m.png")
    Image.fromarray(np.dstack([m] * 3)).save(tmp_path / "m_rgb.png")
    for name in ("m.png", "m_rgb.png"):
        for s in SIZES + (None,):
            assert torch.equal(load_mask(tmp_path / name, s), old_mask(tmp_path / name, s)), (name, s)


# The 8-bit resize rounds to whole levels after each of its two passes (width, then height); the
# second pass weighs the first rounding by sum|w| <= 1.25 (bicubic, a = -0.5), so the 8-bit result can
# sit 0.5 * 1.25 + 0.5 = 1.125 levels from the exact one. The 16-bit path does not round, so resized
# twins agree within 1/255 plus that 8-bit rounding.
EIGHT_BIT_ROUNDING = 1.125 / 255 + 1e-6


def assert_twins(x8, x16, exact_size):
    assert x16.dtype == torch.float32 and 0 <= x16.min() and x16.max() <= 1
    diff = (x8 - x16).abs()
    if exact_size:
        assert diff.max() <= 1 / 255 + 1e-6
    else:
        assert diff.max() <= EIGHT_BIT_ROUNDING and diff.mean() <= 0.5 / 255


def float_resize(grey8, s):
    """Bicubic resize of the 8-bit values without any rounding (what the 16-bit path should give)."""
    im = Image.fromarray(grey8.astype(np.float32) / 255, "F")
    for wh in ((s, im.height), (s, s)):
        if im.size != wh:
            im = Image.fromarray(np.clip(np.asarray(im.resize(wh, Image.BICUBIC)), 0, 1), "F")
    return torch.from_numpy(np.array(im))


@pytest.mark.parametrize("hw", [(29, 41), (260, 300)])  # upscaled and downscaled
def test_16bit_png_loads_like_its_8bit_version(tmp_path, hw):
    grey8 = picture(*hw)[..., 1]
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # the exact 16-bit twin
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    for s in (0,) + SIZES:
        x8, x16 = load_image(tmp_path / "g8.png", s), load_image(tmp_path / "g16.png", s)
        assert x16.shape == x8.shape
        assert_twins(x8, x16, exact_size=s == 0)
        if s:
            assert torch.allclose(x16[0], float_resize(grey8, s), atol=1e-6)  # the excess is 8-bit rounding
    # not the all-white image the old convert("RGB") produced
    assert load_image(tmp_path / "g16.png", 16).mean() == pytest.approx(grey8.mean() / 255, abs=0.02)


def test_16bit_detail_is_kept(tmp_path):
    fine = (np.linspace(0, 65535, 29 * 41).reshape(29, 41)).astype(np.uint16)
    Image.fromarray(fine).save(tmp_path / "fine16.png")
    Image.fromarray(np.round(fine / 257).astype(np.uint8)).save(tmp_path / "fine8.png")
    assert torch.allclose(load_image(tmp_path / "fine16.png", 0)[0], torch.from_numpy(fine / 65535).float())
    for s in SIZES:
        assert_twins(load_image(tmp_path / "fine8.png", s), load_image(tmp_path / "fine16.png", s), False)


def test_16bit_big_endian_tiff_and_16bit_colour(tmp_path):
    cv2 = pytest.importorskip("cv2")
    fine = (np.linspace(0, 65535, 29 * 41).reshape(29, 41)).astype(np.uint16)
    Image.fromarray(fine.astype(">u2")).save(tmp_path / "be.tif")
    with Image.open(tmp_path / "be.tif") as im:
        assert im.mode == "I;16B"
    Image.fromarray(fine).save(tmp_path / "le.png")
    assert torch.equal(load_image(tmp_path / "be.tif", 24), load_image(tmp_path / "le.png", 24))
    # 16-bit colour (Pillow alone keeps only the high byte), with and without alpha, and as TIFF
    rgb = picture()
    Image.fromarray(rgb).save(tmp_path / "c8.png")
    c16 = (rgb.astype(np.uint16) * 257)[..., ::-1]  # BGR for OpenCV
    cv2.imwrite(str(tmp_path / "c16.png"), c16)
    cv2.imwrite(str(tmp_path / "c16a.png"), np.dstack([c16, np.zeros_like(c16[..., 0])]))
    cv2.imwrite(str(tmp_path / "c16.tif"), c16)
    for name in ("c16.png", "c16a.png", "c16.tif"):
        for s in (0,) + SIZES:
            assert_twins(load_image(tmp_path / "c8.png", s), load_image(tmp_path / name, s), s == 0)
    # sub-level detail that Pillow's high byte would drop is kept
    detail = c16 + np.random.default_rng(1).integers(0, 200, c16.shape).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "d16.png"), detail)
    exact = load_image(tmp_path / "d16.png", 0).permute(1, 2, 0).numpy()
    assert np.allclose(exact, detail[..., ::-1] / 65535, atol=1e-7)


def test_mode_I_uses_the_stated_bit_depth_or_is_refused(tmp_path):
    fine = (np.linspace(0, 65535, 12 * 10).reshape(12, 10)).astype(np.uint16)
    Image.fromarray(fine).save(tmp_path / "ref.png")
    # 16-bit PGM: Pillow opens it as mode 'I' scaled to 16 bits
    (tmp_path / "g.pgm").write_bytes(b"P5\n10 12\n65535\n" + fine.astype(">u2").tobytes())
    with Image.open(tmp_path / "g.pgm") as im:
        assert im.mode == "I"
    assert torch.equal(load_image(tmp_path / "g.pgm", 8), load_image(tmp_path / "ref.png", 8))
    # 32-bit integer TIFF: no depth we could trust
    Image.fromarray(fine.astype(np.int32) * 1000).save(tmp_path / "i32.tif")
    with pytest.raises(ValueError, match=r"i32\.tif: Pillow mode 'I' \(32-bit integer"):
        load_image(tmp_path / "i32.tif", 8)


def test_float_and_unchecked_modes_are_refused_by_file_and_mode(tmp_path):
    Image.fromarray(np.full((6, 6), 0.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError) as e:
        load_image(tmp_path / "f.tif", 8)
    assert str(tmp_path / "f.tif") in str(e.value) and "mode 'F'" in str(e.value)
    with pytest.raises(ValueError, match="mode 'F'"):
        header_size(tmp_path / "f.tif")  # the indexers refuse it before any training
    Image.new("LAB", (4, 4), (50, 128, 128)).save(tmp_path / "lab.tif")  # Pillow's LAB TIFFs do not round-trip
    with pytest.raises(ValueError, match=r"lab\.tif: Pillow mode 'LAB'"):
        load_image(tmp_path / "lab.tif", 8)


@pytest.mark.parametrize("name, make, expected", [
    ("one.png", lambda: Image.fromarray(np.array([[True, False]])), [[1, 1, 1], [0, 0, 0]]),
    ("grey.png", lambda: Image.fromarray(np.array([[51, 204]], np.uint8)), [[.2, .2, .2], [.8, .8, .8]]),
    # alpha dropped: the colour stays as recorded, also where it is fully transparent
    ("la.png", lambda: Image.fromarray(np.array([[[51, 0], [204, 255]]], np.uint8), "LA"),
     [[.2, .2, .2], [.8, .8, .8]]),
    ("rgba.png", lambda: Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 255, 128]]], np.uint8)),
     [[1, 0, 0], [0, 0, 1]]),
    ("cmyk.tif", lambda: Image.fromarray(np.array([[[0, 0, 0, 0], [0, 255, 255, 0]]], np.uint8), "CMYK"),
     [[1, 1, 1], [1, 0, 0]]),
])
def test_modes_at_stored_size(tmp_path, name, make, expected):
    make().save(tmp_path / name)
    x = load_image(tmp_path / name, 0)  # 0: no resizing, so the values are the file's
    assert x.shape == (3, 1, 2)
    assert torch.allclose(x[:, 0].T, torch.tensor(expected, dtype=torch.float32), atol=1 / 255)


def test_palette_with_transparency_is_read_without_a_warning(tmp_path, recwarn):
    im = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    im.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    im.save(tmp_path / "p.png", transparency=bytes([0, 255] + [255] * 254))
    x = load_image(tmp_path / "p.png", 0)
    assert torch.allclose(x[:, 0].T * 255, torch.tensor([[10., 20, 30], [200, 100, 0]]), atol=1e-4)
    assert not [w for w in recwarn if "Palette" in str(w.message)]


def mask_file(tmp_path, name, arr, mode=None):
    Image.fromarray(arr, mode).save(tmp_path / name) if mode else Image.fromarray(arr).save(tmp_path / name)
    return tmp_path / name


def test_any_non_zero_mask_pixel_is_a_defect(tmp_path):
    m = np.zeros((30, 20), np.uint8)
    m[4:20, 3:9] = 1
    ref = load_mask(mask_file(tmp_path, "m255.png", m * 255), 12)
    variants = {
        "m01.png": m,                                   # 0/1 masks: were read as empty
        "m16.png": m.astype(np.uint16) * 1,             # 16-bit, tiny values
        "m16full.png": m.astype(np.uint16) * 65535,     # 16-bit, full range
        "m_bool.png": m.astype(bool),                   # 1-bit
        "m_red.png": np.dstack([m, 0 * m, 0 * m]),      # colour: a channel non-zero is enough
        "m7.png": m * 7,                                # any level, e.g. a label id
    }
    for name, arr in variants.items():
        path = mask_file(tmp_path, name, arr)
        for s in (12, 64, None):
            got = load_mask(path, s)
            assert torch.equal(got, load_mask(tmp_path / "m255.png", s)), (name, s)
    assert ref.sum() > 0 and set(ref.unique().tolist()) == {0.0, 1.0}
    pal = Image.fromarray(m, "P")
    pal.putpalette([0, 0, 0, 1, 0, 0] + [0] * 762)  # index 1 = a very dark red, still non-zero
    pal.save(tmp_path / "m_p.png")
    assert torch.equal(load_mask(tmp_path / "m_p.png", 12), ref)


def test_empty_mask_and_header_size(tmp_path):
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "blank.png")
    defect, wh = read_mask(tmp_path / "blank.png", None)
    assert wh == (7, 5) and defect.shape == (5, 7) and not defect.any()
    assert header_size(tmp_path / "blank.png") == (7, 5)


@pytest.mark.parametrize("damage", ["truncate", "crc", "garbage", "empty"])
def test_damaged_files_give_one_line_naming_the_file(tmp_path, damage):
    Image.fromarray(picture()).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    bad = {"truncate": data[: len(data) // 2],
           "crc": data[:60] + bytes([data[60] ^ 0xFF]) + data[61:],
           "garbage": data[:8] + b"x" * 40, "empty": b""}[damage]
    (tmp_path / "bad image.png").write_bytes(bad)
    for load in (lambda p: load_image(p, 16), lambda p: load_mask(p, 16)):
        with pytest.raises(ValueError) as e:
            load(tmp_path / "bad image.png")
        assert str(tmp_path / "bad image.png") in str(e.value) and "\n" not in str(e.value)
