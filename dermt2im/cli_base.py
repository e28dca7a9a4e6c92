"""What every ``dermt2im`` command shares: the Typer app, the common options, one-line errors, and
the session a command opens (its workdir, its config, the workdir lock it holds until it ends)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dermt2im import __version__
from dermt2im.core.errors import DermT2imError
from dermt2im.core.workdir import CONFIG_SNAPSHOT, DEFAULTS, Workdir, workdir_lock

app = typer.Typer(
    name="dermt2im",
    help="Derm-T2IM synthetic dermoscopy data factory: ingest -> preprocess -> train -> generate -> validate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

WorkdirOpt = Annotated[Path, typer.Option("--workdir", "-w", help="factory working directory")]
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="preset name (smoke, paper) or YAML file; it becomes the workdir's config. "
                 "Default: the workdir's W/config.yaml; a fresh workdir gets the built-in defaults (the paper's)"),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config value, e.g. --set train.rank=8 (repeatable); for this "
                 "command only unless --save"),
]
SaveOpt = Annotated[bool, typer.Option("--save", help="write the --set values into W/config.yaml for later commands")]
DEFAULT_WORKDIR = Path("dermt2im-work")
LAYOUTS = "auto | isic | isic-challenge | ham10000 | folders | csv"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dermt2im {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="print the version and exit")] = None,
) -> None:
    """Derm-T2IM synthetic dermoscopy data factory: ingest -> preprocess -> train -> generate -> validate."""


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (DermT2imError, FileNotFoundError) as err:  # input or config problems: one line, no traceback
        fail(str(err))


def session(workdir: Path, config: str | None, overrides: list[str] | None, save: bool = False, *,
             fallback: str | None = None, existing: bool = True,
             check: Callable[[Any], None] | None = None, hold: str | None = "exclusive") -> tuple[Workdir, Any]:
    """The workdir and config a command runs with. Nothing is created until the inputs are checked:
    an ``existing`` workdir must already hold a config; ``check(cfg)`` checks the command's inputs.
    ``hold`` takes the workdir for the rest of the command, before its config is saved: "exclusive"
    (one run of the stages at a time), "shared" (scale-out workers) or None (commands that only read)."""
    from dermt2im import cli_session
    from dermt2im.flows.settings import (
        orchestration,  # validated with every other section, before anything is saved
    )

    root = workdir.expanduser().resolve()
    if existing and not (root / CONFIG_SNAPSHOT).is_file():
        fail(f"no factory workdir at {root} (no {CONFIG_SNAPSHOT}): start with `dermt2im ingest SOURCE "
              f"--workdir {workdir}`, or `dermt2im run`")
    resolved = guard(lambda: cli_session.resolve(root, config, overrides, save=save,
                                                  fallback=fallback or DEFAULTS))
    guard(lambda: orchestration(resolved.cfg))
    if check is not None:
        guard(lambda: check(resolved.cfg))
    if hold is not None:
        name = " ".join(["dermt2im", *sys.argv[1:2]])
        guard(lambda: take(root, name, shared=hold == "shared"))
    cli_session.setup_output()
    typer.echo(cli_session.config_line(resolved, root), err=True)
    return cli_session.start(root, resolved), resolved.cfg


# What a command holds until it ends (the workdir lock): closed by ``command`` however it ends.
RESOURCES = contextlib.ExitStack()


def take(root: Path, holder: str, *, shared: bool = False) -> None:
    """Hold the workdir lock until the command ends (``command`` releases it)."""
    RESOURCES.enter_context(workdir_lock(Workdir.at(root), holder, shared=shared))


def command(*args: Any, **kwargs: Any) -> Callable:
    """``app.command``, releasing what the command held when it returns or fails."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            finally:
                RESOURCES.close()

        return app.command(*args, **kwargs)(run)

    return register


def echo(text: str) -> None:
    typer.echo(text)


def run_command_line(main: Callable[[], Any]) -> None:
    """Run ``main`` (the Typer app) as the console command, then end the process the way Python ends
    one, but without the interpreter's teardown (``leave``)."""
    try:
        main()
        code: Any = 0
    except SystemExit as done:
        code = done.code
    leave(code)


def leave(code: Any = 0) -> None:
    """End this process with exit status ``code`` after what Python itself does first on exit (wait
    for the threads that are not daemons, and the callbacks concurrent.futures registered there; the
    atexit handlers: logging's, multiprocessing's, weakref finalizers, Prefect's and MLflow's; the
    standard streams flushed), skipping the interpreter's teardown that follows. Every file this
    project writes is closed (and renamed into place) before a command returns, so that teardown only
    frees memory, and with torch, diffusers and transformers imported it took 1.4-1.6 s on the
    2-core development machine (a process that imported diffusers, measured 2026-12-07) after
    every command, a minute's work or a second's."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message"): Python prints it and exits with 1
        print(code, file=sys.stderr)
        status = 1
    shutdown_threads = getattr(threading, "_shutdown", None)
    if shutdown_threads is not None:
        shutdown_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe (`dermt2im ... | head`) is not an error here
            stream.flush()
    os._exit(status)
