r"""Hardness-aware sampling (FLEX-Seg): per-sample difficulty from a running loss; the sampling distribution moves
from the base (uniform or dataset-weighted) distribution toward hard samples as training progresses.
"""

from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler


class HardnessAwareSampler(Sampler[int]):
    r"""Draws sample indices (with replacement) from $q_i(t) = (1 - \lambda(t))\, b_i + \lambda(t)\, h_i$.

    - $b_i$: base probabilities (uniform, or the dataset mixing weights of `base_weights`), normalised.
    - $d_i$: difficulty, an exponential moving average of the sample's loss: $d_i \leftarrow \mu d_i + (1-\mu)\,
      \ell_i$ (set to $\ell_i$ the first time). Samples never seen get the mean difficulty of the seen ones.
    - $h_i = b_i\, d_i^{\gamma} / \sum_j b_j\, d_j^{\gamma}$: hard-sample distribution (scale-free in the loss).
    - $\lambda(t) = \lambda_{max} \min(1, t / t_{ramp})$ with training progress $t \in [0, 1]$ set by
      [`~HardnessAwareSampler.set_progress`]: uniform at the start, shifting toward hard samples.

    Indices are drawn lazily, one at a time, from the current distribution, so updates made during an epoch affect
    the rest of it. With several processes, seed every process identically and feed every process the same
    (gathered) updates: their samplers then produce the same sequence, which `accelerate` shards.

    Args:
        base_weights (`Sequence[float]`): One non-negative weight per sample (e.g. all ones for uniform).
        num_draws (`int`, *optional*): Indices per epoch; defaults to the number of samples.
        momentum (`float`, defaults to 0.9): $\mu$.
        gamma (`float`, defaults to 2.0): $\gamma$, sharpness of the hard distribution.
        max_hardness (`float`, defaults to 0.5): $\lambda_{max} \in [0, 1]$.
        ramp (`float`, defaults to 1.0): $t_{ramp} \in (0, 1]$, progress at which $\lambda$ reaches its maximum.
        seed (`int`, defaults to 0): Seed of the sampler's own generator.
    """

    def __init__(
        self,
        base_weights: Sequence[float],
        num_draws: Optional[int] = None,
        momentum: float = 0.9,
        gamma: float = 2.0,
        max_hardness: float = 0.5,
        ramp: float = 1.0,
        seed: int = 0,
    ):
        base = torch.as_tensor(base_weights, dtype=torch.float64)
        if base.ndim != 1 or base.numel() == 0:
            raise ValueError(f"`base_weights` must be a non-empty 1-D sequence, got shape {tuple(base.shape)}.")
        if (base < 0).any() or base.sum() <= 0:
            raise ValueError("`base_weights` must be non-negative with a positive sum.")
        if not 0.0 <= max_hardness <= 1.0:
            raise ValueError(f"`max_hardness` must be in [0, 1], got {max_hardness}.")
        if not 0.0 < ramp <= 1.0:
            raise ValueError(f"`ramp` must be in (0, 1], got {ramp}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
        self.base = base / base.sum()
        self.num_draws = int(num_draws) if num_draws is not None else base.numel()
        self.momentum = momentum
        self.gamma = gamma
        self.max_hardness = max_hardness
        self.ramp = ramp
        self.difficulty = torch.zeros_like(self.base)
        self.seen = torch.zeros_like(self.base, dtype=torch.bool)
        self.progress = 0.0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.num_draws

    @property
    def hardness_mix(self) -> float:
        """Current $\\lambda(t)$."""
        return self.max_hardness * min(1.0, self.progress / self.ramp)

    def set_progress(self, progress: float) -> None:
        """Sets training progress.

        Args:
            progress (`float`): Fraction of training done, in `[0, 1]`.
        """
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"`progress` must be in [0, 1], got {progress}.")
        self.progress = float(progress)

    def update(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Moving-average update of the difficulty of the given samples.

        Args:
            indices (`torch.Tensor` of shape `(n,)`): Sample indices (repeats are applied in order).
            losses (`torch.Tensor` of shape `(n,)`): Their non-negative losses.
        """
        indices = torch.as_tensor(indices).detach().cpu().long().reshape(-1)
        losses = torch.as_tensor(losses).detach().cpu().double().reshape(-1)
        if indices.shape != losses.shape:
            raise ValueError(f"`indices` {tuple(indices.shape)} and `losses` {tuple(losses.shape)} must match.")
        if (losses < 0).any() or not torch.isfinite(losses).all():
            raise ValueError("`losses` must be finite and non-negative.")
        for index, loss in zip(indices.tolist(), losses.tolist()):
            if self.seen[index]:
                self.difficulty[index] = self.momentum * self.difficulty[index] + (1.0 - self.momentum) * loss
            else:
                self.difficulty[index] = loss
                self.seen[index] = True

    def probabilities(self) -> torch.Tensor:
        """Current sampling distribution $q(t)$ (sums to one).

        Returns:
            `torch.Tensor` of shape `(num_samples,)`, float64.
        """
        mix = self.hardness_mix
        if mix == 0.0 or not self.seen.any():
            return self.base.clone()
        difficulty = torch.where(self.seen, self.difficulty, self.difficulty[self.seen].mean())
        hard = self.base * difficulty.clamp_min(0.0) ** self.gamma
        if hard.sum() <= 0:
            return self.base.clone()
        return (1.0 - mix) * self.base + mix * hard / hard.sum()

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.num_draws):
            yield int(torch.multinomial(self.probabilities(), 1, generator=self.generator).item())

    def state_dict(self) -> dict:
        """State for checkpointing (difficulties, progress, generator)."""
        return {
            "difficulty": self.difficulty.clone(),
            "seen": self.seen.clone(),
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
        self.progress = float(state["progress"])
        self.generator.set_state(state["generator"])
