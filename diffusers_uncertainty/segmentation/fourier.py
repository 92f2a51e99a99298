"""Fourier Domain Adaptation (FDA; Yang & Soatto, "FDA: Fourier Domain Adaptation for Semantic Segmentation",
CVPR 2020): a training-free appearance transfer that gives a labeled source image the low-frequency amplitude
spectrum of an unlabeled target image while keeping its phase, and so its layout and its labels.
"""

from typing import Optional, Sequence

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image


def low_frequency_mask(height: int, width: int, beta: float, device=None) -> torch.Tensor:
    """The FDA window in unshifted FFT layout: `True` at the frequencies `(ky, kx)` (signed, `ky` in
    `[-height/2, height/2)`) with `|ky| < beta * min(height, width)` and `|kx| < beta * min(height, width)`.

    `beta = 0` selects nothing; `beta = 1` selects the whole spectrum of a square image. For a non-integer
    `beta * min(height, width)` the window is Yang & Soatto's `(2 b + 1)`-wide square, `b = floor(beta * min)`.

    Args:
        height (`int`): Image height.
        width (`int`): Image width.
        beta (`float`): Window size as a fraction of the shorter side, in `[0, 1]`.
        device (`torch.device`, *optional*): Where the mask is made.
    """
    limit = beta * min(height, width)
    ky = torch.fft.fftfreq(height, 1.0 / height, device=device).abs()
    kx = torch.fft.fftfreq(width, 1.0 / width, device=device).abs()
    return (ky[:, None] < limit) & (kx[None, :] < limit)


def fourier_domain_adaptation(
    source: torch.Tensor, target_amplitude: torch.Tensor, beta: float
) -> torch.Tensor:
    r"""The FDA transfer of a batch (no clipping).

    With $\mathcal{F}$ the 2-D FFT of each channel, $A$ and $\varphi$ its amplitude and phase, and $M_\beta$ the
    low-frequency window of [`low_frequency_mask`]:

    $$x^{s \to t} = \mathcal{F}^{-1}\left[\left(M_\beta \circ A^t + (1 - M_\beta) \circ A(x^s)\right)
    e^{i \varphi(x^s)}\right]$$

    The phase of the source is kept (edges and layout stay where they were); inside the window the amplitude is the
    target's. The window is symmetric and both amplitudes are those of real images, so the inverse transform is real
    up to rounding (its real part is returned). `beta = 0` returns `source` itself.

    Args:
        source (`torch.Tensor` of shape `(batch, channels, H, W)`): Source images (float).
        target_amplitude (`torch.Tensor` of shape `(batch, channels, H, W)`): `|FFT2|` of one target image per
            source image (see [`FourierDomainAdaptation`]).
        beta (`float`): Window size as a fraction of the shorter side, in `[0, 1]`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1], got {beta}.")
    if source.ndim != 4 or target_amplitude.shape != source.shape:
        raise ValueError(
            f"`source` must have shape (batch, channels, H, W) and `target_amplitude` the same shape, got "
            f"{tuple(source.shape)} and {tuple(target_amplitude.shape)}."
        )
    if beta == 0.0:
        return source
    mask = low_frequency_mask(*source.shape[-2:], beta, device=source.device)
    spectrum = torch.fft.fft2(source.float())
    amplitude = torch.where(mask, target_amplitude.float(), spectrum.abs())
    mixed = torch.polar(amplitude, spectrum.angle())
    return torch.fft.ifft2(mixed).real.to(source.dtype)


class FourierDomainAdaptation:
    """FDA for training batches on the device: the amplitude spectra of the target images are computed once (each
    image's shorter side resized to `size`, then a centred `size` x `size` crop, as float in `[0, 1]`), and every
    call gives each image of a batch the low-frequency amplitude of a random target image
    ([`fourier_domain_adaptation`]), clipped to `[0, 1]` as an image.

    Args:
        target_images (`Sequence[PIL.Image.Image]`): Unlabeled target images (RGB).
        size (`int`): Side of the (square) training crops the transfer is applied to.
        beta (`float`): Window size as a fraction of the shorter side, in `[0, 1]` (Yang & Soatto use 0.01 at
            1024x512; about 0.03 suits 128-pixel crops).
        device (`torch.device`): Where the spectra live and the transfer runs.
    """

    def __init__(self, target_images: Sequence[Image.Image], size: int, beta: float, device):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"`--fda_beta` must be in [0, 1], got {beta}.")
        if len(target_images) == 0:
            raise ValueError("`--fda_target_dir` holds no images; FDA needs at least one target image.")
        self.size, self.beta, self.device = size, beta, torch.device(device)
        crops = []
        for image in target_images:
            tensor = TF.to_dtype(TF.to_image(image.convert("RGB")), torch.float32, scale=True)
            crops.append(TF.center_crop(TF.resize(tensor, size, antialias=True), [size, size]))
        self.target_amplitude = torch.fft.fft2(torch.stack(crops).to(self.device)).abs()

    def __len__(self) -> int:
        return self.target_amplitude.shape[0]

    def __call__(
        self,
        images: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        apply: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Applies the transfer with a random target per image.

        Args:
            images (`torch.Tensor` of shape `(batch, 3, size, size)`): Float images in `[0, 1]`.
            generator (`torch.Generator`, *optional*): On the device; draws the targets.
            apply (`torch.BoolTensor` of shape `(batch,)`, *optional*): Images to transfer (default all).
        """
        if tuple(images.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"FDA target spectra are {self.size}x{self.size}, got images of size "
                f"{images.shape[-1]}x{images.shape[-2]} (WxH)."
            )
        choice = torch.randint(len(self), (images.shape[0],), device=self.device, generator=generator)
        adapted = fourier_domain_adaptation(images, self.target_amplitude[choice], self.beta).clamp(0, 1)
        if apply is None:
            return adapted
        return torch.where(apply.view(-1, 1, 1, 1), adapted, images)
