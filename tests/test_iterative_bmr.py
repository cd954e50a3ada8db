"""Iterative BMR: pruned weights are fixed at N(0, g0^2) in prior and guide and stay pruned."""

import math

import pyro.poutine as poutine
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pyro_sparse.elbo import MeanFieldELBO
from pyro_sparse.errors import SpecError
from pyro_sparse.guides import MeanFieldGuide
from pyro_sparse.iterative import IterativeBMRTrainer, PrunedWeights
from pyro_sparse.layers import Linear, ReLU
from pyro_sparse.local_reparam import LocalReparameterization
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.recipe import parse_recipe
from pyro_sparse.runs import build  # importing runs registers method svi_bmr
from pyro_sparse.spec import parse_model_spec

G0 = 1e-6


def small():
    torch.manual_seed(0)
    net = BayesianNetwork([Linear(4, 3), ReLU(), Linear(3, 2)])
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    guide = MeanFieldGuide(net.model, init_scale=0.3).setup(x, y)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False], [True, True, True, False]])
    return net, guide, x, y, mask


def test_pruned_elements_have_zero_kl_and_zero_gradient():
    net, guide, x, y, mask = small()
    pruner = PrunedWeights({"fc1.weight": mask}, G0)
    elbo = MeanFieldELBO(local_reparam=True)
    loglik, kl = elbo.terms(pruner(net.model), pruner(guide), x, y, dataset_size=8)
    expected = 0.0
    for name in guide.sites:
        q = guide.distribution(name)
        term = kl_divergence(Normal(q.loc, q.scale), Normal(0.0, 1.0))
        if name == "fc1.weight":
            term = term[mask]
        expected = expected + term.sum()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-6)
    (kl - loglik).backward()
    for p in (guide.locs["fc1__weight"], guide.log_scales["fc1__weight"]):
        assert torch.equal(p.grad[~mask], torch.zeros_like(p.grad[~mask]))
        assert bool((p.grad[mask] != 0).any())


def test_the_guide_hands_layers_the_reduced_posterior():
    net, guide, x, y, mask = small()
    pruner = PrunedWeights({"fc1.weight": mask}, G0)
    with LocalReparameterization() as handler:
        poutine.trace(pruner(guide)).get_trace(x)
    post = handler.posteriors["fc1.weight"]
    assert torch.equal(post.loc[~mask], torch.zeros(int((~mask).sum())))
    assert torch.allclose(post.scale[~mask], torch.full((int((~mask).sum()),), G0))
    assert torch.equal(post.loc[mask], guide.locs["fc1__weight"].detach()[mask])
    # without local reparameterisation the sampled weights are N(0, G0^2) where pruned
    trace = poutine.trace(pruner(guide)).get_trace(x)
    assert trace.nodes["fc1.weight"]["value"][~mask].abs().max() < 10 * G0


def _trainer(digits, out_dir=None, epochs=4, **overrides):
    spec = parse_model_spec({"input_shape": "auto", "layers": [{"type": "linear", "in": "auto", "out": 16},
                                                               {"type": "relu"}, {"type": "linear", "out": "auto"}]})
    recipe = parse_recipe({"method": "svi_bmr", "guide_options": {"init_scale": 0.0067}, "epochs": epochs,
                           "optimizer": {"name": "Adam", "lr": 0.02}, "batch_size": 256, "eval_samples": 2,
                           "reduction": {"method": "savage-dickey", "warmup_epochs": 1, "every": 1,
                                         "pruned_scale": G0}, **overrides})
    net, guide = build(spec, recipe, digits)
    return IterativeBMRTrainer(net, guide, digits, recipe, out_dir=out_dir, progress=False)


def _check_fixed(trainer, masks):
    for name, mask in masks.items():
        key = name.replace(".", "__")
        assert torch.equal(trainer.guide.locs[key].detach()[~mask], torch.zeros(int((~mask).sum())))
        assert torch.equal(trainer.guide.log_scales[key].detach()[~mask],
                           torch.full((int((~mask).sum()),), math.log(G0)))


def test_pruned_weights_stay_pruned_across_blocks(digits, tmp_path):
    trainer = _trainer(digits, str(tmp_path / "run"))
    trainer.fit(epochs=2)  # warm-up epoch, one block, pruning steps after epochs 1 and 2
    first = {k: v.clone() for k, v in trainer.masks.items()}
    assert sum(int((~m).sum()) for m in first.values()) > 0
    _check_fixed(trainer, first)
    metrics = trainer.fit(epochs=4)
    for name, mask in trainer.masks.items():
        assert not bool((mask & ~first[name]).any())  # nothing pruned comes back
    _check_fixed(trainer, first)  # two more SVI blocks did not move the pruned weights
    _check_fixed(trainer, trainer.masks)
    steps = [h["sparsity"] for h in trainer.bmr_history]
    assert len(steps) == 3 and steps == sorted(steps)  # after epochs 1, 2, 3 (not the last)
    assert metrics["bmr_sparsity"] == pytest.approx(trainer.sparsity()) == pytest.approx(steps[-1])
    # resume from the checkpoint: the same masks
    again = _trainer(digits, str(tmp_path / "run"))
    again.resume()
    assert all(torch.equal(again.masks[k], trainer.masks[k]) for k in trainer.masks)


def test_bad_reduction_section_names_the_field(digits):
    """The recipe is checked when it is parsed: an iterative-BMR recipe against its own section,
    any other against the rules of the registry."""
    with pytest.raises(SpecError, match="reduction.method: expected one of 'bmr', 'savage-dickey', 'spike-slab'"):
        parse_recipe({"method": "svi_bmr", "reduction": {"method": "opd"}})
    with pytest.raises(SpecError, match="reduction.method: expected one of .*'horseshoe-scale'"):
        parse_recipe({"method": "svi", "reduction": {"method": "obd"}})
    with pytest.raises(SpecError, match="reduction.sparsity"):
        parse_recipe({"method": "svi", "reduction": {"method": "opd", "sparsity": 1.5}})
    assert parse_recipe({"reduction": {"method": "opd", "sparsity": 0.9}})["reduction"] == {"method": "opd",
                                                                                           "sparsity": 0.9}


def test_the_core_gives_the_pyro_paths_run(digits):
    """Same seed, pruning after epochs 1 and 2 of 3: the ELBO core with the trainer's masks gives
    the run of the Pyro path (PrunedWeights around model and guide): history, masks and guide."""
    runs = []
    for path in ("auto", "pyro"):
        t = _trainer(digits, epochs=3, elbo=path)
        assert t.elbo_path == ("core" if path == "auto" else "pyro")
        t.fit()
        runs.append((t.history, {k: v.clone() for k, v in t.masks.items()}, t.bmr_history,
                     {k: v.detach().clone() for k, v in t.guide.state_dict().items()}))
    (h_dir, m_dir, b_dir, p_dir), (h_pyro, m_pyro, b_pyro, p_pyro) = runs
    assert len(b_dir) == 2 and b_dir[-1]["sparsity"] > 0  # two pruning steps that removed weights
    assert b_dir == b_pyro
    assert m_dir.keys() == m_pyro.keys() and all(torch.equal(m_dir[k], m_pyro[k]) for k in m_dir)
    for a, b in zip(h_dir, h_pyro):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["bmr_sparsity"] == b["bmr_sparsity"]
    assert h_dir[2]["bmr_sparsity"] > 0
    for key in p_pyro:
        torch.testing.assert_close(p_dir[key], p_pyro[key], rtol=1e-4, atol=1e-4)
    _check_fixed_state(p_dir, m_dir)


def _check_fixed_state(state, masks):
    for name, mask in masks.items():
        key = name.replace(".", "__")
        assert torch.equal(state[f"locs.{key}"][~mask], torch.zeros(int((~mask).sum())))


def test_resume_on_the_core_continues_bit_for_bit(digits, tmp_path):
    """Two epochs, then a resumed trainer for two more: the same history, masks and guide as four
    epochs in one go (the masks come back from the checkpoint into the dict the ELBO reads)."""
    whole = _trainer(digits, str(tmp_path / "whole"))
    assert whole.elbo_path == "core"
    whole.fit()
    part = _trainer(digits, str(tmp_path / "part"))
    part.fit(epochs=2)
    again = _trainer(digits, str(tmp_path / "part"))
    assert again.elbo.masks is again.masks
    again.fit(resume=True)
    assert again.elbo.masks is again.masks and len(again.masks) > 0
    assert [h["loss"] for h in again.history] == [h["loss"] for h in whole.history]
    assert [h["bmr_sparsity"] for h in again.history] == [h["bmr_sparsity"] for h in whole.history]
    assert all(torch.equal(again.masks[k], whole.masks[k]) for k in whole.masks)
    for key, value in whole.guide.state_dict().items():
        assert torch.equal(again.guide.state_dict()[key], value), key
