r"""Character-level language modelling: a text corpus as sequences, its likelihood and metrics.

* :func:`load_text` reads a user's UTF-8 text file (``--data PATH.txt``) into a
  :class:`~pyro_sparse.data.Dataset` of non-overlapping sequences: inputs are character ids
  :math:`x_{1..T}`, targets the next characters :math:`y_t = x_{t+1}`. The first
  ``1 - valid_fraction`` of the text trains, the rest is held out; the vocabulary is built from
  the training text only. Options come from the model spec's ``data:`` section::

      data: {sequence_length: 100, valid_fraction: 0.1, max_vocab: null}

* :class:`SequenceCategorical` (``likelihood: sequence_categorical``) observes every position:
  the data plate runs over sequences (size N, subsampled to the mini-batch, so the data term
  is scaled by N/B) and the T per-step categorical observations of a sequence sit inside it as
  one event, :math:`\log p(y_n \mid x_n, w) = \sum_t \log p(y_{nt} \mid x_{n,\le t}, w)`.
  The ELBO's data term is therefore the log-likelihood of all N*T training characters.
* :func:`evaluate_sequences` reports per-character figures: accuracy, NLL (nats) and bits per
  character, :math:`\mathrm{BPC} = \mathrm{NLL}/\ln 2`, with the posterior predictive
  :math:`-\frac1{NT}\sum_n \log \frac1S\sum_s p(y_n\mid x_n, w_s)` (Graves 2013).
"""

from __future__ import annotations

import math
import os
from collections import Counter

import pyro.distributions as dist
import torch

from .data import Dataset
from .errors import DataError, SpecError
from .likelihoods import Categorical, categorical_log_likelihood, register_likelihood
from .schema import Field, validate

__all__ = ["TEXT_FIELDS", "UNKNOWN", "load_text", "SequenceCategorical", "evaluate_sequences"]

#: options of the spec's ``data:`` section for a text corpus
TEXT_FIELDS = {
    "sequence_length": Field("int", 100, positive=True, doc="characters per training sequence"),
    "valid_fraction": Field("float", 0.1, positive=True, doc="trailing fraction of the text held out"),
    "max_vocab": Field("int", None, positive=True, allow_none=True,
                       doc="keep the most frequent training characters; the rest map to <unk>"),
}
#: the token that stands for characters outside the vocabulary
UNKNOWN = "<unk>"


def load_text(path: str, sequence_length: int = 100, valid_fraction: float = 0.1, max_vocab=None) -> Dataset:
    """A character corpus from a UTF-8 text file, as next-character prediction sequences.

    Returns a :class:`~pyro_sparse.data.Dataset` with ``task='sequence'``: ``x`` (N, T) float
    character ids, ``y`` (N, T) long next-character ids, ``num_outputs`` the vocabulary size,
    ``extras = {"vocabulary": [...], "sequence_length": T, "train_characters": .., "test_characters": ..}``.
    An ``<unk>`` token is added (last id) only if some held-out or rare character needs it.
    """
    options = validate(TEXT_FIELDS, {"sequence_length": sequence_length, "valid_fraction": valid_fraction,
                                     "max_vocab": max_vocab}, "data", None)
    seq, frac = options["sequence_length"], options["valid_fraction"]
    if frac >= 1:
        raise SpecError(f"expected a fraction in (0, 1), got {frac!r}", None, "data.valid_fraction")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    split = int(round(len(text) * (1 - frac)))
    train, valid = text[:split], text[split:]
    for part, chars in (("training", train), ("held-out", valid)):
        if len(chars) < seq + 1:
            raise DataError(f"{path}: the {part} part has {len(chars)} characters, fewer than "
                            f"sequence_length + 1 = {seq + 1} (file has {len(text)} characters, "
                            f"valid_fraction {frac})")
    counts = Counter(train)
    chars = sorted(counts, key=lambda c: (-counts[c], c))
    if options["max_vocab"] is not None:
        chars = chars[: options["max_vocab"]]
    chars = sorted(chars)
    needs_unknown = len(chars) < len(counts) or any(c not in counts for c in set(valid))
    vocabulary = chars + ([UNKNOWN] if needs_unknown else [])
    index = {c: i for i, c in enumerate(chars)}
    unk = len(chars)

    def encode(s):
        return torch.tensor([index.get(c, unk) for c in s], dtype=torch.long)

    def sequences(ids):
        n = (len(ids) - 1) // seq
        x = ids[: n * seq].view(n, seq)
        y = ids[1: n * seq + 1].view(n, seq)
        return x.to(torch.float32), y

    x_train, y_train = sequences(encode(train))
    x_test, y_test = sequences(encode(valid))
    return Dataset(os.path.basename(path), x_train, y_train, x_test, y_test, "sequence", len(vocabulary),
                   extras={"vocabulary": vocabulary, "sequence_length": seq,
                           "train_characters": y_train.numel(), "test_characters": y_test.numel()})


@register_likelihood("sequence_categorical")
class SequenceCategorical(Categorical):
    """``y_t ~ Categorical(softmax(f(x)_t))`` at every position of a sequence (language models).

    The network outputs logits (B, T, V); ``y`` is (B, T). The data plate is over sequences and
    the T positions form the event, so the mini-batch scale N/B multiplies whole sequences.
    """

    task = "sequence"
    fields = {}

    def output_shape(self, num_outputs, shape):
        if len(shape) != 2:
            raise ValueError(f"sequence_categorical needs per-step outputs (time, {num_outputs}), "
                             f"got shape {list(shape)}; set return_sequence: true on the recurrent layer")
        return (shape[0], num_outputs)

    def distribution(self, output):
        return dist.Categorical(logits=output).to_event(1)

    def pointwise_log_likelihood(self, outputs, y):
        """Per-sequence log-likelihood sum_t log p(y_t | ...): (S, B, T, V) outputs -> (S, B)."""
        return self.token_log_likelihood(outputs, y).sum(-1)

    @staticmethod
    def token_log_likelihood(outputs, y):
        """log p(y_t | ...) at every position: (S, B, T, V) outputs -> (S, B, T)."""
        return categorical_log_likelihood(outputs, y)


@torch.no_grad()
def evaluate_sequences(network, guide, x, y, num_samples=10, batch_size=256) -> dict:
    """Per-character accuracy, NLL (nats) and bits per character of the posterior predictive.

    ``test_nll = -(1/(N T)) sum_n log (1/S) sum_s p(y_n | x_n, w_s)`` (sequence-level predictive),
    ``test_bpc = test_nll / ln 2``; accuracy of the predictive mean's argmax per character.
    """
    from .guides import DeltaGuide

    if isinstance(guide, DeltaGuide):
        num_samples = 1
    lik = network.likelihood
    correct, nll, count = 0.0, 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        outputs = network.sample_outputs(xb, guide, num_samples)
        nll -= lik.log_predictive(outputs, yb).sum().item()
        correct += (lik.predictive_mean(outputs).argmax(-1) == yb).sum().item()
        count += yb.numel()
    nll /= count
    return {"test_accuracy": correct / count, "test_nll": nll, "test_bpc": nll / math.log(2)}


def bits_per_character(network, values, x, y, batch_size=256) -> float:
    """BPC of the network with every latent site fixed to ``values`` (e.g. masked posterior means)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            out = network.point_outputs(xb, values)
            total -= SequenceCategorical.token_log_likelihood(out, yb).sum().item()
            count += yb.numel()
    return total / count / math.log(2)
