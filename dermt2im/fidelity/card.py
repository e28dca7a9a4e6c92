"""The dataset card ``dermt2im export`` writes beside ``metadata.csv``: a Hugging Face ``README.md``
with YAML metadata.

It says what the images are and are not; how many there are per class, source, sampler,
transformation and skin-tone category; what the quality gate and the memorisation audit decided; the
fidelity table against the real floor and the noise ceiling; what made each source's images (the
factory's: base model and its licence, the LoRA's sha256 and settings; an imported set: the generator,
model and hash its metadata stated); and the terms that follow from the licences: the seeds' as
recorded at ingest (``dermt2im.ingest.licences``), the base model's (Stable Diffusion 1.x comes under
the CreativeML OpenRAIL-M licence, whose use restrictions bind any use of its outputs' model and
derivatives, and forbid medical advice and the interpretation of medical results), and each imported
set's own. Any CC BY-NC seed makes the factory's set non-commercial; an unknown licence leaves the
terms open, and the card says so.

``card`` is pure: every input comes from the caller (``dermt2im.export``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from dermt2im.ingest.licences import HF_IDS, OTHER, UNKNOWN, Terms, licence_id, terms

OWN = "dermt2im"
OPENRAIL = "creativeml-openrail-m"
OPENRAIL_LINK = "https://huggingface.co/spaces/CompVis/stable-diffusion-license"
_SD1 = re.compile(r"stable-diffusion-v1|compvis/stable-diffusion|sd-?v?1[-._]?[45]\b|v1-5-pruned|v1-4", re.IGNORECASE)

# CreativeML OpenRAIL-M (dated 22 August 2022), Attachment A, in short: the Model and its derivatives
# (a LoRA fine-tune is one) may not be used
OPENRAIL_RESTRICTIONS: tuple[str, ...] = (
    "in breach of any applicable law or regulation",
    "to exploit or harm minors",
    "to generate or spread verifiably false information meant to harm others",
    "to generate or spread personal identifiable information that can harm an individual",
    "to defame, disparage or harass others",
    "for fully automated decisions that adversely affect a person's legal rights or create binding obligations",
    "to discriminate against or harm people based on social behaviour or personal or personality characteristics",
    "to exploit the vulnerabilities of a group (age, social, physical or mental characteristics) so as to cause harm",
    "to discriminate against people based on legally protected characteristics",
    "**to provide medical advice or to interpret medical results**",
    "for the administration of justice, law enforcement, immigration or asylum processes (e.g. predicting crime)",
)


@dataclass(frozen=True)
class BaseModelLicence:
    hf_id: str
    name: str
    link: str = ""
    restrictions: tuple[str, ...] = ()
    how: str = ""  # how it was found


def base_model_licence(base_model: str, configured: str | None = None) -> BaseModelLicence:
    """The licence of the base model a row names (its identity) or the config names (hub id, folder)."""
    text = f"{base_model or ''} {configured or ''}"
    if str(base_model or "").startswith("tiny@") or (configured == "tiny"):
        return BaseModelLicence("apache-2.0", "Apache-2.0 (derm-t2im's own tiny model, random weights, built from "
                                "config)", how="the tiny test model")
    if _is_mini(configured):
        return BaseModelLicence("apache-2.0", "Apache-2.0 (derm-t2im's own miniature Stable Diffusion, pre-trained "
                                "from random weights on the project's phantoms)", how="the miniature model")
    if _SD1.search(text):
        return BaseModelLicence(OPENRAIL, "CreativeML OpenRAIL-M", OPENRAIL_LINK, OPENRAIL_RESTRICTIONS,
                                "Stable Diffusion 1.x, by its name")
    if configured:
        p = Path(configured).expanduser()
        folder = p if p.is_dir() else p.parent if p.is_file() else None
        found = _folder_model_licence(folder) if folder else None
        if found:
            return found
    return BaseModelLicence(UNKNOWN, "unknown (check the base model's own licence)", how="not recognised")


def _is_mini(configured: str | None) -> bool:
    """``train.base_model: mini``, or a file ``dermt2im pretrain-mini`` made (its header says so)."""
    from dermt2im.mini.weights import MINI, is_mini_file

    if not configured:
        return False
    return configured == MINI or (str(configured).lower().endswith(".safetensors") and is_mini_file(configured))


def _folder_model_licence(folder: Path) -> BaseModelLicence | None:
    readme = folder / "README.md"
    if readme.is_file():
        m = re.match(r"---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
        meta = yaml.safe_load(m.group(1)) if m else None
        lic = meta.get("license") if isinstance(meta, dict) else None
        if isinstance(lic, str) and lic:
            restrictions = OPENRAIL_RESTRICTIONS if lic.lower() == OPENRAIL else ()
            return BaseModelLicence(lic.lower(), lic, "", restrictions, f"{readme} (YAML license)")
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        f = folder / name
        if f.is_file():
            text = f.read_text(errors="replace")[:20_000]
            if "openrail" in text.lower().replace(" ", ""):
                return BaseModelLicence(OPENRAIL, "CreativeML OpenRAIL-M", OPENRAIL_LINK, OPENRAIL_RESTRICTIONS, str(f))
            lid = licence_id(text)
            return BaseModelLicence(HF_IDS.get(lid, OTHER), lid, "", (), str(f))
    return None


@dataclass(frozen=True)
class CardInputs:
    name: str
    rows: pd.DataFrame  # the exported rows (metadata.csv's columns, plus the gate's)
    assessed: pd.DataFrame  # every assessed synthetic row (status, reason, memorised, source)
    seeds: pd.DataFrame  # the accepted seeds (license, license_note, attribution, label, dataset)
    fidelity: pd.DataFrame | None  # the fidelity table (reports/fidelity.csv), or None
    base_model: str | None  # train.base_model of the config (hub id, folder, file, tiny, mini)
    include_rejected: bool = False


def _counts(df: pd.DataFrame, column: str) -> list[str]:
    if column not in df or df[column].isna().all():
        return []
    values = df[column].fillna("(not recorded)").astype(str).replace("", "(none)")
    return [f"| {column} | {k} | {v} |" for k, v in values.value_counts().sort_index().items()]


def _size_category(n: int) -> str:
    return "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000 else "100K<n<1M"


def _hf(licence: str) -> str:
    return HF_IDS.get(licence, licence if licence in (UNKNOWN, OTHER) else OTHER)


def _seed_terms(seeds: pd.DataFrame) -> Terms:
    return terms(seeds["license"] if "license" in seeds else [UNKNOWN] * len(seeds))


def licences(inputs: CardInputs) -> tuple[list[str], list[str]]:
    """(the card's `license` ids, the sentences of its terms section)."""
    ids: list[str] = []
    lines: list[str] = []
    rows = inputs.rows
    sources = sorted(rows["source"].fillna(OWN).unique()) if len(rows) else []
    if OWN in sources:
        t = _seed_terms(inputs.seeds)
        ids.append(t.hf_licence)
        own = rows[rows["source"].fillna(OWN) == OWN]
        models = sorted({str(b) for b in own["base_model"].dropna()}) or [""]
        base = base_model_licence(models[0], inputs.base_model)
        if base.hf_id not in ids:
            ids.append(base.hf_id)
        lines += ["### Images made by this factory (source `dermt2im`)", "", *[f"- {s}" for s in t.sentences()]]
        lines += [f"- Base model: `{inputs.base_model or models[0]}` under **{base.name}**"
                  + (f" ({base.link})" if base.link else "") + (f"; found as {base.how}" if base.how else "") + "."]
        if base.restrictions:
            lines += ["- Its use restrictions bind the model and its derivatives (the LoRA that made these images "
                      "is one) and every use of them: they may not be used "
                      + "; ".join(base.restrictions) + ". The licensor claims no rights in the images generated, "
                      "but their use may not contravene these restrictions."]
        attributions = _attributions(inputs.seeds)
        if attributions:
            lines += ["- Attribution owed for the seed images (as recorded at ingest): "
                      + "; ".join(attributions[:50]) + (" ..." if len(attributions) > 50 else "") + "."]
        verdict = []
        if t.non_commercial:
            verdict.append("**non-commercial use only** (a CC BY-NC seed)")
        if t.open_questions:
            verdict.append("**terms open**: some seed licences are unknown")
        if base.restrictions:
            verdict.append("the base model's use restrictions apply")
        if not verdict:
            verdict.append("no restriction beyond the base model's licence")
        lines += [f"- **Resulting terms: {'; '.join(verdict)}.**", ""]
    for source in (s for s in sources if s != OWN):
        mine = rows[rows["source"] == source]
        t = terms(mine["license"] if "license" in mine else [UNKNOWN] * len(mine))
        ids.append(t.hf_licence)
        notes = sorted({str(n) for n in mine.get("license_note", pd.Series(dtype=str)).dropna()})
        lines += [f"### Imported set `{source}`", "",
                  "- Brought with `dermt2im import-synthetic`; its licence as its own source states it: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(t.counts.items())) + " image(s)"
                  + (f" ({'; '.join(notes[:3])})" if notes else "") + ".",
                  "- Its terms are its own (this factory made none of its images); "
                  + ("they are unknown: check with whoever made the set before redistributing it." if t.open_questions
                     else "see its licence."), ""]
    unique = list(dict.fromkeys(ids)) or [UNKNOWN]
    return unique, lines


def _attributions(seeds: pd.DataFrame) -> list[str]:
    if "attribution" not in seeds:
        return []
    by = seeds[seeds["license"].astype(str).str.startswith("CC-BY")] if "license" in seeds else seeds
    return sorted({str(a) for a in by["attribution"].dropna() if str(a).strip()})


def _provenance(inputs: CardInputs) -> list[str]:
    rows = inputs.rows
    out = []
    for source, g in rows.assign(source=rows["source"].fillna(OWN)).groupby("source", sort=True):
        def values(column: str) -> str:
            if column not in g:
                return "–"
            v = sorted({str(x) for x in g[column].dropna() if str(x) != ""})
            return ", ".join(v[:6]) + (" ..." if len(v) > 6 else "") if v else "–"

        if source == OWN:
            out += [f"- `{OWN}` (this factory): base model `{values('base_model')}` (revision {values('base_revision')}); "
                    f"LoRA sha256 {values('lora_sha256')}; LoRA scale {values('lora_scale')}; samplers "
                    f"{values('sampler')}; steps {values('steps')}; CFG {values('guidance_scale')}. Every image is "
                    "reproducible from its row of metadata.csv (prompt, negative prompt, sampler, steps, CFG, seed)."]
        else:
            out += [f"- `{source}` (imported): generator {values('generator')}; model {values('base_model')} (hash "
                    f"{values('model_hash')}), as the files' own metadata stated; samplers {values('sampler')}."]
    return out


def _gate(inputs: CardInputs) -> list[str]:
    a = inputs.assessed
    if a.empty:
        return ["No gate decisions recorded."]
    from dermt2im.quality.checks import reason_code

    a = a.assign(source=a["source"].fillna(OWN), code=[reason_code(r) or "accepted" for r in a["reason"]])
    out = ["| source | assessed | accepted | rejected, by reason | near-copies of seeds (audit) |", "|---|---|---|---|---|"]
    for source, g in a[a["status"].isin(["accepted", "rejected"])].groupby("source", sort=True):
        rejected = g[g["status"] == "rejected"]["code"].value_counts()
        reasons = ", ".join(f"{k} {v}" for k, v in rejected.items()) or "none"
        out.append(f"| {source} | {len(g)} | {int((g['status'] == 'accepted').sum())} | {reasons} | "
                   f"{int(g['memorised'].fillna(False).astype(bool).sum())} |")
    return out


def _fidelity(inputs: CardInputs) -> list[str]:
    from dermt2im.fidelity.text import md_table

    tab = inputs.fidelity
    if tab is None or tab.empty:
        return ["No fidelity report was available for this set (run `dermt2im report`)."]
    emb = next((c.split(".", 1)[1] for c in tab.columns if c.startswith("kid.") and c.count(".") == 1), None)
    metrics = [m for m in ("frd", f"kid.{emb}", f"precision.{emb}", f"recall.{emb}", f"coverage.{emb}",
                           "typicality.median", "ita.median") if m in tab]
    out = ["Against the training seeds; the floor is held-out real images, the ceiling the noise of a random-weight "
           "model (lower FRD / KID, higher precision / recall / coverage are closer to real). Value [95 % bootstrap "
           "interval], images (reference images).", "", "All images:", "", md_table(tab[tab["stratum"] == "all"], metrics)]
    per_class = tab[tab["stratum"] == "label"]
    if len(per_class):
        out += ["Per class:", "", md_table(per_class, metrics, by_value=True)]
    return out


def card(inputs: CardInputs) -> str:
    """The README.md (YAML metadata, then the card)."""
    rows = inputs.rows
    ids, terms_lines = licences(inputs)
    seeds_phantom = bool(len(inputs.seeds)) and inputs.seeds.get("source_path", pd.Series(dtype=str)).astype(str).str.contains(
        "/phantoms-seed-").all()
    meta = {
        "pretty_name": inputs.name,
        "license": ids[0] if len(ids) == 1 else ids,
        "task_categories": ["image-classification"],
        "tags": ["synthetic", "dermoscopy", "skin-lesion", "medical", "stable-diffusion", "derm-t2im"],
        "size_categories": [_size_category(len(rows))],
        "annotations_creators": ["machine-generated"],
        "source_datasets": sorted({str(d) for d in inputs.seeds.get("dataset", pd.Series(dtype=str)).dropna()}) or None,
    }
    if OTHER in ids:
        meta["license_name"] = "other: see the Licences and terms section"
    meta = {k: v for k, v in meta.items() if v is not None}
    counts = ["| by | value | images |", "|---|---|---|"]
    for column in ("label", "source", "sampler", "transformation", "skin_tone"):
        counts += _counts(rows, column)
    what = [
        f"**{len(rows)} synthetic dermoscopy-like images** in two classes ("
        + ", ".join(f"{k} {v}" for k, v in rows["label"].value_counts().sort_index().items())
        + "), made by text-to-image diffusion (derm-t2im: a DreamBooth-LoRA fine-tune of Stable Diffusion on a few "
        "real seed images, after Farooq et al.) or brought in from elsewhere (imported sets).",
        "",
        "What they are **not**: photographs of patients; diagnoses (a label is the class the prompt asked for, not a "
        "histopathological finding); a substitute for real images in clinical validation; fit for medical advice or "
        "the interpretation of medical results (which the base model's licence forbids).",
        "",
        "Every image passed an automatic quality gate (broken images, faces, text; rulers, ink, frames, hair and "
        "atypical images are flagged) and a memorisation audit against every seed image"
        + (" (rejected images are included, with their reason: `status`, `reason`)." if inputs.include_rejected
           else "; rejected images and near-copies of seeds are left out."),
    ]
    if seeds_phantom:
        what += ["", "**The seed images were procedural phantoms, not real dermoscopy**: this set tests the "
                 "machinery, not the science."]
    body = [f"# {inputs.name}", "", *what, "", "## Counts", "", *counts, "",
            "Skin tone: the ITA of the skin around the lesion (Chardon / Del Bino categories), measured by the gate.", "",
            "## Provenance", "", *_provenance(inputs), "",
            "## Quality gate and memorisation audit", "", *_gate(inputs), "",
            "## Fidelity", "", *_fidelity(inputs), "",
            "## Licences and terms", "", *terms_lines,
            "## Files", "",
            "`<label>/<sample_key>.<ext>` and `metadata.csv` (Hugging Face imagefolder: "
            "`datasets.load_dataset(\"imagefolder\", data_dir=...)`); `metadata.csv` holds, per image, the class, its "
            "source, every generation parameter, the gate's status and reason, the nearest seed's distance, the "
            "skin tone (`ita`, `skin_tone`), the typicality, and for imported sets their licence.", ""]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    return f"---\n{front}\n---\n\n" + "\n".join(body)


def fidelity_table(path: str | Path | None) -> pd.DataFrame | None:
    p = Path(path) if path else None
    if p is None or not p.is_file():
        return None
    tab = pd.read_csv(p, keep_default_na=False, na_values=[""])
    return tab if len(tab) else None

