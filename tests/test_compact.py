"""compact(): removed units physically deleted, predictions equal to the masked network's."""

import math

import pytest
import torch

from pyro_sparse.guides import MeanFieldGuide
from pyro_sparse.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sigmoid, Tanh
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.outcome import reduction_report
from pyro_sparse.rebuild import compact, masked_module, masked_predictive
from pyro_sparse.reduced_runs import load_compact, save_compact
from pyro_sparse.reduction import Decision, reduce
from pyro_sparse.summary import summarize

TOL = 1e-5


def fitted_like(net, x, seed=0):
    """A mean-field summary whose means are the layers' default initialisation plus noise."""
    torch.manual_seed(seed)
    guide = MeanFieldGuide(net.model, init_scale=0.05).setup(x)
    with torch.no_grad():
        for key in guide.locs:
            guide.locs[key].add_(0.05 * torch.randn_like(guide.locs[key]))
    return summarize(net, guide)


def mlp():
    return BayesianNetwork([Linear(12, 16), ReLU(), Linear(16, 14), Sigmoid(), Linear(14, 10), Tanh(),
                            Linear(10, 4)])


def lenet():
    return BayesianNetwork([Conv2d(1, 6, 3, padding=1), ReLU(), MaxPool2d(2), Conv2d(6, 8, 3), ReLU(),
                            Flatten(), Linear(8 * 2 * 2, 12), ReLU(), Linear(12, 3)], input_shape=(1, 8, 8))


def params(module):
    return sum(p.numel() for p in module.parameters())


CASES = [("magnitude", {"sparsity": 0.9}), ("random", {"sparsity": 0.95}), ("opd", {"sparsity": 0.97}),
         ("opd", {"sparsity": 0.5, "structured": True}), ("random", {"sparsity": 0.6, "structured": True}),
         ("magnitude", {"sparsity": 0.98, "scope": "layer"}), ("savage-dickey", {})]


@pytest.mark.parametrize("method,kwargs", CASES)
@pytest.mark.parametrize("make,x_shape", [(mlp, (64, 12)), (lenet, (64, 64))])
def test_compact_predicts_as_the_masked_network(make, x_shape, method, kwargs):
    net = make()
    x = torch.randn(*x_shape)
    s = fitted_like(net, x)
    d = reduce(s, method, **kwargs)
    module = compact(net, s, d)
    with torch.no_grad():
        diff = (module(x) - masked_module(net, s, d)(x)).abs().max().item()
    assert diff <= TOL
    removed = sum(module.plan.units_removed.values())
    if method != "savage-dickey":
        assert removed > 0 and params(module) < sum(v.numel() for v in s.locs().values())
    # every unit the decision removed is gone (the plan may remove more: dead units)
    for layer, kept in d.units.items():
        assert set(module.plan.kept_units[layer]) <= set(torch.nonzero(kept).flatten().tolist())


def _decision(s, masks):
    full = {k: torch.ones_like(v.loc, dtype=torch.bool) for k, v in s.items()}
    full.update(masks)
    return Decision("hand", full, {}, "none", {})


def test_dead_and_constant_units_of_an_mlp():
    net = BayesianNetwork([Linear(5, 4), ReLU(), Linear(4, 3), ReLU(), Linear(3, 2)])
    x = torch.randn(20, 5)
    s = fitted_like(net, x)
    s["fc1.bias"].loc.copy_(torch.tensor([0.5, -0.3, 0.2, 0.1]))
    m1 = torch.ones(4, 5, dtype=torch.bool)
    m1[0] = False  # unit 0: constant relu(0.5) = 0.5, folded into fc2's bias
    m1[1] = False  # unit 1: constant relu(-0.3) = 0, nothing to fold
    m2 = torch.ones(3, 4, dtype=torch.bool)
    m2[:, 2] = False  # unit 2 of fc1: nobody reads it (dead)
    m3 = torch.ones(2, 3, dtype=torch.bool)
    m3[:, 1] = False  # unit 1 of fc2: dead
    d = _decision(s, {"fc1.weight": m1, "fc2.weight": m2, "fc3.weight": m3})
    module = compact(net, s, d)
    assert module.plan.kept_units == {"fc1": [3], "fc2": [0, 2], "fc3": [0, 1]}
    assert module[0].weight.shape == (1, 5) and module[2].weight.shape == (2, 1) and module[4].weight.shape == (2, 2)
    w2, b2 = s["fc2.weight"].loc, s["fc2.bias"].loc
    expected_bias = b2[[0, 2]] + 0.5 * w2[[0, 2], 0]
    assert torch.allclose(module[2].bias, expected_bias, atol=1e-7)
    assert torch.equal(module[2].weight, w2[[0, 2]][:, [3]])
    with torch.no_grad():
        assert (module(x) - masked_module(net, s, d)(x)).abs().max() <= TOL


def test_a_layer_without_bias_gets_one_for_the_folded_constant():
    net = BayesianNetwork([Linear(5, 4), Sigmoid(), Linear(4, 3, bias=False)])
    x = torch.randn(10, 5)
    s = fitted_like(net, x)
    m1 = torch.ones(4, 5, dtype=torch.bool)
    m1[1] = False  # sigmoid(b) != 0: a constant the next layer must add
    module = compact(net, s, _decision(s, {"fc1.weight": m1}))
    assert module[2].bias is not None and module.spec["layers"][2]["bias"] is True
    with torch.no_grad():
        assert (module(x) - masked_module(net, s, _decision(s, {"fc1.weight": m1}))(x)).abs().max() <= TOL


def test_conv_channels_map_to_flattened_columns():
    """Removing channel c of the last conv deletes columns c*h*w .. (c+1)*h*w - 1 of the linear layer."""
    net = lenet()
    x = torch.randn(16, 64)
    s = fitted_like(net, x)
    m = torch.ones(8, 6, 3, 3, dtype=torch.bool)
    mb = torch.ones(8, dtype=torch.bool)
    m[[1, 5]] = False
    mb[[1, 5]] = False  # structured removal of conv2 channels 1 and 5 (relu(0) = 0)
    d = _decision(s, {"conv2.weight": m, "conv2.bias": mb})
    module = compact(net, s, d)
    assert module.plan.kept_units["conv2"] == [0, 2, 3, 4, 6, 7]
    conv2, fc1 = module[4], module[7]
    assert conv2.weight.shape == (6, 6, 3, 3) and fc1.weight.shape == (12, 6 * 4)
    cols = [c * 4 + i for c in (0, 2, 3, 4, 6, 7) for i in range(4)]
    assert torch.equal(fc1.weight, s["fc1.weight"].loc[:, cols])
    with torch.no_grad():
        assert (module(x) - masked_module(net, s, d)(x)).abs().max() <= TOL


def test_conv_to_padded_conv_keeps_nonzero_constant_channels():
    """A constant channel feeding a zero-padded conv is not uniform at the border: keep it,
    unless its constant is exactly zero."""
    net = lenet()
    x = torch.randn(16, 64)
    s = fitted_like(net, x)
    net2 = BayesianNetwork([Conv2d(1, 4, 3, padding=1), ReLU(), Conv2d(4, 5, 3, padding=1), ReLU(), Flatten(),
                            Linear(5 * 8 * 8, 3)], input_shape=(1, 8, 8))
    s = fitted_like(net2, x)
    s["conv1.bias"].loc.copy_(torch.tensor([0.3, -0.2, 0.1, 0.2]))
    m = torch.ones(4, 1, 3, 3, dtype=torch.bool)
    m[[0, 1]] = False  # constant channels: relu(0.3) > 0 (kept), relu(-0.2) = 0 (removed)
    d = _decision(s, {"conv1.weight": m})
    module = compact(net2, s, d)
    assert module.plan.kept_units["conv1"] == [0, 2, 3]
    with torch.no_grad():
        assert (module(x) - masked_module(net2, s, d)(x)).abs().max() <= TOL


def test_conv_to_unpadded_conv_folds_constant_channels():
    net = BayesianNetwork([Conv2d(1, 4, 3, padding=1), Tanh(), Conv2d(4, 5, 3), ReLU(), Flatten(),
                           Linear(5 * 6 * 6, 3)], input_shape=(1, 8, 8))
    x = torch.randn(16, 64)
    s = fitted_like(net, x)
    m = torch.ones(4, 1, 3, 3, dtype=torch.bool)
    m[2] = False  # tanh(b) != 0, uniform map, no padding: folded into conv2's bias
    d = _decision(s, {"conv1.weight": m})
    module = compact(net, s, d)
    assert module.plan.kept_units["conv1"] == [0, 1, 3] and module.plan.folded == ["conv2"]
    expected = s["conv2.bias"].loc + torch.tanh(s["conv1.bias"].loc[2]) * s["conv2.weight"].loc[:, 2].sum((1, 2))
    assert torch.allclose(module[3].bias, expected, atol=1e-6)
    with torch.no_grad():
        assert (module(x) - masked_module(net, s, d)(x)).abs().max() <= TOL


def test_report_counts_are_consistent():
    net = lenet()
    x, y = torch.randn(40, 64), torch.randint(0, 3, (40,))
    s = fitted_like(net, x)
    d = reduce(s, "opd", sparsity=0.5, structured=True)
    module = compact(net, s, d)
    r = reduction_report(net, s, d, x, y, module=module)
    # kept weights are the compact network's non-zero weights: a deleted unit's weights are not kept,
    # even where the rule kept them (its column in the next layer after an unread unit went)
    compact_weights = [p for n, p in module.named_parameters() if n.endswith("weight")]
    assert r["weights_kept"] == sum(int((w != 0).sum()) for w in compact_weights)
    assert r["rule_weights_kept"] == sum(int(d.masks[k].sum()) for k in d.weight_sites()) > r["weights_kept"]
    assert r["weights_total"] == 6 * 9 + 8 * 6 * 9 + 12 * 32 + 3 * 12
    assert r["sparsity"] == pytest.approx(1 - r["weights_kept"] / r["weights_total"])
    assert r["rule_sparsity"] == pytest.approx(d.sparsity) and r["sparsity"] > d.sparsity
    assert r["params_dense"] == sum(v.numel() for v in s.locs().values())
    assert r["params_compact"] == params(module)
    assert r["params_nonzero"] == sum(int((p != 0).sum()) for p in module.parameters())
    assert r["compression_ratio"] == pytest.approx(r["params_dense"] / r["params_nonzero"])
    assert r["param_bytes_compact"] == 4 * params(module)
    for name, entry in r["layers"].items():
        assert entry["units_kept"] == len(module.plan.kept_units[name])
        assert entry["weights_kept"] == sum(int((p != 0).sum()) for n, p in getattr(module, name).named_parameters()
                                            if n.endswith("weight"))
        assert entry["units_total"] - entry["units_kept"] == r["units_removed_per_layer"][name]
    assert r["units_removed"] == sum(r["units_removed_per_layer"].values()) > 0
    # FLOPs by hand: conv1 has 6 filters of 1x3x3 over 8x8 outputs, conv2 8 of 6x3x3 over 2x2
    assert r["layers"]["conv1"]["flops_dense"] == 2 * 6 * 9 * 64
    assert r["layers"]["conv2"]["flops_dense"] == 2 * 8 * 6 * 9 * 4
    k1, k2 = len(module.plan.kept_units["conv1"]), len(module.plan.kept_units["conv2"])
    assert r["layers"]["conv2"]["flops_compact"] == 2 * k2 * k1 * 9 * 4
    assert r["flops_dense"] == sum(e["flops_dense"] for e in r["layers"].values())
    assert r["max_abs_output_diff"] <= TOL
    dense_acc = (net.deterministic(s.locs())(x).argmax(-1) == y).float().mean().item()
    assert r["test_accuracy_dense"] == pytest.approx(dense_acc)
    reduced_acc = (module(x).argmax(-1) == y).float().mean().item()
    assert r["test_accuracy_reduced"] == pytest.approx(reduced_acc)
    nll = torch.nn.functional.cross_entropy(module(x), y).item()
    assert r["test_nll_reduced"] == pytest.approx(nll, rel=1e-5)


def test_masked_predictive_draws_from_the_summary_and_zeros_pruned_weights():
    net = BayesianNetwork([Linear(3, 2, bias=False)])
    x = torch.eye(3)
    s = fitted_like(net, x)
    d = reduce(s, "magnitude", sparsity=0.5)
    out = masked_predictive(net, s, d, x, num_samples=4000, generator=torch.Generator().manual_seed(0))
    # output j for input e_i is the weight w_ji: mean loc*mask, sd sigma*mask
    w = out.transpose(1, 2)  # (S, out, in)
    mask = d.masks["fc1.weight"]
    sd = s["fc1.weight"].precision.rsqrt()
    assert torch.equal(w[:, ~mask], torch.zeros_like(w[:, ~mask]))
    err = (w.mean(0) - s["fc1.weight"].loc * mask).abs()
    assert bool((err[mask] < 4 * sd[mask] / math.sqrt(4000)).all())  # 4 standard errors
    assert torch.allclose(w.std(0)[mask], sd[mask], rtol=0.1)


def test_save_and_load_compact_round_trip(tmp_path):
    net = lenet()
    x = torch.randn(8, 64)
    s = fitted_like(net, x)
    d = reduce(s, "opd", sparsity=0.5, structured=True)
    module = compact(net, s, d)
    path = str(tmp_path / "compact.pt")
    save_compact(path, module, {"method": "opd"})
    raw = torch.load(path, weights_only=True)
    assert raw["spec"]["layers"][3]["in"] == len(module.plan.kept_units["conv1"])
    loaded = load_compact(path)
    assert loaded.info == {"method": "opd"}
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))


def test_a_pattern_is_laid_over_the_inputs_the_compact_layers_keep():
    """reduce(..., pattern="2:4") blocks every layer's inputs; compaction then deletes units nothing
    reads, which shifts the next layer's blocks. align_pattern lays the blocks over the kept inputs."""
    from pyro_sparse.rebuild import align_pattern
    from pyro_sparse.storage import pattern_holds

    net = BayesianNetwork([Linear(16, 24), ReLU(), Linear(24, 20), ReLU(), Linear(20, 4)])
    x = torch.randn(32, 16)
    s = fitted_like(net, x)
    broken = 0
    for q in (0.6, 0.8, 0.9):
        d = reduce(s, "magnitude", sparsity=q, pattern="2:4")
        plain = compact(net, s, d, storage="dense")
        broken += not all(pattern_holds(m.weight, 2, 4) for m in plain if isinstance(m, torch.nn.Linear))
        a = align_pattern(net, s, d)
        small = compact(net, s, a, storage="dense")
        assert all(pattern_holds(m.weight, 2, 4) for m in small if isinstance(m, torch.nn.Linear))
        assert not any((a.masks[k] & ~reduce(s, "magnitude", sparsity=q).masks[k]).any() for k in a.masks)
        with torch.no_grad():
            assert (small(x) - masked_module(net, s, a)(x)).abs().max().item() <= TOL
        assert a.options["pattern"] == "2:4" and a.options["pattern_over"] == "kept inputs"
    assert broken  # the unaligned pattern did break somewhere: the case this is for
    assert align_pattern(net, s, reduce(s, "magnitude", sparsity=0.5)).options.get("pattern") is None
