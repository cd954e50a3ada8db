"""Curvature against brute force: full per-sample Jacobians, per-sample gradients, exact KFAC cases."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from pyro_sparse.kron import rows_of, split_rows
from pyro_sparse.laplace.curvature import diag_ef, diag_ggn, kfac_ggn, kfac_layer_names, log_likelihood


def kfac_flatten(weight, bias=None):
    """vec([W | b]) column-major: the order in which a KFAC block is kron(A, G)."""
    return rows_of(weight, bias).T.reshape(-1)

DT = torch.float64
LIKELIHOODS = ["categorical", "gaussian", "bernoulli"]
NOISE = 0.7


def mlp(k_out):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Dropout(0.5),
                         nn.Linear(4, k_out)).to(DT)


def convnet(k_out):
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(3, 2, 2, stride=1, bias=False), nn.Tanh()),
        nn.AvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, k_out),
    ).to(DT)


def data(model, n, likelihood, k_out):
    g = torch.Generator().manual_seed(2)
    is_conv = isinstance(model[0], nn.Conv2d)
    x = torch.randn((n, 2, 6, 6) if is_conv else (n, 3), generator=g, dtype=DT)
    if likelihood == "categorical":
        y = torch.randint(0, k_out, (n,), generator=g)
    elif likelihood == "gaussian":
        y = torch.randn((n, k_out), generator=g, dtype=DT)
    else:
        y = torch.randint(0, 2, (n, k_out), generator=g).to(DT)
    return x, y


def lambda_matrix(f, likelihood):
    """Hessian of the NLL w.r.t. one output vector f (K,), written out."""
    if likelihood == "categorical":
        p = torch.softmax(f, -1)
        return torch.diag(p) - torch.outer(p, p)
    if likelihood == "gaussian":
        return torch.eye(f.numel(), dtype=f.dtype) / NOISE**2
    p = torch.sigmoid(f)
    return torch.diag(p * (1 - p))


def per_sample_jacobians(model, x):
    """J_n (K, P) for every sample, parameters flattened in named_parameters order."""
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xn):
        return functional_call(model, p, (xn.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # dict name -> (N, K, *shape)
    return torch.cat([jac[k].reshape(x.shape[0], jac[k].shape[1], -1) for k in params], dim=-1)


def brute_ggn(model, x, likelihood):
    jac = per_sample_jacobians(model, x)
    out = model(x).reshape(x.shape[0], -1).detach()
    return sum(jac[n].T @ lambda_matrix(out[n], likelihood) @ jac[n] for n in range(x.shape[0]))


def as_vector(d, model):
    return torch.cat([d[k].reshape(-1) for k, _ in model.named_parameters()])


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("make", [mlp, convnet], ids=["mlp", "convnet"])
def test_diag_ggn_equals_brute_force_diagonal(make, likelihood):
    k_out = 2 if likelihood == "bernoulli" else 3
    model = make(k_out)
    x, y = data(model, 7, likelihood, k_out)
    exact = torch.diagonal(brute_ggn(model, x, likelihood))
    got = diag_ggn(model, x, y, likelihood, noise=NOISE)
    assert set(got) == {k for k, _ in model.named_parameters()}
    for k, p in model.named_parameters():
        assert got[k].shape == p.shape
    torch.testing.assert_close(as_vector(got, model), exact, rtol=1e-6, atol=1e-10)
    # chunking the data changes nothing (the GGN is a sum over data)
    chunked = diag_ggn(model, x, y, likelihood, noise=NOISE, batch_size=3)
    torch.testing.assert_close(as_vector(chunked, model), exact, rtol=1e-6, atol=1e-10)


def test_diag_ggn_restores_training_mode_and_ignores_dropout():
    model = mlp(3)
    model.train()
    x, y = data(model, 5, "categorical", 3)
    exact = torch.diagonal(brute_ggn(model, x, "categorical"))  # brute force runs in eval mode
    model.train()
    got = diag_ggn(model, x, y, "categorical")
    assert model.training and model[4].training
    torch.testing.assert_close(as_vector(got, model), exact, rtol=1e-6, atol=1e-10)


def test_linear_on_sequence_inputs_sums_over_positions():
    """Linear applied to (N, T, d): weight sharing over T, per-sample gradient summed over T."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).to(DT)
    x = torch.randn(5, 2, 3, dtype=DT)
    exact = torch.diagonal(brute_ggn(model, x, "categorical"))
    torch.testing.assert_close(as_vector(diag_ggn(model, x, None, "categorical"), model), exact, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_diag_ggn_monte_carlo_is_unbiased(likelihood):
    """M sampled targets: estimate = mean of M i.i.d. per-draw estimates, whose mean is exact.

    Tolerance: 5 standard errors of that mean, estimated from the draws themselves.
    """
    k_out = 2 if likelihood == "bernoulli" else 3
    model = mlp(k_out)
    x, y = data(model, 6, likelihood, k_out)
    exact = as_vector(diag_ggn(model, x, y, likelihood, noise=NOISE), model)
    gen = torch.Generator().manual_seed(4)
    draws = torch.stack(
        [as_vector(diag_ggn(model, x, y, likelihood, noise=NOISE, mc_samples=1, generator=gen), model)
         for _ in range(400)]
    )
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert torch.all((mean - exact).abs() <= 5 * se + 1e-12)
    # a single call with M samples averages the same way
    gen = torch.Generator().manual_seed(5)
    many = as_vector(diag_ggn(model, x, y, likelihood, noise=NOISE, mc_samples=400, generator=gen), model)
    assert torch.all((many - exact).abs() <= 5 * draws.std(0) / math.sqrt(400) + 1e-12)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("make", [mlp, convnet], ids=["mlp", "convnet"])
def test_diag_ef_equals_sum_of_squared_per_sample_gradients(make, likelihood):
    k_out = 2 if likelihood == "bernoulli" else 3
    model = make(k_out)
    x, y = data(model, 6, likelihood, k_out)
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def nll(p, xn, yn):
        return -log_likelihood(lambda inp: functional_call(model, p, (inp,)), xn.unsqueeze(0), yn.unsqueeze(0),
                               likelihood, NOISE)

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0))(params, x, y)
    got = diag_ef(model, x, y, likelihood, noise=NOISE)
    for k in params:
        torch.testing.assert_close(got[k], per_sample[k].square().sum(0), rtol=1e-6, atol=1e-10)


def test_log_likelihood_matches_torch_distributions():
    model = mlp(3)
    model.eval()
    x, y = data(model, 5, "categorical", 3)
    f = model(x)
    torch.testing.assert_close(log_likelihood(model, x, y, "categorical"),
                               torch.distributions.Categorical(logits=f).log_prob(y).sum())
    x, y = data(model, 5, "gaussian", 3)
    torch.testing.assert_close(
        log_likelihood(model, x, y, "gaussian", noise=NOISE),
        torch.distributions.Normal(model(x), NOISE).log_prob(y).sum()
    )
    x, y = data(model, 5, "bernoulli", 3)
    torch.testing.assert_close(log_likelihood(model, x, y, "bernoulli"),
                               torch.distributions.Bernoulli(logits=model(x)).log_prob(y).sum())


# ----------------------------------------------------------------------------- KFAC


def kfac_block_order(model, layer, hess):
    """Reorder a full GGN (named_parameters order) into the column-major [W | b] layout of one layer."""
    names = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    offsets = dict(zip(names, torch.tensor([0] + sizes).cumsum(0).tolist()))
    module = dict(model.named_modules())[layer]
    idx_w = torch.arange(module.weight.numel()).reshape(module.weight.shape) + offsets[f"{layer}.weight"]
    idx_b = None if module.bias is None else torch.arange(module.bias.numel()) + offsets[f"{layer}.bias"]
    idx = kfac_flatten(idx_w, idx_b)
    return hess[idx][:, idx]


def test_rows_roundtrip():
    w, b = torch.randn(3, 2, 2, 2), torch.randn(3)
    r = rows_of(w, b)
    assert r.shape == (3, 9) and torch.equal(r[:, 0], w.reshape(3, -1)[:, 0]) and torch.equal(r[:, -1], b)
    w2, b2 = split_rows(r, w.shape, True)
    assert torch.equal(w2, w) and torch.equal(b2, b)
    v = kfac_flatten(w, b)
    assert torch.equal(v[: 3], w.reshape(3, -1)[:, 0]) and torch.equal(v[-3:], b)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("bias", [True, False])
def test_kfac_single_linear_one_sample_is_exact(likelihood, bias):
    torch.manual_seed(6)
    k_out = 3
    model = nn.Sequential(nn.Linear(4, k_out, bias=bias)).to(DT)
    x = torch.randn(1, 4, dtype=DT)
    (a, g), = kfac_ggn(model, x, None, likelihood, noise=NOISE).values()
    exact = kfac_block_order(model, "0", brute_ggn(model, x, likelihood))
    torch.testing.assert_close(torch.kron(a, g), exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_kfac_single_linear_many_samples_factors_by_hand(likelihood):
    """One Linear layer: A = sum_n [x;1][x;1]', G = mean_n Lambda_n (the output gradient is S_n)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    x = torch.randn(9, 4, dtype=DT)
    (a, g), = kfac_ggn(model, x, None, likelihood, noise=NOISE).values()
    xt = torch.cat([x, torch.ones(9, 1, dtype=DT)], 1)
    torch.testing.assert_close(a, xt.T @ xt)
    f = model(x).detach()
    torch.testing.assert_close(g, torch.stack([lambda_matrix(fn, likelihood) for fn in f]).mean(0))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_kfac_factors_by_hand_deep_mlp_and_convnet(likelihood):
    """Every layer: A from its (unfolded, ones-extended) inputs; G = 1/(NL) sum J_z' Lambda J_z by jacrev."""
    k_out = 2 if likelihood == "bernoulli" else 3
    for model in (mlp(k_out), convnet(k_out)):
        model.eval()
        x, _ = data(model, 5, likelihood, k_out)
        got = kfac_ggn(model, x, None, likelihood, noise=NOISE, batch_size=2)
        assert list(got) == kfac_layer_names(model)
        flat = [m for m in model.modules() if not isinstance(m, nn.Sequential)]
        h = x
        for i, module in enumerate(flat):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                name = [k for k, m in model.named_modules() if m is module][0]
                a_exp, g_exp = by_hand_factors(module, flat[i + 1 :], h, likelihood)
                torch.testing.assert_close(got[name][0], a_exp, rtol=1e-8, atol=1e-10)
                torch.testing.assert_close(got[name][1], g_exp, rtol=1e-8, atol=1e-10)
            h = module(h).detach()


def by_hand_factors(module, rest, h, likelihood):
    def tail(z):  # one sample's layer output -> network output
        out = z.unsqueeze(0)
        for m in rest:
            out = m(out)
        return out.reshape(-1)

    z = module(h).detach()
    if isinstance(module, nn.Conv2d):
        pat = torch.nn.functional.unfold(h, module.kernel_size, module.dilation, module.padding, module.stride)
        pat = pat.transpose(1, 2).reshape(-1, pat.shape[1])  # rows: (n, l)
        per_pos = z.shape[2] * z.shape[3]
    else:
        pat, per_pos = h, 1
    if module.bias is not None:
        pat = torch.cat([pat, torch.ones(pat.shape[0], 1, dtype=DT)], 1)
    g_sum = 0
    for n in range(h.shape[0]):
        jz = jacrev(tail)(z[n])  # (K, *z_shape)
        jz = jz.reshape(jz.shape[0], z.shape[1], -1)  # (K, out, L)
        lam = lambda_matrix(tail(z[n]).detach(), likelihood)
        g_sum = g_sum + torch.einsum("kol,kc,cpl->op", jz, lam, jz)
    return pat.T @ pat, g_sum / (h.shape[0] * per_pos)


def test_kfac_conv_whole_image_kernel_one_sample_is_exact():
    """A kernel covering the whole image has one position (L = 1): the conv is a Linear layer."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()).to(DT)
    x = torch.randn(1, 2, 3, 3, dtype=DT)
    (a, g), = kfac_ggn(model, x, None, "categorical").values()
    exact = kfac_block_order(model, "0", brute_ggn(model, x, "categorical"))
    torch.testing.assert_close(torch.kron(a, g), exact, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments_name_the_argument():
    model = mlp(3)
    x, y = data(model, 4, "categorical", 3)
    with pytest.raises(ValueError, match="likelihood"):
        diag_ggn(model, x, y, "poisson")
    with pytest.raises(ValueError, match="noise"):
        diag_ggn(model, x, y, "gaussian", noise=-1.0)
    with pytest.raises(ValueError, match="mc_samples"):
        diag_ggn(model, x, y, "categorical", mc_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        diag_ggn(model, x, y, "categorical", batch_size=0)
    with pytest.raises(ValueError, match="y must"):
        diag_ef(model, x, y[:2], "categorical")
    with pytest.raises(ValueError, match="BatchNorm1d"):
        diag_ggn(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), x, y)
    with pytest.raises(ValueError, match="no trainable layer with curvature"):
        kfac_ggn(nn.Sequential(nn.ReLU()), x, y)


def test_a_new_layer_brings_its_curvature_or_says_it_has_none():
    """The layers declare their curvature: a Conv3d counterpart built on the library's convolution
    inherits the N-d patch backend and gets the exact diagonal GGN; a layer that declares nothing is
    refused at registration, naming what is missing."""
    from pyro_sparse.layers import ConvNd, Layer
    from pyro_sparse.registry import CONVERSIONS, LAYERS

    class Conv3d(ConvNd):
        dims = 3
        torch_cls = nn.Conv3d
        torch_types = (nn.Conv3d,)

    class Opaque(Layer):
        param_axes = {"weight": {"unit": 0}}

    try:
        CONVERSIONS.register(Conv3d, "conv3d")
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv3d(2, 3, (2, 3, 2), padding=(1, 0, 1), stride=(1, 2, 1), dilation=(1, 1, 2)),
                              nn.Tanh(), nn.Flatten(), nn.LazyLinear(4)).to(DT)
        x = torch.randn(5, 2, 3, 5, 4, dtype=DT)
        model(x)
        params = {k: v.detach() for k, v in model.named_parameters()}

        def f(p, xn):
            return functional_call(model, p, (xn[None],))[0]

        jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
        with torch.no_grad():
            prob = torch.softmax(model(x), -1)
        lam = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        ggn = diag_ggn(model, x, None, "categorical")
        for name, j in jac.items():
            j = j.reshape(j.shape[0], j.shape[1], -1)
            brute = torch.einsum("nkp,nkl,nlp->p", j, lam, j).reshape(params[name].shape)
            torch.testing.assert_close(ggn[name], brute, rtol=1e-10, atol=1e-12)
    finally:
        CONVERSIONS._items.pop("conv3d", None)
    with pytest.raises(ValueError, match="'Opaque' declares no 'curvature'.*None where the Laplace"):
        LAYERS.register(Opaque, "opaque_layer")
    assert "opaque_layer" not in LAYERS
