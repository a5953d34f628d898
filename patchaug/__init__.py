"""patchaug: building blocks for patch-wise self-supervised learning.

- :func:`match_patches`: which tokens of two crops show the same source pixels
  (:func:`match_view_pairs`: every pair of views of a multi-crop step at once, one fused
  kernel launch on CUDA);
  :func:`boxes_from_kornia` gives its boxes and flips for Kornia crop pipelines.
- :class:`RandomResizedCropWithBox` (a torchvision v2 transform) /
  :func:`batched_random_resized_crop`: crops that report their boxes and flips; the box is a
  :class:`CropBox` tv_tensor that later v2 flips, crops and resizes keep right.
- :class:`PatchJitter`: per-patch photometric augmentation, a Kornia augmentation (operators in
  :mod:`patchaug.operators`, functional core in :mod:`patchaug.patch_ops`, a fused Triton
  kernel on CUDA).
- :class:`PerPatch`: any Kornia intensity augmentation, with its own parameters per patch.
- :func:`draw_matches`: a picture of two views and their matched patches.
"""

from .crops import (
    BatchedRandomResizedCrop,
    CropBox,
    CropFlip,
    RandomResizedCropWithBox,
    batched_random_resized_crop,
    resized_crop_boxes,
    sample_crop_boxes,
)
from .kornia_boxes import boxes_from_kornia
from .matching import RULES, PatchMatch, match_patches, match_view_pairs, patch_centres
from .operators import OPERATORS, PatchOp
from .patch_jitter import PatchJitter, PatchJitterParams
from .per_patch import PerPatch
from .visualize import draw_matches

__version__ = "0.1.0"

__all__ = [
    "OPERATORS",
    "RULES",
    "BatchedRandomResizedCrop",
    "CropBox",
    "CropFlip",
    "PatchJitter",
    "PatchJitterParams",
    "PatchMatch",
    "PatchOp",
    "PerPatch",
    "RandomResizedCropWithBox",
    "batched_random_resized_crop",
    "boxes_from_kornia",
    "draw_matches",
    "match_patches",
    "match_view_pairs",
    "patch_centres",
    "resized_crop_boxes",
    "sample_crop_boxes",
]
