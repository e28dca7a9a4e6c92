"""What a CLI command runs with: its workdir's config (where it came from, and whether
``W/config.yaml`` changes), its log output and its progress display.

Which config a command uses is ``dermt2im.core.workdir.resolve_config``'s to say (the flows ask the
same resolver), in order:

1. ``--config NAME|FILE``: that preset or file (``--set`` on top); it becomes the workdir's config.
2. the workdir's saved ``W/config.yaml`` (``--set`` on top, for this command only unless ``--save``).
3. a fresh workdir: the built-in defaults, which are the paper's settings; the phantom demo
   (``dermt2im run`` without SOURCE) uses the ``smoke`` preset instead.

``W/config.yaml`` is written when a workdir gets its first config, when ``--config`` names one, or
with ``--save``; every command prints one line saying which config it uses and what changed.
Nothing is written, not even the workdir folder, until the command has checked its inputs:
resolving a config here has no side effects, ``start`` has them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from dermt2im.core.errors import DermT2imError
from dermt2im.core.workdir import (
    CONFIG_SNAPSHOT,
    ResolvedConfig,
    Workdir,
    configure_runtime,
    resolve_config,
    save_config,
)

resolve = resolve_config  # the one resolver of the project (dermt2im.core.workdir), as commands call it


def changes(before: dict[str, Any] | None, after: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every value that differs between two config dicts."""
    if before is None:
        return []
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def config_line(resolved: ResolvedConfig, root: Path) -> str:
    """The line a command prints about its config."""
    if not resolved.write:
        return f"config: {resolved.origin}"
    if resolved.before is None:
        return f"config: {resolved.origin}; saved as {root / CONFIG_SNAPSHOT}"
    changed = changes(resolved.before, resolved.cfg.model_dump(mode="json", by_alias=True))
    if not changed:
        return f"config: {resolved.origin}; {root / CONFIG_SNAPSHOT} unchanged"
    shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
    return f"config: {resolved.origin}; {root / CONFIG_SNAPSHOT} CHANGED (later commands use it): {shown}"


def start(root: Path, resolved: ResolvedConfig) -> Workdir:
    """Create the workdir, save its config if it changed, and point Prefect and MLflow at it."""
    w = Workdir.at(root)
    configure_runtime(w)
    return save_config(w, resolved)


def setup_output() -> None:
    """Logging and progress for a terminal: rich bars and log lines on an interactive one, plain
    timestamped log lines (progress every few seconds) when the output is a file or a pipe."""
    from dermt2im.core import progress
    from dermt2im.core.quiet import quiet_libraries

    quiet_libraries()
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        from dermt2im.progress_bar import RichReporter

        console = Console(stderr=True)
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", force=True,
                            handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)])
        progress.use(RichReporter(console))
    else:
        logging.basicConfig(level=logging.INFO, format=fmt, force=True)
        progress.use(progress.LogReporter())
    quiet_libraries()  # basicConfig(force=True) leaves logger levels alone; this keeps the chatty ones down


def format_result(result: Any, indent: int = 2) -> str:
    """A flow's result (nested dicts) as indented ``key: value`` lines."""
    lines = []
    if isinstance(result, dict):
        for k, v in result.items():
            if isinstance(v, dict):
                lines.append(" " * indent + f"{k}:")
                lines.append(format_result(v, indent + 2))
            else:
                lines.append(" " * indent + f"{k}: {v}")
    return "\n".join(lines)


class PrefectServerUnstartable(DermT2imError, RuntimeError):
    pass


def start_prefect_server(echo: Any, attempts: int = 3) -> None:
    """Start Prefect's temporary local server before the flow needs it, saying so, and try again
    (twice as patiently) when a busy machine makes it miss its start-up timeout; a server that
    timed out is stopped first, so no half-started one is left behind. A configured
    PREFECT_API_URL (a real server) needs none of this."""
    import os

    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api.server import SubprocessASGIServer

    timeout = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 120)
    for attempt in range(1, attempts + 1):
        echo(f"starting Prefect's temporary local server (waiting up to {timeout} s) ...")
        server = SubprocessASGIServer()
        try:
            server.start(timeout=timeout)
            return
        except RuntimeError as err:
            if "Timed out" not in str(err):
                raise
            server.stop()
            echo(f"  it did not answer within {timeout} s (a busy machine?)" + ("; trying again" if attempt < attempts else ""))
            timeout *= 2
    raise PrefectServerUnstartable(
        f"Prefect's temporary server did not start in {attempts} attempts. Start one yourself "
        "(`prefect server start --host 127.0.0.1`) and set PREFECT_API_URL=http://127.0.0.1:4200/api"
    )


def where_results_are(w: Workdir, cfg: Any) -> str:
    """Where a finished factory's results are, in lines a person can follow (what ``dermt2im run``
    prints when nothing is left to do). Names files only: no store is opened."""
    from dermt2im.core.tracking import sqlite_artifact_root, tracking_uri

    reports = w.reports
    found = [(what, path) for what, path in (
        ("Table IV", reports / "table_iv.md"), ("verdict", reports / "verdict.txt"), ("Fig. 10", reports / "fig10.png"),
        ("quality gate and shortcut audit", reports / "quality.md"), ("memorisation audit", reports / "audit" / "audit.md"),
        ("class x sampler grids", reports / "grids"), ("segmentation check", reports / "segmentation.md"),
        *((f"hair removal ({p.stem.removeprefix('preprocess-')})", p) for p in sorted(reports.glob("preprocess-*.md"))))
        if path.exists()]
    lines = ["results:"] + [f"  {what}: {path}" for what, path in found]
    lines += [f"  manifests: {w.manifests}", f"  LoRA runs: {w.lora}"]
    verdict = reports / "verdict.txt"
    if verdict.is_file():
        head = verdict.read_text().strip().splitlines()
        if head:
            lines.append(f"  {head[0]}")
    uri = tracking_uri(w, cfg.tracking)
    artifacts = sqlite_artifact_root(uri)
    serve = f" --artifacts-destination {artifacts}" if artifacts else ""
    lines.append(f"  MLflow: mlflow ui --backend-store-uri {uri}{serve} --host 127.0.0.1")
    return "\n".join(lines)
