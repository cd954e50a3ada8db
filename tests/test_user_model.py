"""The user's model as declared (issue 23): training and evaluation mode, tied weights, direct reads
of a converted module's weight, nn.MultiheadAttention (so nn.TransformerEncoderLayer models
convert), modules left deterministic reported and counted apart, and a training loop of the
user's own on the ELBO core."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.bn_cnn_digits import BatchNormCNN, train_map
from pyro_sparse.convert import FrozenModulesWarning, bayesian
from pyro_sparse.data import Dataset
from pyro_sparse.elbo import CoreELBO, MeanFieldELBO
from pyro_sparse.fitting import SVITrainer
from pyro_sparse.guides import MeanFieldGuide
from pyro_sparse.outcome import reduction_report
from pyro_sparse.rebuild import compact, export, masked_module
from pyro_sparse.recipe import parse_recipe
from pyro_sparse.reduction import reduce
from pyro_sparse.transformer import CompactMultiheadAttention, TorchMultiheadAttention

TOL = 1e-5


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FrozenModulesWarning)
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def trained_bn_cnn(digits):
    torch.manual_seed(0)
    return train_map(BatchNormCNN(channels=4, hidden=16), digits.x_train[:400], digits.y_train[:400], epochs=3)


def small(digits, n=256):
    return Dataset("digits-small", digits.x_train[:n], digits.y_train[:n], digits.x_test[:120], digits.y_test[:120],
                   "classification", 10)


def fit_bn(module, digits, epochs=2):
    torch.manual_seed(0)
    net = quiet(bayesian, module, prior={"type": "log_uniform"}, input_shape=(64,))
    recipe = parse_recipe({"epochs": epochs, "batch_size": 64, "seed": 0, "kl_warmup_epochs": 1})
    trainer = SVITrainer(net, MeanFieldGuide(net.model, init_scale=0.0067), small(digits), recipe, progress=False)
    metrics = trainer.fit()
    return net, trainer, metrics


def test_the_mode_a_module_was_converted_in_changes_nothing(trained_bn_cnn, digits):
    """Train-mode and eval-mode conversions of one trained BatchNorm/Dropout CNN fit to the same
    posterior and the same running statistics; every way of computing the fitted network's output
    (the Bayesian network at its means, the exported module, the compact one) agrees."""
    import copy

    a, b = copy.deepcopy(trained_bn_cnn).train(), copy.deepcopy(trained_bn_cnn).eval()
    net_a, tr_a, m_a = fit_bn(a, digits)
    net_b, tr_b, m_b = fit_bn(b, digits)
    assert m_a["test_accuracy"] == m_b["test_accuracy"] and m_a["test_nll"] == m_b["test_nll"]
    for (k, va), vb in zip(tr_a.guide.state_dict().items(), tr_b.guide.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    state_a, state_b = net_a.frozen_state(), net_b.frozen_state()
    assert set(state_a) == {k for k in trained_bn_cnn.state_dict() if k.split(".")[:2] in
                            (["features", "1"], ["features", "6"], ["head", "2"])}
    for k in state_a:
        torch.testing.assert_close(state_a[k], state_b[k], rtol=0, atol=0)
    # fitting ran the batch norms in training mode: their running statistics moved
    assert not torch.equal(state_a["features.1.running_mean"], trained_bn_cnn.features[1].running_mean)
    # 2 epochs of 4 batches and nothing else (guide set-up, reference loss, evaluation) ran in training mode
    assert state_a["features.1.num_batches_tracked"] == trained_bn_cnn.features[1].num_batches_tracked + 8
    summary = tr_a.posterior_summary()
    x = digits.x_test[:100]
    means = net_a.point_outputs(x, summary.locs())
    exported = export(net_a, summary)
    assert not exported.training
    assert (exported(x) - means).abs().max() <= TOL
    for method, options in (("log-alpha", {}), ("magnitude", {"sparsity": 0.7})):
        decision = reduce(summary, method, **options)
        small_net = compact(net_a, summary, decision)
        masked = masked_module(net_a, summary, decision)
        assert (small_net(x) - masked(x)).abs().max() <= TOL
        assert (masked(x) - net_a.point_outputs(x, {k: v * decision.masks[k] for k, v in summary.locs().items()})
                ).abs().max() <= TOL


def test_checkpoints_keep_the_running_statistics(trained_bn_cnn, digits, tmp_path):
    """A run's checkpoint holds the batch norms' running statistics beside the guide, so a
    reloaded trainer predicts what the fitted one did."""
    torch.manual_seed(0)
    net = quiet(bayesian, trained_bn_cnn, prior={"type": "log_uniform"}, input_shape=(64,))
    recipe = parse_recipe({"epochs": 1, "batch_size": 64, "seed": 0})
    trainer = SVITrainer(net, MeanFieldGuide(net.model), small(digits), recipe, out_dir=tmp_path, progress=False)
    trainer.fit()
    again = quiet(bayesian, trained_bn_cnn, prior={"type": "log_uniform"}, input_shape=(64,))
    other = SVITrainer(again, MeanFieldGuide(again.model), small(digits), recipe, out_dir=tmp_path, progress=False)
    other.resume()
    x = digits.x_test[:50]
    means = trainer.posterior_summary().locs()
    torch.testing.assert_close(again.point_outputs(x, means), net.point_outputs(x, means), rtol=0, atol=0)
    assert not torch.equal(again.frozen_state()["head.2.running_var"], trained_bn_cnn.head[2].running_var)


def test_the_guide_set_up_and_predictions_leave_running_statistics_alone(trained_bn_cnn, digits):
    net = quiet(bayesian, trained_bn_cnn, prior={"type": "log_uniform"}, input_shape=(64,))
    before = net.frozen_state()
    guide = MeanFieldGuide(net.model)
    guide.setup(digits.x_train[:64], digits.y_train[:64])
    net.sample_outputs(digits.x_test[:32], guide, 3)
    assert net.training  # restored after predicting
    from pyro_sparse.diagnostics import _network_pass  # the report's draws: the network at evaluation

    values = guide.median()
    out = _network_pass(net, values, digits.x_test[:32], digits.y_test[:32], 16)[0]
    torch.testing.assert_close(out, net.point_outputs(digits.x_test[:32], values), rtol=0, atol=1e-6)
    for k, v in net.frozen_state().items():
        assert torch.equal(v, before[k]), k


def test_modules_left_deterministic_are_reported_and_counted_apart(trained_bn_cnn, digits):
    with pytest.warns(FrozenModulesWarning, match=r"features\.1 \(BatchNorm2d, 8 parameters\).*head\.2 "
                                                  r"\(BatchNorm1d, 32 parameters\); 56 frozen"):
        net = bayesian(trained_bn_cnn, input_shape=(64,))
    assert sum(net.frozen_parameters().values()) == 56
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenModulesWarning)  # asked for: no warning
        bayesian(trained_bn_cnn, deterministic=["features.1", "features.6", "head.2"], input_shape=(64,))
    from tests.test_convert import fake_summary

    summary = fake_summary(net)
    report = reduction_report(net, summary, reduce(summary, "magnitude", sparsity=0.5), digits.x_test[:20],
                              digits.y_test[:20])
    weights = sum(s.loc.numel() for s in summary.values() if s.role == "weight")
    assert report["weights_total"] == weights and report["frozen_params"] == 56
    assert report["sparsity"] == pytest.approx(1 - report["weights_kept"] / weights)


# --------------------------------------------------------------------------- tied weights


class TiedLM(nn.Module):
    """A language model whose output layer is its embedding (``out.weight = emb.weight``)."""

    def __init__(self, vocab=12, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.out = nn.Linear(dim, vocab)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.rnn(self.emb(x.long()))[0])


class ReadoutLM(TiedLM):
    """The same tie written in the forward: ``F.linear(h, self.emb.weight)``."""

    def __init__(self, vocab=12, dim=8):
        super().__init__(vocab, dim)
        del self.out

    def forward(self, x):
        return F.linear(self.rnn(self.emb(x.long()))[0], self.emb.weight)


def tokens(n=48, seed=0):
    x = torch.randint(0, 12, (n, 10), generator=torch.Generator().manual_seed(seed))
    return Dataset("tokens", x[:32], torch.roll(x[:32], -1, 1), x[32:], torch.roll(x[32:], -1, 1), "sequence", 12)


@pytest.mark.parametrize("cls", [TiedLM, ReadoutLM])
def test_a_tied_parameter_is_one_site_and_stays_tied(cls):
    torch.manual_seed(0)
    net = bayesian(cls(), prior={"type": "log_uniform"}, likelihood="sequence_categorical", input_shape=(10,))
    sites = net.param_sites()
    assert "emb.weight" in sites and "out.weight" not in sites
    gru = 2 * 24 * 8 + 24 + 8  # weight_ih, weight_hh, the summed bias and b_hn
    assert net.num_weights() == 12 * 8 + (12 if cls is TiedLM else 0) + gru  # the table once
    if cls is TiedLM:
        assert net.ties == {"out.weight": "emb.weight"}
    else:
        assert net.read_directly == {"emb": ["weight"]}
    data = tokens()
    recipe = parse_recipe({"epochs": 2, "batch_size": 16, "seed": 0})
    trainer = SVITrainer(net, MeanFieldGuide(net.model), data, recipe, progress=False)
    trainer.fit()
    summary = trainer.posterior_summary()
    decision = reduce(summary, "magnitude", sparsity=0.5)
    assert "out.weight" not in decision.masks
    module, small = export(net, summary, decision), compact(net, summary, decision)
    ref = masked_module(net, summary, decision)(data.x_test)
    assert (module(data.x_test) - ref).abs().max() <= TOL and (small(data.x_test) - ref).abs().max() <= TOL
    if cls is TiedLM:
        assert module.out.weight is module.emb.weight and small.out.weight is small.emb.weight
        torch.testing.assert_close(module.emb.weight, summary["emb.weight"].loc * decision.masks["emb.weight"])
        fresh = TiedLM()
        fresh.load_state_dict(module.state_dict())
        assert fresh.out.weight is fresh.emb.weight
    report = reduction_report(net, summary, decision, data.x_test, data.y_test, module=small)
    assert report["weights_total"] == sum(s.loc.numel() for s in summary.values() if s.role == "weight")


def test_a_tied_weight_draws_once_per_pass_on_the_core_and_through_pyro():
    torch.manual_seed(0)
    net = bayesian(TiedLM(), prior={"type": "log_uniform"}, likelihood="sequence_categorical", input_shape=(10,))
    data = tokens()
    guide = MeanFieldGuide(net.model)
    x, y = data.x_train[:8], data.y_train[:8]
    guide.setup(x, y, dataset_size=32)
    with torch.no_grad():
        for p in guide.log_scales.values():
            p.fill_(-2.0)
    losses = []
    for elbo, model in ((CoreELBO(), net), (MeanFieldELBO(), net.model)):
        torch.manual_seed(3)
        losses.append(elbo.differentiable_loss(model, guide, x, y, dataset_size=32))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-3)


class Untieable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.norm.weight = self.fc.bias  # a Bayesian bias and a frozen batch-norm gain

    def forward(self, x):
        return self.norm(self.fc(x))


def test_a_parameter_shared_with_a_frozen_module_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"fc\.bias is the same parameter as norm\.weight, which stays deterministic"):
        bayesian(Untieable(), input_shape=(4,))


def test_reading_a_converted_weight_outside_a_forward_pass_says_why():
    net = quiet(bayesian, ReadoutLM(), input_shape=(10,), likelihood="sequence_categorical")
    with pytest.raises(AttributeError, match=r"emb\.weight: a Bayesian layer's weight is a random variable"):
        net.module.emb.weight


# --------------------------------------------------------------------------- attention


class TinyEncoder(nn.Module):
    """Digits as 8 tokens of 8 pixels, one nn.TransformerEncoderLayer, mean pooling."""

    def __init__(self, dim=16, heads=4, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(8, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, 32, dropout=0.1, batch_first=batch_first)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        h = self.embed(x.reshape(len(x), 8, 8))
        h = self.encoder(h) if self.batch_first else self.encoder(h.transpose(0, 1)).transpose(0, 1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_converts_and_computes_what_torch_computes(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=10).eval()
    layer = TorchMultiheadAttention.from_torch(mha, {})
    q, k, v = torch.randn(3, 5, 16), torch.randn(3, 7, 12), torch.randn(3, 7, 10)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)
    for kwargs in ({}, {"key_padding_mask": pad, "attn_mask": causal}, {"average_attn_weights": False},
                   {"attn_mask": torch.randn(12, 5, 7)}):
        with torch.no_grad():
            out, w = mha(q, k, v, **kwargs)
            with pyro_condition(layer):
                mine, mine_w = layer(q, k, v, **kwargs)
        torch.testing.assert_close(mine, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine_w, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(q[:, 0] if not batch_first else q[0], k[:, 0] if not batch_first else k[0],
                                     v[:, 0] if not batch_first else v[0])[0].shape, torch.Size([5, 16]))


class pyro_condition:
    """The layer's sites at their starting values (no sampling)."""

    def __init__(self, layer):
        import pyro.poutine as poutine

        values = {f"{leaf.site}.{p}": getattr(leaf, f"{p}_init") for leaf in layer.leaves() for p in leaf.priors()}
        self.handler = poutine.condition(data=values)

    def __enter__(self):
        return self.handler.__enter__()

    def __exit__(self, *exc):
        return self.handler.__exit__(*exc)


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_transformer_encoder_layer_converts_reduces_by_head_and_compacts_to_fewer_heads(batch_first, digits):
    torch.manual_seed(0)
    net = quiet(bayesian, TinyEncoder(batch_first=batch_first), prior={"type": "log_uniform"},
                priors={"encoder.self_attn.*.weight": {"type": "group_log_uniform", "group": "head"}},
                input_shape=(64,))
    assert net.conversions["encoder.self_attn"] == "TorchMultiheadAttention"
    guide = MeanFieldGuide(net.model)
    x, y = digits.x_train[:32], digits.y_train[:32]
    guide.setup(x, y, dataset_size=32)
    assert {f"encoder.self_attn.{p}.weight.z_head" for p in "qkvo"} <= set(guide.sites)
    # the core and Pyro agree on the converted attention
    losses = []
    for elbo, model in ((CoreELBO(), net), (MeanFieldELBO(), net.model)):
        torch.manual_seed(1)
        losses.append(elbo.differentiable_loss(model, guide, x, y, dataset_size=32))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-3)
    from pyro_sparse.summary import summarize

    summary = summarize(net, guide)
    # the head rule of the group prior removes heads 1 and 2 of v: their z have log alpha above 0
    summary["encoder.self_attn.v.weight"].groups["group-log-alpha"][1:3] = 5.0
    decision = reduce(summary, "group-log-alpha")
    assert not decision.masks["encoder.self_attn.v.weight"][1:3].any()
    small = compact(net, summary, decision)
    attn = small.encoder.self_attn
    assert isinstance(attn, CompactMultiheadAttention) and attn.num_heads == 2 and attn.head_index.tolist() == [0, 3]
    xt = digits.x_test[:64]
    assert (small(xt) - masked_module(net, summary, decision)(xt)).abs().max() <= TOL
    report = reduction_report(net, summary, decision, xt, digits.y_test[:64], module=small)
    assert report["layers"]["encoder.self_attn"]["heads_removed"] == 2


def test_a_saved_compact_transformer_loads_into_the_users_class(tmp_path, digits):
    from pyro_sparse.reduced_runs import load_compact, save_compact
    from pyro_sparse.usercode import allow_code

    torch.manual_seed(0)
    net = quiet(bayesian, TinyEncoder(), input_shape=(64,))
    net.source = {"module": "tests.test_user_model:TinyEncoder", "kwargs": {}}
    from tests.test_convert import fake_summary

    summary = fake_summary(net)
    masks = {k: torch.ones_like(s.loc, dtype=torch.bool) for k, s in summary.items()}
    masks["encoder.self_attn.v.weight"][0] = False
    small = compact(net, summary, masks)
    save_compact(tmp_path / "c.pt", small)
    with allow_code():
        again = load_compact(tmp_path / "c.pt")
    x = digits.x_test[:16]
    assert again.encoder.self_attn.num_heads == 3
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- your own training loop


def test_elbo_loss_is_the_trainers_objective_and_trains_in_a_plain_loop(digits):
    """``net.elbo_loss`` is the core's negative ELBO (what SVITrainer minimises), and a plain PyTorch
    loop over a DataLoader with it trains the network."""
    torch.manual_seed(0)
    net = quiet(bayesian, nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                prior={"type": "log_uniform"}, input_shape=(64,))
    loader = DataLoader(TensorDataset(digits.x_train, digits.y_train), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    guide = MeanFieldGuide(net.model).setup(digits.x_train[:2])
    x, y = digits.x_train[:64], digits.y_train[:64]
    torch.manual_seed(5)
    mine = net.elbo_loss(guide, x, y, num_data=len(digits.x_train), kl_weight=0.3)
    torch.manual_seed(5)
    ref = CoreELBO(kl_weight=0.3).differentiable_loss(net, guide, x, y, dataset_size=len(digits.x_train))
    torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    assert set(net.last_elbo_terms) == {"loglik", "kl"}
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-2)
    net.train()
    for epoch in range(3):
        for xb, yb in loader:
            loss = net.elbo_loss(guide, xb, yb, num_data=len(loader.dataset), kl_weight=epoch / 3)  # KL warm-up
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    probs = net.sample_outputs(digits.x_test, guide, 5).softmax(-1).mean(0)
    assert (probs.argmax(-1) == digits.y_test).float().mean() > 0.8
