"""Masked fine-tuning: retrain the weights a reduction kept, the pruned ones held at exactly 0.

After one-shot pruning a few epochs on the MAP objective recover much of what the removed weights
did (Han et al. 2015; Dhahri et al. 2024 fine-tune after OPD). Used by post-hoc pruning
(:func:`pyro_sparse.posthoc.prune`) and by the SpaM trainer's ``pruned()``.
"""

from __future__ import annotations

import torch

from .data import index_batches
from .descent import descend

__all__ = ["apply_masks", "masked_fine_tune"]


@torch.no_grad()
def apply_masks(model, masks):
    """Zero the masked-out parameters of ``model`` in place (names as in ``model.named_parameters()``)."""
    for name, p in model.named_parameters():
        if name in masks:
            p.mul_(masks[name].to(p.dtype))
    return model


def masked_fine_tune(model, masks, x, y, likelihood, prior=None, epochs=5, batch_size=64, lr=1e-3, generator=None):
    """Retrain the kept weights of ``model`` in place on the MAP objective, the pruned ones held at 0.

    ``(x, y)``: tensors, or ``x`` an iterable of ``(x, y)`` batches (a ``DataLoader``) and ``y``
    None; ``likelihood`` a :class:`~pyro_sparse.likelihoods.Likelihood`. Parameters that do not
    require gradients stay as they are. Adam, through the library's one optimiser loop
    (:func:`~pyro_sparse.descent.descend`), on
    ``-(N/|B|) sum log p(y | f(x)) + 0.5 sum_i delta_i theta_i^2`` (``delta`` from
    ``prior``, fixed; no prior term with ``prior=None``). The masked weights start at 0, their
    gradients are multiplied by the mask before every step (so Adam's moments stay 0 for them),
    and the mask is re-applied after every step, so they are exactly 0 at the end.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "epochs" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} int, "
                             f"got {name}={value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0, got lr={lr!r}")
    apply_masks(model, masks)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    keep = {name: masks[name].to(p.dtype) for name, p in params.items() if name in masks}
    deltas = {} if prior is None else {name: d.detach() for name, d in prior.precision_dict().items()
                                       if name in params}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    if torch.is_tensor(x):
        n = x.shape[0]
        batch_size = min(batch_size, n)

        def epoch_batches():
            return ((x[idx], y[idx]) for idx in index_batches(n, batch_size, generator, device=x.device))
    else:  # an iterable of (x, y) batches (a DataLoader), in its own order
        n = len(x.dataset) if hasattr(x, "dataset") else sum(len(b[0]) for b in x)

        def epoch_batches():
            return ((item[0], item[1]) for item in x)

    def loss_of(batch):
        xb, yb = batch
        loss = -(n / len(xb)) * likelihood.log_likelihood(model(xb), yb)
        for name, delta in deltas.items():
            loss = loss + 0.5 * (delta * params[name].square()).sum()
        return loss

    def masked_gradients():
        for name, m in keep.items():
            params[name].grad.mul_(m)

    def fault(what, b, loss):
        return FloatingPointError(f"masked fine-tune: non-finite {what} at step {b + 1} of an epoch; lower lr "
                                  f"(now {lr:g})")

    model.train()
    for _ in range(epochs):  # the library's one optimiser loop, the mask as its hooks
        descend(loss_of, epoch_batches(), optimizer, list(params.values()), after_backward=masked_gradients,
                after_step=lambda: apply_masks(model, masks), fault=fault)
    model.eval()
    return model
