"""The cyclic garbage collector paused while a process imports its libraries and loads a model, and
the libraries a rendering process never calls kept out of its imports (``without_unused_libraries``).

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


# Libraries that diffusers and its companions import whenever they are installed, and that a process
# which only renders never calls. Importing diffusers and loading the tiny pipeline with its LoRA
# (2-core development machine, 2026-12-07, medians of six interleaved runs each) took 4.2 s as
# installed, 3.4 s without bitsandbytes and 3.1 s without SciPy either (a throw-away script of the
# same steps); ``bench/render_imports.py`` (which also fuses the LoRA) in a slower hour: 5.95 s,
# 4.55 s (0.76) and 4.12 s (0.69):
# - bitsandbytes wraps its CPU kernels in torch.compile as it is imported, which brings in torch's
#   inductor; only training's 8-bit AdamW uses it.
# - diffusers imports scipy.stats with its multistep DPM scheduler, for beta sigmas that none of the
#   factory's samplers use.
RENDERING_NEVER_USES = ("bitsandbytes", "scipy")


@contextlib.contextmanager
def without_unused_libraries(names: tuple[str, ...] = RENDERING_NEVER_USES) -> Iterator[None]:
    """``names`` out of sight while a process that only renders imports diffusers and loads its
    pipeline (see ``RENDERING_NEVER_USES``).

    A ``None`` in ``sys.modules`` is Python's own way to say "not importable": ``importlib.util.find_spec``
    answers None and ``import`` raises ImportError, so the libraries that check first take the
    package as absent. Afterwards each imports as usual (training's optimizer, validation's
    statistics); only what the libraries gated on it as they were imported (diffusers' bitsandbytes
    quantization and beta-sigma schedules) stays off in this process, and rendering never asks for
    it. A library imported already is left as it is. ``sys.modules`` is the process's: while the
    block runs, no other thread of it should import these (rendering loads before anything else
    starts in its process)."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
