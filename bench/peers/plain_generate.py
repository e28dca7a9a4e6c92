"""The plain generation loop a user writes in twenty lines: the baseline ``bench/generate.py`` measures
against.

StableDiffusionPipeline from a local folder, the LoRA loaded, fused at its scale and unloaded (so
the fused weights stay and the adapter layers go), one scheduler, batches of 8 prompts with one
seeded generator per image, ``image.save`` per image. Nothing of derm-t2im is imported.

    python bench/peers/plain_generate.py JOB.json OUT_DIR

JOB.json: {"base_model": folder, "lora": weights file, "lora_scale": 0.8, "sampler": "euler",
"steps": 6, "guidance_scale": 7.0, "width": 64, "height": 64, "batch": 8, "dtype": "float32",
"threads": 0, "rows": [{"name": ..., "prompt": ..., "negative_prompt": ..., "seed": ...}, ...]}
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

job = json.loads(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
if job.get("threads"):
    torch.set_num_threads(job["threads"])
device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = StableDiffusionPipeline.from_pretrained(job["base_model"], dtype=getattr(torch, job["dtype"]),
                                               safety_checker=None, use_safetensors=True).to(device)
pipe.set_progress_bar_config(disable=True)
schedulers = {"euler": lambda c: EulerDiscreteScheduler.from_config(c),
              "euler_a": lambda c: EulerAncestralDiscreteScheduler.from_config(c),
              "plms": lambda c: PNDMScheduler.from_config(c, skip_prk_steps=True)}
pipe.scheduler = schedulers[job["sampler"]](pipe.scheduler.config)
pipe.load_lora_weights(job["lora"])
pipe.fuse_lora(lora_scale=job["lora_scale"])
pipe.unload_lora_weights()
rows, batch = job["rows"], job["batch"]
for i in range(0, len(rows), batch):
    chunk = rows[i : i + batch]
    images = pipe(prompt=[r["prompt"] for r in chunk], negative_prompt=[r["negative_prompt"] for r in chunk],
                  num_inference_steps=job["steps"], guidance_scale=job["guidance_scale"], width=job["width"],
                  height=job["height"], generator=[torch.Generator("cpu").manual_seed(r["seed"]) for r in chunk]).images
    for r, image in zip(chunk, images):
        image.save(out / f"{r['name']}.png")
