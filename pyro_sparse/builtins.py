"""The loader of the built-in components: every prior, layer, likelihood, guide, fitting method,
reduction rule and module conversion that ships with pyro-sparse, registered in
:mod:`pyro_sparse.registry`.

This is the one place that names them all, as a table of names and ``"module:attr"`` strings
(the module conversions are the layers that declare the torch types they convert):
reading it imports nothing (not even torch), so the command line can list the names at once, and
a registry imports only its own components, the first time it is read
(:meth:`pyro_sparse.registry.Registry.load`): a post-hoc ``prune`` never imports the SVI trainers.
The modules named here define their classes and register nothing themselves, so importing any
one of them has no effect on the registries.
"""

from __future__ import annotations

import importlib

__all__ = ["register_builtins", "BUILTIN", "names"]

#: registry kind -> {name: "module:attr"}, in the order they are listed (a rule's attr is its class,
#: registered as an instance)
BUILTIN = {
    "prior": {
        "gaussian": "pyro_sparse.priors:Gaussian", "gaussian_gamma": "pyro_sparse.priors:GaussianGamma",
        "log_uniform": "pyro_sparse.priors:LogUniform", "group_log_uniform": "pyro_sparse.priors:GroupLogUniform",
        "horseshoe": "pyro_sparse.priors:Horseshoe",
    },
    "layer": {
        "linear": "pyro_sparse.layers:Linear", "conv2d": "pyro_sparse.layers:Conv2d",
        "conv1d": "pyro_sparse.layers:Conv1d", "relu": "pyro_sparse.layers:ReLU", "tanh": "pyro_sparse.layers:Tanh",
        "sigmoid": "pyro_sparse.layers:Sigmoid", "gelu": "pyro_sparse.layers:GELU",
        "flatten": "pyro_sparse.layers:Flatten", "dropout": "pyro_sparse.layers:Dropout",
        "maxpool2d": "pyro_sparse.layers:MaxPool2d", "avgpool2d": "pyro_sparse.layers:AvgPool2d",
        "lstm": "pyro_sparse.recurrent:LSTM", "gru": "pyro_sparse.recurrent:GRU",
        "embedding": "pyro_sparse.recurrent:Embedding", "onehot": "pyro_sparse.recurrent:OneHot",
        "last_step": "pyro_sparse.recurrent:LastStep", "layernorm": "pyro_sparse.transformer:LayerNorm",
        "patch_embed": "pyro_sparse.transformer:PatchEmbed", "pos_embed": "pyro_sparse.transformer:PosEmbed",
        "class_token": "pyro_sparse.transformer:ClassToken", "token_pool": "pyro_sparse.transformer:TokenPool",
        "self_attention": "pyro_sparse.transformer:MultiHeadSelfAttention",
        "transformer_block": "pyro_sparse.transformer:TransformerBlock",
        "mixer_block": "pyro_sparse.transformer:MixerBlock",
        # layers with the interface of a torch module, what bayesian(module) converts it to
        "torch_lstm": "pyro_sparse.recurrent:TorchLSTM", "torch_gru": "pyro_sparse.recurrent:TorchGRU",
        "torch_multihead_attention": "pyro_sparse.transformer:TorchMultiheadAttention",
    },
    "likelihood": {
        "categorical": "pyro_sparse.likelihoods:Categorical", "bernoulli": "pyro_sparse.likelihoods:Bernoulli",
        "gaussian": "pyro_sparse.likelihoods:Gaussian",
        "sequence_categorical": "pyro_sparse.likelihoods:SequenceCategorical",
    },
    "guide": {
        "meanfield": "pyro_sparse.guides:MeanFieldGuide", "delta": "pyro_sparse.guides:DeltaGuide",
        "structured": "pyro_sparse.structured_guides:StructuredGuide",
        "lowrank": "pyro_sparse.structured_guides:LowRankGuide",
    },
    "fitting method": {
        "svi": "pyro_sparse.fitting:SVITrainer", "laplace": "pyro_sparse.laplace.trainer:LaplaceTrainer",
        "svi_bmr": "pyro_sparse.iterative:IterativeBMRTrainer",
    },
    "reduction rule": {
        "bmr": "pyro_sparse.reduction.rules:BMR", "savage-dickey": "pyro_sparse.reduction.rules:SavageDickey",
        "spike-slab": "pyro_sparse.reduction.rules:SpikeSlab", "log-alpha": "pyro_sparse.reduction.rules:LogAlpha",
        "opd": "pyro_sparse.reduction.rules:OPD", "magnitude": "pyro_sparse.reduction.rules:Magnitude",
        "random": "pyro_sparse.reduction.rules:Random", "group-log-alpha": "pyro_sparse.reduction.rules:GroupLogAlpha",
        "horseshoe-scale": "pyro_sparse.reduction.rules:HorseshoeScale",
    },
}


def names(kind: str) -> list[str]:
    """The built-in names of a registry kind, without importing anything (a module conversion's
    need the layer classes: ask the registry)."""
    return list(BUILTIN[kind])


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def register_builtins(registry):
    """Register the built-in components of ``registry`` (its ``kind`` names the table) under their
    names; a rule class is registered as an instance."""
    if registry.kind == "module conversion":  # no list of its own: every layer that declares torch_types
        for name, target in BUILTIN["layer"].items():
            obj = _resolve(target)
            if getattr(obj, "torch_types", ()):
                registry.register(obj, name)
        return
    for name, target in BUILTIN.get(registry.kind, {}).items():
        obj = _resolve(target)
        if registry.kind == "reduction rule" and isinstance(obj, type):
            obj = obj()
        registry.register(obj, name)
