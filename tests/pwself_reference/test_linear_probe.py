"""Frozen features (last-n-blocks CLS, avg-pool, GeM) and the linear probe."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from pwself_reference.evaluation import (
    LinearClassifier,
    cls_features,
    crop_to_patch_multiple,
    extract_features,
    gem_features,
    last_blocks_features,
    linear_probe,
    multiscale_features,
    train_linear_classifier,
)
from pwself_reference.models import backbone_tokens


@pytest.fixture(scope="module")
def net():
    """A small timm ViT (the evaluation code only relies on the timm ViT interface)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=6, num_heads=3,
                             num_classes=0, dynamic_img_size=True).eval()


def manual_blocks(net, x):
    """Run the timm ViT block by block, returning every normed block output."""
    h = net.norm_pre(net._pos_embed(net.patch_embed(x)))
    outs = []
    for blk in net.blocks:
        h = blk(h)
        outs.append(net.norm(h))
    return outs


def test_last_blocks_features_are_normed_cls_tokens(net):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outs = manual_blocks(net, x)
        f1 = cls_features(net, x)
        f4 = last_blocks_features(net, x, n_last_blocks=4)
        f4p = last_blocks_features(net, x, n_last_blocks=4, avgpool_patchtokens=True)
        f1p = last_blocks_features(net, x, n_last_blocks=1, avgpool_patchtokens=True)
        l1 = last_blocks_features(net, x, n_last_blocks=1)
    d = net.embed_dim
    assert f1.shape == (3, d) and f4.shape == (3, 4 * d) and f4p.shape == (3, 5 * d)
    torch.testing.assert_close(f1, outs[-1][:, 0])
    torch.testing.assert_close(l1, f1)
    torch.testing.assert_close(f4, torch.cat([o[:, 0] for o in outs[-4:]], dim=1))
    torch.testing.assert_close(f4p[:, 4 * d:], outs[-1][:, 1:].mean(dim=1))
    torch.testing.assert_close(f1p, torch.cat([outs[-1][:, 0], outs[-1][:, 1:].mean(1)], 1))
    with pytest.raises(ValueError, match="exceeds the backbone depth"):
        last_blocks_features(net, x, n_last_blocks=7)


def test_gem_and_multiscale_descriptors(net):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone_tokens(net, x)
        gem = gem_features(net, x, p=4.0)
        ms = multiscale_features(net, x)
        half = backbone_tokens(net, torch.nn.functional.interpolate(
            x, scale_factor=0.5, mode="bilinear", align_corners=False))[:, 0]
        small = backbone_tokens(net, torch.nn.functional.interpolate(
            x, scale_factor=1 / math.sqrt(2), mode="bilinear", align_corners=False)[..., :16, :16])[:, 0]
    patches = tokens[:, 1:].clamp(min=1e-6)
    expected = (patches ** 4).mean(dim=1) ** 0.25
    torch.testing.assert_close(gem, torch.cat([tokens[:, 0], expected], dim=1))
    # GeM(4) lies between the mean and the max of the clamped patch tokens
    assert torch.all(gem[:, 48:] >= patches.mean(1) - 1e-5)
    assert torch.all(gem[:, 48:] <= patches.amax(1) + 1e-5)
    mean_cls = (tokens[:, 0] + small + half) / 3
    torch.testing.assert_close(ms, mean_cls / mean_cls.norm(dim=1, keepdim=True))


def test_inputs_are_cropped_to_whole_patches(net):
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        torch.testing.assert_close(cls_features(net, x),
                                   backbone_tokens(net, x[..., :32, :40])[:, 0])
    assert crop_to_patch_multiple(x, 8).shape[-2:] == (32, 40)
    with pytest.raises(ValueError, match="smaller than one patch"):
        crop_to_patch_multiple(x[..., :5, :], 8)


def test_extract_features_restores_mode_and_keeps_order(net):
    net.train()
    images = torch.randn(10, 3, 32, 32)
    loader = [(images[i: i + 4], torch.arange(i, min(i + 4, 10))) for i in range(0, 10, 4)]
    feats, labels = extract_features(net, loader, "cpu")
    assert net.training  # restored
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, backbone_tokens(net, images)[:, 0])
    assert labels.tolist() == list(range(10))
    with pytest.raises(ValueError, match="no images"):
        extract_features(net, [], "cpu")
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        extract_features(net, [(images[:4], [0, 1, 2])], "cpu")


def test_extract_features_runs_the_chosen_feature_function(net):
    images = torch.randn(6, 3, 32, 32)
    loader = [(images[:4], torch.arange(4)), (images[4:], torch.arange(4, 6))]
    for features in (partial(last_blocks_features, n_last_blocks=3, avgpool_patchtokens=True),
                     partial(gem_features, p=3.0), multiscale_features):
        feats, _ = extract_features(net, loader, "cpu", features=features)
        with torch.no_grad():
            torch.testing.assert_close(feats, features(net, images))


def gaussian_classes(n_per_class, n_classes, dim, seed, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_linear_classifier_learns_separable_classes():
    xtr, ytr = gaussian_classes(40, 6, 12, seed=0)
    xte, yte = gaussian_classes(20, 6, 12, seed=1)
    out = train_linear_classifier(xtr, ytr, xte, yte, epochs=15, lr=0.5, batch_size=32)
    assert out["best_top1"] >= 95.0 and out["top5_at_best"] == 100.0
    assert len(out["history"]) == 15 and all("top1" in h for h in out["history"])
    assert out["best_top1"] == max(h["top1"] for h in out["history"])
    # the loss decreases from the first to the last epoch
    assert out["history"][-1]["train_loss"] < 0.5 * out["history"][0]["train_loss"]
    # the same seed gives the same run
    again = train_linear_classifier(xtr, ytr, xte, yte, epochs=15, lr=0.5, batch_size=32)
    assert again["history"] == out["history"]


def test_labels_unrelated_to_features_stay_near_chance():
    xtr, _ = gaussian_classes(50, 4, 12, seed=0)
    xte, _ = gaussian_classes(50, 4, 12, seed=1)
    g = torch.Generator().manual_seed(5)
    ytr, yte = torch.randint(4, (200,), generator=g), torch.randint(4, (200,), generator=g)
    out = train_linear_classifier(xtr, ytr, xte, yte, epochs=10, lr=0.5, batch_size=32)
    assert out["final_top1"] < 40.0  # chance is 25%
    assert out["final_top5"] is None  # fewer than 5 classes: no top-5


def test_validation_schedule_and_initialisation():
    clf = LinearClassifier(1000, 500)
    assert clf.linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(clf.linear.bias == 0)
    x, y = gaussian_classes(10, 3, 4, seed=0)
    out = train_linear_classifier(x, y, x, y, epochs=7, lr=0.1, val_freq=3)
    validated = [h["epoch"] for h in out["history"] if "top1" in h]
    assert validated == [0, 3, 6]  # every val_freq epochs and the last one


def test_bad_input():
    x, y = gaussian_classes(10, 3, 4, seed=0)
    with pytest.raises(ValueError, match="train_labels has 29 labels but train_features has 30"):
        train_linear_classifier(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="D=4 but test_features have D=3"):
        train_linear_classifier(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="num_classes=2"):
        train_linear_classifier(x, y, x, y, num_classes=2)
    with pytest.raises(ValueError, match="epochs"):
        train_linear_classifier(x, y, x, y, epochs=0)
    with pytest.raises(TypeError, match="integer"):
        train_linear_classifier(x, y.float(), x, y)


def test_linear_probe_on_a_frozen_backbone(net):
    # two colour classes (reddish vs bluish noise images): trivially separable by a ViT
    def batches(n, seed):
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(2):
            labels = torch.randint(2, (n,), generator=gen)
            imgs = torch.rand(n, 3, 32, 32, generator=gen) * 0.5
            imgs[:, 0] += 0.8 * (labels == 0).float()[:, None, None]
            imgs[:, 2] += 0.8 * (labels == 1).float()[:, None, None]
            out.append((imgs, labels))
        return out

    train, val = batches(16, 1), batches(16, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = linear_probe(net, train, val, num_classes=2, n_last_blocks=2, epochs=3, lr=1.0)
    assert out["best_top1"] == 100.0
    assert out["classifier"].linear.in_features == 2 * net.embed_dim
    for k, v in net.state_dict().items():  # frozen
        assert torch.equal(v, before[k])
    assert not net.training
