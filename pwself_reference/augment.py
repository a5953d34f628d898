"""DINO's multi-crop augmentation, with the crop boxes and flips PW-Self needs.

Each image gives ``n_global`` global and ``n_local`` local views.

Spatial part (random resized crop + horizontal flip), two interchangeable paths:

- ``loader``: per image in the data-loader workers with
  :class:`patchaug.RandomResizedCropWithBox` (antialiased, any image size),
  collated into a :class:`MultiCropBatch`; items are drawn under the seed
  ``(seed, epoch, index)`` so views do not depend on the number of workers or
  processes. ``same_spatial=True`` shares each view's box and flip across the
  batch fetched by a worker. :class:`MatchingCollate` also computes the token
  matches of every (teacher, student) view pair there (:func:`match_views`), so
  they arrive with the batch and the training step does not spend time on them.
- ``batched``: the loader returns whole images (all of one size) and
  :func:`patchaug.batched_random_resized_crop` crops the batch on the device in
  one call per view (``shared=True`` for the paper's shared augmentation).

Photometric part, DINO's, per view, on the batch (:class:`ViewAugment`, one
:class:`BatchPhotometric` recipe per kind of view, named as DINO names them):
colour jitter with p 0.8 (ranges of :func:`color_jitter_operators`, shared with
:class:`patchaug.PatchJitter`'s paper preset; the four operations in a random
order per call), grayscale with p 0.2, Gaussian blur of sigma ``--blur-sigma``
with p 1.0 on ``global1``, 0.1 on ``global2`` and further globals, 0.5 on the
``local`` views, solarisation with p 0.2 on ``global2``. Every sample draws its
own factors. Then optional patch-level augmentation
(:class:`patchaug.PatchJitter`) and the ImageNet normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from patchaug import PatchMatch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchPhotometric",
    "CropSpec",
    "ImageTensorDataset",
    "MatchingCollate",
    "MultiCropBatch",
    "MultiCropDataset",
    "ViewAugment",
    "batched_multicrop",
    "collate_images",
    "collate_multicrop",
    "color_jitter_operators",
    "item_seed",
    "match_batch",
    "match_views",
    "normalize",
    "view_grids",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def item_seed(*keys: int) -> int:
    """A 63-bit seed from integers, well mixed (``numpy.random.SeedSequence``).

    Examples
    --------
    >>> item_seed(0, 1, 2) == item_seed(0, 1, 2) != item_seed(0, 2, 1)
    True
    """
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(
        2, np.uint32
    )
    return int((int(state[0]) << 31) ^ int(state[1]))


def normalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalise ``(B, 3, H, W)`` images in ``[0, 1]`` with a per-channel mean/std."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class CropSpec:
    """Sizes and scales of the multi-crop views.

    Examples
    --------
    >>> spec = CropSpec(28, 12, n_global=2, n_local=3)
    >>> spec.sizes, spec.n_views
    ([28, 28, 12, 12, 12], 5)
    """

    global_size: int
    local_size: int
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    interpolation: str = "bicubic"
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if self.n_global < 1:
            raise ValueError(f"global_crops_number must be >= 1, got {self.n_global}")
        if self.n_local < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {self.n_local}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")

    @property
    def n_views(self) -> int:
        return self.n_global + self.n_local

    @property
    def sizes(self) -> list[int]:
        return [self.global_size] * self.n_global + [self.local_size] * self.n_local

    @property
    def scales(self) -> list[tuple[float, float]]:
        return [tuple(self.global_scale)] * self.n_global + [tuple(self.local_scale)] * self.n_local


@dataclass
class MultiCropSample:
    """Views of one image: ``crops`` (list of uint8 ``(3, h, w)``), ``boxes`` ``(V, 4)``, ``flips`` ``(V,)``."""

    crops: list[torch.Tensor]
    boxes: torch.Tensor
    flips: torch.Tensor


Matches = dict[tuple[int, int], "PatchMatch"]
"""Token matches of view pairs: ``(teacher view i, student view j)`` -> ``(B, M)`` :class:`PatchMatch`."""


def _map_matches(matches: Matches | None, fn: Any) -> Matches | None:
    """``matches`` with ``fn`` applied to every index and mask tensor (``None`` stays ``None``)."""
    if matches is None:
        return None
    return {key: type(m)(fn(m.idx_a), fn(m.idx_b), fn(m.valid)) for key, m in matches.items()}


@dataclass
class MultiCropBatch:
    """A batch of views: ``views`` (list of ``(B, 3, h, w)``), ``boxes`` ``(V, B, 4)``, ``flips`` ``(V, B)``.

    ``matches``, when the loader computed them (:class:`MatchingCollate`), holds the
    token matches of every (teacher, student) view pair, as :func:`match_views` returns
    them; ``None`` means the training step computes them itself.
    """

    views: list[torch.Tensor]
    boxes: torch.Tensor
    flips: torch.Tensor
    matches: Matches | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultiCropBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return MultiCropBatch([move(v) for v in self.views], move(self.boxes), move(self.flips),
                              _map_matches(self.matches, move))

    def pin_memory(self) -> MultiCropBatch:
        # the matches too: unpinned, their non_blocking copies in ``to`` would be synchronous
        return MultiCropBatch([v.pin_memory() for v in self.views], self.boxes.pin_memory(),
                              self.flips.pin_memory(),
                              _map_matches(self.matches, torch.Tensor.pin_memory))


def view_grids(views: Sequence[torch.Tensor], patch_size: int) -> list[tuple[int, int]]:
    """The ``(rows, cols)`` patch grid of each ``(B, C, h, w)`` view for ``patch_size`` px patches."""
    return [(v.shape[-2] // patch_size, v.shape[-1] // patch_size) for v in views]


def match_views(boxes: torch.Tensor, flips: torch.Tensor, grids: Sequence[tuple[int, int]],
                n_global: int, rule: str) -> Matches:
    """Matches between every teacher (global) view ``i`` and student view ``j != i``.

    One :func:`patchaug.match_view_pairs` call: on CUDA one launch of the fused Triton
    kernel for all pairs, elsewhere one batched call per pair of grids.

    Parameters
    ----------
    boxes : torch.Tensor
        ``(V, B, 4)`` crop boxes ``(x0, y0, x1, y1)`` in source pixels, view by view.
    flips : torch.Tensor
        ``(V, B)`` bool, whether each view was mirrored.
    grids : sequence of (int, int)
        ``(rows, cols)`` patch grid of each of the ``V`` views (:func:`view_grids`).
    n_global : int
        The first ``n_global`` views are the teacher's.
    rule : str
        Matching rule of :func:`patchaug.match_patches`.

    Returns
    -------
    dict
        ``{(i, j): PatchMatch}`` for ``i < n_global``, ``j != i`` (in that order), with
        ``(B, M)`` tensors on the boxes' device (for CPU boxes, computed by the numpy
        engine: same results).

    Examples
    --------
    >>> boxes = torch.tensor([[[0., 0, 28, 28]], [[0, 0, 14, 14]]])
    >>> m = match_views(boxes, torch.zeros(2, 1, dtype=torch.bool), [(2, 2), (1, 1)], 1, "half")
    >>> list(m), tuple(m[(0, 1)].idx_a.shape)
    ([(0, 1)], (1, 2))
    """
    from patchaug import match_view_pairs

    pairs = [(i, j) for i in range(n_global) for j in range(len(grids)) if j != i]
    return match_view_pairs(boxes, flips, [tuple(g) for g in grids], pairs, rule=rule)


def match_batch(batch: MultiCropBatch, n_global: int, patch_size: int, rule: str) -> Matches:
    """The token matches of every (teacher, student) view pair of a batch.

    :func:`match_views` on the batch's boxes, flips and view grids. The training
    step calls it for crops drawn on the device (``--crops batched``);
    :class:`MatchingCollate` calls it in the data-loader workers for the
    ``loader`` path.

    Examples
    --------
    >>> b = batched_multicrop(torch.rand(2, 3, 16, 16), CropSpec(16, 8, n_local=1))
    >>> sorted(match_batch(b, 2, 4, "half"))
    [(0, 1), (0, 2), (1, 0), (1, 2)]
    """
    return match_views(batch.boxes, batch.flips, view_grids(batch.views, patch_size), n_global,
                       rule)


def _to_uint8_tensor(img: Any) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(img.convert("RGB"))


class MultiCropDataset(Dataset):
    """Per-image multi-crop views of a ``(PIL image, label)`` dataset (the ``loader`` path).

    Item ``i`` of epoch ``e`` is drawn under the seed ``item_seed(seed, e, i)``.
    With ``same_spatial=True`` the data loader fetches whole batches through
    ``__getitems__`` and the images of a batch share each view's box (drawn for
    the first image, rescaled to the others' sizes) and flip.

    Examples
    --------
    >>> from PIL import Image
    >>> base = [(Image.new("RGB", (28, 28)), 0)] * 2
    >>> ds = MultiCropDataset(base, CropSpec(28, 12, n_local=1))
    >>> batch = collate_multicrop([ds[0], ds[1]])
    >>> [tuple(v.shape) for v in batch.views], tuple(batch.boxes.shape)
    ([(2, 3, 28, 28), (2, 3, 28, 28), (2, 3, 12, 12)], (3, 2, 4))
    """

    def __init__(self, base: Any, spec: CropSpec, seed: int = 0,
                 same_spatial: bool = False) -> None:
        from patchaug import RandomResizedCropWithBox

        self.base = base
        self.spec = spec
        self.seed = int(seed)
        self.epoch = 0
        self.same_spatial = bool(same_spatial)
        self.crops = [
            RandomResizedCropWithBox(size, scale=scale, interpolation=spec.interpolation,
                                     flip_p=spec.flip_p)
            for size, scale in zip(spec.sizes, spec.scales)
        ]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's randomness (call before building the epoch's iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> MultiCropSample:
        img, _ = self.base[index]
        crops, boxes, flips = [], [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, self.epoch, index))
            for t in self.crops:
                crop, box, flip = t(img)
                crops.append(_to_uint8_tensor(crop))
                boxes.append(box)
                flips.append(flip)
        return MultiCropSample(crops, torch.stack(boxes), torch.tensor(flips, dtype=torch.bool))

    def __getitems__(self, indices: list[int]) -> list[MultiCropSample]:
        if not self.same_spatial:
            return [self[i] for i in indices]
        from torchvision.transforms import v2

        images = [self.base[i][0] for i in indices]
        h0, w0 = v2.query_size([images[0]])
        # each view's box and flip, drawn once for the batch (on its first image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, self.epoch, indices[0], 1))
            params = [t.make_params([images[0]]) for t in self.crops]
        out = []
        for img in images:
            h, w = v2.query_size([img])
            crops, boxes, flips = [], [], []
            for t, p in zip(self.crops, params):
                box = _rescale_box(p["box"], (h0, w0), (h, w))
                crops.append(_to_uint8_tensor(t.transform(img, {"box": box, "flip": p["flip"]})))
                boxes.append(box.float())
                flips.append(p["flip"])
            out.append(MultiCropSample(crops, torch.stack(boxes), torch.tensor(flips)))
        return out


def _rescale_box(box: torch.Tensor, size: tuple[int, int], new_size: tuple[int, int]
                 ) -> torch.Tensor:
    """A ``(x0, y0, x1, y1)`` pixel box of a ``size`` image, on an image of ``new_size``
    (rounded, at least one pixel wide and high)."""
    if tuple(size) == tuple(new_size):
        return box.clone()
    (h0, w0), (h, w) = size, new_size
    out = torch.round(box * torch.tensor([w / w0, h / h0, w / w0, h / h0]))
    out[2:] = torch.maximum(out[2:], out[:2] + 1)
    return out


def collate_multicrop(samples: Sequence[MultiCropSample]) -> MultiCropBatch:
    """Stack :class:`MultiCropSample` items view by view (uint8 views)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    n_views = len(samples[0].crops)
    views = [torch.stack([s.crops[v] for s in samples]) for v in range(n_views)]
    boxes = torch.stack([s.boxes for s in samples], dim=1)
    flips = torch.stack([s.flips for s in samples], dim=1)
    return MultiCropBatch(views, boxes, flips)


class MatchingCollate:
    """:func:`collate_multicrop`, then the batch's token matches (:func:`match_views`).

    Used as a data loader's ``collate_fn`` on the ``loader`` crop path, so that the
    matching runs in the worker processes, overlapped with training, and the
    matches arrive with the batch (``batch.matches``). A class, not a closure, so
    that it pickles to workers started by ``spawn`` too.

    Parameters
    ----------
    n_global : int
        Number of global (teacher) views.
    patch_size : int
        Patch size of the model in pixels (sets each view's grid).
    rule : str
        Matching rule of :func:`patchaug.match_patches`.

    Examples
    --------
    >>> from PIL import Image
    >>> ds = MultiCropDataset([(Image.new("RGB", (28, 28)), 0)] * 2, CropSpec(28, 12, n_local=1))
    >>> batch = MatchingCollate(2, 4, "half")([ds[0], ds[1]])
    >>> sorted(batch.matches), tuple(batch.matches[(0, 2)].valid.shape)
    ([(0, 1), (0, 2), (1, 0), (1, 2)], (2, 10))
    """

    def __init__(self, n_global: int, patch_size: int, rule: str) -> None:
        self.n_global, self.patch_size, self.rule = int(n_global), int(patch_size), str(rule)

    def __call__(self, samples: Sequence[MultiCropSample]) -> MultiCropBatch:
        batch = collate_multicrop(samples)
        batch.matches = match_batch(batch, self.n_global, self.patch_size, self.rule)
        return batch

    def __repr__(self) -> str:
        return (f"MatchingCollate(n_global={self.n_global}, patch_size={self.patch_size}, "
                f"rule={self.rule!r})")


class ImageTensorDataset(Dataset):
    """Whole images as uint8 ``(3, H, W)`` tensors (the ``batched`` path)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _to_uint8_tensor(self.base[index][0])


def collate_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack same-size uint8 images into ``(B, 3, H, W)``."""
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) != 1:
        raise ValueError(
            f"--crops batched needs images of one size, got sizes {sorted(shapes)[:3]}...; "
            "use --crops loader"
        )
    return torch.stack(list(images))


def batched_multicrop(images: torch.Tensor, spec: CropSpec, shared: bool = False) -> MultiCropBatch:
    """All views of a batch of images with :func:`patchaug.batched_random_resized_crop`.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, 3, H, W)`` uint8 or float images (uint8 is scaled to ``[0, 1]``).
    spec : CropSpec
        View sizes and scales.
    shared : bool
        One box and flip per view for the whole batch.

    Examples
    --------
    >>> b = batched_multicrop(torch.rand(4, 3, 28, 28), CropSpec(28, 12, n_local=2))
    >>> [tuple(v.shape) for v in b.views][-1], tuple(b.boxes.shape), tuple(b.flips.shape)
    ((4, 3, 12, 12), (4, 4, 4), (4, 4))
    """
    from patchaug import batched_random_resized_crop

    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    views, boxes, flips = [], [], []
    for size, scale in zip(spec.sizes, spec.scales):
        crop, box, flip = batched_random_resized_crop(
            x, size, scale, flip_p=spec.flip_p, shared=shared, mode=spec.interpolation
        )
        views.append(crop.clamp_(0.0, 1.0))
        boxes.append(box)
        flips.append(flip)
    return MultiCropBatch(views, torch.stack(boxes), torch.stack(flips))


def color_jitter_operators() -> dict[str, Any]:
    """DINO's colour jitter as :func:`patchaug.patch_jitter.paper_operators` defines it.

    Brightness 0.4, contrast 0.4, saturation 0.2 (torchvision's ``[1 - v, 1 + v]``),
    hue 0.1 turns, probability 0.8: one definition of the paper's ranges for the
    per-image augmentation here and the per-patch one of :class:`patchaug.PatchJitter`.

    Examples
    --------
    >>> {name: (op.low, op.high, op.p) for name, op in color_jitter_operators().items()}
    {'brightness': (0.6, 1.4, 0.8), 'contrast': (0.6, 1.4, 0.8), 'saturation': (0.8, 1.2, 0.8), 'hue': (-0.1, 0.1, 0.8)}
    """
    from patchaug.patch_jitter import paper_operators

    ops = {op.name: op for op in paper_operators()}
    return {name: ops[name] for name in ("brightness", "contrast", "saturation", "hue")}


def _solarize_threshold() -> float:
    """The paper's (DINO's) solarisation threshold, from :func:`patchaug.patch_jitter.paper_operators`."""
    from patchaug.patch_jitter import paper_operators

    return next(op.low for op in paper_operators() if op.name == "solarize")


#: The factor of each colour-jitter operation that leaves an image as it is.
_NEUTRAL = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}


class BatchPhotometric:
    """DINO's photometric augmentation of one view, per sample, on a batch.

    Colour jitter with probability ``jitter_p`` (the factors of
    :func:`color_jitter_operators`, drawn per sample; the four operations in a
    random order per call), grayscale with probability ``gray_p``, Gaussian blur of
    sigma ``U(blur_sigma)`` with probability ``blur_p``, solarisation at the paper's
    threshold (0.5) with probability ``solarize_p``.

    Parameters
    ----------
    blur_p : float
        Probability of the Gaussian blur.
    solarize_p : float
        Probability of solarisation.
    blur_sigma : (float, float)
        Range of the blur sigma in pixels.
    jitter_p : float, optional
        Probability of the colour jitter (default: the operators', 0.8).
    gray_p : float
        Probability of grayscale (0.2).
    generator : torch.Generator, optional
        Source of every draw (default: torch's global generator); a call's
        ``generator`` argument overrides it.

    Examples
    --------
    >>> aug = BatchPhotometric(blur_p=1.0, solarize_p=0.2)
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(4, 3, 12, 12)
    >>> torch.equal(aug(x, generator=g), aug(x, generator=torch.Generator().manual_seed(0)))
    True
    """

    def __init__(self, blur_p: float, solarize_p: float = 0.0,
                 blur_sigma: tuple[float, float] = (0.1, 2.0), jitter_p: float | None = None,
                 gray_p: float = 0.2, generator: torch.Generator | None = None) -> None:
        self.jitter = color_jitter_operators()
        self.blur_p, self.solarize_p = float(blur_p), float(solarize_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.jitter_p = self.jitter["brightness"].p if jitter_p is None else float(jitter_p)
        self.gray_p = float(gray_p)
        self.solarize_threshold = _solarize_threshold()
        self.generator = generator

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        from patchaug import patch_ops as P

        g = generator if generator is not None else self.generator
        b, c, h, w = x.shape
        dev = x.device

        def draw() -> torch.Tensor:  # one U[0, 1) per sample
            return torch.rand(b, device=dev, generator=g)

        x = x.float().contiguous()
        # colour jitter: one gate per sample, a factor per operation, a random order
        jit = draw() < self.jitter_p
        factors = {name: torch.where(jit, op.sample(draw()), _NEUTRAL[name])
                   for name, op in self.jitter.items()}
        names = list(factors)
        for k in torch.randperm(4, generator=g).tolist():
            name = names[k]
            if name == "hue":  # a zero rotation is not exact: leave unjittered samples alone
                x = torch.where(jit.view(-1, 1, 1, 1), P.hue(x, factors[name]), x)
            else:
                x = getattr(P, name)(x, factors[name])
        gray = draw() < self.gray_p
        x = torch.where(gray.view(-1, 1, 1, 1), P.grayscale(x), x)
        if self.blur_p > 0 and h == w and h > 1:
            blur = draw() < self.blur_p
            lo, hi = self.blur_sigma
            sigma = lo + (hi - lo) * draw()
            k = min(2 * int(np.ceil(3 * hi)) + 1, 2 * h - 1)
            k = k if k % 2 else k - 1
            if k >= 3:
                x = torch.where(blur.view(-1, 1, 1, 1), P.gaussian_blur(x, sigma, (k, k)), x)
        if self.solarize_p > 0:
            sol = draw() < self.solarize_p
            solarized = torch.where(x >= self.solarize_threshold, 1.0 - x, x)
            x = torch.where(sol.view(-1, 1, 1, 1), solarized, x)
        return x.clamp_(0.0, 1.0)


class ViewAugment:
    """DINO's photometric recipe per view, optional patch jitter, normalisation.

    As DINO names them: ``global1`` (the first global view: always blurred),
    ``global2`` (the second: blurred with probability 0.1, solarised with 0.2),
    ``global_more`` (any further global view: blurred with 0.1) and ``local``
    (every local view: blurred with 0.5); colour jitter and grayscale on all.

    Parameters
    ----------
    n_global, n_local : int
        Number of views of each kind.
    patch_jitter : callable, optional
        Applied to every view after the photometric step (e.g. :class:`patchaug.PatchJitter`);
        views of the same size go through it in one call (concatenated along the batch).
    blur_sigma : (float, float)
        Blur sigma range.
    generator : torch.Generator, optional
        Source of the photometric draws (default: torch's global generator).

    Examples
    --------
    >>> aug = ViewAugment(2, 1)
    >>> out = aug([torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 4, 4)])
    >>> [tuple(v.shape) for v in out]
    [(2, 3, 8, 8), (2, 3, 8, 8), (2, 3, 4, 4)]
    """

    def __init__(self, n_global: int, n_local: int, patch_jitter: Any = None,
                 blur_sigma: tuple[float, float] = (0.1, 2.0),
                 generator: torch.Generator | None = None) -> None:
        def recipe(blur_p: float, solarize_p: float) -> BatchPhotometric:
            return BatchPhotometric(blur_p, solarize_p, blur_sigma, generator=generator)

        self.global1 = recipe(blur_p=1.0, solarize_p=0.0)
        self.global2 = recipe(blur_p=0.1, solarize_p=0.2)
        self.global_more = recipe(blur_p=0.1, solarize_p=0.0)
        self.local = recipe(blur_p=0.5, solarize_p=0.0)
        globals_ = [self.global1, self.global2] + [self.global_more] * max(0, n_global - 2)
        #: the recipe of every view, in view order
        self.ops = globals_[:n_global] + [self.local] * n_local
        self.patch_jitter = patch_jitter

    def __call__(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(views) != len(self.ops):
            raise ValueError(f"expected {len(self.ops)} views, got {len(views)}")
        out = []
        for v, op in zip(views, self.ops):
            x = v.float() / 255.0 if v.dtype == torch.uint8 else v.float()
            out.append(op(x))
        if self.patch_jitter is not None:
            out = self._jitter_by_size(out)
        return [normalize(x) for x in out]

    def _jitter_by_size(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The patch jitter on every view, one call per view size (e.g. 2: global, local).

        Each patch draws its own parameters either way; fewer, larger calls save the
        fixed cost of a call (on a GPU ~40 kernel launches and a host sync each)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for v, x in enumerate(views):
            groups.setdefault(tuple(x.shape[1:]), []).append(v)
        out = list(views)
        for members in groups.values():
            if len(members) == 1:
                out[members[0]] = self.patch_jitter(views[members[0]])
                continue
            jittered = self.patch_jitter(torch.cat([views[v] for v in members]))
            for v, x in zip(members, jittered.split([views[v].shape[0] for v in members])):
                out[v] = x
        return out
