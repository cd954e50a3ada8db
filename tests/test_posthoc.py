"""Post-hoc pruning of a trained network (posthoc.prune) and the curvature of any nn.Module.

The curvature engine records layer inputs and outputs with forward hooks, so a user's class with
a skip connection, a branch or a loop gets the exact diagonal GGN (checked against per-sample
Jacobians), the same numbers as the equivalent nn.Sequential; frozen parameters are held fixed.
prune() returns a module of the user's class with the rule's weights at zero, which a fresh
instance loads."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from pyro_sparse.laplace.curvature import diag_ef, diag_ggn, kfac_ggn
from pyro_sparse.posthoc import laplace_posterior, prune
from pyro_sparse.rebuild import masked_module


class Residual(nn.Module):
    """A skip connection, a branch from the input, and one layer applied twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.hidden = nn.Linear(8, 8)
        self.side = nn.Linear(6, 4)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(h + self.hidden(h))
        h = torch.tanh(h + self.hidden(h))  # the same weights again
        return self.out(h) + self.side(x)


def brute_diag_ggn(model, x):
    """sum_n diag(J_n' Lambda_n J_n) for the categorical likelihood, from per-sample Jacobians."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def f(p, xn):
        return functional_call(model, p, (xn[None],))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # name -> (N, K, *shape)
    with torch.no_grad():
        prob = torch.softmax(model(x), -1)
    lam = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    out = {}
    for name, j in jac.items():
        j = j.reshape(j.shape[0], j.shape[1], -1)
        out[name] = torch.einsum("nkp,nkl,nlp->p", j, lam, j).reshape(params[name].shape)
    return out


def test_diag_ggn_of_a_module_with_skips_branches_and_a_shared_layer_is_exact():
    torch.manual_seed(0)
    model = Residual().double()
    x = torch.randn(7, 6, dtype=torch.float64)
    ggn, brute = diag_ggn(model, x), brute_diag_ggn(model, x)
    assert set(ggn) == set(brute)
    for name in ggn:
        torch.testing.assert_close(ggn[name], brute[name], rtol=1e-10, atol=1e-12)
    kfac = kfac_ggn(model, x)  # every application of `hidden` counts as a position
    assert set(kfac) == {"inp", "hidden", "side", "out"} and kfac["hidden"][0][-1, -1] == 2 * 7


class SameAsSequential(nn.Module):
    def __init__(self, seq):
        super().__init__()
        self.a, self.b = seq[0], seq[2]

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_a_module_gets_the_curvature_of_the_equivalent_sequential():
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    mod = SameAsSequential(seq)
    x, y = torch.randn(11, 5), torch.randint(0, 3, (11,))
    for fn in (lambda m: diag_ggn(m, x), lambda m: diag_ef(m, x, y)):
        a, b = fn(seq), fn(mod)
        assert torch.equal(a["0.weight"], b["a.weight"]) and torch.equal(a["2.bias"], b["b.bias"])
    ka, kb = kfac_ggn(seq, x), kfac_ggn(mod, x)
    assert torch.equal(ka["0"][0], kb["a"][0]) and torch.equal(ka["2"][1], kb["b"][1])


def test_frozen_parameters_are_held_fixed_and_other_trainable_modules_are_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    assert set(diag_ggn(model, torch.randn(5, 3))) == {"2.weight", "2.bias"}

    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(3, 3), nn.LayerNorm(3)

        def forward(self, x):
            return self.norm(self.fc(x))

    with pytest.raises(ValueError, match="LayerNorm"):
        diag_ggn(WithNorm(), torch.randn(5, 3))
    m = WithNorm()
    m.norm.requires_grad_(False)
    assert set(diag_ggn(m, torch.randn(5, 3))) == {"fc.weight", "fc.bias"}


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.skip = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 16, 24), nn.ReLU(), nn.Linear(24, 10))
        self.norm = nn.BatchNorm2d(6)

    def forward(self, x):
        h = F.relu(self.norm(self.conv(x.reshape(len(x), 1, 8, 8))))
        h = F.relu(h + self.skip(h))
        return self.head(F.max_pool2d(h, 2))


def trained(seed=0):
    from pyro_sparse.data import load_digits

    data = load_digits()
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for i in range(0, 1437, 64):
            loss = F.cross_entropy(model(data.x_train[i:i + 64]), data.y_train[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), data


@pytest.fixture(scope="module")
def cnn():
    return trained()


@pytest.mark.parametrize("curvature", ["diag", "kfac"])
def test_prune_returns_the_users_class_with_the_rule_applied(cnn, curvature):
    model, data = cnn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, data.x_train[:400], data.y_train[:400], rule="opd", sparsity=0.8, curvature=curvature)
    assert type(result.module) is SmallCNN
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's module is unchanged
    # every Linear/Conv weight is covered, the batch norm is held fixed; 80% of the covered weights are 0
    sites = set(result.network.param_sites())
    assert sites == {f"{m}.{p}" for m in ("conv", "skip", "head.1", "head.3") for p in ("weight", "bias")}
    assert result.info["sparsity"] == pytest.approx(0.8, abs=1e-3)
    pruned = result.module.state_dict()
    for site, mask in result.decision.masks.items():
        assert torch.all(pruned[site][~mask] == 0)
    assert torch.equal(pruned["norm.running_mean"], before["norm.running_mean"])
    fresh = SmallCNN()
    fresh.load_state_dict(result.module.state_dict())
    fresh.eval()
    x = data.x_test
    with torch.no_grad():
        reference = masked_module(result.network, result.summary, result.decision)(x)
        assert (fresh(x) - reference).abs().max() <= 1e-5
        small = result.compact()
        assert type(small) is SmallCNN and small.head[1].out_features <= 24
        assert (small(x) - reference).abs().max() <= 1e-4
    if curvature == "kfac":  # P_ii is the diagonal of kron(A, G) plus the prior's; precision the marginal one
        posterior = laplace_posterior(model, data.x_train[:400], data.y_train[:400], curvature="kfac", hyper_steps=0)
        summary = posterior.summary()
        a, g = kfac_ggn(posterior.model, data.x_train[:400])["head.3"]
        w = summary["head.3.weight"]
        expected = torch.outer(g.diagonal(), a.diagonal()[:-1]) + w.prior_precision
        torch.testing.assert_close(w.precision_diagonal(), expected)
        assert w.marginal and w.structure is summary["head.3.bias"].structure
        assert (w.precision <= expected * (1 + 1e-5)).all()  # 1 / Sigma_ii <= P_ii


def test_prune_with_fine_tuning_keeps_pruned_weights_at_zero_and_any_rule(cnn):
    model, data = cnn
    result = prune(model, data.x_train[:300], data.y_train[:300], rule="magnitude", sparsity=0.9,
                   fine_tune_epochs=1, lr=1e-3, batch_size=50)
    pruned = result.module.state_dict()
    for site, mask in result.decision.masks.items():
        assert torch.all(pruned[site][~mask] == 0)
    assert result.info["fine_tune_seconds"] > 0
    loader = DataLoader(TensorDataset(data.x_train[:300], data.y_train[:300]), batch_size=100)
    for rule in ("savage-dickey", "bmr"):  # evidence rules read the Laplace posterior and its fitted prior
        r = prune(model, loader, rule=rule)
        assert r.decision.method == rule and 0 < r.info["sparsity"] < 1
    masked = prune(model, loader, rule="opd", sparsity=0.5, prune_masks=True).module
    assert hasattr(masked.head[1], "weight_mask")
    with pytest.raises(ValueError, match="sparsity"):
        prune(model, loader, rule="opd")


def test_prune_names_bad_labels_and_inputs_and_scores_held_out_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    with pytest.raises(ValueError, match="y: label 3 is outside 0..2"):
        prune(model, x, torch.where(y == 0, 3, y), rule="magnitude", sparsity=0.5)
    with pytest.raises(ValueError, match="y: label -1 is outside"):
        prune(model, x, y - 1, rule="magnitude", sparsity=0.5)
    bad = x.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match="x: NaN or infinite values, the first in row 7"):
        prune(model, bad, y, rule="magnitude", sparsity=0.5)
    r = prune(model, x, y, rule="random", sparsity=0.9, validation=(x, y))
    q = r.info["quality"]
    assert q["metric"] == "test_accuracy" and q["drop"] == pytest.approx(q["dense"] - q["reduced"])
    from pyro_sparse.errors import QualityError

    with pytest.raises(QualityError, match="--max-drop"):
        prune(model, x, y, rule="random", sparsity=0.99, validation=(x, y), max_drop=-1.0)
