"""compute_map: hand-computed APs, and agreement with an independent implementation."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pwself_reference.evaluation import (
    average_precision,
    compute_map,
    gnd_easy,
    gnd_hard,
    gnd_medium,
    load_gnd,
    retrieval_ranks,
)


def col(*idx):
    return np.array(idx, dtype=np.int64)[:, None]


# ---------------------------------------------------------------- hand-computed values
def test_ap_two_hits_no_junk():
    # ranking 3, 1, 0, 2 ; positives {1, 2} at 0-based ranks 1 and 3
    # trapezoids: (0/1 + 1/2)/2 * 1/2 + (1/3 + 2/4)/2 * 1/2 = 1/8 + 5/24 = 1/3
    m, aps, _, _ = compute_map(col(3, 1, 0, 2), [{"ok": [1, 2], "junk": []}])
    assert m == pytest.approx(1 / 3, abs=1e-15)
    assert aps.tolist() == pytest.approx([1 / 3])


def test_junk_is_removed_from_the_ranking():
    # junk image 3 is ranked first: positives move to ranks 0 and 2
    # (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 1/2 + 7/24 = 19/24
    m, _, _, _ = compute_map(col(3, 1, 0, 2), [{"ok": [1, 2], "junk": [3]}])
    assert m == pytest.approx(19 / 24, abs=1e-15)
    # junk ranked after every positive changes nothing
    m2, _, _, _ = compute_map(col(1, 0, 2, 3), [{"ok": [1, 2], "junk": [3]}])
    m3, _, _, _ = compute_map(col(1, 0, 2, 3), [{"ok": [1, 2]}])
    assert m2 == m3 == pytest.approx(0.5 + (1 / 2 + 2 / 3) / 4)


def test_junk_between_positives_only_shifts_later_ones():
    # ranking 5 9 7 6 8: ok {5, 6}, junk {9, 7}: 5 stays at 0, 6 moves from 3 to 1
    m, _, _, _ = compute_map(col(5, 9, 7, 6, 8), [{"ok": [5, 6], "junk": [9, 7]}], db_size=10)
    assert m == pytest.approx(1.0)


def test_positive_missing_from_a_truncated_ranking_counts_in_recall():
    # only 2 of the database images are ranked; 5 is never retrieved
    m, _, pr, prs = compute_map(col(0, 1), [{"ok": [1, 5], "junk": []}], kappas=[1, 2], db_size=6)
    assert m == pytest.approx((0 + 1 / 2) / 2 / 2)
    assert prs.tolist() == [[0.0, 0.5]]


def test_no_positive_retrieved_gives_zero_ap_and_precision():
    m, aps, pr, _ = compute_map(col(0, 1), [{"ok": [7], "junk": []}], kappas=[1, 5], db_size=8)
    assert m == 0.0 and aps.tolist() == [0.0] and pr.tolist() == [0.0, 0.0]


def test_queries_without_positives_are_skipped():
    ranks = np.stack([np.arange(4), np.arange(4)], axis=1)
    m, aps, pr, prs = compute_map(ranks, [{"ok": [], "junk": [1]}, {"ok": [1], "junk": []}], [1])
    assert math.isnan(aps[0]) and np.isnan(prs[0]).all()
    assert aps[1] == pytest.approx(0.25) and m == pytest.approx(0.25)
    assert pr.tolist() == [0.0]


def test_precision_at_k_uses_the_reference_cutoff():
    # positives at 1-based ranks 1 and 5: P@1 = 1, P@5 = 2/5, and P@10 is measured at
    # min(10, 5) = 5 as the revisitop code does, so it is 2/5 too (not 2/10)
    _, _, pr, prs = compute_map(col(*range(10)), [{"ok": [0, 4], "junk": []}], kappas=[1, 5, 10])
    assert prs.tolist() == [[1.0, 0.4, 0.4]] and pr.tolist() == [1.0, 0.4, 0.4]


def test_ties_in_similarity_rank_lower_index_first():
    # database images 0 and 2 are identical; the query equals them
    db = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    ranks = retrieval_ranks(db, torch.tensor([[1.0, 0.0]]))
    assert ranks[:, 0].tolist() == [0, 2, 3, 1]
    # positive {2}, junk {0}: junk removed, 2 becomes first -> AP 1
    m, _, _, _ = compute_map(ranks, [{"ok": [2], "junk": [0]}])
    assert m == 1.0
    # positive {2} without junk: second -> (0/1 + 1/2)/2
    m, _, _, _ = compute_map(ranks, [{"ok": [2], "junk": []}])
    assert m == pytest.approx(0.25)


def test_mean_over_queries_and_torch_input():
    ranks = torch.tensor([[0, 1], [1, 0], [2, 2]])
    m, aps, _, _ = compute_map(ranks, [{"ok": [0]}, {"ok": [2]}])
    assert aps.tolist() == pytest.approx([1.0, (0 + 1 / 3) / 2])
    assert m == pytest.approx((1.0 + 1 / 6) / 2)


def test_average_precision_matches_compute_map_formula():
    assert average_precision([0, 2], 2) == pytest.approx(19 / 24)
    assert average_precision([], 3) == 0.0
    with pytest.raises(ValueError, match="nres"):
        average_precision([0], 0)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("ranks", "gnd", "kappas", "match"),
    [
        (np.zeros((3, 1), dtype=int), [], (), "empty"),
        (np.zeros((3, 2), dtype=int), [{"ok": [0]}], (), "2 query columns"),
        (np.zeros(3, dtype=int), [{"ok": [0]}], (), "2-D"),
        (np.zeros((3, 1), dtype=int), [{"ok": [0]}], (0,), "kappas"),
        (-np.ones((3, 1), dtype=int), [{"ok": [0]}], (), "non-negative"),
        (np.arange(3)[:, None], [{"ok": []}], (), "no query"),
    ],
)
def test_bad_input_raises_value_error(ranks, gnd, kappas, match):
    with pytest.raises(ValueError, match=match):
        compute_map(ranks, gnd, kappas)


@pytest.mark.parametrize(
    ("ranks", "gnd", "db_size", "match"),
    [
        # a ranking that lists image 0 three times scored an mAP of 2.0
        (np.array([[0], [0], [0], [3]]), [{"ok": [0, 3]}], None, r"ranks: column 0 .* more than once"),
        # a (queries, db) array passed as it is: its columns repeat the top hits
        (np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2]]), [{"ok": [0]}] * 3, None, "ranks.T"),
        (np.arange(4)[:, None], [{"ok": [-1]}], None, r"gnd\[0\]\['ok'\] .*outside the database \[0, 4\)"),
        (np.arange(4)[:, None], [{"ok": [9]}], None, r"gnd\[0\]\['ok'\] .*\[9\]"),
        (np.arange(4)[:, None], [{"ok": [9]}], 6, r"gnd\[0\]\['ok'\] .*\[0, 6\)"),
        (np.arange(4)[:, None], [{"ok": [1], "junk": [4]}], None, r"gnd\[0\]\['junk'\]"),
        (np.arange(4)[:, None], [{"ok": [0, 0]}], None, r"gnd\[0\]\['ok'\] lists .* more than once"),
        (np.arange(4)[:, None], [{"ok": [0]}], 3, "db_size"),
        (np.array([[0], [5]]), [{"ok": [0]}], None, r"ranks .*below 2.*db_size"),
    ],
)
def test_inputs_that_scored_silently_now_raise(ranks, gnd, db_size, match):
    with pytest.raises(ValueError, match=match):
        compute_map(ranks, gnd, db_size=db_size)


def test_transposed_square_ranks_are_told_apart_by_repeats():
    # database of 3, 3 queries: (db, queries) scores, the transpose is refused
    ranks = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]])  # a Latin square is the one blind spot
    compute_map(ranks, [{"ok": [0]}] * 3)
    by_query = np.array([[0, 1, 2], [1, 0, 2]])  # (2 queries, 3 images)
    with pytest.raises(ValueError, match="3 query columns"):
        compute_map(by_query, [{"ok": [0]}] * 2)
    m, _, _, _ = compute_map(by_query.T, [{"ok": [0]}, {"ok": [1]}])
    assert m == 1.0


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="integer"):
        compute_map(np.zeros((2, 1)), [{"ok": [0]}])
    with pytest.raises(TypeError, match="'ok'"):
        compute_map(np.arange(2)[:, None], [{"positives": [0]}])
    with pytest.raises(TypeError, match="list of dicts"):
        compute_map(np.zeros((2, 1), dtype=int), {"ok": [0]})


# ---------------------------------------------------------------- independent implementation
def reference_query(column, ok, junk, kappas):
    """Walk the ranking once: junk images are not counted, AP is the PR trapezoid."""
    n_ok = len(ok)
    ok, junk = set(ok), set(junk)
    junk_seen = 0
    hits = []  # 1-based ranks in the junk-free list
    for position, image in enumerate(column):
        if image in ok:
            hits.append(position - junk_seen + 1)
        if image in junk:
            junk_seen += 1
    ap = 0.0
    for j, rank in enumerate(hits, start=1):
        before = 1.0 if rank == 1 else (j - 1) / (rank - 1)
        ap += (before + j / rank) / 2 / n_ok
    precisions = []
    for kappa in kappas:
        if not hits:
            precisions.append(0.0)
            continue
        cut = min(kappa, max(hits))
        precisions.append(sum(h <= cut for h in hits) / cut)
    return ap, precisions


@st.composite
def retrieval_problems(draw):
    n = draw(st.integers(1, 25))
    n_queries = draw(st.integers(1, 4))
    db_ids = list(range(n + 3))  # a few ids beyond the ranked list: never retrieved
    truncate = draw(st.integers(1, n))
    columns, gnd = [], []
    for _ in range(n_queries):
        perm = draw(st.permutations(list(range(n))))
        columns.append(perm)
        ok = draw(st.lists(st.sampled_from(db_ids), unique=True, max_size=6))
        junk = draw(st.lists(st.sampled_from([i for i in db_ids if i not in ok] or [0]),
                             unique=True, max_size=6))
        junk = [j for j in junk if j not in ok]
        gnd.append({"ok": ok, "junk": junk})
    if all(not g["ok"] for g in gnd):
        gnd[0]["ok"] = [draw(st.sampled_from(db_ids))]
        gnd[0]["junk"] = [j for j in gnd[0]["junk"] if j not in gnd[0]["ok"]]
    ranks = np.array(columns, dtype=np.int64).T
    return ranks[:truncate], gnd, len(db_ids)


@given(retrieval_problems(), st.lists(st.integers(1, 12), max_size=3))
@settings(max_examples=60)
def test_agrees_with_independent_implementation(problem, kappas):
    ranks, gnd, db_size = problem
    m, aps, pr, prs = compute_map(ranks, gnd, kappas, db_size=db_size)
    used, ap_sum, pr_sum = 0, 0.0, np.zeros(len(kappas))
    for q, g in enumerate(gnd):
        if not g["ok"]:
            assert math.isnan(aps[q])
            continue
        ap, precisions = reference_query(ranks[:, q].tolist(), g["ok"], g["junk"], kappas)
        assert aps[q] == pytest.approx(ap, abs=1e-12)
        assert prs[q].tolist() == pytest.approx(precisions, abs=1e-12)
        used += 1
        ap_sum += ap
        pr_sum += np.array(precisions)
    assert 0.0 <= m <= 1.0
    assert m == pytest.approx(ap_sum / used, abs=1e-12)
    assert pr.tolist() == pytest.approx((pr_sum / used).tolist(), abs=1e-12)


# ---------------------------------------------------------------- gnd helpers and loading
GND = [
    {"bbx": [1.0, 2.0, 30.0, 40.0], "easy": np.array([0, 1]), "hard": np.array([2]),
     "junk": np.array([3])},
    {"bbx": [0.0, 0.0, 5.0, 5.0], "easy": np.array([], dtype=np.int64), "hard": np.array([4]),
     "junk": np.array([0, 1])},
]


def test_medium_hard_easy_splits():
    med, hard, easy = gnd_medium(GND), gnd_hard(GND), gnd_easy(GND)
    assert med[0]["ok"].tolist() == [0, 1, 2] and med[0]["junk"].tolist() == [3]
    assert hard[0]["ok"].tolist() == [2] and sorted(hard[0]["junk"].tolist()) == [0, 1, 3]
    assert easy[1]["ok"].tolist() == [] and sorted(easy[1]["junk"].tolist()) == [0, 1, 4]
    with pytest.raises(ValueError, match="empty"):
        gnd_medium([])
    with pytest.raises(ValueError, match="lacks"):
        gnd_hard([{"easy": [1], "junk": []}])


def test_medium_and_hard_scores_on_a_tiny_dataset():
    # database 0..4; query 0 ranks 3 2 0 4 1
    ranks = np.stack([np.array([3, 2, 0, 4, 1]), np.array([4, 0, 1, 2, 3])], axis=1)
    m_med, aps_med, _, _ = compute_map(ranks, gnd_medium(GND))
    m_hard, aps_hard, _, _ = compute_map(ranks, gnd_hard(GND))
    # query 0, medium: junk 3 removed -> 2 0 4 1, ok {0,1,2} at 0,1,3
    ap0_med = (1 + 1) / 2 / 3 + (1 / 1 + 2 / 2) / 2 / 3 + (2 / 3 + 3 / 4) / 2 / 3
    # query 0, hard: junk {3,0,1} removed -> 2 4, ok {2} first
    assert aps_med[0] == pytest.approx(ap0_med)
    assert aps_hard[0] == pytest.approx(1.0)
    # query 1: ok {4} ranked first in both protocols
    assert aps_med[1] == aps_hard[1] == 1.0
    assert m_med == pytest.approx((ap0_med + 1) / 2) and m_hard == 1.0


def _write(path, obj, protocol=4):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def test_load_gnd_accepts_the_revisitop_structure(tmp_path):
    cfg = {"imlist": [f"im{i}" for i in range(5)], "qimlist": ["q0", "q1"], "gnd": GND}
    loaded = load_gnd(_write(tmp_path / "gnd_roxford5k.pkl", cfg, protocol=2))
    assert loaded["imlist"] == cfg["imlist"] and loaded["qimlist"] == ["q0", "q1"]
    assert loaded["gnd"][0]["bbx"] == (1.0, 2.0, 30.0, 40.0)
    assert loaded["gnd"][1]["hard"].tolist() == [4]
    plain = {**cfg, "gnd": [{k: (list(v) if k != "bbx" else v) for k, v in g.items()} for g in GND]}
    assert load_gnd(_write(tmp_path / "plain.pkl", plain))["gnd"][0]["easy"].tolist() == [0, 1]


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_load_gnd_refuses_code_and_wrong_structures(tmp_path, capsys):
    with pytest.raises(ValueError, match="refusing to load global"):
        load_gnd(_write(tmp_path / "evil.pkl", {"imlist": [], "qimlist": [], "gnd": [Evil()]}))
    assert "never run" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        load_gnd(tmp_path / "missing.pkl")
    bad = [
        ([1, 2], "expected a dict"),
        ({"imlist": ["a"], "qimlist": ["q"]}, "missing key 'gnd'"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": []}, "non-empty"),
        ({"imlist": ["a"], "qimlist": ["q", "r"], "gnd": [GND[0]]}, "1 gnd entries for 2"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [GND[0]]}, "outside the database"),
        ({"imlist": [1], "qimlist": ["q"], "gnd": [GND[0]]}, "image names"),
        ({"imlist": list("abcde"), "qimlist": ["q"], "gnd": [{"easy": [0]}]}, "lacks"),
    ]
    for i, (obj, match) in enumerate(bad):
        with pytest.raises(ValueError, match=match):
            load_gnd(_write(tmp_path / f"bad{i}.pkl", obj))
