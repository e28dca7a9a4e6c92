"""A real Prefect server (``prefect server start``) and process workers for end-to-end tests.

Unlike ``prefect_test_harness``, this runs the server's background services, the scheduler
included, with the scheduler's loops shortened so that a new deployment's runs appear within a
second or two. Everything binds to 127.0.0.1 and lives under one temporary folder.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

FAST_SCHEDULER = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    # The loop that schedules new or updated deployments: the one a freshly deployed schedule waits for.
    "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
    # Fewer services competing for two cores and the SQLite lock.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
}
FAST_WORKER = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "10"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_cli() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "prefect"]


@dataclass
class Server:
    api_url: str
    home: Path
    env: dict[str, str]  # what a client of this server (CLI, worker) runs with
    log: Path

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run([*prefect_cli(), *args], env=self.env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=30)

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if needle in line]


def _stop(proc: subprocess.Popen, grace: float = 20) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the server / worker and the processes it started
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextmanager
def prefect_server(root: Path, extra_env: dict[str, str] | None = None, startup_s: float = 180) -> Iterator[Server]:
    """``prefect server start`` on a free loopback port with its SQLite database under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env = {**base, "PREFECT_HOME": str(root / "home"), "PREFECT_API_URL": api, "PREFECT_LOGGING_LEVEL": "INFO",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(extra_env or {})}
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*prefect_cli(), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env={**env, **FAST_SCHEDULER,
                 "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}"},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Prefect server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Server(api, root / "home", env, log)
    finally:
        _stop(proc)


@contextmanager
def process_worker(server: Server, pool: str, cwd: Path, args: Sequence[str] = (),
                   extra_env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``prefect worker start --pool POOL --type process`` polling every second; stopped on exit."""
    log = cwd / f"worker-{pool}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*prefect_cli(), "worker", "start", "--pool", pool, "--type", "process", *args],
                                env={**server.env, **FAST_WORKER, **(extra_env or {})}, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        _stop(proc)
