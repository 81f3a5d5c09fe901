"""Selective ±1 pruning (pgolf.compress.prune): candidate costs and order, applying, the count search.
The search against the real serialisation and codecs is in test_quantize.py."""

import numpy as np
import pytest
import torch

from pgolf.compress import prune


def test_candidates_cost_scale_sq_times_hessian_diag_in_stable_order():
    q1 = torch.tensor([[1, 0, -1], [2, 1, -1]], dtype=torch.int8)  # ±1 at flat 0, 2, 4, 5
    s1 = torch.tensor([1.0, 2.0], dtype=torch.float16)
    h1 = torch.tensor([1.0, 5.0, 0.5])
    q2 = torch.tensor([[-1, 1]], dtype=torch.int8)  # no Hessian: cost s^2
    s2 = torch.tensor([0.5], dtype=torch.float16)
    c = prune.collect({"a.q": q1, "b.q": q2}, {"a.q": s1, "b.q": s2}, {"a.q": h1, "b.q": None})
    # costs: a[0]=1*1=1, a[2]=1*0.5=0.5, a[4]=4*5=20, a[5]=4*0.5=2, b[0]=b[1]=0.25
    assert c.total == 6
    np.testing.assert_allclose(c.cost_sorted, [0.25, 0.25, 0.5, 1.0, 2.0, 20.0])
    assert c.rank["b.q"].tolist() == [0, 1]  # equal costs keep tensor order, then flat index
    assert c.rank["a.q"].tolist() == [3, 2, 5, 4]  # flat 0, 2, 4, 5
    assert c.cost_of_first(3) == pytest.approx(1.0)


def test_apply_zeroes_exactly_the_first_n_and_leaves_inputs_alone():
    q1 = torch.tensor([[1, 0, -1], [2, 1, -1]], dtype=torch.int8)
    s1 = torch.tensor([1.0, 2.0], dtype=torch.float16)
    c = prune.collect({"a.q": q1}, {"a.q": s1}, {"a.q": None})  # costs 1, 1, 4, 4
    out = prune.apply({"a.q": q1}, c, 3)
    assert out["a.q"].tolist() == [[0, 0, 0], [2, 0, -1]]
    assert q1.tolist() == [[1, 0, -1], [2, 1, -1]]
    assert prune.apply({"a.q": q1}, c, 0)["a.q"] is q1


def test_no_candidates():
    c = prune.collect({"a.q": torch.zeros(2, 2, dtype=torch.int8)}, {"a.q": torch.ones(2).half()}, {"a.q": None})
    assert c.total == 0 and prune.apply({"a.q": torch.zeros(2, 2, dtype=torch.int8)}, c, 5)
    with pytest.raises(prune.PruneError, match="unreachable"):
        prune.search(lambda n: 100, 0, 50)


def test_already_under_target_prunes_nothing_with_one_probe():
    r = prune.search(lambda n: 1000 - n, 500, 1000)
    assert r.n == 0 and r.probes == [(0, 1000)]


def test_unreachable_target_names_the_smallest_reachable_size():
    with pytest.raises(prune.PruneError, match=r"compress\.target_bytes=100 is unreachable.*gives 500 bytes"):
        prune.search(lambda n: 1000 - n, 500, 100)


@pytest.mark.parametrize("target", [999, 990, 700, 501, 500])
def test_search_is_minimal_on_a_linear_size(target):
    r = prune.search(lambda n: 1000 - n, 500, target)
    assert r.n == 1000 - target and r.size == target


def test_search_brackets_a_noisy_non_monotone_size_and_uses_few_probes():
    """Size ~ linear with ±30 bytes of noise: the answer fits, one fewer does not, in far fewer
    probes than plain bisection (log2(4.2e6) + 2 = 24)."""
    N = 4_200_000

    def f(n):
        return int(16_200_000 - 0.35 * n + np.random.default_rng(n).normal(0, 30))

    probes = []
    for target in (16_000_000, 15_500_000, 15_000_000):
        r = prune.search(f, N, target)
        assert f(r.n) <= target < f(r.n - 1)
        probes.append(len(r.probes))
    assert max(probes) <= 18


def test_search_survives_a_step_function():
    r = prune.search(lambda n: 1000 if n < 3_000_000 else 0, 4_200_000, 500)
    assert r.n == 3_000_000 and len(r.probes) <= 30


def test_predicted_search_with_slack_stops_at_the_first_fit():
    """A predictor off by a factor 2 (k = 0.5): the miss recalibrates, the next probe fits; the
    answer is that first fit, at or under the target."""
    N = 4_200_000

    def f(n):
        return int(16_200_000 - 0.35 * n + np.random.default_rng(n).normal(0, 30))

    for target in (16_000_000, 15_500_000):
        r = prune.search(f, N, target, predict=lambda n: -0.7 * n, slack=2000)
        assert f(r.n) == r.size <= target and len(r.probes) <= 4
        assert all(s > target for _, s in r.probes[:-1])
        assert prune.search(f, N, target, predict=lambda n: -0.7 * n, slack=2000) == r  # deterministic


def test_predicted_exact_search_brackets_to_one():
    f = lambda n: 1000 - n  # noqa: E731
    r = prune.search(f, 500, 700, predict=lambda n: -1.3 * n, slack=0)
    assert r.n == 300 and r.size == 700
