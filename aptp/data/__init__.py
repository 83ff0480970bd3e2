"""Datasets used to train, calibrate and evaluate the models that aptp prunes.

:func:`build_dataset` turns the ``data`` settings into a :class:`CaptionDataset` (shapes, COCO,
CC3M in three layouts, or an image folder with ``metadata.jsonl``); see :mod:`aptp.data.registry`
for how the source is chosen and :mod:`aptp.data.common` for the item format and skipping.
"""

from aptp.data.common import CaptionDataset, ImageTransform
from aptp.data.registry import build_dataset

__all__ = ["CaptionDataset", "ImageTransform", "build_dataset"]
