"""Every digest and cache key of the factory, in one scheme.

A stage unit is "done" when its output exists and was made for the unit's current key; that key is
computed here and nowhere else. The scheme (version 2):

* ``content_key(kind, *parts)``: sha256 over ``dermt2im/2``, the kind, and each part as canonical
  JSON (sorted keys; paths and other objects by ``str``), separated by 0x1f. ``kind`` names the
  recipe (``"ingest"``, ``"train"``, ...), so two recipes never collide.
* Parts are content, never locations alone: files by sha256 (``dermt2im.core.fileio``), manifests
  by ``manifest_digest`` (independent of row order and file encoding), configuration by
  ``spec_digest`` (a section's *spec* only, ``dermt2im.core.specs``: runtime settings never enter a
  key), code by ``code_digest`` (the stage's own subpackage and every project module it imports,
  followed automatically by reading the files).
* Three recipes keep their scheme-1 form because their keys are stored inside outputs:
  ``preprocess_key`` (in processed PNGs and the processed table), ``render_key`` (in every synthetic
  PNG and row) and ``seed_for_sample`` (the plan's seeds). The first two hold their stage's code
  identity since issue 21 (it replaced hand-kept version constants), so every processed seed and
  synthetic image made before is made once more.

Migration from scheme 1 (workdirs made before 2026-11-29): Prefect's cached task results are no
longer read at all (they were pickles, and a workdir is shared). On the first run each stage checks
its outputs itself: processed seeds and synthetic images are recognised by their stored keys and
kept; the LoRA key now hashes the ``train`` spec without its runtime settings, so a LoRA is trained
once more into a new ``W/lora/<run_id>/`` (the old folder is left alone); validation cells run once
more under a new comparison run.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

SCHEME = "dermt2im/2"


def _canonical(part: Any) -> bytes:
    return json.dumps(part, sort_keys=True, default=str).encode()


def content_key(kind: str, *parts: Any) -> str:
    """The key of one recipe ``kind`` over ``parts`` (see the module docstring)."""
    h = hashlib.sha256(SCHEME.encode())
    for p in (kind, *parts):
        h.update(b"\x1f")
        h.update(_canonical(p))
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 of ``obj`` as sorted-key JSON (the scheme-1 form, kept where keys are stored in outputs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def spec_digest(spec: BaseModel, *, exclude: set[str] | None = None) -> str:
    """Digest of one config section's spec (what a stage makes)."""
    return json_digest(spec.model_dump(mode="json", exclude=exclude))


def plain(v: Any) -> Any:
    """numpy scalars as Python values, so that JSON (and so keys) do not depend on the dtype."""
    return v.item() if isinstance(v, np.generic) else v


# --- code ---------------------------------------------------------------------------------------

PROJECT = "dermt2im"


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent  # the dermt2im package folder


def _module_file(module: str, root: Path) -> Path | None:
    """The source file of ``dermt2im.<...>`` under ``root`` (the package folder), without importing it."""
    parts = module.split(".")
    if parts[0] != PROJECT:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# A line that begins an import statement (lazy imports inside functions included). Only these
# statements are parsed: parsing and walking every file's whole tree cost each command half a second.
_IMPORT_LINE = re.compile(r"^[ \t]*(?:import[ \t]|from[ \t]+[\w.]+[ \t]*(?:\\[ \t]*$|import\b))", re.MULTILINE)


def _import_statements(source: str) -> Iterator[ast.stmt]:
    """The import statements of ``source``, each parsed on its own (continued over lines with
    brackets or backslashes); a match that does not parse (inside a string) is skipped."""
    lines = source.splitlines()
    starts = {source.count("\n", 0, m.start()) for m in _IMPORT_LINE.finditer(source)}
    for start in sorted(starts):
        end = start
        text = lines[start].strip()
        while end + 1 < len(lines) and (text.endswith("\\") or text.count("(") > text.count(")")):
            end += 1
            text += "\n" + lines[end].strip()
        try:
            yield from ast.parse(text).body
        except SyntaxError:
            continue


@functools.lru_cache(maxsize=1024)
def _imports_of(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    """Every module name an import statement of the file at ``path`` names (anywhere in it: lazy
    imports inside functions count too), relative imports resolved; ``from a import b`` names both
    ``a`` and ``a.b`` (``b`` may be a module). Memoised per file version."""
    source = Path(path).read_text(encoding="utf-8")
    package = list(Path(path).parent.parts)  # resolved below against the package root
    out: list[str] = []
    for node in _import_statements(source):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's own package upwards
                base = package[: len(package) - node.level + 1]
                prefix = ".".join(base[base.index(PROJECT):]) if PROJECT in base else ""
                module = ".".join(x for x in (prefix, node.module or "") if x)
            else:
                module = node.module or ""
            out.append(module)
            out += [f"{module}.{alias.name}" for alias in node.names if alias.name != "*"]
    return tuple(m for m in out if m == PROJECT or m.startswith(PROJECT + "."))


def code_files(module: str, root: Path | None = None) -> list[Path]:
    """The source files that decide what ``module``'s stage makes: its own subpackage
    (``dermt2im.ingest`` -> every file of ``dermt2im/ingest/``; a stage in a module of its own, such
    as ``dermt2im.phantoms``, is that file), plus every project module those files import, followed
    transitively (``core/imaging.py`` through ``ingest/files.py``, ...), plus the ``__init__`` files of
    the packages on the way (importing a module runs them). Found by reading the files (``ast``), so
    nothing is imported: a cached run never loads torch to learn its key. ``root`` is the dermt2im
    package folder (default: the one running)."""
    root = Path(root) if root is not None else _package_root()
    parts = module.split(".")
    own = root.joinpath(*parts[1:2]) if len(parts) > 1 else root
    start = sorted(own.rglob("*.py")) if own.is_dir() else [p for p in [_module_file(".".join(parts[:2]), root)] if p]
    if not start:
        raise ValueError(f"no source files for {module} under {root}")
    seen: dict[Path, None] = {}
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        st = path.stat()
        for name in _imports_of(str(path), st.st_size, st.st_mtime_ns):
            names = name.split(".")
            for depth in range(1, len(names) + 1):  # the packages on the way, then the module itself
                found = _module_file(".".join(names[:depth]), root)
                if found is not None and found not in seen:
                    todo.append(found)
    return sorted(seen, key=lambda p: p.relative_to(root).as_posix())


_DIGESTS: dict[tuple[str, str], tuple[tuple[tuple[Path, int, int], ...], str]] = {}


def _versions(paths: Iterable[Path]) -> tuple[tuple[Path, int, int], ...]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((p, st.st_size, st.st_mtime_ns))
    return tuple(out)


def code_digest(module: str, root: Path | None = None) -> str:
    """The code identity of a stage: sha256 over the relative path and bytes of every file
    ``code_files(module)`` lists. Every stage's key holds the digest of its own module's package
    (``code_digest(__name__)``): editing any of those files re-runs that stage, and no list of
    modules or version constant is kept by hand. Remembered in this process while none of the files
    changes (size and modification time): a new import is an edit of a file already listed."""
    root = Path(root) if root is not None else _package_root()
    module = ".".join(module.split(".")[:2])  # what code_files reads: every module of a subpackage shares it
    seen = _DIGESTS.get((module, str(root)))
    try:
        if seen is not None and _versions(p for p, _, _ in seen[0]) == seen[0]:
            return seen[1]
    except OSError:
        pass
    files = code_files(module, root)
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    digest = h.hexdigest()
    _DIGESTS[(module, str(root))] = (_versions(files), digest)
    return digest


# --- data ---------------------------------------------------------------------------------------


def frame_digest(df: pd.DataFrame, cols: list[str]) -> str:
    """Digest of the columns ``cols`` of a frame, independent of row order."""
    d = df[cols].astype(str).sort_values(cols).reset_index(drop=True)
    return hashlib.sha256(pd.util.hash_pandas_object(d, index=False).values.tobytes()).hexdigest()


def manifest_digest(path: str | Path, kind: Any, columns: list[str] | None = None) -> str:
    """Content digest of a manifest (parts included), independent of row order and file encoding."""
    from dermt2im.core.manifest import read_manifest

    df = read_manifest(path, kind)
    cols = columns or kind.columns
    df = df[cols].sort_values(list(k for k in kind.key if k in cols) or cols).reset_index(drop=True)
    h = hashlib.sha256()
    h.update(",".join(cols).encode())
    h.update(pd.util.hash_pandas_object(df.astype("string").fillna("\x00"), index=False).values.tobytes())
    return h.hexdigest()


def tree_listing(root: str | Path, *, skip: Iterable[str] = (), skip_marked: str | None = None) -> list[tuple]:
    """(relative path, size, mtime_ns) of every file below ``root``: the cheap change detector that
    make and rsync use (ingest hashes every file itself; this only decides whether to look again).
    Symbolic links are followed as ingest follows them (a linked file by its target's size and time;
    a linked folder walked once, each link listed with where it points). Folders named in ``skip``
    (relative POSIX paths), and folders holding a file named ``skip_marked``, are left out."""
    root = Path(root)
    skipped = set(skip)
    out: list[tuple] = []
    seen = {os.path.realpath(root)}
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        kept = []
        for d in dirs:
            full = os.path.join(dirpath, d)
            if (d if rel_dir == "." else f"{rel_dir}/{d}") in skipped:
                continue
            if skip_marked and os.path.isfile(os.path.join(full, skip_marked)):
                continue
            if os.path.islink(full):
                out.append((str(Path(full).relative_to(root)), -1, os.readlink(full)))
            real = os.path.realpath(full)
            if real in seen:  # a folder reached twice (a link to it, or a loop): walked once
                continue
            seen.add(real)
            kept.append(d)
        dirs[:] = kept
        for name in files:
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                out.append((str(p.relative_to(root)), -1, os.readlink(p) if p.is_symlink() else ""))
                continue
            out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return sorted(out, key=lambda row: tuple(map(str, row)))


# --- recipes whose keys live inside outputs (scheme 1, unchanged) --------------------------------


def preprocess_key(sample_id: str, spec: Mapping[str, Any], code: str) -> str:
    """Key of one processed seed: its content hash, the parameters that change the output, and the
    processing's code identity (stored in the processed PNG and in the processed table)."""
    return json_digest({"sample_id": sample_id, "params": dict(spec), "algorithm": code})


def render_key(params: Mapping[str, Any], base_identity: str, lora_sha256: str | None, code: str) -> str:
    """Key of one synthetic image: what its pixels depend on, given as ``params`` (the plan row's
    render columns), the base model's identity, the LoRA's sha256 and the generation's code identity
    (``code_digest``); stored in the PNG and row."""
    payload = {c: plain(v) for c, v in params.items()}
    payload["base_model"] = base_identity
    payload["lora_sha256"] = lora_sha256 or ""
    payload["code"] = code
    return json_digest(payload)


def seed_for_sample(base_seed: int, label: str, index: int) -> int:
    """The plan's per-image seed: sha256 of (seed, label, index) folded into 63 bits."""
    digest = hashlib.sha256(f"dermt2im:{base_seed}:{label}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


# --- models -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    from dermt2im.core.fileio import sha256_file

    return sha256_file(path)


def file_identity(path: str | Path) -> str:
    """A single-file checkpoint: its sha256 (memoised per path, size and mtime)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return f"file:{_file_sha256(str(p), st.st_size, st.st_mtime_ns)}"


def folder_identity(path: str | Path) -> str:
    """A diffusers folder: its model_index.json and the name and size of every file (hashing several
    GB of weights for every key would cost more than it protects)."""
    p = Path(path).expanduser().resolve()
    h = hashlib.sha256((p / "model_index.json").read_bytes())
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        rel = f.relative_to(p).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(f"{rel}\0{f.stat().st_size}\n".encode())
    return f"dir:{h.hexdigest()}"


def hub_identity(repo_id: str, revision: str | None) -> str:
    return f"hub:{repo_id}@{revision or 'main'}"


# --- software -----------------------------------------------------------------------------------

_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes", "numpy",
             "pillow", "dermt2im")


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def library_versions() -> dict[str, str | None]:
    """Versions of the software that made an output (recorded with every LoRA and synthetic image).
    Read from package metadata: torch is not imported for this (its CUDA version is added once
    something else has imported it)."""
    out = dict(_package_versions())
    torch = sys.modules.get("torch")
    out["cuda"] = getattr(getattr(torch, "version", None), "cuda", None) if torch is not None else None
    return out


def library_versions_json() -> str:
    return json.dumps(library_versions(), sort_keys=True)
