"""Manifest bookkeeping: recording one batch into a synthetic manifest of ``--rows`` rows (the
paper's 3000 per class: 6000), and reading a manifest of ``--read-rows`` rows back with ``--parts``
appended parts of one batch each (what workers on an object store leave between two compactions).

* ours: ``dermt2im.core.manifest.upsert`` (vectorised merge by key) and ``read_manifest`` over a base file
  plus ``--parts`` appended parts (one merge of all parts at once);
* naive: the same merge done row by row (one slice per existing row, then a concat), once per part.
  Its output is a frame of many one-row chunks, so every further merge gets slower: the naive read
  is run on a smaller manifest to finish in minutes.

Both write and read the same Parquet files on local disk; the outputs are checked to be equal.

    python bench/manifest.py                # upsert into 6000 rows; read 1000 rows + 3 parts of 4
    python bench/manifest.py --rows 20000 --read-rows 2000 --parts 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dermt2im.core import manifest as mf
from dermt2im.core import writers  # noqa: E402
from dermt2im.core.manifest import SYNTHETIC  # noqa: E402


def rows(keys: list[str], tag: str) -> pd.DataFrame:
    n = len(keys)
    return pd.DataFrame({"sample_key": keys, "label": "benign", "index": range(n), "prompt": "a dermoscopic image",
                         "sampler": "euler", "steps": 25, "seed": range(n), "shard": 0, "status": "rendered",
                         "sha256": [f"{tag}-{k}" for k in keys], "path": [f"/w/synthetic/benign/{k}.png" for k in keys]})


def naive_merge(existing: pd.DataFrame, new_rows: pd.DataFrame) -> pd.DataFrame:
    """Row by row: what a straightforward upsert does."""
    new = mf.conform(new_rows, SYNTHETIC).to_pandas()
    if existing.empty:
        return new
    position = {k: i for i, k in enumerate(new["sample_key"])}
    old = set(existing["sample_key"])
    pieces = [new.iloc[[position[k]]] if k in position else existing.iloc[[i]]
              for i, k in enumerate(existing["sample_key"])]
    pieces.append(new.iloc[[i for i, k in enumerate(new["sample_key"]) if k not in old]])
    return pd.concat([p for p in pieces if not p.empty], ignore_index=True)


def timed(fn, repeat: int, setup=lambda: None):
    """Best wall time of ``repeat`` calls (``setup`` runs before each, untimed) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        setup()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--read-rows", type=int, default=1000)
    ap.add_argument("--parts", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    keys = [f"benign-{i:06d}" for i in range(args.rows)]
    batch = rows(keys[-args.batch // 2:] + [f"new-{i}" for i in range(args.batch - args.batch // 2)], "batch")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "synthetic.parquet"

        def fresh() -> None:
            mf.write_manifest(rows(keys, "base"), base, SYNTHETIC)

        def naive_upsert() -> pd.DataFrame:
            mf.write_manifest(naive_merge(mf.read_manifest(base, SYNTHETIC), batch), base, SYNTHETIC)
            return mf.read_manifest(base, SYNTHETIC)

        t_naive, expected = timed(naive_upsert, 1, setup=fresh)
        t_ours, got = timed(lambda: mf.upsert(base, batch, SYNTHETIC), args.repeat, setup=fresh)
        pd.testing.assert_frame_equal(got, expected)
        print(f"upsert of {len(batch)} rows into {args.rows}: ours {t_ours * 1e3:.1f} ms, "
              f"naive {t_naive * 1e3:.1f} ms -> {t_naive / t_ours:.1f}x")

        # what workers on an object store append: one part per rendered batch (here re-renders of rows in the base)
        keys = keys[:args.read_rows]
        mf.write_manifest(rows(keys, "base"), base, SYNTHETIC)
        stride = max(1, len(keys) // (args.parts * args.batch))
        parts = [rows(keys[j * args.batch * stride:(j + 1) * args.batch * stride:stride], f"part{j}")
                 for j in range(args.parts)]
        for p in parts:
            writers.append_rows(base, p, SYNTHETIC)

        def naive_read() -> pd.DataFrame:
            frame = mf._read_file(base, SYNTHETIC)
            for part in mf.pending_parts(base):
                frame = naive_merge(frame, mf._read_file(part, SYNTHETIC))
            return frame

        t_naive_read, expected = timed(naive_read, 1)
        t_read, got = timed(lambda: mf.read_manifest(base, SYNTHETIC), args.repeat)
        pd.testing.assert_frame_equal(got, expected)
        print(f"read of {len(keys)} rows + {len(parts)} parts of {args.batch}: ours {t_read * 1e3:.1f} ms, "
              f"naive {t_naive_read * 1e3:.1f} ms -> {t_naive_read / t_read:.1f}x")


if __name__ == "__main__":
    main()
