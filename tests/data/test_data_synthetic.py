"""Synthetic dataset generator: layout, masks, determinism, caching, CLI."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import synthetic as syn
from data.meta import counts, validate_meta
from utils.io import read_json

REPO = Path(__file__).resolve().parents[2]
CATS = ["tiles", "pcb", "wood_board"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    start = time.perf_counter()
    root = syn.generate(tmp_path_factory.mktemp("syn") / "ds", CATS, seed=3, size=128,
                        n_train=8, n_test_good=6, n_test_bad=10)
    # The brief is < 2 s; the margin keeps slow CI machines from failing spuriously.
    assert time.perf_counter() - start < 6
    return root


def test_counts_and_schema(dataset):
    meta = read_json(dataset / "meta.json")
    validate_meta(meta, dataset)
    assert counts(meta) == {"train": {c: (8, 0) for c in sorted(CATS)}, "test": {c: (6, 10) for c in sorted(CATS)}}
    for cls in CATS:
        allowed = set(syn.STYLE_DEFECTS[syn.style_for(cls)])
        species = {it["specie_name"] for it in meta["test"][cls] if it["anomaly"]}
        assert species == allowed  # round robin: every defect type of the category appears
        assert all(it["specie_name"] == "good" for it in meta["test"][cls] if not it["anomaly"])
    assert read_json(dataset / "params.json")["categories"] == CATS


def test_masks_binary_nonempty_and_aligned(dataset):
    meta = read_json(dataset / "meta.json")
    for items in meta["test"].values():
        for it in (i for i in items if i["anomaly"]):
            img = Image.open(dataset / it["img_path"])
            mask = np.asarray(Image.open(dataset / it["mask_path"]))
            assert img.mode == "RGB" and img.size == (128, 128) and mask.shape == (128, 128)
            assert set(np.unique(mask)) == {0, 255}
            assert 0.005 <= (mask > 0).mean() <= 0.13, it["img_path"]


@pytest.mark.parametrize("style", syn.TEXTURE_STYLES + syn.OBJECT_STYLES)
def test_defects_change_exactly_the_masked_pixels(style):
    for k, kind in enumerate(syn.DEFECTS):
        rng = np.random.default_rng([11, k])
        img, fg, params = syn.render(style, 96, rng)
        clean = syn._to_u8(img)
        bad, mask = syn.apply_defect(clean, fg, kind, style, params, rng)
        diff = np.abs(bad.astype(int) - clean).max(-1)
        assert mask.any() and not (diff[~mask]).any(), (style, kind)
        assert (diff[mask] > syn.CHANGE_THRESHOLD).mean() > 0.95, (style, kind)
        assert not (mask & ~fg).any()  # object defects stay on the object


def test_normal_images_vary_but_stay_consistent(dataset):
    means = {c: np.array([np.asarray(Image.open(p), float).mean((0, 1))
                          for p in sorted((dataset / c / "train" / "good").glob("*.png"))]) for c in CATS}
    for c, m in means.items():
        imgs = [(dataset / c / "train" / "good" / f"{i:03d}.png").read_bytes() for i in range(3)]
        assert len(set(imgs)) == 3  # jitter: no two normal images are identical
        spread = np.abs(m - m.mean(0)).max()
        gap = min(np.abs(m.mean(0) - o.mean(0)).max() for d, o in means.items() if d != c)
        assert spread < gap, c


def test_deterministic_and_seed_sensitive(tmp_path):
    kw = dict(categories=["fabric", "bolt"], size=64, n_train=2, n_test_good=1, n_test_bad=3)
    a = _files(syn.generate(tmp_path / "a", seed=5, **kw))
    b = _files(syn.generate(tmp_path / "b", seed=5, **kw))
    c = _files(syn.generate(tmp_path / "c", seed=6, **kw))
    assert a == b
    assert a.keys() == c.keys() and a != c
    only = _files(syn.generate(tmp_path / "d", seed=5, **dict(kw, categories=["bolt"])))
    assert all(a[k] == v for k, v in only.items() if k.startswith("bolt/"))  # categories are independent


def test_demo_pair_is_cached_and_regenerated_on_change(tmp_path):
    kw = dict(size=48, n_train=2, n_test_good=1, n_test_bad=2)
    a, b = syn.make_demo_pair(tmp_path, seed=0, **kw)
    ma, mb = read_json(a / "meta.json"), read_json(b / "meta.json")
    assert set(ma["train"]).isdisjoint(mb["train"]) and len(ma["train"]) == len(mb["train"]) == 3
    stamp = (a / "meta.json").stat().st_mtime_ns
    assert syn.make_demo_pair(tmp_path, seed=0, **kw) == (a, b)
    assert (a / "meta.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    syn.make_demo_pair(tmp_path, seed=0, **dict(kw, n_train=3))
    assert counts(read_json(a / "meta.json"))["train"]["tiles"] == (3, 0)


def test_stale_files_removed_and_foreign_folders_kept(tmp_path):
    syn.generate(tmp_path / "ds", ["tiles"], size=48, n_train=1, n_test_good=1, n_test_bad=3)
    syn.generate(tmp_path / "ds", ["tiles"], size=48, n_train=1, n_test_good=1, n_test_bad=1)
    assert len(list((tmp_path / "ds" / "tiles" / "test").rglob("*.png"))) == 2
    (tmp_path / "user" / "tiles").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="tiles"):
        syn.generate(tmp_path / "user", ["tiles"], size=48)


@pytest.mark.parametrize("bad", [dict(size=16), dict(defect_types=["dent"]), dict(categories=["../x"]),
                                 dict(categories=[]), dict(n_train=0), dict(seed=-1)])
def test_invalid_arguments(tmp_path, bad):
    kw = dict(categories=["tiles"], size=48, n_train=1, n_test_good=1, n_test_bad=1)
    with pytest.raises(ValueError):
        syn.generate(tmp_path / "ds", **{**kw, **bad})


def test_any_category_name_and_chosen_defects(tmp_path):
    root = syn.generate(tmp_path / "ds", ["my_part"], size=48, n_train=1, n_test_good=0, n_test_bad=2,
                        defect_types=["texture", "colour"])
    assert syn.style_for("my_part") in syn.STYLE_DEFECTS  # unknown names get a stable style
    species = {it["specie_name"] for it in read_json(root / "meta.json")["test"]["my_part"]}
    assert species == {"texture", "colour"}


def test_cli_script(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "data/synthetic.py", "--out", str(out), "--categories", "bolt", "candle",
                          "--size", "48", "--n-train", "2", "--n-test-good", "1", "--n-test-bad", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "candle" in res.stdout and (out / "meta.json").is_file()
