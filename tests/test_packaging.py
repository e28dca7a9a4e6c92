"""What `pip install` puts in a user's site-packages: the dermt2im package and nothing else at the top.

The repository keeps flows/ and tasks/ beside dermt2im/ (Prefect wiring apart from the domain); they
install as dermt2im.flows and dermt2im.tasks (pyproject.toml's package-dir), since top-level modules
named ``flows`` and ``tasks`` would clash with other projects'."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from the tracked files (a copy: nothing is built inside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (found,) = out.glob("dermt2im-*.whl")
    return found


def test_the_wheel_holds_flows_and_tasks_inside_dermt2im_and_nothing_else_at_the_top(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"dermt2im"}, sorted(tops)
    assert not any(n.startswith(("flows/", "tasks/")) for n in names)
    for module in ("flows/factory.py", "flows/settings.py", "tasks/stage.py", "tasks/artifacts.py"):
        assert f"dermt2im/{module}" in names, module
    # every folder of the package (and every preset) is in it: a new subpackage cannot be left out
    for init in sorted(ROOT.glob("dermt2im/**/__init__.py")):
        assert init.relative_to(ROOT).as_posix() in names, f"{init.parent.name} is missing from the wheel"
    for preset in sorted(ROOT.glob("dermt2im/presets/*.yaml")):
        assert preset.relative_to(ROOT).as_posix() in names
    # the miniature Stable Diffusion the smoke preset (so `make demo` after `pip install`) renders with
    assert "dermt2im/mini/mini-sd.safetensors" in names
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["dermt2im"]


def test_installing_the_wheel_adds_no_top_level_flows_or_tasks(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert installed <= {"dermt2im", "bin"}, sorted(installed)
    assert (target / "dermt2im" / "flows" / "factory.py").is_file()
    assert not (target / "flows").exists() and not (target / "tasks").exists()
    # the installed copy imports its flows under the project's name, not from a top-level module
    probe = ("import importlib.util as u, dermt2im.flows.settings as s; "
             "print(s.__file__); print(u.find_spec('flows'), u.find_spec('tasks'))")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    where, specs = out.stdout.strip().splitlines()
    assert where.startswith(str(target)) and specs == "None None"
