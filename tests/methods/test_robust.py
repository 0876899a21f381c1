"""Robust server rules (`server.robust`): hand-computed values, Flower's own implementations as the
reference, their composition with every rule that averages replies, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexmoe.config import load_config
from flexmoe.errors import FlexmoeError
from flexmoe.methods.build import build_method
from flexmoe.methods.rules import Reply
from flexmoe.methods.robust import krum_scores, krum_selection, median, trimmed_mean


def method(name: str, *overrides: str):
    return build_method(load_config(None, [f"method={name}", *overrides]))


def replies_of(values: list[float], examples: list[int] | None = None) -> list[Reply]:
    examples = examples or [1] * len(values)
    return [Reply({"w": torch.tensor([v])}, n, client=i) for i, (v, n) in enumerate(zip(values, examples))]


ZERO = {"w": torch.tensor([0.0])}


def test_median_hand_values_odd_and_even():
    assert median([{"w": torch.tensor([v, -v])} for v in (1.0, 2.0, 10.0)])["w"].tolist() == [2.0, -2.0]
    assert median([{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 100.0)])["w"].item() == 2.5


def test_trimmed_mean_hand_values():
    four = [{"w": torch.tensor([v])} for v in (100.0, 1.0, 3.0, 2.0)]
    assert trimmed_mean(four, 0.25)["w"].item() == pytest.approx(2.5)  # int(0.25 * 4) = 1 cut each end
    five = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert trimmed_mean(five, 0.2)["w"].item() == pytest.approx(3.0)
    assert trimmed_mean(five, 0.0)["w"].item() == pytest.approx(22.0)  # nothing cut: the plain mean
    # per coordinate: each column trims its own extremes
    cols = [{"w": torch.tensor([a, b])} for a, b in ((0.0, 9.0), (1.0, -9.0), (2.0, 1.0), (50.0, 2.0))]
    assert trimmed_mean(cols, 0.25)["w"].tolist() == pytest.approx([1.5, 1.5])


def test_krum_scores_and_selection_hand_values():
    # scalars 0, 1, 2, 10 with f = 1: n - f - 2 = 1 nearest neighbour; squared distances
    dicts = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 2.0, 10.0)]
    assert krum_scores(dicts, 1).tolist() == [1.0, 1.0, 1.0, 64.0]
    assert krum_selection(dicts, 1, 3) == [0, 1, 2]
    assert krum_selection(dicts, 1, 1) == [0]  # a tie goes to the earlier reply
    # f = 0: two nearest; scores 0: 1+4, 1: 1+1, 2: 1+4, 10: 64+81
    assert krum_scores(dicts, 0).tolist() == [5.0, 2.0, 5.0, 145.0]
    assert krum_selection(dicts, 0, 1) == [1]


def test_krum_matches_flowers_aggregate_krum():
    from flwr.server.strategy.aggregate import aggregate_krum

    generator = torch.Generator().manual_seed(0)
    dicts = [{"a": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator)}
             for _ in range(7)]
    dicts[2] = {k: v * 30 for k, v in dicts[2].items()}
    examples = [3, 1, 4, 1, 5, 9, 2]
    results = [([d["a"].numpy(), d["b"].numpy()], n) for d, n in zip(dicts, examples)]
    for f, keep in ((1, 1), (2, 5), (1, 6)):
        server = method("fedavg", "num_clients=7", "server.robust=krum", f"server.krum_f={f}",
                        f"server.krum_keep={keep}")
        ours, _, metrics = server.aggregate({k: torch.zeros_like(v) for k, v in dicts[0].items()}, {},
                                            [Reply(d, n, client=i) for i, (d, n) in enumerate(zip(dicts, examples))])
        theirs = aggregate_krum(results, num_malicious=f, to_keep=keep)
        np.testing.assert_allclose(ours["a"].numpy(), theirs[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours["b"].numpy(), theirs[1], rtol=1e-5, atol=1e-6)
        assert 2 not in metrics["krum_kept"] and len(metrics["krum_kept"]) == keep


def test_median_and_trimmed_mean_match_flower():
    from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

    generator = torch.Generator().manual_seed(1)
    dicts = [{"x": torch.randn(6, 3, generator=generator)} for _ in range(5)]
    results = [([d["x"].numpy()], 1) for d in dicts]
    np.testing.assert_array_equal(median(dicts)["x"].numpy(), aggregate_median(results)[0])
    np.testing.assert_allclose(trimmed_mean(dicts, 0.2)["x"].numpy(), aggregate_trimmed_avg(results, 0.2)[0],
                               rtol=1e-6)


@pytest.mark.parametrize("robust,expected", [("none", 26.5), ("median", 2.5), ("trimmed-mean", 2.5), ("krum", 2.0)])
def test_one_hostile_reply_moves_only_the_mean(robust, expected):
    # three honest replies near 2 and one at 100; multi-Krum keeps n - f = 3, averaged by examples (all 1)
    fedavg = method("fedavg", f"server.robust={robust!r}")
    new, _, metrics = fedavg.aggregate(ZERO, {}, replies_of([1.0, 2.0, 3.0, 100.0]))
    assert new["w"].item() == pytest.approx(expected)
    if robust == "krum":
        assert metrics["krum_kept"] == [0, 1, 2]


def test_server_optimisers_step_along_the_robust_aggregate():
    # FedAdam with the median of the replies == FedAdam given that median as its one reply
    replies = replies_of([1.0, 2.0, 3.0, 100.0], [5, 1, 1, 9])
    robust = method("fedadam", "server.robust=median")
    plain = method("fedadam")
    state = robust.init_server_state(ZERO)
    a, a_state, _ = robust.aggregate(ZERO, state, replies)
    b, b_state, _ = plain.aggregate(ZERO, plain.init_server_state(ZERO), [Reply({"w": torch.tensor([2.5])}, 1)])
    assert torch.equal(a["w"], b["w"]) and all(torch.equal(a_state[k], b_state[k]) for k in b_state)


def test_flex_shared_part_composes_with_robust_rules_and_its_aggregator():
    replies = replies_of([1.0, 2.0, 3.0, 100.0])
    flex = method("flex", "server.robust=trimmed-mean", "flex.aggregator=fedavgm")
    reference = method("flex", "flex.aggregator=fedavgm")
    a, _, _ = flex.aggregate(ZERO, flex.init_server_state(ZERO), replies)
    b, _, _ = reference.aggregate(ZERO, reference.init_server_state(ZERO), [Reply({"w": torch.tensor([2.5])}, 1)])
    assert torch.equal(a["w"], b["w"]) and a["w"].item() == pytest.approx(0.1 * 2.5)


def test_scaffold_takes_the_robust_combination_of_its_deltas():
    scaffold = method("scaffold", "server.robust=median", "num_clients=4")
    replies = [Reply({"delta.w": torch.tensor([d]), "control_delta.w": torch.tensor([c])}, 1, client=i)
               for i, (d, c) in enumerate(((0.1, 1.0), (0.2, 2.0), (0.3, 3.0), (50.0, -90.0)))]
    state = scaffold.init_server_state({"w": torch.tensor([1.0])})
    new, new_state, _ = scaffold.aggregate({"w": torch.tensor([1.0])}, state, replies)
    assert new["w"].item() == pytest.approx(1.0 + 0.25)
    assert new_state["control.w"].item() == pytest.approx(1.0 * 1.5)  # |S|/N = 1, median of the dc


@pytest.mark.parametrize("overrides,words", [
    (["method=fcmoe", "server.robust=median"], "rule that averages the replies"),
    (["method=local", "server.robust=krum"], "rule that averages the replies"),
    (["server.robust=median", "privacy.noise_multiplier=1.0"], "noised mean"),
    (["server.robust=trimmed-mean", "server.trim_beta=0.2"], "trims no reply"),
    (["server.robust=krum", "server.krum_f=4"], "krum_f < clients_per_round"),
    (["server.robust=krum", "server.krum_keep=5"], "krum_keep <= clients_per_round"),
])
def test_impossible_robust_combinations_are_one_line(overrides, words):
    with pytest.raises(FlexmoeError, match=words) as error:
        load_config(None, overrides)
    assert "\n" not in str(error.value)


def test_robust_is_off_by_default():
    assert load_config(None, []).server.robust == "none"
