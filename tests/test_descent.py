"""The one optimiser loop (pyro_sparse.descent.descend): clipping, the check before the update,
the hooks, and the same step whether the check reads the host or a device flag."""

import math

import pytest
import torch

from pyro_sparse.descent import descend


def _setup(value=(3.0, 4.0)):
    p = torch.nn.Parameter(torch.tensor(value))
    return p, torch.optim.SGD([p], lr=1.0)


@pytest.mark.parametrize("check_host", [True, False])
def test_the_gradient_is_clipped_to_the_given_norm(check_host):
    p, opt = _setup()
    # loss = 10 * (p . u) with |u| = 1: gradient norm 10, clipped to 2 -> a step of length 2 along -u
    u = torch.tensor([0.6, 0.8])
    total, first_bad = descend(lambda _: 10 * (p * u).sum(), [0], opt, [p], clip=2.0, check_host=check_host)
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 4.0]) - 2.0 * u)
    assert float(first_bad) == -1 and float(total) == pytest.approx(10 * 5.0)


def test_no_clip_leaves_the_gradient_alone():
    p, opt = _setup()
    descend(lambda _: 10 * p.sum(), [0], opt, [p], clip=None)
    torch.testing.assert_close(p.detach(), torch.tensor([-7.0, -6.0]))


def test_a_nonfinite_step_is_refused_before_its_update():
    p, opt = _setup()
    calls = []

    def loss_of(b):
        calls.append(b)
        return p.sum() * (math.inf if b == 1 else 1.0)

    with pytest.raises(FloatingPointError, match="step 2"):
        descend(loss_of, [0, 1, 2], opt, [p])
    torch.testing.assert_close(p.detach(), torch.tensor([2.0, 3.0]))  # the first step only
    assert calls == [0, 1]


def test_on_the_device_flag_the_first_faulty_batch_is_returned():
    p, opt = _setup()
    _, first_bad = descend(lambda b: p.sum() * (math.nan if b == 2 else 1.0), range(4), opt, [p],
                           check_host=False)
    assert float(first_bad) == 2


def test_hooks_run_after_backward_and_after_the_step_and_a_divergent_loss_is_a_fault():
    p, opt = _setup()
    seen = []
    descend(lambda _: (p * p).sum(), [0], opt, [p], after_backward=lambda: seen.append(p.grad.clone()),
            after_step=lambda: seen.append(p.detach().clone()))
    torch.testing.assert_close(seen[0], torch.tensor([6.0, 8.0]))
    torch.testing.assert_close(seen[1], torch.tensor([-3.0, -4.0]))
    with pytest.raises(OverflowError, match="above"):
        descend(lambda _: (p * p).sum(), [0], opt, [p], limit=1.0,
                divergent=lambda value, b: OverflowError(f"{value} above the limit"))
