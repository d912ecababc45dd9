"""knn's AnomalyDINO ingredients and the anomalydino method against a brute-force reference written
from the definitions: every reference rotated (torch.rot90, exact), every test patch's distance the
minimum of 1 - cosine over all bank patches found by a loop, background patches 0, the image score
the mean of the sorted highest 1 %."""
import pytest
import torch

from methods import METHODS, create_method, resolve_method_config
from methods.anomalydino import AnomalyDINOMethod
from methods.base import InferenceOptions
from methods.knn import KNNMethod
from models.foreground import foreground_mask
from utils.config import MethodConfig

RIGHT_ANGLES = [0, 90, 180, 270]


def build(name="anomalydino", **params):
    torch.manual_seed(0)
    return create_method(resolve_method_config(MethodConfig(name=name, backbone="tiny_dinov2", params=params))).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    # smooth random pictures, so rotated copies are different pictures to the backbone
    base = torch.nn.functional.interpolate(torch.rand(5, 3, 14, 14, generator=g), size=224, mode="bilinear")
    return base[:2], base[2:]  # references, queries


def brute_force(method, refs, queries, angles, top_percent, mask_threshold=None):
    """(maps (B, h, w), scores (B,)) from the definition, one test patch at a time."""
    backbone = method.backbone
    rotated = [torch.rot90(r, a // 90, dims=(-2, -1)) for r in refs for a in angles]
    bank = [torch.cat([backbone(img[None]).patch_tokens[l][0] for img in rotated]) for l in range(len(backbone.layers))]
    feats = backbone(queries)
    h, w = feats.grid
    layer_maps = torch.zeros(len(bank), queries.shape[0], h * w)
    for l, mem in enumerate(bank):
        for b in range(queries.shape[0]):
            for p in range(h * w):
                layer_maps[l, b, p] = (1 - mem @ feats.patch_tokens[l][b, p]).min()  # every bank patch
    if mask_threshold is not None:
        keep = foreground_mask(feats.patch_tokens[-1], feats.grid, mask_threshold).reshape(-1, h * w)
        layer_maps = layer_maps * keep
    scores = []
    for b in range(queries.shape[0]):
        per_layer = []
        for l in range(len(bank)):
            vals = sorted(layer_maps[l, b].tolist(), reverse=True)
            n = int(len(vals) * top_percent / 100) if top_percent is not None else 0
            per_layer.append(vals[0] if n == 0 else sum(vals[:n]) / n)
        scores.append(sum(per_layer) / len(per_layer))
    return layer_maps.mean(0).reshape(-1, h, w), torch.tensor(scores)


def test_knn_defaults_are_plain_patch_matching(images):
    knn = build("knn")
    cfg = knn.config
    assert (cfg["rotations"], cfg["top_percent"], cfg["masking"]) == ([], None, "off")
    refs, queries = images
    state = knn.fit(refs, category="screw")  # knn masks nothing by default, whatever the category
    maps, scores = knn.predict(queries, state, (16, 16))
    ref_maps, ref_scores = brute_force(knn, refs, queries, [0], None)
    torch.testing.assert_close(maps, ref_maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)


def test_anomalydino_matches_the_brute_force_definition(images):
    refs, queries = images
    method = build(rotations=RIGHT_ANGLES, masking="on", mask_threshold=4.0)
    state = method.fit(refs)
    assert state.bank.k == 8 and state.masked
    maps, scores = method.predict(queries, state, (16, 16))
    ref_maps, ref_scores = brute_force(method, refs, queries, RIGHT_ANGLES, 1.0, mask_threshold=4.0)
    torch.testing.assert_close(maps, ref_maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)
    # the case is not degenerate: some patches are masked (0), and 1 % of 256 patches is 2 patches,
    # so the score is not the maximum
    masked = maps == 0
    assert masked.any() and not masked.all()
    _, max_scores = brute_force(method, refs, queries, RIGHT_ANGLES, None, mask_threshold=4.0)
    assert (scores - max_scores).abs().max() > 1e-3


def test_rotated_parts_find_their_rotated_references(images):
    """A test image that is a reference turned by 90 degrees: with the rotations in the bank every patch
    has an exact match (distance 0); without them (knn, or the augmentation not applied) it has not."""
    refs, _ = images
    query = torch.rot90(refs[:1], 1, dims=(-2, -1))
    dino = build(rotations=RIGHT_ANGLES, masking="off")
    maps, scores = dino.predict(query, dino.fit(refs), (16, 16))
    assert maps.abs().max() < 1e-5 and scores.abs().max() < 1e-5
    knn = build("knn")
    plain_maps, plain_scores = knn.predict(query, knn.fit(refs), (16, 16))
    assert plain_scores.min() > 1e-2 and plain_maps.mean() > 1e-3


def test_masking_follows_the_category_list_and_the_switch():
    dino = build()
    cats = dino.config["mask_categories"]
    assert {"capsule", "hazelnut", "pill", "screw", "toothbrush", "candle", "pcb1", "pipe_fryum"} <= set(cats)
    assert "bottle" not in cats and "metal_nut" not in cats and "carpet" not in cats
    refs = torch.rand(1, 3, 224, 224)
    assert dino.fit(refs, category="screw").masked and not dino.fit(refs, category="bottle").masked
    assert not dino.fit(refs).masked  # no category known (predict.py without --category)
    assert build(masking="on").fit(refs, category="bottle").masked
    assert not build(masking="off").fit(refs, category="screw").masked


@pytest.mark.parametrize("winmode", ["mul", "onlywin"])
def test_background_is_zero_in_the_window_and_blended_maps_too(images, winmode):
    refs, queries = images
    method = build(rotations=[0, 180], masking="on", mask_threshold=4.0)
    method.configure(InferenceOptions(winmode=winmode, win_size=8, win_stride=4))
    state = method.fit(refs)
    assert state.window_bank.k == 4  # the window bank is built from the rotated references as well
    maps, scores = method.predict(queries, state, (16, 16))
    with torch.no_grad():
        feats = method.backbone(queries)
    keep = foreground_mask(feats.patch_tokens[-1], feats.grid, 4.0)
    assert (~keep).any() and (maps[~keep] == 0).all() and (maps[keep] > 0).all()
    assert scores.shape == (3,)


def test_anomalydino_is_knn_with_its_parameters(images):
    """Same parameters, same numbers: the ablation rows of the two methods measure the same thing."""
    refs, queries = images
    params = dict(rotations=[0, 90], top_percent=5.0, masking="on", mask_threshold=4.0)
    a, b = build("anomalydino", **params), build("knn", **params)
    torch.testing.assert_close(a.predict(queries, a.fit(refs), (16, 16)), b.predict(queries, b.fit(refs), (16, 16)),
                               rtol=0, atol=0)


def test_configs_ablations_and_bad_parameters():
    assert METHODS["anomalydino"] is AnomalyDINOMethod and not AnomalyDINOMethod.trainable
    dino = resolve_method_config(MethodConfig(name="anomalydino"))
    assert dino["backbones"]["backbone"]["config"] == "dinov2_vits14_last"
    assert dino["rotations"] == [0, 45, 90, 135, 180, 225, 270, 315] and dino["top_percent"] == 1.0
    for cls in (KNNMethod, AnomalyDINOMethod):
        for params in cls.ablations.values():
            resolve_method_config(MethodConfig(name=cls.name, params=params))
    assert KNNMethod.ablations["aug"]["rotations"] == dino["rotations"]
    for params, message in (({"rotations": 90}, "rotations"), ({"rotations": ["a"]}, "rotations"),
                            ({"top_percent": 0}, "top_percent"), ({"top_percent": 101}, "top_percent"),
                            ({"masking": "yes"}, "masking"), ({"mask_categories": "screw"}, "mask_categories"),
                            ({"mask_threshold": "high"}, "mask_threshold"), ({"rotation": [0]}, "no parameter")):
        with pytest.raises(ValueError, match=message):
            resolve_method_config(MethodConfig(name="anomalydino", params=params))


def test_dinov2_configs_take_the_last_block_after_the_final_norm():
    from models.backbones import load_backbone_config

    for size, depth in (("s", 12), ("b", 12), ("l", 24)):
        cfg = load_backbone_config(f"dinov2_vit{size}14_last")
        assert cfg["layers"] == [depth] and cfg["norm"] is True and cfg["image_size"] == 448


def test_bf16_backbone_keeps_the_bank_and_scores_fp32(images):
    refs, queries = images
    method = build(rotations=[0, 180], masking="on", mask_threshold=4.0)
    fp32 = method.predict(queries, method.fit(refs), (16, 16))
    method.configure(InferenceOptions(precision="bf16"))
    state = method.fit(refs)
    assert state.bank.tokens[0].dtype == torch.float32
    maps, scores = method.predict(queries, state, (16, 16))
    assert maps.dtype == torch.float32 and (maps - fp32[0]).abs().mean() < 0.05
