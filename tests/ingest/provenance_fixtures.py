"""Image files that say they were generated, the way real tools write them (used by the provenance,
ingest and import-synthetic tests)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

A1111_PARAMETERS = (
    "a dermoscopic image of sks malignant skin lesion, melanoma\n"
    "Negative prompt: blurry, low quality, text, watermark\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1234567, Size: 512x512, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "derm: 0123456789ab", Version: v1.10.1'
)

COMFY_PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 25, "cfg": 6.5, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1, "model": ["4", 0],
                                               "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dermoscopic image of a nevus", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
}

XMP_GENERATED = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
    'Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"/>'
    '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
)


def pixels(seed: int, size: int = 64) -> np.ndarray:  # ingest.min_side: 64
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def png_with(rgb: np.ndarray, text: dict[str, str] | None = None, itxt: dict[str, str] | None = None) -> bytes:
    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    for k, v in (itxt or {}).items():
        info.add_itxt(k, v, zip=True)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def a1111_png(seed: int, parameters: str = A1111_PARAMETERS, size: int = 32) -> bytes:
    return png_with(pixels(seed, size), {"parameters": parameters})


def comfyui_png(seed: int) -> bytes:
    return png_with(pixels(seed), {"prompt": json.dumps(COMFY_PROMPT), "workflow": json.dumps({"nodes": []})})


def own_png(seed: int) -> bytes:
    """What this factory writes into every render (``dermt2im.generate.pngmeta.png_text``)."""
    from dermt2im.generate.pngmeta import png_text

    row = {"label": "benign", "prompt": "a dermoscopic image of sks benign skin lesion", "negative_prompt": "blurry",
           "sampler": "euler", "steps": 5, "guidance_scale": 7.0, "lora_scale": 0.8, "seed": seed, "width": 32,
           "height": 32, "sample_key": f"benign-{seed:06d}", "base_model": "tiny", "base_revision": None,
           "lora_sha256": "ab" * 32, "render_key": "cd" * 32, "dtype": "float32", "library_versions": "{}"}
    return png_with(pixels(seed), png_text(row))


def xmp_png(seed: int) -> bytes:
    """An IPTC DigitalSourceType in XMP (compressed iTXt, as Photoshop and Firefly write it)."""
    return png_with(pixels(seed), itxt={"XML:com.adobe.xmp": XMP_GENERATED})


def a1111_jpeg(seed: int) -> bytes:
    """AUTOMATIC1111's JPEG / WebP form: the parameters in the EXIF UserComment, UTF-16."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + A1111_PARAMETERS.encode("utf-16-be")
    buf = io.BytesIO()
    Image.fromarray(pixels(seed)).save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def software_jpeg(seed: int, software: str) -> bytes:
    exif = Image.Exif()
    exif[0x0131] = software
    buf = io.BytesIO()
    Image.fromarray(pixels(seed)).save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()
