"""The tiny classifiers learn the fixture lesions well above chance, deterministically per seed."""

import pytest
import torch

from dermt2im.core.views import seeds_view
from dermt2im.validate import classify
from dermt2im.validate import images as classify_images
from dermt2im.validate import models as classify_models
from dermt2im.validate.metrics import binary_metrics
from dermt2im.validate.regimes import real_rows
from tests.validate.validate_fixtures import make_validation_data, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dermt2im.core.workdir import Workdir

    w = Workdir.at(tmp_path_factory.mktemp("classify"))
    fx = make_validation_data(w, n_train=16, n_val=4, n_test=2, n_synthetic=0, extra_rejected=0,
                              extra_memorised=0, n_external=8)
    seeds = seeds_view(w.seeds_manifest)
    return real_rows(seeds, "train"), real_rows(seeds, "val"), seeds_view(fx.test_sets["phantom-isic"])


def _train(kind, data, seed=0, **over):
    train, val, _ = data
    opts = {"models": [kind], "learning_rate": 1e-3, "epochs": 6, "early_stopping_patience": 3, **over}
    cfg = tiny_config(**opts).validation
    model, processor = classify_models.build_classifier(kind, cfg, seed)
    tx, ty = classify_images.load_images(list(train["path"]), processor), classify_images.labels_to_tensor(train["label"])
    vx, vy = classify_images.load_images(list(val["path"]), processor), classify_images.labels_to_tensor(val["label"])
    fit = classify.fit(model, processor, tx, ty, vx, vy, cfg, seed)
    return model, processor, fit


@pytest.mark.parametrize("kind", ["vit", "mobilenet_v2"])
def test_tiny_classifier_learns_well_above_chance(kind, data):
    model, processor, fit = _train(kind, data)
    test = data[2]
    x = classify_images.load_images(list(test["processed_path"]), processor)
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (3, 32, 32)
    m = binary_metrics(classify_images.labels_to_tensor(test["label"]).numpy(), classify.predict_proba(model, x, processor))
    assert m["balanced_accuracy"] >= 0.8, m
    assert m["roc_auc"] >= 0.9, m
    assert 1 <= fit.best_epoch <= fit.epochs_run <= 6
    assert set(fit.history[0]) >= {"train_loss", "val_loss", "val_balanced_accuracy"}


def test_training_is_deterministic_per_seed(data):
    test = data[2]
    a, pa, _ = _train("vit", data, seed=1, epochs=1)
    b, pb, _ = _train("vit", data, seed=1, epochs=1)
    c, pc, _ = _train("vit", data, seed=2, epochs=1)
    x = classify_images.load_images(list(test["processed_path"]), pa)
    prob = [classify.predict_proba(m, x, p) for m, p in ((a, pa), (b, pb), (c, pc))]
    assert (prob[0] == prob[1]).all()
    assert not (prob[0] == prob[2]).all()


def test_early_stopping_restores_the_best_epoch(data):
    train, val, _ = data
    cfg = tiny_config(learning_rate=1e-3, epochs=8, early_stopping_patience=1).validation
    model, processor = classify_models.build_classifier("vit", cfg, 0)
    vx, vy = classify_images.load_images(list(val["path"]), processor), classify_images.labels_to_tensor(val["label"])
    # train on shuffled labels: validation does not improve for long, so training stops early
    shuffled = train.assign(label=train["label"].sample(frac=1, random_state=0).to_numpy())
    tx, ty = classify_images.load_images(list(shuffled["path"]), processor), classify_images.labels_to_tensor(shuffled["label"])
    fit = classify.fit(model, processor, tx, ty, vx, vy, cfg, 0)
    best = fit.history[fit.best_epoch - 1]
    assert fit.epochs_run == fit.best_epoch + 1 or fit.epochs_run == 8
    for row in fit.history:
        assert (row["val_balanced_accuracy"], -row["val_loss"]) <= (best["val_balanced_accuracy"], -best["val_loss"])
    p = classify.predict_proba(model, vx, processor)
    yv = vy.numpy()
    import numpy as np

    restored = float(-np.mean(yv * np.log(np.clip(p, 1e-7, 1)) + (1 - yv) * np.log(np.clip(1 - p, 1e-7, 1))))
    assert restored == pytest.approx(best["val_loss"], rel=1e-4)


def test_augmentation_keeps_shape_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    y = classify_images.augment(x, g)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0 and float(y.max()) <= 255
    flat = x[:1].float()
    assert torch.allclose(flat.sum(), y[:1].sum(), rtol=0.35)  # flips / rotations and a small jitter only


def test_missing_pretrained_model_gives_a_clear_message():
    cfg = tiny_config(tiny=False, vit_model="/nonexistent/vit-model").validation
    with pytest.raises(classify_models.ModelUnavailable, match="vit model folder /nonexistent/vit-model not found: "
                       "set validate.vit_model"):
        classify_models.build_classifier("vit", cfg, 0)


def test_each_model_has_its_own_recipe_and_quick_runs_can_override_both():
    """One setting for two models under-trained the BatchNorm CNN (AdamW at 5e-5 suits ViT-B/16)."""
    from dermt2im.core.config import load_config

    paper = load_config("paper").validation
    vit, mobilenet = paper.recipe("vit"), paper.recipe("mobilenet_v2")
    assert vit.learning_rate == 5e-5 and vit.warmup_epochs > 0
    assert 1e-4 <= mobilenet.learning_rate <= 1e-3 and mobilenet.learning_rate >= 5 * vit.learning_rate
    assert mobilenet.augmentation.crop_scale < vit.augmentation.crop_scale
    quick = load_config("paper", ["validate.epochs=2", "validate.recipes.mobilenet_v2.learning_rate=1e-3"]).validation
    assert quick.recipe("vit").epochs == quick.recipe("mobilenet_v2").epochs == 2
    assert quick.recipe("mobilenet_v2").learning_rate == 1e-3 and quick.recipe("vit").learning_rate == 5e-5


def test_the_learning_rate_warms_up_then_follows_its_schedule():
    from dermt2im.core.specs import Recipe

    cosine = classify.learning_rate_factor(Recipe(learning_rate=1e-3, epochs=4, warmup_epochs=1, schedule="cosine"), 10)
    assert [round(cosine(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warm-up over epoch 1
    assert cosine(10) == pytest.approx(1.0) and cosine(25) == pytest.approx(0.5) and cosine(39) < 0.01
    linear = classify.learning_rate_factor(Recipe(learning_rate=1e-3, epochs=2, schedule="linear"), 10)
    assert linear(0) == 1.0 and linear(10) == pytest.approx(0.5)
    constant = classify.learning_rate_factor(Recipe(learning_rate=1e-3, epochs=2, schedule="constant"), 10)
    assert constant(0) == constant(19) == 1.0


def test_fit_uses_the_models_recipe(monkeypatch):
    """The optimiser is built with the recipe's rate and decay, and the rate moves per step."""
    from dermt2im.core.config import config_from_dict

    cfg = config_from_dict({"validate": {"tiny": True, "image_size": 16, "batch_size": 4, "models": ["mobilenet_v2"],
                                         "recipes": {"mobilenet_v2": {"learning_rate": 2e-3, "epochs": 2,
                                                                      "warmup_epochs": 1, "weight_decay": 0.5}}}})
    spec = cfg.validation
    model, processor = classify_models.build_classifier("mobilenet_v2", spec, 0)
    seen: list[tuple[float, float]] = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append((self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    x = torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1] * 4)
    fit = classify.fit(model, processor, x, y, x[:0], y[:0], spec, 0, device=torch.device("cpu"),
                       recipe=spec.recipe("mobilenet_v2"))
    assert fit.epochs_run == 2 and len(seen) == 4
    assert [round(lr, 6) for lr, _ in seen[:2]] == [0.001, 0.002] and seen[0][1] == 0.5  # warm-up over epoch 1
    assert seen[-1][0] < seen[2][0]  # then the cosine decay
