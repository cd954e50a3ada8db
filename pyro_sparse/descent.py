"""The one optimiser loop of the library: gradient steps over batches, with the checks every fit needs.

Every fit takes its gradient steps here -- SVI's ELBO steps and the MAP steps of SpaM
(:class:`~pyro_sparse.fitting.SVITrainer`, :class:`~pyro_sparse.laplace.trainer.LaplaceTrainer`,
iterative BMR), the pretraining of a deterministic twin, the masked fine-tune after pruning
(:mod:`pyro_sparse.finetune`) and the prior-precision steps of the Laplace marginal likelihood
(:func:`~pyro_sparse.laplace.marglik.optimize_prior_precision`). One step is

    loss = loss_of(batch); loss.backward(); after_backward(); norm = ||grad||; clip; check;
    optimizer.step(); after_step()

The check happens *before* the optimiser applies the update: on the CPU the loss and the gradient
norm are read on the host at every step (a cheap read) and a non-finite value, or a loss above
``limit``, raises the caller's fault at that step; on an accelerator a device-side flag records
the first faulty batch and is read with the epoch's loss (one host synchronisation per epoch).
Differences between callers are hooks (``after_backward``: gradient averaging over ranks, a mask;
``after_step``: re-applying a mask), never copies of the loop.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NonFiniteStep", "descend", "total_norm"]


class NonFiniteStep(FloatingPointError):
    """A NaN/inf loss or gradient at one optimisation step (caught and recovered by ``fit``).

    ``text`` replaces the standard message, e.g. for a fault a trainer could only see at the
    end of an epoch."""

    def __init__(self, what: str, step: int, epoch: int, batch: int, batches: int, text: str | None = None):
        self.what, self.step, self.epoch, self.batch = what, step, epoch, batch
        super().__init__(text or f"non-finite {what} at step {step} (epoch {epoch}, batch {batch} of {batches})")


def total_norm(grads: list) -> torch.Tensor:
    """``torch.nn.utils.get_total_norm(grads)`` (the 2-norm of all gradients as one vector), by
    the same kernels (``_foreach_norm``, ``stack``, ``vector_norm``) without its grouping
    overhead when every gradient is on one device with one dtype."""
    if grads and all(g.device == grads[0].device and g.dtype == grads[0].dtype for g in grads):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    return torch.nn.utils.get_total_norm(grads)


def _plain_fault(what, b, loss):
    return FloatingPointError(f"non-finite {what} at step {b + 1}")


def descend(
    loss_of,
    batches,
    optimizer,
    params,
    *,
    clip=None,
    check_host=True,
    check_loss=True,
    limit=None,
    after_backward=None,
    after_step=None,
    fault=None,
    divergent=None,
    record=False,
):
    """Take one optimiser step per item of ``batches`` on ``loss_of(item)`` (a scalar tensor).

    Args:
        params: the parameters the optimiser updates (their gradients are zeroed, measured and
            clipped here).
        clip: the largest gradient norm (None or 0: no clipping); the norm is measured either way,
            as the finiteness check of the step.
        check_host: decide on the host at every step (CPU); else record the first faulty batch on
            the device and return it (the update of a faulty step then still happens: the caller
            discards the epoch).
        check_loss: whether the loss itself is checked (data-parallel, only the averaged gradient
            norm is the same on every rank).
        limit: a finite loss above this is a fault too (divergence).
        after_backward, after_step: hooks called after ``backward()`` and after ``optimizer.step()``.
        fault: ``fault(what, b, loss) -> exception`` for a non-finite loss or gradient at batch ``b``
            (``what`` is ``"loss"`` or ``"gradient"``); ``divergent(value, b) -> exception`` for a loss
            above ``limit``.
        record: also return the list of the steps' (detached) losses.

    Returns ``(total, first_bad)`` -- the sum of the losses (a detached device tensor) and the index
    of the first faulty batch as a device tensor (-1 if none; only meaningful without
    ``check_host``) -- and with ``record`` the list of losses.
    """
    fault = fault or _plain_fault
    total, first_bad, losses = None, None, []
    for b, batch in enumerate(batches):
        for p in params:  # optimizer.zero_grad(set_to_none=True), without its per-call overhead
            p.grad = None
        loss = loss_of(batch)
        loss.backward()
        if after_backward is not None:
            after_backward()
        stepped = [p for p in params if p.grad is not None]
        grads = [p.grad for p in stepped]
        norm = total_norm(grads) if grads else torch.zeros((), device=loss.device)
        loss = loss.detach()
        if check_host:  # CPU: host reads are free, decide here, before the update
            value = float(norm)
            # clip_grad_norm_ multiplies every gradient by min(clip / (norm + 1e-6), 1) so as not to
            # read the norm on the host; skipping a factor surely equal to 1 saves a pass over every
            # gradient (the same update, bit for bit)
            if clip and not (value + 1e-6) * (1 + 1e-6) < clip:
                torch.nn.utils.clip_grads_with_norm_(stepped, clip, norm)  # parameters: it scales their .grad
            local = float(loss) if check_loss else 0.0
            if not (math.isfinite(value) and math.isfinite(local)):
                raise fault("loss" if not math.isfinite(local) else "gradient", b, loss)
            if limit is not None and check_loss and local > limit:
                raise divergent(local, b)
        else:
            if clip:
                torch.nn.utils.clip_grads_with_norm_(stepped, clip, norm)  # parameters: it scales their .grad
            ok = torch.isfinite(norm) & torch.isfinite(loss) if check_loss else torch.isfinite(norm)
            if limit is not None and check_loss:
                ok = ok & (loss <= limit)
            bad = torch.where(ok, -1.0, float(b))
            first_bad = bad if first_bad is None else torch.where((first_bad < 0) & (bad >= 0), bad, first_bad)
        optimizer.step()
        if after_step is not None:
            after_step()
        total = loss if total is None else total + loss
        if record:
            losses.append(loss)
    if total is None:
        total = torch.zeros(())
    if first_bad is None:
        first_bad = torch.full((), -1.0, device=total.device)
    return (total, first_bad, losses) if record else (total, first_bad)
