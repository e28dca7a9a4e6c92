"""The cyclic garbage collector is paused while torch and diffusers are imported and a pipeline is
loaded, then what was loaded is frozen out of its sight and it resumes; libraries rendering never
calls are kept out of sight meanwhile."""

from __future__ import annotations

import gc
import importlib.util
import subprocess
import sys
import textwrap

import pytest

from dermt2im.core.loading import first_import, loading, without_unused_libraries


def test_loading_pauses_the_collector_then_freezes_and_resumes_it():
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with loading():
            assert not gc.isenabled()
            with loading():  # nested: the outermost block resumes it
                pass
            assert not gc.isenabled()
            kept = [[] for _ in range(1000)]
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(kept)
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        with loading():
            pass
        assert not gc.isenabled()  # paused by someone else before: left paused
    finally:
        gc.enable()


def test_a_module_already_imported_is_not_loading_again():
    """``first_import``: a block that may import a module for the first time is ``loading()``; once
    it is imported the collector keeps running and nothing more is frozen (the garbage a finished
    shard left is still collected)."""
    frozen = gc.get_freeze_count()
    with first_import("json"):  # imported by now
        assert gc.isenabled()
        garbage = [[] for _ in range(1000)]
    assert gc.get_freeze_count() == frozen and garbage
    try:
        with first_import("dermt2im_no_such_module"):
            assert not gc.isenabled()
        assert gc.isenabled()
    finally:
        gc.unfreeze()


def test_the_renderer_loads_its_pipeline_without_a_collection_and_without_unused_libraries(tmp_path):
    """In a fresh process, as ``dermt2im generate`` loads: torch and diffusers imported and the
    tiny pipeline loaded without one collection, the collector running again afterwards; and
    without importing bitsandbytes or SciPy (``without_unused_libraries``), which both import as
    usual afterwards."""
    code = textwrap.dedent("""
        import gc, json
        collections = []
        gc.callbacks.append(lambda phase, info: collections.append(info["generation"]) if phase == "start" else None)
        from dermt2im.core.runtime import GenerateRuntime
        from dermt2im.generate.model import LoraChoice, RenderModel
        from dermt2im.generate.pipeline import prepared_pipeline
        before = len(collections)
        model = RenderModel("tiny", None, "tiny@loading", "sks", None)
        prepared_pipeline(model, GenerateRuntime(device="cpu"), LoraChoice(None, None), 1.0)
        import sys
        during = len(collections) - before
        unseen = [name for name in ("bitsandbytes", "scipy") if name not in sys.modules]
        import bitsandbytes.optim
        from scipy.spatial.distance import cdist
        print(json.dumps({"during": during, "enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
                          "unseen": unseen, "adamw8bit": hasattr(bitsandbytes.optim, "AdamW8bit"),
                          "cdist": float(cdist([[0.0, 0.0]], [[3.0, 4.0]])[0, 0])}))
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["during"] == 0 and seen["enabled"] and seen["frozen"] > 100_000
    assert seen["unseen"] == ["bitsandbytes", "scipy"] and seen["adamw8bit"] and seen["cdist"] == 5.0


def test_a_library_is_out_of_sight_only_inside_the_block_and_only_where_not_yet_imported(tmp_path, monkeypatch):
    (tmp_path / "dermt2im_probe_library").mkdir()
    (tmp_path / "dermt2im_probe_library" / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "dermt2im_probe_library"
    try:
        with without_unused_libraries((name,)):
            assert importlib.util.find_spec(name) is None
            with pytest.raises(ImportError):
                importlib.import_module(name)
        assert name not in sys.modules and importlib.util.find_spec(name) is not None
        assert importlib.import_module(name).VALUE == 1
        imported = sys.modules[name]
        with without_unused_libraries((name,)):  # imported already: left as it is
            assert sys.modules[name] is imported
        assert sys.modules[name] is imported
    finally:
        sys.modules.pop(name, None)


def test_reading_a_lora_header_does_not_import_torch(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    weights = tmp_path / "lora.safetensors"
    save_file({"unet.x.lora_A.weight": np.zeros((2, 2), np.float32)}, str(weights), metadata={"dermt2im": "{}"})
    code = ("import sys; from dermt2im.diffusion.lora_files import read_header; "
            f"print(read_header({str(weights)!r})); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["{'dermt2im': '{}'}", "False"]
