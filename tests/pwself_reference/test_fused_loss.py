"""The fused, chunked head-output loss against the readable reference and PWSelfLoss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from patchaug import PatchMatch
from pwself_reference.augment import CropSpec, batched_multicrop, match_views, view_grids
from pwself_reference.config import parse_args
from pwself_reference.fused_loss import _plan, fused_head_loss, reference_head_loss
from pwself_reference.losses import LOSSES, LossSlots, PWSelfLoss, matched_token_masks
from pwself_reference.models import DINOHead, build_backbone
from pwself_reference.network import HeadOutput, MultiCropNetwork

B, D, K = 3, 8, 48
T_TEACHER = 5                  # tokens per global view
S_TOKENS = [5, 5, 3, 3]        # two global + two local student views
TAU_S, TAU_T = 0.1, 0.04


def random_matches(gen: torch.Generator, n_teacher: int = 2, s_tokens=S_TOKENS,
                   t_tokens: int = T_TEACHER, slots: int = 4) -> dict:
    """(B, M) matches per (i, j), slot 0 the (CLS, CLS) pair, random patch slots; some
    images get no patch match at all."""
    out = {}
    for j, tj in enumerate(s_tokens):
        for i in range(n_teacher):
            if i == j:
                continue
            idx_a = torch.randint(1, t_tokens, (B, slots), generator=gen)
            idx_b = torch.randint(1, tj, (B, slots), generator=gen)
            valid = torch.rand(B, slots, generator=gen) < 0.6
            valid[-1, 1:] = False           # the last image: CLS only
            idx_a[:, 0] = idx_b[:, 0] = 0
            valid[:, 0] = True
            out[(i, j)] = PatchMatch(idx_a=idx_a, idx_b=idx_b, valid=valid)
    return out


def matched_pairs(matches, loss: str, lam: float = 0.3) -> LossSlots:
    """PWSelfLoss's weighted slots for rows stacked view by view (D-wide rows will do)."""
    crit = PWSelfLoss(K, T_TEACHER, loss=loss, lam=lam)
    student = HeadOutput(torch.zeros(B * sum(S_TOKENS), D), B, tuple(S_TOKENS))
    teacher = HeadOutput(torch.zeros(2 * B * T_TEACHER, D), B, (T_TEACHER, T_TEACHER))
    return crit.loss_slots(student, teacher, matches)


def setup(seed: int = 0, norm_last_layer: bool = True):
    gen = torch.Generator().manual_seed(seed)
    n_s = B * sum(S_TOKENS)
    n_t = B * T_TEACHER * 2
    xs = F.normalize(torch.randn(n_s, D, generator=gen), dim=-1)
    xt = F.normalize(torch.randn(n_t, D, generator=gen), dim=-1)
    v = torch.randn(K, D, generator=gen).requires_grad_()
    g = (1 + 0.1 * torch.rand(K, 1, generator=gen)).requires_grad_(not norm_last_layer)
    wt = F.normalize(torch.randn(K, D, generator=gen), dim=-1)
    return gen, xs, v, g, xt, wt


def centre(gen, mode: str):
    if mode == "global":
        return 0.3 * torch.randn(1, K, generator=gen), None
    c = 0.3 * torch.randn(T_TEACHER, K, generator=gen)
    index = torch.arange(T_TEACHER).repeat(2 * B)      # row (view, image, token) -> token
    return c, index


def grads(loss, tensors):
    out = torch.autograd.grad(loss, [t for t in tensors if t.requires_grad], allow_unused=True)
    return [torch.zeros_like(t) if o is None else o for t, o in
            zip([t for t in tensors if t.requires_grad], out)]


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = max(float(b.abs().max()), 1e-6)
    assert float((a.float() - b.float()).abs().max()) <= rel * scale, (a, b)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", ["global", "per-token"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_fused_equals_reference(loss, mode, chunk, norm_last_layer):
    gen, xs, v, g, xt, wt = setup(1, norm_last_layer)
    xs.requires_grad_()
    c, index = centre(gen, mode)
    pairs = matched_pairs(random_matches(gen), loss)
    leaves = [xs, v, g]
    ref = reference_head_loss(xs, g * F.normalize(v, dim=-1), xt, wt, c, pairs, TAU_S, TAU_T,
                              center_index=index)
    fused = fused_head_loss(xs, g * F.normalize(v, dim=-1), xt, wt, c, pairs, TAU_S, TAU_T,
                            center_index=index, chunk_size=chunk)
    assert torch.allclose(fused, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(fused, leaves), grads(ref, leaves)):
        close(a, b, 1e-5)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", ["global", "per-token"])
def test_fused_bfloat16(loss, mode):
    """bfloat16 features and weight: the products in bfloat16, loose tolerance."""
    gen, xs, v, g, xt, wt = setup(2)
    c, index = centre(gen, mode)
    pairs = matched_pairs(random_matches(gen), loss, 0.5)
    xs_b = xs.bfloat16().requires_grad_()
    args = (xt.bfloat16(), wt.bfloat16(), c, pairs, TAU_S, TAU_T)
    ref = reference_head_loss(xs_b, (g * F.normalize(v, dim=-1)).bfloat16(), *args,
                              center_index=index)
    fused = fused_head_loss(xs_b, (g * F.normalize(v, dim=-1)).bfloat16(), *args,
                            center_index=index, chunk_size=5)
    assert fused.dtype == torch.float32
    assert torch.allclose(fused, ref, rtol=2e-2)
    for a, b in zip(grads(fused, [xs_b, v]), grads(ref, [xs_b, v])):
        assert a.dtype == b.dtype
        close(a, b, 3e-2)


def test_fused_under_bf16_autocast_close_to_float32():
    gen, xs, v, g, xt, wt = setup(3)
    c, index = centre(gen, "per-token")
    pairs = matched_pairs(random_matches(gen), "mean")
    xs.requires_grad_()
    ref = reference_head_loss(xs, g * F.normalize(v, dim=-1), xt, wt, c, pairs, TAU_S, TAU_T,
                              center_index=index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_head_loss(xs, g * F.normalize(v, dim=-1), xt, wt, c, pairs, TAU_S, TAU_T,
                                center_index=index, chunk_size=4)
    assert torch.allclose(fused, ref, rtol=3e-2)
    for a, b in zip(grads(fused, [xs, v]), grads(ref, [xs, v])):
        assert a.dtype == torch.float32
        close(a, b, 5e-2)


def _network_setup(loss: str, center: str, seed: int = 0):
    torch.manual_seed(seed)
    head = DINOHead(24, 40, hidden_dim=16, bottleneck_dim=8, norm_last_layer=center == "global")
    net = MultiCropNetwork(build_backbone("vit_tiny", 4, 16, depth=1, embed_dim=24, num_heads=2),
                           head)
    spec = CropSpec(16, 8, n_global=2, n_local=3, local_scale=(0.05, 0.3))
    mb = batched_multicrop(torch.rand(3, 3, 20, 24), spec)
    views = [(v - 0.5) / 0.25 for v in mb.views]
    matches = match_views(mb.boxes, mb.flips, view_grids(views, 4), 2, "half")
    crit = PWSelfLoss(40, n_teacher_tokens=17 if loss != "dino" else 1, loss=loss, lam=0.3,
                      center=center,
                      teacher_temps=[0.05])
    crit.center.normal_()
    return net, views, matches, crit


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("center", ["global", "per-token"])
@pytest.mark.parametrize("head_tokens", ["all", "matched"])
def test_pwself_loss_on_features_equals_pwself_loss_on_outputs(loss, center, head_tokens):
    """A real network: PWSelfLoss on the bottleneck features (fused) gives the value, the
    parameter gradients and the centre update of PWSelfLoss on the head outputs."""
    net, views, matches, crit = _network_setup(loss, center)
    patch = loss != "dino"
    keep_t = keep_s = None
    if head_tokens == "matched" and patch:
        tokens = [1 + r * c for r, c in view_grids(views, 4)]
        keep_t, keep_s = matched_token_masks(matches, tokens[:2], tokens, 3)
    results = []
    for features in (False, True):
        c = crit.center.clone()
        net.zero_grad()
        with torch.no_grad():
            teacher = net(views[:2], all_tokens=patch, keep=keep_t, features=features)
        student = net(views, all_tokens=patch, keep=keep_s, features=features)
        value = crit(student, teacher, matches, epoch=0)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in net.named_parameters()
                                         if p.grad is not None}, crit.center.clone()))
        crit.center.copy_(c)
    (v0, g0, c0), (v1, g1, c1) = results
    assert torch.allclose(v1, v0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and "head.last_v" in g0
    assert ("head.last_g" in g0) == (center == "per-token")   # norm_last_layer both ways
    for name in g0:
        close(g1[name], g0[name], 1e-4)
    assert torch.allclose(c1, c0, atol=1e-5)


def test_pwself_loss_features_need_both_sides():
    net, views, matches, crit = _network_setup("mean", "global")
    teacher = net(views[:2], all_tokens=True)
    student = net(views, all_tokens=True, features=True)
    with pytest.raises(ValueError, match="teacher"):
        crit(student, teacher, matches, epoch=0)


def test_empty_pairs_and_zero_weights():
    gen, xs, v, g, xt, wt = setup(5)
    xs.requires_grad_()
    c = torch.zeros(1, K)
    empty = LossSlots(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                      torch.zeros(0))
    zero = LossSlots(torch.tensor([0, 3]), torch.tensor([1, 2]), torch.zeros(2))
    for pairs in (empty, zero):
        loss = fused_head_loss(xs, g * F.normalize(v, dim=-1), xt, wt, c, pairs, TAU_S, TAU_T)
        assert float(loss.detach()) == 0.0
        gx, gv = grads(loss, [xs, v])
        assert not gx.any() and not gv.any()


def test_no_grad_and_rows_without_pairs():
    gen, xs, v, g, xt, wt = setup(6)
    xs.requires_grad_()
    pairs = LossSlots(torch.tensor([4, 4, 9]), torch.tensor([0, 7, 7]),
                      torch.tensor([0.2, 0.3, 0.5]))
    w = g * F.normalize(v, dim=-1)
    with torch.no_grad():
        value = fused_head_loss(xs, w, xt, wt, torch.zeros(1, K), pairs, TAU_S, TAU_T)
    loss = fused_head_loss(xs, w, xt, wt, torch.zeros(1, K), pairs, TAU_S, TAU_T)
    assert torch.allclose(value, loss)
    (gx,) = torch.autograd.grad(loss, [xs])
    unpaired = torch.ones(xs.shape[0], dtype=torch.bool)
    unpaired[[4, 9]] = False
    assert not gx[unpaired].any() and gx[~unpaired].abs().sum() > 0


def test_head_split_is_the_head():
    for norm in (True, False):
        head = DINOHead(12, 40, hidden_dim=16, bottleneck_dim=8, norm_last_layer=norm)
        x = torch.randn(2, 3, 12)
        split = head.bottleneck(x) @ head.last_layer_weight().t()
        assert torch.equal(split, head(x))


class MaxNumel(TorchDispatchMode):
    """Largest number of elements of any tensor an operator returns (allocations included)."""

    def __init__(self, big: int = 0):
        super().__init__()
        self.max = 0
        self.big = big
        self.big_storages: set[int] = set()   # storages of tensors with >= big elements

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.max = max(self.max, o.numel())
                if self.big and o.numel() >= self.big:
                    self.big_storages.add(o.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tokens_by_out_dim_tensor(dtype):
    """No operator of the forward or backward pass returns a tensor larger than one
    (chunk, K) buffer or the (K, D) weight gradient, though (tokens, K) is 10x that."""
    k, d, chunk = 512, 4, 4
    gen = torch.Generator().manual_seed(7)
    n_s, n_t = 60, 30
    xs = F.normalize(torch.randn(n_s, d, generator=gen), dim=-1).to(dtype).requires_grad_()
    w = torch.randn(k, d, generator=gen).to(dtype).requires_grad_()
    xt = torch.randn(n_t, d, generator=gen).to(dtype)
    pairs = LossSlots(torch.arange(n_s), torch.arange(n_s) % n_t, torch.full((n_s,), 1 / n_s))
    bound = max(chunk * k, k * d)
    assert n_s * k >= 10 * bound
    with MaxNumel(big=chunk * k) as counter:
        loss = fused_head_loss(xs, w, xt, w.detach(), torch.zeros(1, k), pairs, TAU_S, TAU_T,
                               chunk_size=chunk)
        loss.backward()
    assert 0 < counter.max <= bound
    if dtype == torch.float32:
        # the two (chunk, K) buffers, the (block, K) targets and gathered teacher rows of a
        # block of rows (here one pair per row and block = chunk), the weight and its gradient
        assert len(counter.big_storages) <= 6
    with MaxNumel() as counter:          # the check sees a (tokens, K) tensor when there is one
        reference_head_loss(xs, w, xt, w.detach(), torch.zeros(1, k), pairs, TAU_S, TAU_T)
    assert counter.max >= n_s * k


def test_teacher_rows_computed_once_per_image():
    """A chunk holds whole images where they fit, so each teacher row is computed once."""
    gen = torch.Generator().manual_seed(8)
    pairs = matched_pairs(random_matches(gen), "mean")
    plan = _plan(pairs, B * sum(S_TOKENS), 2 * B * T_TEACHER, sum(S_TOKENS), torch.device("cpu"))
    used = torch.unique(pairs.teacher_row).numel()
    assert sum(t.numel() for c in plan for t, _ in c.teacher) == used
    covered = torch.cat([c.student for c in plan])
    assert torch.equal(covered.sort().values, torch.unique(pairs.student_row))


def test_bad_inputs():
    gen, xs, v, g, xt, wt = setup(9)
    pairs = LossSlots(torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]))
    w = g * F.normalize(v, dim=-1)
    with pytest.raises(ValueError, match="teacher_weight"):
        fused_head_loss(xs, w, xt, wt[:, :4], torch.zeros(1, K), pairs, TAU_S, TAU_T)
    with pytest.raises(ValueError, match="center"):
        fused_head_loss(xs, w, xt, wt, torch.zeros(2, K), pairs, TAU_S, TAU_T)
    with pytest.raises(ValueError, match="outside"):
        fused_head_loss(xs, w, xt, wt, torch.zeros(1, K),
                        LossSlots(torch.tensor([999]), torch.tensor([0]), torch.tensor([1.0])),
                        TAU_S, TAU_T)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_head_loss(xs, w, xt, wt, torch.zeros(1, K), pairs, TAU_S, TAU_T, chunk_size=0)
    with pytest.raises(TypeError, match="LossSlots"):
        fused_head_loss(xs, w, xt, wt, torch.zeros(1, K), (0, 0, 1.0), TAU_S, TAU_T)


def test_training_with_fused_loss_follows_the_unfused_run(tmp_path):
    """train.py --fused-loss on: the same first loss and nearly the same weights after a
    few steps (the float32 sums run in another order) as --fused-loss off."""
    from pwself_reference import train as train_mod
    from pwself_reference.checkpoint import load_checkpoint

    tiny = ["--train-subset", "32", "--test-subset", "8", "--batch-size", "8", "--epochs", "1",
            "--depth", "1", "--embed-dim", "24", "--num-heads", "2", "--out-dim", "64",
            "--head-hidden-dim", "32", "--head-bottleneck-dim", "16", "--local-crops-number",
            "2", "--knn-every", "0", "--no-plots", "--no-progress", "--threads", "1",
            "--log-every", "1", "--warmup-epochs", "0", "--freeze-last-layer", "0",
            "--center", "per-token", "--head-tokens", "matched"]
    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        train_mod.main([*tiny, "--output-dir", str(out), "--fused-loss", mode])
        steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
                 if json.loads(line)["type"] == "step"]
        runs[mode] = (steps, load_checkpoint(out / "final.pth"))
    (s_off, ck_off), (s_on, ck_on) = runs["off"], runs["on"]
    assert len(s_on) == len(s_off) == 4
    assert s_on[0]["loss"] == pytest.approx(s_off[0]["loss"], rel=1e-5)
    assert ck_on["config"]["fused_loss"] == "on"
    torch.manual_seed(0)   # the initial weights, as train.py builds them
    init = train_mod.build_network(parse_args([*tiny, "--output-dir", str(tmp_path)]),
                                   0.0).state_dict()
    for key in ("head.last_v", "head.mlp.0.weight", "backbone.blocks.0.attn.qkv.weight"):
        moved = ck_off["student"][key] - init[key]
        assert moved.abs().max() > 0
        close(ck_on["student"][key] - init[key], moved, 1e-2)


@pytest.mark.parametrize("chunk", [3, 1000])
def test_whole_chunk_route_equals_reference(chunk):
    """The route for devices other than the CPU (targets of the whole chunk, one block),
    run here on the CPU through the Function."""
    from pwself_reference.fused_loss import FusedHeadLoss

    gen, xs, v, g, xt, wt = setup(10)
    xs.requires_grad_()
    c, index = centre(gen, "per-token")
    pairs = matched_pairs(random_matches(gen), "lambda")
    plan = _plan(pairs, xs.shape[0], xt.shape[0], chunk, torch.device("cpu"), None)
    assert all(ch.block_weights is None for ch in plan)
    fused = FusedHeadLoss.apply(xs, g * F.normalize(v, dim=-1), xt, wt, c, index, plan, TAU_S,
                                TAU_T, None, "torch", True)
    ref = reference_head_loss(xs, g * F.normalize(v, dim=-1), xt, wt, c, pairs, TAU_S, TAU_T,
                              center_index=index)
    assert torch.allclose(fused, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(fused, [xs, v]), grads(ref, [xs, v])):
        close(a, b, 1e-5)


def _pack_groups_one_by_one(sizes: list[int], chunk_rows: int) -> list[tuple[int, int]]:
    """The packing rule, a group at a time: the specification of ``_pack_groups``."""
    out, start, size, pos = [], 0, 0, 0
    for g in sizes:
        if size + g > chunk_rows and size:
            out.append((start, start + size))
            start, size = pos, 0
        while g > chunk_rows:                   # a group larger than a chunk is cut
            out.append((pos, pos + chunk_rows))
            pos, g, start = pos + chunk_rows, g - chunk_rows, pos + chunk_rows
        size += g
        pos += g
    if size:
        out.append((start, start + size))
    return out


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64])
def test_pack_groups_follows_the_rule_a_group_at_a_time(chunk_rows):
    import numpy as np

    from pwself_reference.fused_loss import _pack_groups

    gen = torch.Generator().manual_seed(chunk_rows)
    for _ in range(50):
        sizes = (torch.randint(1, 3 * chunk_rows + 2, (int(torch.randint(0, 30, (1,),
                 generator=gen)),), generator=gen)).tolist()
        bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        packed = _pack_groups(bounds, chunk_rows)
        assert packed == _pack_groups_one_by_one(sizes, chunk_rows), sizes
        assert all(0 < b - a <= chunk_rows for a, b in packed)
