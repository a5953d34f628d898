"""``ViewAugment``: the patch jitter runs once per view size, on every view; the token
matches computed at collate time (``MatchingCollate``) are those of every view pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchaug import PatchJitter, match_patches
from pwself_reference.augment import (
    MatchingCollate,
    MultiCropBatch,
    ViewAugment,
    collate_multicrop,
    match_views,
    view_grids,
)


class _Recorder:
    """A stand-in jitter that records its inputs and marks its output."""

    def __init__(self) -> None:
        self.calls: list[torch.Size] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape)
        return x * 0.5


def _views(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.rand(3, 3, 32, 32, generator=g) for _ in range(2)]
            + [torch.rand(3, 3, 16, 16, generator=g) for _ in range(4)])


def test_one_jitter_call_per_view_size_covering_every_view():
    rec = _Recorder()
    views = _views()
    torch.manual_seed(1)
    jittered = ViewAugment(2, 4, patch_jitter=rec)(views)
    torch.manual_seed(1)
    plain = ViewAugment(2, 4)(views)
    assert rec.calls == [torch.Size([6, 3, 32, 32]), torch.Size([12, 3, 16, 16])]
    # normalize(0.5 * x) for every view, in the original order
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for a, b in zip(jittered, plain):
        want = ((b * std + mean) * 0.5 - mean) / std
        torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)


def test_a_lone_view_size_is_jittered_alone():
    rec = _Recorder()
    ViewAugment(1, 2, patch_jitter=rec)(_views()[1:4])
    assert rec.calls == [torch.Size([3, 3, 32, 32]), torch.Size([6, 3, 16, 16])]


def test_patch_jitter_with_p_zero_changes_nothing():
    views = _views(2)
    torch.manual_seed(3)
    a = ViewAugment(2, 4, patch_jitter=PatchJitter(16, p=0.0))(views)
    torch.manual_seed(3)
    b = ViewAugment(2, 4)(views)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- loader-side matching
def _multicrop_dataset(n: int = 6, same_spatial: bool = False):
    """Random RGB images of a few sizes, two 32 px global and three 16 px local views each."""
    from PIL import Image

    from pwself_reference.augment import CropSpec, MultiCropDataset

    rng = np.random.default_rng(0)
    sizes = [(40, 40), (48, 36), (33, 57)]
    base = [(Image.fromarray(rng.integers(0, 256, (*sizes[k % 3], 3), dtype=np.uint8)), 0)
            for k in range(n)]
    return MultiCropDataset(base, CropSpec(32, 16, n_global=2, n_local=3), seed=3,
                            same_spatial=same_spatial)


@pytest.mark.parametrize("rule", ["half", "official", "centre"])
def test_collated_matches_are_those_of_each_pair(rule):
    """Every row of the batched, grouped matching is the single-pair ``match_patches`` result."""
    ds = _multicrop_dataset()
    batch = MatchingCollate(2, 8, rule)([ds[k] for k in range(len(ds))])
    grids = [(4, 4)] * 2 + [(2, 2)] * 3
    assert sorted(batch.matches) == [(i, j) for i in range(2) for j in range(5) if j != i]
    # not a vacuous comparison: some pairs match patches beyond the CLS pair
    assert max(int(m.num_valid.max()) for m in batch.matches.values()) > 1
    for (i, j), m in batch.matches.items():
        assert m.idx_a.shape == m.idx_b.shape == m.valid.shape == (6, 1 + 4 * (4 if j < 2 else 1))
        assert m.idx_a.dtype == m.idx_b.dtype == torch.int64 and m.valid.dtype == torch.bool
        for b in range(6):
            one = match_patches(batch.boxes[i, b], batch.boxes[j, b], grids[i], grids[j],
                                batch.flips[i, b], batch.flips[j, b], rule=rule)
            assert torch.equal(m.idx_a[b], one.idx_a) and torch.equal(m.idx_b[b], one.idx_b)
            assert torch.equal(m.valid[b], one.valid)


def test_plain_collate_brings_no_matches():
    ds = _multicrop_dataset(2)
    assert collate_multicrop([ds[0], ds[1]]).matches is None


def test_to_moves_the_matches():
    ds = _multicrop_dataset(2)
    batch = MatchingCollate(2, 8, "half")([ds[0], ds[1]])
    moved = batch.to("meta", non_blocking=True)
    assert moved.matches is not None and sorted(moved.matches) == sorted(batch.matches)
    for m in moved.matches.values():
        assert all(t.device.type == "meta" for t in (m.idx_a, m.idx_b, m.valid))
    assert batch.to("cpu").matches[(0, 1)].idx_a.equal(batch.matches[(0, 1)].idx_a)
    assert collate_multicrop([ds[0], ds[1]]).to("meta").matches is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_pins_the_matches():
    ds = _multicrop_dataset(2)
    pinned = MatchingCollate(2, 8, "half")([ds[0], ds[1]]).pin_memory()
    assert all(t.is_pinned() for m in pinned.matches.values() for t in (m.idx_a, m.idx_b, m.valid))


@pytest.mark.parametrize("num_workers, same_spatial", [(0, False), (1, True)])
def test_data_loader_batches_carry_their_matches(num_workers, same_spatial):
    from torch.utils.data import DataLoader

    ds = _multicrop_dataset(8, same_spatial)
    loader = DataLoader(ds, batch_size=4, num_workers=num_workers,
                        collate_fn=MatchingCollate(2, 8, "centre"))
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert isinstance(batch, MultiCropBatch) and batch.matches is not None
        want = match_views(batch.boxes, batch.flips, view_grids(batch.views, 8), 2, "centre")
        assert list(batch.matches) == list(want)
        for key, m in want.items():
            got = batch.matches[key]
            assert all(torch.equal(a, b) for a, b in zip((got.idx_a, got.idx_b, got.valid),
                                                         (m.idx_a, m.idx_b, m.valid)))


def test_photometric_ranges_are_patchjitters_paper_ranges():
    """One definition: the per-image colour jitter draws from PatchJitter.paper's operators."""
    from patchaug import PatchJitter
    from pwself_reference.augment import BatchPhotometric, color_jitter_operators

    paper = {op.name: op for op in PatchJitter.paper(16).operators}
    for name, op in color_jitter_operators().items():
        assert op == paper[name]
    aug = BatchPhotometric(blur_p=0.0)
    assert aug.jitter_p == paper["brightness"].p and aug.solarize_threshold == paper["solarize"].low


def test_photometric_generator_owns_the_draws():
    from pwself_reference.augment import BatchPhotometric, ViewAugment

    x = torch.rand(6, 3, 12, 12)
    aug = BatchPhotometric(blur_p=0.5, solarize_p=0.5)
    torch.manual_seed(1)
    a = aug(x, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(2)  # the global generator does not matter
    b = aug(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, x)
    # without a generator: torch's global one, as the training step seeds it
    torch.manual_seed(4)
    c = aug(x)
    torch.manual_seed(4)
    assert torch.equal(c, aug(x))
    views = ViewAugment(3, 2)
    assert views.ops == [views.global1, views.global2, views.global_more, views.local, views.local]
    assert (views.global1.blur_p, views.global2.solarize_p, views.local.blur_p) == (1.0, 0.2, 0.5)
