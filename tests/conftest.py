"""Shared fixtures. Every test runs with Prefect and MLflow pointed at temporary folders, never
the user's home; flow tests share one session-scoped ``prefect_test_harness``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports Prefect: keep its home, database and result storage out of ~/.prefect.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="dermt2im-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION_HOME / "prefect" / "storage")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_HOME / 'mlflow.db'}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As patient as the CLI (dermt2im.core.workdir.configure_runtime): Prefect's default 20 s for its
# temporary server is too short on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_DERMOSCOPY = SHARED_DATA / "real-dermoscopy"


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread per test process: tests run under xdist on two shared cores, where tiny
    models train several times faster on one thread than with threads contending for the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def workdir(tmp_path):
    from dermt2im.core.workdir import Workdir

    return Workdir.at(tmp_path / "work")


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def stop_temporary_prefect_servers(failed_only: bool = False) -> int:
    """Stop every temporary Prefect server this process started, also one whose start timed out
    (Prefect leaves that process running until interpreter exit, which an xdist worker may never
    reach); with ``failed_only``, only those. Returns how many were stopped."""
    import sys

    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:
        return 0
    stopped = 0
    for server in list(server_module.SubprocessASGIServer._instances.values()):
        proc = getattr(server, "server_process", None)
        if proc is not None and proc.poll() is None and not (failed_only and server.running):
            server.stop()
            stopped += 1
    return stopped


@pytest.fixture(autouse=True, scope="session")
def _temporary_prefect_servers_end_with_the_session():
    yield
    stop_temporary_prefect_servers()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for all flow tests in the session, as patient as the CLI;
    stopped at the end, and at once if its start timed out."""
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        stop_temporary_prefect_servers()


@pytest.fixture(scope="session")
def real_dermoscopy() -> Path:
    """130 real CC0 ISIC images from ../shared/data; tests using this skip when it is absent."""
    if not (REAL_DERMOSCOPY / "labels.csv").is_file():
        pytest.skip(f"real dermoscopy fixture not found at {REAL_DERMOSCOPY} (../shared is absent)")
    return REAL_DERMOSCOPY


@pytest.fixture
def memory_root():
    """A unique prefix on fsspec's in-process memory filesystem, removed afterwards."""
    import uuid

    import fsspec

    root = f"memory://dermt2im-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root.split("://", 1)[1]
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole session, on 127.0.0.1 only: a head that runs nothing (as on a
    real cluster) and two worker nodes with one CPU and one declared GPU each (Ray takes the count on
    trust, so GPU scheduling is exercised without a GPU). Yields its address. Tests that use it carry
    ``pytest.mark.xdist_group("ray")`` so that one xdist worker runs them all, against this one cluster.
    Skips when Ray is not installed."""
    import importlib.util
    import secrets

    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")
    # Before Ray is imported (it reads them once): every server binds 127.0.0.1, no usage stats, a
    # token of this session (nothing written to ~/.ray). The nodes inherit this environment.
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_DISABLE_DOCKER_CPU_WARNING="1",
                      RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    from ray.cluster_utils import Cluster

    store = 100 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False,
                                                            "object_store_memory": store})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=store)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
