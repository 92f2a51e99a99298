"""Turning user inputs into the two control conditions: label maps -> one-hot, uncertainty maps -> [0, 1] floats.

Both functions validate before they convert and raise a `ValueError` that names the argument, what was
expected and what came. Nothing is clamped or silently reshaped.
"""

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def label_maps_to_tensor(semantic_map, argument: str = "semantic_map") -> torch.Tensor:
    r"""
    Stack integer label maps into a `(batch, H, W)` int64 tensor.

    Args:
        semantic_map (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
            PIL images in mode `"L"`, `"P"`, `"I"` or `"I;16"`; integer arrays/tensors of shape `(H, W)` or
            `(B, H, W)`.
        argument (`str`, defaults to `"semantic_map"`):
            Name used in error messages.
    """
    maps = []
    for item in _as_list(semantic_map):
        if isinstance(item, PIL.Image.Image):
            if item.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(
                    f"`{argument}` PIL images must be integer label maps in mode 'L', 'P', 'I' or 'I;16', "
                    f"but got mode {item.mode!r}."
                )
            item = torch.from_numpy(np.array(item).astype(np.int64))
        elif isinstance(item, np.ndarray):
            if not np.issubdtype(item.dtype, np.integer):
                raise ValueError(f"`{argument}` arrays must have an integer dtype, but got {item.dtype}.")
            item = torch.from_numpy(item.astype(np.int64))
        elif torch.is_tensor(item):
            if item.dtype.is_floating_point or item.dtype == torch.bool or item.is_complex():
                raise ValueError(
                    f"`{argument}` tensors must be integer label maps (or one float one-hot tensor of shape "
                    f"(B, C, H, W)), but got dtype {item.dtype} with shape {tuple(item.shape)}."
                )
            item = item.to(torch.int64)
        else:
            raise ValueError(
                f"`{argument}` must be a PIL image, numpy array or torch tensor (or a list of them), "
                f"but got {type(item).__name__}."
            )
        if item.ndim == 2:
            item = item[None]
        if item.ndim != 3:
            raise ValueError(f"`{argument}` label maps must have shape (H, W) or (B, H, W), but got {tuple(item.shape)}.")
        maps.append(item)
    shapes = {tuple(item.shape[1:]) for item in maps}
    if len(shapes) > 1:
        raise ValueError(f"All `{argument}` label maps must have the same size, but got sizes {sorted(shapes)}.")
    return torch.cat(maps)


def prepare_semantic_map(
    semantic_map,
    num_classes: int,
    height: int,
    width: int,
    ignore_index: int | None = None,
    argument: str = "semantic_map",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Resize label maps to `(height, width)` with nearest-neighbour and one-hot encode them.

    Args:
        semantic_map:
            Integer label maps (see [`label_maps_to_tensor`]) or an already one-hot float tensor `(B, C, H, W)`.
        num_classes (`int`):
            `C`, the number of one-hot channels.
        height (`int`), width (`int`):
            Output size.
        ignore_index (`int`, *optional*):
            Label value of unlabeled pixels: they become all-zero one-hot vectors.
        argument (`str`, defaults to `"semantic_map"`):
            Name used in error messages.
        device (`torch.device` or `str`, *optional*):
            Where the one-hot maps are built (e.g. the pipeline's device): the integer labels travel there, not the
            `C` times larger one-hot maps. Validation and the returned label maps stay on the CPU.
        dtype (`torch.dtype`, defaults to `torch.float32`):
            Dtype of the one-hot maps.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: the one-hot maps `(B, C, height, width)` (0 and 1 in `dtype`, on
        `device`) and the int64 label maps `(B, height, width)` on the CPU, aligned with them (unlabeled pixels carry
        `ignore_index`).
    """
    if torch.is_tensor(semantic_map) and semantic_map.dtype.is_floating_point:
        if semantic_map.ndim != 4 or semantic_map.shape[1] != num_classes:
            raise ValueError(
                f"A float `{argument}` must be one-hot with shape (B, {num_classes}, H, W), "
                f"but got shape {tuple(semantic_map.shape)}."
            )
        one_hot = semantic_map.detach().float().cpu()
        if torch.isnan(one_hot).any() or not bool(((one_hot == 0) | (one_hot == 1)).all()):
            raise ValueError(f"A float `{argument}` must be one-hot (only 0 and 1 values), but it has other values.")
        if bool((one_hot.sum(dim=1) > 1).any()):
            raise ValueError(f"A float `{argument}` must be one-hot, but some pixels have more than one class set.")
        one_hot = F.interpolate(one_hot, size=(height, width), mode="nearest-exact")
        unlabeled = one_hot.sum(dim=1) == 0
        if bool(unlabeled.any()) and ignore_index is None:
            raise ValueError(
                f"`{argument}` has all-zero (unlabeled) pixels, but the controlnet's config has no `ignore_index` "
                "to label them with."
            )
        labels = one_hot.argmax(dim=1)
        if ignore_index is not None:
            labels[unlabeled] = ignore_index
        return one_hot.to(device=device, dtype=dtype), labels

    labels = label_maps_to_tensor(semantic_map, argument)
    low, high = (int(value) for value in labels.aminmax())
    if low < 0 or high >= num_classes:  # one cheap pass when every label is a class; the full check otherwise
        valid = (labels >= 0) & (labels < num_classes)
        if ignore_index is not None:
            valid |= labels == ignore_index
        if not bool(valid.all()):
            bad = torch.unique(labels[~valid])[:10].tolist()
            allowed = f"[0, {num_classes})" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
            raise ValueError(f"`{argument}` values must be in {allowed}, but found {bad}.")
    if labels.shape[1:] != (height, width):
        # Exact for integers below 2**24; "nearest-exact" picks the pixel whose centre is nearest.
        labels = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest-exact")[:, 0].long()
    # Comparing with the class indices gives the (B, C, H, W) layout directly; `ignore_index` (outside [0, C))
    # matches no class, so unlabeled pixels are all zero.
    device_labels = labels.to(device)
    classes = torch.arange(num_classes, device=device_labels.device).view(1, num_classes, 1, 1)
    one_hot = (device_labels[:, None] == classes).to(dtype)
    return one_hot, labels


def prepare_uncertainty_map(
    uncertainty_map,
    channels: int,
    height: int,
    width: int,
    argument: str = "uncertainty_map",
) -> torch.Tensor:
    r"""
    Turn uncertainty maps into a float32 tensor `(B, channels, height, width)` with values in [0, 1], resized
    bilinearly (with antialiasing when shrinking, which keeps values inside [0, 1]).

    Args:
        uncertainty_map:
            A Python number (a constant map, batch 1); PIL images (mode `"L"` is divided by 255, `"I;16"`/`"I"` by
            65535, `"F"` taken as is); float numpy arrays or tensors of shape `(H, W)`, `(B, H, W)` or
            `(B, channels, H, W)`; or a list of any of these maps.
        channels (`int`):
            Channels the uncertainty control expects.
        height (`int`), width (`int`):
            Output size.
        argument (`str`, defaults to `"uncertainty_map"`):
            Name used in error messages.
    """
    if isinstance(uncertainty_map, bool):
        raise ValueError(f"`{argument}` must be a number in [0, 1] or a map, but got a bool.")
    if isinstance(uncertainty_map, (int, float)):
        value = float(uncertainty_map)
        if not 0.0 <= value <= 1.0:  # also rejects NaN
            raise ValueError(f"`{argument}` must lie in [0, 1], but got {uncertainty_map}.")
        return torch.full((1, channels, height, width), value, dtype=torch.float32)

    maps = []
    for item in _as_list(uncertainty_map):
        if isinstance(item, PIL.Image.Image):
            scales = {"L": 255.0, "I;16": 65535.0, "I": 65535.0, "F": 1.0}
            if item.mode not in scales:
                raise ValueError(
                    f"`{argument}` PIL images must be single-channel (mode 'L', 'I;16', 'I' or 'F'), "
                    f"but got mode {item.mode!r}."
                )
            item = torch.from_numpy(np.array(item).astype(np.float32) / scales[item.mode])
        elif isinstance(item, np.ndarray):
            if not np.issubdtype(item.dtype, np.floating):
                raise ValueError(f"`{argument}` arrays must be floats in [0, 1], but got dtype {item.dtype}.")
            item = torch.from_numpy(item.astype(np.float32))
        elif torch.is_tensor(item):
            if not item.dtype.is_floating_point:
                raise ValueError(f"`{argument}` tensors must be floats in [0, 1], but got dtype {item.dtype}.")
            item = item.detach().float().cpu()
        else:
            raise ValueError(
                f"`{argument}` must be a number, PIL image, numpy array or torch tensor (or a list of maps), "
                f"but got {type(item).__name__}."
            )
        if item.ndim == 2:
            item = item[None, None]
        elif item.ndim == 3:
            item = item[:, None]
        if item.ndim != 4 or item.shape[1] != channels:
            raise ValueError(
                f"`{argument}` must have shape (H, W), (B, H, W) or (B, {channels}, H, W), but got {tuple(item.shape)}."
            )
        maps.append(item)
    shapes = {tuple(item.shape[2:]) for item in maps}
    if len(shapes) > 1:
        raise ValueError(f"All `{argument}` maps must have the same size, but got sizes {sorted(shapes)}.")
    maps = torch.cat(maps)
    if torch.isnan(maps).any():
        raise ValueError(f"`{argument}` contains NaN values.")
    low, high = (value.item() for value in maps.aminmax())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"`{argument}` values must lie in [0, 1], but range from {low} to {high}.")
    if maps.shape[2:] != (height, width):
        shrinking = maps.shape[2] > height or maps.shape[3] > width
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)
        maps = maps.clamp(0.0, 1.0)  # only float rounding of a convex combination can leave [0, 1]
    return maps
