"""Bayesian LSTM/GRU layers, their reduction and compaction, and the character corpus."""

import math
import os

import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from pyro_sparse.data import load_text
from pyro_sparse.elbo import MeanFieldELBO
from pyro_sparse.errors import DataError
from pyro_sparse.fitting import evaluate
from pyro_sparse.guides import DeltaGuide, MeanFieldGuide
from pyro_sparse.layers import Linear, ReLU
from pyro_sparse.likelihoods import SequenceCategorical
from pyro_sparse.local_reparam import LocalReparameterization
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.rebuild import compact, masked_values
from pyro_sparse.recurrent import (
    GRU,
    LSTM,
    Embedding,
    LastStep,
    OneHot,
    compact_recurrent,
    recurrent_masks,
    recurrent_sequence,
)
from pyro_sparse.reduction import reduce
from pyro_sparse.spec import build_network, load_model_spec
from pyro_sparse.summary import PosteriorSummary, SiteSummary


def _random_params(net, generator, scale=0.5):
    """Random point values of every site (z near 1 so gates stay in a useful range)."""
    values = {}
    for site, (layer, p, _) in net.param_sites().items():
        shape = layer.param_shapes()[p]
        if p.startswith("z_"):
            values[site] = 1 + 0.3 * torch.randn(shape, generator=generator)
        else:
            values[site] = scale * torch.randn(shape, generator=generator)
    return values


def _lstm_reference(x, w_ih, w_hh, b, z_x, z_h, z_g):
    """The gated LSTM of DESIGN.md written out step by step (independent of the layer's folding)."""
    B, T, _ = x.shape
    H = w_hh.shape[1]
    h, c, out = x.new_zeros(B, H), x.new_zeros(B, H), []
    for t in range(T):
        pre = ((x[:, t] * z_x) @ w_ih.T + (h * z_h) @ w_hh.T) * z_g + b
        i, f, g, o = pre.split(H, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        out.append(h * z_h)
    return torch.stack(out, 1)


def _gru_reference(x, w_ih, w_hh, b, z_x, z_h, z_g):
    B, T, _ = x.shape
    H = w_hh.shape[1]
    h, out = x.new_zeros(B, H), []
    for t in range(T):
        xw = (x[:, t] * z_x) @ w_ih.T
        hw = (h * z_h) @ w_hh.T
        (xr, xz, xn), (hr, hz, hn) = xw.split(H, 1), hw.split(H, 1)
        (zr, zz, zn), (br, bz, bn) = z_g.split(H), b.split(H)
        r = torch.sigmoid((xr + hr) * zr + br)
        u = torch.sigmoid((xz + hz) * zz + bz)
        n = torch.tanh((xn + r * hn) * zn + bn)
        h = (1 - u) * n + u * h
        out.append(h * z_h)
    return torch.stack(out, 1)


# ---------------------------------------------------------------------------- forward maths
@pytest.mark.parametrize("cell,reference", [("lstm", _lstm_reference), ("gru", _gru_reference)])
def test_gated_recurrence_matches_the_written_out_equations(cell, reference):
    g = torch.Generator().manual_seed(0)
    B, T, F, H = 3, 7, 4, 5
    G = 4 if cell == "lstm" else 3
    x = torch.randn(B, T, F, generator=g)
    w_ih, w_hh, b = (0.5 * torch.randn(G * H, F, generator=g), 0.5 * torch.randn(G * H, H, generator=g),
                     torch.randn(G * H, generator=g))
    z_x, z_h, z_g = (torch.rand(F, generator=g) + 0.5, torch.rand(H, generator=g) + 0.5,
                     torch.rand(G * H, generator=g) + 0.5)
    got = recurrent_sequence(cell, x, w_ih, w_hh, b, z_x, z_h, z_g)
    torch.testing.assert_close(got, reference(x, w_ih, w_hh, b, z_x, z_h, z_g), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls,torch_cls", [(LSTM, nn.LSTM), (GRU, nn.GRU)])
def test_fixed_weights_equal_torch_module(cls, torch_cls):
    torch.manual_seed(1)
    layer = cls(3, 6, return_sequence=True)
    torch_layer = torch_cls(3, 6, batch_first=True)
    params = {"weight_ih": torch_layer.weight_ih_l0.detach(), "weight_hh": torch_layer.weight_hh_l0.detach(),
              "bias": (torch_layer.bias_ih_l0 + torch_layer.bias_hh_l0).detach()}
    x = torch.randn(4, 9, 3)
    if cls is LSTM:  # torch's LSTM adds the two biases: the same model with one bias
        expected = torch_layer(x)[0]
    else:  # torch's GRU puts b_hn inside r * (...): compare with b_hn = 0
        with torch.no_grad():
            torch_layer.bias_ih_l0.add_(torch_layer.bias_hh_l0)
            torch_layer.bias_hh_l0.zero_()
        params["bias"] = torch_layer.bias_ih_l0.detach()
        expected = torch_layer(x)[0]
    net = BayesianNetwork([("rnn", layer)])
    got = net.point_outputs(x, {f"rnn.{k}": v for k, v in params.items()})
    torch.testing.assert_close(got, expected.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.deterministic(params)(x), expected.detach(), atol=1e-6, rtol=1e-5)


def test_stacked_layers_and_last_step():
    torch.manual_seed(2)
    layer = LSTM(2, 4, num_layers=2, return_sequence=False, z_hidden=True)
    assert list(layer.priors()) == ["weight_ih", "weight_hh", "bias", "z_hidden", "weight_ih_l1",
                                    "weight_hh_l1", "bias_l1", "z_hidden_l1"]
    net = BayesianNetwork([("lstm", layer)])
    values = _random_params(net, torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 2)
    out = net.point_outputs(x, values)
    p = {k.split(".", 1)[1]: v for k, v in values.items()}
    one = lambda z, s: _lstm_reference(z, p[f"weight_ih{s}"], p[f"weight_hh{s}"], p[f"bias{s}"], 1.0,  # noqa: E731
                                       p[f"z_hidden{s}"], 1.0)
    torch.testing.assert_close(out, one(one(x, ""), "_l1")[:, -1], atol=1e-6, rtol=1e-5)
    assert LastStep().out_shape((5, 4)) == (4,)


# ---------------------------------------------------------------------------- weight sharing
def _tiny_classifier(**groups):
    return BayesianNetwork([("lstm", LSTM(1, 6, prior="log_uniform", **groups)),
                            ("fc", Linear(6, 3, prior="log_uniform"))], input_shape=(8, 1))


def test_one_weight_sample_per_site_shared_by_all_steps():
    net = _tiny_classifier(z_input=True, z_hidden=True, z_gates=True)
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    guide = MeanFieldGuide(net.model, init_scale=0.3)
    guide.setup(x, y, dataset_size=50)
    recurrent = [s for s in guide.sites if s.startswith("lstm.")]
    assert sorted(recurrent) == sorted(["lstm.weight_ih", "lstm.weight_hh", "lstm.bias", "lstm.z_input",
                                        "lstm.z_hidden", "lstm.z_gates"])
    assert not any(guide.sites[s]["local_reparam"] for s in recurrent)
    assert guide.sites["fc.weight"]["local_reparam"]  # the feed-forward head still uses it
    model_trace, guide_trace = MeanFieldELBO().traces(net.model, guide, x, y, dataset_size=50)
    names = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and n.startswith("lstm.")]
    assert sorted(names) == sorted(recurrent)  # exactly one sample site per parameter per forward
    weights = {n: model_trace.nodes[n]["value"] for n in recurrent}
    # a real draw, not the placeholder loc that local reparameterisation would leave
    assert not torch.allclose(weights["lstm.weight_hh"], guide.locs["lstm__weight_hh"])
    # the layer's output is the deterministic recurrence with that single draw at every step
    with LocalReparameterization():
        lstm_out = poutine.replay(net.layers["lstm"], trace=guide_trace)(x.view(5, 8, 1))
    expected = net.layers["lstm"].run(x.view(5, 8, 1), {n.split(".")[1]: v for n, v in weights.items()})
    torch.testing.assert_close(lstm_out, expected)


def test_embedding_tokens_and_group_variable():
    emb = Embedding(5, 3, z_tokens=True)
    net = BayesianNetwork([("emb", emb)])
    w, z = torch.randn(5, 3), torch.tensor([1.0, 0.0, 2.0, 1.0, 1.0])
    x = torch.tensor([[0.0, 1.0, 2.0]])
    out = net.point_outputs(x, {"emb.weight": w, "emb.z_tokens": z})
    torch.testing.assert_close(out[0], torch.stack([w[0], 0 * w[1], 2 * w[2]]))
    assert OneHot(4).out_shape((7,)) == (7, 4)


# ---------------------------------------------------------------------------- groups
def test_z_hidden_applies_to_the_output_the_next_layer_reads():
    net = _tiny_classifier(z_hidden=True)
    values = _random_params(net, torch.Generator().manual_seed(3))
    x = torch.randn(4, 8)
    values["lstm.z_hidden"][2] = 0.0
    h = BayesianNetwork([("lstm", net.layers["lstm"])], input_shape=(8, 1)).point_outputs(
        x, {k: v for k, v in values.items() if k.startswith("lstm.")})
    assert torch.all(h[:, 2] == 0)
    changed = dict(values)
    changed["fc.weight"] = values["fc.weight"].clone()
    changed["fc.weight"][:, 2] += 10.0  # the head's weights on neuron 2 no longer matter
    torch.testing.assert_close(net.point_outputs(x, changed), net.point_outputs(x, values))
    changed["fc.weight"][:, 1] += 1.0  # but another neuron's do
    assert not torch.allclose(net.point_outputs(x, changed), net.point_outputs(x, values))


def test_removed_gate_is_constant():
    H = 3
    net = BayesianNetwork([("lstm", LSTM(2, H, return_sequence=True, z_gates=True))])
    values = _random_params(net, torch.Generator().manual_seed(4))
    values["lstm.z_gates"][H + 1] = 0.0  # forget gate of unit 1
    values["lstm.z_gates"][2 * H + 0] = 0.0  # candidate g of unit 0
    x = torch.randn(2, 6, 2)
    perturbed = dict(values)
    perturbed["lstm.weight_ih"] = values["lstm.weight_ih"].clone()
    perturbed["lstm.weight_ih"][[H + 1, 2 * H]] += 5.0  # weights into the removed gates do not matter
    torch.testing.assert_close(net.point_outputs(x, perturbed), net.point_outputs(x, values))
    keep = {"weight_ih": torch.ones(4 * H, 2, dtype=torch.bool), "weight_hh": torch.ones(4 * H, H, dtype=torch.bool)}
    masks = recurrent_masks("lstm", keep["weight_ih"], keep["weight_hh"], z_gates=values["lstm.z_gates"] != 0)
    report = masks.report()
    assert report["gates"]["f"] == {"kept": 2, "constant": 1}
    assert report["gates"]["g"] == {"kept": 2, "constant": 1}
    module = compact_recurrent("lstm", values["lstm.weight_ih"], values["lstm.weight_hh"], values["lstm.bias"], masks,
                               z_gates=values["lstm.z_gates"])
    b = values["lstm.bias"]
    assert module.weight_ih.shape[0] == 4 * H - 2  # no matmul rows for the constant gates
    assert module.constant_index.tolist() == [H + 1, 2 * H]  # one stored number per constant gate
    torch.testing.assert_close(module.constants.detach(), torch.stack([torch.sigmoid(b[H + 1]), torch.tanh(b[2 * H])]))
    torch.testing.assert_close(module(x), net.point_outputs(x, values), atol=1e-6, rtol=1e-5)


def test_recurrent_masks_rules_and_fixed_point():
    # GRU, H = 2, F = 1. Unit 1 reads only itself and feeds nothing outside the layer; once its
    # own gates are gone it has no outgoing weight, so it goes (the fixed point).
    G, H = 3, 2
    w_ih = torch.zeros(G * H, 1, dtype=torch.bool)
    w_hh = torch.zeros(G * H, H, dtype=torch.bool)
    w_ih[0, 0] = w_ih[4, 0] = True  # r of unit 0, n of unit 0 read the input
    w_hh[1, 1] = True  # r of unit 1 reads unit 1
    next_input = torch.tensor([[True, False]])  # only unit 0 is read downstream
    z_g = torch.ones(G * H, dtype=torch.bool)
    z_g[1] = False  # ... and the r gate of unit 1 is removed
    m = recurrent_masks("gru", w_ih, w_hh, z_gates=z_g, next_input=next_input)
    assert m.hidden.tolist() == [True, False]
    assert m.input.tolist() == [True]
    assert m.gates.tolist() == [True, False, False, False, True, False]  # r0, n0 computed; z0 constant
    assert int(m.weight_hh.sum()) == 0 and int(m.weight_ih.sum()) == 2
    assert m.report()["gates"] == {"r": {"kept": 1, "constant": 0}, "z": {"kept": 0, "constant": 1},
                                   "n": {"kept": 1, "constant": 0}}
    # without the next layer every neuron counts as read: unit 1 stays (z kept), all its gates constant
    m2 = recurrent_masks("gru", w_ih, w_hh, z_gates=z_g)
    assert m2.hidden.tolist() == [True, True]
    with pytest.raises(ValueError, match="weight_hh"):
        recurrent_masks("gru", w_ih, w_hh.float())


def _summary_with_random_log_alpha(net, values, generator):
    summary = PosteriorSummary()
    for site, (layer, p, _) in net.param_sites().items():
        v = values[site]
        la = 3 * torch.randn(v.shape, generator=generator) + (2.0 if "weight" in p else 0.5)
        summary[site] = SiteSummary(layer.site, p, v, torch.ones_like(v), torch.zeros(()), torch.ones(()),
                                    layer.param_axes[p], la)
    return summary


@pytest.mark.parametrize("cls", [LSTM, GRU])
@pytest.mark.parametrize("num_layers,return_sequence", [(1, False), (2, True)])
def test_compact_network_equals_masked_model(cls, num_layers, return_sequence):
    """Any rule's decision on a recurrent network compacts through the one protocol: removed
    neurons deleted, removed gates constant, the reading layer's columns dropped, and the compact
    network computes what the masked network does."""
    g = torch.Generator().manual_seed(5)
    layers = [("onehot", OneHot(6)),
              ("rnn", cls(6, 10, num_layers=num_layers, return_sequence=return_sequence, z_input=True,
                          z_hidden=True, z_gates=True))]
    if not return_sequence:
        layers += [("fc1", Linear(10, 8)), ("relu", ReLU()), ("fc2", Linear(8, 3))]
    else:
        layers += [("fc", Linear(10, 6))]
    net = BayesianNetwork(layers)
    values = _random_params(net, g)
    summary = _summary_with_random_log_alpha(net, values, g)
    summary["rnn.z_hidden"].log_alpha[[1, 4]] = 10.0  # two neurons surely go
    decision = reduce(summary, "log-alpha")
    assert decision.masks["rnn.z_hidden"][[1, 4]].tolist() == [False, False]  # group variables are judged
    x = torch.randint(0, 6, (4, 7)).float()
    masked = net.point_outputs(x, masked_values(values, decision))
    module = compact(net, summary, decision, input_shape=(7,))
    torch.testing.assert_close(module(x), masked, atol=1e-5, rtol=1e-5)
    reports = module.plan.layers["rnn"]["recurrent"]
    assert len(reports) == num_layers
    assert any(r["hidden"][0] < r["hidden"][1] for r in reports)  # some neurons really removed
    cells = [m for m in module.rnn if m.__class__.__name__ == "CompactRecurrent"]
    assert [c.hidden_size for c in cells[:-1]] == [r["hidden"][0] for r in reports[:-1]]
    assert cells[-1].hidden_size == len(module.plan.kept_units["rnn"])
    if num_layers == 1:  # z_hidden of the last stacked layer: 1 and 4 go, and with them their weights
        assert 1 not in module.plan.kept_units["rnn"] and 4 not in module.plan.kept_units["rnn"]
    reader = module.fc1 if not return_sequence else module.fc
    assert reader.in_features == cells[-1].hidden_size


def test_compact_lstm_under_an_input_shape_with_magnitude_pruning():
    """A ranking rule on a recurrent network: weights go by magnitude, the structure follows."""
    g = torch.Generator().manual_seed(6)
    net = BayesianNetwork([("rnn", LSTM(3, 8, z_input=True, z_hidden=True, z_gates=True)), ("fc", Linear(8, 4))],
                          input_shape=(5, 3))
    values = _random_params(net, g)
    summary = _summary_with_random_log_alpha(net, values, g)
    decision = reduce(summary, "magnitude", sparsity=0.9)
    x = torch.randn(6, 15)
    module = compact(net, summary, decision)
    torch.testing.assert_close(module(x), net.point_outputs(x, masked_values(values, decision)), atol=1e-6, rtol=1e-5)
    report = module.plan.layers["rnn"]["recurrent"][0]
    assert sum(g["constant"] for g in report["gates"].values()) > 0


def test_compact_gru_single_layer_function():
    g = torch.Generator().manual_seed(7)
    H, F = 6, 3
    w_ih, w_hh = torch.randn(3 * H, F, generator=g), torch.randn(3 * H, H, generator=g)
    b = torch.randn(3 * H, generator=g)
    keep_ih = torch.rand(3 * H, F, generator=g) < 0.5
    keep_hh = torch.rand(3 * H, H, generator=g) < 0.3
    z_h = torch.ones(H)
    z_keep = torch.tensor([True, True, False, True, True, True])
    m = recurrent_masks("gru", keep_ih, keep_hh, z_hidden=z_keep)
    x = torch.randn(2, 5, F)
    expected = recurrent_sequence("gru", x, w_ih * m.weight_ih, w_hh * m.weight_hh, b, None, z_h * z_keep, None)
    out = compact_recurrent("gru", w_ih, w_hh, b, m, z_hidden=z_h)(x)
    torch.testing.assert_close(out, expected[..., m.hidden], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- text data
def _write(tmp_path, text, name="corpus.txt"):
    path = os.path.join(tmp_path, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def test_text_loader_sequences_vocabulary_and_split(tmp_path):
    text = "abcab" * 20 + "abz!"  # 104 characters; 'z' and '!' only in the held-out part
    d = load_text(_write(tmp_path, text), sequence_length=5, valid_fraction=0.25)
    train, valid = text[:78], text[78:]
    assert d.task == "sequence"
    assert d.extras["vocabulary"] == ["a", "b", "c", "<unk>"]
    assert d.num_outputs == 4
    assert d.x_train.shape == ((len(train) - 1) // 5, 5) and d.x_test.shape == ((len(valid) - 1) // 5, 5)
    decode = lambda ids: "".join(d.extras["vocabulary"][int(i)] for i in ids)  # noqa: E731
    assert decode(d.x_train[0]) == train[:5] and decode(d.y_train[0]) == train[1:6]
    assert torch.equal(d.y_train[:, :-1], d.x_train[:, 1:].long())
    flat_valid = "".join(decode(row) for row in d.y_test)
    assert flat_valid == "".join(c if c in "abc" else "<unk>" for c in valid[1: 1 + d.y_test.numel()])
    small = load_text(_write(tmp_path, text), sequence_length=5, valid_fraction=0.25, max_vocab=2)
    assert small.extras["vocabulary"] == ["a", "b", "<unk>"]


def test_text_loader_errors(tmp_path):
    with pytest.raises(DataError, match="fewer than sequence_length"):
        load_text(_write(tmp_path, "short text"), sequence_length=50)
    path = os.path.join(tmp_path, "bad.txt")
    with open(path, "wb") as f:
        f.write(b"\xff\xfe\xfa" * 100)
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(path)
    from pyro_sparse.data import load_dataset

    with pytest.raises(DataError, match=r"data options \[.sequence_length.\] do not apply to this data set"):
        load_dataset("digits", options={"sequence_length": 5})


def test_sequence_likelihood_scales_whole_sequences(tmp_path):
    lik = SequenceCategorical()
    logits = torch.randn(3, 4, 5)
    y = torch.randint(0, 5, (3, 4))
    idx = torch.tensor([2, 7, 9])
    trace = poutine.trace(lambda: lik.observe(logits, y, dataset_size=10, subsample=idx)).get_trace()
    site = trace.nodes["obs"]
    expected = torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).sum() * 10 / 3
    torch.testing.assert_close((site["fn"].log_prob(y) * site["scale"]).sum(), expected)


def test_char_lm_spec_and_bits_per_character(tmp_path, root):
    text = "".join(chr(97 + (i * 7) % 5) for i in range(600))
    data = load_text(_write(tmp_path, text), sequence_length=10)
    spec = load_model_spec(os.path.join(root, "models", "char_lm_wn.yaml"))
    net = build_network(spec, data.feature_shape, data.num_outputs)
    assert "lstm.z_input" in net.param_sites() and "lstm.z_hidden" in net.param_sites()
    guide = DeltaGuide(net.model)
    guide.setup(data.x_train[:4], data.y_train[:4], dataset_size=len(data.x_train))
    metrics = evaluate(net, guide, data.x_test, data.y_test)
    logits = net.point_outputs(data.x_test, guide.median())
    nll = -torch.log_softmax(logits, -1).gather(-1, data.y_test.unsqueeze(-1)).mean().item()
    assert metrics["test_bpc"] == pytest.approx(nll / math.log(2), rel=1e-5)
    assert metrics["test_nll"] == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("name", ["lstm_classifier", "lstm_classifier_w", "lstm_classifier_wn", "lstm_classifier_wgn",
                                  "gru_classifier_wgn"])
def test_classifier_specs_build(root, name):
    net = build_network(load_model_spec(os.path.join(root, "models", f"{name}.yaml")), (40,), 10)
    sites = set(net.param_sites())
    cell = name.split("_")[0]
    assert {f"{cell}.weight_ih", f"{cell}.weight_hh", f"{cell}.bias", "fc.weight"} <= sites
    assert (f"{cell}.z_hidden" in sites) == name.endswith(("wn", "wgn"))
    assert (f"{cell}.z_gates" in sites) == name.endswith("wgn")
    inits = {site: getattr(layer, f"{p}_init") for site, (layer, p, _) in net.param_sites().items()}
    assert net.point_outputs(torch.randn(2, 40), inits).shape == (2, 10)


# ---------------------------------------------------------------------------- convergence
@pytest.mark.slow
def test_sparse_lstm_learns_to_remember_and_prunes():
    """W+G+N Sparse VD on "is the first value positive?" read over 12 steps: the LSTM must carry
    one bit through the recurrence; it learns it, and most weights and some gates go."""
    from pyro_sparse.data import Dataset
    from pyro_sparse.fitting import SVITrainer
    from pyro_sparse.recipe import parse_recipe
    from pyro_sparse.summary import summarize

    torch.manual_seed(0)
    n, T = 1200, 12
    x = torch.randn(n + 400, T)
    y = (x[:, 0] > 0).long()
    data = Dataset("first-sign", x[:n], y[:n], x[n:], y[n:], "classification", 2)
    net = BayesianNetwork([("lstm", LSTM(1, 16, prior="log_uniform", z_input=True, z_hidden=True, z_gates=True)),
                           ("fc", Linear(16, 2, prior="log_uniform"))], input_shape=(T, 1))
    guide = MeanFieldGuide(net.model, init_scale=math.exp(-5))
    recipe = parse_recipe({"epochs": 40, "batch_size": 100, "optimizer": {"name": "Adam", "lr": 0.01},
                           "kl_free_epochs": 8, "kl_warmup_epochs": 8, "eval_every": 40, "eval_samples": 3,
                           "grad_clip": 10.0})
    metrics = SVITrainer(net, guide, data, recipe, progress=False).fit()
    assert metrics["test_accuracy"] > 0.95
    module = compact(net, summarize(net, guide), reduce(summarize(net, guide), "log-alpha"))
    logits = module(data.x_test)
    assert (logits.argmax(-1) == data.y_test).float().mean() > 0.95
    report = module.plan.layers["lstm"]["recurrent"][0]
    kept, total = report["weights"]
    assert kept / total < 0.15  # measured 46 / 1088
    assert report["hidden"][0] < 16
    assert sum(g["constant"] for g in report["gates"].values()) > 0


@pytest.mark.slow
def test_char_lm_run_from_a_text_file_reports_bpc(tmp_path, root):
    """The CLI path: --data PATH.txt with the spec's data options; the LM beats the unigram model."""
    import json
    import random

    import yaml

    from pyro_sparse.cli import main

    rng = random.Random(0)
    words = ["lstm", "gate", "sparse", "prior", "weight", "hidden", "bayes", "pyro"]
    text = "".join(rng.choice(words) + (". " if rng.random() < 0.2 else " ") for _ in range(4000))
    corpus = _write(tmp_path, text)
    spec = yaml.safe_load(open(os.path.join(root, "models", "char_lm_wn.yaml")))
    spec["data"] = {"sequence_length": 25, "valid_fraction": 0.1}
    spec["layers"][1]["hidden_size"] = 32
    recipe = yaml.safe_load(open(os.path.join(root, "inference", "svi_sparsevd_char_lm.yaml")))
    recipe.update({"epochs": 6, "batch_size": 32, "optimizer": {"name": "Adam", "lr": 0.01}})
    paths = {}
    for name, content in (("model.yaml", spec), ("recipe.yaml", recipe)):
        paths[name] = os.path.join(tmp_path, name)
        with open(paths[name], "w") as f:
            yaml.safe_dump(content, f)
    out = os.path.join(tmp_path, "run")
    assert main(["fit", "--model", paths["model.yaml"], "--inference", paths["recipe.yaml"], "--data", corpus,
                 "--out", out, "--no-progress"]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    data = load_text(corpus, 25, 0.1)
    counts = torch.bincount(data.y_train.flatten(), minlength=data.num_outputs).double()
    p = counts[counts > 0] / counts.sum()
    unigram_bits = float(-(p * p.log2()).sum())
    assert metrics["test_bpc"] == pytest.approx(metrics["test_nll"] / math.log(2))
    assert metrics["test_bpc"] < 0.35 * unigram_bits  # measured 0.70 bits vs 3.98


def test_rules_on_recurrent_sites():
    """Weights and group variables of a recurrent layer go through the same rules as any other
    site; biases are kept; a rule needing a proper prior leaves a log-uniform group variable to
    log-alpha."""
    loc = torch.tensor([[0.1, 2.0], [0.0, -1.0]])
    precision = torch.tensor([[4.0, 4.0], [1.0, 100.0]])
    summary = PosteriorSummary()
    summary["l.weight_hh"] = SiteSummary("l", "weight_hh", loc, precision, torch.zeros(()), torch.ones(()), {},
                                         torch.tensor([[4.0, -1.0], [3.0, 3.5]]))
    summary["l.bias"] = SiteSummary("l", "bias", torch.zeros(2), torch.ones(2), torch.zeros(()), torch.ones(()), {})
    summary["l.z_hidden"] = SiteSummary("l", "z_hidden", torch.ones(2), torch.ones(2), torch.zeros(()),
                                        torch.zeros(()), {}, torch.tensor([5.0, -5.0]))
    d = reduce(summary, "log-alpha")
    assert d.masks["l.weight_hh"].tolist() == [[False, True], [True, False]]
    assert d.masks["l.z_hidden"].tolist() == [False, True] and bool(d.masks["l.bias"].all())
    # Savage-Dickey with prior N(0, 1): dF = 0.5 ln(P) - 0.5 P mu^2, keep where dF <= 0
    delta_f = 0.5 * precision.log() - 0.5 * precision * loc**2
    sd = reduce(summary, "savage-dickey")
    assert torch.equal(sd.masks["l.weight_hh"], delta_f <= 0) and bool(sd.masks["l.z_hidden"].all())
    summary["l.weight_hh"].log_alpha = None
    with pytest.raises(ValueError, match="no log alpha"):
        reduce(summary, "log-alpha")


def test_compact_with_every_neuron_removed():
    w_ih, w_hh, b = torch.randn(8, 3), torch.randn(8, 2), torch.randn(8)
    m = recurrent_masks("lstm", torch.ones(8, 3, dtype=torch.bool), torch.ones(8, 2, dtype=torch.bool),
                        z_hidden=torch.zeros(2, dtype=torch.bool))
    assert m.report()["hidden"] == (0, 2) and m.report()["weights"][0] == 0
    out = compact_recurrent("lstm", w_ih, w_hh, b, m, z_hidden=torch.ones(2))(torch.randn(4, 5, 3))
    assert out.shape == (4, 5, 0)


def test_spec_data_options_are_checked_before_anything_runs(tmp_path, root):
    import yaml

    from pyro_sparse.errors import SpecError

    spec = yaml.safe_load(open(os.path.join(root, "models", "char_lm_wn.yaml")))
    spec["data"]["sequence_length"] = 0
    path = os.path.join(tmp_path, "bad.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    with pytest.raises(SpecError, match=r"data\.sequence_length"):
        load_model_spec(path)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_compact_inference_layer_follows_the_parameters(cell):
    """A compact layer's inference pass (a cached torch layer holding its plain weights) gives
    what its differentiable pass gives, with constant gates and a GRU hidden bias, from a given
    state too, and is built again when a parameter changes in place."""
    from pyro_sparse.recurrent import CompactRecurrent

    g = torch.Generator().manual_seed(0)
    G, H, F = (4, 3, 2) if cell == "lstm" else (3, 3, 2)
    active = torch.tensor([r for r in range(G * H) if r not in (1, 2 * H + 1)])
    constant = torch.tensor([1, 2 * H + 1])  # a sigmoid gate and the tanh gate (g, n)
    m = CompactRecurrent(cell, torch.arange(F), torch.randn(len(active), F, generator=g),
                         torch.randn(len(active), H, generator=g), torch.randn(len(active), generator=g), active,
                         constant, torch.tensor([0.3, -0.6]), torch.rand(H, generator=g),
                         True, torch.randn(H, generator=g) if cell == "gru" else None)
    x, h0 = torch.randn(5, 7, F, generator=g), torch.randn(5, H, generator=g)
    for step in range(2):
        with torch.no_grad():
            cached = m.run(x, h0)
        differentiable = m.run(x, h0)
        assert differentiable[0].requires_grad and not cached[0].requires_grad
        for a, b in zip(cached, differentiable):
            if a is not None:
                torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)
        if step == 0:
            before = cached[0]
            with torch.no_grad():
                m.weight_hh.mul_(0.5)
                m.constants.mul_(0.5)
    assert not torch.allclose(before, cached[0])


def _loop_reference(m, x, h=None, c=None):
    """The compact layer's recurrence step by step (what CompactRecurrent computed before it ran
    torch's fused layer): only active rows are multiplied, constant gates take their constants."""
    from pyro_sparse.recurrent import CELLS

    x = x.index_select(-1, m.input_index)
    B, T = x.shape[:2]
    H, G = m.hidden_size, len(CELLS[m.cell]["gates"])
    gh = G * H
    xw = (x @ m.weight_ih.T + m.bias).new_zeros(B, T, gh).index_copy(2, m.active, x @ m.weight_ih.T + m.bias)
    const = m.constants.new_zeros(gh).index_copy(0, m.constant_index, m.constants).view(G, H)
    act = torch.zeros(gh, dtype=torch.bool).index_fill(0, m.active, True).view(G, H)
    h = x.new_zeros(B, H) if h is None else h
    c = x.new_zeros(B, H) if c is None else c
    b_hn = m.bias_hn if m.bias_hn is not None else 0.0
    outs = []
    for t in range(T):
        hw = (h @ m.weight_hh.T).new_zeros(B, gh).index_copy(1, m.active, h @ m.weight_hh.T).view(B, G, H)
        xt = xw[:, t].view(B, G, H)
        if m.cell == "lstm":
            pre = xt + hw
            s = torch.where(act, torch.sigmoid(pre), const)
            g = torch.where(act[2], torch.tanh(pre[:, 2]), const[2])
            c = s[:, 1] * c + s[:, 0] * g
            h = s[:, 3] * torch.tanh(c)
        else:
            r = torch.where(act[0], torch.sigmoid(xt[:, 0] + hw[:, 0]), const[0])
            u = torch.where(act[1], torch.sigmoid(xt[:, 1] + hw[:, 1]), const[1])
            n = torch.where(act[2], torch.tanh(xt[:, 2] + r * (hw[:, 2] + b_hn)), const[2])
            h = (1 - u) * n + u * h
        outs.append(h)
    return torch.stack(outs, 1) * m.output_scale


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("features", [2, 0])
def test_compact_layer_fine_tunes_like_its_step_by_step_recurrence(cell, features):
    """float64: outputs and gradients of the fused compact layer equal the step-by-step
    recurrence, with a sigmoid constant, a negative tanh-gate constant and saturated constants
    (0 and 1: finite gradients), and with no input feature kept (the layer reads zeros)."""
    from pyro_sparse.recurrent import CompactRecurrent

    g = torch.Generator().manual_seed(1)
    G, H = (4, 3) if cell == "lstm" else (3, 3)
    f64 = {"dtype": torch.float64}
    constant = torch.tensor([1, 2 * H + 1, H, 2 * H])  # sigmoid gates and the tanh gate (g / n)
    active = torch.tensor([r for r in range(G * H) if r not in constant.tolist()])
    m = CompactRecurrent(cell, torch.arange(features), torch.randn(len(active), features, generator=g, **f64),
                         torch.randn(len(active), H, generator=g, **f64), torch.randn(len(active), generator=g, **f64),
                         active, constant, torch.tensor([0.3, -0.6, 1.0, 0.0], **f64),
                         torch.rand(H, generator=g, **f64), True,
                         torch.randn(H, generator=g, **f64) if cell == "gru" else None)
    x, h0 = torch.randn(4, 6, features, generator=g, **f64), torch.randn(4, H, generator=g, **f64)
    out = m.run(x, h0)[0]
    ref = _loop_reference(m, x, h0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = [p for p in m.parameters() if p.numel()]
    got = torch.autograd.grad(out.square().sum(), params)
    want = torch.autograd.grad(ref.square().sum(), params)
    for name, a, b in zip([n for n, p in m.named_parameters() if p.numel()], got, want):
        assert torch.isfinite(a).all(), name
        if name != "constants":  # saturated constants (0, 1) are held one epsilon inside: zero gradient
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    k = next(i for i, p in enumerate(params) if p is m.constants)
    torch.testing.assert_close(got[k][:2], want[k][:2], rtol=1e-9, atol=1e-12)  # the constants inside (0, 1)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _loop_reference(m, x), rtol=1e-12, atol=1e-12)  # the inference layer


def test_compact_inference_cache_sees_storage_changes_and_inference_mode():
    """The cached inference layer follows a parameter replaced through ``.data``; a write through
    ``.data`` in place is seen after refresh(); a module built in inference mode runs."""
    from pyro_sparse.recurrent import CompactRecurrent

    def build():
        return CompactRecurrent("lstm", torch.arange(2), torch.randn(12, 2), torch.randn(12, 3), torch.randn(12),
                                torch.arange(12), torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.ones(3),
                                True)

    torch.manual_seed(0)
    m, x = build(), torch.randn(2, 5, 2)
    with torch.no_grad():
        first = m(x)
        m.weight_hh.data = m.weight_hh.data * 0.1  # new storage
        torch.testing.assert_close(m(x), _loop_reference(m, x))
        m.weight_ih.data.mul_(2.0)  # same storage, no version bump
        m.refresh()
        torch.testing.assert_close(m(x), _loop_reference(m, x))
    assert not torch.allclose(first, m(x).detach())
    with torch.inference_mode():
        frozen = build()
        out = frozen(x)
        torch.testing.assert_close(out, _loop_reference(frozen, x))
