"""The ``dermt2im`` command ends as Python ends a process (threads joined, atexit handlers run, output
flushed, its exit status) but without the interpreter's teardown, which took 1.4-1.6 s after every
command once torch and diffusers were imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_leaving_does_what_python_does_on_exit_but_skips_the_teardown(tmp_path):
    done = _run("""
        import atexit, threading, time
        from pathlib import Path
        from dermt2im.cli_base import leave

        class Teardown:
            def __del__(self):
                Path("teardown").write_text("ran")

        KEPT = Teardown()  # a module global: only the interpreter's teardown would delete it
        atexit.register(lambda: Path("atexit").write_text("ran"))
        def late():
            time.sleep(0.3)
            Path("thread").write_text("ran")
        threading.Thread(target=late).start()
        print("no newline yet", end="")
        leave(3)
        """, tmp_path)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "no newline yet"  # flushed
    assert (tmp_path / "thread").read_text() == "ran"  # a thread that is not a daemon was waited for
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()  # the teardown was skipped


def test_leaving_with_a_message_prints_it_and_exits_with_1(tmp_path):
    done = _run("from dermt2im.cli_base import leave; leave('error: no such workdir')", tmp_path)
    assert done.returncode == 1 and done.stderr.strip() == "error: no such workdir"
    assert _run("from dermt2im.cli_base import leave; leave(None)", tmp_path).returncode == 0


def test_the_console_command_leaves_that_way_with_the_commands_status(tmp_path):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dermt2im"] == "dermt2im.cli:main"
    ok = _run("import sys; sys.argv = ['dermt2im', '--version']; from dermt2im.cli import main; main()", tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("dermt2im ")
    bad = _run("import sys; sys.argv = ['dermt2im', 'generate', '--workdir', 'nowhere']; "
               "from dermt2im.cli import main; main()", tmp_path)
    assert bad.returncode == 2 and "no factory workdir" in bad.stderr
