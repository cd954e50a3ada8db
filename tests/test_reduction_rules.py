"""reduce(summary, method, ...) -> Decision: every rule against its formula, counts against requests."""

import math

import pytest
import torch

from pyro_sparse.reduction import bmr_gaussian, mask_by_sparsity, reduce, savage_dickey, spike_slab_decision
from pyro_sparse.summary import PosteriorSummary, SiteSummary

AXES = {"weight": {"unit": 0, "input": 1}, "bias": {"unit": 0}}


def make_summary(shapes=(("fc1", (6, 5)), ("fc2", (4, 6)), ("fc3", (3, 4))), seed=0, prior_scale=1.0,
                 dtype=torch.float64):
    """A summary with Gaussian prior N(0, prior_scale^2) and random mean-field posteriors."""
    g = torch.Generator().manual_seed(seed)
    out = PosteriorSummary(method="test")
    for layer, shape in shapes:
        for param, s in (("weight", shape), ("bias", shape[:1])):
            loc = torch.randn(s, generator=g, dtype=dtype) * 0.5
            sd = 0.05 + torch.rand(s, generator=g, dtype=dtype) * 0.5
            out[f"{layer}.{param}"] = SiteSummary(
                layer, param, loc, sd.square().reciprocal(), torch.zeros((), dtype=dtype),
                torch.tensor(prior_scale ** -2, dtype=dtype), dict(AXES[param]),
                sd.square().log() - loc.square().log(), None)
    return out


def weights(s):
    return [k for k in s if not k.endswith("bias")]


def test_savage_dickey_masks_are_the_sign_of_delta_f_and_biases_are_kept():
    s = make_summary()
    d = reduce(s, "savage-dickey")
    for k in weights(s):
        dF = savage_dickey(s[k].loc, s[k].precision, 0.0, 1.0)
        assert torch.equal(d.masks[k], dF <= 0)
        assert torch.allclose(d.scores[k], dF)
    assert all(bool(d.masks[k].all()) for k in s if k.endswith("bias"))
    assert d.score_name == "delta_f"
    kept = sum(int((savage_dickey(s[k].loc, s[k].precision, 0.0, 1.0) <= 0).sum()) for k in weights(s))
    assert d.counts() == (kept, 30 + 24 + 12)
    assert d.sparsity == pytest.approx(1 - kept / 66)


@pytest.mark.parametrize("kwargs,reduced_precision", [({"reduced_scale": 0.1}, 100.0),
                                                       ({"shrink": 0.05}, 1 / (0.05 * 2.0) ** 2),
                                                       ({}, 1 / (0.01 * 2.0) ** 2)])
def test_bmr_uses_the_reduced_gaussian(kwargs, reduced_precision):
    s = make_summary(prior_scale=2.0)
    d = reduce(s, "bmr", **kwargs)
    for k in weights(s):
        dF, _, _ = bmr_gaussian(s[k].loc, s[k].precision, 0.0, 0.25, 0.0, reduced_precision)
        assert torch.allclose(d.scores[k], dF)
        assert torch.equal(d.masks[k], dF <= 0)


def test_threshold_moves_the_evidence_cut():
    s = make_summary()
    d = reduce(s, "savage-dickey", threshold=1.5)
    for k in weights(s):
        assert torch.equal(d.masks[k], d.scores[k] <= 1.5)


def test_spike_slab_is_layer_wise():
    s = make_summary(shapes=(("fc1", (40, 30)), ("fc2", (5, 40))), seed=3)
    d = reduce(s, "spike-slab")
    for k in weights(s):
        dF, _, _ = bmr_gaussian(s[k].loc, s[k].precision, 0.0, 1.0, 0.0, 1e4)
        keep, zeta = spike_slab_decision(dF)
        assert torch.equal(d.masks[k], keep)
        assert d.zeta[k] == pytest.approx(float(zeta))


def test_log_alpha_threshold_and_a_priors_group_rule():
    s = make_summary()
    d = reduce(s, "log-alpha")
    for k in weights(s):
        assert torch.equal(d.masks[k], s[k].log_alpha <= 3.0)
    assert d.options["threshold"] == 3.0  # the rule's one default
    # a group prior's quantity in the summary: log alpha_z > 0 on unit 2 of fc1 removes that whole row
    group = torch.full((6, 1), -5.0, dtype=torch.float64)
    group[2] = 4.0
    s["fc1.weight"].groups = {"group-log-alpha": group}
    d2 = reduce(s, "group-log-alpha")
    assert not d2.masks["fc1.weight"][2].any() and bool(d2.masks["fc1.weight"][[0, 1, 3, 4, 5]].all())
    assert bool(d2.masks["fc2.weight"].all())  # no group quantity: not judged, kept
    assert not d2.units["fc1"][2] and d2.options["threshold"] == 0.0
    # structured: units decided by the unit group variables alone
    s["fc2.weight"].groups = {"group-log-alpha": torch.full((4, 1), -1.0, dtype=torch.float64)}
    d3 = reduce(s, "group-log-alpha", structured=True)
    assert d3.units["fc1"].tolist() == [True, True, False, True, True, True]
    assert bool(d3.units["fc2"].all()) and not d3.masks["fc1.bias"][2]


def test_structured_log_alpha_points_at_the_group_rules():
    with pytest.raises(ValueError, match="judges single weights.*group-log-alpha"):
        reduce(make_summary(), "log-alpha", structured=True)
    with pytest.raises(ValueError, match="group-log-alpha.*no site"):
        reduce(make_summary(), "group-log-alpha")


def test_every_rule_is_one_registered_object_with_one_default():
    from pyro_sparse.reduction.rules import Rule, rule
    from pyro_sparse.registry import RULES

    builtin = {"bmr": 0.0, "savage-dickey": 0.0, "spike-slab": None, "log-alpha": 3.0, "opd": None,
               "magnitude": None, "random": None, "group-log-alpha": 0.0, "horseshoe-scale": 3.0}
    assert set(builtin) <= set(RULES)  # the built-ins are there (plugins may add more)
    for name, r in RULES.items():
        assert isinstance(r, Rule) and r.name == name and rule(name) is r
        assert r.prunes in ("above", "below") and r.quantity
    assert {name: RULES[name].threshold for name in builtin} == builtin
    with pytest.raises(ValueError, match="unknown reduction rule 'obd'.*horseshoe-scale"):
        reduce(make_summary(), "obd")


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.9, 0.95])
@pytest.mark.parametrize("method", ["opd", "magnitude", "random", "savage-dickey", "bmr", "log-alpha"])
def test_unstructured_sparsity_matches_the_request(method, q):
    s = make_summary(shapes=(("fc1", (30, 20)), ("fc2", (10, 30)), ("fc3", (3, 10))))
    d = reduce(s, method, sparsity=q)
    n = 600 + 300 + 30
    assert d.counts()[1] - d.counts()[0] == math.floor(q * n + 0.5)
    d = reduce(s, method, sparsity=q, scope="layer")
    for k in weights(s):
        numel = s[k].loc.numel()
        assert int((~d.masks[k]).sum()) == math.floor(q * numel + 0.5)


def test_global_magnitude_keeps_the_largest_weights():
    s = make_summary(shapes=(("fc1", (30, 20)), ("fc2", (10, 30))))
    d = reduce(s, "magnitude", sparsity=0.8)
    flat = torch.cat([s[k].loc.abs().flatten() for k in weights(s)])
    cut = flat.sort(descending=True).values[int(0.2 * flat.numel()) - 1]
    for k in weights(s):
        assert torch.equal(d.masks[k], s[k].loc.abs() >= cut)


def test_opd_ranks_by_precision_times_squared_mean():
    s = make_summary(shapes=(("fc1", (30, 20)), ("fc2", (10, 30))))
    d = reduce(s, "opd", sparsity=0.7)
    expected = mask_by_sparsity({k: s[k].precision * s[k].loc.square() for k in weights(s)}, 0.7)
    for k in weights(s):
        assert torch.equal(d.masks[k], expected[k])


@pytest.mark.parametrize("method", ["opd", "magnitude", "random", "savage-dickey", "bmr"])
def test_structured_removes_whole_units_per_layer(method):
    s = make_summary(shapes=(("fc1", (20, 5)), ("fc2", (10, 20)), ("fc3", (3, 10))))
    d = reduce(s, method, sparsity=0.3, structured=True)
    for layer, n in (("fc1", 20), ("fc2", 10)):
        removed = ~d.units[layer]
        assert int(removed.sum()) == math.floor(0.3 * n + 0.5)
        assert torch.equal(d.masks[f"{layer}.weight"], d.units[layer][:, None].expand_as(d.masks[f"{layer}.weight"]))
        assert torch.equal(d.masks[f"{layer}.bias"], d.units[layer])
    assert bool(d.units["fc3"].all()) and bool(d.masks["fc3.weight"].all())  # the output layer


def test_structured_group_quantities_sum_over_the_row_and_the_bias():
    s = make_summary(shapes=(("fc1", (8, 5)), ("fc2", (3, 8))))
    w, b = s["fc1.weight"], s["fc1.bias"]
    d = reduce(s, "opd", sparsity=0.5, structured=True)
    assert torch.allclose(d.group_scores["fc1"], (w.precision * w.loc ** 2).sum(1) + b.precision * b.loc ** 2)
    d = reduce(s, "savage-dickey", structured=True)
    expected = savage_dickey(w.loc, w.precision, 0.0, 1.0).sum(1) + savage_dickey(b.loc, b.precision, 0.0, 1.0)
    assert torch.allclose(d.group_scores["fc1"], expected)
    assert torch.equal(d.units["fc1"], expected <= 0)
    d = reduce(s, "magnitude", sparsity=0.5, structured=True)
    assert torch.allclose(d.group_scores["fc1"], (w.loc ** 2).sum(1) + b.loc ** 2)


def test_units_are_removed_when_every_incoming_weight_is():
    s = make_summary()
    d = reduce(s, "magnitude", sparsity=0.85)
    for k in weights(s):
        layer = k.split(".")[0]
        if layer == "fc3":
            assert bool(d.units[layer].all())
        else:
            assert torch.equal(d.units[layer], d.masks[k].any(1))
    assert d.units_removed == {k: int((~v).sum()) for k, v in d.units.items()}


def test_random_is_reproducible_by_seed():
    s = make_summary()
    a, b, c = (reduce(s, "random", sparsity=0.5, seed=seed) for seed in (1, 1, 2))
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in s)
    assert not all(torch.equal(a.masks[k], c.masks[k]) for k in s)


def test_bad_arguments_name_the_argument_and_value():
    s = make_summary()
    with pytest.raises(ValueError, match="method: unknown reduction rule 'obd'"):
        reduce(s, "obd")
    with pytest.raises(ValueError, match=r"sparsity: must be a number in \[0, 1\), got 1.0"):
        reduce(s, "opd", sparsity=1.0)
    with pytest.raises(ValueError, match="sparsity: must be.*-0.1"):
        reduce(s, "opd", sparsity=-0.1)
    with pytest.raises(ValueError, match="not both"):
        reduce(s, "opd", sparsity=0.5, threshold=1.0)
    with pytest.raises(ValueError, match="sparsity: rule 'magnitude' ranks weights"):
        reduce(s, "magnitude")
    with pytest.raises(ValueError, match="sparsity: the spike-slab rule"):
        reduce(s, "spike-slab", sparsity=0.5)
    with pytest.raises(ValueError, match="scope: must be 'global' or 'layer', got 'unit'"):
        reduce(s, "opd", sparsity=0.5, scope="unit")
    with pytest.raises(ValueError, match="reduced_scale: must be a positive number, got -1"):
        reduce(s, "bmr", reduced_scale=-1)


def test_point_estimates_and_improper_priors_are_refused_by_bmr():
    s = make_summary()
    s["fc1.weight"].precision = torch.full_like(s["fc1.weight"].loc, math.inf)
    with pytest.raises(ValueError, match="'fc1.weight' has an infinite posterior precision"):
        reduce(s, "bmr")
    with pytest.raises(ValueError, match="opd.*infinite posterior precision"):
        reduce(s, "opd", sparsity=0.5)
    reduce(s, "magnitude", sparsity=0.5)  # fine: magnitude needs only the means
    s = make_summary()
    s["fc2.weight"].prior_precision = torch.tensor(0.0, dtype=torch.float64)  # log-uniform
    with pytest.raises(ValueError, match="'fc2.weight' has no proper Gaussian prior.*log-alpha"):
        reduce(s, "savage-dickey")


def test_bmr_with_a_nonzero_prior_mean_uses_the_general_formula():
    s = make_summary()
    for site in s.values():
        site.prior_loc = torch.tensor(0.2, dtype=torch.float64)
    d = reduce(s, "bmr", reduced_scale=0.05)
    for k in weights(s):
        dF, _, _ = bmr_gaussian(s[k].loc, s[k].precision, 0.2, 1.0, 0.0, 400.0)
        assert torch.allclose(d.scores[k], dF)
    d0 = reduce(make_summary(), "bmr", reduced_scale=0.05)
    assert not all(torch.allclose(d.scores[k], d0.scores[k]) for k in weights(s))


def _with_low_rank_block(s, name, rank=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    n = s[name].loc.numel()
    factor = 0.2 * torch.randn(n, rank, generator=g, dtype=torch.float64)
    diag = 0.01 + 0.05 * torch.rand(n, generator=g, dtype=torch.float64)
    s[name].block = {"cov_factor": factor, "cov_diag": diag, "shape": tuple(s[name].loc.shape)}
    cov = factor @ factor.T + diag.diag_embed()
    s[name].precision = cov.diagonal().reciprocal().reshape(s[name].loc.shape)  # marginal precisions
    return cov


def test_structured_savage_dickey_uses_the_joint_term_of_a_block():
    from torch.distributions import MultivariateNormal, Normal

    s = make_summary(shapes=(("fc1", (6, 5)), ("fc2", (3, 6))), prior_scale=0.7)
    cov = _with_low_rank_block(s, "fc1.weight")
    d = reduce(s, "savage-dickey", structured=True)
    w, b = s["fc1.weight"], s["fc1.bias"]
    for unit in range(6):
        idx = slice(unit * 5, (unit + 1) * 5)
        joint = MultivariateNormal(w.loc[unit], cov[idx, idx]).log_prob(torch.zeros(5, dtype=torch.float64))
        zero = torch.zeros(5, dtype=torch.float64)
        prior = Normal(zero, torch.full((5,), 0.7, dtype=torch.float64)).log_prob(zero).sum()
        bias = savage_dickey(b.loc[unit], b.precision[unit], 0.0, 1 / 0.49)
        assert d.group_scores["fc1"][unit].item() == pytest.approx((joint - prior + bias).item(), rel=1e-9)
    marginal_sum = reduce(make_summary(shapes=(("fc1", (6, 5)), ("fc2", (3, 6))), prior_scale=0.7),
                          "savage-dickey", structured=True).group_scores["fc1"]
    assert not torch.allclose(d.group_scores["fc1"], marginal_sum)


def test_opd_reads_the_precision_diagonal_of_a_block():
    s = make_summary(shapes=(("fc1", (6, 5)), ("fc2", (3, 6))))
    cov = _with_low_rank_block(s, "fc1.weight")
    d = reduce(s, "opd", sparsity=0.5)
    p_diag = torch.linalg.inv(cov).diagonal().reshape(6, 5)
    assert torch.allclose(d.scores["fc1.weight"], p_diag * s["fc1.weight"].loc ** 2, rtol=1e-9)
    assert bool((p_diag > s["fc1.weight"].precision).all())  # P_ii >= 1 / Sigma_ii, strictly here


# --------------------------------------------------------------------------- N:M patterns


def test_mask_n_m_keeps_the_n_highest_of_every_m_along_the_axis():
    from pyro_sparse.reduction.scores import mask_n_m

    scores = torch.tensor([[1.0, 4, 2, 3, 5, 5, 5, 0, 9, 1], [0, 0, 0, 0, 1, 2, 3, 4, 1, 1]])
    keep = mask_n_m(scores, 2, 4, dim=1)
    # blocks [0:4], [4:8], a last block of 2; ties go to the earlier entry
    assert keep.int().tolist() == [[0, 1, 0, 1, 1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 1, 1, 1, 1]]
    conv = torch.randn(6, 8, 3, 3)
    k = mask_n_m(conv, 1, 4, dim=1)  # input channels at every kernel position
    assert (k.reshape(6, 2, 4, 3, 3).sum(2) == 1).all()
    for bad in ("2", "4:2", "a:b", (0, 4), (2, 2)):
        with pytest.raises(ValueError, match="pattern:"):
            mask_n_m(conv, *(bad if isinstance(bad, tuple) else (bad, 4)))


@pytest.mark.parametrize("method,kwargs", [("magnitude", {}), ("opd", {}), ("savage-dickey", {}),
                                           ("opd", {"sparsity": 0.8}), ("savage-dickey", {"threshold": 0.0})])
def test_a_2_4_pattern_is_ranked_by_the_rule_and_combines_with_its_cut(method, kwargs):
    s = make_summary(shapes=(("fc1", (30, 24)), ("fc2", (10, 30))))
    d = reduce(s, method, pattern="2:4", **kwargs)
    plain = reduce(s, method, **kwargs) if kwargs else None
    for k in weights(s):
        w = d.masks[k]
        blocks = torch.cat([w, w.new_zeros(w.shape[0], (-w.shape[1]) % 4)], 1).reshape(w.shape[0], -1, 4)
        assert (blocks.sum(-1) <= 2).all()
        if plain is not None:
            assert not (w & ~plain.masks[k]).any()  # both cuts apply
        else:  # the pattern alone: 2 of every full block kept, the two the rule ranks highest
            assert (blocks[:, : w.shape[1] // 4].sum(-1) == 2).all()
            keep_score = reduce(s, method, sparsity=0.5).scores[k]
            keep_score = -keep_score if method == "savage-dickey" else keep_score
            first = keep_score[0, :4]
            assert w[0, :4].tolist() == [bool(v) for v in (first >= first.sort().values[2])]
    assert d.options["pattern"] == "2:4"
    with pytest.raises(ValueError, match="pattern: an N:M pattern ranks single weights"):
        reduce(s, "spike-slab", pattern="2:4")
    with pytest.raises(ValueError, match="pattern: an N:M pattern ranks single weights; not with structured"):
        reduce(s, "opd", sparsity=0.5, structured=True, pattern="2:4")
