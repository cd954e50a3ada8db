"""Bayesian ViT / MLP-Mixer layers and their reduction (issue 11).

Exact references: ``torch.nn.MultiheadAttention`` / ``F.scaled_dot_product_attention`` /
``nn.LayerNorm`` with the same weights; per-head contributions computed by hand; the masked
network (``masked_module``) for every compact network (max abs logit difference <= 1e-5).
"""

import glob
import math
import os

import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyro_sparse.guides import MeanFieldGuide, prototype_trace
from pyro_sparse.layers import Linear
from pyro_sparse.local_reparam import GaussianWeight, LocalReparameterization
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.outcome import reduction_report
from pyro_sparse.priors import GaussianGamma
from pyro_sparse.rebuild import compact, masked_module
from pyro_sparse.reduced_runs import load_compact, save_compact
from pyro_sparse.reduction import reduce
from pyro_sparse.reduction.heads import head_evidence, remove_heads
from pyro_sparse.reduction.rules import Decision
from pyro_sparse.spec import build_network, load_model_spec
from pyro_sparse.summary import summarize
from pyro_sparse.transformer import (
    ClassToken,
    LayerNorm,
    MixerBlock,
    MultiHeadSelfAttention,
    PatchEmbed,
    PosEmbed,
    TokenPool,
    TransformerBlock,
    attention_heads,
    gaussian_elementwise,
    mlp_units,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def random_values(layer_or_net, x, scale=0.3, seed=0):
    """Site -> a random value of the site's shape (initial value + noise), for every parameter."""
    torch.manual_seed(seed)
    sites = layer_or_net.param_sites() if isinstance(layer_or_net, BayesianNetwork) else None
    trace = prototype_trace(layer_or_net, x)
    names = sites if sites is not None else [n for n, s in trace.nodes.items()
                                             if s["type"] == "sample" and not s["is_observed"]]
    return {n: trace.nodes[n]["value"] + scale * torch.randn_like(trace.nodes[n]["value"]) for n in names}


def tiny_vit(cls_token=False):
    layers = [("patch", PatchEmbed(1, 16, 2))]
    if cls_token:
        layers.append(("cls", ClassToken(16)))
    layers += [("pos", PosEmbed(17 if cls_token else 16, 16)), ("block1", TransformerBlock(16, 4, 24)),
               ("block2", TransformerBlock(16, 4, 24)), ("norm", LayerNorm(16)),
               ("pool", TokenPool("cls" if cls_token else "mean")), ("head", Linear(16, 10))]
    return BayesianNetwork(layers, input_shape=(1, 8, 8))


def tiny_mixer():
    return BayesianNetwork([("patch", PatchEmbed(1, 16, 2)), ("block1", MixerBlock(16, 16, 12, 24)),
                            ("block2", MixerBlock(16, 16, 12, 24)), ("norm", LayerNorm(16)),
                            ("pool", TokenPool("mean")), ("head", Linear(16, 10))], input_shape=(1, 8, 8))


def decision_of(masks, values):
    full = {k: masks.get(k, torch.ones_like(v, dtype=torch.bool)) for k, v in values.items()}
    return Decision("test", full, {}, "none", {})


# --------------------------------------------------------------------------- sites and shapes


def test_site_names_follow_module_paths():
    net = tiny_vit(cls_token=True)
    sites = net.param_sites()
    for name in ("patch.weight", "cls.weight", "pos.weight", "block1.ln1.weight", "block1.attn.q.weight",
                 "block1.attn.o.bias", "block1.mlp.fc1.weight", "block2.mlp.fc2.bias", "norm.weight", "head.weight"):
        assert name in sites
    layer, param, _ = sites["block1.attn.q.weight"]
    assert (layer.site, param) == ("block1.attn.q", "weight")
    assert layer.param_axes["weight"] == {"head": 0, "input": 2}
    assert sites["block1.attn.o.weight"][0].param_axes["weight"] == {"unit": 0, "head": 1}
    assert sites["block1.mlp.fc1.weight"][0].site == "block1.mlp.fc1"
    x = torch.randn(3, 64)
    trace = prototype_trace(net, x)
    assert trace.nodes["block1.attn.q.weight"]["value"].shape == (4, 4, 16)
    assert trace.nodes["block1.attn.o.weight"]["value"].shape == (16, 4, 4)
    assert set(sites) == {n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
    assert net.num_weights() == sum(v.numel() for v in random_values(net, x).values())
    assert tiny_vit()(x).shape == (3, 10) and net(x).shape == (3, 10)


def test_renaming_a_block_renames_its_sites():
    block = TransformerBlock(8, 2, 8)
    assert block.attn.q.site == "block.attn.q"
    net = BayesianNetwork([("enc", block)], likelihood="gaussian")
    assert "enc.attn.q.weight" in net.param_sites() and block.mlp.fc2.site == "enc.mlp.fc2"


def test_prior_grouped_by_head():
    attn = MultiHeadSelfAttention(8, 2, prior=GaussianGamma(group="head"))
    attn.site = "attn"
    trace = prototype_trace(attn, torch.randn(2, 3, 8))
    assert trace.nodes["attn.q.weight.head_precision"]["value"].shape == (2, 1, 1)
    assert trace.nodes["attn.o.weight.head_precision"]["value"].shape == (1, 2, 1)
    with pytest.raises(ValueError, match="group 'unit' is not an axis"):
        bad = MultiHeadSelfAttention(8, 2, prior=GaussianGamma(group="unit"))
        prototype_trace(bad, torch.randn(2, 3, 8))


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="heads 3"):
        TransformerBlock(8, 3, 16)
    with pytest.raises(ValueError, match="patch_size 3 does not divide the image size 8x8"):
        PatchEmbed(1, 8, 3).out_shape((1, 8, 8))
    with pytest.raises(ValueError, match="activation must be one of .* got 'swish'"):
        MixerBlock(4, 8, 4, 4, activation="swish")
    with pytest.raises(ValueError, match=r"expects sequence inputs of shape \(tokens, 8\)"):
        TransformerBlock(8, 2, 8).out_shape((16,))


# --------------------------------------------------------------------------- exact references


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    dim, heads, d = 12, 3, 4
    attn = MultiHeadSelfAttention(dim, heads)
    attn.site = "attn"
    x = torch.randn(5, 7, dim)
    values = random_values(attn, x)
    ours = poutine.condition(attn, data=values)(x)
    plain = attn.deterministic({k[5:]: v for k, v in values.items()})(x)
    ref = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([values[f"attn.{p}.weight"].reshape(heads * d, dim) for p in "qkv"]))
        ref.in_proj_bias.copy_(torch.cat([values[f"attn.{p}.bias"].reshape(-1) for p in "qkv"]))
        ref.out_proj.weight.copy_(values["attn.o.weight"].reshape(dim, heads * d))
        ref.out_proj.bias.copy_(values["attn.o.bias"])
    expected, _ = ref(x, x, x, need_weights=False)
    assert (ours - expected).abs().max() < TOL
    assert (plain - expected).abs().max() < TOL
    # and F.scaled_dot_product_attention on (B, H, T, d)
    q, k, v = (F.linear(x, values[f"attn.{p}.weight"].reshape(-1, dim), values[f"attn.{p}.bias"].reshape(-1))
               .unflatten(-1, (heads, d)).transpose(1, 2) for p in "qkv")
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    expected2 = F.linear(sdpa, values["attn.o.weight"].reshape(dim, -1), values["attn.o.bias"])
    assert (ours - expected2).abs().max() < TOL


def test_layernorm_and_patch_embedding_match_torch():
    torch.manual_seed(1)
    ln = LayerNorm(6)
    ln.site = "ln"
    x = torch.randn(4, 5, 6)
    values = random_values(ln, x)
    ref = nn.LayerNorm(6)
    with torch.no_grad():
        ref.weight.copy_(values["ln.weight"])
        ref.bias.copy_(values["ln.bias"])
    assert (poutine.condition(ln, data=values)(x) - ref(x)).abs().max() < TOL
    img = torch.randn(3, 2, 8, 8)
    conv, lin = PatchEmbed(2, 5, 4, mode="conv"), PatchEmbed(2, 5, 4, mode="linear")
    conv.site = lin.site = "patch"
    values = random_values(conv, img)
    a = poutine.condition(conv, data=values)(img)
    b = poutine.condition(lin, data=values)(img)
    assert a.shape == (3, 4, 5) and (a - b).abs().max() < TOL
    # token (i, j) is patch row i, column j: the conv at that position
    expected = F.conv2d(img, values["patch.weight"], values["patch.bias"], stride=4)[:, :, 1, 0]
    assert (a[:, 2] - expected).abs().max() < TOL


def test_blocks_compute_their_formulas():
    torch.manual_seed(2)
    block = TransformerBlock(8, 2, 12)
    block.site = "b"
    x = torch.randn(3, 5, 8)
    v = random_values(block, x)
    ln = lambda t, n: F.layer_norm(t, (8,), v[f"b.{n}.weight"], v[f"b.{n}.bias"])  # noqa: E731
    attn = MultiHeadSelfAttention(8, 2)
    h = x + attn.deterministic({k[7:]: t for k, t in v.items() if k.startswith("b.attn.")})(ln(x, "ln1"))
    mlp = F.linear(F.gelu(F.linear(ln(h, "ln2"), v["b.mlp.fc1.weight"], v["b.mlp.fc1.bias"])),
                   v["b.mlp.fc2.weight"], v["b.mlp.fc2.bias"])
    assert (poutine.condition(block, data=v)(x) - (h + mlp)).abs().max() < TOL
    mixer = MixerBlock(5, 8, 4, 6, activation="relu")
    mixer.site = "m"
    v = random_values(mixer, x)
    lnm = lambda t, n: F.layer_norm(t, (8,), v[f"m.{n}.weight"], v[f"m.{n}.bias"])  # noqa: E731

    def mlp2(t, p):
        return F.linear(F.relu(F.linear(t, v[f"m.{p}.fc1.weight"], v[f"m.{p}.fc1.bias"])),
                        v[f"m.{p}.fc2.weight"], v[f"m.{p}.fc2.bias"])

    h = x + mlp2(lnm(x, "ln1").transpose(1, 2), "token_mlp").transpose(1, 2)
    expected = h + mlp2(lnm(h, "ln2"), "channel_mlp")
    assert (poutine.condition(mixer, data=v)(x) - expected).abs().max() < TOL
    assert (mixer.deterministic({k[2:]: t for k, t in v.items()})(x) - expected).abs().max() < TOL


def test_gaussian_elementwise_moments():
    # LayerNorm's local reparameterisation: y = x g + b, mean x mu_g + mu_b, var x^2 s_g^2 + s_b^2.
    torch.manual_seed(3)
    x = torch.tensor([[0.5, -2.0, 1.5]]).expand(200_000, 3)
    g = GaussianWeight(torch.tensor([1.0, 0.5, -1.0]), torch.tensor([0.04, 0.25, 0.01]))
    b = GaussianWeight(torch.tensor([0.1, 0.0, 0.3]), torch.tensor([0.01, 0.09, 0.0]))
    y = gaussian_elementwise(x, g, b)
    mean = x[0] * g.loc + b.loc
    var = x[0] ** 2 * g.var + b.var
    n = y.shape[0]
    assert ((y.mean(0) - mean).abs() < 4 * (var / n).sqrt()).all()
    # the sample variance's standard error is about var * sqrt(2/n)
    assert ((y.var(0) - var).abs() < 4 * var * math.sqrt(2 / n)).all()


def test_local_reparameterisation_matches_weight_sampling_in_distribution():
    """Per-token pre-activations of q: the Gaussian marginal N(x mu^T + mu_b, x^2 s^2^T + s_b^2)
    with the handler (one draw per token) and with weight draws (one per call)."""
    torch.manual_seed(4)
    attn = MultiHeadSelfAttention(4, 2)
    attn.site = "a"
    guide = MeanFieldGuide(attn, init_scale=0.3)
    x0 = torch.randn(1, 2, 4)
    guide.setup(x0)

    def q_of(x, local):
        if local:
            with LocalReparameterization():
                tr = poutine.trace(guide).get_trace(x)
                return poutine.replay(attn.q, trace=tr)(x)
        tr = poutine.trace(guide).get_trace(x)
        return poutine.replay(attn.q, trace=tr)(x)

    n = 4000
    local = q_of(x0.expand(n, 2, 4), True)
    drawn = torch.cat([q_of(x0, False) for _ in range(400)])
    mu_w, var_w = guide.site_posterior("a.q.weight")
    mu_b, var_b = guide.site_posterior("a.q.bias")
    mean = torch.einsum("hdi,ti->thd", mu_w, x0[0]) + mu_b
    var = torch.einsum("hdi,ti->thd", var_w, x0[0] ** 2) + var_b
    for samples in (local, drawn):
        m = samples.shape[0]
        assert ((samples.mean(0) - mean).abs() < 4 * (var / m).sqrt()).all()
        assert ((samples.var(0) - var).abs() < 5 * var * math.sqrt(2 / m)).all()


# --------------------------------------------------------------------------- heads and units


def _per_head(values, x, heads, d, prefix="attn."):
    """Each head's contribution W^o_h head_h(x), by hand: list of (B, T, D)."""
    dim = x.shape[-1]
    out = []
    for h in range(heads):
        q, k, v = (x @ values[f"{prefix}{p}.weight"][h].T + values[f"{prefix}{p}.bias"][h] for p in "qkv")
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        out.append((a @ v) @ values[f"{prefix}o.weight"][:, h].T)
        assert out[-1].shape == (*x.shape[:-1], dim)
    return out


def test_removing_a_head_changes_nothing_else():
    torch.manual_seed(5)
    dim, heads, d = 8, 4, 2
    block = TransformerBlock(dim, heads, 10)
    block.site = "b"
    x = torch.randn(3, 6, dim)
    values = {k[2:]: v for k, v in random_values(block, x).items()}
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in values.items()}
    # head 1: nobody reads it (o pruned); head 2: its values are constant (v weights pruned)
    masks["attn.o.weight"][:, 1] = False
    masks["attn.v.weight"][2] = False
    masked = {k: v * masks[k] for k, v in values.items()}
    entry, params, info = block.compact_parts(masked, masks)
    assert info["heads_kept"] == [0, 3] and info["heads_removed"] == [1, 2] and entry["heads"] == 2
    # nothing else changes: kept heads' projections, both LayerNorms and the MLP are the same tensors
    for p in "qkv":
        assert torch.equal(params[f"attn.{p}.weight"], values[f"attn.{p}.weight"][[0, 3]])
        assert torch.equal(params[f"attn.{p}.bias"], values[f"attn.{p}.bias"][[0, 3]])
    assert torch.equal(params["attn.o.weight"], values["attn.o.weight"][:, [0, 3]])
    for k in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias"):
        assert torch.equal(params[k], values[k])
    # attention output without heads 1 and 2, by hand: heads 0 and 3, the bias, and head 2's constant
    # value b^v_2 read through W^o_2 (softmax rows sum to one)
    module = TransformerBlock.build_compact(entry)
    module.load_state_dict(params)
    y = module.ln1(x)
    contrib = _per_head(values, y, heads, d)
    by_hand = contrib[0] + contrib[3] + values["attn.o.bias"] + values["attn.o.weight"][:, 2] @ values["attn.v.bias"][2]
    assert (module.attn(y) - by_hand).abs().max() < TOL
    full = block.deterministic(values).attn(y)
    assert (full - sum(contrib) - values["attn.o.bias"]).abs().max() < TOL  # the reference itself
    h = x + by_hand
    ref_mlp = block.deterministic(values).mlp(block.deterministic(values).ln2(h))
    assert (module(x) - (h + ref_mlp)).abs().max() < TOL
    assert (module(x) - block.deterministic(masked)(x)).abs().max() < TOL


def test_pruning_queries_and_keys_keeps_the_head():
    # q_h = k_h = 0 gives uniform attention over v_h, which still depends on the input
    values = {f"{p}.weight": torch.randn(2, 3, 5) for p in "qkv"}
    values.update({f"{p}.bias": torch.randn(2, 3) for p in "qkv"})
    values.update({"o.weight": torch.randn(5, 2, 3), "o.bias": torch.randn(5)})
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in values.items()}
    masks["q.weight"][0] = masks["k.weight"][0] = False
    assert attention_heads(values, masks)["keep"] == [0, 1]
    masks["v.weight"][0] = False
    plan = attention_heads(values, masks)
    assert plan["keep"] == [1] and plan["constant"] == [0] and plan["folded"]
    expected = values["o.bias"] + values["o.weight"][:, 0] @ values["v.bias"][0]
    assert torch.allclose(plan["params"]["o.bias"], expected)


def test_mlp_units_fold_constants():
    torch.manual_seed(6)
    values = {"fc1.weight": torch.randn(6, 4), "fc1.bias": torch.randn(6), "fc2.weight": torch.randn(3, 6),
              "fc2.bias": torch.randn(3)}
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in values.items()}
    masks["fc1.weight"][1] = False  # constant unit: gelu(b_1)
    masks["fc2.weight"][:, 4] = False  # unread unit
    masked = {k: v * masks[k] for k, v in values.items()}
    plan = mlp_units(masked, masks, "gelu")
    assert plan["keep"] == [0, 2, 3, 5] and plan["constant"] == [1] and plan["unread"] == [4]
    x = torch.randn(7, 4)
    ref = F.linear(F.gelu(F.linear(x, masked["fc1.weight"], masked["fc1.bias"])), masked["fc2.weight"],
                   masked["fc2.bias"])
    p = plan["params"]
    out = F.linear(F.gelu(F.linear(x, p["fc1.weight"], p["fc1.bias"])), p["fc2.weight"], p["fc2.bias"])
    assert (out - ref).abs().max() < TOL


# --------------------------------------------------------------------------- compact networks


@pytest.mark.parametrize("make", [lambda: tiny_vit(), lambda: tiny_vit(cls_token=True), tiny_mixer],
                         ids=["vit", "vit-cls", "mixer"])
def test_compact_equals_masked(make, tmp_path):
    torch.manual_seed(7)
    net = make()
    x = torch.randn(20, 64)
    values = random_values(net, x)
    gen = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(v.shape, generator=gen) > 0.6 for k, v in values.items() if not k.endswith("bias")}
    blocks = [n for n, l in net.layers.items() if isinstance(l, (TransformerBlock, MixerBlock))]
    if isinstance(net.layers["block1"], TransformerBlock):
        masks["block1.attn.v.weight"][0] = False  # constant head (folded)
        masks["block1.attn.o.weight"][:, 3] = False  # unread head
        masks["block2.attn.v.weight"][:] = False  # every head of block 2 goes
        mlp = ["mlp"]
    else:
        masks["block1.token_mlp.fc1.weight"][:4] = False
        mlp = ["token_mlp", "channel_mlp"]
    for b in blocks:
        for m in mlp:
            masks[f"{b}.{m}.fc1.weight"][-3:] = False  # constant units
            masks[f"{b}.{m}.fc2.weight"][:, :2] = False  # unread units
    decision = decision_of(masks, values)
    module = compact(net, values, decision)
    masked = masked_module(net, values, decision)
    with torch.no_grad():
        assert (module(x) - masked(x)).abs().max() <= TOL
    plan = module.plan
    for b in blocks:
        for m in mlp:
            assert plan.units_removed[f"{b}.{m}.fc1"] >= 5
    if mlp == ["mlp"]:
        assert plan.layers["block1"]["heads_removed"] == [0, 3] and plan.heads_removed == {"block1": 2, "block2": 4}
    # the report lists heads and MLP units removed per block, and the saved network reloads
    report = reduction_report(net, values, decision, x, torch.zeros(20, dtype=torch.long), module=module)
    assert report["max_abs_output_diff"] <= TOL
    for b in blocks:
        for m in mlp:
            assert report["blocks"][b][f"{m}.fc1_units_removed"] == plan.units_removed[f"{b}.{m}.fc1"]
    assert report["flops_compact"] < report["flops_dense"]
    assert report["params_compact"] < report["params_dense"]
    path = tmp_path / "compact.pt"
    save_compact(path, module)
    again = load_compact(path)
    with torch.no_grad():
        assert torch.equal(again(x), module(x))


def test_compact_from_a_rule_on_a_fresh_guide():
    # the whole path: guide -> summary -> reduce -> compact, for a network from a spec
    spec = load_model_spec(os.path.join(ROOT, "models", "vit_tiny_sparsevd.yaml"))
    net = build_network(spec, (64,), 10, (1, 8, 8))
    guide = MeanFieldGuide(net.model)
    x = torch.randn(8, 64)
    guide.setup(x)
    summary = summarize(net, guide)
    assert summary["block1.attn.q.weight"].layer == "block1.attn.q"
    assert summary["block1.attn.q.weight"].axes == {"head": 0, "input": 2}
    decision = reduce(summary, "magnitude", sparsity=0.9)
    assert abs(decision.sparsity - 0.9) < 1e-3
    module = compact(net, summary, decision)
    with torch.no_grad():
        assert (module(x) - masked_module(net, summary, decision)(x)).abs().max() <= TOL


# --------------------------------------------------------------------------- specs


SPECS = sorted(glob.glob(os.path.join(ROOT, "models", "vit_tiny*.yaml")) +
               glob.glob(os.path.join(ROOT, "models", "mixer_tiny*.yaml")))


def test_every_image_size_has_every_prior():
    names = {os.path.basename(p) for p in SPECS}
    for arch in ("vit_tiny", "mixer_tiny"):
        for size in ("", "_28"):
            for prior in ("gaussian", "sparsevd", "horseshoe"):
                assert f"{arch}{size}_{prior}.yaml" in names


@pytest.mark.parametrize("path", SPECS, ids=[os.path.basename(p)[:-5] for p in SPECS])
def test_specs_build_and_run(path):
    size = 28 if "_28_" in path else 8
    net = build_network(load_model_spec(path), (size * size,), 10, (1, size, size))
    x = torch.randn(3, size * size)
    out = prototype_trace(net, x).nodes["_RETURN"]["value"]
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    guide = MeanFieldGuide(net.model)
    guide.setup(x)
    with LocalReparameterization():
        tr = poutine.trace(guide).get_trace(x)
        sampled = poutine.replay(net, trace=tr)(x)
    assert sampled.shape == (3, 10) and torch.isfinite(sampled).all()
    tokens = 16
    layer = next(l for l in net.layers.values() if isinstance(l, (TransformerBlock, MixerBlock)))
    if isinstance(layer, MixerBlock):
        assert layer.tokens == tokens


def test_remove_heads_by_group_evidence():
    net = BayesianNetwork([("attn", MultiHeadSelfAttention(4, 2)), ("pool", TokenPool()), ("head", Linear(4, 3))],
                          input_shape=(5, 4))
    values = random_values(net, torch.randn(2, 5, 4))
    scores = {k: torch.full_like(v, -1.0) for k, v in values.items() if not k.endswith("bias")}
    scores["attn.v.weight"][1] = 0.5  # head 1: its 2x4 value weights sum to 4 > 0
    scores["attn.o.weight"][:, 0] = 0.1  # head 0: its 4x2 output columns sum to 0.8 > 0 ...
    scores["attn.o.weight"][0, 0, 0] = -0.6  # ... now 7 * 0.1 - 0.6 = 0.1: still removed, by its outputs
    decision = Decision("savage-dickey", {k: torch.ones_like(v, dtype=torch.bool) for k, v in values.items()},
                        scores, "delta_f", {})
    v_sum, o_sum = head_evidence(net, decision)["attn"]
    assert torch.allclose(v_sum, torch.tensor([-8.0, 4.0])) and torch.allclose(o_sum, torch.tensor([0.1, -8.0]))
    out = remove_heads(net, decision)
    assert not out.masks["attn.v.weight"][1].any() and out.masks["attn.v.weight"][0].all()
    assert not out.masks["attn.o.weight"][:, 0].any() and out.masks["attn.o.weight"][:, 1].all()
    assert decision.masks["attn.v.weight"].all()  # the input decision is untouched
    assert compact(net, values, out).plan.layers["attn"]["heads_removed"] == [0, 1]
    assert remove_heads(net, decision, threshold=0.5).masks["attn.o.weight"].all()
    with pytest.raises(ValueError, match="head evidence sums per-weight delta F"):
        remove_heads(net, Decision("magnitude", decision.masks, scores, "magnitude", {}))


@pytest.mark.slow
def test_mixer_digits_map_then_iterative_bmr(tmp_path):
    """A short version of bench/acceptance_vit.py (about 30 s on one core): the tiny Mixer learns
    digits with MAP, and iterative BMR (Savage-Dickey every 2 epochs, posterior scales learning 3x
    faster) removes most weights at a small cost; compact == masked, units reported per block."""
    import yaml

    from pyro_sparse.reduced_runs import reduce_run
    from pyro_sparse.runs import fit_run

    def recipe(name, **changes):
        data = yaml.safe_load(open(os.path.join(ROOT, "inference", f"{name}.yaml")))
        data.update(changes)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    model = os.path.join(ROOT, "models", "mixer_tiny_gaussian.yaml")
    _, metrics = fit_run(model, recipe("map_transformer", epochs=8), "digits", str(tmp_path / "map"), progress=False)
    assert metrics["test_accuracy"] >= 0.93
    bmr = recipe("svi_bmr_iterative", epochs=16, kl_warmup_epochs=4, scale_lr_factor=3.0, eval_every=16,
                 eval_samples=1, reduction={"method": "savage-dickey", "warmup_epochs": 6, "every": 2})
    _, metrics = fit_run(model, bmr, "digits", str(tmp_path / "bmr"), progress=False)
    assert metrics["bmr_sparsity"] >= 0.6
    report = reduce_run(str(tmp_path / "bmr"), "savage-dickey", write=False)
    assert report["sparsity"] >= 0.6 and report["test_accuracy_reduced"] >= 0.92
    assert report["max_abs_output_diff"] <= TOL
    assert set(report["blocks"]) == {"block1", "block2"}
    assert sum(report["units_removed_per_layer"][f"block{b}.{m}.fc1"] for b in (1, 2)
               for m in ("token_mlp", "channel_mlp")) > 0
