"""Mixed precision of the frozen backbones: where autocast runs (the backbone only), what it
costs in accuracy on the tiny models (bf16 on CPU), that fp32 is today's path bit for bit, and
that runs record the resolved choice while checkpoints stay fp32."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.dataset import AnomalyDataset, load_image, load_meta, select_k_shot
from methods import create_method, resolve_method_config
from methods.base import InferenceOptions
from utils import precision as backbone_base
from models.backbones import create_backbone, resolve_precision
from utils.config import MethodConfig, TestConfig, validate_test
from utils.metrics import auroc

# bf16 keeps 8 significant bits; the tokens are cast back and normalised in fp32. Measured on the
# generated data with tiny_clip (1 - cosine maps of knn, whole image): max |diff| 0.002, mean 1e-4,
# pixel AUROC -1e-4. Windows (mul) can flip a nearest neighbour: one patch then moves by up to
# 0.08 while the mean stays at 4e-4. The bounds below leave room of about 3x.
MAX_ABS_WHOLE = 0.01
MEAN_ABS = 1.5e-3
AUROC_DIFF = 3e-3


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_dinov2", "tiny_cnn"])
def test_fp32_is_the_unset_path_and_bf16_tokens_come_back_fp32_unit_length(name):
    backbone = create_backbone(name)
    x = torch.rand(2, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    unset = backbone(x)
    backbone.precision = "fp32"
    fp32 = backbone(x)
    for a, b in zip(unset.patch_tokens + [unset.global_embedding], fp32.patch_tokens + [fp32.global_embedding]):
        assert torch.equal(a, b)  # bit for bit
    backbone.precision = "bf16"
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in backbone.modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    bf16 = backbone(x)
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}  # autocast really ran inside the backbone
    for a, b in zip(fp32.patch_tokens + [fp32.global_embedding], bf16.patch_tokens + [bf16.global_embedding]):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.norm(dim=-1), torch.ones(b.shape[:-1]))  # normalised after the cast
        assert (a * b).sum(-1).min() > 0.999  # same direction


def test_precision_values_are_checked():
    backbone = create_backbone("tiny_clip")
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        backbone.precision = "auto"
    with pytest.raises(ValueError, match="must be one of"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="on CPU use bf16 or fp32"):
        resolve_precision("fp16", "cpu")
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision("BF16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="on CPU use bf16 or fp32"):
        validate_test(TestConfig(precision="fp16", device="cpu"))
    with pytest.raises(ValueError, match="FSAD_PRECISION"):
        validate_test(TestConfig(precision="half"))


@pytest.mark.parametrize("native_ok, emulated, auto", [(True, True, "bf16"), (False, True, "fp16"), (False, False, "fp16")])
def test_auto_on_cuda_picks_native_bf16_else_fp16(monkeypatch, native_ok, emulated, auto):
    monkeypatch.setattr(backbone_base, "_cuda_bf16", lambda dev, native: {True: native_ok, False: emulated}[native])
    assert resolve_precision("auto", "cuda:0") == auto
    assert resolve_precision("fp16", "cuda:0") == "fp16"
    if emulated:
        assert resolve_precision("bf16", "cuda:0") == "bf16"
    else:
        with pytest.raises(ValueError, match="no bfloat16 support"):
            resolve_precision("bf16", "cuda:0")


def _maps(method, root, winmode):
    meta = load_meta(root)
    method.configure(InferenceOptions(winmode=winmode, win_size=8, win_stride=2, precision=method.precision))
    maps, masks = [], []
    for cls in sorted(meta["test"]):
        refs = select_k_shot(meta, cls, 1, seed=0)
        state = method.fit(torch.stack([load_image(root / r["img_path"], method.image_size) for r in refs]))
        ds = AnomalyDataset(root, "test", method.image_size, [cls], mask_size=64)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        maps.append(method.predict(images, state, (64, 64))[0])
        masks.append(torch.stack([ds[i]["mask"] for i in range(len(ds))]))
    return torch.cat(maps), torch.cat(masks).numpy().ravel() > 0.5


@pytest.mark.parametrize("winmode", ["nan", "mul"])
def test_bf16_maps_stay_close_to_fp32_and_fp32_equals_unset(datasets, winmode):
    torch.manual_seed(0)
    method = create_method(resolve_method_config(MethodConfig(name="knn", backbone="tiny_clip"))).eval()
    unset, masks = _maps(method, datasets[1], winmode)
    method.set_precision("fp32")
    fp32, _ = _maps(method, datasets[1], winmode)
    assert torch.equal(unset, fp32)
    method.set_precision("bf16")
    bf16, _ = _maps(method, datasets[1], winmode)
    diff = (bf16 - fp32).abs()
    d_auroc = auroc(masks, bf16.numpy().ravel()) - auroc(masks, fp32.numpy().ravel())
    print(f"\nknn {winmode}: bf16 vs fp32 maps max |diff| {diff.max():.2e}, mean {diff.mean():.2e}, "
          f"pixel AUROC diff {d_auroc:+.2e}")
    assert diff.mean() < MEAN_ABS and abs(d_auroc) < AUROC_DIFF
    if winmode == "nan":
        assert diff.max() < MAX_ABS_WHOLE


def test_heads_banks_and_maps_stay_fp32_under_bf16(datasets):
    """Autocast ends with the backbone: the FDSL heads see fp32 inputs with autocast off, the banks
    are fp32, and so are maps and scores."""
    torch.manual_seed(0)
    method = create_method(resolve_method_config(MethodConfig(name="fdsl", backbone="tiny_clip"))).eval()
    method.configure(InferenceOptions(precision="bf16"))
    assert method.precision == "bf16"
    seen = []
    method.heads.register_forward_pre_hook(
        lambda m, args: seen.append((torch.is_autocast_enabled("cpu"), args[0][0].dtype, args[1][0].dtype)))
    x = torch.rand(2, 3, 224, 224)
    state = method.fit(x[:1])
    assert all(t.dtype == torch.float32 for t in state.bank.tokens)
    maps, scores = method.predict(x, state, (32, 32))
    assert seen == [(False, torch.float32, torch.float32)]
    assert maps.dtype == scores.dtype == torch.float32
    method.configure(InferenceOptions())  # precision None: left as it is
    assert method.precision == "bf16"


def test_runs_record_the_resolved_precision_and_refuse_another(datasets, tmp_path):
    from conftest import load_test_script

    test_script = load_test_script()
    cfg = TestConfig(data_root=str(datasets[1]), dataset="target", method="knn", backbone="tiny_clip",
                     results_root=str(tmp_path), model_name="p", classes=["candle"], precision="bf16")
    run = test_script.evaluate(cfg)
    assert json.loads((run / "config.json").read_text())["test"]["precision"] == "bf16"
    # auto = fp32 on CPU; the error says how to continue the stored run instead of deleting it
    with pytest.raises(ValueError, match="differs in precision: stored bf16, this run fp32; --precision bf16"):
        test_script.evaluate(TestConfig(**{**cfg.__dict__, "precision": "auto"}))
    # a results folder written before --precision existed holds fp32 numbers: still finished for fp32
    config = json.loads((run / "config.json").read_text())
    del config["test"]["precision"]
    (run / "config.json").write_text(json.dumps(config))
    stamp = (run / "metrics.json").stat().st_mtime_ns
    test_script.evaluate(TestConfig(**{**cfg.__dict__, "precision": "fp32"}))
    assert (run / "metrics.json").stat().st_mtime_ns == stamp


def test_bf16_training_keeps_fp32_checkpoints_and_resume_checks_precision(datasets, tmp_path):
    import train
    from utils.config import TrainConfig

    cfg = TrainConfig(data_root=str(datasets[0]), dataset="aux", out_dir=str(tmp_path), classes=["tiles"],
                      method=MethodConfig(backbone="tiny_clip"), epochs=1, batch_size=4, train_k_shot=2,
                      max_steps=2, precision="bf16")
    ckpt = torch.load(train.train(cfg), weights_only=True)
    assert ckpt["train_config"]["precision"] == "bf16"
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["state"].values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in ckpt["optimizer"]["state"].values())
    with pytest.raises(ValueError, match="differs in precision: stored bf16, this run fp32; --precision bf16 "
                                         r"\(launchers: FSAD_PRECISION=bf16\) continues it"):
        train.train(TrainConfig(**{**cfg.__dict__, "epochs": 2, "precision": "fp32"}))
    # check_same_run resolves 'auto' itself (fp32 on CPU): a resolved and an unresolved config agree
    last = train.checkpoint_path(tmp_path, 1)
    train.check_same_run(last, TrainConfig(**{**train.resolve_training(cfg)[0].__dict__, "precision": "bf16"}), "fdsl")
    with pytest.raises(ValueError, match="stored bf16, this run fp32"):
        train.check_same_run(last, TrainConfig(**{**train.resolve_training(cfg)[0].__dict__, "precision": "auto"}),
                             "fdsl")


@pytest.mark.cuda
def test_cuda_per_batch_path_never_waits_for_the_gpu(datasets):
    """No host sync inside predict (whole image and windows) or a training step on CUDA."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    method = create_method(resolve_method_config(MethodConfig(name="fdsl", backbone="tiny_clip")), device)
    method.configure(InferenceOptions(winmode="mul", win_size=8, win_stride=2, precision="auto"))
    x = torch.rand(4, 3, 224, 224, device=device)
    state = method.fit(x[:2])
    method.eval()
    method.predict(x, state, (64, 64))  # warm-up: caches, cuDNN/cuBLAS handles
    batch = {"image": x, "mask": (torch.rand(4, 224, 224, device=device) > 0.9).float(),
             "label": torch.ones(4, device=device), "cls_name": ["a"] * 4}
    method.train()
    method.loss(batch, [state] * 4).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        method.eval()
        method.predict(x, state, (64, 64))
        method.train()
        method.loss(batch, [state] * 4).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
