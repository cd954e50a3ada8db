"""Held-out figures of a classifier from its outputs: accuracy, NLL and expected calibration error.

All functions take network outputs (logits) stacked over posterior draws, shape ``(S, B, C)``
(``S = 1`` for a point estimate), and integer labels ``(B,)``. The predictive distribution is
the average of the per-draw softmax, :math:`\\bar p(c \\mid x) = \\frac1S \\sum_s
\\mathrm{softmax}(f_s(x))_c`.
"""

from __future__ import annotations

import math

import torch

ECE_BINS = 15


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    r"""Expected calibration error with equal-width confidence bins (Guo et al. 2017, eq. 3).

    .. math:: \mathrm{ECE} = \sum_{b=1}^{M} \frac{|B_b|}{n}\,\bigl|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\bigr|,

    where the confidence of a prediction is its largest class probability, bin :math:`B_b` holds
    the predictions with confidence in :math:`((b-1)/M, b/M]` (the first bin also holds 0),
    acc is the fraction of correct predictions in the bin and conf their mean confidence.

    Args:
        probs: predictive class probabilities ``(n, C)`` (rows sum to 1).
        y: labels ``(n,)``.
        bins: M, the number of bins (15, as in Guo et al.).
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins: must be a positive integer, got {bins!r}")
    if probs.dim() != 2 or y.shape != probs.shape[:1]:
        raise ValueError(f"probs: expected shape (n, C) matching y {tuple(y.shape)}, got {tuple(probs.shape)}")
    conf, pred = probs.max(-1)
    correct = (pred == y).to(probs.dtype)
    # bin index b - 1 for conf in ((b-1)/M, b/M]; conf = 0 goes to the first bin
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    acc = torch.zeros(bins, dtype=probs.dtype).index_add_(0, index, correct)
    cnf = torch.zeros(bins, dtype=probs.dtype).index_add_(0, index, conf)
    return float((acc - cnf).abs().sum() / len(y))


@torch.no_grad()
def classification_metrics(outputs: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """``{"accuracy", "nll", "ece"}`` of logits ``(S, B, C)`` (or ``(B, C)``, one draw).

    NLL is :math:`-\\frac1B\\sum_n \\log \\frac1S \\sum_s p(y_n \\mid f_s(x_n))`; accuracy and ECE
    are those of the averaged predictive :math:`\\bar p`.
    """
    if outputs.dim() == 2:
        outputs = outputs.unsqueeze(0)
    outputs = outputs.double()
    logp = torch.log_softmax(outputs, -1)  # (S, B, C)
    log_mean = torch.logsumexp(logp, 0) - math.log(outputs.shape[0])  # (B, C) log predictive
    nll = -log_mean.gather(-1, y.long().unsqueeze(-1)).mean().item()
    probs = log_mean.exp()
    return {"accuracy": (probs.argmax(-1) == y).double().mean().item(), "nll": nll,
            "ece": expected_calibration_error(probs, y.long(), bins)}
