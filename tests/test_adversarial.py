"""Gradient reversal, the DANN ramp-up and the domain discriminator loss."""

import math

import pytest
import torch

from diffusers_uncertainty.segmentation.adversarial import (
    DomainDiscriminator,
    GradientReversal,
    dann_lambda,
    domain_adversarial_loss,
    reverse_gradient,
)


@pytest.mark.parametrize("strength", [0.0, 0.25, 1.0, 3.0])
def test_gradient_reversal_is_identity_forward_and_flips_and_scales_the_gradient(strength):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=generator, requires_grad=True)
    weights = torch.randn(2, 3, 4, 4, generator=generator)
    y = GradientReversal(strength)(x)
    assert torch.equal(y, x)
    (y * weights).sum().backward()
    # d/dx sum(w * x) = w; reversed and scaled: exactly -strength * w
    assert torch.equal(x.grad, -strength * weights)


def test_gradient_reversal_inside_a_graph_matches_the_hand_computed_gradient():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    loss = (reverse_gradient(x**2, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum()
    loss.backward()
    # d/dx [c * x^2] = 2 c x, reversed with 0.5: -0.5 * 2 c x = -c x
    assert torch.equal(x.grad, torch.tensor([-1.0, 4.0, -9.0]))
    with pytest.raises(ValueError, match="`strength` must be non-negative, got -1"):
        reverse_gradient(x, -1.0)


def test_dann_ramp_up():
    assert dann_lambda(0.0, 0.3) == 0.0
    assert dann_lambda(0.5, 2.0) == pytest.approx(2.0 * (2 / (1 + math.exp(-5)) - 1))
    values = [dann_lambda(p / 10, 1.0) for p in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match=r"`progress` must be in \[0, 1\], got 1.5"):
        dann_lambda(1.5)


def test_discriminator_learns_normally_while_the_features_get_the_reversed_gradient():
    torch.manual_seed(0)
    discriminator = DomainDiscriminator(8, hidden_channels=8)
    features = torch.randn(4, 8, 6, 6)
    domain = torch.tensor([0, 0, 1, 1])

    def gradients(strength):
        discriminator.zero_grad()
        f = features.clone().requires_grad_(True)
        out = domain_adversarial_loss(discriminator, f, domain, strength)
        out["loss"].backward()
        return f.grad, [p.grad.clone() for p in discriminator.parameters()], out

    plain_feature_grad, plain_disc_grads, out = gradients(0.0)
    reversed_feature_grad, reversed_disc_grads, _ = gradients(2.0)
    assert torch.equal(plain_feature_grad, torch.zeros_like(plain_feature_grad))  # strength 0 stops the gradient
    for a, b in zip(plain_disc_grads, reversed_disc_grads):
        assert torch.equal(a, b)  # the discriminator's own gradient is untouched
    f = features.clone().requires_grad_(True)
    torch.nn.functional.binary_cross_entropy_with_logits(
        discriminator(f), domain.float().view(-1, 1, 1, 1).expand(-1, 1, *discriminator(f).shape[-2:])
    ).backward()
    torch.testing.assert_close(reversed_feature_grad, -2.0 * f.grad)
    assert 0.0 <= float(out["accuracy"]) <= 1.0 and out["loss"].ndim == 0
    with pytest.raises(ValueError, match=r"`domain` must have shape \(4,\)"):
        domain_adversarial_loss(discriminator, features, torch.zeros(3), 1.0)
