"""Many writers, one manifest: appended parts on object stores (and anywhere else), folded in by one
compactor; the fcntl writer lock on local storage. memory:// and a local moto S3 endpoint stand in
for object stores."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time

import pandas as pd
import pytest

from dermt2im.core import manifest as mf
from dermt2im.core import storage
from dermt2im.core.config import load_config
from dermt2im.core.errors import ManifestError
from dermt2im.core.manifest import (
    SYNTHETIC,
    manifest_exists,
    pending_parts,
    read_manifest,
    rewrite,
    upsert,
    write_manifest,
)
from dermt2im.core.writers import append_rows, compact, record_rows, writer_lock
from dermt2im.core.workdir import Workdir
from tests.core.test_storage import s3_bucket  # noqa: F401  (fixture)


def _rows(keys, sha="a") -> pd.DataFrame:
    return pd.DataFrame({"sample_key": list(keys), "label": "benign", "index": range(len(keys)),
                         "sha256": [f"{sha}-{k}" for k in keys], "status": "rendered"})


@pytest.fixture(params=["local", "memory"])
def location(request, tmp_path, memory_root):
    return str(tmp_path / "m" / "synthetic.parquet") if request.param == "local" else f"{memory_root}/m/synthetic.parquet"


def test_appended_parts_are_read_at_once_and_later_parts_win(location):
    write_manifest(_rows(["b-0", "b-1"]), location, SYNTHETIC)
    first = append_rows(location, _rows(["b-1", "b-2"], sha="second"), SYNTHETIC)
    append_rows(location, _rows(["b-2"], sha="third"), SYNTHETIC)
    assert first is not None and len(pending_parts(location)) == 2
    df = read_manifest(location, SYNTHETIC)
    assert df["sample_key"].tolist() == ["b-0", "b-1", "b-2"]  # base order, then new keys
    assert df.set_index("sample_key")["sha256"].to_dict() == {"b-0": "a-b-0", "b-1": "second-b-1", "b-2": "third-b-2"}
    # the base file alone still holds only what was written to it
    assert mf._read_file(location, SYNTHETIC)["sample_key"].tolist() == ["b-0", "b-1"]
    assert append_rows(location, _rows([]), SYNTHETIC) is None  # nothing to record: no part


def test_compact_folds_the_parts_into_the_base_and_removes_them(location):
    append_rows(location, _rows(["b-0"]), SYNTHETIC)  # parts with no base yet
    append_rows(location, _rows(["b-1"]), SYNTHETIC)
    assert manifest_exists(location) and not storage.is_file(location)
    merged = read_manifest(location, SYNTHETIC)
    assert compact(location, SYNTHETIC) == 2
    assert pending_parts(location) == [] and storage.is_file(location)
    assert read_manifest(location, SYNTHETIC).equals(merged)
    assert compact(location, SYNTHETIC) == 0  # nothing pending: nothing written


def test_a_part_appended_during_a_rewrite_survives_it_and_still_wins(location):
    write_manifest(_rows(["b-0", "b-1"]), location, SYNTHETIC)
    append_rows(location, _rows(["b-0"], sha="re-rendered"), SYNTHETIC)

    def assess_and_meanwhile_a_worker_appends(current: pd.DataFrame) -> pd.DataFrame:
        append_rows(location, _rows(["b-1"], sha="newer"), SYNTHETIC)  # after the rewrite listed the parts
        return current.assign(status="accepted")

    rewrite(location, SYNTHETIC, assess_and_meanwhile_a_worker_appends)
    assert len(pending_parts(location)) == 1  # the folded part is gone, the late one is kept
    df = read_manifest(location, SYNTHETIC).set_index("sample_key")
    assert df.loc["b-0", "sha256"] == "re-rendered-b-0" and df.loc["b-0", "status"] == "accepted"
    assert df.loc["b-1", "sha256"] == "newer-b-1" and df.loc["b-1", "status"] == "rendered"


def test_a_part_compacted_while_being_read_makes_the_read_start_again(location, monkeypatch):
    write_manifest(_rows(["b-0"]), location, SYNTHETIC)
    append_rows(location, _rows(["b-1"]), SYNTHETIC)
    append_rows(location, _rows(["b-2"]), SYNTHETIC)
    original = mf._read_file
    calls = {"parts": 0}

    def compacting_meanwhile(path, kind):
        if ".parts" in str(path) and calls["parts"] == 0:
            calls["parts"] += 1
            rewrite(location, SYNTHETIC, lambda current: current)  # another process folds the parts in
        return original(path, kind)

    monkeypatch.setattr(mf, "_read_file", compacting_meanwhile)
    assert sorted(read_manifest(location, SYNTHETIC)["sample_key"]) == ["b-0", "b-1", "b-2"]
    assert calls["parts"] == 1 and pending_parts(location) == []


def test_parts_are_checked_like_any_manifest(location):
    with pytest.raises(ManifestError, match="repeat a key"):
        append_rows(location, _rows(["b-0", "b-0"]), SYNTHETIC)
    with pytest.raises(ManifestError, match="no column"):
        append_rows(location, pd.DataFrame({"sample_key": ["b-0"], "patient_name": ["x"]}), SYNTHETIC)
    assert not manifest_exists(location)


def test_record_rows_locks_and_upserts_locally_and_appends_on_object_stores(tmp_path, memory_root):
    local = tmp_path / "synthetic.parquet"
    record_rows(local, _rows(["b-0"]), SYNTHETIC)
    record_rows(local, _rows(["b-0", "b-1"], sha="again"), SYNTHETIC)
    assert pending_parts(local) == [] and len(mf._read_file(local, SYNTHETIC)) == 2
    remote = f"{memory_root}/synthetic.parquet"
    record_rows(remote, _rows(["b-0"]), SYNTHETIC)
    record_rows(remote, _rows(["b-0", "b-1"], sha="again"), SYNTHETIC)
    assert len(pending_parts(remote)) == 2 and not storage.is_file(remote)
    assert read_manifest(remote, SYNTHETIC).equals(read_manifest(local, SYNTHETIC))


def _append_many(path: str, writer: int, n: int) -> None:
    for i in range(n):
        append_rows(path, _rows([f"w{writer}-{i:03d}"]), SYNTHETIC)


def test_concurrent_appenders_and_a_compactor_lose_nothing(tmp_path):
    """Four processes append 15 parts each while this process compacts again and again."""
    path = str(tmp_path / "synthetic.parquet")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    folded = 0
    while any(p.is_alive() for p in procs):
        folded += compact(path, SYNTHETIC)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    folded += compact(path, SYNTHETIC)
    df = read_manifest(path, SYNTHETIC)
    assert folded == 60 and len(df) == 60 and df["sample_key"].is_unique
    assert set(df["sample_key"]) == {f"w{w}-{i:03d}" for w in range(4) for i in range(15)}
    assert not list(tmp_path.rglob("*.tmp"))


def test_appenders_and_a_compactor_on_a_local_s3_endpoint(s3_bucket):  # noqa: F811
    path = f"{s3_bucket}/work/manifests/synthetic.parquet"
    write_manifest(_rows(["seed-row"]), path, SYNTHETIC)
    threads = [threading.Thread(target=_append_many, args=(path, w, 8)) for w in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        compact(path, SYNTHETIC)
    for t in threads:
        t.join()
    compact(path, SYNTHETIC)
    df = read_manifest(path, SYNTHETIC)
    assert len(df) == 25 and df["sample_key"].is_unique and pending_parts(path) == []
    assert upsert(path, _rows(["seed-row"], sha="x"), SYNTHETIC).set_index("sample_key").loc["seed-row", "sha256"] == "x-seed-row"


def test_storage_manifests_moves_every_manifest_of_a_workdir(tmp_path, memory_root):
    cfg = load_config("tiny", [f"storage.manifests={memory_root}/run-1/"])
    assert cfg.storage.manifests == f"{memory_root}/run-1"
    w = Workdir.of(tmp_path / "w", cfg)
    assert w.manifests_are_remote
    assert w.seeds_manifest == f"{memory_root}/run-1/seeds.parquet"
    assert w.synthetic_manifest == f"{memory_root}/run-1/synthetic.parquet"
    assert w.test_set_manifest("isic") == f"{memory_root}/run-1/test_sets/isic.parquet"
    assert not (tmp_path / "w" / "manifests").exists()
    local = Workdir.of(tmp_path / "w", load_config("tiny", ["storage.manifests=shared/m"]))
    assert local.plan_manifest == tmp_path / "w" / "shared" / "m" / "plan.parquet"
    assert Workdir.of(tmp_path / "w", load_config("tiny", ["storage.manifests="])).manifest_store is None
    assert Workdir.at(tmp_path / "w").plan_manifest == tmp_path / "w" / "manifests" / "plan.parquet"


def _compact_slowly(path: str, lock_dir: str, hold: float, out) -> None:
    def slow(current):
        time.sleep(hold)  # a slow rewrite: another compactor must wait, not read the same parts
        return current

    with writer_lock(path, lock_dir):
        out.put(len(pending_parts(path)))
        rewrite(path, SYNTHETIC, slow)


def test_rewrites_of_an_object_store_manifest_are_serialised_by_a_lock_in_the_workdir(tmp_path, s3_bucket):  # noqa: F811
    """Two compactors of one S3 manifest: without the lock the second would write a base missing
    the rows the first folded in and deleted; with it the second sees the first's result."""
    path = f"{s3_bucket}/m/synthetic.parquet"
    locks = tmp_path / "locks"
    append_rows(path, _rows(["b-0"]), SYNTHETIC)
    seen: queue.Queue = queue.Queue()
    first = threading.Thread(target=_compact_slowly, args=(path, str(locks), 1.0, seen))
    first.start()
    assert seen.get(timeout=30) == 1  # the first compactor holds the lock and has listed one part
    append_rows(path, _rows(["b-1"]), SYNTHETIC)
    started = time.monotonic()
    assert compact(path, SYNTHETIC, locks) == 1  # waited for the first, then folded only the new part
    assert time.monotonic() - started > 0.3
    first.join()
    assert sorted(read_manifest(path, SYNTHETIC)["sample_key"]) == ["b-0", "b-1"]
    assert mf._read_file(path, SYNTHETIC)["sample_key"].tolist() == ["b-0", "b-1"] and pending_parts(path) == []
    assert [p.suffix for p in locks.iterdir()] == [".lock"]


def test_readers_on_s3_never_fail_while_the_base_is_folded_and_rewritten(s3_bucket):
    """s3fs refuses to go on reading an object that was replaced after it was opened (FileExpired,
    EBUSY): a reader that meets a fold mid-read reads again instead of calling the manifest damaged."""
    url = f"{s3_bucket}/m/synthetic.parquet"
    write_manifest(_rows(["k-0"]), url, SYNTHETIC)
    stop = threading.Event()
    folds: list[int] = []

    def fold_again_and_again():
        for i in range(1, 40):
            append_rows(url, _rows([f"k-{i}"]), SYNTHETIC)
            folds.append(compact(url, SYNTHETIC))
        stop.set()

    folder = threading.Thread(target=fold_again_and_again)
    folder.start()
    reads = 0
    while not stop.is_set():
        df = read_manifest(url, SYNTHETIC)
        assert df["sample_key"].is_unique and "k-0" in set(df["sample_key"])
        reads += 1
    folder.join()
    assert sum(folds) == 39 and reads > 5
    assert len(read_manifest(url, SYNTHETIC)) == 40
