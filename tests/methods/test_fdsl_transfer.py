"""FDSL's test-time options for another feature distribution (methods/fdsl.py): bn_stats "reference"
(BatchNorm statistics recomputed on the test category's references) and fd_merge W (the paper's merge
of the FD distance and the learned map, each on its references' range)."""
import json

import pytest
import torch

from methods import create_method, resolve_method_config
from models.fdsl import FDSL, batchnorms, bn_stats_swapped, map_range, merge_maps, normalise_to, reference_bn_stats
from models.memory import distance_maps, leave_out_alignment
from utils.config import MethodConfig, TestConfig


def unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


# --------------------------------------------------------------------------- #
# leave-one-out alignment of the references
# --------------------------------------------------------------------------- #
def test_leave_out_alignment_never_matches_a_patch_to_its_own_image_or_neighbours():
    torch.manual_seed(0)
    grid = (4, 5)
    two = unit(torch.randn(2, 20, 8))
    aligned = leave_out_alignment(two, grid)
    flat = two.reshape(40, 8)
    source = (aligned.reshape(40, 1, 8) == flat.reshape(1, 40, 8)).all(-1).float().argmax(1)
    assert ((source // 20) != torch.arange(40) // 20).all()  # k = 2: always the other image
    # and it is the best match among the other image's patches
    best = (flat[:20] @ flat[20:].T).argmax(1) + 20
    assert torch.equal(source[:20], best)

    one = unit(torch.randn(1, 20, 8))
    source = (leave_out_alignment(one, grid).reshape(20, 1, 8) == one.reshape(1, 20, 8)).all(-1).float().argmax(1)
    r, c = torch.arange(20) // 5, torch.arange(20) % 5
    assert (((r - r[source]).abs() > 1) | ((c - c[source]).abs() > 1)).all()  # k = 1: outside the 3x3 window
    with pytest.raises(ValueError, match="no patch farther"):
        leave_out_alignment(unit(torch.randn(1, 4, 8)), (2, 2))


# --------------------------------------------------------------------------- #
# the merge
# --------------------------------------------------------------------------- #
def test_merge_is_the_weighted_sum_of_both_maps_each_on_its_references_range():
    torch.manual_seed(1)
    learned, distance = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4) * 0.3
    ls = torch.tensor([[0.1, 0.6], [0.2, 0.4]])  # per layer (low, high)
    ds = torch.tensor([[0.0, 0.2], [0.05, 0.1]])
    w = 0.75
    out = merge_maps(learned, distance, ls, ds, w)
    expect_l = torch.stack([(learned[i] - ls[i, 0]) / (ls[i, 1] - ls[i, 0]) for i in range(2)])
    expect_d = torch.stack([(distance[i] - ds[i, 0]) / (ds[i, 1] - ds[i, 0]) for i in range(2)])
    torch.testing.assert_close(out, (1 - w) * expect_l + w * expect_d)
    torch.testing.assert_close(merge_maps(learned, distance, ls, ds, 0.0), expect_l)
    torch.testing.assert_close(merge_maps(learned, distance, ls, ds, 1.0), expect_d)
    # each input moves the result: a merge that drops either one fails here
    bump = torch.zeros_like(learned)
    bump[0, 0, 1, 1] = 0.2
    assert (merge_maps(learned + bump, distance, ls, ds, w) - out)[0, 0, 1, 1] > 0.05
    assert (merge_maps(learned, distance + bump, ls, ds, w) - out)[0, 0, 1, 1] > 0.5
    with pytest.raises(ValueError, match="fd_merge weight"):
        merge_maps(learned, distance, ls, ds, 1.5)


def test_map_range_is_per_layer():
    maps = torch.tensor([[[[0.0, 2.0]], [[1.0, 3.0]]], [[[5.0, 6.0]], [[7.0, 9.0]]]])  # (2, 2, 1, 2)
    assert map_range(maps).tolist() == [[0.0, 3.0], [5.0, 9.0]]
    torch.testing.assert_close(normalise_to(maps, map_range(maps))[1, 1, 0], torch.tensor([0.5, 1.0]))


# --------------------------------------------------------------------------- #
# BatchNorm statistics of the references
# --------------------------------------------------------------------------- #
def test_reference_bn_stats_are_the_references_and_leave_the_trained_ones():
    torch.manual_seed(2)
    model = FDSL([6, 5], use_nam=True, hidden=(4,)).eval()
    for bn in batchnorms(model).values():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    trained = {n: b.clone() for n, b in model.named_buffers()}
    q = [unit(torch.randn(3, 16, 6)), unit(torch.randn(3, 16, 5))]
    a = [unit(torch.randn(3, 16, 6)), unit(torch.randn(3, 16, 5))]
    stats = reference_bn_stats(model, q, a)
    residual = (q[0] - a[0]).abs().reshape(-1, 6)
    torch.testing.assert_close(stats["heads.0.net.0.running_mean"], residual.mean(0))
    torch.testing.assert_close(stats["heads.0.net.0.running_var"], residual.var(0))
    # the hidden BN sees the first one normalised with the new statistics
    head = model.heads[0].net
    with bn_stats_swapped(model, stats):
        hidden = head[1](head[0](residual))
    torch.testing.assert_close(stats["heads.0.net.2.running_mean"], hidden.mean(0), atol=1e-5, rtol=1e-4)
    assert not model.training and all(not m.training for m in model.modules())
    for n, b in model.named_buffers():
        assert torch.equal(b, trained[n]), n  # the trained statistics are untouched
    with bn_stats_swapped(model, stats):
        assert torch.equal(model.heads[1].net[0].running_mean, stats["heads.1.net.0.running_mean"])
    assert torch.equal(model.heads[1].net[0].running_mean, trained["heads.1.net.0.running_mean"])


def fdsl(params, seed=0):
    torch.manual_seed(seed)
    method = create_method(resolve_method_config(MethodConfig(name="fdsl", backbone="tiny_cnn", params=params)))
    for bn in batchnorms(method.heads).values():  # "trained" statistics far from these features'
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(0.05)
    return method.eval()


def test_reference_statistics_are_used_in_eval_mode_at_test_time():
    """bn_stats reference: an image scores the same alone and in a batch, and whatever mode the caller
    left the heads in (BatchNorm in training mode would normalise with the batch); the swap acts and
    is undone."""
    torch.manual_seed(3)
    images = torch.rand(4, 3, 128, 128)
    method = fdsl({"bn_stats": "reference"})
    trained = {n: b.clone() for n, b in method.heads.named_buffers()}
    state = method.fit(images[:2])
    assert state.bn_stats is not None
    maps, scores = method.predict(images[2:], state, (32, 32))
    alone, alone_score = method.predict(images[3:], state, (32, 32))
    torch.testing.assert_close(alone[0], maps[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone_score[0], scores[1], atol=1e-5, rtol=1e-4)
    method.heads.train()
    again, _ = method.predict(images[2:], state, (32, 32))
    torch.testing.assert_close(again, maps)
    method.heads.eval()
    for n, b in method.heads.named_buffers():
        assert torch.equal(b, trained[n]), n
    plain = fdsl({})
    plain_maps, _ = plain.predict(images[2:], plain.fit(images[:2]), (32, 32))
    assert (plain_maps - maps).abs().max() > 1e-3  # the reference statistics changed the maps


def test_fd_merge_at_one_ranks_patches_as_the_raw_distance():
    """fd_merge 1: the map is the FD distance of each layer on its references' range; with one
    layer's range it ranks test patches exactly as knn's distance."""
    torch.manual_seed(4)
    images = torch.rand(3, 3, 128, 128)
    method = fdsl({"fd_merge": 1.0})
    state = method.fit(images[:1])
    feats = method.backbone(images[1:])
    from models.memory import align_to_banks

    aligned = align_to_banks(feats.patch_tokens, [state.bank] * 2)
    dist = distance_maps(feats.patch_tokens, aligned, feats.grid)
    method._scales = (state.learned_scale, state.distance_scale)
    merged = method.whole_layer_maps(feats, aligned)
    method._scales = None
    torch.testing.assert_close(merged, normalise_to(dist, state.distance_scale))
    half = fdsl({"fd_merge": 0.5})
    half_state = half.fit(images[:1])
    half._scales = (half_state.learned_scale, half_state.distance_scale)
    assert (half.whole_layer_maps(feats, aligned) - merged).abs().max() > 1e-3  # the learned map counts at 0.5
    half._scales = None
    # k = 1: a reference patch is kept out of one native cell of its layer (tiny_cnn strides 4, 8, 16 on
    # a stride-8 grid), so a deep layer's interpolated neighbours do not give it a near-zero residual
    assert method.leave_out_radii() == [1, 1, 2]
    ref = normalise_to(distance_maps(state.bank.tokens, [leave_out_alignment(t, state.bank.grid, r) for t, r in
                                                         zip(state.bank.tokens, method.leave_out_radii())],
                                     state.bank.grid), state.distance_scale)
    assert ref.amin().item() == pytest.approx(0, abs=1e-6) and ref.amax().item() == pytest.approx(1, abs=1e-6)


def test_options_are_checked_and_named():
    with pytest.raises(ValueError, match="bn_stats must be one of"):
        resolve_method_config(MethodConfig(name="fdsl", backbone="tiny_cnn", params={"bn_stats": "test"}))
    with pytest.raises(ValueError, match="fd_merge must be null"):
        resolve_method_config(MethodConfig(name="fdsl", backbone="tiny_cnn", params={"fd_merge": 2}))
    from methods.base import InferenceOptions

    with pytest.raises(ValueError, match="fd_merge .* whole images only"):
        fdsl({"fd_merge": 0.5}).configure(InferenceOptions(winmode="mul"))
    # test-time options may be set on a checkpoint; trained parameters may not
    from conftest import load_test_script

    results_dir = load_test_script().results_dir  # test.py's checks before any folder is written
    results_dir(TestConfig(data_root="d", checkpoint="epoch_1.pth", params={"bn_stats": "reference", "fd_merge": 0.5}))
    with pytest.raises(ValueError, match="training-free methods only"):
        results_dir(TestConfig(data_root="d", checkpoint="epoch_1.pth", params={"use_nam": False}))


def test_a_checkpoint_run_records_its_options_in_config_json(tmp_path):
    """test.py on a checkpoint with --param bn_stats / fd_merge: both in config.json (test.params and
    the method config); without them, the authors' defaults are written out; a trained parameter
    (use_nam) is refused on a checkpoint."""
    from conftest import load_test_script
    from data.synthetic import generate
    from methods.checkpoint import build_method, checkpoint_payload, load_method

    data = generate(tmp_path / "gen", ("candle",), seed=3, size=64, n_train=2, n_test_good=2, n_test_bad=2)
    method = fdsl({})
    ckpt = tmp_path / "epoch_1.pth"
    payload = checkpoint_payload(method, 1)
    for key in ("bn_stats", "fd_merge"):  # as written before the options existed
        payload["method_config"].pop(key, None)
    torch.save(payload, ckpt)
    script = load_test_script()
    configs = {}
    for name, params in (("plain", {}), ("both", {"bn_stats": "reference", "fd_merge": 0.75})):
        run = script.evaluate(TestConfig(data_root=str(data), dataset="gen", checkpoint=str(ckpt), results_root=str(tmp_path / "r"),
                                         model_name=name, k_shot=1, eval_size=32, params=params))
        configs[name] = json.loads((run / "config.json").read_text())
    assert configs["plain"]["method"]["bn_stats"] == "train" and configs["plain"]["method"]["fd_merge"] is None
    assert configs["both"]["method"]["bn_stats"] == "reference" and configs["both"]["method"]["fd_merge"] == 0.75
    assert configs["both"]["test"]["params"] == {"bn_stats": "reference", "fd_merge": 0.75}
    with pytest.raises(ValueError, match=r"test-time parameters \(bn_stats, fd_merge\)"):
        build_method(str(ckpt), params={"use_nam": False})
    with pytest.raises(ValueError, match="on a fdsl checkpoint only its test-time parameters"):
        load_method(str(ckpt), params={"use_nam": False})
