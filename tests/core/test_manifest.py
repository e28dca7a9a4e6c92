import pandas as pd
import pyarrow.parquet as pq
import pytest

from dermt2im.core.errors import ManifestError
from dermt2im.core.identity import manifest_digest as digest
from dermt2im.core.manifest import (
    SEEDS,
    SYNTHETIC,
    read_manifest,
    upsert,
    write_manifest,
)


def test_write_read_roundtrip_with_schema_version(tmp_path):
    p = tmp_path / "seeds.parquet"
    write_manifest(pd.DataFrame({"source_path": ["a"], "status": ["accepted"], "width": [3]}), p, SEEDS)
    meta = pq.read_schema(p).metadata
    assert meta[b"dermt2im.manifest"] == b"seeds" and meta[b"dermt2im.schema_version"] == b"1"
    df = read_manifest(p, SEEDS)
    assert list(df.columns) == SEEDS.columns and df.loc[0, "width"] == 3


def test_upsert_appends_and_replaces_without_duplicates(tmp_path):
    p = tmp_path / "seeds.parquet"
    upsert(p, pd.DataFrame({"source_path": ["a", "b"], "status": ["accepted", "accepted"]}), SEEDS)
    out = upsert(p, pd.DataFrame({"source_path": ["c", "a"], "status": ["accepted", "quarantined"]}), SEEDS)
    assert out["source_path"].tolist() == ["a", "b", "c"]
    assert out.set_index("source_path").loc["a", "status"] == "quarantined"
    with pytest.raises(ManifestError, match="repeat a key"):
        upsert(p, pd.DataFrame({"source_path": ["d", "d"]}), SEEDS)


def test_wrong_kind_and_unknown_columns_are_errors(tmp_path):
    p = tmp_path / "seeds.parquet"
    write_manifest(pd.DataFrame({"source_path": ["a"]}), p, SEEDS)
    with pytest.raises(ManifestError, match="expected synthetic"):
        read_manifest(p, SYNTHETIC)
    with pytest.raises(ManifestError, match="no column"):
        write_manifest(pd.DataFrame({"source_path": ["a"], "bogus": [1]}), p, SEEDS)


def test_failed_write_leaves_previous_file_intact(tmp_path):
    p = tmp_path / "seeds.parquet"
    write_manifest(pd.DataFrame({"source_path": ["a"]}), p, SEEDS)
    before = p.read_bytes()
    with pytest.raises(ManifestError):
        write_manifest(pd.DataFrame({"source_path": ["a"], "width": ["not a number"]}), p, SEEDS)
    assert p.read_bytes() == before
    assert not [x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]


def test_digest_ignores_row_order(tmp_path):
    p1, p2 = tmp_path / "1.parquet", tmp_path / "2.parquet"
    write_manifest(pd.DataFrame({"source_path": ["a", "b"], "label": ["benign", "malignant"]}), p1, SEEDS)
    write_manifest(pd.DataFrame({"source_path": ["b", "a"], "label": ["malignant", "benign"]}), p2, SEEDS)
    assert digest(p1, SEEDS) == digest(p2, SEEDS)
    write_manifest(pd.DataFrame({"source_path": ["b", "a"], "label": ["benign", "benign"]}), p2, SEEDS)
    assert digest(p1, SEEDS) != digest(p2, SEEDS)


def test_readable_by_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    p = tmp_path / "seeds.parquet"
    write_manifest(pd.DataFrame({"source_path": ["a", "b"], "status": ["accepted", "quarantined"]}), p, SEEDS)
    con = duckdb.connect()
    assert con.execute(f"select count(*) from read_parquet('{p}') where status = 'accepted'").fetchone()[0] == 1


def test_a_reader_never_sees_a_manifest_half_replaced(tmp_path):
    """Readers (status, workers, the tests) read while a writer replaces the file: pyarrow, given a path,
    sizes the file and reads it apart, so a replace in between read a page cut short."""
    import threading

    p = tmp_path / "synthetic.parquet"
    frames = [pd.DataFrame({"sample_key": [f"k{i}-{n}" for i in range(n)], "prompt": ["x" * n] * n})
              for n in (3, 300, 30, 3000)]
    write_manifest(frames[0], p, SYNTHETIC)
    stop, failures = threading.Event(), []

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            write_manifest(frames[i % len(frames)], p, SYNTHETIC)
            i += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(600):
            try:
                assert len(read_manifest(p, SYNTHETIC)) in (3, 300, 30, 3000)
            except ManifestError as err:
                failures.append(str(err))
    finally:
        stop.set()
        writer.join()
    assert not failures, failures[:2]
