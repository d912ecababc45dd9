import itertools

import pytest
import torch
import torch.nn.functional as F

from models.backbones import Backbone, create_backbone
from methods.fdsl import FDSLMethod
from models.fdsl import FDSL
from models.lfe import (WindowBank, WindowLayout, WindowScorer, align_windows, blend, crop_windows,
                        stitch_windows, window_starts)
from models.scoring import maps_and_scores


@pytest.fixture(scope="module")
def tiny():
    return create_backbone("tiny_clip")


def make_detector(backbone, use_nam=True, seed=0):
    torch.manual_seed(seed)
    heads = FDSL(backbone.layer_dims, use_nam=use_nam, hidden=(16, 8))
    # random running statistics, so the heads are not near-constant
    for m in heads.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.05, 0.05)
            m.running_var.uniform_(0.001, 0.01)
    return FDSLMethod(backbone, heads).eval()


# -- geometry -------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,win,stride", [(37, 13, 2), (37, 13, 5), (16, 5, 3), (16, 8, 3), (16, 16, 1),
                                             (16, 1, 1), (7, 3, 3), (10, 4, 4), (1, 1, 1), (37, 12, 2)])
def test_window_starts_cover_grid(grid, win, stride):
    s = window_starts(grid, win, stride).tolist()
    assert s[0] == 0 and s[-1] + win == grid
    assert s == sorted(set(s))
    regular = list(range(0, grid - win + 1, stride))
    assert s[:len(regular)] == regular  # the authors' positions, plus at most one end window
    assert len(s) - len(regular) == (0 if (grid - win) % stride == 0 else 1)
    covered = torch.zeros(grid, dtype=torch.bool)
    for a in s:
        covered[a:a + win] = True
    assert covered.all()


def test_layout_covers_every_cell_for_many_combos():
    for grid, win, stride in itertools.product(range(1, 41, 3), range(1, 15, 2), range(1, 6)):
        if win > grid or stride > win:
            continue
        lay = WindowLayout.make((grid, grid + 2), win, stride)
        cov = lay.coverage()
        assert cov.shape == (grid, grid + 2) and (cov >= 1).all(), (grid, win, stride)
        assert lay.patch_index().shape == (lay.n_windows, win * win)


@pytest.mark.parametrize("win,stride,match", [(17, 2, r"win_size=17.*16"), (0, 2, r"win_size.*>= 1.*16"),
                                              (4, 0, r"win_stride.*>= 1.*16"), (-3, 1, "win_size"),
                                              (3, 4, r"win_stride=4 exceeds win_size=3.*uncovered.*16")])
def test_invalid_windows_raise(win, stride, match):
    with pytest.raises(ValueError, match=match):
        window_starts(16, win, stride)


def test_scorer_rejects_window_larger_than_grid(tiny):
    det = make_detector(tiny)
    with pytest.raises(ValueError, match=r"win_size=20.*16"):
        WindowScorer(det, 20, 2)


def test_crops_are_the_right_pixels():
    p = 3
    lay = WindowLayout.make((7, 9), 4, 2)  # rows 0,2,3 ; cols 0,2,4,5
    images = torch.rand(2, 3, 7 * p, 9 * p)
    crops = crop_windows(images, lay, p)
    assert crops.shape == (2 * lay.n_windows, 3, 4 * p, 4 * p)
    origins = lay.origins()
    for j in [0, 5, lay.n_windows - 1, lay.n_windows + 7, 2 * lay.n_windows - 1]:
        b, w = divmod(j, lay.n_windows)
        r, c = (origins[w] * p).tolist()
        assert torch.equal(crops[j], images[b, :, r:r + 4 * p, c:c + 4 * p])
    sub = crop_windows(images, lay, p, torch.tensor([3, 20]))
    assert torch.equal(sub, crops[[3, 20]])
    with pytest.raises(ValueError, match="patch grid"):
        crop_windows(images[..., :-p], lay, p)


def test_stitching_equals_slow_reference():
    torch.manual_seed(0)
    lay = WindowLayout.make((11, 9), 4, 3)
    L, B = 2, 3
    maps = torch.rand(L, B, lay.n_windows, 4, 4)
    fast = stitch_windows(maps, lay)
    total = torch.zeros(L, B, 11, 9)
    count = torch.zeros(11, 9)
    w = 0
    for r in lay.row_starts.tolist():
        for c in lay.col_starts.tolist():
            total[:, :, r:r + 4, c:c + 4] += maps[:, :, w]
            count[r:r + 4, c:c + 4] += 1
            w += 1
    torch.testing.assert_close(fast, total / count)


# -- alignment and the image-feature index --------------------------------------------------

def test_index_matches_only_the_window_with_the_most_similar_global_embedding():
    C = 4
    e = torch.eye(C)
    # window 2 holds exact copies of the query tokens, but window 0 has the closest global
    bank = WindowBank(tokens=[torch.stack([e[[0, 1]], e[[2, 3]], F.normalize(torch.ones(2, C), dim=-1)])],
                      global_embedding=F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), dim=-1),
                      layout=WindowLayout.make((1, 2), 1, 1))
    query = [F.normalize(torch.tensor([[[1.0, 1, 1, 1], [0.2, 1, 1, 1]]]), dim=-1)]
    qg = F.normalize(torch.tensor([[0.9, 0.1]]), dim=-1)
    full, none = align_windows(query, qg, bank, use_image_index=False)
    assert none is None
    torch.testing.assert_close(full[0][0, 0], bank.tokens[0][2, 0])
    idx, chosen = align_windows(query, qg, bank, use_image_index=True)
    assert chosen.tolist() == [0]
    # token 1 = (0.2, 1, 1, 1): among window 0's tokens e0, e1 the closer one is e1
    torch.testing.assert_close(idx[0][0], torch.stack([e[0], e[1]]))
    assert bank.matched_tokens(True) == 2 and bank.matched_tokens(False) == 6


def test_alignment_is_independent_of_the_memory_budget():
    torch.manual_seed(0)
    bank = WindowBank([F.normalize(torch.randn(12, 9, 8), dim=-1)], F.normalize(torch.randn(12, 5), dim=-1),
                      WindowLayout.make((3, 3), 3, 1))
    q = [F.normalize(torch.randn(7, 9, 8), dim=-1)]
    qg = F.normalize(torch.randn(7, 5), dim=-1)
    for use_index in (False, True):
        big, _ = align_windows(q, qg, bank, use_index)
        small, _ = align_windows(q, qg, bank, use_index, budget_bytes=1)
        torch.testing.assert_close(big[0], small[0])
        brute = bank.flat(0)[(q[0] @ bank.flat(0).T).argmax(-1)] if not use_index else None
        if brute is not None:
            torch.testing.assert_close(big[0], brute)


class PatchColourBackbone(Backbone):
    """Fake extractor: a token is the patch's mean colour (plus an offset, so it has length);
    the global embedding is all tokens of the input concatenated, so two inputs share it only
    when their content is the same."""

    def __init__(self, image_size=24, patch=2):
        super().__init__({"layers": [1], "image_size": image_size, "kind": "fake"})
        self.patch_size, self.layer_dims, self.embed_dim = patch, [4], 0

    def _extract(self, x):
        p = self.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        col = F.avg_pool2d(x, p).flatten(2).transpose(1, 2)  # (B, N, 3)
        tok = torch.cat([col, torch.full_like(col[..., :1], 0.1)], dim=-1)
        return [tok], F.normalize(tok, dim=-1).flatten(1), grid


def test_index_bank_picks_the_matching_reference_window_end_to_end():
    torch.manual_seed(3)
    bb = PatchColourBackbone()
    det = make_detector(bb)
    scorer = WindowScorer(det, 5, 3, use_image_index=True, window_batch=7)
    refs = torch.rand(3, 3, 24, 24)
    bank = scorer.build_bank(refs)
    W = bank.layout.n_windows  # grid 12: starts 0,3,6,7 -> 16 windows
    assert W == 16 and bank.n_windows == 3 * W and bank.k == 3
    query = refs[1:2]
    out = bb(crop_windows(query, bank.layout, 2))
    aligned, chosen = align_windows(out.patch_tokens, out.global_embedding, bank, True)
    assert chosen.tolist() == list(range(W, 2 * W))  # window w of the query -> window w of reference 1
    torch.testing.assert_close(aligned[0], out.patch_tokens[0])


# -- whole-image equivalence and end to end --------------------------------------------------

@pytest.mark.parametrize("use_nam", [True, False])
def test_window_as_large_as_the_grid_reproduces_the_whole_image_path(tiny, use_nam):
    det = make_detector(tiny, use_nam, seed=1)
    torch.manual_seed(4)
    refs, query = torch.rand(2, 3, 224, 224), torch.rand(3, 3, 224, 224)
    bank = det.build_bank(refs)
    whole_map, whole_score = det.predict_whole(query, bank, (240, 200))
    for use_index in (False, True):
        scorer = WindowScorer(det, 16, 3, use_image_index=use_index)
        scorer.build_bank(refs)
        assert scorer.bank.layout.n_windows == 1
        win_map, win_score = scorer.predict(query, (240, 200))
        ref_map, ref_score = det.predict_whole(query, bank, (240, 200), use_image_index=use_index)
        torch.testing.assert_close(win_map, ref_map, atol=1e-5, rtol=0)
        torch.testing.assert_close(win_score, ref_score, atol=1e-5, rtol=0)
        if not use_index:
            torch.testing.assert_close(win_map, whole_map, atol=1e-5, rtol=0)
    assert whole_map.std() > 1e-4  # the comparison is not between constants


def test_index_with_one_reference_and_one_window_equals_the_full_bank(tiny):
    det = make_detector(tiny, seed=2)
    torch.manual_seed(5)
    refs, query = torch.rand(1, 3, 224, 224), torch.rand(2, 3, 224, 224)
    maps = []
    for use_index in (False, True):
        scorer = WindowScorer(det, 16, 1, use_image_index=use_index)
        scorer.build_bank(refs)
        maps.append(scorer.predict(query, (64, 64)))
    torch.testing.assert_close(maps[0], maps[1])


def reference_window_layer_maps(det, refs, query, win, stride, use_index=False, nam_per_window=False):
    """The window path written out window by window with loops: crop, encode, match (brute force over
    every reference window, or only the one with the most similar global embedding), score, add the
    raw window map onto the grid, average, and only then the NAM. `nam_per_window=True` is the wrong
    order (NAM on each window before stitching), to show that the tests can tell the two apart."""
    p = det.backbone.patch_size
    grid = refs.shape[-1] // p
    starts = window_starts(grid, win, stride).tolist()
    spots = [(r, c) for r in starts for c in starts]
    crop = lambda img, r, c: img[None, :, r * p:(r + win) * p, c * p:(c + win) * p]
    ref_out = [det.backbone(crop(img, r, c)) for img in refs for r, c in spots]
    bank = [torch.cat([o.patch_tokens[l][0] for o in ref_out]) for l in range(len(det.backbone.layers))]
    ref_glob = torch.cat([o.global_embedding for o in ref_out])
    maps = []
    for img in query:
        total = torch.zeros(len(bank), grid, grid)
        count = torch.zeros(grid, grid)
        for r, c in spots:
            out = det.backbone(crop(img, r, c))
            if use_index:
                j = int((out.global_embedding @ ref_glob.T).argmax())
                n = win * win
                mem = [b[j * n:(j + 1) * n] for b in bank]
            else:
                mem = bank
            aligned = [m[(q[0] @ m.T).argmax(-1)][None] for q, m in zip(out.patch_tokens, mem)]
            probs = det.heads.score_layers(out.patch_tokens, aligned, (win, win))  # (L, 1, 2, win, win)
            if nam_per_window:
                probs = det.heads.aggregate(probs)
            total[:, r:r + win, c:c + win] += probs[:, 0, 1]
            count[r:r + win, c:c + win] += 1
        stitched = total / count
        if not nam_per_window:
            stitched = det.heads.aggregate(torch.stack([1 - stitched, stitched], dim=1)[:, None])[:, 0, 1]
        maps.append(stitched)
    return torch.stack(maps, dim=1)  # (L, B, grid, grid)


@torch.no_grad()
def test_nam_runs_once_on_the_stitched_map_not_per_window(tiny):
    """Several overlapping windows (grid 16, win 8, stride 3: 16 windows, up to 9 per patch): the NAM
    applied per window before stitching gives other maps (its 5x5 kernels see the window borders),
    so a window path that did that fails here."""
    det = make_detector(tiny, use_nam=True, seed=7)
    torch.manual_seed(8)
    refs, query = torch.rand(1, 3, 224, 224), torch.rand(2, 3, 224, 224)
    scorer = WindowScorer(det, 8, 3)
    scorer.build_bank(refs)
    assert int(scorer.bank.layout.coverage().max()) == 9
    right = reference_window_layer_maps(det, refs, query, 8, 3)
    wrong = reference_window_layer_maps(det, refs, query, 8, 3, nam_per_window=True)
    assert (right - wrong).abs().max() > 0.05  # the two orders really differ on these heads
    torch.testing.assert_close(scorer.window_layer_maps(query), right, atol=1e-5, rtol=0)


@torch.no_grad()
def test_end_to_end_k2_win8_stride3(tiny):
    det = make_detector(tiny, seed=3)
    torch.manual_seed(6)
    refs, query = torch.rand(2, 3, 224, 224), torch.rand(3, 3, 224, 224)
    results = {}
    for use_index, wb in ((False, 64), (True, 64), (True, 5)):
        scorer = WindowScorer(det, 8, 3, use_image_index=use_index, window_batch=wb)
        assert scorer.method.backbone is det.backbone  # one backbone serves both paths
        bank = scorer.build_bank(refs)
        assert bank.layout.row_starts.tolist() == [0, 3, 6, 8]
        assert bank.tokens[0].shape == (2 * 16, 64, 64) and bank.global_embedding.shape == (32, 32)
        assert scorer.bank_bytes() == bank.nbytes() > 0
        m, s = scorer.predict(query, (240, 240))
        assert m.shape == (3, 240, 240) and s.shape == (3,)
        # the slow loop over windows: maps = layer mean upsampled, score = mean of the layer maxima
        ref_m, ref_s = maps_and_scores(reference_window_layer_maps(det, refs, query, 8, 3, use_index), (240, 240))
        torch.testing.assert_close(m, ref_m, atol=1e-5, rtol=0)
        torch.testing.assert_close(s, ref_s, atol=1e-5, rtol=0)
        assert m.std() > 1e-3  # not a comparison between constant maps
        results[(use_index, wb)] = (m, s)
    # chunking the windows does not change the result
    torch.testing.assert_close(results[(True, 64)], results[(True, 5)])


def test_predict_needs_a_bank(tiny):
    with pytest.raises(RuntimeError, match="build_bank"):
        WindowScorer(make_detector(tiny), 8, 3).predict(torch.rand(1, 3, 224, 224), (32, 32))


# -- blend ------------------------------------------------------------------------------------

def test_blend_modes():
    wm, ws = torch.full((2, 4, 4), 0.2), torch.tensor([0.1, 0.3])
    vm, vs = torch.full((2, 4, 4), 0.6), torch.tensor([0.5, 0.9])
    m, s = blend("mul", 0.25, wm, ws, vm, vs)
    torch.testing.assert_close(m, torch.full((2, 4, 4), 0.75 * 0.2 + 0.25 * 0.6))
    torch.testing.assert_close(s, 0.75 * ws + 0.25 * vs)
    assert blend("nan", 0.25, wm, ws, vm, vs) == (wm, ws)
    assert blend("onlywin", 0.25, None, None, vm, vs) == (vm, vs)
    with pytest.raises(ValueError, match="winmode"):
        blend("max", 0.5, wm, ws, vm, vs)
