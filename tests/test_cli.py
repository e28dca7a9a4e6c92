"""The command line as a user runs it: phantoms -> ingest -> preprocess, and its error messages."""

from typer.testing import CliRunner

from dermt2im.cli import app
from dermt2im.core.manifest import SEEDS, read_manifest

runner = CliRunner()


def test_help_lists_every_stage():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("phantoms", "ingest", "preprocess", "train", "generate", "quality", "export", "validate", "report", "run",
                "import-synthetic"):
        assert cmd in out


def test_phantoms_ingest_preprocess(tmp_path):
    data, work = tmp_path / "ph", tmp_path / "w"
    r = runner.invoke(app, ["phantoms", str(data), "--n", "8", "--seed", "3", "--size", "64"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["ingest", str(data), "--workdir", str(work), "--set", "preprocess.size=32"])
    assert r.exit_code == 0, r.output
    assert "csv" in r.output.lower()  # the detected layout is reported
    r = runner.invoke(app, ["preprocess", "--workdir", str(work)])
    assert r.exit_code == 0, r.output
    df = read_manifest(work / "manifests" / "seeds.parquet", SEEDS)
    assert len(df) == 8 and (df["status"] == "accepted").all()
    assert df["processed_path"].notna().all()
    from PIL import Image

    assert Image.open(df["processed_path"].iloc[0]).size == (32, 32)  # the override was saved with the workdir
    assert "size: 32" in (work / "config.yaml").read_text()


def test_config_errors_are_one_clear_line(tmp_path):
    r = runner.invoke(app, ["config", "--workdir", str(tmp_path / "w"), "--set", "train.rnak=3"])
    assert r.exit_code == 2
    assert "train.rnak: unknown key" in r.output and "Traceback" not in r.output


def test_missing_source_is_a_clear_error(tmp_path):
    r = runner.invoke(app, ["ingest", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output


def test_preprocess_before_ingest_says_what_to_do(tmp_path):
    r = runner.invoke(app, ["preprocess", "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 2 and "dermt2im ingest" in r.output


def test_bad_test_set_argument(tmp_path):
    r = runner.invoke(app, ["validate", "--workdir", str(tmp_path / "w"), "--test-set", "nosource"])
    assert r.exit_code != 0 and "NAME=SOURCE" in r.output


def test_run_with_missing_source_fails_before_any_work(tmp_path):
    r = runner.invoke(app, ["run", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 2 and "source not found" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "w").exists()


def test_import_synthetic_without_seeds_says_the_audit_was_skipped(tmp_path):
    from tests.ingest.provenance_fixtures import a1111_png

    for i, label in enumerate(("benign", "malignant", "benign")):
        (tmp_path / "sd" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "sd" / label / f"{i}.png").write_bytes(a1111_png(i, size=64))
    r = runner.invoke(app, ["import-synthetic", str(tmp_path / "sd"), "--workdir", str(tmp_path / "w"), "--name", "sd"])
    assert r.exit_code == 0, r.output
    assert "import sd: layout folders" in r.output and "AUTOMATIC1111 3" in r.output
    assert "memorisation audit: skipped, no seed images to compare" in r.output
    r = runner.invoke(app, ["import-synthetic", str(tmp_path / "sd"), "--workdir", str(tmp_path / "w"), "--name", "dermt2im"])
    assert r.exit_code == 2 and "factory's own renders" in r.output and "Traceback" not in r.output


def test_ingest_names_generated_images_in_its_summary(tmp_path):
    from tests.ingest.provenance_fixtures import a1111_png, own_png

    (tmp_path / "src" / "benign").mkdir(parents=True)
    (tmp_path / "src" / "benign" / "a.png").write_bytes(a1111_png(1))
    (tmp_path / "src" / "benign" / "b.png").write_bytes(own_png(2))
    r = runner.invoke(app, ["ingest", str(tmp_path / "src"), "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    assert "2 quarantined" in r.output and "synthetic 2" in r.output
