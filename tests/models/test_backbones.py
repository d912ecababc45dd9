import pytest
import torch

import open_clip
from open_clip.transformer import QuickGELU

from models.backbones import BackboneError, create_backbone, list_backbones, load_backbone_config, resolve_quick_gelu


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
    with pytest.raises(BackboneError, match="FDSL_PRETRAINED=/path/to/file"):
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
