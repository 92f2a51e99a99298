"""Aggregation blocks of the style encoder: several images' style tokens -> one set of style tokens.

Every block maps per-image tokens `(batch, num_images, num_tokens, dim)` to `(batch, num_tokens, dim)`:

* `mean` and `max`: element-wise over the images (no parameters);
* `mlp`: the images' tokens concatenated along the feature axis, then a two-layer MLP shared by the token slots.
  It is the only block that depends on the order of the images (by design: it sees a sequence). It has a fixed
  width of `max_style_images` slots; with fewer images the empty slots are filled with the encoder's learned null
  style, so one image and one image plus "no style" mean the same thing;
* `set_transformer`: a small transformer over all tokens of all images, without any image-position encoding
  (self-attention is permutation-equivariant), then the mean over the images of each token slot: invariant to the
  order of the images. A learned per-slot embedding tells the slots of one image apart.
"""

import torch
from torch import nn


AGGREGATIONS = ("mean", "max", "mlp", "set_transformer")


class MeanAggregation(nn.Module):
    """Element-wise mean over the images."""

    def forward(self, tokens: torch.Tensor, null_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return tokens.mean(dim=1)


class MaxAggregation(nn.Module):
    """Element-wise maximum over the images."""

    def forward(self, tokens: torch.Tensor, null_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return tokens.amax(dim=1)


class MLPAggregation(nn.Module):
    r"""
    Concatenate the tokens of up to `max_images` images slot by slot and merge them with an MLP.

    Args:
        dim (`int`):
            Token width.
        max_images (`int`):
            Number of image slots of the concatenation; fewer images are padded with `null_tokens`.
    """

    def __init__(self, dim: int, max_images: int):
        super().__init__()
        self.max_images = max_images
        self.mlp = nn.Sequential(nn.Linear(dim * max_images, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, tokens: torch.Tensor, null_tokens: torch.Tensor | None = None) -> torch.Tensor:
        batch, count, num_tokens, dim = tokens.shape
        if count > self.max_images:
            raise ValueError(
                f"The `mlp` aggregation takes at most max_style_images={self.max_images} style images per sample, "
                f"but got {count}."
            )
        if count < self.max_images:
            padding = null_tokens.to(tokens.dtype).expand(batch, self.max_images - count, num_tokens, dim)
            tokens = torch.cat([tokens, padding], dim=1)
        concatenated = tokens.permute(0, 2, 1, 3).reshape(batch, num_tokens, self.max_images * dim)
        return self.mlp(concatenated)


class SetTransformerAggregation(nn.Module):
    r"""
    A transformer over the set of all style tokens, then a mean over the images: order-invariant.

    Args:
        dim (`int`):
            Token width.
        num_tokens (`int`):
            Tokens per image (each slot gets a learned embedding, shared by all images).
        num_layers (`int`, defaults to 2):
            Transformer layers.
        num_heads (`int`, defaults to 4):
            Attention heads; must divide `dim`.
    """

    def __init__(self, dim: int, num_tokens: int, num_layers: int = 2, num_heads: int = 4):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(
                f"`aggregation_heads` must divide cross_attention_dim={dim} for the set transformer, but got {num_heads}."
            )
        self.slot_embedding = nn.Parameter(torch.zeros(num_tokens, dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, num_heads, dim_feedforward=2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                norm_first=True,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, null_tokens: torch.Tensor | None = None) -> torch.Tensor:
        batch, count, num_tokens, dim = tokens.shape
        hidden = (tokens + self.slot_embedding.to(tokens.dtype)).reshape(batch, count * num_tokens, dim)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.norm(hidden.reshape(batch, count, num_tokens, dim).mean(dim=1))


def build_aggregation(
    aggregation: str, dim: int, num_tokens: int, max_images: int, num_layers: int = 2, num_heads: int = 4
) -> nn.Module:
    r"""
    The aggregation block named `aggregation` (one of `AGGREGATIONS`).

    Args:
        aggregation (`str`):
            `"mean"`, `"max"`, `"mlp"` or `"set_transformer"`.
        dim (`int`):
            Token width.
        num_tokens (`int`):
            Tokens per image.
        max_images (`int`):
            Slots of the `mlp` block.
        num_layers (`int`, defaults to 2), num_heads (`int`, defaults to 4):
            Size of the `set_transformer` block.
    """
    if aggregation == "mean":
        return MeanAggregation()
    if aggregation == "max":
        return MaxAggregation()
    if aggregation == "mlp":
        return MLPAggregation(dim, max_images)
    if aggregation == "set_transformer":
        return SetTransformerAggregation(dim, num_tokens, num_layers, num_heads)
    raise ValueError(f"`aggregation` must be one of {list(AGGREGATIONS)}, but got {aggregation!r}.")
