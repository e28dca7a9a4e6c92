"""`dermt2im run` on a finished workdir against the first run that made it: whole processes.

The first run makes everything (the smoke factory as a Prefect flow, its temporary server
included); every later run finds every stage up to date before it imports torch or starts a
server, says so and exits. Prints each wall time, whether a server was started, and the ratio of
the median later run to the first.

    python bench/uptodate.py                       # the smoke preset as shipped, 3 later runs
    python bench/uptodate.py --repeats 5 --set train.max_steps=10
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DERMT2IM = Path(sys.executable).with_name("dermt2im")
SERVER_LINE = "starting Prefect's temporary local server"


def run(workdir: Path, *args: str) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_"))}  # the workdir's own stores, as a user gets them
    t0 = time.perf_counter()
    proc = subprocess.run([str(DERMT2IM), "run", "--workdir", str(workdir), *args], env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"dermt2im run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="later runs on the finished workdir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a config override")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dermt2im-uptodate-") as tmp:
        workdir = Path(tmp) / "w"
        sets = [f"--set={o}" for o in args.overrides]
        first, out = run(workdir, "--config", "smoke", *sets)
        print(f"first run:  {first:7.1f} s  (server started: {SERVER_LINE in out})")
        later = []
        for i in range(args.repeats):
            seconds, out = run(workdir)
            if "nothing to do" not in out:
                sys.exit(f"run {i + 2} did not find the workdir up to date:\n{out[-3000:]}")
            later.append(seconds)
            print(f"later run {i + 1}: {seconds:6.1f} s  (server started: {SERVER_LINE in out})")
        med = statistics.median(later)
        print(f"later runs min / median / max: {min(later):.1f} / {med:.1f} / {max(later):.1f} s")
        print(f"median later run / first run: {med / first:.3f} ({100 * med / first:.1f}%)")


if __name__ == "__main__":
    main()
