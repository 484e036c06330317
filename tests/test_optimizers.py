"""Server optimizers against torch.optim (an independent implementation) and hand formulas."""

import pytest
import torch

from policies.aggregation import weighted_mean
from policies.base import chain
from policies.optimizers import (
    diloco_outer,
    fedadam,
    server_adagrad,
    server_adam,
    server_momentum,
    server_yogi,
)
from tests.test_policies import updates

DELTAS = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.3, -0.4]),
          torch.tensor([-0.2, 0.0, 1.0])]


def steps_of(stage):
    """Steps of a server optimizer fed DELTAS one round after another."""
    state, out = stage.init(torch.zeros(3)), []
    for d in DELTAS:
        step, state = stage.update(d, state)
        out.append(step)
    return out


def torch_steps(make_opt):
    """Steps of a torch optimizer on x with gradient -delta (the FedOpt pseudo-gradient)."""
    x = torch.zeros(3, requires_grad=True)
    opt, out = make_opt([x]), []
    for d in DELTAS:
        before = x.detach().clone()
        x.grad = -d.clone()
        opt.step()
        out.append(x.detach() - before)
    return out


@pytest.mark.parametrize("ours, reference", [
    (server_momentum(lr=0.5, momentum=0.9),
     lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9)),
    (diloco_outer(lr=0.7, momentum=0.9),
     lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True)),
    (server_adam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3, bias_correction=True),
     lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.9, 0.99), eps=1e-3)),
    (server_adagrad(lr=0.1, tau=1e-3),
     lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-3, initial_accumulator_value=1e-6)),
])
def test_optimizers_match_torch_optim(ours, reference):
    for a, b in zip(steps_of(ours), torch_steps(reference), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_fedadam_is_the_chain_and_the_paper_formula():
    """FedAdam == chain(weighted_mean, server_adam) == Algorithm 2 of Reddi et al. by hand."""
    u = updates([[1.0, 2.0], [3.0, -2.0]], [10, 30])  # weighted mean (2.5, -1.0)
    a = fedadam(server_lr=0.1)
    b = chain(weighted_mean(), server_adam(lr=0.1))
    step_a, _ = a.update(u, a.init(torch.zeros(2)))
    step_b, _ = b.update(u, b.init(torch.zeros(2)))
    assert torch.equal(step_a, step_b)
    delta, tau = torch.tensor([2.5, -1.0]), 1e-3
    m = 0.1 * delta
    v = 0.99 * tau**2 + 0.01 * delta**2
    assert torch.allclose(step_a, 0.1 * m / (v.sqrt() + tau), rtol=1e-6)


def test_yogi_second_moment_by_hand():
    tau, d = 1e-3, DELTAS[0]
    v = tau**2 - 0.01 * d**2 * torch.sign(tau**2 - d**2)
    step, _ = server_yogi(lr=0.1, tau=tau).update(d, server_yogi().init(torch.zeros(3)))
    assert torch.allclose(step, 0.1 * (0.1 * d) / (v.sqrt() + tau), rtol=1e-6)
