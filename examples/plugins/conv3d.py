"""A Bayesian 3-D convolution in one class: a plugin.

Everything a convolution needs -- the local reparameterisation of its pre-activations
(:func:`~pyro_sparse.local_reparam.gaussian_conv`), shapes and their errors, conversion of a
``torch.nn.Conv3d``, the compaction protocol and the Laplace curvature (the N-d ``CONV``
backend) -- lives in :class:`pyro_sparse.layers.ConvNd`; a new dimension names itself.

Use it from a model spec (``--allow-code`` on the command line)::

    plugins: [examples/plugins/conv3d.py]
    input_shape: [1, 4, 8, 8]
    layers:
      - {type: conv3d, out: 4, kernel_size: 3, padding: 1}
"""

from torch import nn

from pyro_sparse.layers import ConvNd


class Conv3d(ConvNd):
    """Bayesian 3-D convolution over ``(channels, depth, height, width)``; weight (out, in, kd, kh, kw)."""

    spec_name = "conv3d"
    dims = 3
    torch_cls = nn.Conv3d
    torch_types = (nn.Conv3d,)
