"""Test-only: with DERMT2IM_TEST_WRITE_DELAY=<seconds>, every rendered PNG write sleeps first, so a
scale-out test can kill a worker in the middle of a shard. Put this folder on PYTHONPATH of the
processes to slow down (Python imports ``sitecustomize`` at start-up); nothing in the package knows."""

import os
import time

_DELAY = float(os.environ.get("DERMT2IM_TEST_WRITE_DELAY") or 0)

if _DELAY > 0:
    from dermt2im.generate import shards

    _write = shards.write_png

    def _slow_write(target, data):
        time.sleep(_DELAY)
        return _write(target, data)

    shards.write_png = _slow_write
