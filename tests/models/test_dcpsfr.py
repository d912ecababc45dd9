import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.dcpsfr import (
    CueAmplification, CueGuidedReconstruction, DCPSFRHeads, DCPSFRReference, GlobalScore, LocalScore,
    PromptLearner, ReferenceAttention, ScalarAdapter, ScoreCalibration, build_reference, class_token_residual,
    collate_references, dcpsfr_loss, delta_rec, fuse_scores, similarity_map, soft_topk_mean, topk_mean)
from utils.losses import dice_loss, edge_dice_loss, focal_loss


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


class FakeTextEncoder(nn.Module):
    """Test double of the CLIP text encoder interface: word-level vocabulary, start token 1,
    end token = the largest id (pooled by argmax of ids), frozen embedding table, and a causal
    running mean so that every earlier token (the context vectors included) reaches the pooled one."""

    def __init__(self, width=16, embed_dim=8, context_length=20, words=("x", "damaged", "very", "bad")):
        super().__init__()
        self.width, self.embed_dim, self.context_length = width, embed_dim, context_length
        self.vocab = {w: i + 2 for i, w in enumerate(words)}
        self.eot = len(words) + 2
        g = torch.Generator().manual_seed(123)
        self.embedding = nn.Embedding(self.eot + 1, width)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(self.eot + 1, width, generator=g))
        self.pos = nn.Parameter(torch.randn(context_length, width, generator=g) * 0.1)
        self.mix = nn.Linear(width, width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.requires_grad_(False)

    def tokenize(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1] + [self.vocab[w.lower()] for w in t.split()]
            ids = ids[:self.context_length - 1] + [self.eot]  # truncate like CLIP: end token kept
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def token_embeddings(self, ids):
        return self.embedding(ids)

    def forward(self, embeddings, ids):
        x = embeddings + self.pos[: embeddings.shape[1]]
        x = x + torch.tanh(self.mix(x))
        x = x.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        return self.proj(x[torch.arange(x.shape[0]), ids.argmax(-1)])


# ---------------------------------------------------------------------------------------------
# PromptLearner


def test_prompt_learner_splices_context_and_returns_unit_features():
    enc = FakeTextEncoder()
    pl = PromptLearner(enc, n_ctx=4)
    assert pl.ids[0, :6].tolist() == [1, 2, 2, 2, 2, enc.eot]
    assert pl.ids[1, :7].tolist() == [1, 2, 2, 2, 2, enc.vocab["damaged"], enc.eot]
    emb = pl.prompt_embeddings()
    assert emb.shape == (2, enc.context_length, enc.width)
    torch.testing.assert_close(emb[0, 1:5], pl.ctx_normal)
    torch.testing.assert_close(emb[1, 1:5], pl.ctx_anomaly)
    # the word, start and end tokens keep their frozen embeddings
    torch.testing.assert_close(emb[1, 5], enc.embedding.weight[enc.vocab["damaged"]])
    torch.testing.assert_close(emb[:, 0], enc.embedding.weight[[1, 1]])
    f = pl()
    assert f.shape == (2, enc.embed_dim)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(2))
    expected = F.normalize(enc(emb, pl.ids), dim=-1)
    torch.testing.assert_close(f, expected)


def test_prompt_learner_gradients_reach_context_only():
    enc = FakeTextEncoder()
    pl = PromptLearner(enc, n_ctx=3)
    assert [n for n, _ in pl.named_parameters()] == ["ctx_normal", "ctx_anomaly"]
    assert set(pl.state_dict()) == {"ctx_normal", "ctx_anomaly"}
    (pl()[1] * torch.arange(enc.embed_dim)).sum().backward()
    assert pl.ctx_normal.grad is None or pl.ctx_normal.grad.abs().sum() == 0  # anomaly feature only
    assert pl.ctx_anomaly.grad is not None and pl.ctx_anomaly.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())


def test_optimizer_over_trainable_params_never_holds_encoder_params():
    # even an encoder whose weights were left trainable must not be collected
    enc = FakeTextEncoder().requires_grad_(True)
    pl = PromptLearner(enc, n_ctx=3)
    heads = DCPSFRHeads(enc.embed_dim, 2, 6)
    opt = torch.optim.Adam(list(pl.parameters()) + list(heads.parameters()), lr=0.01)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held.isdisjoint({id(p) for p in enc.parameters()})
    assert {id(pl.ctx_normal), id(pl.ctx_anomaly)} <= held
    # one step moves the context vectors and leaves the frozen table untouched
    before = enc.embedding.weight.clone()
    ctx_before = pl.ctx_anomaly.detach().clone()
    pl().sum().backward()
    opt.step()
    torch.testing.assert_close(enc.embedding.weight, before)
    assert not torch.equal(pl.ctx_anomaly, ctx_before)


def test_prompt_learner_rejects_a_word_that_does_not_fit():
    enc = FakeTextEncoder(context_length=8)
    PromptLearner(enc, n_ctx=5)  # SOT + 5 + word + EOT = 8 fits
    with pytest.raises(ValueError, match="does not fit"):
        PromptLearner(enc, n_ctx=5, anomaly_word="very bad")


# ---------------------------------------------------------------------------------------------
# CACA


def test_cue_amplification_hand_computed_at_init():
    torch.manual_seed(0)
    D, m, B, grid = 8, 3, 2, (2, 3)
    tokens = [unit(B, 6, D, seed=s) for s in range(m)]
    text = unit(2, D, seed=9)
    caca = CueAmplification(D, m, tau=0.07, gain=8.0)
    out = caca(tokens, text, grid)
    assert out.layer_probs.shape == (m, B, 6) and out.s_init.shape == (B, 6) and out.s_amp.shape == (B, 6)
    # identity adapters: layer probability = softmax over (normal, anomaly) cosines / tau
    for l in range(m):
        cos = tokens[l] @ text.T
        p = torch.exp(cos[..., 1] / 0.07) / (torch.exp(cos[..., 0] / 0.07) + torch.exp(cos[..., 1] / 0.07))
        torch.testing.assert_close(out.layer_probs[l], p)
    torch.testing.assert_close(out.s_init, out.layer_probs.mean(0))
    # amplifier starts as the contrast stretch sigmoid(8 (s - 0.5))
    torch.testing.assert_close(out.s_amp, torch.sigmoid(8 * (out.s_init - 0.5)))


def test_cue_amplification_patch_equal_to_anomaly_text_is_anomalous():
    D = 8
    text = unit(2, D, seed=1)
    tokens = [torch.stack([text[1], text[0]])[None]] * 2
    out = CueAmplification(D, 2)(tokens, text, (1, 2))
    assert out.s_init[0, 0] > 0.9 and out.s_init[0, 1] < 0.1
    # a weak cue (patches leaning slightly to one prompt) is widened by the amplifier
    lean = F.normalize(torch.stack([text[1] + 0.9 * text[0], text[0] + 0.9 * text[1]]), dim=-1)[None]
    weak = CueAmplification(D, 2)([lean, lean], text, (1, 2))
    assert 0.5 < weak.s_init[0, 0] < 0.9 and 0.1 < weak.s_init[0, 1] < 0.5
    assert weak.s_amp[0, 0] > weak.s_init[0, 0] and weak.s_amp[0, 1] < weak.s_init[0, 1]


def test_cue_amplification_without_adapter_has_only_amplifier_params():
    caca = CueAmplification(8, 4, adapter=False)
    assert caca.adapters is None
    assert all(n.startswith("amplifier.") for n, _ in caca.named_parameters())


def test_amplifier_residual_learns_spatial_context():
    # after training the residual convolutions, a patch's output depends on its neighbours
    caca = CueAmplification(4, 1)
    nn.init.normal_(caca.amplifier.residual[2].weight)
    s = torch.zeros(1, 1, 3, 3)
    base = caca.amplifier(s)[0, 0, 1, 1]
    s[0, 0, 0, 1] = 1.0  # change a neighbour only
    assert not torch.isclose(caca.amplifier(s)[0, 0, 1, 1], base)


# ---------------------------------------------------------------------------------------------
# ACL


def test_modulation_zeroes_fully_anomalous_queries_and_they_get_the_uniform_mean():
    B, N, C = 2, 5, 6
    query, ref = unit(B, N, C, seed=1), unit(1, N, C, seed=2)
    acl = CueGuidedReconstruction(C, n_layers=1)
    with torch.no_grad():  # arbitrary trained-looking weights: the property must not depend on init
        for lin in (acl.layers[0].q, acl.layers[0].k):
            lin.weight.add_(0.3 * torch.randn(C, C))
    seen = []
    acl.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    s_amp = torch.zeros(B, N)
    s_amp[0, 2] = 1.0
    s_amp[1, 0] = 1.0
    s_amp[1, 3] = 0.25
    rec = acl(query, ref, s_amp)
    q = seen[0]
    assert torch.all(q[0, 2] == 0) and torch.all(q[1, 0] == 0)
    torch.testing.assert_close(q[1, 3], 0.75 * query[1, 3])
    torch.testing.assert_close(q[0, 0], query[0, 0])
    uniform = acl.layers[0].o(acl.layers[0].v(ref[0])).mean(0)
    torch.testing.assert_close(rec[0, 2], uniform)
    torch.testing.assert_close(rec[1, 0], uniform)


def test_reconstruction_of_the_reference_is_exact_where_normal_and_not_where_anomalous():
    B, N, C = 2, 9, 32
    ref = unit(N, C, seed=3)
    query = ref.expand(B, N, C).clone()
    s_amp = torch.zeros(B, N)
    s_amp[0, 4] = 1.0
    s_amp[1, [0, 8]] = 1.0
    acl = CueGuidedReconstruction(C, n_layers=2)
    d = delta_rec(query, acl(query, ref[None], s_amp))
    assert d.shape == (B, N)
    normal = s_amp == 0
    assert d[normal].max() < 1e-3
    # an anomalous position is rebuilt from the whole reference mean, far from itself
    assert d[~normal].min() > 1.0


def test_initial_reconstruction_picks_the_most_similar_reference_position():
    C = 32
    ref = unit(1, 8, C, seed=4)
    # queries: noisy copies of reference positions in shuffled order
    perm = torch.tensor([3, 0, 7, 1])
    query = F.normalize(ref[:, perm] + 0.05 * unit(1, 4, C, seed=5), dim=-1)
    rec = CueGuidedReconstruction(C, n_layers=1)(query, ref, None)
    torch.testing.assert_close(rec, ref[:, perm], atol=2e-3, rtol=0)


def test_delta_rec_is_l1_over_channels():
    q = torch.tensor([[[1.0, -2.0, 0.5]]])
    r = torch.tensor([[[0.0, 1.0, 0.5]]])
    assert delta_rec(q, r).tolist() == [[4.0]]


def test_reference_attention_scale_is_bounded():
    att = ReferenceAttention(4, temperature=0.05)
    assert att.scale.item() == pytest.approx(20.0)
    with torch.no_grad():
        att.log_scale.fill_(10.0)
    assert att.scale.item() == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------
# SSR


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_similarity_map_matches_brute_force(chunk):
    q, bank = unit(2, 5, 6, seed=6), unit(7, 6, seed=7)
    got = similarity_map(q, bank, chunk=chunk)
    expected = torch.tensor([[1 - max(float(q[b, n] @ bank[j]) for j in range(7)) for n in range(5)] for b in range(2)])
    torch.testing.assert_close(got, expected)
    # per-sample (B, M, C) banks
    per = torch.stack([bank, -bank])
    got = similarity_map(q, per, chunk=chunk)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], 1 - (q[1] @ (-bank).T).amax(-1))


def test_similarity_of_a_bank_member_is_zero():
    bank = unit(10, 6, seed=8)
    torch.testing.assert_close(similarity_map(bank[None, [2, 5]], bank), torch.zeros(1, 2), atol=1e-6, rtol=0)


def test_fuse_scores_normalisation():
    C = 16
    delta = torch.tensor([[0.0, 2 * math.sqrt(C), 4.0]])
    s_cos = torch.tensor([[0.0, 2.0, 0.5]])
    # extremes map to 0 and 1; middle: (4/8 + 2 * 0.25) / 3
    torch.testing.assert_close(fuse_scores(delta, s_cos, lam=2.0, dim=C), torch.tensor([[0.0, 1.0, 1.0 / 3]]))
    torch.testing.assert_close(fuse_scores(delta, None, dim=C), torch.tensor([[0.0, 1.0, 0.5]]))
    torch.testing.assert_close(fuse_scores(None, s_cos), torch.tensor([[0.0, 1.0, 0.25]]))
    with pytest.raises(ValueError):
        fuse_scores(None, None)


def test_calibration_init_and_monotonic():
    cal = ScoreCalibration(10.0, 0.3)
    s = torch.linspace(0, 1, 50)
    p = cal(s)
    assert p[15].item() == pytest.approx(torch.sigmoid(10 * (s[15] - 0.3)).item())
    assert torch.all(p[1:] > p[:-1])
    with torch.no_grad():
        cal.log_slope.fill_(-5.0)  # any learned slope stays positive
    p = cal(s)
    assert torch.all(p[1:] > p[:-1])


# ---------------------------------------------------------------------------------------------
# image score


def test_topk_mean_hand_made_map():
    m = torch.arange(1.0, 101.0)[torch.randperm(100)].reshape(1, 10, 10)
    assert topk_mean(m, 0.05).item() == pytest.approx(98.0)
    assert topk_mean(m, 0.001).item() == pytest.approx(100.0)  # at least one value
    two = torch.stack([m[0], -m[0]])
    torch.testing.assert_close(topk_mean(two, torch.tensor([0.05, 0.02])), torch.tensor([98.0, -1.5]))


def test_soft_topk_approaches_hard_and_is_differentiable_in_p():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(3, 8, 8, generator=g)
    p = torch.tensor([0.05, 0.1, 0.3], requires_grad=True)
    hard = topk_mean(m, p.detach())
    torch.testing.assert_close(soft_topk_mean(m, p.detach(), temperature=0.01), hard, atol=1e-5, rtol=0)
    assert (soft_topk_mean(m, p.detach(), temperature=2.0) - hard).abs().max() > 1e-3
    soft = soft_topk_mean(m, p, temperature=1.0)
    soft.sum().backward()
    # averaging more values of a descending list lowers the mean
    assert torch.all(p.grad < 0)
    # the hand-made map: p = 5% of 1..100
    ramp = torch.arange(1.0, 101.0).reshape(1, 100)
    assert soft_topk_mean(ramp, 0.05, temperature=0.01).item() == pytest.approx(98.0, abs=1e-4)


def test_local_score_ratio_in_range_and_starts_near_p_init():
    ls = LocalScore(p_min=0.001, p_max=0.2, p_init=0.02)
    maps = torch.rand(4, 6, 6)
    y, p = ls(maps)
    assert y.shape == (4,) and p.shape == (4,)
    assert torch.all((p > 0.001) & (p < 0.2))
    with torch.no_grad():
        ls.head.weight.zero_()
    assert ls(maps)[1][0].item() == pytest.approx(0.02, rel=1e-5)
    with torch.no_grad():
        ls.head.bias.fill_(1e4)
    assert ls(maps)[1][0].item() == pytest.approx(0.2)


def test_global_score_reconstructs_a_matching_class_token():
    C = 32
    refs = unit(3, C, seed=11)
    gs = GlobalScore(C)
    cls = torch.stack([refs[1], unit(C, seed=12)])
    eta = gs.residual(cls, refs)
    assert eta.shape == (2, C)
    assert eta[0].sum() < 1e-3 and eta[1].sum() > 1.0
    assert gs(cls, refs).shape == (2,)


def test_global_score_mixed_reference_counts_match_per_sample():
    C = 8
    gs = GlobalScore(C)
    with torch.no_grad():
        gs.attention.log_scale.fill_(0.0)  # soft attention: padding leaks would show
    cls = unit(3, C, seed=13)
    sets = [unit(1, C, seed=14), unit(4, C, seed=15), unit(2, C, seed=16)]
    got = gs(cls, sets)
    for b in range(3):
        torch.testing.assert_close(got[b:b + 1], gs(cls[b:b + 1], sets[b]))


# ---------------------------------------------------------------------------------------------
# heads, references, loss


D, M_LAYERS, C_DINO, GRID = 8, 2, 16, (3, 4)
N = GRID[0] * GRID[1]


def make_inputs(B=2, K=2, seed=0):
    tokens = unit(K, N, C_DINO, seed=seed + 1)
    ref = build_reference(tokens, unit(K, C_DINO, seed=seed + 2), bank_size=10)
    return dict(clip_tokens=[unit(B, N, D, seed=seed + 3 + l) for l in range(M_LAYERS)],
                text_features=unit(2, D, seed=seed + 7), dino_tokens=unit(B, N, C_DINO, seed=seed + 8),
                dino_cls=unit(B, C_DINO, seed=seed + 9), ref_mean=ref.ref_mean, ref_cls=ref.ref_cls,
                bank=ref.bank, grid=GRID, clip_cls=unit(B, D, seed=seed + 10))


def test_build_reference_shapes():
    tokens, cls = unit(3, N, C_DINO, seed=1), unit(3, C_DINO, seed=2)
    ref = build_reference(tokens, cls, bank_size=20)
    assert isinstance(ref, DCPSFRReference) and ref.k == 3
    assert ref.ref_mean.shape == (N, C_DINO) and ref.ref_cls.shape == (3, C_DINO) and ref.bank.shape == (20, C_DINO)
    torch.testing.assert_close(ref.ref_mean, tokens.mean(0))
    torch.testing.assert_close(ref.bank.norm(dim=-1), torch.ones(20))
    assert build_reference(tokens, cls, bank_size=100).bank.shape == (3 * N, C_DINO)


def test_heads_output_shapes():
    B = 2
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO)
    out = heads(**make_inputs(B))
    assert out.grid == GRID
    assert out.layer_probs.shape == (M_LAYERS, B, N)
    for name in ("s_init", "s_amp", "delta_rec", "s_cos", "score"):
        assert getattr(out, name).shape == (B, N), name
    assert out.reconstruction.shape == (B, N, C_DINO)
    assert out.seg_prob.shape == (B, *GRID)
    for name in ("image_logit", "global_logit", "local_score", "top_p"):
        assert getattr(out, name).shape == (B,), name
    # the fused score is exactly its definition from the two parts (a range check would pass a wrong fusion)
    torch.testing.assert_close(out.score, fuse_scores(out.delta_rec, out.s_cos, heads.lam, C_DINO))
    torch.testing.assert_close(out.score, (out.delta_rec / (2 * math.sqrt(C_DINO)) + heads.lam * out.s_cos / 2)
                               / (1 + heads.lam))
    torch.testing.assert_close(out.image_logit, out.global_logit + 2.0 * out.local_score)
    assert out.has_cue and out.has_ssr


def test_full_heads_depend_on_reference_mean_and_bank():
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO)
    x = make_inputs()
    base = heads(**x).seg_prob
    assert not torch.allclose(heads(**{**x, "ref_mean": unit(N, C_DINO, seed=50)}).seg_prob, base)
    assert not torch.allclose(heads(**{**x, "bank": unit(10, C_DINO, seed=51)}).seg_prob, base)


def test_without_caca_no_modulation_and_no_prompt_inputs():
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO, use_caca=False)
    assert heads.caca is None
    assert not any(n.startswith("caca") for n, _ in heads.named_parameters())
    x = make_inputs()
    out = heads(**{**x, "clip_tokens": None, "text_features": None})
    assert not out.has_cue and out.s_init is None and out.layer_probs is None
    assert torch.all(out.s_amp == 0)
    # the reconstruction is the unmodulated one
    torch.testing.assert_close(out.reconstruction, heads.acl(x["dino_tokens"], x["ref_mean"], None))


def test_without_acl_seg_is_independent_of_the_reconstruction():
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO, use_acl=False)
    assert heads.acl is None
    x = make_inputs()
    out = heads(**x)
    assert out.delta_rec is None and out.reconstruction is None
    torch.testing.assert_close(out.score, out.s_cos / 2)
    torch.testing.assert_close(heads(**{**x, "ref_mean": None}).seg_prob, out.seg_prob)
    torch.testing.assert_close(heads(**{**x, "text_features": -x["text_features"]}).seg_prob, out.seg_prob)


def test_without_ssr_seg_is_independent_of_the_bank():
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO, use_ssr=False)
    x = make_inputs()
    out = heads(**x)
    assert out.s_cos is None and not out.has_ssr
    torch.testing.assert_close(out.score, out.delta_rec / (2 * math.sqrt(C_DINO)))
    torch.testing.assert_close(heads(**{**x, "bank": None}).seg_prob, out.seg_prob)
    _, parts = dcpsfr_loss(out, torch.zeros(2, 6, 8), torch.zeros(2))
    assert "edge" not in parts


def test_needs_acl_or_ssr():
    with pytest.raises(ValueError, match="no segmentation score"):
        DCPSFRHeads(D, M_LAYERS, C_DINO, use_acl=False, use_ssr=False)


def test_mixed_categories_in_one_batch_match_separate_runs():
    torch.manual_seed(0)
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO)
    refs = [build_reference(unit(k, N, C_DINO, seed=60 + k), unit(k, C_DINO, seed=70 + k), bank_size=8 + k)
            for k in (1, 3)]
    order = [refs[0], refs[1], refs[1], refs[0]]
    x = make_inputs(B=4)
    joint = heads(**{**x, **collate_references(order)})
    for b, ref in enumerate(order):
        single = heads(clip_tokens=[t[b:b + 1] for t in x["clip_tokens"]], text_features=x["text_features"],
                       dino_tokens=x["dino_tokens"][b:b + 1], dino_cls=x["dino_cls"][b:b + 1],
                       ref_mean=ref.ref_mean, ref_cls=ref.ref_cls, bank=ref.bank, grid=GRID,
                       clip_cls=x["clip_cls"][b:b + 1])
        torch.testing.assert_close(joint.seg_prob[b:b + 1], single.seg_prob)
        torch.testing.assert_close(joint.image_logit[b:b + 1], single.image_logit)


def test_loss_parts_and_gradients_reach_prompts_and_heads():
    enc = FakeTextEncoder(embed_dim=D)
    pl = PromptLearner(enc, n_ctx=3)
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO)
    x = make_inputs()
    out = heads(**{**x, "text_features": pl()})
    masks = torch.zeros(2, 6, 8)
    masks[0, 1:4, 2:6] = 1
    labels = torch.tensor([1.0, 0.0])
    total, parts = dcpsfr_loss(out, masks, labels)
    assert set(parts) == {"cls", "seg_focal", "seg_dice", "edge", "cue_focal", "cue_dice"}
    torch.testing.assert_close(total, sum(parts.values()))
    torch.testing.assert_close(parts["cls"], F.binary_cross_entropy_with_logits(out.image_logit, labels))
    total.backward()
    assert pl.ctx_anomaly.grad.abs().sum() > 0 and pl.ctx_normal.grad.abs().sum() > 0
    for name in ("caca.adapters.0.weight", "caca.amplifier.gain", "acl.layers.0.q.weight", "acl.layers.1.log_scale",
                 "calibration.threshold", "global_score.adapter.2.bias", "local_score.head.weight"):
        assert heads.get_parameter(name).grad is not None, name
    assert all(p.grad is None for p in enc.parameters())


def test_loss_seg_terms_are_on_the_upsampled_map_and_cue_term_skips_without_caca():
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO, use_caca=False)
    out = heads(**{**make_inputs(), "clip_tokens": None, "text_features": None})
    masks = torch.zeros(2, 6, 8)
    masks[1, 2:5, 3:7] = 1
    total, parts = dcpsfr_loss(out, masks, torch.tensor([0.0, 1.0]), alpha=0.9, gamma=2.0)
    assert "cue_focal" not in parts and "edge" in parts
    up = F.interpolate(out.seg_prob[:, None], size=(6, 8), mode="bilinear", align_corners=True)[:, 0]
    p_t = torch.where(masks > 0, up, 1 - up)
    w = torch.where(masks > 0, 0.9, 0.1)
    torch.testing.assert_close(parts["seg_focal"], (-w * (1 - p_t) ** 2 * torch.log(p_t)).mean())


def test_init_identity_or_from_scratch():
    """identity (default): attention and adapters start as the identity, so the untrained model is a
    training-free matcher; scratch: PyTorch's default init, the paper's literal 'trained from scratch'."""
    torch.manual_seed(0)
    ident = DCPSFRHeads(8, 2, 6, global_score="attention")
    scratch = DCPSFRHeads(8, 2, 6, init="scratch", global_score="attention")
    for heads, same in ((ident, True), (scratch, False)):
        for lin in (heads.acl.layers[0].q, heads.global_score.attention.v, heads.caca.adapters[1]):
            assert torch.equal(lin.weight, torch.eye(lin.weight.shape[0])) is same
    # the paper's adapter C starts increasing; scratch resets it to PyTorch's default
    c0 = DCPSFRHeads(8, 2, 6).global_score.adapter[2].weight
    assert torch.all(c0 == 4.0)
    assert not torch.all(DCPSFRHeads(8, 2, 6, init="scratch").global_score.adapter[2].weight == 4.0)
    with pytest.raises(ValueError, match="init must be"):
        DCPSFRHeads(8, 2, 6, init="random")


# ---------------------------------------------------------------------------------------------
# the cue steers: each test here failed on one wrong version of the model (issue 20)


def test_full_reconstruction_is_acl_under_the_amplified_cue():
    """Wrong versions caught: ACL run without the cue map; ACL guided by s_init instead of s_amp."""
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO)
    x = make_inputs()
    out = heads(**x)
    want = heads.acl(x["dino_tokens"], x["ref_mean"], out.s_amp)
    torch.testing.assert_close(out.reconstruction, want)
    # the alternatives differ by far more than the tolerance, so the equality above decides
    for other in (heads.acl(x["dino_tokens"], x["ref_mean"], None), heads.acl(x["dino_tokens"], x["ref_mean"], out.s_init)):
        assert (other - want).abs().max() > 1e-2


def test_full_output_depends_on_the_text_features():
    """Wrong version caught: ACL without the cue map (the prompts then steer neither map nor score)."""
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO)
    x = make_inputs()
    out = heads(**x)
    other = heads(**{**x, "text_features": unit(2, D, seed=99)})
    assert (other.seg_prob - out.seg_prob).abs().max() > 1e-3
    assert (other.image_logit - out.image_logit).abs().max() > 1e-4


def test_modulation_happens_before_every_acl_layer():
    """Wrong version caught: (1 - s_amp) applied before the first layer only."""
    B, N_, C = 2, 6, 8
    query, ref = unit(B, N_, C, seed=21), unit(1, N_, C, seed=22)
    acl = CueGuidedReconstruction(C, n_layers=3)
    s_amp = torch.rand(B, N_, generator=torch.Generator().manual_seed(23)) * 0.8 + 0.1
    ins, outs = [], []

    def record(mod, args, res):
        ins.append(args[0])
        outs.append(res)

    for layer in acl.layers:
        layer.register_forward_hook(record)
    rec = acl(query, ref, s_amp)
    keep = (1 - s_amp).unsqueeze(-1)
    torch.testing.assert_close(ins[0], query * keep)
    for z in (1, 2):
        torch.testing.assert_close(ins[z], outs[z - 1] * keep)
        assert (ins[z] - outs[z - 1]).abs().max() > 1e-2  # the modulation is not a no-op here
    torch.testing.assert_close(rec, outs[-1])


def test_caca_renormalises_after_the_layer_adapter():
    """Wrong version caught: no re-normalisation after the per-layer adapter (the cosine would grow
    with the adapter's scale)."""
    D_, m, B = 8, 2, 2
    tokens = [unit(B, 6, D_, seed=30 + l) for l in range(m)]
    text = unit(2, D_, seed=33)
    caca = CueAmplification(D_, m, tau=0.07)
    g = torch.Generator().manual_seed(34)
    with torch.no_grad():
        for lin in caca.adapters:  # a trained-looking adapter that also changes the norm
            lin.weight.copy_(3.0 * torch.eye(D_) + 0.5 * torch.randn(D_, D_, generator=g))
            lin.bias.copy_(0.3 * torch.randn(D_, generator=g))
    probs = caca.layer_probabilities(tokens, text)
    for l in range(m):
        cos = F.normalize(caca.adapters[l](tokens[l]), dim=-1) @ text.T
        torch.testing.assert_close(probs[l], (cos / 0.07).softmax(-1)[..., 1])


def test_kappa_and_top_p_read_the_calibrated_map():
    """Wrong version caught: kappa / top-p read from the uncalibrated s_hat."""
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO)
    torch.manual_seed(5)
    with torch.no_grad():
        nn.init.normal_(heads.local_score.head.weight, std=2.0)  # kappa must react to its input
    x = make_inputs()
    out = heads(**x)
    raw = out.grid_map(out.score)
    assert (out.seg_prob - raw).abs().max() > 0.1  # the calibrated map is not s_hat
    torch.testing.assert_close(out.top_p, heads.local_score.ratio(out.seg_prob))
    torch.testing.assert_close(out.local_score, soft_topk_mean(out.seg_prob, out.top_p, heads.local_score.temperature))
    assert (heads.local_score(raw)[0] - out.local_score).abs().max() > 1e-3


def test_edge_loss_depends_on_the_prediction():
    """Wrong version caught: the edge loss comparing the mask with itself."""
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO)
    x = make_inputs()
    masks = torch.zeros(2, 6, 8)
    masks[0, 1:5, 2:6] = 1
    labels = torch.tensor([1.0, 0.0])
    out = heads(**x)
    _, parts = dcpsfr_loss(out, masks, labels)
    small = F.interpolate(masks[:, None], size=GRID, mode="area")[:, 0]
    torch.testing.assert_close(parts["edge"], edge_dice_loss(out.seg_prob, small))
    with torch.no_grad():
        heads.calibration.threshold.fill_(-1.0)  # a flat, saturated map: no edges at all
    _, flat = dcpsfr_loss(heads(**x), masks, labels)
    assert flat["edge"] > parts["edge"] + 0.05


# ---------------------------------------------------------------------------------------------
# the paper's global score, fusion forms, alpha / beta readings


def test_paper_global_score_shares_the_acl_core_and_uses_a_scalar_residual():
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO)
    assert isinstance(heads.global_score, ScalarAdapter)
    assert not any("attention" in n for n, _ in heads.global_score.named_parameters())
    x = make_inputs()
    out = heads(**x)
    # CLIP class token vs prompts, amplified by the same A on a 1x1 grid
    cos = F.normalize(x["clip_cls"], dim=-1) @ F.normalize(x["text_features"], dim=-1).T
    s_cls = (cos / heads.caca.tau).softmax(-1)[:, 1]
    torch.testing.assert_close(out.s_init_cls, s_cls)
    torch.testing.assert_close(out.s_amp_cls, torch.sigmoid(heads.caca.amplifier.gain * (s_cls - heads.caca.amplifier.shift)))
    # the class token rebuilt by the same ACL layers, query modulated by (1 - s_amp_cls), keys the K class tokens
    rec = heads.acl(x["dino_cls"][:, None], x["ref_cls"][None], out.s_amp_cls[:, None])[:, 0]
    eta = (x["dino_cls"] - rec).abs().sum(-1)
    assert eta.shape == (2,)
    torch.testing.assert_close(out.eta_rec, eta)
    torch.testing.assert_close(out.global_logit, heads.global_score(eta / (2 * math.sqrt(C_DINO))))
    torch.testing.assert_close(out.image_logit, out.global_logit + heads.mu * out.local_score)
    # shared weights: changing ACL changes the global score; the CLIP class token steers it
    other_clip = heads(**{**x, "clip_cls": unit(2, D, seed=77)})
    assert (other_clip.global_logit - out.global_logit).abs().max() > 1e-4
    with torch.no_grad():
        heads.acl.layers[1].v.weight.mul_(0.5)
    assert (heads(**x).global_logit - out.global_logit).abs().max() > 1e-4
    with pytest.raises(ValueError, match="clip_cls"):
        heads(**{**x, "clip_cls": None})


def test_class_token_residual_exact_for_a_matching_token_and_mean_at_full_cue():
    C = 32
    refs = unit(3, C, seed=41)
    acl = CueGuidedReconstruction(C, n_layers=2)
    cls = torch.stack([refs[2], unit(C, seed=42)])
    eta, _ = class_token_residual(acl, cls, refs, torch.zeros(2))
    assert eta[0] < 1e-3 and eta[1] > 1.0
    # a fully anomalous cue: the query is zeroed before every layer, the result is the mean of the
    # (projected) reference class tokens whatever the query
    _, rec = class_token_residual(acl, cls, refs, torch.ones(2))
    last = acl.layers[-1]
    torch.testing.assert_close(rec, last.o(last.v(refs)).mean(0).expand(2, C))
    # padded reference sets of unequal K give the per-sample result
    sets = [unit(1, C, seed=43), unit(4, C, seed=44)]
    s = torch.tensor([0.2, 0.7])
    got, _ = class_token_residual(acl, cls, sets, s)
    for b in range(2):
        torch.testing.assert_close(got[b:b + 1], class_token_residual(acl, cls[b:b + 1], sets[b], s[b:b + 1])[0])


def test_scalar_adapter_starts_increasing():
    c = ScalarAdapter(hidden=8, gain=4.0)
    y = c(torch.linspace(0, 1, 11))
    assert torch.all(y[1:] > y[:-1]) and y[0] == 0


def test_no_acl_removes_the_class_token_reconstruction_with_the_paper_score():
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO, use_acl=False)
    assert heads.global_score is None
    out = heads(**{**make_inputs(), "clip_cls": None})
    assert out.eta_rec is None and torch.all(out.global_logit == 0)
    torch.testing.assert_close(out.image_logit, heads.mu * out.local_score)
    # the earlier reading keeps its separate class-token attention in every ablation
    legacy = DCPSFRHeads(D, M_LAYERS, C_DINO, use_acl=False, global_score="attention")
    assert isinstance(legacy.global_score, GlobalScore)
    x = make_inputs()
    got = legacy(**x)
    torch.testing.assert_close(got.global_logit, legacy.global_score(x["dino_cls"], x["ref_cls"]))


def test_no_caca_global_reconstruction_is_unmodulated():
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO, use_caca=False)
    x = make_inputs()
    out = heads(**{**x, "clip_tokens": None, "text_features": None, "clip_cls": None})
    assert out.s_amp_cls is None
    eta, _ = class_token_residual(heads.acl, x["dino_cls"], x["ref_cls"], None)
    torch.testing.assert_close(out.eta_rec, eta)


def test_fusion_literal_is_the_papers_sum_and_bad_names_are_refused():
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO, fusion="literal")
    out = heads(**make_inputs())
    torch.testing.assert_close(out.score, out.delta_rec + heads.lam * out.s_cos)
    # the calibration starts at the same operating point on the residual's own scale
    scale = 2 * math.sqrt(C_DINO)
    assert heads.calibration.threshold.item() == pytest.approx(0.3 * scale)
    assert heads.calibration.log_slope.exp().item() == pytest.approx(10.0 / scale)
    with pytest.raises(ValueError, match="fusion"):
        DCPSFRHeads(D, M_LAYERS, C_DINO, fusion="sum")
    with pytest.raises(ValueError, match="global_score"):
        DCPSFRHeads(D, M_LAYERS, C_DINO, global_score="clip")


def test_alpha_beta_as_loss_weights():
    heads = DCPSFRHeads(D, M_LAYERS, C_DINO)
    out = heads(**make_inputs())
    masks = torch.zeros(2, 6, 8)
    masks[1, 2:5, 3:7] = 1
    labels = torch.tensor([0.0, 1.0])
    total, parts = dcpsfr_loss(out, masks, labels, alpha=0.9, gamma=2.0, alpha_beta="loss_weights")
    up = F.interpolate(out.seg_prob[:, None], size=(6, 8), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(parts["seg_focal"], focal_loss(torch.stack([1 - up, up], 1), masks, gamma=2.0))
    torch.testing.assert_close(parts["seg_dice"], dice_loss(up, masks))
    want = (parts["cls"] + 0.9 * parts["seg_focal"] + 2.0 * parts["seg_dice"] + parts["edge"]
            + 0.9 * parts["cue_focal"] + 2.0 * parts["cue_dice"])
    torch.testing.assert_close(total, want)
    # the default reading weighs the focal loss's classes instead
    _, focal = dcpsfr_loss(out, masks, labels, alpha=0.9, gamma=2.0)
    assert not torch.isclose(focal["seg_focal"], parts["seg_focal"])
    with pytest.raises(ValueError, match="alpha_beta"):
        dcpsfr_loss(out, masks, labels, alpha_beta="weights")
