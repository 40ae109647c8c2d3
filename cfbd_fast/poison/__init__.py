"""Seeded, reproducible backdoor poisoning of image-caption datasets (the community's attacks, for testing detectors).

`poison_dataset` (dataset.py, in its steps) writes a new CSV dataset folder and a parquet record of every
poisoned row; the triggers themselves are pure functions in `attacks`.
"""
from . import attacks
from .attacks import (IMAGE_SIZE, badnets, blended, fixed_patch, nashville, resize_image, sig, to_uint8, wanet,
                      wanet_grid)
from .dataset import poison_dataset
from .plan import ATTACKS, CLEAN_IMAGE_MODES, MULTI_TRIGGER_ATTACKS, derive_seed
from .table import CSV_NAME, CaptionTable, mentions, read_caption_csv
from .triggers import TriggerOptions, build_trigger
from .write import RECORD_NAME
from .templates import IMAGENET_TEMPLATES

__all__ = [
    "ATTACKS", "CLEAN_IMAGE_MODES", "CSV_NAME", "IMAGE_SIZE", "IMAGENET_TEMPLATES", "MULTI_TRIGGER_ATTACKS",
    "RECORD_NAME", "CaptionTable", "TriggerOptions", "attacks", "badnets", "blended", "build_trigger", "derive_seed",
    "fixed_patch", "mentions", "nashville", "poison_dataset", "read_caption_csv", "resize_image", "sig", "to_uint8",
    "wanet", "wanet_grid",
]
