r"""Hardness-aware sampling (FLEX-Seg): per-sample difficulty from a running loss; the sampling distribution moves
from the base (uniform or dataset-weighted) distribution toward hard samples as training progresses.
"""

from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler


class HardnessAwareSampler(Sampler[int]):
    r"""Draws sample indices (with replacement) from $q_i(t) = (1 - \lambda(t))\, b_i + \lambda(t)\, h_i$.

    - $b_i$: base probabilities (uniform, or the dataset mixing weights of `base_weights`), normalised. With
      `final_base_weights` they move linearly with training progress: $b_i(t) = (1 - t)\, b^{start}_i + t\,
      b^{end}_i$ (e.g. a synthetic share that decays from its start value to its end value).
    - $d_i$: difficulty, an exponential moving average of the sample's loss: $d_i \leftarrow \mu d_i + (1-\mu)\,
      \ell_i$ (set to $\ell_i$ the first time). Samples never seen get the mean difficulty of the seen ones.
    - $h_i = b_i\, d_i^{\gamma} / \sum_j b_j\, d_j^{\gamma}$: hard-sample distribution (scale-free in the loss).
    - $\lambda(t) = \lambda_{max} \min(1, t / t_{ramp})$ with training progress $t \in [0, 1]$ set by
      [`~HardnessAwareSampler.set_progress`]: uniform at the start, shifting toward hard samples.

    The state lives on `device`, and [`~HardnessAwareSampler.draw`] and [`~HardnessAwareSampler.update`] never read
    it on the host, so a training loop on an accelerator feeds it every step without a device sync. Iterating draws
    one index at a time (a `DataLoader` sampler); [`~HardnessAwareSampler.draw`] draws a whole batch from the current
    distribution, which is the same distribution, since updates only come between batches. With several processes,
    seed every process identically and feed every process the same (gathered) updates: their samplers then produce
    the same sequence, which each process slices.

    Args:
        base_weights (`Sequence[float]`): One non-negative weight per sample (e.g. all ones for uniform).
        num_draws (`int`, *optional*): Indices per epoch; defaults to the number of samples.
        momentum (`float`, defaults to 0.9): $\mu$.
        gamma (`float`, defaults to 2.0): $\gamma$, sharpness of the hard distribution.
        max_hardness (`float`, defaults to 0.5): $\lambda_{max} \in [0, 1]$.
        ramp (`float`, defaults to 1.0): $t_{ramp} \in (0, 1]$, progress at which $\lambda$ reaches its maximum.
        final_base_weights (`Sequence[float]`, *optional*): The base weights at the end of training (progress 1),
            one per sample like `base_weights`; default: `base_weights` throughout.
        seed (`int`, defaults to 0): Seed of the sampler's own generator.
        device (`torch.device` or `str`, defaults to `"cpu"`): Where the state and the generator live.
    """

    def __init__(
        self,
        base_weights: Sequence[float],
        num_draws: Optional[int] = None,
        momentum: float = 0.9,
        gamma: float = 2.0,
        max_hardness: float = 0.5,
        ramp: float = 1.0,
        final_base_weights: Optional[Sequence[float]] = None,
        seed: int = 0,
        device="cpu",
    ):
        base = torch.as_tensor(base_weights, dtype=torch.float64)
        if base.ndim != 1 or base.numel() == 0:
            raise ValueError(f"`base_weights` must be a non-empty 1-D sequence, got shape {tuple(base.shape)}.")
        if (base < 0).any() or base.sum() <= 0:
            raise ValueError("`base_weights` must be non-negative with a positive sum.")
        final_base = None
        if final_base_weights is not None:
            final_base = torch.as_tensor(final_base_weights, dtype=torch.float64)
            if final_base.shape != base.shape:
                raise ValueError(
                    f"`final_base_weights` must have one weight per sample like `base_weights` ({base.numel()}), got "
                    f"shape {tuple(final_base.shape)}."
                )
            if (final_base < 0).any() or final_base.sum() <= 0:
                raise ValueError("`final_base_weights` must be non-negative with a positive sum.")
        if not 0.0 <= max_hardness <= 1.0:
            raise ValueError(f"`max_hardness` must be in [0, 1], got {max_hardness}.")
        if not 0.0 < ramp <= 1.0:
            raise ValueError(f"`ramp` must be in (0, 1], got {ramp}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
        self.device = torch.device(device)
        self.base = (base / base.sum()).to(self.device)
        self.final_base = None if final_base is None else (final_base / final_base.sum()).to(self.device)
        self.num_draws = int(num_draws) if num_draws is not None else base.numel()
        self.momentum = momentum
        self.gamma = gamma
        self.max_hardness = max_hardness
        self.ramp = ramp
        self.difficulty = torch.zeros_like(self.base)
        self.seen = torch.zeros_like(self.base, dtype=torch.bool)
        # Whether an update ever brought a negative or non-finite loss: kept on the device, raised by `check`.
        self.invalid_loss = torch.zeros((), dtype=torch.bool, device=self.device)
        self.progress = 0.0
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:
        return self.num_draws

    @property
    def hardness_mix(self) -> float:
        """Current $\\lambda(t)$."""
        return self.max_hardness * min(1.0, self.progress / self.ramp)

    def base_probabilities(self) -> torch.Tensor:
        """The base distribution $b(t)$ at the current progress (sums to one).

        Returns:
            `torch.Tensor` of shape `(num_samples,)`, float64.
        """
        if self.final_base is None:
            return self.base
        return (1.0 - self.progress) * self.base + self.progress * self.final_base

    def set_progress(self, progress: float) -> None:
        """Sets training progress.

        Args:
            progress (`float`): Fraction of training done, in `[0, 1]`.
        """
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"`progress` must be in [0, 1], got {progress}.")
        self.progress = float(progress)

    def update(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        r"""Moving-average update of the difficulty of the given samples, with repeats applied in order: a sample
        that occurs $k$ times with losses $\ell_1, \dots, \ell_k$ ends at $\mu^k d + (1-\mu) \sum_m \mu^{k-m}
        \ell_m$ (seen before) or $\mu^{k-1} \ell_1 + (1-\mu) \sum_{m \ge 2} \mu^{k-m} \ell_m$ (first seen now), the
        result of $k$ updates one after the other, computed at once on the device. A negative or non-finite loss is
        recorded on the device and raised by [`~HardnessAwareSampler.check`] (checking here would be a host read
        every step).

        Args:
            indices (`torch.Tensor` of shape `(n,)`): Sample indices.
            losses (`torch.Tensor` of shape `(n,)`): Their non-negative losses.
        """
        indices = torch.as_tensor(indices).detach().to(self.device, torch.long).reshape(-1)
        losses = torch.as_tensor(losses).detach().to(self.device, torch.float64).reshape(-1)
        if indices.shape != losses.shape:
            raise ValueError(f"`indices` {tuple(indices.shape)} and `losses` {tuple(losses.shape)} must match.")
        self.invalid_loss |= ~(torch.isfinite(losses) & (losses >= 0)).all()
        same = indices[:, None] == indices[None, :]
        later = same.triu(diagonal=1).sum(dim=1)  # occurrences of the same sample after each position
        first = same.tril(diagonal=-1).sum(dim=1) == 0
        momentum = torch.tensor(self.momentum, dtype=torch.float64, device=self.device)
        # Each loss decays by mu once per later occurrence; it enters with weight (1 - mu), or 1 when it is the first
        # loss ever seen of its sample (which then replaces the zero difficulty).
        weights = momentum**later * torch.where(
            first & ~self.seen[indices], torch.ones_like(losses), torch.full_like(losses, 1.0 - self.momentum)
        )
        counts = torch.zeros_like(self.difficulty).index_add_(0, indices, torch.ones_like(losses))
        contribution = torch.zeros_like(self.difficulty).index_add_(0, indices, weights * losses)
        kept = torch.where(self.seen, momentum**counts * self.difficulty, 0.0)
        self.difficulty = torch.where(counts > 0, kept + contribution, self.difficulty)
        self.seen |= counts > 0

    def check(self) -> None:
        """Raise a `ValueError` if any update so far brought a negative or non-finite loss (reads one flag)."""
        if bool(self.invalid_loss):
            raise ValueError("`losses` must be finite and non-negative; an update brought one that is not.")

    def probabilities(self) -> torch.Tensor:
        """Current sampling distribution $q(t)$ (sums to one), computed on the device without host reads.

        Returns:
            `torch.Tensor` of shape `(num_samples,)`, float64.
        """
        mix = self.hardness_mix
        base = self.base_probabilities()
        if mix == 0.0:
            return base.clone()
        seen = self.seen.to(torch.float64)
        mean = (self.difficulty * seen).sum() / seen.sum().clamp_min(1.0)
        difficulty = torch.where(self.seen, self.difficulty, mean)
        hard = base * difficulty.clamp_min(0.0) ** self.gamma
        total = hard.sum()
        # Nothing seen yet, or every difficulty 0: the base distribution (the division by 1 is then discarded).
        mixed = (1.0 - mix) * base + mix * hard / torch.where(total > 0, total, 1.0)
        return torch.where(self.seen.any() & (total > 0), mixed, base)

    def draw(self, count: int) -> torch.Tensor:
        """`count` indices (on the sampler's device, with replacement) from the current distribution.

        Args:
            count (`int`): How many.
        """
        return torch.multinomial(self.probabilities(), count, replacement=True, generator=self.generator)

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.num_draws):
            yield int(self.draw(1))

    def state_dict(self) -> dict:
        """State for checkpointing (difficulties, progress, generator)."""
        return {
            # Copies (`.cpu()` of a CPU tensor would alias the live state, which updates change in place).
            "difficulty": self.difficulty.to("cpu", copy=True),
            "seen": self.seen.to("cpu", copy=True),
            "invalid_loss": self.invalid_loss.to("cpu", copy=True),
            "progress": self.progress,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a state from [`~HardnessAwareSampler.state_dict`].

        Args:
            state (`dict`): Saved state.
        """
        if state["difficulty"].shape != self.difficulty.shape:
            raise ValueError(
                f"Saved sampler state is for {state['difficulty'].numel()} samples, this dataset has "
                f"{self.difficulty.numel()}."
            )
        self.difficulty.copy_(state["difficulty"])
        self.seen.copy_(state["seen"])
        self.invalid_loss.copy_(state.get("invalid_loss", torch.zeros((), dtype=torch.bool)))
        self.progress = float(state["progress"])
        self.generator.set_state(state["generator"])
