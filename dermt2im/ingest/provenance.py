"""Provenance: does an image file say it was generated, and by what, with which parameters?

Read from the file's bytes, without decoding pixels (pure: bytes -> ``Generation`` or None):

* this project's own PNG chunk (``dermt2im``, JSON: ``dermt2im.generate.pngmeta``);
* AUTOMATIC1111 / Forge / SD.Next: the PNG ``parameters`` chunk, or the EXIF ``UserComment`` of a
  JPEG / WebP (``prompt``, ``Negative prompt: ...``, ``Steps: 20, Sampler: Euler a, ...``);
* ComfyUI: the PNG ``prompt`` (API graph) and ``workflow`` chunks;
* InvokeAI: ``invokeai_metadata`` / ``invokeai_graph``, and the older ``sd-metadata`` / ``Dream``;
* NovelAI: ``Software: NovelAI`` with its ``Comment`` JSON;
* IPTC ``DigitalSourceType`` = trainedAlgorithmicMedia (and the other generated-media codes), as
  XMP or in a C2PA manifest, anywhere in the file;
* EXIF ``Software`` or XMP ``CreatorTool`` / ``Software`` naming a known image generator.

``describe`` turns what was found into the quarantine reason's tail ("AUTOMATIC1111, Steps 20,
Euler a, model hash 6ce0161689"). Nothing here raises on odd metadata: a malformed chunk just says
less.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TEXT = 1 << 20  # a metadata text longer than 1 MiB is cut there (and a compressed one never inflates further)
OWN_CHUNK = "dermt2im"
# IPTC NewsCodes for media made by a generative model (https://cv.iptc.org/newscodes/digitalsourcetype/)
GENERATED_SOURCE_TYPES = ("trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia", "algorithmicMedia",
                          "compositeSynthetic")
_SOURCE_TYPE = re.compile(rb"digitalsourcetype/(" + b"|".join(t.encode() for t in GENERATED_SOURCE_TYPES) + rb")\b",
                          re.IGNORECASE)
# Software / CreatorTool values that name an image generator (matched case-insensitively as words)
GENERATOR_SOFTWARE = ("dermt2im", "stable diffusion", "automatic1111", "comfyui", "invokeai", "novelai", "midjourney",
                      "dall-e", "dall·e", "firefly", "fooocus", "sd.next", "draw things", "diffusionbee", "leonardo.ai",
                      "diffusers", "nightcafe", "dreamstudio")
_A1111_PARAM = re.compile(r'\s*([\w][\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@dataclass(frozen=True)
class Generation:
    """What an image's metadata says about how it was generated."""

    generator: str  # "AUTOMATIC1111", "ComfyUI", "dermt2im", "XMP DigitalSourceType", ...
    prompt: str | None = None
    negative_prompt: str | None = None
    sampler: str | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None
    model: str | None = None
    model_hash: str | None = None
    width: int | None = None
    height: int | None = None
    raw: str = ""  # the metadata text it was read from
    extra: dict[str, str] = field(default_factory=dict)  # other named facts (sample key, source type, ...)

    def describe(self) -> str:
        """The generator and its key parameters in one line."""
        parts = [self.generator]
        parts += [f"{k} {v}" for k, v in self.extra.items()]
        if self.steps is not None:
            parts.append(f"Steps {self.steps}")
        if self.sampler:
            parts.append(self.sampler)
        if self.cfg is not None:
            parts.append(f"CFG {self.cfg:g}")
        if self.model_hash:
            parts.append(f"model hash {self.model_hash}")
        elif self.model:
            parts.append(f"model {self.model}")
        return ", ".join(parts)


# --------------------------------------------------------------------------- reading the containers


def png_text_chunks(data: bytes) -> dict[str, str]:
    """Every tEXt / zTXt / iTXt chunk of a PNG (before or after the pixels), key -> text."""
    out: dict[str, str] = {}
    if not data.startswith(PNG_SIGNATURE):
        return out
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IEND" or len(body) < length:
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            parsed = _text_chunk(kind, body)
            if parsed is not None:
                out.setdefault(*parsed)
    return out


def _inflate(blob: bytes) -> bytes:
    try:
        return zlib.decompressobj().decompress(blob, MAX_TEXT)
    except zlib.error:
        return b""


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str] | None:
    key, sep, rest = body.partition(b"\x00")
    if not sep:
        return None
    name = key.decode("latin-1")
    if kind == b"tEXt":
        return name, rest[:MAX_TEXT].decode("latin-1")
    if kind == b"zTXt":
        return name, _inflate(rest[1:]).decode("latin-1")
    if len(rest) < 2:  # iTXt: compression flag, method, language\0, translated keyword\0, text
        return None
    compressed, rest = rest[0], rest[2:]
    _lang, _, rest = rest.partition(b"\x00")
    _translated, _, text = rest.partition(b"\x00")
    text = _inflate(text) if compressed else text[:MAX_TEXT]
    return name, text.decode("utf-8", errors="replace")


def _user_comment(raw: Any) -> str:
    """EXIF UserComment: an 8-byte character-code header, then the text (A1111 writes UTF-16)."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):
        return ""
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        for codec in ("utf-16-be", "utf-16-le"):
            text = body.decode(codec, errors="replace")
            if text.isprintable() or "\n" in text:
                return text
        return body.decode("utf-16-be", errors="replace")
    return (body if head.rstrip(b"\x00").isalpha() else raw).decode("utf-8", errors="replace")


def exif_texts(data: bytes) -> dict[str, str]:
    """Software, ImageDescription, UserComment and a JPEG comment, where Pillow can read them."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            exif = img.getexif()
            out = {"Software": exif.get(0x0131), "ImageDescription": exif.get(0x010E),
                   "UserComment": _user_comment(exif.get_ifd(0x8769).get(0x9286)), "comment": img.info.get("comment")}
    except Exception:  # noqa: BLE001 - unreadable or not an image: the decode step names that problem
        return {}
    return {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))[:MAX_TEXT]
            for k, v in out.items() if v}


# --------------------------------------------------------------------------- parsers per generator


def _int(v: Any) -> int | None:
    try:
        return int(float(str(v).strip()))
    except (TypeError, ValueError):
        return None


def _float(v: Any) -> float | None:
    try:
        return float(str(v).strip())
    except (TypeError, ValueError):
        return None


def _size(text: Any) -> tuple[int | None, int | None]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text or ""))
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def parse_a1111(text: str, generator: str = "AUTOMATIC1111") -> Generation | None:
    """The ``parameters`` text of AUTOMATIC1111 (and Forge, SD.Next, Fooocus in A1111 mode):
    prompt lines, an optional ``Negative prompt:`` block, then ``Steps: 20, Sampler: ..., ...``."""
    lines = text.strip().split("\n")
    if not lines or "Steps:" not in lines[-1]:
        return None
    settings = dict((k.strip(), v.strip().strip('"')) for k, v in _A1111_PARAM.findall(lines[-1]))
    prompt, negative, target = [], [], None
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            target = negative
            line = line[len("Negative prompt:") :].strip()
        (negative if target is negative else prompt).append(line)
    width, height = _size(settings.get("Size"))
    version = settings.get("Version", "")
    if version.startswith("f") and generator == "AUTOMATIC1111":  # Forge writes "Version: f2.0.1v1.10.1-..."
        generator = "Stable Diffusion WebUI Forge"
    return Generation(
        generator, prompt="\n".join(prompt).strip() or None, negative_prompt="\n".join(negative).strip() or None,
        sampler=settings.get("Sampler"), steps=_int(settings.get("Steps")), cfg=_float(settings.get("CFG scale")),
        seed=_int(settings.get("Seed")), model=settings.get("Model"), model_hash=settings.get("Model hash"),
        width=width, height=height, raw=text)


def parse_own(text: str) -> Generation:
    """This project's ``dermt2im`` chunk (JSON, ``dermt2im.generate.pngmeta.png_text``)."""
    try:
        meta = json.loads(text)
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    extra = {"sample": str(meta["sample_key"])} if meta.get("sample_key") else {}
    return Generation("dermt2im (this factory's own render)", prompt=meta.get("prompt"),
                      negative_prompt=meta.get("negative_prompt"), sampler=meta.get("sampler"),
                      steps=_int(meta.get("steps")), cfg=_float(meta.get("guidance_scale")), seed=_int(meta.get("seed")),
                      model=meta.get("base_model"), width=_int(meta.get("width")), height=_int(meta.get("height")),
                      raw=text, extra=extra)


def _comfy_text(graph: Mapping[str, Any], link: Any) -> str | None:
    """The text of the CLIPTextEncode-like node a KSampler input links to ([node id, output])."""
    if isinstance(link, list) and link:
        node = graph.get(str(link[0]))
        if isinstance(node, dict):
            text = node.get("inputs", {}).get("text")
            return text if isinstance(text, str) else None
    return None


def parse_comfyui(prompt: str | None, workflow: str | None) -> Generation:
    """ComfyUI's API graph (``prompt``): the first sampler node's settings, its prompts and the
    checkpoint; the ``workflow`` (UI graph) alone still names ComfyUI as the generator."""
    raw = prompt or workflow or ""
    try:
        graph = json.loads(prompt) if prompt else {}
    except ValueError:
        graph = {}
    graph = graph if isinstance(graph, dict) else {}
    nodes = [n for n in graph.values() if isinstance(n, dict) and isinstance(n.get("inputs"), dict)]
    sampler = next((n["inputs"] for n in nodes if "KSampler" in str(n.get("class_type", ""))), {})
    ckpt = next((n["inputs"].get("ckpt_name") for n in nodes if "ckpt_name" in n["inputs"]), None)
    latent = next((n["inputs"] for n in nodes if n.get("class_type") == "EmptyLatentImage"), {})
    return Generation("ComfyUI", prompt=_comfy_text(graph, sampler.get("positive")),
                      negative_prompt=_comfy_text(graph, sampler.get("negative")),
                      sampler=sampler.get("sampler_name"), steps=_int(sampler.get("steps")),
                      cfg=_float(sampler.get("cfg")), seed=_int(sampler.get("seed", sampler.get("noise_seed"))),
                      model=str(ckpt) if ckpt else None, width=_int(latent.get("width")),
                      height=_int(latent.get("height")), raw=raw)


def parse_invokeai(texts: Mapping[str, str]) -> Generation:
    """InvokeAI 3+ (``invokeai_metadata`` JSON), 2.x (``sd-metadata``), or 1.x (``Dream``)."""
    raw = texts.get("invokeai_metadata") or texts.get("sd-metadata") or texts.get("invokeai_graph") or texts.get("Dream", "")
    try:
        meta = json.loads(raw)
    except ValueError:
        return Generation("InvokeAI", raw=raw)
    meta = meta if isinstance(meta, dict) else {}
    if "image" in meta and isinstance(meta["image"], dict):  # 2.x: {"model_weights": ..., "image": {...}}
        image = meta["image"]
        prompts = image.get("prompt")
        prompt = prompts[0].get("prompt") if isinstance(prompts, list) and prompts and isinstance(prompts[0], dict) else prompts
        return Generation("InvokeAI", prompt=prompt if isinstance(prompt, str) else None, sampler=image.get("sampler"),
                          steps=_int(image.get("steps")), cfg=_float(image.get("cfg_scale")), seed=_int(image.get("seed")),
                          model=meta.get("model_weights"), width=_int(image.get("width")),
                          height=_int(image.get("height")), raw=raw)
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    return Generation("InvokeAI", prompt=meta.get("positive_prompt"), negative_prompt=meta.get("negative_prompt"),
                      sampler=meta.get("scheduler"), steps=_int(meta.get("steps")), cfg=_float(meta.get("cfg_scale")),
                      seed=_int(meta.get("seed")), model=model.get("name"), model_hash=model.get("hash"),
                      width=_int(meta.get("width")), height=_int(meta.get("height")), raw=raw)


def parse_novelai(comment: str, description: str | None) -> Generation:
    try:
        meta = json.loads(comment)
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    return Generation("NovelAI", prompt=meta.get("prompt") or description, negative_prompt=meta.get("uc"),
                      sampler=meta.get("sampler"), steps=_int(meta.get("steps")), cfg=_float(meta.get("scale")),
                      seed=_int(meta.get("seed")), width=_int(meta.get("width")), height=_int(meta.get("height")),
                      raw=comment)


def _names_generator(software: str | None) -> str | None:
    low = (software or "").lower()
    return next((g for g in GENERATOR_SOFTWARE if re.search(rf"(?<![\w]){re.escape(g)}(?![\w])", low)), None)


def _xmp_tools(texts: Mapping[str, str], data: bytes) -> list[str]:
    """CreatorTool / Software values written in XMP (attribute or element form)."""
    xmp = " ".join(v for k, v in texts.items() if "xmp" in k.lower())
    blob = xmp.encode("utf-8", "replace") + b" " + data[: 1 << 16] + (b" " + data[-(1 << 16):] if len(data) > 1 << 16 else b"")
    found = re.findall(rb"(?:CreatorTool|Software)(?:=\"([^\"]{1,200})\"|>([^<]{1,200})<)", blob)
    return [(a or b).decode("utf-8", "replace") for a, b in found]


# --------------------------------------------------------------------------- the one entry point


def read_generation(data: bytes) -> Generation | None:
    """What the file's metadata says about its generation; None when it says nothing of the kind."""
    texts = png_text_chunks(data)
    exif = {} if texts.get(OWN_CHUNK) else exif_texts(data)
    if OWN_CHUNK in texts:
        return parse_own(texts[OWN_CHUNK])
    for key in ("parameters", "Parameters"):
        if key in texts:
            found = parse_a1111(texts[key])
            if found is not None:
                return found
            if texts.get("fooocus_scheme") or texts[key].lstrip().startswith("{"):
                return _fooocus(texts[key])
    if "prompt" in texts or "workflow" in texts:
        return parse_comfyui(texts.get("prompt"), texts.get("workflow"))
    if any(k in texts for k in ("invokeai_metadata", "invokeai_graph", "sd-metadata", "Dream")):
        return parse_invokeai(texts)
    software = texts.get("Software") or exif.get("Software")
    if software and "novelai" in software.lower() and (texts.get("Comment") or exif.get("UserComment")):
        return parse_novelai(texts.get("Comment") or exif.get("UserComment", ""),
                             texts.get("Description") or exif.get("ImageDescription"))
    for key in ("UserComment", "comment", "ImageDescription"):
        found = parse_a1111(exif.get(key, ""))
        if found is not None:
            return found
    return _declared(data, texts, software)


def _fooocus(text: str) -> Generation:
    try:
        meta = json.loads(text)
    except ValueError:
        return Generation("Fooocus", raw=text)
    meta = meta if isinstance(meta, dict) else {}
    width, height = _size(str(meta.get("resolution", "")).strip("()").replace(",", "x").replace(" ", ""))
    return Generation("Fooocus", prompt=meta.get("prompt"), negative_prompt=meta.get("negative_prompt"),
                      sampler=meta.get("sampler"), steps=_int(meta.get("steps")), cfg=_float(meta.get("guidance_scale")),
                      seed=_int(meta.get("seed")), model=meta.get("base_model"), model_hash=meta.get("base_model_hash"),
                      width=width, height=height, raw=text)


def _declared(data: bytes, texts: Mapping[str, str], software: str | None) -> Generation | None:
    """No generator's own parameters: an IPTC source type or a Software / CreatorTool naming one."""
    joined = " ".join(texts.values()).encode("utf-8", "replace")
    match = _SOURCE_TYPE.search(joined) or _SOURCE_TYPE.search(data)
    tools = [t for t in [software, *_xmp_tools(texts, data)] if t]
    tool = next((t for t in tools if _names_generator(t)), None)
    if match:
        kind = next(t for t in GENERATED_SOURCE_TYPES if t.lower() == match.group(1).decode().lower())
        found = Generation(f"IPTC DigitalSourceType {kind}", raw=match.group(0).decode("utf-8", "replace"))
        return replace(found, extra={"tool": tool}) if tool else found
    if tool:
        return Generation(f"Software {tool!r}", raw=tool)
    return None


def describe(found: Generation | None) -> str:
    """The provenance column's value: the description, or "" when nothing says generated."""
    return found.describe() if found is not None else ""
