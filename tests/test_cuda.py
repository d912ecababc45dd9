"""CUDA-only checks (marker `cuda`: skipped without a GPU; `pytest -m cuda` and bench/gpu_check.sh
run them): the GPU path computes what the CPU path computes, autocast runs in the dtype asked
for (fp16 only exists on CUDA), test.py's pinned-memory / non-blocking copies deliver complete
maps, training on the GPU writes checkpoints a CPU-only machine can read."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import load_test_script
from data.dataset import AnomalyDataset, load_image, load_meta, select_k_shot
from methods import create_method, resolve_method_config
from methods.base import InferenceOptions
from models.backbones import create_backbone
from utils.config import MethodConfig, TestConfig, TrainConfig

pytestmark = pytest.mark.cuda


def _maps_and_scores(name: str, root, device: str, winmode: str, precision: str):
    torch.manual_seed(0)  # the same heads on both devices (built on the CPU, then moved)
    method = create_method(resolve_method_config(MethodConfig(name=name, backbone="tiny_clip")), device).eval()
    method.configure(InferenceOptions(winmode=winmode, win_size=8, win_stride=2, precision=precision))
    meta = load_meta(root)
    cls = sorted(meta["test"])[0]
    refs = select_k_shot(meta, cls, 2, seed=0)
    state = method.fit(torch.stack([load_image(root / r["img_path"], method.image_size) for r in refs]))
    ds = AnomalyDataset(root, "test", method.image_size, [cls], mask_size=64)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)
    maps, scores = method.predict(images, state, (64, 64))
    return maps.cpu(), method.image_scores(scores.cpu(), maps.cpu())


@pytest.mark.parametrize("name, winmode", [("knn", "nan"), ("fdsl", "mul")])
def test_fp32_maps_on_cuda_are_the_cpu_maps(datasets, name, winmode):
    """Banks, matching, window stitching and heads on the GPU give the CPU's maps. cuDNN may run
    the patch-embedding convolution in TF32 (torch's default), so the bound is 1e-3 on the mean,
    not bit equality; a wrong window order or an incomplete copy moves maps by 0.1 and more."""
    cpu = _maps_and_scores(name, datasets[1], "cpu", winmode, "fp32")
    gpu = _maps_and_scores(name, datasets[1], "cuda", winmode, "fp32")
    diff = (cpu[0] - gpu[0]).abs()
    print(f"\n{name} {winmode}: CUDA vs CPU maps max |diff| {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.mean() < 1e-3 and diff.max() < 5e-2
    torch.testing.assert_close(gpu[1], cpu[1], atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("name", ["tiny_clip", "tiny_dinov2", "tiny_cnn"])
def test_autocast_on_cuda_runs_the_backbone_in_its_dtype_and_returns_fp32_unit_tokens(name, precision, dtype):
    backbone = create_backbone(name, "cuda")
    s = backbone.image_size
    x = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0)).cuda()
    backbone.precision = "fp32"
    ref = backbone(x)
    backbone.precision = precision
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in backbone.modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    out = backbone(x)
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {dtype}
    for a, b in zip(ref.patch_tokens + [ref.global_embedding], out.patch_tokens + [out.global_embedding]):
        assert b.dtype == torch.float32 and b.device.type == "cuda"
        torch.testing.assert_close(b.norm(dim=-1), torch.ones(b.shape[:-1], device="cuda"))
        assert (a * b).sum(-1).min() > 0.99


def test_test_py_on_cuda_with_workers_gives_the_cpu_metrics_and_records_auto_precision(datasets, tmp_path):
    """test.py on the GPU: DataLoader workers, pinned memory, copies queued back without a wait
    per batch; the metrics are the CPU run's. `auto` is recorded resolved (bf16 on a recent GPU)."""
    test_script = load_test_script()
    base = dict(data_root=str(datasets[1]), dataset="target", method="knn", backbone="tiny_clip",
                results_root=str(tmp_path), classes=["candle"], winmode="mul", win_size=8, win_stride=2, k_shot=2)
    cpu = test_script.evaluate(TestConfig(**base, model_name="cpu", device="cpu", precision="fp32"))
    gpu = test_script.evaluate(TestConfig(**base, model_name="gpu", device="0", precision="fp32", workers=2))
    a, b = (json.loads((d / "metrics.json").read_text())["per_category"] for d in (cpu, gpu))
    assert list(a) == list(b)
    for cls in a:
        for key in ("i_auroc", "p_auroc", "p_aupro"):
            assert abs(a[cls][key] - b[cls][key]) < 1e-2, (cls, key, a[cls][key], b[cls][key])
    auto = test_script.evaluate(TestConfig(**{**base, "winmode": "nan"}, model_name="auto", device="0",
                                           precision="auto", workers=2))
    recorded = json.loads((auto / "config.json").read_text())["test"]["precision"]
    assert recorded == ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")


def test_training_on_cuda_writes_checkpoints_a_cpu_machine_reads(datasets, tmp_path):
    """Heads trained on the GPU (backbone under autocast): the checkpoint holds CPU tensors, so a
    machine without a GPU reads it with plain torch.load(weights_only=True), and the method
    rebuilt from it on the CPU predicts finite maps."""
    import train
    from methods.checkpoint import load_method

    cfg = TrainConfig(data_root=str(datasets[0]), dataset="aux", out_dir=str(tmp_path), classes=["tiles"],
                      method=MethodConfig(backbone="tiny_clip"), epochs=1, batch_size=4, train_k_shot=2,
                      max_steps=2, device="0", workers=2)
    path = train.train(cfg)
    ckpt = torch.load(path, weights_only=True)  # no map_location: what a CPU-only machine does
    tensors = list(ckpt["state"].values()) + [v for s in ckpt["optimizer"]["state"].values() for v in s.values()
                                             if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["state"].values())
    assert ckpt["train_config"]["precision"] in ("bf16", "fp16")
    method, _ = load_method(path, "cpu")
    x = torch.rand(2, 3, method.image_size, method.image_size)
    maps, scores = method.predict(x, method.fit(x[:1]), (32, 32))
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
    # and the run resumes on the GPU from its CPU-held optimizer state
    again = train.train(TrainConfig(**{**cfg.__dict__, "epochs": 2}))
    assert torch.load(again, weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_dcpsfr_trains_and_predicts_on_cuda_under_autocast(precision):
    """DCP-SFR (tiny CLIP with its text tower + tiny DINOv2) on the GPU: a training step under the
    backbones' autocast gives a finite loss and finite gradients for every trainable parameter."""
    torch.manual_seed(0)
    cfg = MethodConfig(name="dcpsfr", backbone="clip=tiny_clip,dino=tiny_dinov2")
    method = create_method(resolve_method_config(cfg), "cuda")
    method.set_precision(precision)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 224, 224, generator=g).cuda()
    state = method.fit(x[:2])
    batch = {"image": x, "mask": (torch.rand(4, 224, 224, generator=g) > 0.9).float().cuda(),
             "label": torch.tensor([0.0, 1.0, 1.0, 0.0]).cuda(), "cls_name": ["a"] * 4}
    method.train()
    loss = method.loss(batch, [state] * 4)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in method.trainable_parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    method.eval()
    maps, scores = method.predict(x, state, (64, 64))
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all() and torch.isfinite(scores).all()
