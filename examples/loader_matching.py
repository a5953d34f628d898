"""Token matches computed in the data loader, with the crops (the CPU crop path).

Builds PW-Self's multi-crop dataset on the bundled Fashion-MNIST subset and a DataLoader
whose ``collate_fn`` is :class:`~pwself_reference.augment.MatchingCollate`: each batch
arrives with the matches of every (teacher, student) view pair, so a training step
does not compute them. Checks them against matching the batch afterwards.

Usage: python examples/loader_matching.py [--workers 1] [--rule half]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from patchaug import RULES
from pwself_reference.augment import (
    CropSpec,
    MatchingCollate,
    MultiCropDataset,
    match_views,
    view_grids,
)
from pwself_reference.data import build_pretrain_dataset

PATCH = 4  # a 28 px global view is a 7 x 7 grid, a 12 px local view 3 x 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=1, help="data loader worker processes")
    parser.add_argument("--rule", choices=RULES, default="half", help="matching rule")
    parser.add_argument("--batches", type=int, default=3, help="batches to draw")
    args = parser.parse_args()

    base = build_pretrain_dataset("fashion-mnist-mini", None)  # bundled, offline
    spec = CropSpec(28, 12, n_global=2, n_local=4)
    dataset = MultiCropDataset(base, spec, seed=0)
    # the matching runs where the crops are drawn: in the workers, beside training
    loader = DataLoader(dataset, batch_size=16, shuffle=True, num_workers=args.workers,
                        collate_fn=MatchingCollate(spec.n_global, PATCH, args.rule))

    for n, batch in enumerate(loader):
        if n == args.batches:
            break
        assert batch.matches is not None, "the collate attaches the matches"
        # the same dict a training step would compute from the batch's boxes and flips
        again = match_views(batch.boxes, batch.flips, view_grids(batch.views, PATCH),
                            spec.n_global, args.rule)
        assert list(batch.matches) == list(again)
        for key, m in again.items():
            got = batch.matches[key]
            assert torch.equal(got.idx_a, m.idx_a) and torch.equal(got.idx_b, m.idx_b)
            assert torch.equal(got.valid, m.valid)
        m = batch.matches[(0, spec.n_global)]  # global view 0 and the first local view
        print(f"batch {n}: {len(batch.matches)} view pairs; pair (0, {spec.n_global}): "
              f"idx {tuple(m.idx_a.shape)}, matched tokens per image "
              f"{(m.num_valid - 1).tolist()} (+ CLS)")
    print("every batch carried its matches")


if __name__ == "__main__":
    main()
