"""Code identity: a stage's key holds the digest of its own subpackage and of every project module it
imports, found by reading the files (no hand-kept list, no version constant, no import of torch)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dermt2im.core import identity

ROOT = Path(__file__).resolve().parents[2]


def _rel(paths) -> set[str]:
    return {p.relative_to(identity._package_root()).as_posix() for p in paths}


def test_a_stages_code_is_its_subpackage_and_what_it_imports():
    ingest = _rel(identity.code_files("dermt2im.ingest"))
    own = {p.relative_to(ROOT / "dermt2im").as_posix() for p in (ROOT / "dermt2im" / "ingest").glob("*.py")}
    assert own <= ingest
    # core/imaging.py decodes every file and decides quarantine reasons: followed through ingest/files.py
    assert {"core/imaging.py", "core/fileio.py", "core/manifest.py", "__init__.py", "core/__init__.py"} <= ingest
    assert not any(p.startswith(("train/", "generate/", "validate/")) for p in ingest), ingest
    assert _rel(identity.code_files("dermt2im.phantoms")) >= {"phantoms.py", "core/imaging.py"}
    assert "preprocess/hair.py" in _rel(identity.code_files("dermt2im.quality"))  # imported by the gate


def _copy_package(dest: Path) -> Path:
    """The package as pip installs it (flows/ and tasks/ inside it), in ``dest``."""
    pkg = dest / "dermt2im"
    shutil.copytree(ROOT / "dermt2im", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "flows", pkg / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tasks", pkg / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    return pkg


def test_the_digest_follows_the_files_it_reads(tmp_path):
    pkg = _copy_package(tmp_path / "src")
    before = identity.code_digest("dermt2im.ingest", pkg)
    assert before == identity.code_digest("dermt2im.ingest", ROOT / "dermt2im")
    with open(pkg / "train" / "loop.py", "a") as f:  # not imported by ingest
        f.write("\n# a change elsewhere\n")
    assert identity.code_digest("dermt2im.ingest", pkg) == before
    with open(pkg / "core" / "imaging.py", "a") as f:
        f.write("\n# a change to decoding\n")
    assert identity.code_digest("dermt2im.ingest", pkg) != before


def test_keys_are_computed_without_importing_torch():
    probe = ("import sys; from dermt2im.core import identity; "
             "[identity.code_digest(m) for m in ('dermt2im.ingest', 'dermt2im.preprocess', 'dermt2im.train', "
             "'dermt2im.generate', 'dermt2im.quality', 'dermt2im.validate', 'dermt2im.phantoms')]; "
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'mlflow', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_change_to_core_imaging_re_runs_ingest(tmp_path):
    """As a user would see it: `dermt2im ingest` twice is up to date; after an edit of core/imaging.py
    (in a copy of the package, which the subprocesses import instead of this checkout) it runs again."""
    from tests.ingest.ingest_fixtures import jpeg, put

    pkg = _copy_package(tmp_path / "src")
    src = tmp_path / "seeds"
    for i in range(4):
        put(src / ("benign" if i % 2 else "malignant") / f"{i}.jpg", jpeg(i, (80, 80)))
    env = {**os.environ, "PYTHONPATH": str(pkg.parent)}

    def ingest() -> str:
        proc = subprocess.run([sys.executable, "-m", "dermt2im.cli", "ingest", str(src), "--workdir",
                               str(tmp_path / "w")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    first = ingest()
    assert "4 files (4 new)" in first and "up to date" not in first
    assert "ingest seeds: up to date" in ingest()
    with open(pkg / "core" / "imaging.py", "a") as f:
        f.write("\n# decoding changed\n")
    again = ingest()
    assert "ingest seeds: up to date" not in again and "4 files (0 new)" in again


def test_imports_are_found_in_every_form_a_module_writes_them(tmp_path):
    source = tmp_path / "dermt2im" / "quality" / "example.py"
    source.parent.mkdir(parents=True)
    source.write_text('''"""A module.

It says import in prose, and from here import there, which is no statement.
"""
import os, dermt2im.core.fileio
from dermt2im.core import (
    imaging,
    manifest,  # a comment (with brackets)
)
from dermt2im.quality.checks \\
    import judge
from . import audit
from .. import phantoms as ph


def lazy():
    from dermt2im.generate import plan
    text = "import dermt2im.nothing"  # in a string, mid-line: not an import
    return plan, text
''')
    st = source.stat()
    found = set(identity._imports_of(str(source), st.st_size, st.st_mtime_ns))
    assert found == {"dermt2im.core.fileio", "dermt2im.core", "dermt2im.core.imaging", "dermt2im.core.manifest",
                     "dermt2im.quality.checks", "dermt2im.quality.checks.judge", "dermt2im.quality",
                     "dermt2im.quality.audit", "dermt2im", "dermt2im.phantoms", "dermt2im.generate",
                     "dermt2im.generate.plan"}
