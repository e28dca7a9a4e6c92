"""DreamBooth + LoRA training on the tiny model (CPU, 32 px, a few dozen steps at most)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dermt2im.core.config import config_from_dict
from dermt2im.core.fileio import sha256_file
from dermt2im.core.workdir import Workdir
from dermt2im.diffusion import lora_files as lora_io
from dermt2im.diffusion import models
from dermt2im.train import data as train_data
from dermt2im.train import loop as train_loop
from dermt2im.train import state as training
from dermt2im.train.checkpoints import latest_checkpoint
from dermt2im.train.inputs import seeds_digest, training_images
from dermt2im.train.runs import find_trained
from tests.train.train_fixtures import TINY_TRAIN, make_seed_manifest, tiny_config, train

pytestmark = pytest.mark.slow


def _losses(lora_dir, name="all"):
    with open(lora_dir / training.LOSS_CSV) as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["lora"] == name]


def _eval_loss(pipe, workdir, res=32) -> float:
    """Denoising loss of ``pipe`` on the training images at fixed timesteps and noise."""
    imgs = training_images(workdir)
    items = [i for label in sorted(imgs) for i in imgs[label]]
    x = torch.stack([train_data._load_rgb(i.path, res) for i in items])
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(
        [f"a dermoscopic image of sks {i.label} skin lesion" for i in items],
        padding="max_length", max_length=77, return_tensors="pt",
    ).input_ids
    total = 0.0
    with torch.no_grad():
        lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        enc = pipe.text_encoder(ids)[0]
        for ts in (50, 200, 400, 600, 800):
            noise = torch.randn(lat.shape, generator=g)
            t = torch.full((lat.shape[0],), ts)
            pred = pipe.unet(sched.add_noise(lat, noise, t), t, enc).sample
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 40-step shared-LoRA run, reused by the output tests."""
    w = Workdir.at(tmp_path_factory.mktemp("trained") / "work")
    make_seed_manifest(w)
    seen = []
    result = train(w, tiny_config(max_steps=40, learning_rate=1e-2, checkpoint_every=10),
                                 progress=lambda s, n, loss: seen.append((s, n)))
    return w, result, seen


def test_loss_goes_down(trained):
    w, r, seen = trained
    assert r.steps == 40 and not r.cached and r.optimizer == "adamw" and r.device == "cpu"
    assert seen[-1] == (40, 40) and len(seen) == 40
    losses = _losses(r.lora_dir)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    base = models.build_tiny_pipeline(0)
    before = _eval_loss(base, w)
    lora_io.load_lora(base, r.weights["all"], 1.0)
    after = _eval_loss(base, w)
    assert after < before - 0.02, (before, after)


def test_outputs_and_metadata(trained):
    w, r, _ = trained
    d = r.lora_dir
    assert d == w.lora / r.run_id and r.run_id == r.cache_key[:12]
    meta = json.loads((d / lora_io.RUN_META).read_text())
    assert meta["layout"] == "shared" and meta["weights"] == {"all": lora_io.DIFFUSERS_WEIGHTS}
    assert meta["sha256"]["all"] == r.sha256["all"] == sha256_file(r.weights["all"])
    assert meta["kohya_sha256"]["all"] == sha256_file(d / lora_io.KOHYA_WEIGHTS)
    assert meta["base_model_identity"] == models.base_model_identity("tiny")
    assert meta["seeds_digest"] == seeds_digest(training_images(w))
    assert meta["config"]["rank"] == 4 and meta["seed"] == TINY_TRAIN.get("seed", 42)
    assert {"torch", "diffusers", "peft", "transformers", "python"} <= set(meta["library_versions"])
    assert meta["training_images"] == {"benign": 3, "malignant": 3}  # val rows ignored
    assert meta["steps_per_second"] > 0 and meta["peak_memory_mb"] > 0
    # the same metadata inside both safetensors headers
    for f in (r.weights["all"], d / lora_io.KOHYA_WEIGHTS):
        head = lora_io.read_dermt2im_metadata(f)
        assert head["seeds_digest"] == meta["seeds_digest"] and head["base_model_identity"] == meta["base_model_identity"]
        assert head["weights_sha256"] == meta["weights_sha256"]["all"]
        assert head["config"] == meta["config"]
    assert (d / training.LOSS_PNG).stat().st_size > 1000
    assert sorted(p.name for p in (d / training.VALIDATION).iterdir()) == ["benign-00.png", "malignant-00.png"]
    # last K checkpoints kept, never the final step
    assert sorted(p.name for p in (d / training.CHECKPOINTS).iterdir()) == ["step-000020", "step-000030"]
    # mlflow: params, per-step loss, figures, artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(meta["mlflow_run_id"])
    assert run.data.params["optimizer_used"] == "adamw" and run.data.params["train.rank"] == "4"
    assert {"steps_per_second", "peak_memory_mb", "final_loss"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 40
    # mlflow-artifacts:/<experiment>/<run>/artifacts, resolved against mlartifacts/ beside the store
    from dermt2im.core.tracking import PROXIED, sqlite_artifact_root

    assert run.info.artifact_uri.startswith(PROXIED)
    folder = sqlite_artifact_root(client.tracking_uri) / run.info.artifact_uri[len(PROXIED):].lstrip("/")
    names = {p.name for p in folder.iterdir()}
    assert {lora_io.RUN_META, lora_io.DIFFUSERS_WEIGHTS, training.LOSS_PNG, training.VALIDATION} <= names


def _image(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe("a dermoscopic image of sks malignant skin lesion", num_inference_steps=2, height=32, width=32,
                generator=g, output_type="np").images


def test_saved_lora_changes_output_and_scale_zero_does_not(trained):
    _, r, _ = trained
    base = _image(models.build_tiny_pipeline(0))
    p = models.build_tiny_pipeline(0)
    lora_io.load_lora(p, lora_io.lora_weights_for(r.lora_dir, "malignant"), 1.0)
    assert abs(_image(p) - base).max() > 1e-3
    p0 = models.build_tiny_pipeline(0)
    lora_io.load_lora(p0, r.weights["all"], 0.0)
    assert abs(_image(p0) - base).max() < 1e-6


def test_vanilla_loader_no_missing_keys_and_kohya_matches(trained, caplog):
    _, r, _ = trained
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(4))
    outs = []
    for name in (lora_io.DIFFUSERS_WEIGHTS, lora_io.KOHYA_WEIGHTS):
        p = models.build_tiny_pipeline(0)
        with caplog.at_level("WARNING"):
            p.load_lora_weights(str(r.lora_dir), weight_name=name)
        with torch.no_grad():
            outs.append(p.unet(x, 300, encoder_hidden_states=ctx).sample)
    assert not [m for m in caplog.messages if "unexpected keys" in m or "missing keys" in m]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    kohya = load_file(r.lora_dir / lora_io.KOHYA_WEIGHTS)
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {4.0}


def test_second_call_is_cached_without_loading_a_model(trained, monkeypatch):
    w, r, _ = trained

    def boom(*a, **k):
        raise AssertionError("a cached training must not load a model")

    monkeypatch.setattr(models, "load_pipeline", boom)
    again = train(w, tiny_config(max_steps=40, learning_rate=1e-2, checkpoint_every=10))
    assert again.cached and again.weights == r.weights and again.sha256 == r.sha256
    assert find_trained(w, tiny_config(max_steps=40, learning_rate=1e-2, checkpoint_every=10).train) is not None
    assert find_trained(w, tiny_config(max_steps=41, learning_rate=1e-2, checkpoint_every=10).train) is None


# ---------------------------------------------------------------------------------------------
# robustness


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 12-step run (checkpoints every 4) on its own workdir, for resume and OOM comparisons."""
    w = Workdir.at(tmp_path_factory.mktemp("reference") / "work")
    make_seed_manifest(w)
    cfg = tiny_config(validation_images_per_class=0)
    return w, cfg, train(w, cfg, run_id="ref")


def _tensors(path):
    return load_file(str(path))


def _assert_same_weights(a, b, exact=True):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if exact:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(ta[k], tb[k], atol=1e-5, rtol=1e-4)


class _Stop(Exception):
    pass


def test_same_config_same_weights_and_resume_is_exact(reference):
    w, cfg, ref = reference
    again = train(w, cfg, run_id="again")
    _assert_same_weights(ref.weights["all"], again.weights["all"])

    def kill_at_7(step, total, loss):
        if step == 7:
            raise _Stop

    with pytest.raises(_Stop):
        train(w, cfg, run_id="killed", progress=kill_at_7)
    killed = w.lora / "killed"
    assert not (killed / lora_io.DIFFUSERS_WEIGHTS).exists() and not (killed / lora_io.RUN_META).exists()
    assert latest_checkpoint(killed / training.CHECKPOINTS).name == "step-000004"
    resumed = train(w, cfg, run_id="killed", resume="latest")
    _assert_same_weights(ref.weights["all"], resumed.weights["all"])
    assert _losses(resumed.lora_dir) == _losses(ref.lora_dir)
    assert json.loads((resumed.lora_json).read_text())["steps"] == 12


@pytest.mark.parametrize("damaged", ["lora.safetensors", "optimizer.safetensors", "state.json"])
def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(reference, damaged):
    w, cfg, ref = reference
    run_id = f"cut-{damaged.split('.')[0]}"

    def kill_at_11(step, total, loss):
        if step == 11:
            raise _Stop

    with pytest.raises(_Stop):
        train(w, cfg, run_id=run_id, progress=kill_at_11)
    ckpts = w.lora / run_id / training.CHECKPOINTS
    assert latest_checkpoint(ckpts).name == "step-000008"
    cut = ckpts / "step-000008" / damaged
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 3])  # a disk that filled up mid-write

    assert latest_checkpoint(ckpts).name == "step-000004"
    with pytest.raises(training.TrainingError, match=f"step-000008 is damaged: {damaged} unreadable"):
        train(w, cfg, run_id=run_id, resume=str(ckpts / "step-000008"))  # named explicitly: refused, not guessed
    resumed = train(w, cfg, run_id=run_id, resume="latest")
    _assert_same_weights(ref.weights["all"], resumed.weights["all"])
    note = json.loads(resumed.lora_json.read_text())["warnings"]
    assert any("step-000008 is damaged: resumed from step-000004" in n for n in note)


@pytest.mark.parametrize("compile_unet", [False, True], ids=["eager", "compiled"])
def test_adamw8bit_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch, compile_unet):
    """8-bit AdamW nests its state (state1 / state2 / absmax / qmap) in a dict of its own; resuming
    crashed with "'list' object has no attribute 'to'". Rank 64 gives the tiny UNet's LoRA matrices
    4096 elements, where bitsandbytes switches from 32-bit to 8-bit state. With the UNet compiled
    (dynamo, eager backend: the same module calls without inductor's codegen) the loop called
    ``(ctx.unet or ctx.pipe.unet)`` and torch raised "UNet2DConditionModel does not support len()"."""
    from dermt2im.diffusion import accel

    monkeypatch.setattr(accel, "BACKEND", "eager")
    w = Workdir.at(tmp_path / "work")
    make_seed_manifest(w, n_per_class=2, extra_val=False)
    cfg = tiny_config(optimizer="adamw8bit", rank=64, alpha=64.0, max_steps=6, checkpoint_every=2,
                      validation_images_per_class=0, compile="on" if compile_unet else "off")
    whole = train(w, cfg, run_id="whole")
    assert whole.optimizer == "adamw8bit"

    def kill_at_5(step, total, loss):
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        train(w, cfg, run_id="cut", progress=kill_at_5)
    ckpt = latest_checkpoint(w.lora / "cut" / training.CHECKPOINTS)
    assert ckpt.name == "step-000004"
    nested = [k for k in _tensors(ckpt / "optimizer.safetensors") if k.count("/") > 1]
    assert any(k.endswith("/state1") for k in nested), "8-bit state is nested and saved as tensors"
    resumed = train(w, cfg, run_id="cut", resume="latest")
    _assert_same_weights(whole.weights["all"], resumed.weights["all"])
    assert _losses(resumed.lora_dir) == _losses(whole.lora_dir)


def test_optimizer_state_round_trips_through_a_checkpoint_whole():
    """Nested tensors into safetensors, everything else into JSON, and back to the same state dict."""
    from dermt2im.train.checkpoints import _flatten_optimizer, _unflatten_optimizer

    state = {"state": {0: {"step": 3, "q": {"state1": torch.arange(4, dtype=torch.uint8), "absmax1": torch.ones(2),
                                          "deeper": {"x": torch.zeros(1)}}, "exp_avg": torch.ones(3)}},
             "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "t_alpha": None, "params": [0]}]}
    tensors, small = _flatten_optimizer(state)
    assert set(tensors) == {"0/q/state1", "0/q/absmax1", "0/q/deeper/x", "0/exp_avg"}
    back = _unflatten_optimizer(tensors, json.loads(json.dumps(small)))
    assert back["state"][0]["step"] == 3 and back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["state"][0]["q"]["state1"], state["state"][0]["q"]["state1"])
    assert torch.equal(back["state"][0]["q"]["deeper"]["x"], torch.zeros(1))


def test_resume_refuses_a_checkpoint_of_other_inputs(reference):
    w, cfg, ref = reference
    with pytest.raises(training.TrainingError, match="different training"):
        train(w, tiny_config(validation_images_per_class=0, learning_rate=2e-3),
                            run_id="other", resume=str(ref.lora_dir / training.CHECKPOINTS / "step-000008"))


def test_injected_nan_stops_with_step_and_writes_no_lora(reference, monkeypatch):
    w, cfg, _ = reference
    real = train_loop._step_loss

    def nan_at_3(ctx, run, batch, sl):
        loss = real(ctx, run, batch, sl)
        return loss * float("nan") if batch.step == 3 else loss

    monkeypatch.setattr(train_loop, "_step_loss", nan_at_3)
    with pytest.raises(training.TrainingError, match=r"loss is nan at step 3 of 12"):
        train(w, cfg, run_id="nan")
    d = w.lora / "nan"
    assert not list(d.glob("*.safetensors")) and not (d / lora_io.RUN_META).exists()

    skip = train(w, tiny_config(validation_images_per_class=0, nan_policy="skip"), run_id="nan-skip")
    meta = json.loads(skip.lora_json.read_text())
    assert meta["skipped_steps"] == {"all": [3]} and any("step 3" in x for x in meta["warnings"])
    assert all(torch.isfinite(t).all() for t in _tensors(skip.weights["all"]).values())
    assert math.isnan(_losses(skip.lora_dir)[2])


def test_cuda_oom_halves_micro_batch_and_keeps_the_update(reference, monkeypatch):
    w, cfg, ref = reference
    real = train_loop._step_loss
    calls = []

    def oom_on_full_batches(ctx, run, batch, sl):
        calls.append(sl.stop - sl.start)
        if sl.stop - sl.start > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(ctx, run, batch, sl)

    monkeypatch.setattr(train_loop, "_step_loss", oom_on_full_batches)
    r = train(w, cfg, run_id="oom")
    meta = json.loads(r.lora_json.read_text())
    assert meta["micro_batch"] == {"all": 1} and meta["oom_events"] == {"all": [1]}
    assert calls[0] == 2 and set(calls[1:]) == {1}
    _assert_same_weights(ref.weights["all"], r.weights["all"], exact=False)


# ---------------------------------------------------------------------------------------------
# inputs and configuration errors (all before any model loads)


@pytest.fixture
def no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no model may be loaded for bad inputs")

    monkeypatch.setattr(models, "load_pipeline", boom)


def test_class_without_images_fails_before_loading(workdir, no_model):
    make_seed_manifest(workdir, labels=("benign",))
    with pytest.raises(training.TrainingError, match="no training images for class 'malignant'"):
        train(workdir, tiny_config())
    assert not any(workdir.lora.iterdir())


def test_empty_manifest_names_both_classes(workdir, no_model):
    with pytest.raises(training.TrainingError, match="'benign' and 'malignant'"):
        train(workdir, tiny_config())


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"instance_prompt": "a photo of {token} lesion"}, "no {label} placeholder"),
        ({"instance_prompt": "a photo of {token} {label} {colour}"}, "unknown placeholder"),
        ({"base_model": "/nowhere/model.safetensors"}, "not found"),
        ({"base_model": "weights.ckpt"}, "never pickles"),
    ],
)
def test_bad_configs_give_clear_errors(workdir, no_model, settings, message):
    make_seed_manifest(workdir, n_per_class=1, extra_val=False)
    with pytest.raises(training.TrainingError, match=message):
        train(workdir, tiny_config(**settings))


def test_a_resolution_that_is_not_a_multiple_of_8_is_refused_with_the_config():
    from dermt2im.core.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of 8"):
        tiny_config(resolution=36)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_requested_without_cuda(workdir, no_model):
    make_seed_manifest(workdir, n_per_class=1, extra_val=False)
    with pytest.raises(training.TrainingError, match="CUDA is not available"):
        train(workdir, tiny_config(device="cuda"))


def test_config_still_validates_types():
    from dermt2im.core.errors import ConfigError

    with pytest.raises(ConfigError, match="train.rank"):
        config_from_dict({"train": {"rank": 0}})


# ---------------------------------------------------------------------------------------------
# other modes


def test_per_class_loras(workdir):
    make_seed_manifest(workdir, n_per_class=2, extra_val=False)
    r = train(workdir, tiny_config(lora_per_class=True, instance_prompt="a dermoscopic image of {token} lesion",
                                                 max_steps=4, learning_rate=1e-2))
    assert set(r.weights) == {"benign", "malignant"}
    meta = json.loads(r.lora_json.read_text())
    assert meta["layout"] == "per_class" and meta["steps_per_lora"] == {"benign": 4, "malignant": 4}
    for label in ("benign", "malignant"):
        assert lora_io.lora_weights_for(r.lora_dir, label) == r.weights[label] == r.lora_dir / label / lora_io.DIFFUSERS_WEIGHTS
        assert (r.lora_dir / label / lora_io.KOHYA_WEIGHTS).is_file()
        assert lora_io.read_dermt2im_metadata(r.weights[label])["labels"] == [label]
    a, b = _tensors(r.weights["benign"]), _tensors(r.weights["malignant"])
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert set(_losses(r.lora_dir, "benign")) and set(_losses(r.lora_dir, "malignant"))


def test_prior_preservation_text_encoder_snr_offset_noise(workdir):
    make_seed_manifest(workdir, n_per_class=1, extra_val=False)
    cfg = tiny_config(prior_preservation=True, num_class_images=2, class_image_steps=2, train_text_encoder=True,
                      snr_gamma=5.0, noise_offset=0.05, max_steps=3, optimizer="adamw8bit",
                      mixed_precision="fp16", gradient_checkpointing=True, validation_images_per_class=0)
    r = train(workdir, cfg)
    meta = json.loads(r.lora_json.read_text())
    # bitsandbytes 0.50 runs 8-bit AdamW on a CPU: asked for, it is used, not swapped for torch AdamW
    assert r.optimizer == "adamw8bit" and not any("adamw8bit" in x for x in meta["warnings"])
    from dermt2im.diffusion.accel import native_bf16_cpu

    assert meta["mixed_precision"] == ("bf16" if native_bf16_cpu() else "no")
    assert any("mixed_precision fp16 needs CUDA" in x for x in meta["warnings"])
    assert len(list((r.lora_dir / training.CLASS_IMAGES / "benign").glob("*.png"))) == 2
    keys = _tensors(r.weights["all"]).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("lora_te_") for k in _tensors(r.lora_dir / lora_io.KOHYA_WEIGHTS))
    assert all(math.isfinite(x) for x in _losses(r.lora_dir))
    # loads back (UNet and text encoder) with the vanilla loader
    p = models.build_tiny_pipeline(0)
    p.load_lora_weights(str(r.lora_dir), weight_name=lora_io.DIFFUSERS_WEIGHTS)


def test_bf16_mixed_precision_on_a_cpu_only_where_bf16_is_native(monkeypatch):
    from dermt2im.diffusion import accel
    from dermt2im.train.stage import _mixed_precision

    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(accel, "native_bf16_cpu", lambda native=native: native)
        warnings: list[str] = []
        assert _mixed_precision("bf16", "cpu", warnings) == expected
        assert bool(warnings) is (not native)
        warnings = []
        assert _mixed_precision("fp16", "cpu", warnings) == expected  # the nearest half precision the CPU has
        assert "fp16 needs CUDA" in warnings[0]
    assert _mixed_precision("fp16", "cuda", []) == "fp16" and _mixed_precision("no", "cpu", []) == "no"
