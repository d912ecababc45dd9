"""subspacead (methods/subspacead.py) on the tiny random DINOv2: one subspace per category from all
references and their rotated copies, maps and scores from the definition (bilinear upsampling,
OpenCV's Gaussian blur, top-1 % mean by sorting), the rotation against torchvision's, features,
settings, precision and the refusal of LFE windows."""
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from methods import create_method, resolve_method_config
from methods.base import InferenceOptions
from methods.subspacead import gaussian_blur, top_fraction_mean
from models.augment import rotate_each as rotate_images
from utils.config import MethodConfig

SIZE = 112  # 8 x 8 tokens of the tiny DINOv2 (patch 14)


def make(backbone="tiny_dinov2", size=SIZE, **params):
    return create_method(resolve_method_config(MethodConfig(name="subspacead", backbone=backbone, image_size=size,
                                                            params=params)))


def images(n, seed):
    """Smooth random textures (not white noise: the rotated copies must look like their original)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, SIZE // 8, SIZE // 8, generator=g), size=(SIZE, SIZE), mode="bilinear")


def slow_residuals(train: np.ndarray, queries: np.ndarray, rank: int) -> np.ndarray:
    """PCA of the training rows from the definition (float64), then ||x - mu - U U^T (x - mu)||^2."""
    mu = train.mean(0)
    c = train - mu
    w, v = np.linalg.eigh(c.T @ c / (len(train) - 1))
    u = v[:, np.argsort(w)[::-1][:rank]]
    d = queries - mu
    r = d - (d @ u) @ u.T
    return (r * r).sum(-1)


def test_one_subspace_from_every_reference_and_rotated_copy():
    """The category's subspace is the PCA of the tokens of all k references and all their rotated
    copies together (not one image's, not the originals' only), the copies rotated by the seeded
    angles, uniform in [0, 345) degrees."""
    k, count, seed = 2, 1, 7
    m = make(rank=6, augment_count=count, augment_seed=seed)
    refs = images(k, 0)
    state = m.fit(refs, ["bottle/train/good/000.png", "bottle/train/good/001.png"], batch_size=3)
    angles = torch.rand(k, count, generator=torch.Generator().manual_seed(seed)) * 345
    fitted = [refs] + [rotate_images(refs[i:i + 1], angles[i, j:j + 1]) for i in range(k) for j in range(count)]
    rows = torch.cat([m.features(x)[0].reshape(-1, m.feature_dim) for x in fitted]).double().numpy()
    queries = m.features(images(2, 1))[0].reshape(-1, m.feature_dim)
    want = slow_residuals(rows, queries.double().numpy(), 6)
    np.testing.assert_allclose(state.subspace.residual(queries).double().numpy(), want, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(state.subspace.mean.double().numpy(), rows.mean(0), rtol=1e-4, atol=1e-4)
    assert state.subspace.n_samples == k * (1 + count) * 64 and state.n_references == k * (1 + count)
    assert state.grid == (8, 8)
    # the setting is used as given: a fit from another seed sees other copies
    other = make(rank=6, augment_count=count, augment_seed=seed + 1).fit(refs, batch_size=3)
    assert not torch.allclose(other.subspace.mean, state.subspace.mean)


def test_fit_does_not_depend_on_batching_or_on_what_ran_before():
    m = make(augment_count=3)
    refs = images(3, 2)
    a = m.fit(refs, batch_size=2)
    torch.manual_seed(123)  # the global RNG is not what draws the angles
    torch.rand(10)
    b = m.fit(refs, batch_size=5)
    torch.testing.assert_close(a.subspace.mean, b.subspace.mean, rtol=1e-5, atol=1e-5)
    assert a.subspace.rank == b.subspace.rank
    torch.testing.assert_close(a.subspace.residual(m.features(images(1, 3))[0]),
                               b.subspace.residual(m.features(images(1, 3))[0]), rtol=1e-3, atol=1e-4)


def test_references_batches_and_the_categories_left_unrotated():
    m = make(augment_count=3)
    refs = images(2, 4)
    batches = list(m.reference_batches(refs, 3, batch_size=4))
    got = torch.cat(batches)
    assert got.shape[0] == 2 + 2 * 3
    torch.testing.assert_close(got[:2], refs)  # the originals first, untouched
    assert all(not torch.equal(got[2 + i], refs[i // 3]) for i in range(6))
    torch.testing.assert_close(torch.cat(list(m.reference_batches(refs, 3, batch_size=1))), got)
    # the authors left transistor unrotated (its 'misplaced' defect is a rotation): a folder name
    assert m.augmentations(["transistor/train/good/000.png"]) == 0
    assert m.augmentations(["/data/mvtec/transistor/train/good/000.png"]) == 0
    assert m.augmentations(["bottle/train/good/000.png"]) == 3
    assert m.augmentations(["bottle/train/good/transistor.png"]) == 3  # a file name is not a category
    assert make(augment_count=0).augmentations(["bottle/train/good/000.png"]) == 0


@pytest.mark.parametrize("angle", [90.0, 180.0, 33.0, 301.5])
@pytest.mark.parametrize("hw", [(20, 20), (21, 21), (20, 30)])
def test_rotation_is_torchvisions_random_rotation(angle, hw):
    """What the authors ran: torchvision's rotate, nearest neighbour, black outside, same size."""
    img = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    ours = rotate_images(img, torch.tensor([angle, angle]))
    theirs = TF.rotate(img, angle, interpolation=InterpolationMode.NEAREST, fill=0)
    assert torch.equal(ours, theirs)
    # one angle per image in one batch
    mixed = rotate_images(img, torch.tensor([angle, 0.0]))
    assert torch.equal(mixed[0], theirs[0]) and torch.equal(mixed[1], img[1])


@pytest.mark.parametrize("kernel,sigma", [(3, 4.0), (5, 1.5)])
def test_blur_is_opencvs_gaussian_blur(kernel, sigma):
    maps = torch.rand(2, 9, 13, generator=torch.Generator().manual_seed(1))
    ours = gaussian_blur(maps, kernel, sigma)
    for i in range(2):
        want = cv2.GaussianBlur(maps[i].numpy(), (kernel, kernel), sigma)
        np.testing.assert_allclose(ours[i].numpy(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(gaussian_blur(maps, 1, sigma), maps) and torch.equal(gaussian_blur(maps, 3, 0.0), maps)


def test_top_fraction_mean_by_sorting():
    m = torch.arange(100.0).reshape(1, 10, 10)
    assert top_fraction_mean(m, 0.05).item() == pytest.approx(97.0)  # mean of 95..99
    assert top_fraction_mean(m, 0.0).item() == 99.0  # at least one pixel: the maximum
    assert top_fraction_mean(m, 1.0).item() == pytest.approx(49.5)
    assert top_fraction_mean(m, 0.019).item() == 99.0  # floor(1.9) = 1 pixel
    r = torch.rand(3, 37, 41, generator=torch.Generator().manual_seed(2))
    for frac in (0.01, 0.1, 0.33):
        k = max(1, int(37 * 41 * frac))
        want = [np.sort(x.numpy().ravel())[-k:].mean() for x in r]
        np.testing.assert_allclose(top_fraction_mean(r, frac).numpy(), want, rtol=1e-6)


def test_maps_and_scores_from_the_definition():
    """Map: the patches' squared residuals upsampled bilinearly (half-pixel centres, OpenCV's
    INTER_LINEAR) to the input size, then blurred (3x3, sigma 4); score: the mean of the map's
    top 1 % of pixels; the returned map is that map at the evaluation size."""
    m = make(augment_count=1)
    state = m.fit(images(2, 5))
    q = images(3, 6)
    maps, scores = m.predict(q, state, (SIZE, SIZE))
    patch = state.subspace.residual(m.features(q)[0]).reshape(3, 8, 8).numpy()
    k = max(1, int(SIZE * SIZE * 0.01))
    for i in range(3):
        up = cv2.resize(patch[i], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        want = cv2.GaussianBlur(up, (3, 3), 4.0)
        np.testing.assert_allclose(maps[i].numpy(), want, rtol=1e-4, atol=1e-5 * float(want.max()))
        assert scores[i].item() == pytest.approx(np.sort(want.ravel())[-k:].mean(), rel=1e-4)
    small, small_scores = m.predict(q, state, (40, 56))
    assert small.shape == (3, 40, 56)
    torch.testing.assert_close(small_scores, scores)  # the score does not depend on the evaluation size
    assert maps.dtype == torch.float32 and scores.shape == (3,)
    # a reference is normal: below a foreign texture (the tiny network is random, so this is all)
    own, _ = m.predict(images(2, 5), state, (SIZE, SIZE))
    assert own.mean() < maps.mean()


def _pixel_features(method):
    """Replace the backbone by a hand-made feature map: every pixel is a patch, its RGB value the
    3-dim feature, so the normal subspace and each residual are known exactly."""
    def features(images):
        b, c, h, w = images.shape
        return images.permute(0, 2, 3, 1).reshape(b, h * w, c).float(), (h, w)
    method.features = features
    method.feature_dim = 3


def test_a_hand_made_subspace_gives_the_known_residual_map_and_score():
    """Normal pixels are mu + x u1 + y u2; reference 1 varies along u1 only, reference 2 along u2
    only (variances 90 % and 9.5 % of the total), and both carry a 0.5 % wobble along n, the third
    axis. The 99 % subspace is therefore span(u1, u2) through mu: a normal test pixel, anywhere in
    that plane, scores 0, and a pixel moved by d along n scores exactly d^2. Each plausible wrong
    version gives another map: PCA without centring (mu is not along n), the projection in place of
    the residual, a rank one lower (u2 left out) or one higher (n taken in), and a subspace fitted
    on one reference image in place of the category's references together."""
    mu = torch.tensor([0.6, 0.4, 0.5])
    u1 = torch.tensor([1.0, -1.0, 0.0]) / 2 ** 0.5
    u2 = torch.tensor([1.0, 1.0, -2.0]) / 6 ** 0.5
    n = torch.tensor([1.0, 1.0, 1.0]) / 3 ** 0.5
    h1 = torch.tensor([1.0, -1.0] * 8)  # zero-mean sign patterns over the 4 x 4 pixels,
    h3 = torch.tensor([1.0, 1.0, -1.0, -1.0] * 4)  # orthogonal to each other
    a, c, b = 0.9 ** 0.5, 0.095 ** 0.5, 0.0025 ** 0.5  # variances 0.9 : 0.095 : 2 * 0.0025

    def image(coef1, coef2, coef3, side):
        pix = mu + coef1[:, None] * u1 + coef2[:, None] * u2 + coef3[:, None] * n  # (side * side, 3)
        return pix.T.reshape(3, side, side)

    zero = torch.zeros(16)
    refs = torch.stack([image(a * h1, zero, b * h3, 4), image(zero, c * h1, b * h3, 4)])
    m = make(augment_count=0, blur_kernel=0, score_top_fraction=0.1)
    _pixel_features(m)
    state = m.fit(refs, ["bottle/train/good/0.png", "bottle/train/good/1.png"])
    s = state.subspace
    assert (s.rank, s.n_samples) == (2, 32) and s.explained == pytest.approx(0.995, abs=1e-6)
    torch.testing.assert_close(s.mean, mu)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, generator=g), torch.randn(100, generator=g)  # far outside the references' range too
    d = torch.zeros(100)
    d[[11, 12, 57]] = torch.tensor([0.2, -0.3, 0.1])  # three anomalous pixels of a 10 x 10 image
    test = torch.stack([image(x, y, d, 10), image(-x, 2 * y, zero.new_zeros(100), 10)])
    maps, scores = m.predict(test, state, (10, 10))
    want = torch.stack([d * d, torch.zeros(100)]).reshape(2, 10, 10)
    torch.testing.assert_close(maps, want, rtol=0, atol=1e-5)
    # top 10 % of 100 pixels: the 3 anomalous ones and 7 zeros
    torch.testing.assert_close(scores, torch.tensor([(0.04 + 0.09 + 0.01) / 10, 0.0]), rtol=0, atol=1e-6)


def test_features_raw_or_unit_and_layer_fusion():
    q = images(2, 8)
    m = make()
    raw = m.backbone(q, normalize_tokens=False).patch_tokens
    assert not torch.allclose(raw[0].norm(dim=-1), torch.ones(1))  # raw tokens are not unit length
    torch.testing.assert_close(m.features(q)[0], torch.stack(raw).mean(0))  # the authors' mean of layers
    unit = make(feature_norm="l2").features(q)[0]
    torch.testing.assert_close(unit, torch.stack([F.normalize(t, dim=-1) for t in raw]).mean(0))
    cat = make(layer_fusion="concat")
    assert cat.feature_dim == 4 * 64
    torch.testing.assert_close(cat.features(q)[0], torch.cat(raw, dim=-1))
    cnn = make("tiny_cnn", size=64)  # layers of different widths: concatenated
    assert not cnn.fuse_mean and cnn.feature_dim == sum(cnn.backbone.layer_dims)
    with pytest.raises(ValueError, match="layer_fusion 'mean' needs layers of one width.*'concat'"):
        make("tiny_cnn", size=64, layer_fusion="mean")


@pytest.mark.parametrize("params,match", [
    ({"explained_variance": 1.5}, "'explained_variance' must be a fraction"),
    ({"explained_variance": None}, "set 'explained_variance' or 'rank'"),
    ({"rank": 0}, "'rank' must be an integer"),
    ({"layer_fusion": "max"}, "'layer_fusion' must be one of auto, mean, concat"),
    ({"feature_norm": "unit"}, "'feature_norm' must be one of none, l2"),
    ({"augment_count": -1}, "'augment_count'"),
    ({"blur_kernel": 4}, "'blur_kernel' must be odd"),
    ({"score_top_fraction": 2}, "'score_top_fraction'"),
    ({"no_augment_categories": "transistor"}, "'no_augment_categories' must be a list"),
    ({"whiten": True}, "has no parameter"),
])
def test_bad_settings_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        make(**params)


def test_precision_windows_and_memory():
    m = make(augment_count=1)
    refs, q = images(2, 9), images(2, 10)
    maps, scores = m.predict(q, m.fit(refs), (56, 56))
    m.configure(InferenceOptions(precision="bf16"))
    assert m.precision == "bf16"
    maps16, scores16 = m.predict(q, state16 := m.fit(refs), (56, 56))
    assert maps16.dtype == torch.float32 and state16.subspace.basis.dtype == torch.float32
    torch.testing.assert_close(scores16, scores, rtol=0.05, atol=0)  # bf16 backbone, fp32 subspace
    # LFE windows are refused with a one-line reason (docs/subspacead.md: why)
    with pytest.raises(ValueError, match="whole images only"):
        m.configure(InferenceOptions(winmode="mul"))
    info = m.state_nbytes(state16)
    s = state16.subspace
    assert info["subspace_bytes"] == 4 * (64 + 64 * s.rank + s.rank) and info["subspace_rank"] == s.rank


def test_test_py_records_parameters_and_caps_the_rank_of_a_small_reference(datasets, tmp_path):
    """test.py --param reaches a training-free method and is recorded; a results folder of other
    parameters is refused. 1 shot at 56 px: 16 reference patches in 64 dimensions span at most 15
    directions, whatever the explained variance asks."""
    from conftest import load_test_script
    from utils.config import TestConfig, parse_params

    script = load_test_script()
    assert parse_params(["augment_count=0", "feature_norm=l2", "rank=null"]) == \
        {"augment_count": 0, "feature_norm": "l2", "rank": None}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_params(["augment_count"])
    cfg = TestConfig(data_root=str(datasets[1]), dataset="target", method="subspacead", backbone="tiny_dinov2",
                     image_size=56, classes=["candle"], k_shot=1, eval_size=32, results_root=str(tmp_path),
                     model_name="sub", params={"augment_count": 0, "explained_variance": 1.0})
    run = script.evaluate(cfg)
    config = json.loads((run / "config.json").read_text())
    assert config["method"]["augment_count"] == 0 and config["test"]["params"]["augment_count"] == 0
    info = json.loads((run / "metrics.json").read_text())["categories"]["candle"]
    assert (info["subspace_rank"], info["subspace_samples"]) == (15, 16) and info["subspace_requested_rank"] >= 15
    with pytest.raises(ValueError, match="differs in params"):
        script.evaluate(TestConfig(**{**cfg.__dict__, "params": {"augment_count": 1}}))
    from methods.checkpoint import build_method
    with pytest.raises(ValueError, match="can be set for training-free methods only"):
        build_method(str(tmp_path / "epoch_1.pth"), params={"augment_count": 0})


def test_the_authors_backbone_config():
    """dinov2_vitg14_reg4 (the method's default) without building 1.1 B parameters: the timm
    architecture on the meta device has 40 blocks of width 1536, a class token and 4 registers, and
    the configured blocks 23-29 are the authors' hidden_states[-18 .. -12]."""
    from models.backbones import load_backbone_config
    from models.backbones.timm import _meta_model

    cfg = load_backbone_config("dinov2_vitg14_reg4")
    assert resolve_method_config(MethodConfig(name="subspacead"))["backbones"]["backbone"]["config"] == cfg["name"]
    model = _meta_model(cfg["model"], {"dynamic_img_size": True, "img_size": cfg["model_img_size"]})
    n_blocks = len(model.blocks)
    assert (n_blocks, model.embed_dim, model.num_prefix_tokens, model.patch_embed.patch_size[0]) == (40, 1536, 5, 14)
    hidden_states = list(range(n_blocks + 1))  # Hugging Face: the embeddings, then each block's output
    assert cfg["layers"] == sorted(hidden_states[i] for i in range(-18, -11))
    assert cfg["image_size"] == 672 and cfg["image_size"] % 14 == 0 and cfg["pretrained"] == "lvd142m"
