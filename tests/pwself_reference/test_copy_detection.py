"""Copy detection: scoring, whitening, Copydays layout, and an end-to-end run on real photos."""

from __future__ import annotations

import pytest
import torch

from pwself_reference.evaluation import (
    CopydaysBenchmark,
    evaluate_copy_detection,
    learn_whitening,
    score_copy_detection,
)
from pwself_reference.evaluation.synthetic import ORIGINAL_PHOTOS, make_copy_detection_benchmark

pytest.importorskip("skimage")


def small_vit(seed=0, embed_dim=48):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=embed_dim, depth=4, num_heads=3,
                             num_classes=0, dynamic_img_size=True).eval()


def blind(net):
    """The same network made input-independent: zero patch embedding."""
    with torch.no_grad():
        net.patch_embed.proj.weight.zero_()
        net.patch_embed.proj.bias.zero_()
    return net


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_copy_detection_benchmark(tmp_path_factory.mktemp("copydays"), seed=0)


# ---------------------------------------------------------------- scoring
def test_top20_ap_by_hand():
    db = torch.eye(25)
    # query close to image 3 then 7 (positives {3, 7}) -> ranks 0 and 1 -> AP 1
    q1 = torch.zeros(25)
    q1[3], q1[7] = 1.0, 0.9
    # query whose single positive (image 4) is ranked 3rd -> (0/2 + 1/3)/2 = 1/6
    q2 = torch.zeros(25)
    q2[0], q2[1], q2[4] = 1.0, 0.9, 0.8
    # positive ranked 22nd: outside the top-20 list -> AP 0
    q3 = torch.linspace(1.0, 0.5, 25)
    m, aps = score_copy_detection(torch.stack([q1, q2, q3]), db, [[3, 7], [4], [21]])
    assert aps == pytest.approx([1.0, 1 / 6, 0.0])
    assert m == pytest.approx((1 + 1 / 6) / 3)
    # a larger top-k reaches it: ranked 22nd (0-based 21) -> (0/21 + 1/22)/2
    _, aps = score_copy_detection(q3[None], db, [[21]], topk=25)
    assert aps == pytest.approx([1 / 44])


def test_score_bad_input():
    with pytest.raises(ValueError, match="share D"):
        score_copy_detection(torch.zeros(2, 3), torch.zeros(4, 2), [[0], [1]])
    with pytest.raises(ValueError, match="1 positive lists for 2 queries"):
        score_copy_detection(torch.ones(2, 3), torch.ones(4, 3), [[0]])
    with pytest.raises(ValueError, match="no positive"):
        score_copy_detection(torch.ones(1, 3), torch.ones(4, 3), [[]])


# ---------------------------------------------------------------- whitening
def test_whitening_uses_dino_uncentred_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3, 2, 1, 1, .5])
    x = x + 4.0  # a large mean: centred and uncentred covariances differ a lot
    w = learn_whitening(x)
    p = w.projection
    uncentred = x.T @ x / 400
    centred = (x - x.mean(0)).T @ (x - x.mean(0)) / 400
    torch.testing.assert_close(p @ uncentred @ p.T, torch.eye(6, dtype=torch.float64))
    assert not torch.allclose(p @ centred @ p.T, torch.eye(6, dtype=torch.float64), atol=0.1)
    torch.testing.assert_close(w.mean, x.mean(0))
    # apply subtracts the mean, then projects
    torch.testing.assert_close(w.apply(x[:3]), (x[:3] - x.mean(0)) @ p.T)
    # the textbook variant whitens the centred data exactly
    wc = learn_whitening(x, centered=True)
    y = wc.apply(x)
    torch.testing.assert_close(y.T @ y / 400, torch.eye(6, dtype=torch.float64))
    assert torch.all(w.eigenvalues[:-1] >= w.eigenvalues[1:])
    assert learn_whitening(x, dim=2).apply(x).shape == (400, 2)


def test_whitening_floors_tiny_eigenvalues():
    x = torch.randn(50, 3, dtype=torch.float64)
    x = torch.cat([x, torch.zeros(50, 1, dtype=torch.float64)], dim=1)  # rank 3 of 4
    w = learn_whitening(x)
    assert torch.isfinite(w.projection).all()
    assert w.eigenvalues[-1] == pytest.approx(w.eigenvalues[0] * 1e-5)
    with pytest.raises(ValueError, match="zero covariance"):
        learn_whitening(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        learn_whitening(torch.ones(1, 3))


# ---------------------------------------------------------------- layout
def test_copydays_layout_and_positives(bench):
    b = CopydaysBenchmark.from_directory(bench)
    assert b.blocks == ["original", "strong", "jpegqual/10", "crops/50"]
    assert len(b.originals) == len(ORIGINAL_PHOTOS)
    assert len(b.queries["strong"]) == 2 * len(ORIGINAL_PHOTOS)
    # strong images map to the original sharing the first 4 characters
    for q, pos in zip(b.queries["strong"], b.positives["strong"]):
        assert [b.originals[j].name[:4] for j in pos] == [q.name[:4]]
    assert b.positives["crops/50"] == [[j] for j in range(len(ORIGINAL_PHOTOS))]


def test_layout_errors(tmp_path, bench):
    with pytest.raises(FileNotFoundError, match="not found"):
        CopydaysBenchmark.from_directory(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="original"):
        CopydaysBenchmark.from_directory(tmp_path)
    import shutil

    root = tmp_path / "cd"
    shutil.copytree(bench / "original", root / "original")
    shutil.copytree(bench / "crops/50", root / "crops/50")
    (root / "crops/50" / "100000.jpg").unlink()
    with pytest.raises(ValueError, match="one attack per original"):
        CopydaysBenchmark.from_directory(root)
    (root / "strong").mkdir()
    shutil.copy(bench / "strong" / "100000.jpg", root / "strong" / "999900.jpg")
    with pytest.raises(ValueError, match="without an original"):
        CopydaysBenchmark.from_directory(root, blocks=["strong"])


# ---------------------------------------------------------------- end to end
def test_end_to_end_random_vs_blind_network(bench):
    kw = {"imsize": 64, "distractors_path": bench / "distractors", "batch_size": 16}
    random_net = evaluate_copy_detection(small_vit(), bench, **kw)
    n_db = random_net["n_originals"] + random_net["n_distractors"]
    assert n_db == len(ORIGINAL_PHOTOS) + 24
    # chance: the single positive is uniformly placed among n_db images
    chance = (1 + sum(1 / (2 * (r + 1)) for r in range(1, 20))) / n_db
    m = random_net["mAP"]
    assert m["original"] == 100.0  # every original retrieves itself first
    assert m["jpegqual/10"] >= 90.0
    assert 3 * 100 * chance < m["strong"] < 95.0  # strong attacks are hard, not hopeless
    assert random_net["strong_mAP"] == m["strong"]

    # an input-independent network: every descriptor is equal, all similarities tie, the
    # ranking is the database order, so the AP of a query whose original has index i is
    # 1 for i = 0, (0/i + 1/(i+1))/2 for i < 20, and 0 beyond the top 20
    blind_net = evaluate_copy_detection(blind(small_vit()), bench, **kw)
    b = CopydaysBenchmark.from_directory(bench)

    def tie_ap(i):
        return 1.0 if i == 0 else (1 / (i + 1)) / 2 if i < 20 else 0.0

    for block in b.blocks:
        expected = 100 * sum(tie_ap(p[0]) for p in b.positives[block]) / len(b.positives[block])
        assert blind_net["mAP"][block] == pytest.approx(expected, abs=1e-9)
    assert blind_net["mAP"]["strong"] < m["strong"] - 20

    # whitening learned on other photos changes the descriptors and the scores
    whitened = evaluate_copy_detection(small_vit(), bench, whitening_path=bench / "whitening", **kw)
    assert whitened["whitening"]["n_images"] == 64
    assert whitened["mAP"]["original"] == 100.0
    assert whitened["mAP"]["strong"] != m["strong"]
    assert 3 * 100 * chance < whitened["mAP"]["strong"] <= 100.0


def test_end_to_end_checkpoint_from_train_py_vs_its_random_initialisation(bench, tmp_path):
    """A backbone trained by ``train.py`` (briefly, on the bundled data) and the same
    architecture at initialisation give different mAPs, both well above chance."""
    from pwself_reference import train as train_mod
    from pwself_reference.checkpoint import load_backbone, load_checkpoint
    from pwself_reference.models import build_backbone

    out = tmp_path / "run"
    train_mod.main([
        "--output-dir", str(out), "--train-subset", "256", "--test-subset", "40", "--batch-size", "32",
        "--epochs", "2", "--depth", "2", "--embed-dim", "48", "--num-heads", "3", "--out-dim", "64",
        "--head-hidden-dim", "64", "--head-bottleneck-dim", "32", "--local-crops-number", "2",
        "--knn-every", "0", "--no-plots", "--no-progress", "--threads", "1", "--warmup-epochs", "0",
        "--lr", "2e-3", "--freeze-last-layer", "0",
    ])
    trained, cfg = load_backbone(out / "final.pth")
    assert load_checkpoint(out / "final.pth")["step"] == 16
    torch.manual_seed(0)
    init = build_backbone(cfg["arch"], cfg["patch_size"], cfg["global_crop_size"], depth=cfg["depth"],
                          embed_dim=cfg["embed_dim"], num_heads=cfg["num_heads"]).eval()
    kw = {"imsize": 64, "distractors_path": bench / "distractors", "batch_size": 16}
    got = {name: evaluate_copy_detection(net.eval(), bench, **kw)["mAP"]
           for name, net in (("trained", trained), ("init", init))}
    n_db = len(ORIGINAL_PHOTOS) + 24
    chance = 100 * (1 + sum(1 / (2 * (r + 1)) for r in range(1, 20))) / n_db
    for m in got.values():
        assert m["original"] == 100.0
        assert 2 * chance < m["strong"] < 100.0
    print({k: round(v["strong"], 2) for k, v in got.items()})
    assert got["trained"]["strong"] != got["init"]["strong"]
