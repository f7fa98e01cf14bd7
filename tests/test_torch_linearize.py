"""`entk.adapters.torch.linearize`: f(θ₀, x) + J(θ₀, x)(θ − θ₀) as a trainable torch module.

References: the original module, and explicit Jacobians from `torch.func.jacrev` contracted with
θ − θ₀ by hand, in float64.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from entk.adapters.torch import LinearizedModule, linearize  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()


def _cnn():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(48, 2)).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net


def explicit_linearization(module, theta, x):
    """f(θ₀, x) + Σ_k J_k(θ₀, x) · (θ_k − θ₀_k), J from torch.func.jacrev (θ₀: the module's own)."""
    module = module.eval()
    theta0 = {n: p.detach() for n, p in module.named_parameters()}
    buffers = dict(module.named_buffers())
    f = lambda p: torch.func.functional_call(module, (p, buffers), (x,))  # noqa: E731
    jac = torch.func.jacrev(f)(theta0)
    with torch.no_grad():
        out = f(theta0)
        for n, j in jac.items():
            delta = (theta[n] - theta0[n]).reshape(-1)
            out = out + j.reshape(*out.shape, -1) @ delta
    return out


def perturb(lin, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return {n[len("module."):]: p.detach().clone() for n, p in lin.named_parameters()}


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_matches_f_plus_jvp_at_several_theta(make):
    module = make().train()  # linearization is of the eval-mode function whatever the mode
    shape = (4, 3) if make is _mlp else (4, 2, 6, 6)
    x = torch.randn(*shape, dtype=torch.float64)
    lin = linearize(module)
    assert module.training  # the original is not touched
    with torch.no_grad():
        assert torch.equal(lin(x), module.eval()(x))  # at θ = θ₀ it *is* the network
    module.train()
    for seed, scale in enumerate([1e-3, 0.1, 1.0]):
        theta = perturb(lin, scale, seed)
        with torch.no_grad():
            expected = explicit_linearization(make(), theta, x)
            actual = lin(x)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
        # Away from θ₀ the linearization differs from the network (it is not the identity map).
        if scale == 1.0:
            net_at_theta = make().eval()
            assert (torch.func.functional_call(net_at_theta, theta, (x,)) - actual).abs().max() > 1e-3


def test_exact_for_a_model_linear_in_its_parameters():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    lin = linearize(net)
    theta = perturb(lin, 1.0, 0)
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x @ theta["weight"].T + theta["bias"], rtol=1e-13, atol=1e-13)


def test_gradient_is_jacobian_transpose():
    net, x = _mlp(), torch.randn(4, 3, dtype=torch.float64)
    lin = linearize(net)
    perturb(lin, 0.3, 1)
    cotangent = torch.randn(4, 2, dtype=torch.float64)
    (lin(x) * cotangent).sum().backward()
    theta0 = {n: p.detach() for n, p in net.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (x,)))(theta0)
    for n, p in lin.module.named_parameters():
        expected = torch.einsum("ij,ij...->...", cotangent, jac[n])  # constant in θ: J at θ₀
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-12)


def test_sgd_reduces_the_loss_and_keeps_theta0():
    net = _cnn()
    x, y = torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    lin = linearize(net)
    theta0 = {n: b.clone() for n, b in lin.theta0.named_buffers()}
    optimizer = torch.optim.SGD(lin.parameters(), lr=0.05)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = ((lin(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0]
    for n, b in lin.theta0.named_buffers():
        assert torch.equal(b, theta0[n])
    # The trained linearized model is still exactly linear in θ − θ₀.
    trained = {n[len("module."):]: p.detach() for n, p in lin.named_parameters()}
    with torch.no_grad():
        expected = explicit_linearization(_cnn(), trained, x)
        torch.testing.assert_close(lin(x), expected, rtol=1e-12, atol=1e-12)


def test_parameters_buffers_and_state_dict():
    net = _cnn()
    net[0].bias.requires_grad_(False)  # frozen: neither trained nor linearized
    lin = linearize(net)
    names = [n for n, _ in lin.named_parameters()]
    assert "module.0.weight" in names and "module.0.bias" in names
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == [
        f"module.{n}" for n in lin.linearized_parameter_names]
    assert "0.bias" not in lin.linearized_parameter_names
    assert "theta0.0.weight" in lin.state_dict() and "theta0.0.bias" not in lin.state_dict()
    perturb(lin, 0.5, 3)
    other = _cnn()
    other[0].bias.requires_grad_(False)
    restored = LinearizedModule(other)  # same structure; θ and θ₀ come from the state dict
    restored.load_state_dict(lin.state_dict())
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), lin(x), rtol=0, atol=0)


def test_errors():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        linearize(lambda x: x)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        linearize(frozen)
