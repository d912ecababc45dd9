"""DCP-SFR through the method interface: real tiny CLIP (with its text tower) and tiny DINOv2,
the shared training and evaluation loops, refusals between methods, ablations."""
import json
import os

import pytest
import torch

import train
from conftest import load_test_script
from data.dataset import AnomalyDataset, load_image, load_meta, select_k_shot
from methods import create_method, resolve_method_config
from methods.base import InferenceOptions
from methods.checkpoint import load_method, read_checkpoint
from models.scoring import upsample_probs
from utils.config import MethodConfig, TestConfig, TrainConfig
from utils.metrics import auroc

TINY = "clip=tiny_clip,dino=tiny_dinov2"


def tiny_dcpsfr(**params):
    return resolve_method_config(MethodConfig(name="dcpsfr", backbone=TINY, params=params))


@pytest.fixture(scope="module")
def method():
    torch.manual_seed(0)
    return create_method(tiny_dcpsfr())


def test_backbones_are_built_as_the_method_needs(method):
    clip, dino = method.backbones["clip"], method.backbones["dino"]
    assert clip.text_encoder is not None and clip.layer_dims == [clip.embed_dim] * 4  # projected tokens
    assert dino.norm_tokens
    # only the prompts' context vectors and the heads are trainable; no backbone tensor is
    trainable = {id(p) for p in method.trainable_parameters()}
    assert not trainable & {id(p) for p in method.backbones.parameters()}
    prompts = method.heads["prompts"]
    assert {id(prompts.ctx_normal), id(prompts.ctx_anomaly)} <= trainable


def test_prompt_gradients_reach_the_context_vectors_through_the_real_text_encoder(method):
    prompts = method.heads["prompts"]
    prompts.zero_grad()
    feats = prompts()
    assert feats.shape == (2, method.backbones["clip"].embed_dim)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
    feats[1].sum().backward()
    assert prompts.ctx_anomaly.grad is not None and prompts.ctx_anomaly.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.backbones["clip"].text_encoder.parameters())
    # the anomaly prompt ends in the word: its ids differ from the normal prompt's after the context
    ids = prompts.ids
    assert ids[1].argmax() == ids[0].argmax() + 1


def test_fit_predict_and_loss_shapes(method):
    torch.manual_seed(1)
    refs, query = torch.rand(2, 3, 224, 224), torch.rand(3, 3, 224, 224)
    state = method.fit(refs)
    assert state.ref_mean.shape == (256, 64) and state.ref_cls.shape == (2, 64) and state.bank.shape[1] == 64
    method.eval()
    maps, scores = method.predict(query, state, (40, 30))
    assert maps.shape == (3, 40, 30) and scores.shape == (3,)
    # predict = the forward pass's calibrated probability upsampled, and its fused image logit
    out = method.forward_batch(query, [state] * 3)
    torch.testing.assert_close(maps, upsample_probs(out.seg_prob.unsqueeze(1), (40, 30))[:, 0])
    torch.testing.assert_close(scores, out.global_logit + method.heads["heads"].mu * out.local_score)
    assert maps.std() > 0 and torch.isfinite(scores).all()
    method.train()
    batch = {"image": query, "mask": (torch.rand(3, 224, 224) > 0.9).float(), "label": torch.tensor([1, 1, 0])}
    loss = method.loss(batch, [state] * 3)
    assert loss.ndim == 0 and torch.isfinite(loss)
    method.heads.zero_grad()
    loss.backward()
    heads = method.heads["heads"]
    # every stage gets a training signal: prompts and amplifier (CACA), reconstruction (ACL), image score
    for p in (method.heads["prompts"].ctx_anomaly, heads.caca.amplifier.gain, heads.acl.layers[0].q.weight,
              *heads.calibration.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    method.eval()


def test_windows_are_refused_by_name(method):
    with pytest.raises(ValueError, match="dcpsfr.*whole images only"):
        method.configure(InferenceOptions(winmode="mul", win_size=8, win_stride=2))


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="without ACL and SSR"):
        tiny_dcpsfr(use_acl=False, use_ssr=False)
    with pytest.raises(ValueError, match="no parameter"):
        tiny_dcpsfr(use_nam=True)
    with pytest.raises(ValueError, match="must be true or false"):
        tiny_dcpsfr(use_caca="yes")
    for key in ("global_score", "fusion", "alpha_beta"):
        with pytest.raises(ValueError, match=f"dcpsfr: {key} must be one of"):
            tiny_dcpsfr(**{key: "other"})


def test_the_papers_global_score_is_the_default_and_older_checkpoints_keep_theirs():
    from models.dcpsfr import GlobalScore, ScalarAdapter

    cfg = tiny_dcpsfr()
    assert cfg["global_score"] == "paper" and cfg["fusion"] == "normalised" and cfg["alpha_beta"] == "focal"
    torch.manual_seed(0)
    assert isinstance(create_method(cfg).heads["heads"].global_score, ScalarAdapter)
    older = {k: v for k, v in cfg.items() if k != "global_score"}  # a checkpoint's config from before the key
    assert isinstance(create_method(older).heads["heads"].global_score, GlobalScore)


def test_own_training_settings_come_from_the_config_and_are_overridable(monkeypatch):
    """DCP-SFR trains with 1 reference per category and no augmentation (methods/configs/dcpsfr.json);
    FDSL keeps 10 and its authors' mosaic / crop; FSAD_TRAIN_K_SHOT / FSAD_AUGMENT override."""
    import launch
    from types import SimpleNamespace

    for key in [k for k in os.environ if k.startswith(("FSAD_", "FDSL_"))]:
        monkeypatch.delenv(key)
    mvtec, visa = launch.datasets()
    plan = lambda name: (monkeypatch.setenv("METHOD", name),
                         launch.method_plan(SimpleNamespace(model_name="m", use_nam=True)))[1]
    assert launch.train_references(plan("dcpsfr"), mvtec) == (1, "none")
    assert launch.train_references(plan("dcpsfr"), visa) == (1, "none")
    assert launch.train_references(plan("fdsl"), mvtec) == (10, "mosaic")
    assert launch.train_references(plan("fdsl"), visa) == (10, "crop")
    monkeypatch.setenv("FSAD_AUGMENT", "authors")
    monkeypatch.setenv("FSAD_TRAIN_K_SHOT", "4")
    assert launch.train_references(plan("dcpsfr"), visa) == (4, "crop")
    monkeypatch.setenv("FSAD_AUGMENT", "rotate")
    with pytest.raises(ValueError, match="FSAD_AUGMENT"):
        launch.train_references(plan("dcpsfr"), visa)
    # train.py: unset options take the method config's values, given ones win
    cfg, _ = train.resolve_training(TrainConfig(data_root=".", method=MethodConfig(name="dcpsfr", backbone=TINY)))
    assert (cfg.train_k_shot, cfg.augment) == (1, "none")
    cfg, _ = train.resolve_training(TrainConfig(data_root=".", method=MethodConfig(name="dcpsfr", backbone=TINY),
                                                train_k_shot=3, augment="crop"))
    assert (cfg.train_k_shot, cfg.augment) == (3, "crop")
    cfg, _ = train.resolve_training(TrainConfig(data_root=".", method=MethodConfig(backbone="tiny_clip")))
    assert (cfg.train_k_shot, cfg.augment) == (10, "mosaic")
    bad = {**tiny_dcpsfr(), "training": {"train_k_shot": 0}}
    with pytest.raises(ValueError, match="training.train_k_shot"):
        create_method(bad)


def category_aurocs(method, root, cls):
    meta = load_meta(root)
    refs = select_k_shot(meta, cls, 1, seed=0)
    state = method.fit(torch.stack([load_image(root / r["img_path"], method.image_size) for r in refs]))
    ds = AnomalyDataset(root, "test", method.image_size, [cls], mask_size=64)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    masks = torch.stack([ds[i]["mask"] for i in range(len(ds))])
    labels = [ds[i]["label"] for i in range(len(ds))]
    maps, scores = method.predict(images, state, (64, 64))
    return auroc(masks.numpy().ravel() > 0.5, maps.numpy().ravel()), auroc(labels, scores.numpy())


@pytest.fixture(scope="module")
def trained_dcpsfr(datasets, tmp_path_factory):
    cfg = TrainConfig(data_root=str(datasets[0]), dataset="aux", out_dir=str(tmp_path_factory.mktemp("dcpsfr")),
                      method=MethodConfig(name="dcpsfr", backbone=TINY), epochs=6, batch_size=8, seed=0)
    # DCP-SFR's own training settings: 1 reference per category, no augmentation (the config's)
    return train.train(cfg)


def mean_aurocs(method, root, classes):
    rows = [category_aurocs(method, root, c) for c in classes]
    return sum(r[0] for r in rows) / len(rows), sum(r[1] for r in rows) / len(rows)


@pytest.mark.slow
def test_trained_dcpsfr_beats_untrained_on_its_training_data(datasets, trained_dcpsfr):
    """Training works: the trained model scores the generated training set clearly better than the
    same model at initialisation. (On unseen data the pixel AUROC does not gain, with random tiny
    backbones: the identity-initialised model is already a training-free matcher, and 36 steps on
    48 images of random features overfit; printed for the record, see docs/dcpsfr.md.)"""
    torch.manual_seed(0)
    untrained = create_method(tiny_dcpsfr()).eval()
    trained, ckpt = load_method(trained_dcpsfr, method="dcpsfr")
    assert ckpt["method"] == "dcpsfr" and set(ckpt["backbones"]) == {"clip", "dino"}
    seen = ("tiles", "bolt", "fabric")
    before, after = mean_aurocs(untrained, datasets[0], seen), mean_aurocs(trained, datasets[0], seen)
    unseen = mean_aurocs(untrained, datasets[1], ("candle", "wood_board")), \
        mean_aurocs(trained, datasets[1], ("candle", "wood_board"))
    print(f"\nDCP-SFR pixel / image AUROC, untrained -> trained: training set {before[0]:.3f} -> {after[0]:.3f} / "
          f"{before[1]:.3f} -> {after[1]:.3f}; unseen dataset {unseen[0][0]:.3f} -> {unseen[1][0]:.3f} / "
          f"{unseen[0][1]:.3f} -> {unseen[1][1]:.3f}")
    assert after[0] > before[0] + 0.02 and after[1] > before[1] + 0.02
    losses = [float(line.split()[3]) for line in (trained_dcpsfr.parent / "train_log.txt").read_text().splitlines()]
    assert losses[-1] < losses[0] * 0.95, losses


@pytest.mark.slow
def test_methods_refuse_each_others_checkpoints_and_results(datasets, trained, trained_dcpsfr, tmp_path):
    test_script = load_test_script()
    with pytest.raises(ValueError, match="method 'dcpsfr', but method 'fdsl'"):
        load_method(trained_dcpsfr, method="fdsl")
    cfg = TestConfig(data_root=str(datasets[1]), dataset="target", checkpoint=str(trained),
                     results_root=str(tmp_path), model_name="shared", k_shot=1, classes=["candle"])
    run = test_script.evaluate(cfg)
    assert json.loads((run / "config.json").read_text())["method"]["method"] == "fdsl"
    other = TestConfig(**{**cfg.__dict__, "checkpoint": str(trained_dcpsfr)})
    with pytest.raises(ValueError, match="results of method 'fdsl', not 'dcpsfr'"):
        test_script.evaluate(other)
    knn = TestConfig(**{**cfg.__dict__, "checkpoint": "", "method": "knn", "backbone": "tiny_clip"})
    with pytest.raises(ValueError, match="results of method 'fdsl', not 'knn'"):
        test_script.evaluate(knn)
    # training into a checkpoint folder of another method is refused too
    with pytest.raises(ValueError, match="training run of method 'dcpsfr', not 'fdsl'"):
        train.train(TrainConfig(data_root=str(datasets[0]), out_dir=str(trained_dcpsfr.parent),
                                method=MethodConfig(backbone="tiny_clip"), epochs=6))
    assert read_checkpoint(trained_dcpsfr)["epoch"] == 6


@pytest.mark.slow
def test_training_free_knn_evaluates_without_a_checkpoint(datasets, tmp_path):
    test_script = load_test_script()
    cfg = TestConfig(data_root=str(datasets[1]), dataset="target", method="knn", backbone="tiny_clip",
                     results_root=str(tmp_path), model_name="knn", k_shot=1)
    run = test_script.evaluate(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["method"]["method"] == "knn" and config["checkpoint_epoch"] is None
    assert metrics["mean"]["p_auroc"] > 0.8  # plain matching already finds the generated defects
    with pytest.raises(ValueError, match="training-free"):
        train.train(TrainConfig(data_root=str(datasets[0]), out_dir=str(tmp_path / "x"),
                                method=MethodConfig(name="knn", backbone="tiny_clip")))
    with pytest.raises(ValueError, match="must be trained first"):
        test_script.evaluate(TestConfig(**{**cfg.__dict__, "method": "fdsl", "model_name": "y"}))


@pytest.mark.slow
def test_dcpsfr_training_resumes_to_the_same_state(datasets, tmp_path):
    cfg = TrainConfig(data_root=str(datasets[0]), dataset="aux", out_dir=str(tmp_path), classes=["tiles"],
                      method=MethodConfig(name="dcpsfr", backbone=TINY), epochs=2, batch_size=4, train_k_shot=2,
                      seed=3, augment="crop")
    reference = read_checkpoint(train.train(cfg))["state"]
    (tmp_path / "epoch_2.pth").unlink()  # interrupted after epoch 1
    resumed = read_checkpoint(train.train(cfg))
    assert resumed["epoch"] == 2 and set(resumed["state"]) == set(reference)
    assert any(k.startswith("prompts.ctx") for k in reference)  # the prompts are part of the checkpoint
    assert not any("text_encoder" in k or k.startswith("backbones") for k in reference)  # the frozen parts are not
    for k, v in reference.items():
        torch.testing.assert_close(resumed["state"][k], v, msg=k)
