"""recovery/optim.py: RecoveryAdamW is AdamW bit for bit when no group is flagged; a `layer-sgd` group moves each
weight along its momentum, scaled so the layer's RMS move is the learning rate; its state resumes exactly."""

from __future__ import annotations

import torch

from edge_recover.recovery.optim import RecoveryAdamW


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 8, generator=g)), torch.nn.Parameter(torch.randn(8, generator=g))]


def _grads(step: int, params):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _run(opt_cls, flag: bool, steps: int, params=None, opt=None):
    params = params or _params()
    groups = [{"params": [params[0]], "lr": 1e-2}, {"params": [params[1]], "lr": 3e-3}]
    if flag:
        groups[0]["update"] = "layer-sgd"
    opt = opt or opt_cls(groups, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    for step in range(steps):
        _grads(step, params)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return params, opt


def test_without_a_flag_it_is_adamw_bit_for_bit():
    ours, _ = _run(RecoveryAdamW, False, 5)
    theirs, _ = _run(torch.optim.AdamW, False, 5)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_layer_sgd_moves_each_weight_with_its_gradient_and_the_layer_by_lr():
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = RecoveryAdamW([{"params": [params[0]], "lr": 1e-2, "update": "layer-sgd"}, {"params": [params[1]], "lr": 3e-3}],
                        betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.ones(6, 8)
    g[0, 0], g[1, 1], g[2, 2] = 2.0, 0.2, 50.0  # ten times the evidence of another; one far out in the tail; none
    g[3, 3] = 0.0
    params[0].grad, params[1].grad = g.clone(), torch.ones(8)
    opt.step()
    move = params[0].detach() - start[0]
    want = -1e-2 * (g / g.pow(2).mean().sqrt()).clamp(-3, 3)  # the first step: m = g
    torch.testing.assert_close(move, want)
    torch.testing.assert_close(move[0, 0], 10 * move[1, 1])  # a weight moves with its own gradient
    assert float(move[2, 2]) == pytest_approx(-3e-2) and float(move[3, 3]) == 0.0  # the tail clamped; no gradient, no move
    other = torch.optim.AdamW([torch.nn.Parameter(start[1].clone())], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    other.param_groups[0]["params"][0].grad = torch.ones(8)
    other.step()
    assert torch.equal(params[1].detach(), other.param_groups[0]["params"][0].detach())  # the other group: AdamW


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-5)


def test_layer_sgd_state_resumes_exactly():
    straight, _ = _run(RecoveryAdamW, True, 5)
    params, opt = _run(RecoveryAdamW, True, 3)
    saved = opt.state_dict()
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = [{"params": [fresh_params[0]], "lr": 1e-2, "update": "layer-sgd"}, {"params": [fresh_params[1]], "lr": 3e-3}]
    fresh = RecoveryAdamW(groups, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    fresh.load_state_dict(saved)
    assert "momentum_buffer" in fresh.state[fresh_params[0]]
    for step in range(3, 5):
        _grads(step, fresh_params)
        fresh.step()
        fresh.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(straight, fresh_params))
