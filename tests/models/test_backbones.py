import pytest
import torch

import open_clip
from open_clip.transformer import QuickGELU

from models.backbones import (BackboneError, CLIPTextEncoder, create_backbone, list_backbones, load_backbone_config,
                              resolve_quick_gelu)


@pytest.fixture(scope="module")
def tiny():
    return create_backbone("tiny_clip")


def test_configs_are_listed_and_loadable():
    assert {"clip_vit_l14_336", "tiny_clip"} <= set(list_backbones())
    cfg = load_backbone_config("clip_vit_l14_336")
    assert cfg["layers"] == [6, 12, 18, 24] and cfg["image_size"] == 518 and cfg["quick_gelu"] is True
    with pytest.raises(BackboneError, match="not found"):
        load_backbone_config("no_such_backbone")


def test_tiny_backbone_shapes_and_unit_norm(tiny):
    out = tiny(torch.rand(2, 3, 224, 224))
    assert out.grid == (16, 16)
    assert [t.shape for t in out.patch_tokens] == [(2, 256, 64)] * 4
    assert out.global_embedding.shape == (2, 32)
    for t in out.patch_tokens + [out.global_embedding]:
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))
    assert tiny.layer_dims == [64] * 4 and tiny.patch_size == 14
    assert not any(p.requires_grad for p in tiny.parameters())


def test_tokens_are_the_raw_residual_stream_of_the_chosen_blocks(tiny):
    """Block l's tokens (CLS dropped) must equal running the transformer by hand up to block l."""
    x = torch.rand(1, 3, 224, 224)
    out = tiny(x)
    v = tiny.visual
    h = (x - tiny.mean) / tiny.std
    h = v.conv1(h).flatten(2).transpose(1, 2)
    h = torch.cat([v.class_embedding.expand(1, 1, -1), h], 1) + v.positional_embedding
    h = v.ln_pre(h)
    for i, blk in enumerate(v.transformer.resblocks):
        h = blk(h)
        if i + 1 in tiny.layers:
            expected = torch.nn.functional.normalize(h[:, 1:], dim=-1)
            torch.testing.assert_close(out.patch_tokens[tiny.layers.index(i + 1)], expected, atol=1e-5, rtol=1e-4)


def test_other_resolutions_share_weights_with_resampled_positions(tiny):
    out = tiny(torch.rand(3, 3, 182, 182))  # a 13x13 window
    assert out.grid == (13, 13) and out.patch_tokens[0].shape == (3, 169, 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny(torch.rand(1, 3, 100, 100))


def test_random_init_is_reproducible(tiny):
    x = torch.rand(1, 3, 224, 224)
    again = create_backbone("tiny_clip")
    torch.testing.assert_close(again(x).patch_tokens[-1], tiny(x).patch_tokens[-1])


def test_local_weight_file_is_loaded(tmp_path, tiny):
    open_clip.add_model_config(str(load_backbone_config.__globals__["CONFIG_DIR"] / "open_clip"))
    torch.manual_seed(123)
    other = open_clip.create_model("tiny-ViT-p14")
    path = tmp_path / "weights.pt"
    torch.save(other.state_dict(), path)
    loaded = create_backbone("tiny_clip", pretrained=str(path))
    torch.testing.assert_close(loaded.visual.conv1.weight, other.visual.conv1.weight)
    x = torch.rand(1, 3, 224, 224)
    assert not torch.allclose(loaded(x).patch_tokens[0], tiny(x).patch_tokens[0])


def test_missing_hub_gives_a_message_naming_the_local_file_option(monkeypatch):
    def offline(*a, **k):
        raise RuntimeError("Failed to download weights for tag 'openai'")
    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(BackboneError, match="FSAD_PRETRAINED=/path/to/file"):
        create_backbone("clip_vit_l14_336")


def test_quick_gelu_follows_the_weights():
    assert resolve_quick_gelu("ViT-L-14-336", "openai", None) is True
    assert resolve_quick_gelu("ViT-L-14-336", "openai", True) is True
    with pytest.raises(BackboneError, match="quick_gelu"):
        resolve_quick_gelu("ViT-L-14-336", "openai", False)
    assert resolve_quick_gelu("ViT-L-14-336", None, False) is False
    assert resolve_quick_gelu("ViT-L-14-336-quickgelu", None, False) is True


def test_bad_layer_index_is_rejected():
    with pytest.raises(BackboneError, match="out of range"):
        create_backbone({"kind": "open_clip", "model": "tiny-ViT-p14", "pretrained": None,
                         "image_size": 224, "layers": [1, 9], "name": "bad"})


@pytest.mark.slow
def test_default_architecture_vit_l14_336_at_518():
    """The real FDSL backbone (random weights, no download): 37x37 tokens of width 1024 from
    blocks 6/12/18/24, with the QuickGELU activation the OpenAI weights need."""
    backbone = create_backbone("clip_vit_l14_336", pretrained="none")
    assert backbone.quick_gelu is True
    assert {type(b.mlp.gelu) for b in backbone.visual.transformer.resblocks} == {QuickGELU}
    assert backbone.image_size == 518 and backbone.layers == [6, 12, 18, 24]
    out = backbone(torch.rand(1, 3, 518, 518))
    assert out.grid == (37, 37)
    assert [tuple(t.shape) for t in out.patch_tokens] == [(1, 1369, 1024)] * 4
    assert out.global_embedding.shape == (1, 768)


# -- text tower and joint-space tokens (keep_text, project_tokens) ----------------------------

@pytest.fixture(scope="module")
def tiny_text():
    return create_backbone("tiny_clip_text")


def reference_clip():
    """The full open_clip model tiny_clip(_text) is built from: same config, same seed."""
    open_clip.add_model_config(str(load_backbone_config.__globals__["CONFIG_DIR"] / "open_clip"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.create_model("tiny-ViT-p14").eval()


PROMPTS = ["a photo of a flawless bottle.", "a photo of a bottle with a crack.", "X X X X bottle."]


def test_text_encoder_reproduces_encode_text(tiny_text):
    enc, ref = tiny_text.text_encoder, reference_clip()
    assert isinstance(enc, CLIPTextEncoder)
    assert (enc.width, enc.embed_dim, enc.context_length) == (64, 32, 77)
    assert torch.equal(enc.token_embedding.weight, ref.token_embedding.weight)
    ids = enc.tokenize(PROMPTS)
    feats = enc(enc.token_embeddings(ids), ids)
    assert feats.shape == (3, 32)
    with torch.no_grad():
        torch.testing.assert_close(feats, ref.encode_text(ids))


def test_tokenizer_is_open_clips_for_the_model(tiny_text):
    ids = tiny_text.text_encoder.tokenize(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (3, 77)
    assert torch.equal(ids, open_clip.get_tokenizer("tiny-ViT-p14")(PROMPTS))
    assert tiny_text.text_encoder.token_embeddings(ids).shape == (3, 77, 64)


def test_gradients_reach_spliced_context_but_not_the_frozen_encoder(tiny_text):
    enc = tiny_text.text_encoder
    ids = enc.tokenize(["X X X X bottle."])  # CoOp: the four X's are replaced by learnable vectors
    ctx = torch.nn.Parameter(0.02 * torch.randn(4, enc.width))
    emb = enc.token_embeddings(ids)
    emb = torch.cat([emb[:, :1], ctx.unsqueeze(0), emb[:, 5:]], dim=1)
    enc(emb, ids).pow(2).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    params = list(tiny_text.parameters())
    assert any(p is enc.token_embedding.weight for p in params)  # inside the backbone: frozen and moved with it
    assert all(not p.requires_grad and p.grad is None for p in params)
    enc.train()
    assert not enc.training
    tiny_text.train()
    assert not tiny_text.training and not enc.training


def test_without_keep_text_the_text_tower_is_dropped(tiny, tiny_text):
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert tiny.text_encoder is None
    assert count(tiny) == count(tiny.visual)
    ref = reference_clip()
    assert count(tiny_text) == count(ref) - ref.logit_scale.numel()
    assert create_backbone("tiny_clip", keep_text=True).text_encoder is not None
    assert create_backbone("tiny_clip_text", keep_text=False).text_encoder is None


def test_projected_tokens_are_in_the_joint_space(tiny_text):
    """Every block's tokens go through ln_post then proj, like the CLS token that open_clip pools."""
    x = torch.rand(2, 3, 224, 224)
    out = tiny_text(x)
    assert [tuple(t.shape) for t in out.patch_tokens] == [(2, 256, 32)] * 4
    assert tiny_text.layer_dims == [32] * 4 and tiny_text.signature()["project_tokens"] is True
    v = tiny_text.visual
    h = (x - tiny_text.mean) / tiny_text.std
    with torch.no_grad():
        inter = v.forward_intermediates(h, indices=[0, 1, 2, 3], output_fmt="NLC", output_extra_tokens=True)
        # the same projection applied to the last block's CLS token is open_clip's image feature
        torch.testing.assert_close(tiny_text.to_joint_space(inter["image_intermediates_prefix"][-1][:, 0]), v(h))
        for i, t in enumerate(inter["image_intermediates"]):
            expected = torch.nn.functional.normalize(v.ln_post(t) @ v.proj, dim=-1)
            torch.testing.assert_close(out.patch_tokens[i], expected)
    window = tiny_text(torch.rand(1, 3, 182, 182))
    assert window.grid == (13, 13) and window.patch_tokens[0].shape == (1, 169, 32)


def test_default_tokens_are_exactly_the_normalised_intermediates(tiny):
    """No projection: the FDSL features stay the raw residual stream, bit for bit."""
    x = torch.rand(2, 3, 224, 224)
    out = tiny(x)
    with torch.no_grad():
        inter = tiny.visual.forward_intermediates((x - tiny.mean) / tiny.std, indices=[0, 1, 2, 3],
                                                  output_fmt="NLC")["image_intermediates"]
    for got, raw in zip(out.patch_tokens, inter):
        assert torch.equal(got, torch.nn.functional.normalize(raw.float(), dim=-1))
    assert "project_tokens" not in tiny.signature() and tiny.layer_dims == [64] * 4
    assert create_backbone("tiny_clip_text", project_tokens=False).layer_dims == [64] * 4


def test_text_options_need_an_open_clip_backbone():
    with pytest.raises(BackboneError, match="keep_text need kind 'open_clip'"):
        create_backbone("tiny_cnn", keep_text=True)


# -- activation: the authors' exact-GELU setting ---------------------------------------------

def test_activation_override_allows_exact_gelu_on_quick_gelu_weights():
    assert resolve_quick_gelu("ViT-L-14-336", "openai", False, "gelu") is False
    assert resolve_quick_gelu("ViT-L-14-336", "openai", None, "gelu") is False
    assert resolve_quick_gelu("ViT-L-14-336", None, None, "gelu") is False
    with pytest.raises(BackboneError, match="activation_override"):  # a bare contradiction is still refused
        resolve_quick_gelu("ViT-L-14-336", "openai", False)
    with pytest.raises(BackboneError, match="contradicts quick_gelu=true"):
        resolve_quick_gelu("ViT-L-14-336", "openai", True, "gelu")
    with pytest.raises(BackboneError, match="-quickgelu"):
        resolve_quick_gelu("ViT-L-14-336-quickgelu", None, None, "gelu")
    with pytest.raises(BackboneError, match="allowed: gelu"):
        resolve_quick_gelu("ViT-L-14-336", "openai", None, "relu")


@pytest.mark.parametrize("name, quick", [("clip_vit_l14_336", True), ("clip_vit_l14_336_authors", False)])
def test_configs_with_openai_tag_pick_the_activation(monkeypatch, name, quick):
    """The tag path (no download): open_clip builds the tiny model with the activation we ask for."""
    real, asked = open_clip.create_model, []

    def tiny_instead(model_name, pretrained=None, force_quick_gelu=False, **kw):
        asked.append((model_name, pretrained, force_quick_gelu))
        return real("tiny-ViT-p14", pretrained=None, force_quick_gelu=force_quick_gelu)
    monkeypatch.setattr(open_clip, "create_model", tiny_instead)
    backbone = create_backbone(dict(load_backbone_config(name), layers=[1, 4], image_size=224))
    assert asked == [("ViT-L-14-336", "openai", quick)]
    assert {type(b.mlp.gelu) for b in backbone.visual.transformer.resblocks} == {QuickGELU if quick else torch.nn.GELU}
    assert backbone.quick_gelu is quick and backbone.signature()["quick_gelu"] is quick
    bare = {k: v for k, v in load_backbone_config("clip_vit_l14_336_authors").items() if k != "activation_override"}
    with pytest.raises(BackboneError, match="contradicts the 'openai' weights"):
        create_backbone(bare)


@pytest.mark.slow
def test_authors_architecture_runs_exact_gelu():
    backbone = create_backbone("clip_vit_l14_336_authors", pretrained="none")
    assert backbone.quick_gelu is False
    assert {type(b.mlp.gelu) for b in backbone.visual.transformer.resblocks} == {torch.nn.GELU}
    assert backbone.signature()["quick_gelu"] is False


# -- positional embeddings at other resolutions ------------------------------------------------

@pytest.mark.parametrize("grid", [(13, 13), (37, 37), (10, 20)])
def test_resampled_positions_equal_open_clips_resize_pos_embed(tiny, grid):
    """Our resampling for a new grid is exactly what open_clip does when it loads weights at another size."""
    from types import SimpleNamespace

    from open_clip.model import resize_pos_embed

    state = {"visual.positional_embedding": tiny.visual.positional_embedding.detach().clone()}
    resize_pos_embed(state, SimpleNamespace(visual=SimpleNamespace(grid_size=grid)))
    assert torch.equal(tiny._pos_embed(grid), state["visual.positional_embedding"])


# -- OpenAI-style TorchScript archives and the weights identity -----------------------------------

def _scripted_tiny_clip(tmp_path, seed=321, half=False):
    """A TorchScript archive of a tiny open_clip CLIP (as OpenAI ships theirs), and the model."""
    import warnings

    open_clip.add_model_config(str(load_backbone_config.__globals__["CONFIG_DIR"] / "open_clip"))
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-ViT-p14").eval()
    if half:
        model = model.half()
    path = tmp_path / f"tiny_scripted_{seed}{'_half' if half else ''}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script/save are deprecated, still the format
        torch.jit.save(torch.jit.script(model), str(path))
    return path, model


@pytest.mark.parametrize("half", [False, True])
def test_torchscript_archive_is_read_without_running_it(tmp_path, half):
    import warnings

    from models.backbones.torchscript import is_torchscript_archive, read_torchscript_state_dict

    path, model = _scripted_tiny_clip(tmp_path, half=half)
    assert is_torchscript_archive(path)
    state = read_torchscript_state_dict(path)
    own = model.state_dict()
    assert set(own) <= set(state)
    for k, v in own.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        jit = torch.jit.load(str(path)).state_dict()  # the reference reader (runs code: our own file)
    assert set(state) == set(jit) and all(torch.equal(state[k], jit[k]) for k in jit)
    plain = tmp_path / "plain.pt"
    torch.save(own, plain)
    assert not is_torchscript_archive(plain)  # a torch.save zip is not taken for one


def test_openai_style_archive_loads_as_pretrained_and_matches_the_state_dict_file(tmp_path):
    path, model = _scripted_tiny_clip(tmp_path)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    from_archive = create_backbone("tiny_clip", pretrained=str(path))
    from_file = create_backbone("tiny_clip", pretrained=str(plain))
    x = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(from_archive(x).patch_tokens[-1], from_file(x).patch_tokens[-1], rtol=0, atol=0)
    torch.testing.assert_close(from_archive.visual.conv1.weight, model.visual.conv1.weight, rtol=0, atol=0)
    # the same weights from two files (and two paths): one identity; the file name is informative only
    a, b = from_archive.signature()["weights"], from_file.signature()["weights"]
    assert a["sha256"] == b["sha256"] and a["source"] == path.name and b["source"] == "plain.pt"


def test_archive_with_foreign_code_is_refused_without_running_it(tmp_path):
    """A data.pkl that calls anything but the tensor/module records is refused; nothing runs."""
    import pickle
    import zipfile

    from models.backbones.torchscript import read_torchscript_state_dict

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=2))
        zf.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(BackboneError, match=r"TorchScript archive.*refers to \w+\.open.*torch\.jit\.load"):
        read_torchscript_state_dict(path)
    assert not marker.exists()
    with pytest.raises(BackboneError, match="TorchScript archive"):
        create_backbone("tiny_clip", pretrained=str(path))
    assert not marker.exists()


def test_archive_of_another_model_is_named(tmp_path):
    path, _ = _scripted_tiny_clip(tmp_path)
    cfg = dict(load_backbone_config("tiny_clip"), model="ViT-B-32", image_size=224, layers=[1, 2])
    with pytest.raises(BackboneError, match=r"TorchScript archive whose weights do not fit open_clip ViT-B-32"):
        create_backbone(cfg, pretrained=str(path))


def test_signature_records_weights_and_image_size(tiny, tmp_path):
    sig = tiny.signature()
    assert sig["image_size"] == 224 and sig["weights"]["source"] == "random (init_seed 0)"
    assert create_backbone("tiny_clip").signature()["weights"] == sig["weights"]  # same init, same identity
    other = create_backbone(dict(load_backbone_config("tiny_clip"), init_seed=1))
    assert other.signature()["weights"]["sha256"] != sig["weights"]["sha256"]
    assert create_backbone("tiny_clip", image_size=112).signature()["weights"] == sig["weights"]
