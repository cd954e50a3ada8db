"""A Bayesian network: layers with priors, composed with a likelihood, as a Pyro model.

``net.model(x, y, dataset_size=N)`` is the Pyro model: every Bayesian layer emits its
sample sites (``fc1.weight``, ...) and the likelihood observes ``y`` in the data plate.
``net(x)`` runs the layers only and returns the network output (logits, means).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict

import pyro.poutine as poutine
import torch
from torch import nn

from .evaluation import evaluation_mode
from .layers import Layer, Reshape, site_name
from .likelihoods import Likelihood, build_likelihood
from .local_reparam import LocalReparameterization


class PyroNetwork(nn.Module):
    """What the rest of the library reads from a Bayesian network, whatever its structure.

    A network has a :attr:`likelihood`, an optional per-example :attr:`input_shape` (inputs are
    reshaped to it), Bayesian layers (:meth:`bayesian_layers`, each a
    :class:`~pyro_sparse.layers.Layer` whose ``site`` names its sample sites), and

    * ``forward(x)``: the network output (logits, means) with parameters drawn from the priors
      (or, inside a guide's replay, from the posterior);
    * :meth:`model`: the Pyro model ``p(y, w | x)``;
    * :meth:`deterministic`: its deterministic twin, a plain ``torch.nn`` module holding given
      parameter values, with parameters named like the sample sites;
    * :meth:`unit_chains`: the sequential runs of layers whose units compaction may delete
      (:func:`pyro_sparse.rebuild.compact`).

    Two kinds exist: :class:`BayesianNetwork` (a sequential layer list, what specs build) and
    :class:`~pyro_sparse.convert.BayesianModule` (any ``torch.nn.Module`` converted by
    :func:`~pyro_sparse.convert.bayesian`).
    """

    likelihood: Likelihood
    input_shape = None

    # ------------------------------------------------------------------ structure
    def bayesian_layers(self):
        """(name, layer) for layers that own sample sites."""
        raise NotImplementedError

    def param_sites(self):
        """Site name -> (layer, parameter name, prior) for every layer parameter. The layer is the
        leaf that owns the site (``block1.attn.q`` for ``block1.attn.q.weight``; see ``Layer.leaves``)."""
        return {site_name(leaf.site, p): (leaf, p, prior) for _, l in self.bayesian_layers() for leaf in l.leaves()
                for p, prior in leaf.priors().items()}

    def num_weights(self) -> int:
        """Number of network parameters (weights and biases), the quantity pruning reduces."""
        return sum(math.prod(s) for _, l in self.bayesian_layers() for s in l.param_shapes().values())

    def start_at(self, values: dict):
        """Start every Bayesian layer at given parameter values (site -> tensor, e.g. a trained
        network's weights or a previous run's posterior means; :meth:`~pyro_sparse.layers.Layer.start_at`).
        Sites not in ``values`` keep their starting values; a name that is no site is an error."""
        sites = self.param_sites()
        unknown = sorted(set(values) - set(sites))
        if unknown:
            raise ValueError(f"no such parameter site(s): {unknown[:5]}; the sites are {sorted(sites)[:8]}...")
        for site, (layer, param, _) in sites.items():
            if site in values:
                layer.start_at({param: values[site]})
        return self

    def starting_values(self) -> dict:
        """Site -> the starting value of every layer parameter (where a guide's means start)."""
        return {site: getattr(layer, f"{param}_init") for site, (layer, param, _) in self.param_sites().items()}

    def twin_values(self, twin: nn.Module) -> dict:
        """Site -> value read off a deterministic twin (after training it, e.g.): the inverse of
        :meth:`deterministic`. Here the twin's parameters named like the sites; ValueError where
        a site has no such parameter (a recurrent layer's twin folds its parameters)."""
        params = dict(twin.named_parameters())
        missing = [site for site in self.param_sites() if site not in params]
        if missing:
            raise ValueError(f"the deterministic network has no parameters named like the sites {missing[:3]}")
        return {site: params[site].detach().clone() for site in self.param_sites()}

    def frozen_parameters(self) -> dict:
        """Name -> number of elements of every parameter left deterministic (frozen: not a random
        variable of the model, not sparsified, counted apart from the weights in every sparsity
        figure). Empty for a spec-built network."""
        return {}

    def frozen_state(self) -> dict:
        """The state of the network's deterministic parts -- the frozen parameters and buffers of a
        converted module's other modules (batch-norm running statistics, ...) -- as a ``state_dict``:
        what a checkpoint keeps besides the guide, since fitting in training mode updates running
        statistics. Empty for a spec-built network (its parameter-free layers hold no state)."""
        return {}

    def load_frozen_state(self, state: dict):
        """Load :meth:`frozen_state` (from a checkpoint, or read off a trained deterministic twin
        with :meth:`twin_frozen_state`); ValueError naming the keys that do not fit."""
        if state:
            raise ValueError(f"{type(self).__name__} has no deterministic state; got keys {sorted(state)[:3]}")

    def twin_frozen_state(self, twin: nn.Module) -> dict:
        """:meth:`frozen_state` read off a deterministic twin (after training it: pretraining
        updates the batch norms' statistics and parameters too)."""
        return {}

    def unit_chains(self, input_shape=None) -> list:
        """``[(path, chain)]``: sequential runs of layers for the unit-chain algorithm of
        compaction; ``chain`` has ``layers`` (name -> layer) and ``input_shape``, and ``path`` is
        the submodule of the deterministic twin the compact chain replaces ('' for the twin)."""
        return []

    # ------------------------------------------------------------------ model
    def _reshape(self, x):
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            x = x.reshape(x.shape[0], *self.input_shape)
        return x

    def model(self, x, y=None, dataset_size=None, subsample=None):
        """The Pyro model p(y, w | x) = p(w) prod_n p(y_n | f(x_n; w))."""
        output = self(x)
        self.likelihood.observe(output, y, dataset_size, subsample)
        return output

    def elbo_loss(self, guide, x, y, num_data: int, kl_weight: float = 1.0) -> torch.Tensor:
        r"""The negative ELBO of a mini-batch as a differentiable loss, for a training loop of your own:

        .. math:: \text{loss} = \beta\,\mathrm{KL}(q \,\|\, p) - \frac{N}{B}\sum_{b=1}^{B} \log p(y_b \mid x_b, w),
                  \quad w \sim q

        (``N = num_data``, ``B = len(x)``, ``beta = kl_weight``, the KL warm-up factor), one
        Monte Carlo draw, computed by the ELBO core (:class:`~pyro_sparse.elbo.CoreELBO`: closed-form
        KL terms, local reparameterisation of every layer that allows it), the estimate
        :class:`~pyro_sparse.fitting.SVITrainer` minimises. The variational parameters live in
        ``guide`` (``MeanFieldGuide(net.model)``; set it up first, ``guide.setup(x, y)``, so that
        ``guide.parameters()`` exist for the optimiser). The network runs in its current mode:
        ``net.train()`` while training (dropout on, batch norms on batch statistics), predictions
        (:meth:`sample_outputs`) evaluate. ``net.last_elbo_terms`` holds the batch's detached
        ``{"loglik", "kl"}`` (the scaled log-likelihood and the KL) afterwards::

            for x, y in loader:
                loss = net.elbo_loss(guide, x, y, num_data=len(loader.dataset))
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        """
        from .elbo import CoreELBO

        elbo = self.__dict__.get("_own_loop_elbo")
        if elbo is None:
            elbo = self.__dict__["_own_loop_elbo"] = CoreELBO()
        elbo.kl_weight = float(kl_weight)
        loss = elbo.differentiable_loss(self, guide, x, y, dataset_size=num_data)
        self.__dict__["last_elbo_terms"] = elbo.last_terms
        return loss

    # ------------------------------------------------------------------ predictions
    @torch.no_grad()
    def sample_outputs(self, x, guide, num_samples=10, local_reparam=True):
        """Network outputs under ``num_samples`` posterior draws: tensor (S, B, ...), in evaluation
        mode (:class:`evaluation_mode`) whatever mode the network is in.

        Pre-activations are drawn with local reparameterisation (each test point gets its own
        draw, which leaves every per-point predictive distribution unchanged).
        """
        outputs = []
        with evaluation_mode(self):
            for _ in range(num_samples):
                with LocalReparameterization() if local_reparam else _null():
                    guide_trace = poutine.trace(guide).get_trace(x)
                    outputs.append(poutine.replay(self, trace=guide_trace)(x))
        return torch.stack(outputs)

    @torch.no_grad()
    def point_outputs(self, x, values: dict):
        """Network outputs with every latent site fixed to ``values`` (e.g. posterior means), in
        evaluation mode."""
        with evaluation_mode(self):
            return poutine.condition(self, data=values)(x)

    def deterministic(self, params: dict[str, torch.Tensor]) -> nn.Module:
        """The deterministic twin holding ``params`` (site -> tensor), in evaluation mode (call
        ``.train()`` on it to train it)."""
        raise NotImplementedError


def check_input_shape(input_shape):
    """``input_shape`` as a tuple of positive ints (or None); ValueError otherwise."""
    if input_shape is None:
        return None
    try:
        input_shape = tuple(input_shape)
    except TypeError:
        input_shape = None, input_shape
    if not input_shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape):
        raise ValueError(f"input_shape must be a sequence of positive integers, got {input_shape!r}")
    return input_shape


class BayesianNetwork(PyroNetwork):
    """Sequential Bayesian network.

    Args:
        layers: a list of :class:`~pyro_sparse.layers.Layer` or ``(name, layer)`` pairs.
            Unnamed layers get ``fc1, fc2, conv1, relu1, ...``; the name is the sample-site
            prefix.
        likelihood: a :class:`~pyro_sparse.likelihoods.Likelihood` or its spec name.
        input_shape: per-example input shape. Inputs are reshaped to it (so flat digits can
            feed a conv net declared with ``input_shape=(1, 8, 8)``).
    """

    def __init__(self, layers, likelihood="categorical", input_shape=None):
        super().__init__()
        named, counts = [], Counter()
        for item in layers:
            name, layer = item if isinstance(item, tuple) else (None, item)
            if not isinstance(layer, Layer):
                raise TypeError(f"expected a pyro_sparse layer, got {type(layer).__name__}")
            if name is None:
                counts[layer.prefix] += 1
                name = f"{layer.prefix}{counts[layer.prefix]}"
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"layer names must be non-empty strings without '.', got {name!r}")
            named.append((name, layer))
        names = [n for n, _ in named]
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique, got {names}")
        if not named:
            raise ValueError("expected at least one layer")
        try:
            self.layers = nn.ModuleDict(named)
        except KeyError as e:  # e.g. a name that is an attribute of nn.ModuleDict
            raise ValueError(f"invalid layer name: {e.args[0] if e.args else e}") from None
        for name, layer in self.layers.items():
            layer.site = name
        self.likelihood: Likelihood = build_likelihood(likelihood)
        self.input_shape = check_input_shape(input_shape)

    # ------------------------------------------------------------------ structure
    def bayesian_layers(self):
        """(name, layer) for layers that own sample sites."""
        return [(n, l) for n, l in self.layers.items() if l.priors()]

    def unit_chains(self, input_shape=None):
        """The whole network is one chain."""
        return [("", self)]

    # ------------------------------------------------------------------ model
    def forward(self, x):
        x = self._reshape(x)
        for layer in self.layers.values():
            x = layer(x)
        return x

    def deterministic(self, params: dict[str, torch.Tensor]) -> nn.Sequential:
        """The network's deterministic twin: a plain ``torch.nn.Sequential`` with the given layer
        parameters (site -> tensor), for MAP/Laplace training, point predictions and reduction.

        Its children are named like the layers (``fc1``, ``relu1``), after an ``input``
        :class:`~pyro_sparse.layers.Reshape` to ``input_shape`` when the network has one, so the
        parameters of Linear/Conv2d layers are named like their sample sites (``fc1.weight``).
        """
        modules = OrderedDict()
        if self.input_shape is not None:
            modules["input"] = Reshape(self.input_shape)
        for name, layer in self.layers.items():
            own = {p: params[f"{name}.{p}"] for p in layer.priors()}
            modules[name] = layer.deterministic(own)
        return nn.Sequential(modules).eval()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
