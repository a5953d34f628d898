"""PCA whitening as DINO's copy-detection evaluation learns it.

DINO subtracts the mean of the whitening features from the database and query
descriptors, but computes the covariance of the whitening features **without**
centring them (``X^T X / N``). We keep that choice so numbers are comparable
with DINO's; pass ``centered=True`` for the textbook covariance. Eigenvalues
below ``1e-5`` times the largest are raised to that floor, the eigenvectors are
sorted by decreasing eigenvalue and the projection is
``diag(lambda ** -power) V^T`` (power 0.5: full whitening).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pwself_reference.evaluation._checks import feature_matrix

__all__ = ["Whitening", "learn_whitening"]


@dataclass
class Whitening:
    """A learned whitening: ``apply(x) = (x - mean) @ projection.T``.

    Attributes
    ----------
    mean : Tensor, shape ``(D,)``
    projection : Tensor, shape ``(d, D)``
    eigenvalues : Tensor, shape ``(d,)``
        Kept eigenvalues (after flooring), decreasing.
    energy : float
        Fraction of the total (floored) eigenvalue mass kept.
    """

    mean: torch.Tensor
    projection: torch.Tensor
    eigenvalues: torch.Tensor
    energy: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten ``x`` of shape ``(N, D)`` into ``(N, d)`` (same dtype as ``x``)."""
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"x must be (N, {self.mean.shape[0]}), got shape {tuple(x.shape)}"
            )
        mean = self.mean.to(x.device, torch.float64)
        proj = self.projection.to(x.device, torch.float64)
        return ((x.double() - mean) @ proj.T).to(x.dtype)


def learn_whitening(
    features: torch.Tensor,
    power: float = 0.5,
    dim: int | None = None,
    centered: bool = False,
    eps_ratio: float = 1e-5,
) -> Whitening:
    """Learn DINO's PCA whitening from ``features``.

    Parameters
    ----------
    features : Tensor, shape ``(N, D)``
        Descriptors of the whitening image set (DINO: 20k YFCC100M images).
    power : float
        Eigenvalue exponent; 0.5 whitens fully, 0 is a plain PCA rotation.
    dim : int or None
        Number of components kept (default: all ``D``).
    centered : bool
        Centre the features before the covariance. ``False`` reproduces DINO,
        whose covariance is ``X^T X / N`` of the raw features.
    eps_ratio : float
        Eigenvalues below ``eps_ratio * max`` are raised to that value.

    Returns
    -------
    Whitening

    Examples
    --------
    >>> x = torch.randn(500, 8, dtype=torch.float64) * torch.arange(1, 9)
    >>> w = learn_whitening(x, centered=True)
    >>> y = w.apply(x)
    >>> torch.allclose(y.T @ y / 500, torch.eye(8, dtype=torch.float64), atol=1e-8)
    True
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError("features must be a 2-D tensor (N, D)")
    feature_matrix(features, "features")
    n, d = features.shape
    if n < 2:
        raise ValueError(f"need at least 2 whitening features, got {n}")
    if dim is None:
        dim = d
    if not isinstance(dim, int) or not 1 <= dim <= d:
        raise ValueError(f"dim must be an int in [1, {d}], got {dim!r}")
    if not power >= 0:
        raise ValueError(f"power must be >= 0, got {power!r}")
    x = features.detach().double().cpu()
    mean = x.mean(dim=0)
    xc = x - mean if centered else x
    cov = xc.T @ xc / n
    evals, evecs = torch.linalg.eigh(cov)
    if not float(evals.max()) > 0:
        raise ValueError("the whitening features have zero covariance (all zero?)")
    floor = evals.max() * eps_ratio
    evals = torch.where(evals < floor, floor, evals)
    total = float(evals.sum())
    order = torch.argsort(evals, descending=True)[:dim]
    evals, evecs = evals[order], evecs[:, order]
    projection = torch.diag(evals.pow(-power)) @ evecs.T
    return Whitening(mean=mean, projection=projection, eigenvalues=evals,
                     energy=float(evals.sum()) / total)
