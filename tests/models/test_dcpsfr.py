import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.dcpsfr import (
    CueAmplification, CueGuidedReconstruction, DCPSFRHeads, DCPSFRReference, GlobalScore, LocalScore,
    PromptLearner, ReferenceAttention, ScoreCalibration, build_reference, collate_references, dcpsfr_loss,
    delta_rec, fuse_scores, similarity_map, soft_topk_mean, topk_mean)


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
                bank=ref.bank, grid=GRID)


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
                       ref_mean=ref.ref_mean, ref_cls=ref.ref_cls, bank=ref.bank, grid=GRID)
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
    ident = DCPSFRHeads(8, 2, 6)
    scratch = DCPSFRHeads(8, 2, 6, init="scratch")
    for heads, same in ((ident, True), (scratch, False)):
        for lin in (heads.acl.layers[0].q, heads.global_score.attention.v, heads.caca.adapters[1]):
            assert torch.equal(lin.weight, torch.eye(lin.weight.shape[0])) is same
    with pytest.raises(ValueError, match="init must be"):
        DCPSFRHeads(8, 2, 6, init="random")
