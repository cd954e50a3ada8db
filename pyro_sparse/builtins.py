"""The loader of the built-in components: every prior, layer, likelihood, guide, fitting method
and reduction rule that ships with pyro-sparse, registered in :mod:`pyro_sparse.registry`.

This is the one place that names them all. :func:`register_builtins` runs once, when a registry
is first read (:func:`pyro_sparse.registry.load`); the modules it imports define their classes
and register nothing themselves, so importing any one of them has no effect on the registries
and no module below this one needs to import the others to make them known.
"""

from __future__ import annotations

from . import guides, layers, likelihoods, priors, recurrent, structured_guides, transformer
from .fitting import SVITrainer
from .reduction import rules
from .reduction.iterative import IterativeBMRTrainer
from .registry import CONVERSIONS, FITTERS, GUIDES, LAYERS, LIKELIHOODS, PRIORS, RULES
from .spam import LaplaceTrainer

__all__ = ["register_builtins", "BUILTIN"]

#: (registry, the built-in components), in the order they are listed
BUILTIN = [
    (PRIORS, [priors.Gaussian, priors.GaussianGamma, priors.LogUniform, priors.GroupLogUniform, priors.Horseshoe]),
    (LAYERS, [
        layers.Linear, layers.Conv2d, layers.Conv1d, layers.ReLU, layers.Tanh, layers.Sigmoid, layers.GELU, layers.Flatten,
        layers.Dropout, layers.MaxPool2d, layers.AvgPool2d,
        recurrent.LSTM, recurrent.GRU, recurrent.Embedding, recurrent.OneHot, recurrent.LastStep,
        transformer.LayerNorm, transformer.PatchEmbed, transformer.PosEmbed, transformer.ClassToken,
        transformer.TokenPool, transformer.MultiHeadSelfAttention, transformer.TransformerBlock,
        transformer.MixerBlock,
    ]),
    (LIKELIHOODS, [likelihoods.Categorical, likelihoods.Bernoulli, likelihoods.Gaussian,
                   likelihoods.SequenceCategorical]),
    (GUIDES, [guides.MeanFieldGuide, guides.DeltaGuide, structured_guides.StructuredGuide,
              structured_guides.LowRankGuide]),
    (FITTERS, [SVITrainer, LaplaceTrainer, IterativeBMRTrainer]),
    (RULES, list(rules.BUILTIN_RULES)),
    # the Bayesian counterparts of torch modules that bayesian(module) converts (by their torch_types)
    (CONVERSIONS, [layers.Linear, layers.Conv1d, layers.Conv2d, recurrent.TorchLSTM, recurrent.TorchGRU,
                   recurrent.Embedding, transformer.LayerNorm, transformer.TorchMultiheadAttention]),
]


def register_builtins():
    """Register every built-in component under its ``spec_name`` (rules: ``name``)."""
    for registry, components in BUILTIN:
        for component in components:
            registry.register(component)
