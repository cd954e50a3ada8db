"""pyro-sparse: Bayesian sparsification of neural networks, written as Pyro models."""

__version__ = "0.1.0"
