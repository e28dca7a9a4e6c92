"""The cyclic garbage collector paused while a process imports its libraries and loads a model.

Importing torch, diffusers and transformers and loading a Stable Diffusion pipeline makes about
600,000 objects that live as long as the process, and meanwhile the collector scans the growing heap
again and again: in a process that imports diffusers and loads the tiny test pipeline with its LoRA,
about 1,400 collections took 0.96-1.07 s of the 5.6-6.1 s it took (2-core development machine,
2026-12-07, ``gc.callbacks``, three runs); in ``dermt2im generate``, collections before its pipeline
was ready took 1.32 s, and 0.24 s with the pauses (the command's set-up, torch's first import, the
pipeline's loading; one run each, ``bench/generate.py``'s tiny model). Afterwards
the objects alive are frozen (``gc.freeze``: they move out of the collector's sight, so its later
collections no longer rescan them) and the collector resumes. What the loading left as cyclic garbage
is frozen with them: about 12,000 small objects there, which a full collection would have freed
without changing the process's resident memory. ``gc.freeze`` is what the Python documentation
advises for long-lived objects made at start-up.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Pause the cyclic collector for the block, then freeze what is alive and resume it (if it ran
    before: nested blocks leave it to the outermost)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.enable()


def first_import(module: str) -> contextlib.AbstractContextManager[None]:
    """``loading()`` for a block that may import ``module`` for the first time in this process; once it
    is imported, a plain block (freezing again would also freeze the garbage made since, such as a
    finished shard's)."""
    return loading() if module not in sys.modules else contextlib.nullcontext()
