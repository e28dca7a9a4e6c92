"""The defects a hostile but fair user found (issue 11), each reproduced as that user met it.

Data loss, crashes with tracebacks, leaked processes and code run from a shared workdir: every test
here failed before its fix. Cases that need a module's own fixtures live beside it (a damaged
training checkpoint in tests/train, base-model-only rows in tests/generate)."""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from dermt2im.core.views import seeds_view
from dermt2im.cli import app
from dermt2im.core.errors import DecodeError, ManifestError
from dermt2im.core.manifest import SEEDS, read_manifest, write_manifest
from dermt2im.core.specs import IngestConfig, PreprocessConfig
from dermt2im.core.workdir import Workdir, WorkdirBusy, workdir_lock
from dermt2im.export import MARKER, ExportError, check_target
from dermt2im.ingest.stage import ingest_source
from dermt2im.preprocess.resize import preprocess_image, resize_short_side
from dermt2im.preprocess.stage import PreprocessStage, preprocess_manifest
from tests.ingest.ingest_fixtures import jpeg, put
from tests.processes import alive, descendants

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
CFG = IngestConfig(min_side=8)  # the fixtures' images are small; the size rules are checked on their own below


def _cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    """A Python child with the project importable, running ``code``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended early:\n{proc.stdout.read()}")
        assert time.monotonic() < end, f"timed out waiting for {path}"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _classes(root: Path, n: int, seed: int, size: tuple[int, int] = (16, 12)) -> Path:
    for i in range(n):
        label = ("benign", "malignant")[i % 2]
        put(root / label / f"{label}-{seed}-{i}.jpg", jpeg(seed * 1000 + i, size))
    return root


# --------------------------------------------------------------------------------------------------
# 1. export never deletes what it did not write


@pytest.fixture
def exported_workdir(workdir):
    from dermt2im.quality.stage import assess
    from tests.quality.gate_config import tiny_with_full_gate
    from tests.quality.test_quality import phantom, seed_workdir, synthetic_workdir

    from dermt2im.core.config import load_config

    seed_workdir(workdir, n_seeds=2)
    (workdir.root / "config.yaml").write_text(load_config("tiny").as_yaml())  # a workdir the CLI knows
    synthetic_workdir(workdir, {f"{lab}-00000{i}": phantom(lab, 40 + i) for lab in ("benign", "malignant")
                                for i in range(2)})
    assess(workdir, tiny_with_full_gate().quality)
    return workdir


def test_export_refuses_a_folder_it_did_not_write_and_keeps_its_files(exported_workdir, tmp_path):
    w = exported_workdir
    out = tmp_path / "thesis"
    put(out / "thesis.txt", b"two years of work")
    result = _cli("export", out, "--workdir", w.root)
    assert result.exit_code == 2 and "refusing to replace" in result.output and MARKER in result.output
    assert (out / "thesis.txt").read_bytes() == b"two years of work" and sorted(os.listdir(out)) == ["thesis.txt"]

    fresh = tmp_path / "fresh"
    assert _cli("export", fresh, "--workdir", w.root).exit_code == 0
    assert (fresh / MARKER).is_file()
    assert _cli("export", fresh, "--workdir", w.root).exit_code == 0  # its own earlier export: replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli("export", empty, "--workdir", w.root).exit_code == 0


def test_export_refuses_the_workdir_a_folder_inside_it_or_one_holding_it(exported_workdir, tmp_path):
    w = exported_workdir
    before = {p: p.read_bytes() for p in w.root.rglob("*") if p.is_file()}
    for target, why in ((w.root, "is the workdir"), (w.root / "lora", "inside the workdir"),
                        (w.root / "new" / "out", "inside the workdir"), (w.root.parent, "holds the workdir")):
        result = _cli("export", target, "--workdir", w.root)
        assert result.exit_code == 2 and why in result.output, (target, result.output)
    assert all(p.is_file() and p.read_bytes() == data for p, data in before.items())  # nothing lost
    assert not (w.root / "new").exists()
    with pytest.raises(ExportError, match="holds the workdir"):  # even when the marker is planted there
        (tmp_path / MARKER).write_text("{}")
        check_target(tmp_path, w.root)


# --------------------------------------------------------------------------------------------------
# 2. every writer of a manifest holds its writer lock for the whole read-modify-write


_SLOW_INGEST = """
    import sys, time
    from pathlib import Path
    from dermt2im.core.specs import IngestConfig
    from dermt2im.ingest import stage
    source, manifest, signals, me = sys.argv[1:5]
    signals = Path(signals)
    real = stage.scan_source

    def scan_and_wait(*a, **k):  # inside the writer lock: the manifest has been read, not yet written
        (signals / f"{me}-scanning").touch()
        while not (signals / "release").exists():
            time.sleep(0.02)
        return real(*a, **k)

    stage.scan_source = scan_and_wait
    (signals / f"{me}-started").touch()
    report = stage.ingest_source(Path(source), manifest, IngestConfig(min_side=8))
    print(report.new, "new")
"""


def test_two_concurrent_ingests_into_one_manifest_keep_every_row(tmp_path):
    a, b = _classes(tmp_path / "a", 10, seed=1), _classes(tmp_path / "b", 9, seed=2)
    manifest, signals = tmp_path / "w" / "seeds.parquet", tmp_path / "signals"
    signals.mkdir()
    first = _python(_SLOW_INGEST, a, manifest, signals, "a")
    _wait_for(signals / "a-scanning", first)
    second = _python(_SLOW_INGEST, b, manifest, signals, "b")
    _wait_for(signals / "b-started", second)
    time.sleep(1.0)  # the second is now waiting for the lock (without it, it would read the empty manifest)
    assert not (signals / "b-scanning").exists()
    (signals / "release").touch()
    assert "10 new" in _finish(first) and "9 new" in _finish(second)
    df = seeds_view(manifest)
    assert len(df) == 19 and df["source_path"].is_unique and (df["status"] == "accepted").all()


def test_preprocess_keeps_rows_an_ingest_added_while_it_worked(tmp_path):
    manifest = tmp_path / "w" / "seeds.parquet"
    ingest_source(_classes(tmp_path / "a", 4, seed=1), manifest, CFG)
    signals = tmp_path / "signals"
    signals.mkdir()
    child = _python("""
        import sys, time
        from pathlib import Path
        from dermt2im.core.specs import PreprocessConfig
        from dermt2im.preprocess import stage
        manifest, out, signals = sys.argv[1:4]
        signals = Path(signals)
        real = stage.run_jobs

        def run_then_wait(*a, **k):  # the images are done; the manifest is not yet updated
            outcomes = real(*a, **k)
            (signals / "processed").touch()
            while not (signals / "ingested").exists():
                time.sleep(0.02)
            return outcomes

        stage.run_jobs = run_then_wait
        print(stage.preprocess_manifest(manifest, Path(out), PreprocessConfig(size=16), workers=1).summary())
    """, manifest, tmp_path / "processed", signals)
    _wait_for(signals / "processed", child)
    assert ingest_source(_classes(tmp_path / "b", 3, seed=2), manifest, CFG).new == 3
    (signals / "ingested").touch()
    assert "4 processed" in _finish(child)
    df = seeds_view(manifest)
    assert len(df) == 7
    from_a = df["source_path"].str.contains("/a/")
    assert df.loc[from_a, "processed_path"].notna().all() and df.loc[~from_a, "processed_path"].isna().all()


# --------------------------------------------------------------------------------------------------
# 3. one run of the stages at a time per workdir


_HOLD = """
    import sys, time
    from pathlib import Path
    from dermt2im.core.workdir import Workdir, workdir_lock
    root, command, shared, signals = sys.argv[1:5]
    with workdir_lock(Workdir.at(root), command, shared=shared == "shared"):
        Path(signals, "held").touch()
        while not Path(signals, "done").exists():
            time.sleep(0.02)
"""


def _holding(tmp_path, root: Path, mode: str, command: str = "dermt2im run") -> subprocess.Popen:
    signals = tmp_path / f"signals-{mode}"
    signals.mkdir()
    Workdir.at(root).locks  # noqa: B018 - makes the folder
    child = _python(_HOLD, root, command, mode, signals)
    _wait_for(signals / "held", child)
    child.signals = signals
    return child


def test_a_second_run_on_a_busy_workdir_stops_at_once_naming_the_first(tmp_path):
    root, data = tmp_path / "w", _classes(tmp_path / "src", 4, seed=1, size=(64, 64))
    assert _cli("config", "--workdir", root, "--config", "tiny").exit_code == 0
    saved = (root / "config.yaml").read_text()
    child = _holding(tmp_path, root, "exclusive")
    try:
        for args in (["run", data], ["ingest", data], ["preprocess"], ["train"], ["generate"], ["validate"],
                     ["quality"], ["worker"], ["config", "--save", "--set", "generate.per_class=5"]):
            result = _cli(*args, "--workdir", root)
            assert result.exit_code == 2, (args, result.output)
            assert "in use by `dermt2im run`" in result.output and f"pid {child.pid}" in result.output
        assert not (root / "manifests").exists() and (root / "config.yaml").read_text() == saved  # nothing done
        assert _cli("config", "--workdir", root).exit_code == 0  # reading the config needs no lock
    finally:
        (child.signals / "done").touch()
        _finish(child)
    assert _cli("ingest", data, "--workdir", root).exit_code == 0  # free again once the first has ended


def test_the_lock_dies_with_its_holder_and_workers_share_it(tmp_path):
    w = Workdir.at(tmp_path / "w")
    child = _holding(tmp_path, w.root, "exclusive")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    with workdir_lock(w, "dermt2im run"):  # a killed run leaves no stale lock behind
        pass
    worker = _holding(tmp_path, w.root, "shared", "dermt2im worker")
    try:
        with workdir_lock(w, "dermt2im worker", shared=True):  # scale-out workers run side by side
            pass
        with pytest.raises(WorkdirBusy, match="in use by"):
            with workdir_lock(w, "dermt2im run"):
                pass
    finally:
        (worker.signals / "done").touch()
        _finish(worker)


# --------------------------------------------------------------------------------------------------
# 4. a file unreadable for a while is tried again once it is back


def test_a_file_unreadable_at_preprocess_is_tried_again_after_it_is_fixed(tmp_path):
    src, manifest, out = _classes(tmp_path / "src", 4, seed=3, size=(40, 40)), tmp_path / "m.parquet", tmp_path / "p"
    ingest_source(src, manifest, CFG)
    flaky = src / "benign" / "benign-3-0.jpg"
    away = flaky.rename(tmp_path / "away.jpg")  # an unmounted share, a permission being fixed ...
    report = preprocess_manifest(manifest, out, PreprocessConfig(size=16), workers=1)
    row = seeds_view(manifest).set_index("source_path").loc[str(flaky)]
    assert report.failed == 1 and row["status"] == "quarantined" and "cannot read source file" in row["reason"]
    assert "the next preprocess tries again" in row["reason"]
    stage = PreprocessStage(PreprocessConfig(size=16), {"seeds": manifest}, out, workers=1)
    assert stage.finished("seeds", stage.key("seeds")) is None  # the stage is not done while a row waits
    assert read_manifest(manifest, SEEDS).set_index("source_path").loc[str(flaky), "status"] == "accepted"

    away.rename(flaky)  # back: preprocess alone tries it again (ingest's rows were never touched)
    report = preprocess_manifest(manifest, out, PreprocessConfig(size=16), workers=1)
    df = seeds_view(manifest)
    assert report.retried == 1 and "tried again 1 row(s)" in report.summary()
    assert report.failed == 0 and (df["status"] == "accepted").all() and df["processed_path"].notna().all()
    assert stage.finished("seeds", stage.key("seeds")) is not None

    flaky.write_bytes(jpeg(999, (40, 40)))  # other bytes at the same path: a lasting verdict, not retried
    ingest_source(src, manifest, CFG)
    assert seeds_view(manifest).set_index("source_path").loc[str(flaky), "status"] == "accepted"


def test_a_changed_file_stays_quarantined_until_ingest_sees_its_new_bytes(tmp_path):
    src, manifest, out = _classes(tmp_path / "src", 2, seed=4, size=(40, 40)), tmp_path / "m.parquet", tmp_path / "p"
    ingest_source(src, manifest, CFG)
    changed = src / "benign" / "benign-4-0.jpg"
    changed.write_bytes(jpeg(4242, (40, 40)))
    preprocess_manifest(manifest, out, PreprocessConfig(size=16), workers=1)
    reason = seeds_view(manifest).set_index("source_path").loc[str(changed), "reason"]
    assert "changed since ingest" in reason and "transient" not in reason
    preprocess_manifest(manifest, out, PreprocessConfig(size=16), workers=1)  # not retried blindly
    assert seeds_view(manifest).set_index("source_path").loc[str(changed), "reason"] == reason


# --------------------------------------------------------------------------------------------------
# 5, 16, 17. every file under the source gets a row: odd names, links, unreadable folders, animations


def _frames(fmt: str, n: int = 3, **kw) -> bytes:
    frames = [Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], **kw)
    return buf.getvalue()


def test_every_file_under_the_source_gets_a_row_with_a_reason(tmp_path, monkeypatch):
    src = _classes(tmp_path / "src", 4, seed=5, size=(20, 20))
    outside = put(tmp_path / "elsewhere" / "private.jpg", jpeg(77, (20, 20)))
    (src / "benign" / "escape.jpg").symlink_to(outside)
    (src / "benign" / "dangling.jpg").symlink_to(src / "benign" / "gone.jpg")
    (src / "benign" / "loop.jpg").symlink_to(src / "benign" / "loop.jpg")
    (src / "malignant" / "inside.jpg").symlink_to(src / "malignant" / "malignant-5-1.jpg")  # stays in the source
    put(src / "benign" / "animated.gif", _frames("GIF", duration=100, loop=0))
    put(src / "benign" / "pages.tiff", _frames("TIFF"))
    put(src / "malignant" / "animated.webp", _frames("WEBP", duration=100))
    # a one-frame GIF is read like any image
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(src / "malignant" / "still.gif", format="GIF")
    put(src / "benign" / "notes.txt", b"seen under the microscope")
    put(src / "malignant" / "locked" / "m.jpg", jpeg(55, (20, 20)))
    bad_name = os.fsencode(src / "benign") + b"/l\xe9sion.jpg"  # Latin-1, as zips made on Windows hold them
    with open(bad_name, "wb") as f:
        f.write(jpeg(66, (20, 20)))

    real_scandir = os.scandir

    def unreadable(path=".", *a):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *a)

    monkeypatch.setattr(os, "scandir", unreadable)
    report = ingest_source(src, tmp_path / "m.parquet", CFG)
    df = seeds_view(tmp_path / "m.parquet")
    rows = df.set_index(df["source_path"].str.replace(str(src) + "/", "", regex=False))
    reason = rows["reason"].to_dict()

    assert len(df) == 4 + 11 and df["source_path"].is_unique
    # a link out of the source is read as its owner would read it, and the row says where it leads
    assert rows.loc["benign/escape.jpg", "status"] == "accepted"
    assert rows.loc["benign/escape.jpg", "link_target"] == str(outside.resolve())
    assert rows.loc["malignant/inside.jpg", "link_target"] == str((src / "malignant" / "malignant-5-1.jpg").resolve())
    assert pd.isna(rows.loc["benign/benign-5-0.jpg", "link_target"])
    assert reason["benign/dangling.jpg"].startswith("broken symbolic link")
    assert reason["benign/loop.jpg"].startswith("symbolic link loop")
    pair = rows.loc[["malignant/inside.jpg", "malignant/malignant-5-1.jpg"]]  # a link inside: the same bytes twice
    assert sorted(pair["status"]) == ["accepted", "quarantined"]
    assert pair.loc[pair["status"] == "quarantined", "reason"].iloc[0].startswith("duplicate of")
    for name in ("benign/animated.gif", "benign/pages.tiff", "malignant/animated.webp"):
        assert "3 frames" in reason[name], name
    assert rows.loc["malignant/still.gif", "status"] == "accepted"
    assert reason["benign/notes.txt"].startswith("not an image file (.txt)")
    assert reason["malignant/locked"].startswith("folder cannot be read: Permission denied")
    assert "not valid UTF-8" in reason["benign/l\\xe9sion.jpg"]
    assert (rows.loc[["benign/benign-5-0.jpg", "benign/benign-5-2.jpg", "malignant/malignant-5-3.jpg"], "status"]
            == "accepted").all()
    assert report.quarantined == 9 and sum(report.reasons.values()) == 9
    df.to_csv(tmp_path / "check.csv")  # the manifest holds only text that can be written anywhere


# --------------------------------------------------------------------------------------------------
# 6. strips and slivers: refused at ingest, and no resize ever allocates beyond a budget


def _strip_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 60)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_slivers_and_strips_are_quarantined_at_ingest(tmp_path):
    src = tmp_path / "src"
    put(src / "benign" / "strip.png", _strip_png(100_000, 1))
    put(src / "benign" / "tall.png", _strip_png(300, 1500))
    put(src / "benign" / "tiny.png", _strip_png(40, 40))
    put(src / "malignant" / "fine.png", _strip_png(400, 300))
    assert len((src / "benign" / "strip.png").read_bytes()) < 1000  # a few hundred bytes on disk
    ingest_source(src, tmp_path / "m.parquet", IngestConfig())
    reason = seeds_view(tmp_path / "m.parquet").set_index("source_path")["reason"]
    assert reason[str(src / "benign" / "strip.png")].startswith("image too small: 100000x1")
    assert reason[str(src / "benign" / "tall.png")].startswith("image too elongated: 300x1500 is 5.0 times")
    assert "ingest.min_side (64 px)" in reason[str(src / "benign" / "tiny.png")]
    assert pd.isna(reason[str(src / "malignant" / "fine.png")])
    relaxed = IngestConfig(min_side=1, max_aspect_ratio=200_000)  # the limits are the user's to change
    ingest_source(src, tmp_path / "m2.parquet", relaxed)
    assert (seeds_view(tmp_path / "m2.parquet")["status"] == "accepted").all()


def test_every_resize_is_bounded_before_it_allocates():
    start = time.perf_counter()
    with pytest.raises(DecodeError, match="image too elongated"):
        preprocess_image(_strip_png(100_000, 1), PreprocessConfig(size=64))  # would be 6.4M x 64 pixels
    with pytest.raises(DecodeError, match="image too elongated"):
        resize_short_side(np.zeros((2, 20_000, 3), np.uint8), 512)  # 512 x 5.1M pixels: 7.9 GB
    assert time.perf_counter() - start < 5  # refused before anything large was made
    assert resize_short_side(np.zeros((300, 1200, 3), np.uint8), 512).shape == (512, 2048, 3)  # ordinary


# --------------------------------------------------------------------------------------------------
# 7, 8. a bad setting never reaches the saved config; damaged files are one line naming the file


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generate.samplers=[nosuch]", "unknown sampler"),
        ("generate.samplers=[]", "samplers is empty"),
        ("generate.width=63", "multiple of 8"),
        ("generate.steps_min=30", "is below steps_min (30)"),
        ("train.resolution=100", "multiple of 8"),
        ("orchestration.paralel_workers=2", "orchestration.paralel_workers: unknown key"),
        ("orchestration.parallel_workers=-1", "orchestration.parallel_workers"),
    ],
)
def test_a_bad_override_is_refused_before_anything_is_saved(tmp_path, override, message):
    root = tmp_path / "w"
    assert _cli("config", "--workdir", root, "--config", "tiny", "--set", "generate.per_class=3").exit_code == 0
    saved = (root / "config.yaml").read_text()
    for command in (["config", "--save"], ["generate", "--save"], ["ingest", tmp_path, "--save"], ["run"]):
        result = _cli(*command, "--workdir", root, "--set", override)
        assert result.exit_code == 2 and message in result.output, (command, result.output)
        assert (root / "config.yaml").read_text() == saved
    assert _cli("config", "--workdir", root).exit_code == 0  # later commands still work


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("train: {rank: [4\n", "is not valid YAML (line 2)"),
        ("just a sentence\n", "must hold a mapping of sections"),
        ("train: {rnak: 4}\n", "train.rnak: unknown key"),
    ],
)
def test_a_damaged_saved_config_is_one_line_naming_the_file(tmp_path, content, message):
    root = tmp_path / "w"
    root.mkdir()
    (root / "config.yaml").write_text(content)
    for command in (["config"], ["preprocess"], ["generate"]):
        result = _cli(*command, "--workdir", root)
        assert result.exit_code == 2 and message in result.output, result.output
        assert str(root / "config.yaml") in result.output.replace("\n", "")
    assert (root / "config.yaml").read_text() == content  # left for the user to fix, not overwritten


def _ingested(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "w"
    data = _classes(tmp_path / "src", 4, seed=6, size=(64, 64))
    assert _cli("ingest", data, "--workdir", root).exit_code == 0
    return root, root / "manifests" / "seeds.parquet"


@pytest.mark.parametrize("damage", ["zero bytes", "cut short", "not parquet"])
def test_a_damaged_manifest_is_one_line_naming_the_file(tmp_path, damage):
    root, manifest = _ingested(tmp_path)
    data = manifest.read_bytes()
    manifest.write_bytes({"zero bytes": b"", "cut short": data[: len(data) // 2],
                          "not parquet": b"sample_id,label\n1,benign\n"}[damage])
    for command in (["preprocess"], ["train"]):
        result = _cli(*command, "--workdir", root)
        assert result.exit_code == 2, result.output
        assert f"{manifest} cannot be read as a seeds manifest" in result.output.replace("\n", "")
        assert "dermt2im ingest" in result.output
    with pytest.raises(ManifestError, match="the file is damaged"):
        seeds_view(manifest)


def test_a_manifest_missing_a_column_says_so_not_no_training_images(tmp_path):
    root, manifest = _ingested(tmp_path)
    df = read_manifest(manifest, SEEDS).drop(columns=["split"])
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                  b"dermt2im.manifest": b"seeds", b"dermt2im.schema_version": b"1"}),
                   manifest)
    result = _cli("train", "--workdir", root)
    assert result.exit_code == 2 and "lacks the column(s) split" in result.output.replace("\n", "")
    assert "no training images" not in result.output


def test_a_manifest_written_before_a_column_was_added_still_reads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermt2im.core.manifest import SYNTHETIC

    older = pa.schema([f for f in SYNTHETIC.arrow if f.name != "base_model_only"], metadata=SYNTHETIC.arrow.metadata)
    pq.write_table(older.empty_table(), tmp_path / "s.parquet")
    assert "base_model_only" in read_manifest(tmp_path / "s.parquet", SYNTHETIC).columns


# --------------------------------------------------------------------------------------------------
# 10. command-line ranges


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--per-class", "0"],
        ["generate", "--per-class", "-3"],
        ["phantoms", "OUT", "--n", "0"],
        ["phantoms", "OUT", "--size", "1"],
    ],
)
def test_out_of_range_numbers_are_refused_by_the_command_line(tmp_path, args):
    result = _cli(*[str(tmp_path / "out") if a == "OUT" else a for a in args], *(
        ["--workdir", str(tmp_path / "w")] if args[0] == "generate" else []))
    assert result.exit_code == 2 and "Invalid value" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()


def test_per_class_is_documented_as_a_target():
    help_text = " ".join(_cli("generate", "--help").output.replace("│", " ").split())
    assert "a target, not an increment" in help_text


# --------------------------------------------------------------------------------------------------
# 11. a busy machine: the temporary Prefect server gets time, is tried again, and says so


def test_a_slow_prefect_server_start_is_tried_again(monkeypatch, capsys):
    from prefect.server.api.server import SubprocessASGIServer

    from dermt2im import cli_session

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    calls: list[tuple[str, int | None]] = []

    def start(self, timeout=None):
        calls.append(("start", timeout))
        if sum(c[0] == "start" for c in calls) < 3:
            raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(SubprocessASGIServer, "start", start)
    monkeypatch.setattr(SubprocessASGIServer, "stop", lambda self: calls.append(("stop", None)))
    cli_session.start_prefect_server(print)
    assert calls == [("start", 120), ("stop", None), ("start", 240), ("stop", None), ("start", 480)]
    out = capsys.readouterr().out
    assert out.count("starting Prefect's temporary local server") == 3 and "trying again" in out

    calls.clear()

    def never(self, timeout=None):
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(SubprocessASGIServer, "start", never)
    with pytest.raises(cli_session.PrefectServerUnstartable,
                       match="did not start in 3 attempts.*prefect server start --host 127.0.0.1"):
        cli_session.start_prefect_server(print)


def test_the_start_up_timeout_defaults_to_a_patient_value(tmp_path, monkeypatch):
    from dermt2im.core.workdir import configure_runtime

    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    configure_runtime(Workdir.at(tmp_path / "w"))
    assert int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 120
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")  # a user's own value wins
    configure_runtime(Workdir.at(tmp_path / "w"))
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "600"


# --------------------------------------------------------------------------------------------------
# 12. no LoRA, no lesions: the base model alone only when asked


def test_generate_without_a_lora_stops_and_says_how_to_go_on(tmp_path):
    assert _cli("config", "--workdir", tmp_path / "w", "--config", "tiny").exit_code == 0
    result = _cli("generate", "--workdir", tmp_path / "w")
    assert result.exit_code == 2 and "no LoRA trained for the current config" in result.output
    assert "--base-model-only" in result.output
    assert not (tmp_path / "w" / "manifests").exists()


# --------------------------------------------------------------------------------------------------
# 13. nothing Prefect caches is ever read back from a (shared) workdir


class _Payload:
    """Unpickling this runs a shell command, as a planted cache record would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(folder: Path, names: list[str], marker: Path) -> None:
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        record = ResultRecord(result=_Payload(marker), metadata=ResultRecordMetadata(
            storage_key=str(folder / name), serializer=PickleSerializer()))
        (folder / name).write_bytes(record.serialize())
        (folder / f"{name}.pkl").write_bytes(pickle.dumps(_Payload(marker)))


def test_every_prefect_task_and_flow_keeps_no_result():
    import importlib
    import pkgutil

    from prefect import Flow, Task
    from prefect.cache_policies import NO_CACHE

    from dermt2im import flows
    from dermt2im import tasks

    found = 0
    for package in (tasks, flows):
        for mod in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{mod.name}")
            for name, obj in vars(module).items():
                if isinstance(obj, Task):
                    found += 1
                    assert obj.cache_policy is NO_CACHE and obj.persist_result is False, f"{mod.name}.{name}"
                elif isinstance(obj, Flow):
                    found += 1
                    assert not obj.persist_result, f"flow {mod.name}.{name} persists its result"
    assert found >= 8


@pytest.mark.slow
def test_a_planted_pickle_is_never_executed(prefect_harness, tmp_path, monkeypatch):
    from prefect.results import ResultRecord

    from dermt2im.flows.seeds import prepare_seeds
    from tests.prefect_utils import task_states

    marker = tmp_path / "PWNED"
    sandbox = tmp_path / "sandbox"
    _plant(sandbox, ["probe"], marker)
    ResultRecord.deserialize((sandbox / "probe").read_bytes())
    assert marker.exists(), "the planted record must be dangerous when read, or this test proves nothing"
    marker.unlink()

    root = tmp_path / "w"
    small = ["phantoms.n_seed=6", "phantoms.n_test=2", "phantoms.size=48", "preprocess.size=32"]
    assert prepare_seeds(str(root), config="tiny", overrides=small, return_state=True).is_completed()
    storage = Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"])
    written = [p for p in (*storage.rglob("*"), *(root / ".prefect").rglob("storage/*")) if p.is_file()]
    assert written == []  # nothing persisted, so nothing is ever read back

    names = ["ingest", "preprocess", "phantoms", *[f"{i:032x}" for i in range(4)]]
    _plant(storage, names, marker)
    _plant(root / ".prefect" / "storage", names, marker)
    stamp = next((root / ".stamps" / "ingest").glob("*.json"))
    stamp.write_bytes(pickle.dumps(_Payload(marker)))  # the stages' own records are JSON: garbage is "not done"

    def refuse(*a, **k):
        raise AssertionError("a Prefect result record was read")

    monkeypatch.setattr(ResultRecord, "deserialize", refuse)
    again = prepare_seeds(str(root), return_state=True)
    assert again.is_completed() and not marker.exists()
    states = task_states(again)
    assert "Completed" in states["ingest"] and set(states["preprocess"]) == {"Cached"}


# --------------------------------------------------------------------------------------------------
# 14. a killed preprocess takes its worker processes with it


def test_pool_workers_die_with_a_killed_preprocess(tmp_path):
    fifo = tmp_path / "never-written.jpg"
    os.mkfifo(fifo)  # reading it blocks: the workers are busy when their parent is killed
    child = _python("""
        import sys
        from dermt2im.core.specs import PreprocessConfig
        from dermt2im.preprocess.pool import _Job, run_jobs
        fifo, out = sys.argv[1:3]
        jobs = [_Job(f"{i:064x}", (fifo,), f"{out}/{i}.png", "k") for i in range(8)]
        run_jobs(jobs, PreprocessConfig(size=512), 1 << 24, workers=2)
    """, fifo, tmp_path)
    workers: list[int] = []
    try:
        end = time.monotonic() + 120
        while len(workers := descendants(child.pid)) < 3:  # forkserver + 2 workers
            assert child.poll() is None and time.monotonic() < end, "the pool never started"
            time.sleep(0.1)
        time.sleep(0.5)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        end = time.monotonic() + 15
        while (left := [p for p in workers if alive(p)]) and time.monotonic() < end:
            time.sleep(0.1)
        assert left == [], f"worker processes outlived their parent: {left}"
    finally:
        for pid in [*descendants(child.pid), *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if child.poll() is None:
            child.kill()


# --------------------------------------------------------------------------------------------------
# 15. files and folders honour the umask, for shared multi-user workdirs


def test_written_files_and_export_folders_honour_the_umask(exported_workdir, tmp_path):
    from dermt2im.core.fileio import atomic_write_text

    w = exported_workdir
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "note.txt", "x")
        write_manifest(read_manifest(w.seeds_manifest, SEEDS), tmp_path / "seeds.parquet", SEEDS)
        assert _cli("export", tmp_path / "out", "--workdir", w.root).exit_code == 0
        os.umask(0o002)  # a group-writable team workdir
        atomic_write_text(tmp_path / "team.txt", "x")
    finally:
        os.umask(old)
    mode = lambda p: oct(p.stat().st_mode & 0o777)  # noqa: E731
    assert mode(tmp_path / "note.txt") == mode(tmp_path / "seeds.parquet") == "0o644"
    assert mode(tmp_path / "out") == mode(tmp_path / "out" / "benign") == "0o755"
    assert mode(tmp_path / "out" / "metadata.csv") == "0o644"
    assert mode(tmp_path / "team.txt") == "0o664"
