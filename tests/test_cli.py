"""The command line as a user runs it: phantoms -> ingest -> preprocess, and its error messages."""

from typer.testing import CliRunner

from dermt2im.core.views import seeds_view
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
    df = seeds_view(work / "manifests" / "seeds.parquet")
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


def test_version_and_short_help():
    from dermt2im import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"dermt2im {__version__}"
    r = runner.invoke(app, ["ingest", "-h"])
    assert r.exit_code == 0 and "--workdir" in r.output and "--save" in r.output
    for cmd in ("export", "report"):  # every command takes --config / --set, as the README says
        out = runner.invoke(app, [cmd, "-h"], terminal_width=200).output
        assert "--config" in out and "--set" in out, cmd


def test_nothing_is_created_before_the_inputs_are_checked(tmp_path):
    w = tmp_path / "w"
    r = runner.invoke(app, ["ingest", "/nonexistent/seeds", "--workdir", str(w)])
    assert r.exit_code == 2 and "source not found: /nonexistent/seeds" in r.output
    for cmd in (["preprocess"], ["train"], ["generate"], ["quality"], ["report"], ["validate"], ["export", str(tmp_path / "o")]):
        r = runner.invoke(app, [*cmd, "--workdir", str(w)])
        assert r.exit_code == 2 and f"no factory workdir at {w}" in r.output and "dermt2im ingest" in r.output, cmd
    r = runner.invoke(app, ["run", "--workdir", str(w), "--set", "phantoms.n_seed=1"])  # the demo: smoke + a bad value
    assert r.exit_code == 2 and "smoke.yaml" in r.output and "phantoms.n_seed" in r.output
    r = runner.invoke(app, ["config", "--workdir", str(w)])
    assert r.exit_code == 0 and "nothing saved" in r.output
    assert not w.exists() and not (tmp_path / "o").exists()


def _phantoms(tmp_path, n=8):
    data = tmp_path / "ph"
    assert runner.invoke(app, ["phantoms", str(data), "--n", str(n), "--size", "48"]).exit_code == 0
    return data


def test_a_real_source_without_config_gets_the_papers_defaults_and_says_so(tmp_path):
    import yaml

    data, w = _phantoms(tmp_path), tmp_path / "w"
    r = runner.invoke(app, ["ingest", str(data), "--workdir", str(w)])
    assert r.exit_code == 0, r.output
    assert f"config: built-in defaults (the paper's settings); saved as {w / 'config.yaml'}" in r.output
    saved = yaml.safe_load((w / "config.yaml").read_text())
    assert saved["name"] == "derm-t2im" and saved["preprocess"]["size"] == 512 and saved["train"]["base_model"] != "tiny"
    r = runner.invoke(app, ["config", "--workdir", str(w)])
    assert f"config: {w / 'config.yaml'} (derm-t2im)" in r.output


def test_set_is_for_one_command_unless_saved(tmp_path):
    import yaml

    data, w = _phantoms(tmp_path), tmp_path / "w"
    assert runner.invoke(app, ["ingest", str(data), "-w", str(w), "-c", "tiny", "-s", "preprocess.size=32"]).exit_code == 0
    before = (w / "config.yaml").read_text()
    r = runner.invoke(app, ["preprocess", "-w", str(w), "--set", "preprocess.size=24"])
    assert r.exit_code == 0, r.output
    assert "with --set preprocess.size=24, for this command only (--save keeps it)" in r.output
    assert (w / "config.yaml").read_text() == before  # unchanged ...
    from PIL import Image

    df = seeds_view(w / "manifests" / "seeds.parquet")
    assert Image.open(df["processed_path"].iloc[0]).size == (24, 24)  # ... and yet the command used it
    r = runner.invoke(app, ["config", "-w", str(w), "--set", "train.rank=8", "--save"])
    assert r.exit_code == 0 and "CHANGED (later commands use it): train.rank: 4 -> 8" in r.output
    assert yaml.safe_load((w / "config.yaml").read_text())["train"]["rank"] == 8


def test_progress_is_logged_as_plain_lines_when_not_on_a_terminal(tmp_path):
    data, w = _phantoms(tmp_path, n=6), tmp_path / "w"
    r = runner.invoke(app, ["ingest", str(data), "-w", str(w), "-c", "tiny"])
    assert r.exit_code == 0, r.output
    assert "ingest ph: 6/6 files in " in r.output and "files/s" in r.output
    r = runner.invoke(app, ["preprocess", "-w", str(w)])
    assert "preprocess seeds: 6/6 images in " in r.output


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


def test_import_synthetic_checks_its_source_and_name_before_creating_anything(tmp_path):
    (tmp_path / "sd" / "benign").mkdir(parents=True)
    w = tmp_path / "w"
    r = runner.invoke(app, ["import-synthetic", str(tmp_path / "missing"), "--workdir", str(w), "--name", "ext"])
    assert r.exit_code == 2 and "source not found" in r.output
    r = runner.invoke(app, ["import-synthetic", str(tmp_path / "sd"), "--workdir", str(w), "--name", "../x"])
    assert r.exit_code == 2 and "--name '../x'" in r.output
    assert not w.exists()


def test_generate_gates_while_rendering_and_leaves_the_fidelity_report_to_report_unless_asked(tmp_path, monkeypatch):
    import dermt2im.cli as cli

    chosen = []
    monkeypatch.setattr(cli, "_run", lambda stages, scale=None: chosen.append(stages) or {})
    work = tmp_path / "w"
    assert runner.invoke(app, ["config", "--workdir", str(work), "--config", "tiny", "--save"]).exit_code == 0
    plain = runner.invoke(app, ["generate", "--workdir", str(work)])
    assert plain.exit_code == 0, plain.output
    assert "`dermt2im report`" in plain.output
    assert runner.invoke(app, ["generate", "--workdir", str(work), "--report"]).exit_code == 0
    assert [[s.name for s in stages] for stages in chosen] == [["generate", "quality"], ["generate", "quality", "fidelity"]]
    render, gate = chosen[0][:2]
    assert render.listeners == [gate]  # the gate measures each batch while the next renders
