"""The whole factory as one Prefect flow on tiny models, and its cache behaviour across runs."""

import mlflow
import pytest

from dermt2im.core.views import seeds_view
from dermt2im.core.manifest import PLAN, SEEDS, SYNTHETIC, read_manifest
from dermt2im.core.views import synthetic_view
from dermt2im.core.workdir import Workdir
from dermt2im.flows.factory import factory
from tests.prefect_utils import subflow_graph, task_run_names, task_states
from tests.core.test_storage import s3_bucket  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

SMALL = [
    "phantoms.n_seed=16", "phantoms.n_test=8", "phantoms.size=48", "preprocess.size=32",
    "train.max_steps=6", "runtime.train.checkpoint_every=3", "train.validation_images_per_class=1",
    "train.validation_steps=2",
    "generate.per_class=4", "generate.shard_size=4", "generate.width=32", "generate.height=32",
    "generate.steps_min=2", "generate.steps_max=3", "runtime.generate.batch_size=4",
    "validate.models=[vit]", "validate.seeds=[0]", "validate.epochs=1", "validate.image_size=32",
    "validate.segmentation_samples=1",
]
SEED_STAGES = {"phantoms", "ingest", "preprocess", "gate-seeds"}
GENERATE_STAGES = {"generate", "quality", "fidelity"}
COMPUTE = SEED_STAGES | {"train"} | GENERATE_STAGES | {"validate", "segmentation"}


def _ran(states: dict[str, list[str]], names: set[str]) -> dict[str, set[str]]:
    return {n: set(states.get(n, [])) for n in names}


def test_factory_end_to_end_then_cache_then_partial_reruns(prefect_harness, workdir, mlflow_uri):
    """(``mlflow_uri``: a store of this test's own, so that the runs counted are the factory's.)"""
    root = str(workdir.root)
    first = factory(root, config="tiny", overrides=SMALL, return_state=True)
    out = first.result()
    w = Workdir.at(root)

    # every stage wrote what the next one reads
    seeds = seeds_view(w.seeds_manifest)
    assert len(seeds) == 16 and seeds.loc[seeds["status"] == "accepted", "processed_path"].notna().all()
    assert set(out["seeds"]["test_sets"]) == {"phantom-isic", "phantom-ham"}
    assert (w.lora / out["lora"]["run_id"] / "pytorch_lora_weights.safetensors").is_file()
    synthetic = synthetic_view(w)
    assert len(synthetic) == len(read_manifest(w.plan_manifest, PLAN)) == 8
    assert set(synthetic["status"]) <= {"accepted", "rejected"} and synthetic["sha256"].notna().all()
    assert (w.reports / "table_iv.md").is_file() and "hybrid" in (w.reports / "table_iv.md").read_text()
    # the fidelity report of the set, read against the real floor and the noise ceiling, and linked from Table IV
    fidelity = (w.reports / "fidelity.csv").read_text()
    assert all(f"\n{kind}," in fidelity for kind in ("floor", "test", "synthetic", "ceiling"))
    assert "Fidelity of the synthetic images hybrid drew on (source dermt2im" in (w.reports / "table_iv.md").read_text()
    assert len(mlflow.search_runs(experiment_names=["derm-t2im"], filter_string="tags.`dermt2im.kind` = 'fidelity'")) == 1
    children = mlflow.search_runs(experiment_names=["derm-t2im"], filter_string="tags.regime = 'hybrid'")
    assert len(children) >= 1
    first_states = task_states(first)
    assert all(s == {"Completed"} for s in _ran(first_states, COMPUTE).values()), first_states
    _check_what_the_prefect_ui_shows(first, w)

    # nothing changed: every compute task is served from cache
    same = factory(root, return_state=True)
    assert all(s == {"Cached"} for s in _ran(task_states(same), COMPUTE).values()), task_states(same)

    # a generation setting changed: seeds and training stay cached, generation and validation re-run
    gen = factory(root, overrides=["generate.guidance_scale=5.0"], return_state=True)
    states = _ran(task_states(gen), COMPUTE)
    assert all(states[n] == {"Cached"} for n in SEED_STAGES | {"train"}), states
    assert "Completed" in states["generate"] and "Completed" in states["validate"], states
    assert (read_manifest(w.synthetic_manifest, SYNTHETIC)["guidance_scale"] == 5.0).all()

    # a training setting changed: training and everything after it re-run, seed stages stay cached
    tr = factory(root, overrides=["train.max_steps=4"], return_state=True)
    states = _ran(task_states(tr), COMPUTE)
    assert all(states[n] == {"Cached"} for n in SEED_STAGES), states
    assert states["train"] == {"Completed"} and "Completed" in states["generate"], states
    assert "Completed" in states["validate"], states
    assert tr.result()["lora"]["run_id"] != out["lora"]["run_id"]

    # `dermt2im run` on the finished workdir decides that nothing needs doing without torch, Prefect
    # (no server), MLflow or Ray: each import would fail in this process
    done = _run_without_heavy_imports(root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "is up to date for this config: nothing to do (no server started)" in done.stdout
    assert f"Table IV: {w.reports / 'table_iv.md'}" in done.stdout and "mlflow ui --backend-store-uri" in done.stdout
    assert "starting Prefect" not in done.stdout + done.stderr
    # ... and that something does, once a setting changes (it then needs Prefect: the import fails here)
    changed = _run_without_heavy_imports(root, "--set", "generate.guidance_scale=4.0")
    assert changed.returncode != 0 and "to do, from the generate stage on: render shard 0" in changed.stdout
    assert "prefect imported" in changed.stderr


def _run_without_heavy_imports(root: str, *args: str):
    """`dermt2im run --workdir root` in a process where importing torch, prefect, mlflow, diffusers,
    transformers or ray raises (stand-in packages first on the path)."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    shim = Path(tempfile.mkdtemp(prefix="no-heavy-imports-"))
    for name in ("torch", "prefect", "mlflow", "diffusers", "transformers", "ray"):
        (shim / name).mkdir()
        (shim / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    exe = Path(sys.executable).with_name("dermt2im")
    return subprocess.run([str(exe), "run", "--workdir", root, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_factory_with_manifests_and_images_on_a_local_s3_endpoint(prefect_harness, workdir, s3_bucket):
    """storage.manifests and storage.images on S3 (moto): every manifest lives there, the
    workdir keeps none, and a second run with nothing changed is served from cache."""
    from dermt2im.core import storage
    from dermt2im.core.manifest import pending_parts

    root = str(workdir.root)
    where = [f"storage.manifests={s3_bucket}/run/manifests", f"storage.images={s3_bucket}/run/images"]
    first = factory(root, config="tiny", overrides=SMALL + where, return_state=True)
    first.result()
    assert all(s == {"Completed"} for s in _ran(task_states(first), COMPUTE).values()), task_states(first)

    w = Workdir.at(root, f"{s3_bucket}/run/manifests")
    seeds = seeds_view(w.seeds_manifest)
    assert len(seeds) == 16 and seeds.loc[seeds["status"] == "accepted", "processed_path"].notna().all()
    names = {str(p).rsplit("/", 1)[-1] for p in storage.files_in(w.test_sets_folder, ".parquet")}
    assert names == {"phantom-isic.parquet", "phantom-ham.parquet"}
    synthetic = synthetic_view(w)
    assert len(synthetic) == len(read_manifest(w.plan_manifest, PLAN)) == 8
    assert set(synthetic["status"]) <= {"accepted", "rejected"} and pending_parts(w.synthetic_manifest) == []
    assert all(p.startswith(f"{s3_bucket}/run/images/") and storage.is_file(p) for p in synthetic["path"])
    assert not list((workdir.root / "manifests").rglob("*.parquet")) if (workdir.root / "manifests").exists() else True
    assert (w.reports / "table_iv.md").is_file()

    same = factory(root, return_state=True)
    assert all(s == {"Cached"} for s in _ran(task_states(same), COMPUTE).values()), task_states(same)


def _check_what_the_prefect_ui_shows(state, w):
    """Task runs named by what they do, subflows named by stage and workdir and drawn in the paper's
    order, and a factory summary with Table IV and the grids embedded (no file:// images)."""
    names = task_run_names(state)
    assert {"validate vit baseline seed 0", "validate vit hybrid seed 0", "ingest seeds",
            "ingest test set phantom-ham", "preprocess test set phantom-isic", "train LoRA on tiny",
            "render shard 0 (benign)", "quality gate and memorisation audit"} <= names, names
    graph = subflow_graph(state)  # the edges the UI's run graph draws between the stages
    where = w.root.name
    assert graph[f"prepare-seeds / seeds and test sets in {where}"] == [], graph
    assert graph[f"train / train LoRA in {where}"] == [f"prepare-seeds / seeds and test sets in {where}"], graph
    assert graph[f"generate / generate in {where}"] == [f"train / train LoRA in {where}"], graph
    assert graph[f"validate / validate in {where}"] == [f"generate / generate in {where}"], graph

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        latest = {a.key: a for a in client.read_latest_artifacts()}
        summary = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["factory-summary"])))
    md = summary[0].data
    assert md.count("Table IV") == 1 and "| vit | phantom-ham | hybrid<br>" in md and "mlflow ui --backend-store-uri" in md
    assert md.count("](data:image/") == 1 and (w.reports / "grids" / "overview.png").is_file()
    assert "file://" not in md and len(md) < 4_000_000
    assert "## Class agreement" in md and "Class agreement (vit baseline classifiers on the synthetic images)" in md
    # MLflow's comparison run holds the images beside the classifiers trained on them
    from dermt2im.core.tracking import sqlite_artifact_root

    parent = mlflow.search_runs(experiment_names=["derm-t2im"], filter_string="tags.`dermt2im.kind` = 'comparison'")
    root = sqlite_artifact_root(mlflow.get_tracking_uri())
    assert list(root.glob(f"*/{parent['run_id'].iloc[0]}/artifacts/quality/grids/overview.png")), parent["run_id"]
    for key in ("ingest-seeds", "ingest-phantom-ham", "preprocess-seeds", "preprocess-phantom-isic",
                "generate-grid-overview", "table-iv", "fidelity", "fidelity-table"):
        assert key in latest, sorted(latest)
    assert "](data:image/png;base64," in latest["generate-grid-overview"].data
    assert "held-out real (floor)" in latest["fidelity"].data and "](data:image/" in latest["fidelity"].data
