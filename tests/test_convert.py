"""Your own model: pyro_sparse.bayesian(module) turns any nn.Module into a Bayesian one.

Conversion of a module with a skip connection and a branch (its forward unchanged), site names
that are the module's parameter names, priors by pattern, the direct and the Pyro ELBO agreeing
on a converted module, start-from-weights (the trained network's outputs at zero variance), the
export round trip into a fresh instance of the user's class, recurrent and 1-D convolutional
counterparts, and data that arrive in batches (a DataLoader)."""

import math
import os

import pyro
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyro_sparse.convert import BayesianModule, bayesian
from pyro_sparse.data import as_batches, load_digits
from pyro_sparse.elbo import CoreELBO, MeanFieldELBO
from pyro_sparse.fitting import SVITrainer
from pyro_sparse.guides import DeltaGuide, MeanFieldGuide, latent_sites, prototype_trace
from pyro_sparse.layers import Conv1d
from pyro_sparse.local_reparam import GaussianWeight, gaussian_conv
from pyro_sparse.priors import Gaussian, LogUniform
from pyro_sparse.rebuild import compact, export, masked_module
from pyro_sparse.recipe import parse_recipe
from pyro_sparse.recurrent import TorchGRU, TorchLSTM
from pyro_sparse.reduction import reduce
from pyro_sparse.summary import PosteriorSummary, SiteSummary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SkipBranch(nn.Module):
    """A skip connection around two convolutions, and a second branch from the raw input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 16, 12), nn.ReLU(), nn.Linear(12, 10))
        self.branch = nn.Linear(64, 10)
        self.norm = nn.LayerNorm(10)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.block(h))  # skip connection
        out = self.head(F.max_pool2d(h, 2)) + self.branch(x.flatten(1))  # a second branch
        return self.norm(out)


def images(n=6, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def trained_like(module, seed=0):
    """Move every parameter away from its initialisation (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def test_conversion_of_a_module_with_a_skip_connection_and_a_branch():
    torch.manual_seed(0)
    user = trained_like(SkipBranch())
    net = bayesian(user, prior="log_uniform", input_shape=(1, 8, 8))
    assert isinstance(net, BayesianModule)
    assert net.conversions == {"stem": "Conv2d", "block.0": "Conv2d", "block.2": "Conv2d", "head.1": "Linear",
                               "head.3": "Linear", "branch": "Linear",
                               "norm": "deterministic (layer norm without a prior in priors)"}
    # the user's forward runs unchanged: at the starting values it computes what the module computes
    x = images()
    with torch.no_grad():
        assert torch.equal(net.point_outputs(x, net.starting_values()), user(x))
        assert torch.equal(net.point_outputs(x.flatten(1), net.starting_values()), user(x))  # reshaped to input_shape
    # a Pyro model with one site per converted parameter; the user's module is left as it was
    trace = prototype_trace(net.model, x, torch.zeros(6, dtype=torch.long))
    assert [s["name"] for s in latent_sites(trace)] == list(net.param_sites())
    assert all(not isinstance(m, type(net.converted["stem"])) for m in user.modules())


def test_site_names_are_the_module_parameter_names_and_priors_follow_patterns():
    user = SkipBranch()
    net = bayesian(user, prior={"type": "log_uniform"}, bias_prior={"type": "gaussian", "scale": 2.0},
                   priors={"head.3.*": {"type": "gaussian", "scale": 0.5}, "norm.*": {"type": "gaussian", "loc": 1.0},
                           "*.weight": "log_uniform"},
                   deterministic=["block.*"])
    sites = net.param_sites()
    # the order is the forward pass's (the output layer last): stem, head, branch, norm
    assert list(sites) == ["stem.weight", "stem.bias", "head.1.weight", "head.1.bias", "head.3.weight",
                           "head.3.bias", "branch.weight", "branch.bias", "norm.weight", "norm.bias"]
    state = user.state_dict()
    assert all(site in state and sites[site][0].param_shapes()[sites[site][1]] == state[site].shape for site in sites)
    priors = {k: v[2] for k, v in sites.items()}
    assert isinstance(priors["stem.weight"], LogUniform) and priors["stem.bias"].scale == 2.0
    assert isinstance(priors["head.3.weight"], Gaussian) and priors["head.3.weight"].scale == 0.5  # first match wins
    assert priors["head.3.bias"].scale == 0.5
    assert priors["norm.weight"].loc == 1.0  # a layer norm is converted where a prior is asked for
    assert isinstance(priors["branch.weight"], LogUniform)  # a parameter's name matched before its module's
    assert net.conversions["block.0"] == net.conversions["block.2"] == "deterministic (pattern)"
    assert not any(p.requires_grad for p in net.module.block.parameters())  # deterministic modules are constants
    with pytest.raises(ValueError, match="priors"):
        bayesian(user, priors=["fc*"])
    with pytest.raises(ValueError, match="no module to convert"):
        bayesian(nn.Sequential(nn.ReLU()))


def test_start_from_weights_gives_the_trained_network_at_zero_variance():
    torch.manual_seed(1)
    user = trained_like(SkipBranch(), seed=3)
    net = bayesian(user, prior="log_uniform", input_shape=(1, 8, 8))
    guide = MeanFieldGuide(net.model)
    x = images(5)
    guide.setup(x, torch.zeros(5, dtype=torch.long))
    means = guide.median()
    for site, value in means.items():  # the posterior means start at the trained weights
        assert torch.equal(value, dict(user.named_parameters())[site])
    with torch.no_grad():
        assert torch.equal(net.point_outputs(x, means), user(x))
        for p in guide.log_scales.values():  # zero variance, up to the guide's smallest scale exp(-12)
            p.fill_(-30.0)
        draws = net.sample_outputs(x, guide, num_samples=3)
    assert (draws - user(x)).abs().max() < 1e-3


def perturb(guide, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.locs.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for p in guide.log_scales.values():
            p.copy_(-4.0 + 1.5 * torch.randn(p.shape, generator=g))


def estimates(runs, x, y, n, idx, params):
    out = []
    for elbo, model, guide in runs:
        torch.manual_seed(11)
        for p in params:
            p.grad = None
        loss = elbo.differentiable_loss(model, guide, x, y, dataset_size=n, subsample=idx)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in params]))
    return out


@pytest.mark.parametrize("prior", ["log_uniform", "gaussian", {"type": "horseshoe", "group": "unit"}])
def test_core_and_pyro_elbo_agree_on_a_converted_module(prior):
    torch.manual_seed(0)
    net = bayesian(trained_like(SkipBranch()), prior=prior, input_shape=(1, 8, 8))
    x, y = images(8).flatten(1), torch.arange(8) % 10
    guide = MeanFieldGuide(net.model)
    guide.setup(x, y, dataset_size=100)
    assert CoreELBO.supports(net, guide) is None
    perturb(guide)
    params = list(guide.parameters())
    idx = torch.arange(8)
    (direct, g_direct), (ref, g_ref) = estimates([(CoreELBO(), net, guide), (MeanFieldELBO(), net.model, guide)],
                                                 x, y, 100, idx, params)
    torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-3)
    for a, b in zip(g_direct, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_core_and_pyro_map_objectives_agree_on_a_converted_module():
    torch.manual_seed(0)
    net = bayesian(trained_like(SkipBranch()), prior="gaussian", input_shape=(1, 8, 8))
    x, y = images(8), torch.arange(8) % 10
    guide = DeltaGuide(net.model)
    guide.setup(x, y, dataset_size=40)
    assert CoreELBO.supports(net, guide) is None
    params = list(guide.parameters())
    (direct, g_direct), (ref, g_ref) = estimates([(CoreELBO(), net, guide), (MeanFieldELBO(), net.model, guide)],
                                                 x, y, 40, torch.arange(8), params)
    torch.testing.assert_close(direct, ref, rtol=1e-6, atol=1e-4)
    for a, b in zip(g_direct, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Loop(nn.Module):
    """The same block applied three times (a weight shared by every application)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.block = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = torch.tanh(h + self.block(h))
        return self.out(h)


def test_a_module_applied_several_times_shares_one_weight_draw():
    torch.manual_seed(0)
    net = bayesian(Loop(), input_shape=(5,))
    assert net.converted["block"].shared and not net.converted["inp"].shared
    guide = MeanFieldGuide(net.model)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    guide.setup(x, y)
    loss = MeanFieldELBO().differentiable_loss(net.model, guide, x, y)  # one site per weight, no duplicates
    assert torch.isfinite(loss)
    assert not guide.sites["block.weight"]["local_reparam"] and guide.sites["inp.weight"]["local_reparam"]
    # the core draws the shared weight once and every application reads it: the Pyro path's estimate
    assert CoreELBO.supports(net, guide) is None
    perturb(guide)
    params = list(guide.parameters())
    (core, g_core), (ref, g_ref) = estimates([(CoreELBO(), net, guide), (MeanFieldELBO(), net.model, guide)],
                                             x, y, 40, torch.arange(4), params)
    torch.testing.assert_close(core, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(g_core, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    recipe = parse_recipe({"epochs": 1, "batch_size": 4, "seed": 0})
    from pyro_sparse.data import Dataset

    data = Dataset("loop", x, y, x, y, "classification", 3)
    trainer = SVITrainer(net, MeanFieldGuide(net.model), data, recipe, progress=False)
    assert trainer.elbo_path == "core" and trainer.elbo_reason is None
    trainer.fit()


def fake_summary(net, scale=1e-2):
    """A posterior summary at the starting values (precision 1/scale^2), for reduction tests."""
    out = PosteriorSummary(method="test")
    for site, (layer, param, _) in net.param_sites().items():
        loc = getattr(layer, f"{param}_init")
        out[site] = SiteSummary(layer.site, param, loc, torch.full_like(loc, scale ** -2), torch.zeros(()),
                                torch.ones(()), dict(layer.param_axes[param]))
    return out


@pytest.mark.parametrize("prune_masks", [False, True])
def test_export_round_trip_into_a_fresh_instance_of_the_users_class(prune_masks):
    torch.manual_seed(0)
    net = bayesian(trained_like(SkipBranch()), prior="log_uniform", input_shape=(1, 8, 8))
    summary = fake_summary(net)
    decision = reduce(summary, "magnitude", sparsity=0.7)
    exported = export(net, summary, decision, prune_masks=prune_masks)
    assert type(exported) is SkipBranch
    x = images(7)
    masked = masked_module(net, summary, decision)
    with torch.no_grad():
        reference = net.point_outputs(x, {k: s.loc * decision.masks[k] for k, s in summary.items()})
        assert (masked(x) - reference).abs().max() <= 1e-5
        if prune_masks:  # torch.nn.utils.prune keeps pruned weights at 0 while training continues
            assert hasattr(exported.head[1], "weight_mask")
            torch.nn.utils.prune.remove(exported.head[1], "weight")
            for name in ("stem", "block.0", "block.2", "head.3", "branch"):
                module = exported.get_submodule(name)
                for p in ("weight", "bias"):
                    if hasattr(module, f"{p}_mask"):
                        torch.nn.utils.prune.remove(module, p)
        fresh = SkipBranch()
        fresh.load_state_dict(exported.state_dict())
        fresh.eval()
        assert (fresh(x) - reference).abs().max() <= 1e-5
        for site, mask in decision.masks.items():
            assert torch.equal(fresh.state_dict()[site] == 0, ~mask | (summary[site].loc == 0))
        small = compact(net, summary, decision)  # the head chain physically smaller
        assert type(small) is SkipBranch and small.head[1].out_features <= 12
        assert (small(x) - reference).abs().max() <= 1e-5


def test_compact_of_a_converted_module_shrinks_its_sequential_chains_and_reports_honestly():
    torch.manual_seed(0)
    net = bayesian(trained_like(SkipBranch()), input_shape=(1, 8, 8))
    summary = fake_summary(net)
    masks = {k: torch.ones_like(s.loc, dtype=torch.bool) for k, s in summary.items()}
    masks["head.3.weight"][:, :5] = False  # nothing reads hidden units 0..4 of the head
    small = compact(net, summary, masks)
    assert small.head[1].out_features == 7 and small.head[3].in_features == 7
    assert small.plan.units_removed == {"stem": 0, "block.0": 0, "block.2": 0, "head.1": 5, "head.3": 0, "branch": 0}
    with torch.no_grad():
        assert (small(images()) - masked_module(net, summary, masks)(images())).abs().max() <= 1e-5


def test_converted_lstm_and_gru_compute_what_torch_computes():
    torch.manual_seed(0)
    for cls, torch_cls in ((TorchLSTM, nn.LSTM), (TorchGRU, nn.GRU)):
        for batch_first in (True, False):
            module = trained_like(torch_cls(3, 5, num_layers=2, batch_first=batch_first))
            layer = cls.from_torch(module, {})
            layer.site = "rnn"
            x = torch.randn(4, 6, 3)
            h0 = torch.randn(2, 6 if not batch_first else 4, 5)
            hx = (h0, torch.randn_like(h0)) if cls is TorchLSTM else h0
            values = {f"rnn.{k}": getattr(layer, f"{k}_init") for k in layer.priors()}
            with torch.no_grad():
                for args in ((x,), (x, hx)):
                    ours, theirs = pyro.poutine.condition(layer, data=values)(*args), module(*args)
                    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)
                    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-6)
            twin = torch_cls(3, 5, num_layers=2, batch_first=batch_first)
            layer.write_torch(twin, {k: getattr(layer, f"{k}_init") for k in layer.priors()})
            with torch.no_grad():
                torch.testing.assert_close(twin(x)[0], module(x)[0], rtol=0, atol=1e-6)
    assert set(TorchGRU.from_torch(nn.GRU(3, 5), {}).priors()) == {"weight_ih", "weight_hh", "bias", "bias_hn"}
    with pytest.raises(ValueError, match="bidirectional"):
        TorchLSTM.from_torch(nn.LSTM(3, 5, bidirectional=True), {})


class Tagger(nn.Module):
    """Embedding -> time-first LSTM -> linear read-out of the last step."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lstm = nn.LSTM(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, tokens):
        seq, (h, c) = self.lstm(self.emb(tokens.long()).transpose(0, 1))
        return self.out(seq[-1] + h[-1])


def test_a_model_with_an_embedding_and_a_time_first_lstm():
    torch.manual_seed(0)
    user = trained_like(Tagger())
    net = bayesian(user, prior="log_uniform")
    tokens = torch.randint(0, 7, (5, 9)).float()
    with torch.no_grad():
        torch.testing.assert_close(net.point_outputs(tokens, net.starting_values()), user(tokens), rtol=0, atol=1e-6)
    assert list(net.param_sites()) == ["emb.weight", "lstm.weight_ih", "lstm.weight_hh", "lstm.bias", "out.weight",
                                       "out.bias"]
    guide = MeanFieldGuide(net.model)
    guide.setup(tokens, torch.tensor([0, 1, 2, 0, 1]))
    labels = torch.tensor([0, 1, 2, 0, 1])
    loss = MeanFieldELBO().differentiable_loss(net.model, guide, tokens, labels)
    assert torch.isfinite(loss) and CoreELBO.supports(net, guide) is None
    perturb(guide)  # a converted LSTM (one shared weight draw per pass) and embedding: the core is the Pyro path
    params = list(guide.parameters())
    (core, g_core), (ref, g_ref) = estimates([(CoreELBO(), net, guide), (MeanFieldELBO(), net.model, guide)],
                                             tokens, labels, 50, torch.arange(5), params)
    torch.testing.assert_close(core, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(g_core, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    twin = export(net, net.starting_values())
    assert type(twin) is Tagger
    with torch.no_grad():
        torch.testing.assert_close(twin(tokens), user(tokens), rtol=0, atol=1e-6)


def test_bayesian_conv1d_matches_torch_and_draws_its_preactivations():
    torch.manual_seed(0)
    module = nn.Conv1d(3, 5, 3, stride=2, padding=1, dilation=1)
    layer = Conv1d.from_torch(module, {})
    assert layer.out_shape((3, 20)) == (5, 10)
    x = torch.randn(4, 3, 20)
    with torch.no_grad():
        torch.testing.assert_close(layer.compute(x, layer.weight_init, layer.bias_init), module(x))
    mean_w, var_w = module.weight.detach(), torch.rand_like(module.weight) * 0.1
    draws = torch.stack([gaussian_conv(x, GaussianWeight(mean_w, var_w), None, stride=2, padding=1)
                         for _ in range(4000)])
    mean = F.conv1d(x, mean_w, stride=2, padding=1)
    var = F.conv1d(x * x, var_w, stride=2, padding=1)  # Kingma et al. 2015: the pre-activation's variance
    assert (draws.mean(0) - mean).abs().max() < 5 * math.sqrt(float(var.max()) / 4000)
    assert ((draws.var(0) / var) - 1).abs().mean() < 0.05
    with pytest.raises(ValueError, match="groups"):
        Conv1d.from_torch(nn.Conv1d(4, 4, 3, groups=2), {})


def test_dataloader_training_scales_the_data_term_to_the_dataset_size():
    data = load_digits()
    torch.manual_seed(0)
    user = nn.Sequential(nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10))
    recipe = parse_recipe({"epochs": 1, "batch_size": 32, "seed": 0, "guide_options": {"init_scale": 0.0067},
                           "kl_warmup_epochs": 0})
    losses = {}
    for kind in ("memory", "loader"):
        net = bayesian(user, prior="log_uniform")
        guide = MeanFieldGuide(net.model, init_scale=0.0067)
        source = data if kind == "memory" else DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=32,
                                                           shuffle=True)
        trainer = SVITrainer(net, guide, source, recipe, progress=False)
        assert trainer.num_train == len(data.x_train) == 1437
        idx = torch.arange(100, 132)
        torch.manual_seed(4)
        batch = (0, idx, None) if kind == "memory" else (0, None, (data.x_train[idx], data.y_train[idx]))
        losses[kind] = trainer.step(batch)  # the loss of one step: rows of the set, or a streamed batch
    torch.testing.assert_close(losses["memory"], losses["loader"], rtol=0, atol=0)
    # a whole fit on batches, evaluated batch by batch on a held-out loader
    net = bayesian(user, prior="log_uniform")
    batches = as_batches(TensorDataset(data.x_train, data.y_train), TensorDataset(data.x_test, data.y_test),
                         batch_size=64)
    trainer = SVITrainer(net, MeanFieldGuide(net.model), batches, recipe, progress=False)
    metrics = trainer.fit()
    assert trainer.steps_per_epoch == math.ceil(1437 / 64) and 0 <= metrics["test_accuracy"] <= 1
    with pytest.raises(Exception, match="num_train"):
        as_batches([(data.x_train[:8], data.y_train[:8])])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_compact_of_a_converted_recurrent_layer_deletes_gates_and_hidden_units(cell):
    torch.manual_seed(0)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(3, 6, num_layers=2, batch_first=False)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            seq, state = self.rnn(x.transpose(0, 1))
            h = state[0] if cell == "lstm" else state
            return self.out(seq[-1] + h[-1])

    user = trained_like(Seq())
    net = bayesian(user, input_shape=(5, 3))
    summary = fake_summary(net)
    masks = {k: torch.ones_like(s.loc, dtype=torch.bool) for k, s in summary.items()}
    masks["rnn.weight_ih_l1"][:, :2] = False  # layer 2 reads no hidden unit 0, 1 of layer 1 ...
    masks["rnn.weight_hh"][:, :2] = False     # ... nor does layer 1's recurrence: both are deleted
    masks["rnn.weight_ih"][:6] = False        # the first gate's input weights ...
    masks["rnn.weight_hh"][:6] = False        # ... and recurrent weights: a constant gate
    small = compact(net, summary, masks)
    rnn = small.rnn
    assert [layer.hidden_size for layer in rnn.layers] == [4, 6]
    assert rnn.layers[0].active.numel() < (4 if cell == "lstm" else 3) * 4
    x = torch.randn(7, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_module(net, summary, masks)(x), rtol=0, atol=1e-5)
    info = small.plan.layers["rnn"]["recurrent"]
    assert info[0]["hidden"] == (4, 6) and info[1]["hidden"] == (6, 6)


def test_the_laplace_trainer_fits_a_converted_module_with_fixed_other_parameters():
    from pyro_sparse.laplace.trainer import LaplaceTrainer
    from pyro_sparse.recipe import load_recipe

    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10)

        def forward(self, x):
            return self.fc2(F.relu(self.norm(self.fc1(x))))

    torch.manual_seed(0)
    user = WithNorm()
    net = bayesian(user)
    data = load_digits()
    recipe = load_recipe(os.path.join(ROOT, "inference", "laplace_marglik.yaml"))
    recipe.update(epochs=2, burn_in=0)
    recipe["laplace"] = dict(recipe["laplace"], burn_in=0, marglik_frequency=1)
    trainer = LaplaceTrainer(net, DeltaGuide(net.model), data, recipe, progress=False)
    trainer.fit()
    assert [n for n, _ in trainer.site_parameters()] == list(net.param_sites())
    assert torch.equal(trainer.net.norm.weight, user.norm.weight)  # held fixed
    summary = trainer.posterior_summary()
    decision = reduce(summary, "opd", sparsity=0.5)
    assert type(export(net, summary, decision)) is WithNorm


def test_a_spec_starts_from_a_state_dict_or_a_previous_run(tmp_path):
    import yaml

    from pyro_sparse.runs import fit_run, load_run

    spec = {"input_shape": "auto", "prior": {"type": "gaussian"},
            "layers": [{"type": "linear", "in": "auto", "out": 8}, {"type": "relu"}, {"type": "linear", "out": "auto"}]}
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(spec))
    recipe = os.path.join(ROOT, "inference", "map.yaml")
    run, _ = fit_run(str(first), recipe, "digits", str(tmp_path / "map"), epochs=2, progress=False)
    trained = run.trainer.posterior_summary().locs()
    # a run directory: the new run's layers start at its posterior means (here the MAP weights)
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump({**spec, "init": "map"}))  # relative to the spec file
    run2, _ = fit_run(str(second), recipe, "digits", str(tmp_path / "second"), epochs=1, progress=False)
    started = run2.network.starting_values()
    assert all(torch.equal(started[k], trained[k]) for k in trained)
    assert yaml.safe_load(open(tmp_path / "second" / "model.yaml"))["init"] == str(tmp_path / "map")
    import shutil

    shutil.rmtree(tmp_path / "map")
    load_run(str(tmp_path / "second"))  # loading the run does not need its init any more
    # a state_dict file (site names for a layer list)
    torch.save({k: v + 1 for k, v in trained.items()}, tmp_path / "weights.pt")
    third = tmp_path / "third.yaml"
    third.write_text(yaml.safe_dump({**spec, "init": "weights.pt"}))
    run3, _ = fit_run(str(third), recipe, "digits", str(tmp_path / "third"), epochs=1, progress=False)
    assert torch.equal(run3.network.starting_values()["fc1.weight"], trained["fc1.weight"] + 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "init": "missing.pt"}))
    with pytest.raises(Exception, match="init"):
        fit_run(str(bad), recipe, "digits", str(tmp_path / "bad"), epochs=1, progress=False)
    with pytest.raises(Exception, match="no such run directory"):
        fit_run(str(second), recipe, "digits", str(tmp_path / "fourth"), epochs=1, progress=False)


def test_a_spec_network_with_conv1d_layers_compacts_exactly():
    from pyro_sparse.spec import build_network, parse_model_spec

    spec = parse_model_spec({"input_shape": [1, 40], "prior": {"type": "gaussian"},
                             "layers": [{"type": "conv1d", "out": 6, "kernel_size": 5, "stride": 2},
                                        {"type": "relu"}, {"type": "conv1d", "out": 4, "kernel_size": 3},
                                        {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "out": "auto"}]})
    torch.manual_seed(0)
    net = build_network(spec, (40,), 10)
    assert [type(l).__name__ for _, l in net.bayesian_layers()] == ["Conv1d", "Conv1d", "Linear"]
    summary = fake_summary(net)
    masks = {k: torch.ones_like(s.loc, dtype=torch.bool) for k, s in summary.items()}
    masks["conv2.weight"][:, :2] = False   # channels 0, 1 of conv1 unread: deleted
    masks["fc1.weight"][:, :16] = False    # conv2's channel 0 (16 positions after flatten) unread: deleted
    small = compact(net, summary, masks)
    assert small.conv1.out_channels == 4 and small.conv2.out_channels == 3 and small.fc1.in_features == 48
    x = torch.randn(5, 40)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_module(net, summary, masks)(x), rtol=0, atol=1e-5)
    guide = MeanFieldGuide(net.model)
    guide.setup(x, torch.arange(5))
    assert CoreELBO.supports(net, guide) is None
