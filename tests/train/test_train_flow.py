"""The train stage through Prefect: the task serves the cached LoRA on a second call."""

from __future__ import annotations

import pytest
import torch
import yaml

from dermt2im.core.fileio import sha256_file
from dermt2im.diffusion import lora_files as lora_io
from dermt2im.flows.train import train
from dermt2im.tasks.retries import is_transient
from tests.prefect_utils import task_states
from tests.train.train_fixtures import TINY_TRAIN, TINY_TRAIN_RUNTIME, make_seed_manifest

pytestmark = pytest.mark.slow


def test_train_flow_trains_then_serves_cache_and_redoes_a_deleted_lora(prefect_harness, workdir, tmp_path):
    make_seed_manifest(workdir, n_per_class=2, extra_val=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny-train", "train": {**TINY_TRAIN, "max_steps": 4,
                                                                        "validation_images_per_class": 0},
                                      "runtime": {"train": TINY_TRAIN_RUNTIME}}))
    state = train(str(workdir.root), config=str(config), return_state=True)
    out = state.result()
    assert task_states(state)["train"] == ["Completed"]
    assert not out["cached"] and out["steps"] == 4
    weights = out["weights"]["all"]
    assert sha256_file(weights) == out["sha256"]["all"]
    assert set(out) >= {"run_id", "lora_dir", "lora_json", "weights", "kohya", "sha256", "cache_key"}

    again = train(str(workdir.root), return_state=True)  # the workdir's saved config
    assert task_states(again)["train"] == ["Cached"]
    assert again.result()["cached"] and {**again.result(), "cached": False} == out  # the same LoRA, served

    (workdir.lora / out["run_id"] / lora_io.RUN_META).unlink()  # a cached result naming a deleted LoRA
    third = train(str(workdir.root), return_state=True)
    assert task_states(third)["train"] == ["Completed"]
    assert third.result()["sha256"] == out["sha256"]  # retrained, deterministically


def test_only_transient_faults_are_retried():
    from dermt2im.train.stage import TrainingError

    assert is_transient(OSError("EIO")) and is_transient(ConnectionError())
    assert not is_transient(TrainingError("loss is nan at step 3"))
    assert not is_transient(ValueError("bad config")) and not is_transient(FileNotFoundError("x"))
    assert not is_transient(torch.cuda.OutOfMemoryError("handled inside training"))
