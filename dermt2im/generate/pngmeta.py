"""What a rendered PNG says about itself: its generation parameters in tEXt chunks, in
AUTOMATIC1111's ``parameters`` form (which other tools read) and as full JSON (``dermt2im``), with
nothing about patients."""

from __future__ import annotations

import io
import json
from pathlib import Path

from dermt2im import __version__
from dermt2im.core import storage
from dermt2im.core.identity import plain

PNG_KEY = "dermt2im"
# What a rendered image's pixels depend on (besides the base model, the LoRA and the software stack).
RENDER_COLUMNS = ("label", "prompt", "negative_prompt", "sampler", "steps", "guidance_scale", "lora_scale", "seed",
                  "width", "height")
A1111_SAMPLER_NAMES = {"euler": "Euler", "euler_a": "Euler a", "plms": "PLMS", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M"}


def png_text(row: dict) -> dict[str, str]:
    """tEXt chunks: the generation parameters (A1111-style ``parameters`` and full JSON), nothing else."""
    params = (
        f"{row['prompt']}\nNegative prompt: {row['negative_prompt'] or ''}\n"
        f"Steps: {row['steps']}, Sampler: {A1111_SAMPLER_NAMES.get(row['sampler'], row['sampler'])}, "
        f"CFG scale: {row['guidance_scale']:g}, Seed: {row['seed']}, Size: {row['width']}x{row['height']}, "
        f"Model: {row['base_model']}"
    )
    if row.get("lora_sha256"):
        params += f", Lora hashes: \"dermt2im: {row['lora_sha256'][:12]}\", Lora weight: {row['lora_scale']:g}"
    params += f", Version: dermt2im {__version__}"
    meta = {c: plain(row[c]) for c in RENDER_COLUMNS}
    meta.update(
        sample_key=row["sample_key"],
        base_model=row["base_model"],
        base_revision=row.get("base_revision"),
        lora_sha256=row.get("lora_sha256"),
        render_key=row["render_key"],
        dtype=row.get("dtype"),
        library_versions=json.loads(row["library_versions"]),
    )
    return {"parameters": params, PNG_KEY: json.dumps(meta, sort_keys=True), "Software": f"dermt2im {__version__}"}


def embedded_render_key(path: Path | str) -> str | None:
    """The render key a PNG carries (local or on an image store); None when there is none."""
    try:
        from PIL import Image

        src = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
        with Image.open(src) as im:
            return json.loads(im.text.get(PNG_KEY, "{}")).get("render_key")
    except Exception:  # noqa: BLE001 - unreadable: not adoptable
        return None
