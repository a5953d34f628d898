"""Checkpoints made of tensors and plain data only, written atomically.

A checkpoint is a ``dict`` with (at least) ``"config"`` (a JSON-able dict with
``arch``, ``patch_size``, ``global_crop_size``, ...), ``"student"`` and
``"teacher"`` (state dicts of a module with submodules ``backbone`` and
``head``), ``"epoch"`` and ``"step"``; the trainer adds the optimizer state,
the loss centre and the RNG states (as tensors). Nothing in it needs pickle, so
it is always opened with ``torch.load(..., weights_only=True)``: loading a
checkpoint never runs code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "load_backbone"]


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` to ``path`` atomically.

    The data goes to a temporary file in the same directory, is flushed and
    fsync'ed, then renamed over ``path`` with :func:`os.replace`; a reader (or a
    crash) never sees a half-written checkpoint.

    Parameters
    ----------
    obj : dict
        Tensors, numbers, strings, lists, tuples, dicts and ``None`` only.
    path : str or PathLike
        Destination file; its directory is created if needed.

    Returns
    -------
    Path
        The path written.

    Examples
    --------
    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> p = save_checkpoint({"w": torch.ones(2), "epoch": 3}, d + "/ck.pth")
    >>> load_checkpoint(p)["epoch"]
    3
    """
    if not isinstance(obj, dict):
        raise TypeError(f"obj must be a dict, got {type(obj).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (best effort; not possible on every OS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no code runs).

    Parameters
    ----------
    path : str or PathLike
        A file written by :func:`save_checkpoint`.
    map_location : str or torch.device
        Where tensors are loaded.

    Returns
    -------
    dict
        The checkpoint.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    ValueError
        If the file is not a readable checkpoint dict (corrupt, truncated, foreign).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        # a truncated, corrupt or foreign file: say which file, not torch's internals
        reason = ("the file ends early" if isinstance(exc, EOFError)
                  else _unpickler_refusal(str(exc)) if isinstance(exc, pickle.UnpicklingError)
                  else str(exc).split(". ")[0])
        raise ValueError(f"{path} is not a readable checkpoint (corrupt, truncated or not "
                         f"written by torch.save): {reason}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a checkpoint dict (got {type(obj).__name__})")
    return obj


def _unpickler_refusal(message: str) -> str:
    """What torch's weights_only error says was refused, without its general advice."""
    for part in message.split("\n\n"):
        part = part.strip()
        if part and "weights_only" not in part and not part.startswith("Check the documentation"):
            return f"the weights_only unpickler refused it ({part.splitlines()[0].rstrip('.')})"
    return "the weights_only unpickler refused it"


def load_backbone(
    path: str | os.PathLike[str],
    which: str = "teacher",
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the pretrained backbone of a checkpoint.

    Parameters
    ----------
    path : str or PathLike
        A training checkpoint (``checkpoint.pth`` or ``final.pth``).
    which : {"teacher", "student"}
        Which network's backbone to load (DINO evaluates the teacher).
    map_location : str or torch.device
        Where the weights are loaded.

    Returns
    -------
    backbone : nn.Module
        The timm ViT with the trained weights, in eval mode.
    config : dict
        The run's resolved configuration.

    Examples
    --------
    A checkpoint as ``train.py`` writes it (here with an untrained ViT):

    >>> import tempfile
    >>> from pwself_reference.models import build_backbone
    >>> net = build_backbone("vit_tiny", patch_size=16, img_size=32)
    >>> path = save_checkpoint({
    ...     "config": {"arch": "vit_tiny", "patch_size": 16, "global_crop_size": 32},
    ...     "teacher": {f"backbone.{k}": v for k, v in net.state_dict().items()},
    ... }, tempfile.mkdtemp() + "/final.pth")
    >>> backbone, config = load_backbone(path)
    >>> config["arch"], backbone(torch.rand(1, 3, 32, 32)).shape
    ('vit_tiny', torch.Size([1, 192]))
    """
    from pwself_reference.models import build_backbone

    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    ckpt = load_checkpoint(path, map_location=map_location)
    for key in ("config", which):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} has no {key!r} entry")
    config = dict(ckpt["config"])
    backbone = build_backbone(
        config["arch"],
        int(config["patch_size"]),
        int(config["global_crop_size"]),
        **_backbone_overrides(config),
    )
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in ckpt[which].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"checkpoint {path}: {which!r} holds no 'backbone.' weights")
    backbone.load_state_dict(state, strict=True)
    backbone.to(map_location).eval()
    return backbone, config


def _backbone_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Optional architecture overrides (depth, width, heads) recorded in the config."""
    out: dict[str, Any] = {}
    for key in ("depth", "embed_dim", "num_heads"):
        value = config.get(key)
        if value is not None:
            out[key] = int(value)
    return out
