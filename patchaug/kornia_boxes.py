"""Crop boxes and flips of Kornia views, as :func:`patchaug.match_patches` input.

A Kornia pipeline such as ``K.AugmentationSequential(K.RandomResizedCrop(...),
K.RandomHorizontalFlip(), ...)`` keeps what it drew in ``seq._params``. From that,
:func:`boxes_from_kornia` recovers each view's crop box in source pixels and whether it
is mirrored, which is all :func:`patchaug.match_patches` needs.

Conventions
-----------
Kornia's crop parameters ``src`` are ``(B, 4, 2)`` corners ``(x, y)`` (top-left,
top-right, bottom-right, bottom-left) given as *inclusive pixel indices*: a crop of
``w`` columns starting at column ``x0`` has corners at ``x0`` and ``x0 + w - 1``
(``kornia.geometry.bbox.bbox_generator``). This library's boxes are continuous pixel
edges with the far edge exclusive, so the box is ``(x_min, y_min, x_max + 1, y_max + 1)``.

A horizontal flip maps the continuous coordinate ``x`` of an image of width ``W`` to
``W - x`` (pixel ``c`` to ``W - 1 - c``). After a crop it mirrors the view; before a crop
it also mirrors which source region the crop takes: a crop ``[x0, x1)`` of the flipped
image shows source columns ``[W - x1, W - x0)``, mirrored. Crops compose (a crop of a
resized crop is a box too), and flips compose by parity.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

import torch
from kornia.augmentation import IntensityAugmentationBase2D
from kornia.augmentation.container.params import ParamItem

__all__ = ["boxes_from_kornia"]

#: Kornia modules whose parameters are a box crop-and-resize (``src`` corners, ``output_size``).
_CROPS = frozenset({"RandomResizedCrop", "RandomCrop", "CenterCrop", "Resize"})
#: Kornia modules that mirror the image left-right.
_HFLIPS = frozenset({"RandomHorizontalFlip"})

_INDEX_SUFFIX = re.compile(r"_\d+$")  # containers name a child "<ClassName>_<index>"


def _class_name(name: str) -> str:
    return _INDEX_SUFFIX.sub("", name)


def _is_intensity(cls_name: str) -> bool:
    """Whether ``cls_name`` names a Kornia (or patchaug) augmentation that moves no pixel."""
    import kornia.augmentation as K

    import patchaug  # lazily: patchaug imports this module

    for namespace in (K, patchaug):
        cls = getattr(namespace, cls_name, None)
        if isinstance(cls, type) and issubclass(cls, IntensityAugmentationBase2D):
            return True
    return False


class _State:
    """Per-sample map from the current image to the source: ``x_src = ox + sx * x``,
    ``y_src = oy + sy * y`` in continuous pixel coordinates, and the current size.

    ``sx < 0`` means the current image is mirrored. ``sy`` stays positive (vertical flips
    are refused). ``h``/``w`` are ``None`` until some parameters tell the image size.
    """

    def __init__(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.batch, self.device, self.dtype = batch, device, dtype
        zeros = torch.zeros(batch, device=device, dtype=dtype)
        self.ox, self.oy = zeros, zeros.clone()
        self.sx, self.sy = zeros + 1, zeros + 1
        self.h: torch.Tensor | None = None
        self.w: torch.Tensor | None = None

    def tensor(self, value: object, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        if value.is_complex() or tuple(value.shape) != shape:
            raise ValueError(f"{name} must be a real tensor of shape {shape}, got {tuple(value.shape)}")
        return value.detach().to(self.device, self.dtype)

    def gate(self, data: Mapping[str, object], name: str) -> torch.Tensor:
        """Which samples the module was applied to (Kornia's ``batch_prob``; all if absent)."""
        if "batch_prob" not in data:
            return torch.ones(self.batch, dtype=torch.bool, device=self.device)
        return self.tensor(data["batch_prob"], f"{name}['batch_prob']", (self.batch,)) > 0.5

    def learn_size(self, data: Mapping[str, object], name: str) -> None:
        """Take the input size from ``forward_input_shape`` or ``input_size`` if still unknown;
        otherwise check that the module saw the image size tracked so far."""
        size = None
        if "input_size" in data:
            size = self.tensor(data["input_size"], f"{name}['input_size']", (self.batch, 2))
            size = size.unbind(-1)
        elif "forward_input_shape" in data:
            shape = data["forward_input_shape"]
            if not isinstance(shape, torch.Tensor) or shape.dim() != 1 or shape.numel() < 2:
                raise ValueError(f"{name}['forward_input_shape'] must be a 1-d tensor (..., H, W)")
            hw = shape[-2:].detach().to(self.device, self.dtype)
            size = (hw[0].expand(self.batch), hw[1].expand(self.batch))
        if size is None:
            return
        if self.h is None:
            self.h, self.w = size
        elif bool(self.h.isnan().any()):  # a skipped crop of an unknown input: now known
            self.h = torch.where(self.h.isnan(), size[0], self.h)
            self.w = torch.where(self.w.isnan(), size[1], self.w)
        elif not (torch.equal(self.h, size[0]) and torch.equal(self.w, size[1])):
            # a module we skipped changed the size, or the items are not one pipeline's
            raise ValueError(
                f"params: {name} saw images of (H, W) {torch.stack(size, -1).tolist()}, but the "
                f"modules before it give {torch.stack([self.h, self.w], -1).tolist()}"
            )

    def hflip(self, data: Mapping[str, object], name: str) -> None:
        self.learn_size(data, name)
        if self.w is None or bool(self.w.isnan().any()):
            raise ValueError(f"params: {name} does not record the image size (forward_input_shape)")
        g = self.gate(data, name)
        # x_old = W - x_new
        self.ox = torch.where(g, self.ox + self.sx * self.w, self.ox)
        self.sx = torch.where(g, -self.sx, self.sx)

    def crop(self, data: Mapping[str, object], name: str) -> None:
        if "src" not in data or "output_size" not in data:
            raise ValueError(f"params: {name} must hold 'src' (B, 4, 2) and 'output_size' (B, 2)")
        padding = data.get("padding_size")
        if isinstance(padding, torch.Tensor) and bool((padding != 0).any()):
            raise ValueError(f"params: {name} pads the image, which a crop box cannot express")
        src = self.tensor(data["src"], f"{name}['src']", (self.batch, 4, 2))
        out_h, out_w = self.tensor(data["output_size"], f"{name}['output_size']", (self.batch, 2)).unbind(-1)
        x, y = src[..., 0], src[..., 1]  # corners: top-left, top-right, bottom-right, bottom-left
        if not (torch.equal(x[:, 0], x[:, 3]) and torch.equal(x[:, 1], x[:, 2])
                and torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 2], y[:, 3])):
            raise ValueError(f"params: {name}['src'] is not an axis-aligned box")
        # inclusive pixel indices -> continuous edges, far edge exclusive
        x0, x1 = x.amin(1), x.amax(1) + 1
        y0, y1 = y.amin(1), y.amax(1) + 1
        self.learn_size(data, name)
        g = self.gate(data, name)
        # x_old = x0 + x_new * (x1 - x0) / out_w: a skipped crop leaves the image as it was
        self.ox = torch.where(g, self.ox + self.sx * x0, self.ox)
        self.oy = torch.where(g, self.oy + self.sy * y0, self.oy)
        self.sx = torch.where(g, self.sx * (x1 - x0) / out_w, self.sx)
        self.sy = torch.where(g, self.sy * (y1 - y0) / out_h, self.sy)
        # the output size is known even where the input size is not (NaN: checked when used)
        unknown = torch.full_like(out_h, float("nan"))
        self.h = torch.where(g, out_h, unknown if self.h is None else self.h)
        self.w = torch.where(g, out_w, unknown if self.w is None else self.w)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.w is None or bool(self.w.isnan().any()):
            raise ValueError("params record no image size (no crop and no forward_input_shape)")
        ends_x = torch.stack([self.ox, self.ox + self.sx * self.w])
        ends_y = torch.stack([self.oy, self.oy + self.sy * self.h])
        boxes = torch.stack([ends_x.amin(0), ends_y.amin(0), ends_x.amax(0), ends_y.amax(0)], -1)
        return boxes, self.sx < 0


def _flatten(items: Sequence[object], where: str) -> list[tuple[str, object]]:
    """``(name, data)`` of every leaf of a (nested) ``list[ParamItem]``, in the order applied."""
    out: list[tuple[str, object]] = []
    for i, item in enumerate(items):
        if not isinstance(item, ParamItem):
            raise TypeError(f"{where}[{i}] must be a kornia ParamItem, got {type(item).__name__}")
        if isinstance(item.data, list):  # a nested container: its children, in order
            out.extend(_flatten(item.data, f"{where}[{i}].data"))
        else:
            out.append((item.name, item.data))
    return out


def _first_tensor(leaves: Sequence[tuple[str, object]]) -> torch.Tensor | None:
    for _, data in leaves:
        if isinstance(data, Mapping):
            for key in ("src", "batch_prob"):
                if isinstance(data.get(key), torch.Tensor):
                    return data[key]
    return None


def boxes_from_kornia(
    params: Sequence[ParamItem] | Mapping[str, torch.Tensor],
    flip_params: Mapping[str, torch.Tensor] | None = None,
    *,
    flip_first: bool = False,
    skip: Collection[str] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop boxes and flips of views made by Kornia, for :func:`patchaug.match_patches`.

    Parameters
    ----------
    params : list of kornia ParamItem, or dict of tensors
        Either the ``_params`` of a ``K.AugmentationSequential`` / ``K.ImageSequential``
        (nested containers allowed) after a forward call, or the ``_params`` dict of a
        single crop module (``K.RandomResizedCrop``, ``K.RandomCrop``, ``K.CenterCrop``,
        ``K.Resize``): ``src`` ``(B, 4, 2)``, ``output_size`` ``(B, 2)``, and optionally
        ``batch_prob`` ``(B,)`` and ``input_size`` ``(B, 2)``.
        In a container, crops, resizes and horizontal flips may come in any order and any
        number; Kornia intensity augmentations (and patchaug's ``PerPatch`` /
        ``PatchJitter``) are skipped.
    flip_params : dict of tensors, optional
        With a single crop's dict only: the ``_params`` of a ``K.RandomHorizontalFlip``
        (``batch_prob`` ``(B,)``, ``forward_input_shape``).
    flip_first : bool
        With ``flip_params``: the flip ran before the crop (default: after it).
    skip : collection of str
        Class names of further modules to ignore (custom augmentations that only change
        intensities), as Kornia names them in ``ParamItem.name`` without the ``_<index>``.

    Returns
    -------
    boxes : torch.Tensor
        ``(B, 4)`` ``(x0, y0, x1, y1)`` in source pixels, continuous edges, ``x1``/``y1``
        exclusive; float64 (float32 on MPS), on the params' device.
    flips : torch.Tensor
        ``(B,)`` bool, whether the view is mirrored left-right.

    Raises
    ------
    ValueError
        A module that moves pixels in a way a box and a flip cannot express (rotation,
        affine, perspective, vertical flip, padding, ...), a module it cannot identify,
        or inconsistent shapes.
    TypeError
        ``params`` is not Kornia parameters.

    Examples
    --------
    A crop of 32 x 24 pixels at column 8, row 4 (corners are inclusive pixel indices):

    >>> crop = {"src": torch.tensor([[[8., 4.], [39., 4.], [39., 27.], [8., 27.]]]),
    ...         "output_size": torch.tensor([[16, 16]])}
    >>> boxes_from_kornia(crop)
    (tensor([[ 8.,  4., 40., 28.]], dtype=torch.float64), tensor([False]))

    Flipping the 64-pixel wide source first takes the mirrored region:

    >>> flip = {"batch_prob": torch.tensor([1.0]), "forward_input_shape": torch.tensor([1, 3, 32, 64])}
    >>> boxes_from_kornia(crop, flip, flip_first=True)
    (tensor([[24.,  4., 56., 28.]], dtype=torch.float64), tensor([True]))

    From a container:

    >>> import kornia.augmentation as K
    >>> seq = K.AugmentationSequential(K.RandomResizedCrop((16, 16)), K.RandomHorizontalFlip())
    >>> views = seq(torch.rand(4, 3, 32, 64))
    >>> boxes, flips = boxes_from_kornia(seq._params)
    >>> boxes.shape, flips.shape
    (torch.Size([4, 4]), torch.Size([4]))
    """
    if not isinstance(flip_first, bool):
        raise TypeError(f"flip_first must be a bool, got {type(flip_first).__name__}")
    if isinstance(skip, str) or not isinstance(skip, Collection) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a collection of class names, got {skip!r}")
    if isinstance(params, Mapping):
        if flip_params is not None and not isinstance(flip_params, Mapping):
            raise TypeError(f"flip_params must be a dict of tensors, got {type(flip_params).__name__}")
        leaves: list[tuple[str, object]] = [("RandomResizedCrop", params)]
        if flip_params is not None:
            flip = ("RandomHorizontalFlip", flip_params)
            leaves.insert(0 if flip_first else 1, flip)
        names = {"RandomResizedCrop": "params", "RandomHorizontalFlip": "flip_params"}
    elif isinstance(params, ParamItem) or (isinstance(params, Sequence) and not isinstance(params, str)):
        if flip_params is not None or flip_first:
            raise ValueError("flip_params and flip_first apply to a single crop's dict; a container's "
                             "params already hold its flips")
        leaves = _flatten([params] if isinstance(params, ParamItem) else params, "params")
        names = {}
    else:
        raise TypeError(
            "params must be the _params of a kornia AugmentationSequential/ImageSequential (a list of "
            f"ParamItem) or of a RandomResizedCrop (a dict), got {type(params).__name__}"
        )

    first = _first_tensor(leaves)
    if first is None or first.dim() == 0:
        raise ValueError("params hold no per-sample parameters (batch_prob or src) to read the batch size from")
    dtype = torch.float32 if first.device.type == "mps" else torch.float64  # MPS has no float64
    state = _State(first.shape[0], first.device, dtype)

    for name, data in leaves:
        label = names.get(name, name)
        cls_name = _class_name(name)
        if cls_name in skip:
            continue
        if cls_name in _CROPS or cls_name in _HFLIPS:
            if not isinstance(data, Mapping):
                raise TypeError(f"params: {label} must hold a dict of tensors, got {type(data).__name__}")
            (state.crop if cls_name in _CROPS else state.hflip)(data, label)
        elif _is_intensity(cls_name):
            if isinstance(data, Mapping):
                state.learn_size(data, label)  # intensity changes keep the size: a free check
        else:
            raise ValueError(
                f"params: {label} changes geometry in a way a crop box and a horizontal flip cannot "
                "express, or is not a known Kornia augmentation (supported: "
                f"{sorted(_CROPS | _HFLIPS)}, intensity augmentations; pass skip=({cls_name!r},) "
                "if it only changes intensities)"
            )
    return state.result()
