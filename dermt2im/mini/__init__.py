"""A miniature Stable Diffusion that has learned dermoscopy-like images: SD 1.5's classes
(AutoencoderKL, UNet2DConditionModel, CLIPTextModel and a CLIP tokenizer), scaled down to 64 px and
pre-trained by ``dermt2im pretrain-mini`` on the project's phantoms with captions that say what is
visible but never the class. It plays SD 1.5's part in the smoke preset (``train.base_model: mini``).

``recipe`` (architecture and recipe), ``captions``, ``data`` (the training phantoms), ``pretrain``,
``weights`` (the file and its header), ``judge`` (a phantom class judge for the tests and
experiments).
"""
