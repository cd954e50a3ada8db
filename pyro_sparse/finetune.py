"""Masked fine-tuning: retrain the weights a reduction kept, the pruned ones held at exactly 0.

After one-shot pruning a few epochs on the MAP objective recover much of what the removed weights
did (Han et al. 2015; Dhahri et al. 2024 fine-tune after OPD). Used by post-hoc pruning
(:func:`pyro_sparse.posthoc.prune`) and by the SpaM trainer's ``pruned()``.
"""

from __future__ import annotations

import torch

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
    None; ``likelihood`` a :class:`~pyro_sparse.likelihoods.Likelihood`. Parameters that do not require gradients stay as they are. Adam on
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
            perm = torch.randperm(n, generator=generator).to(x.device)
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                yield x[idx], y[idx]
    else:  # an iterable of (x, y) batches (a DataLoader), in its own order
        n = len(x.dataset) if hasattr(x, "dataset") else sum(len(b[0]) for b in x)

        def epoch_batches():
            for item in x:
                yield item[0], item[1]
    model.train()
    for _ in range(epochs):
        for xb, yb in epoch_batches():
            loss = -(n / len(xb)) * likelihood.log_likelihood(model(xb), yb)
            for name, delta in deltas.items():
                loss = loss + 0.5 * (delta * params[name].square()).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for name, m in keep.items():
                params[name].grad.mul_(m)
            optimizer.step()
            apply_masks(model, masks)
    model.eval()
    return model
