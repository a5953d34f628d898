"""knn_classify: DINO's weighted k-NN vote on features with a known answer."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pwself_reference.evaluation import knn_classify


def brute_force_knn(train, train_labels, test, test_labels, k, T):
    """Per-image loop: cosine neighbours, exp(s/T) votes, every class ranked by its vote."""
    n_classes = max(train_labels.tolist() + test_labels.tolist()) + 1
    top1 = top5 = 0
    for x, y in zip(test.tolist(), test_labels.tolist()):
        sims = []
        for f, label in zip(train.tolist(), train_labels.tolist()):
            dot = sum(a * b for a, b in zip(x, f))
            norm = math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in f))
            sims.append((dot / norm, label))
        sims.sort(key=lambda t: -t[0])
        votes: dict[int, float] = {}
        for s, label in sims[:k]:
            votes[label] = votes.get(label, 0.0) + math.exp(s / T)
        ranked = sorted(range(n_classes), key=lambda c: (-votes.get(c, 0.0), c))
        top1 += ranked[0] == y
        top5 += y in ranked[: min(5, k)]
    n = len(test_labels)
    return 100.0 * top1 / n, 100.0 * top5 / n


def test_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=g) * 5
    train_y = torch.arange(6).repeat_interleave(10)
    test_y = torch.arange(6).repeat_interleave(3)
    train = centres[train_y] + 0.1 * torch.randn(60, 16, generator=g)
    test = centres[test_y] + 0.1 * torch.randn(18, 16, generator=g)
    assert knn_classify(train, train_y, test, test_y, k=5) == (100.0, 100.0)
    # shuffled test labels: only the images whose label survived the shuffle are right
    perm = torch.tensor([3, 4, 5, 0, 1, 2]).repeat_interleave(3)
    top1, _ = knn_classify(train, train_y, test, perm, k=5)
    assert top1 == 0.0


def test_weights_follow_the_temperature():
    # two neighbours of class 0 at cosine 0.5 against one of class 1 at cosine 0.9:
    # exp(0.9/0.07) > 2 exp(0.5/0.07) so class 1 wins at T=0.07, while an almost flat
    # vote (T=100) counts heads and class 0 wins
    angle = math.acos(0.5)
    train = torch.tensor([[0.5, math.sin(angle), 0.0], [0.5, 0.0, math.sin(angle)],
                          [0.9, math.sqrt(1 - 0.81), 0.0]])
    labels = torch.tensor([0, 0, 1])
    query = torch.tensor([[1.0, 0.0, 0.0]])
    assert knn_classify(train, labels, query, torch.tensor([1]), k=3, T=0.07)[0] == 100.0
    assert knn_classify(train, labels, query, torch.tensor([0]), k=3, T=100.0)[0] == 100.0
    # with k=1 only the closest neighbour votes; top-5 over min(5, k) = 1 class
    assert knn_classify(train, labels, query, torch.tensor([0]), k=1, T=100.0) == (0.0, 0.0)


def test_top5_counts_the_five_best_voted_classes():
    # 7 classes, each train point its own direction; the query is closest to class 6,
    # then 5, 4, ... so class 1 is 6th: out of top-5, class 2 is 5th: inside.
    dirs = torch.eye(8)[:7]
    query = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.0]])
    labels = torch.arange(7)
    assert knn_classify(dirs, labels, query, torch.tensor([2]), k=7) == (0.0, 100.0)
    assert knn_classify(dirs, labels, query, torch.tensor([1]), k=7) == (0.0, 0.0)
    assert knn_classify(dirs, labels, query, torch.tensor([6]), k=7) == (100.0, 100.0)


@given(
    seed=st.integers(0, 10_000),
    n_train=st.integers(1, 30),
    n_test=st.integers(1, 12),
    n_classes=st.integers(1, 8),
    data=st.data(),
)
@settings(max_examples=40)
def test_matches_brute_force(seed, n_train, n_test, n_classes, data):
    k = data.draw(st.integers(1, n_train))
    T = data.draw(st.sampled_from([0.07, 0.5, 3.0]))
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, 5, generator=g, dtype=torch.float64)
    test = torch.randn(n_test, 5, generator=g, dtype=torch.float64)
    train_y = torch.randint(n_classes, (n_train,), generator=g)
    test_y = torch.randint(n_classes, (n_test,), generator=g)
    got = knn_classify(train, train_y, test, test_y, k=k, T=T)
    assert got == pytest.approx(brute_force_knn(train, train_y, test, test_y, k, T))


def test_chunking_scale_and_num_classes_do_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(200, 8, generator=g), torch.randn(37, 8, generator=g)
    train_y, test_y = torch.randint(10, (200,), generator=g), torch.randint(10, (37,), generator=g)
    ref = knn_classify(train, train_y, test, test_y, k=20)
    # one test image per chunk, and fewer test images than DINO's 100 chunks
    assert knn_classify(train, train_y, test, test_y, k=20, memory_budget=1) == ref
    assert knn_classify(train * 7.0, train_y, test * 0.01, test_y, k=20) == ref
    assert knn_classify(train, train_y, test, test_y, k=20, num_classes=50) == ref
    assert knn_classify(train.double(), train_y, test.double(), test_y, k=20) == ref
    top1, top5 = ref
    assert isinstance(top1, float) and 0 <= top1 <= top5 <= 100


def test_accelerator_or_float64_matches_cpu_float32():
    """On a GPU machine: CUDA equals CPU. Without one: float64 inputs equal float32 ones."""
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(500, 32, generator=g), torch.randn(300, 32, generator=g)
    train_y, test_y = torch.randint(10, (500,), generator=g), torch.randint(10, (300,), generator=g)
    cpu = knn_classify(train, train_y, test, test_y, k=20)
    if torch.cuda.is_available():
        other = knn_classify(train.cuda(), train_y, test.cuda(), test_y.cuda(), k=20)
    else:
        other = knn_classify(train.double(), train_y, test.double(), test_y, k=20)
    assert other == cpu


def test_bad_input_is_rejected():
    train, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    test, test_y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="k=5 is larger than the number of train images"):
        knn_classify(train, labels, test, test_y, k=5)
    with pytest.raises(ValueError, match="train_labels has 3 labels but train_features has 4"):
        knn_classify(train, labels[:3], test, test_y, k=2)
    with pytest.raises(ValueError, match="test_labels has 1 labels"):
        knn_classify(train, labels, test, test_y[:1], k=2)
    with pytest.raises(ValueError, match="D=3 but test_features have D=2"):
        knn_classify(train, labels, test[:, :2], test_y, k=2)
    with pytest.raises(ValueError, match="2-D"):
        knn_classify(train[0], labels, test, test_y, k=2)
    with pytest.raises(TypeError, match="integer class ids"):
        knn_classify(train, labels.float(), test, test_y, k=2)
    with pytest.raises(ValueError, match="num_classes=1"):
        knn_classify(train, labels, test, test_y, k=2, num_classes=1)
    with pytest.raises(ValueError, match="T must be"):
        knn_classify(train, labels, test, test_y, k=2, T=0.0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        knn_classify(train, labels, test, test_y, k=0)
    with pytest.raises(ValueError, match="at least one"):
        knn_classify(train, labels, test[:0], test_y[:0], k=2)
    with pytest.raises(ValueError, match="non-negative"):
        knn_classify(train, labels - 1, test, test_y, k=2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        knn_classify(train.numpy(), labels, test, test_y, k=2)
