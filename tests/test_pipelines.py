"""Each pipeline is defined once, every stage is built in one place, and every manifest has one writer.

The first and last are read from the source (``ast``): every call that constructs a stage, and every
call that writes a manifest kind, wherever it is outside tests."""

from __future__ import annotations

import ast
from pathlib import Path

from dermt2im import pipelines
from dermt2im.core import manifest as mf
from dermt2im.core.config import load_config
from dermt2im.core.workdir import Workdir

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("PhantomStage", "IngestStage", "PreprocessStage", "TrainStage", "GenerateStage", "QualityStage",
          "ImportStage", "FidelityStage", "ValidateStage", "SegmentationStage")
WRITES = {"write_manifest": 2, "upsert": 2, "rewrite": 1, "record_rows": 2, "append_rows": 2, "compact": 1}


def _sources() -> list[Path]:
    return sorted(p for folder in ("dermt2im", "flows", "tasks", "bench") for p in (ROOT / folder).rglob("*.py"))


def _name(node: ast.AST) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def test_every_stage_is_constructed_in_exactly_one_place_outside_tests():
    found: dict[str, list[str]] = {name: [] for name in STAGES}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            built = _name(func) if _name(func) in STAGES else (
                _name(func.value) if isinstance(func, ast.Attribute) and func.attr == "of" else "")
            if built in STAGES:
                found[built].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    for name, places in found.items():
        assert len(places) == 1 and places[0].startswith("dermt2im/pipelines.py:"), (name, places)


def test_every_manifest_kind_has_one_writing_stage():
    kinds = {name for name, value in vars(mf).items() if isinstance(value, mf.ManifestSchema)}
    assert kinds == {"SEEDS", "PROCESSED", "PLAN", "SYNTHETIC", "IMPORTED", "QUALITY", "FLAG_RATES", "FIDELITY"}
    writers: dict[str, set[str]] = {kind: set() for kind in kinds}
    for path in _sources():
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "bench" or rel.as_posix().startswith("dermt2im/core/"):
            continue  # the generic writers (their kind is a parameter) and benchmarks of them
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and _name(node.func) in WRITES:
                args = node.args
                at = WRITES[_name(node.func)]
                kind = _name(args[at]) if len(args) > at else ""
                assert kind in kinds, f"{rel}:{node.lineno} writes a manifest of no known kind ({ast.unparse(node)})"
                writers[kind].add("/".join(rel.parts[:2]) if rel.parts[0] == "dermt2im" and len(rel.parts) > 2
                                  else rel.as_posix())
    expected = {"SEEDS": {"dermt2im/ingest"}, "PROCESSED": {"dermt2im/preprocess"}, "PLAN": {"dermt2im/generate"},
                "SYNTHETIC": {"dermt2im/generate"}, "IMPORTED": {"dermt2im/generate"},
                "QUALITY": {"dermt2im/quality"}, "FLAG_RATES": {"dermt2im/quality"},
                "FIDELITY": {"dermt2im/quality"}}
    assert writers == expected
    # generate's subpackage writes two kinds through two stages: renders (GenerateStage) and imports (ImportStage)
    imports = (ROOT / "dermt2im" / "generate" / "imports.py").read_text()
    assert "IMPORTED" in imports and "SYNTHETIC" not in imports


def test_the_factory_is_its_pipelines_in_the_papers_order_and_building_it_runs_nothing(tmp_path):
    w = Workdir.at(tmp_path / "w")
    cfg = load_config("smoke")
    stages = pipelines.factory(w, cfg)
    assert [s.name for s in stages] == ["phantoms", "ingest", "preprocess", "gate-seeds", "train", "generate",
                                        "quality", "fidelity", "validate", "segmentation"]
    assert [s.name for s in pipelines.seeds(w, cfg, source=tmp_path / "src")] == ["ingest", "preprocess",
                                                                                  "gate-seeds"]
    assert [s.name for s in pipelines.generate(w, cfg, gated=False)] == ["generate"]
    assert [s.name for s in pipelines.generate(w, cfg)] == ["generate", "quality", "fidelity"]
    assert [s.name for s in pipelines.fidelity(w, cfg)] == ["fidelity"]
    assert [s.name for s in pipelines.validate(w, cfg, test_sets={"ham": tmp_path / "ham"})] == [
        "ingest", "preprocess", "validate", "segmentation"]
    assert [p.name for p in w.root.rglob("*") if p.is_file()] == [".dermt2im-workdir"]  # no file made
