"""A local open_clip weights file (--pretrained FILE) of the tiny CLIP: loaded as the weights it holds,
and accepted by train.py, test.py and predict.py alike."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from models.backbones import create_backbone
from tests.conftest import load_test_script


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(file, the open_clip model it was saved from): the tiny CLIP's architecture with weights other
    than its random init, so loading anything else shows."""
    import open_clip

    from models.backbones.base import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR / "open_clip")
    model = open_clip.create_model("tiny-ViT-p14")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("weights") / "tiny_clip_custom.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_weights_file_loads_back_with_identical_outputs(weights):
    path, model = weights
    loaded = create_backbone("tiny_clip", pretrained=str(path)).eval()
    reference = create_backbone("tiny_clip").eval()
    default = create_backbone("tiny_clip").eval()
    reference.visual.load_state_dict(model.visual.state_dict())
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = loaded(x), reference(x), default(x)
    for ta, tb in zip(a.patch_tokens, b.patch_tokens):
        assert torch.equal(ta, tb)
    assert torch.equal(a.global_embedding, b.global_embedding)
    assert not torch.allclose(a.patch_tokens[-1], c.patch_tokens[-1])  # the file's weights, not the init
    ident = loaded.weights_identity()
    assert ident["source"] == path.name and ident != default.weights_identity()


def test_weights_file_through_train_test_and_predict(weights, datasets, tmp_path, capsys):
    import predict
    import train

    path, _ = weights
    aux, target = datasets
    out = tmp_path / "ckpt"
    assert train.main(["--data-root", str(aux), "--dataset", "aux", "--out-dir", str(out), "--backbone", "tiny_clip",
                       "--pretrained", str(path), "--epochs", "1", "--max-steps", "1", "--batch-size", "4",
                       "--classes", "tiles"]) == 0
    ckpt = next(out.glob("epoch_*.pth"))
    stored = torch.load(ckpt, weights_only=True)
    assert stored["method_config"]["backbones"]["backbone"]["pretrained"] == str(path)

    moved = tmp_path / "elsewhere" / "same_weights.pt"  # the same weights at another path, e.g. another machine
    moved.parent.mkdir()
    shutil.copy(path, moved)
    script = load_test_script()
    common = ["--data-root", str(target), "--dataset", "target", "--checkpoint", str(ckpt), "--classes", "candle",
              "--eval-size", "32", "--results-root", str(tmp_path / "results")]
    assert script.main(common + ["--model-name", "a", "--pretrained", str(moved)]) == 0
    assert script.main(common + ["--model-name", "b"]) == 0  # the checkpoint's own path
    runs = {p.parent.parts[-4]: p.parent for p in (tmp_path / "results").rglob("metrics.json")}
    ma, mb = (json.loads((runs[k] / "metrics.json").read_text())["per_category"] for k in ("a", "b"))
    assert ma == mb
    assert json.loads((runs["a"] / "config.json").read_text())["test"]["pretrained"] == str(moved)
    # other weights than the heads were trained on are refused
    capsys.readouterr()
    assert script.main(common + ["--model-name", "c", "--pretrained", "none"]) != 0
    assert "was trained on the backbone weights 'tiny_clip_custom.pt'" in capsys.readouterr().err

    refs = sorted((target / "candle" / "train" / "good").glob("*.png"))[:1]
    images = sorted((target / "candle" / "test").rglob("*.png"))[:2]
    assert refs and images
    rc = predict.main(["--checkpoint", str(ckpt), "--pretrained", str(moved), "--refs", *map(str, refs),
                       "--images", *map(str, images), "--out", str(tmp_path / "pred")])
    assert rc == 0
    assert len(list((tmp_path / "pred").rglob("*.png"))) >= 2
