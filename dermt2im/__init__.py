"""Derm-T2IM as a data factory: ingest real dermoscopy seeds, fine-tune Stable Diffusion with
DreamBooth + LoRA, generate synthetic lesions, gate their quality and validate them with classifiers.

This package is the domain layer: pure, typed functions that know nothing of Prefect.
"""

__version__ = "0.1.0"
