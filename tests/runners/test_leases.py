"""Shard leases (claim, exclusivity, renewal, expiry takeover, release) and the worker loop in-process."""

from __future__ import annotations

import json
import threading
import time

import pytest

from dermt2im.runners import leases
from dermt2im.runners.leases import claim, lease_path, read_lease, release, renew


def test_claim_is_exclusive_and_records_who_holds_it(tmp_path):
    got = claim(tmp_path, 3, "worker-a", ttl=60)
    assert got is not None and got.owner == "worker-a" and got.shard == 3 and not got.expired()
    on_disk = json.loads(lease_path(tmp_path, 3).read_text())
    assert on_disk["token"] == got.token and on_disk["pid"] > 0 and on_disk["host"]
    assert lease_path(tmp_path, 3).name == "shard-000003.json"
    assert claim(tmp_path, 3, "worker-b", ttl=60) is None
    assert claim(tmp_path, 3, "worker-a", ttl=60) is None  # a second claim by the same owner too
    assert claim(tmp_path, 4, "worker-b", ttl=60) is not None  # other shards are free
    assert not list(tmp_path.glob(".*.tmp"))


def test_many_threads_racing_for_a_free_shard_one_wins(tmp_path):
    barrier = threading.Barrier(8)
    won = []

    def contender(i):
        barrier.wait()
        if claim(tmp_path, 0, f"w{i}", ttl=60) is not None:
            won.append(i)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and read_lease(tmp_path, 0).owner == f"w{won[0]}"


def test_renew_extends_and_release_frees_only_for_the_holder(tmp_path):
    lease = claim(tmp_path, 1, "a", ttl=0.5)
    time.sleep(0.05)
    renewed = renew(tmp_path, lease, ttl=30)
    assert renewed is not None and renewed.expires > lease.expires and renewed.token == lease.token
    assert read_lease(tmp_path, 1).expires == renewed.expires
    other = claim(tmp_path, 2, "b", ttl=30)
    assert not release(tmp_path, other.__class__(**{**other.__dict__, "shard": 1}))  # not b's lease on 1
    assert release(tmp_path, renewed) and read_lease(tmp_path, 1) is None
    assert not release(tmp_path, renewed)  # twice: nothing left to release
    assert claim(tmp_path, 1, "b", ttl=30) is not None


def test_an_expired_lease_is_taken_over_by_exactly_one_of_two_contenders(tmp_path):
    dead = claim(tmp_path, 5, "dead", ttl=0.01)
    time.sleep(0.05)
    assert read_lease(tmp_path, 5).expired()
    for attempt in range(20):  # two threads released at once, many times: never both, never neither
        if attempt:
            dead = claim(tmp_path, 5, "dead", ttl=0.01)
            time.sleep(0.03)
        barrier = threading.Barrier(2)
        won = []

        def contender(name, barrier=barrier, won=won):
            barrier.wait()
            got = claim(tmp_path, 5, name, ttl=60)
            if got is not None:
                won.append(got)

        threads = [threading.Thread(target=contender, args=(n,)) for n in ("x", "y")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, attempt
        assert read_lease(tmp_path, 5).token == won[0].token
        assert renew(tmp_path, dead) is None  # the dead holder, back to life, knows it lost the shard
        assert not release(tmp_path, dead)
        release(tmp_path, won[0])
    tombs = list((tmp_path / "expired").glob("shard-000005.*.json"))
    assert len(tombs) == 20 and {json.loads(t.read_text())["owner"] for t in tombs} == {"dead"}


def test_a_valid_lease_is_never_taken_over_and_a_corrupt_one_is(tmp_path):
    claim(tmp_path, 7, "alive", ttl=60)
    assert claim(tmp_path, 7, "thief", ttl=60) is None
    lease_path(tmp_path, 8).write_text("{not json")
    assert claim(tmp_path, 8, "b", ttl=60).owner == "b"


def test_heartbeat_keeps_a_short_lease_alive_and_releases_it(tmp_path):
    lease = claim(tmp_path, 9, "a", ttl=0.3)
    with leases.holding(tmp_path, lease) as beat:
        time.sleep(0.8)  # well past the TTL: renewed in the background
        assert not read_lease(tmp_path, 9).expired()
        assert claim(tmp_path, 9, "b", ttl=60) is None
        assert not beat.lost
    assert read_lease(tmp_path, 9) is None


def test_heartbeat_notices_a_takeover(tmp_path):
    lease = claim(tmp_path, 2, "stalled", ttl=0.2)
    beat = leases.LeaseHeartbeat(tmp_path, lease, interval=0.5)  # renews too late: expires in between
    with beat:
        time.sleep(0.3)
        assert claim(tmp_path, 2, "thief", ttl=60) is not None
        time.sleep(0.5)
    assert beat.lost and read_lease(tmp_path, 2).owner == "thief"


def test_sweep_temporaries_removes_only_old_ones(tmp_path):
    old, new = tmp_path / ".abc.1.tmp", tmp_path / ".abc.2.tmp"
    old.write_text("x")
    new.write_text("y")
    past = time.time() - 600
    import os

    os.utime(old, (past, past))
    assert leases.sweep_temporaries(tmp_path, older_than=60) == 1
    assert not old.exists() and new.exists()


# ---------------------------------------------------------------------------------------------
# the worker loop, in-process on the tiny model


@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(one_thread):
    from dermt2im.diffusion.models import build_tiny_pipeline

    return build_tiny_pipeline(0)


TINY = ["generate.per_class=4", "generate.shard_size=2", "generate.width=32", "generate.height=32",
        "generate.steps_min=2", "generate.steps_max=2", "runtime.generate.batch_size=2",
        "runtime.generate.lease_seconds=0.5"]


def _worker(workdir, cfg, owner, timeout, pipe=None):
    from dermt2im.runners.leased import run_claimed
    from tests.generate.generate_fixtures import stage

    return run_claimed(stage(workdir, cfg, pipe=pipe), workdir.leases, ttl=cfg.runtime.generate.lease_seconds,
                       owner=owner, poll_seconds=0.1, timeout=timeout)


def test_worker_takes_over_a_dead_workers_shard_and_completes_the_plan(workdir, pipe):
    from dermt2im.core.config import load_config
    from dermt2im.core.manifest import SYNTHETIC, read_manifest, write_manifest
    from tests.generate.generate_fixtures import complete, plan, render

    cfg = load_config("smoke", TINY)
    planned = plan(workdir, cfg)
    assert sorted(planned["shard"].unique()) == [0, 1, 2, 3]
    folder = workdir.leases
    # A worker died holding shard 0 after writing one PNG (never recorded) and a temporary.
    claim(folder, 0, "dead-worker", ttl=0.05)
    render(workdir, cfg, 0, pipe=pipe)
    df = read_manifest(workdir.synthetic_manifest, SYNTHETIC)

    write_manifest(df.iloc[0:0], workdir.synthetic_manifest, SYNTHETIC)  # as if killed before the upsert
    lost = df.iloc[1]
    workdir.png_path(lost["label"], lost["sample_key"]).unlink()  # one PNG never written ...
    (workdir.synthetic / lost["label"] / f".{lost['sample_key']}.png.abc.tmp").write_bytes(b"half")  # ... half
    # Another live worker holds shard 3 and finishes it only after ours has done the rest, so ours waits.
    live = claim(folder, 3, "live-worker", ttl=60)

    def finish_live():
        deadline = time.monotonic() + 60
        while not all(complete(workdir, cfg, s) for s in (0, 1, 2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        render(workdir, cfg, 3, pipe=pipe)
        release(folder, live)

    t = threading.Thread(target=finish_live)
    t.start()
    time.sleep(0.1)
    out = _worker(workdir, cfg, "me", 60, pipe)
    t.join()
    assert out["complete"] and out["done_shards"] == 4 and out["takeovers"] == 1
    assert sorted(out["shards"]) == [0, 1, 2] and out["waits"] >= 1
    final = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    assert len(final) == 8 and final["sample_key"].is_unique and set(final["sample_key"]) == set(planned["sample_key"])
    assert final["sha256"].notna().all()
    pngs = sorted(workdir.synthetic.rglob("*.png"))
    assert len(pngs) == 8 and not list(workdir.synthetic.rglob("*.tmp"))
    assert not list(folder.glob("shard-*.json"))  # every lease released

    again = _worker(workdir, cfg, "late", 5, pipe)
    assert again["complete"] and again["shards"] == [] and again["images"] == 0


def test_a_worker_with_no_plan_makes_it_under_the_lock_like_any_generate_run(workdir, pipe):
    from dermt2im.core.config import load_config
    from dermt2im.core.manifest import PLAN, read_manifest

    out = _worker(workdir, load_config("smoke", TINY), "first", 60, pipe)
    assert out["complete"] and out["planned_shards"] == 4
    assert len(read_manifest(workdir.plan_manifest, PLAN)) == 8
