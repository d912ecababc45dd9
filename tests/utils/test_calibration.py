"""utils/calibration.py: the rule that turns normal photos' maps and scores into thresholds, and the
leave-one-out over the references (never a reference against itself)."""
import numpy as np
import pytest
import torch

from utils.calibration import CALIBRATION, LEAVE_ONE_OUT, estimate, leave_one_out, rates, score_images
from utils.visualize import ColourScale


def _normal(seed=0, n=6, side=16):
    rng = np.random.default_rng(seed)
    maps = rng.gamma(2.0, 0.05, size=(n, side, side)).astype(np.float32)
    return maps, maps.reshape(n, -1).max(axis=1) + rng.normal(0, 0.01, n)


def test_the_rule_in_numbers():
    maps, scores = _normal()
    photos = [f"n{i}.png" for i in range(len(scores))]
    cal = estimate(maps, scores, photos)
    # image: the largest normal score (an observed one); pixel: the 99.9th percentile of all pixels pooled;
    # the colour floor: their median
    assert cal.image == pytest.approx(scores.max())
    assert cal.pixel == pytest.approx(np.percentile(maps.ravel(), 99.9))
    assert cal.floor == pytest.approx(np.median(maps.ravel()))
    assert cal.source == CALIBRATION and cal.photos == photos and len(cal.normal_scores) == len(photos)
    assert (maps > cal.pixel).mean() == pytest.approx(0.001, abs=0.0015)
    low = estimate(maps, scores, photos, image_percentile=50)
    assert low.image in scores.tolist() and low.image == np.sort(scores)[len(scores) // 2]  # "higher": observed
    # the same maps in a list of arrays of other shapes pool to the same values
    assert estimate(list(maps.reshape(len(maps), 8, 32)), scores, photos).pixel == pytest.approx(cal.pixel)


def test_thresholds_are_monotone_in_the_percentile():
    maps, scores = _normal(seed=3, n=9)
    photos = [str(i) for i in range(9)]
    percentiles = [50, 80, 90, 95, 99, 99.9, 100]
    pix = [estimate(maps, scores, photos, pixel_percentile=p).pixel for p in percentiles]
    img = [estimate(maps, scores, photos, image_percentile=p).image for p in percentiles]
    assert all(a <= b for a, b in zip(pix, pix[1:])) and pix[0] < pix[-1]
    assert all(a <= b for a, b in zip(img, img[1:])) and img[0] < img[-1]
    assert pix[-1] == pytest.approx(maps.max()) and img[-1] == pytest.approx(scores.max())


@pytest.mark.parametrize("kwargs, named", [({"pixel_percentile": 0}, "--pixel-percentile"),
                                           ({"image_percentile": 101}, "--image-percentile"),
                                           ({"pixel_percentile": float("nan")}, "--pixel-percentile"),
                                           ({"image_percentile": True}, "--image-percentile")])
def test_a_bad_percentile_is_refused_by_name(kwargs, named):
    maps, scores = _normal()
    with pytest.raises(ValueError, match=named):
        estimate(maps, scores, [str(i) for i in range(len(scores))], **kwargs)


def test_non_finite_and_empty_inputs_are_refused():
    maps, scores = _normal(n=3)
    scores[1] = np.nan
    with pytest.raises(ValueError, match="b.png"):
        estimate(maps, scores, ["a.png", "b.png", "c.png"])
    with pytest.raises(ValueError, match="at least one normal photo"):
        estimate(np.empty((0, 4, 4)), np.empty(0), [])
    with pytest.raises(ValueError, match="2 scores for 3 photos"):
        estimate(maps[:2], scores[:2], ["a", "b", "c"])


def test_colour_scale_puts_the_normal_range_below_the_middle():
    maps, scores = _normal(seed=5)
    cal = estimate(maps, scores, [str(i) for i in range(len(scores))])
    scale = cal.colour_scale("jet")
    pos = scale.normalise(maps)
    assert scale.vcenter == cal.pixel and scale.vmin == pytest.approx(cal.floor)
    assert np.median(pos) == pytest.approx(0.0, abs=1e-3)  # the median normal pixel: the bottom colour
    assert (pos < 0.5).mean() >= 0.998  # the normal range is the cold half
    beyond = cal.pixel + 0.5 * (cal.pixel - cal.floor)
    assert scale.normalise(beyond) == pytest.approx(0.75)  # beyond normal: the warm half


# --------------------------------------------------------------------------- #
# leave-one-out
# --------------------------------------------------------------------------- #
class Spy:
    """A method whose images are constant tensors (value = the photo's id) and whose score is the distance
    to the nearest fitted id: 0 exactly when a photo is scored against a state that holds it."""

    device = torch.device("cpu")

    def __init__(self):
        self.fits, self.scored = [], []

    def fit(self, images, sources, batch_size=8, *, category=None):
        ids = images[:, 0, 0, 0].tolist()
        assert [f"ref{int(i)}" for i in ids] == list(sources)  # sources travel with their images
        self.fits.append(ids)
        return torch.tensor(ids)

    def predict(self, images, state, out_size):
        ids = images[:, 0, 0, 0]
        self.scored.append((ids.tolist(), state.tolist()))
        d = (ids[:, None] - state[None]).abs().min(dim=1).values
        return d[:, None, None].expand(-1, *out_size).clone(), d


def _refs(k):
    return torch.arange(k, dtype=torch.float32)[:, None, None, None].expand(k, 3, 4, 4).clone(), \
        [f"ref{i}" for i in range(k)]


def test_leave_one_out_never_scores_a_reference_against_itself():
    spy = Spy()
    images, sources = _refs(4)
    maps, scores = leave_one_out(spy, images, sources, (5, 6), batch_size=2)
    assert maps.shape == (4, 5, 6) and scores.shape == (4,)
    assert len(spy.fits) == 4 and all(len(f) == 3 for f in spy.fits)
    assert sorted(i for ids, _ in spy.scored for i in ids) == [0, 1, 2, 3]  # each reference once
    for ids, fitted in spy.scored:
        assert not set(ids) & set(fitted)
    np.testing.assert_allclose(scores, [1, 1, 1, 1])  # nearest other id: 1 away; itself would give 0
    with pytest.raises(ValueError, match="at least 2 references"):
        leave_one_out(spy, *_refs(1), (2, 2))


def test_score_images_batches_alike():
    spy = Spy()
    images, sources = _refs(5)
    state = spy.fit(images[:2], sources[:2])
    m1, s1 = score_images(spy, state, images, (3, 3), batch_size=1)
    m4, s4 = score_images(spy, state, images, (3, 3), batch_size=4)
    np.testing.assert_array_equal(s1, s4)
    np.testing.assert_array_equal(m1, m4)
    np.testing.assert_array_equal(s1, [0, 0, 1, 2, 3])


def test_a_calibration_set_equal_to_the_references_sits_below_every_other_photo(datasets):
    """knn and anomalydino match patches to their nearest reference patch: the references themselves
    score about 0, so thresholds calibrated on them are exceeded by every photo that differs, normal or
    not (which is why predict.py refuses references as calibration photos)."""
    from data.dataset import load_image
    from methods import create_method, resolve_method_config
    from utils.config import MethodConfig

    root = datasets[1] / "candle"
    for name, backbone in (("knn", "tiny_clip"), ("anomalydino", "tiny_dinov2")):
        torch.manual_seed(0)
        method = create_method(resolve_method_config(MethodConfig(name=name, backbone=backbone)))
        size = method.image_size
        refs = torch.stack([load_image(p, size) for p in sorted((root / "train/good").glob("*.png"))[:2]])
        others = torch.stack([load_image(p, size) for p in sorted((root / "test").glob("*/*.png"))])
        state = method.fit(refs, ["a", "b"])
        cal = estimate(*score_images(method, state, refs, (size, size)), ["a", "b"])
        maps, scores = score_images(method, state, others, (size, size))
        assert cal.image < 1e-3, name
        assert (scores > cal.image).all() and (maps.reshape(len(maps), -1).max(1) > cal.pixel).all(), name
        # leave-one-out on the same two references is a real measurement: well above the self-scores
        _, loo = leave_one_out(method, refs, ["a", "b"], (size, size))
        assert loo.min() > 10 * max(cal.image, 1e-4), name


def test_rates():
    fpr, recall = rates([0, 0, 0, 0, 1, 1], [1, 0, 0, 0, 1, 0])
    assert (fpr, recall) == (0.25, 0.5)
    assert np.isnan(rates([0, 0], [1, 0])[1]) and np.isnan(rates([1], [1])[0])
    with pytest.raises(ValueError, match="differ in size"):
        rates([0, 1], [1])
