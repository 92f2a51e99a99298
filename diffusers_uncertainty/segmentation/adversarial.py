"""Adversarial domain alignment (DANN, Ganin & Lempitsky 2015) as used by the latent-diffusion segmenter (ICCLD):
a gradient reversal layer, a small convolutional domain discriminator and the usual ramp-up schedule of the
reversal strength.

Training with these pieces (see `examples/train_segmentation.py`): the discriminator reads the segmenter's
latent-space features through [`GradientReversal`]; one backward pass of `segmentation loss (source) +
BCE(discriminator(reverse(features)), domain)` trains the discriminator to tell source (0) from target (1) while
the reversed gradient pushes the feature extractor to make the two domains indistinguishable.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _ReverseGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by `-strength` in the backward pass."""

    @staticmethod
    def forward(ctx, inputs, strength):
        ctx.strength = strength
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.strength * grad_output, None


def reverse_gradient(inputs: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    r"""Gradient reversal: returns `inputs` unchanged; the gradient flowing back through it is multiplied by
    `-strength`.

    Args:
        inputs (`torch.Tensor`): Any tensor.
        strength (`float`, defaults to 1.0): The reversal strength $\lambda \ge 0$.
    """
    if strength < 0:
        raise ValueError(f"`strength` must be non-negative, got {strength}.")
    return _ReverseGradient.apply(inputs, float(strength))


class GradientReversal(nn.Module):
    r"""Gradient reversal layer: identity forward, $-\lambda \cdot$ gradient backward. `strength` is a plain
    attribute (not a parameter), set every step from [`dann_lambda`].

    Args:
        strength (`float`, defaults to 1.0): The reversal strength $\lambda \ge 0$.
    """

    def __init__(self, strength: float = 1.0):
        super().__init__()
        if strength < 0:
            raise ValueError(f"`strength` must be non-negative, got {strength}.")
        self.strength = float(strength)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return reverse_gradient(inputs, self.strength)

    def extra_repr(self) -> str:
        return f"strength={self.strength}"


def dann_lambda(progress: float, weight: float = 1.0, gamma: float = 10.0) -> float:
    r"""DANN ramp-up of the reversal strength: $w \cdot (2 / (1 + e^{-\gamma p}) - 1)$, 0 at the start of training,
    close to `weight` from about a third of it on. Keeps the (random at first) discriminator from disturbing the
    features before it has learned anything.

    Args:
        progress (`float`): Training progress $p$ = step / max_steps, in `[0, 1]`.
        weight (`float`, defaults to 1.0): Final strength ($w$, `--adversarial_weight`).
        gamma (`float`, defaults to 10.0): Steepness ($\gamma$, 10 in the DANN paper).
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"`progress` must be in [0, 1], got {progress}.")
    return weight * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


class DomainDiscriminator(nn.Module):
    """Per-location domain classifier on feature maps (a PatchGAN-style critic, as in AdaptSegNet): strided 3x3
    convolutions with LeakyReLU, then a 1x1 convolution to one logit per location. Fully convolutional, so it
    works for any feature size; the loss averages the per-location BCE.

    Args:
        in_channels (`int`): Channels of the features it reads.
        hidden_channels (`int`, defaults to 64): Width of the first layer (doubled once).
        num_layers (`int`, defaults to 2): Number of stride-2 3x3 convolutions before the 1x1 classifier.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 64, num_layers: int = 2):
        super().__init__()
        if in_channels < 1 or hidden_channels < 1 or num_layers < 1:
            raise ValueError(
                f"`in_channels`, `hidden_channels` and `num_layers` must be positive, got {in_channels}, "
                f"{hidden_channels}, {num_layers}."
            )
        layers, channels = [], in_channels
        for i in range(num_layers):
            out = hidden_channels * min(2**i, 2)
            layers += [nn.Conv2d(channels, out, 3, stride=2 if i else 1, padding=1), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Domain logits (> 0: target) of shape `(batch, 1, h', w')`.

        Args:
            features (`torch.Tensor` of shape `(batch, in_channels, h, w)`): Feature maps.
        """
        return self.net(features)


def domain_adversarial_loss(
    discriminator: nn.Module, features: torch.Tensor, domain: torch.Tensor, strength: float
) -> dict:
    """Discriminator BCE on gradient-reversed features: minimising it trains the discriminator to separate the
    domains and (through the reversal) the feature extractor to confuse it.

    Args:
        discriminator (`torch.nn.Module`): E.g. [`DomainDiscriminator`].
        features (`torch.Tensor` of shape `(batch, C, h, w)`): Source and target features in one batch.
        domain (`torch.Tensor` of shape `(batch,)`): 0 for source samples, 1 for target samples.
        strength (`float`): Reversal strength (e.g. from [`dann_lambda`]); 0 trains the discriminator only.

    Returns:
        `dict`: `loss` (scalar BCE, with graph) and `accuracy` (fraction of locations classified correctly,
        detached).
    """
    if domain.ndim != 1 or domain.shape[0] != features.shape[0]:
        raise ValueError(
            f"`domain` must have shape ({features.shape[0]},) (one label per sample), got {tuple(domain.shape)}."
        )
    logits = discriminator(reverse_gradient(features, strength)).float()
    target = domain.to(logits.dtype).view(-1, 1, 1, 1).expand_as(logits)
    loss = F.binary_cross_entropy_with_logits(logits, target)
    accuracy = ((logits.detach() > 0).to(target.dtype) == target).float().mean()
    return {"loss": loss, "accuracy": accuracy}
