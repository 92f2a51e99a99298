"""The dual-control ControlNet: a semantic branch (label map) and an uncertainty branch (uncertainty map).

`UncertaintyControlNetModel` *is* a diffusers `MultiControlNetModel`, so diffusers' own
`StableDiffusionControlNetPipeline` runs it unchanged. It adds what the method needs on top:

* a config of its own (`ConfigMixin`), so `save_pretrained` / `from_pretrained` write and read one
  folder (`config.json` + safetensors) instead of MultiControlNetModel's `controlnet`, `controlnet_1`, ...;
* branches whose conditioning scale is exactly 0 are skipped (diffusers computes and multiplies by 0),
  which makes a branch outside its `control_guidance_start/end` window free;
* a per-sample `semantic_mask` that switches the semantic branch off for samples without a label
  (mixed labeled/unlabeled training batches);
* a `shared_trunk` variant: one ControlNet trunk fed by the sum of the two (scaled) conditioning
  embeddings, dual control for about the price of one ControlNet pass;
* `embed_conditions`: the conditioning embeddings (which depend on neither the timestep nor the latents) computed
  once per pipeline call and reused at every denoising step.
"""

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from accelerate import init_empty_weights
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.controlnets.controlnet import (
    ControlNetConditioningEmbedding,
    ControlNetModel,
    ControlNetOutput,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn


def _controlnet_kwargs(controlnet: ControlNetModel) -> dict:
    """The constructor arguments of a `ControlNetModel`, without `conditioning_channels` and private keys."""
    return {
        key: value
        for key, value in controlnet.config.items()
        if not key.startswith("_") and key != "conditioning_channels"
    }


def _is_zero(scale) -> bool:
    """True for a Python number equal to 0: such a branch is skipped. Tensors are never skipped (no host sync)."""
    return isinstance(scale, (int, float)) and scale == 0


class _EmbeddedCondition:
    """A branch's conditioning embedding computed beforehand, handed to its `ControlNetModel` as `controlnet_cond`."""

    __slots__ = ("embedding",)

    def __init__(self, embedding: torch.Tensor):
        self.embedding = embedding


class _ReusableConditioningEmbedding(ControlNetConditioningEmbedding):
    """`ControlNetConditioningEmbedding` that passes an `_EmbeddedCondition` through unchanged.

    `ControlNetModel.forward` always embeds its `controlnet_cond`; this lets a separate branch reuse an embedding
    computed once per call. Same parameters and state-dict keys; a tensor is embedded exactly as before.
    """

    def forward(self, conditioning):
        if isinstance(conditioning, _EmbeddedCondition):
            return conditioning.embedding
        return super().forward(conditioning)


def _make_embedding_reusable(controlnet: ControlNetModel) -> None:
    # Only diffusers' own embedding class is converted (a subclass or an Identity trunk embedding is left alone),
    # and only for RGB channel order: for "bgr" ControlNetModel.forward flips `controlnet_cond` before embedding it.
    embedding = controlnet.controlnet_cond_embedding
    if type(embedding) is ControlNetConditioningEmbedding and controlnet.config.controlnet_conditioning_channel_order == "rgb":
        embedding.__class__ = _ReusableConditioningEmbedding


@dataclass
class ConditionEmbeddings:
    r"""
    The conditioning embeddings of both branches, from [`~UncertaintyControlNetModel.embed_conditions`]; pass it as
    `controlnet_cond` to the model's forward instead of the two condition tensors.

    Args:
        embeddings (`tuple` of two `torch.Tensor` or `None`):
            `(semantic, uncertainty)`, `None` for a branch that was not embedded (scale 0 or no condition). Separate
            branches: `E(condition)` (the branch's ControlNet scales its residuals). Shared trunk: `scale * E(condition)`.
        scales (`tuple` of two `float`):
            The conditioning scales the embeddings were made for.
        summed (`torch.Tensor`, *optional*):
            Shared trunk with both branches embedded: the sum of the two scaled embeddings, the trunk's input.
    """

    embeddings: tuple
    scales: tuple
    summed: torch.Tensor | None = None

    def first_rows(self, count: int) -> "ConditionEmbeddings":
        """The embeddings of the first `count` batch rows (e.g. a guidance batch without its last branch)."""
        return ConditionEmbeddings(
            tuple(None if embedding is None else embedding[:count] for embedding in self.embeddings),
            self.scales,
            None if self.summed is None else self.summed[:count],
        )


class UncertaintyControlNetModel(MultiControlNetModel, AttentionMixin, ConfigMixin):
    r"""
    A two-branch ControlNet for uncertainty-aware synthesis (UnIACorN): a *semantic* branch conditioned on a
    one-hot label map and an *uncertainty* branch conditioned on a per-pixel uncertainty map. The residuals of
    both branches are summed, exactly as diffusers' [`MultiControlNetModel`] does, and the model can be passed as
    `controlnet` to the stock `StableDiffusionControlNetPipeline` (with `image=[one_hot, uncertainty]`).

    Build it with [`~UncertaintyControlNetModel.from_unet`] (branches initialised from a base UNet, as
    `ControlNetModel.from_unet` does) or [`~UncertaintyControlNetModel.from_controlnets`] (wrap two existing
    `ControlNetModel`s); the constructor itself creates randomly initialised branches from a config.

    Args:
        semantic_channels (`int`, defaults to 3):
            Channels of the semantic condition, i.e. the number of classes of the one-hot label map.
        uncertainty_channels (`int`, defaults to 1):
            Channels of the uncertainty condition.
        shared_trunk (`bool`, defaults to `False`):
            If `False` (the paper's setting) each branch is a full `ControlNetModel`. If `True`, one ControlNet
            trunk is fed by `s_sem * E_sem(semantic) + s_unc * E_unc(uncertainty)`, the sum of two conditioning
            embeddings scaled by their conditioning scales; the trunk's own output scale is 1.
        ignore_index (`int`, *optional*):
            Label value that marks unlabeled pixels in integer label maps; such pixels get an all-zero one-hot
            vector. Stored here so that pipelines and scripts agree on it.
        controlnet_config (`dict`, *optional*):
            Constructor arguments of `ControlNetModel` (without `conditioning_channels`) for the semantic branch,
            the trunk in `shared_trunk` mode, and the uncertainty branch unless `uncertainty_controlnet_config` is
            given. Defaults to `ControlNetModel`'s defaults (Stable Diffusion 1.x sizes).
        uncertainty_controlnet_config (`dict`, *optional*):
            Constructor arguments of the uncertainty branch when it differs from the semantic branch (e.g. after
            [`~UncertaintyControlNetModel.from_controlnets`] with a Hub ControlNet as semantic branch). Not used with
            `shared_trunk=True`.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        semantic_channels: int = 3,
        uncertainty_channels: int = 1,
        shared_trunk: bool = False,
        ignore_index: int | None = None,
        controlnet_config: dict | None = None,
        uncertainty_controlnet_config: dict | None = None,
    ):
        # MultiControlNetModel.__init__ would build `self.nets` from a list; our branches have names instead,
        # and `nets` is a read-only view (see the property below).
        ModelMixin.__init__(self)
        if semantic_channels < 1:
            raise ValueError(f"`semantic_channels` must be a positive integer, but got {semantic_channels}.")
        if uncertainty_channels < 1:
            raise ValueError(f"`uncertainty_channels` must be a positive integer, but got {uncertainty_channels}.")
        if shared_trunk and uncertainty_controlnet_config is not None:
            raise ValueError(
                "`uncertainty_controlnet_config` describes a separate uncertainty ControlNet and cannot be used with "
                "`shared_trunk=True`, but both were given."
            )
        controlnet_config = dict(controlnet_config or {})
        if shared_trunk:
            self.trunk = ControlNetModel(**controlnet_config, conditioning_channels=semantic_channels)
            embedding_channels = self.trunk.config.block_out_channels[0]
            embedding_out_channels = self.trunk.config.conditioning_embedding_out_channels
            self.semantic_embedding = ControlNetConditioningEmbedding(
                embedding_channels, semantic_channels, embedding_out_channels
            )
            self.uncertainty_embedding = ControlNetConditioningEmbedding(
                embedding_channels, uncertainty_channels, embedding_out_channels
            )
            # The trunk receives the summed embedding already computed, so its own embedding is an identity.
            self.trunk.controlnet_cond_embedding = nn.Identity()
        else:
            self.semantic_controlnet = ControlNetModel(**controlnet_config, conditioning_channels=semantic_channels)
            self.uncertainty_controlnet = ControlNetModel(
                **dict(uncertainty_controlnet_config or controlnet_config), conditioning_channels=uncertainty_channels
            )
            _make_embedding_reusable(self.semantic_controlnet)
            _make_embedding_reusable(self.uncertainty_controlnet)

    # ------------------------------------------------------------------------------------------------ views
    @property
    def nets(self) -> list[ControlNetModel]:
        """The ControlNets behind the two conditions, in the order `[semantic, uncertainty]`.

        diffusers' pipelines read `len(controlnet.nets)` and `controlnet.nets[0].config`; with `shared_trunk=True`
        both conditions run through the same trunk, so the trunk is listed twice.
        """
        if self.config.shared_trunk:
            return [self.trunk, self.trunk]
        return [self.semantic_controlnet, self.uncertainty_controlnet]

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        semantic_channels: int,
        uncertainty_channels: int = 1,
        shared_trunk: bool = False,
        ignore_index: int | None = None,
        **controlnet_kwargs,
    ) -> "UncertaintyControlNetModel":
        r"""
        Create both branches (or the shared trunk) from a base UNet, copying its encoder weights as
        `ControlNetModel.from_unet` does; the conditioning embeddings and zero convolutions start as in diffusers
        (random embedding, zero output convolutions), so the untrained control adds exactly nothing.

        Args:
            unet (`UNet2DConditionModel`):
                The base UNet whose configuration and weights are copied.
            semantic_channels (`int`):
                Number of classes of the one-hot label map.
            uncertainty_channels (`int`, defaults to 1):
                Channels of the uncertainty map.
            shared_trunk (`bool`, defaults to `False`):
                One trunk with two conditioning embeddings instead of two ControlNets.
            ignore_index (`int`, *optional*):
                Label value of unlabeled pixels.
            controlnet_kwargs:
                Passed to `ControlNetModel.from_unet`, e.g. `conditioning_embedding_out_channels` or
                `load_weights_from_unet=False`.
        """
        semantic = ControlNetModel.from_unet(unet, conditioning_channels=semantic_channels, **controlnet_kwargs)
        if shared_trunk:
            return cls.from_controlnet(semantic, uncertainty_channels=uncertainty_channels, ignore_index=ignore_index)
        uncertainty = ControlNetModel.from_unet(unet, conditioning_channels=uncertainty_channels, **controlnet_kwargs)
        return cls.from_controlnets(semantic, uncertainty, ignore_index=ignore_index)

    @classmethod
    def from_controlnets(
        cls,
        semantic: ControlNetModel,
        uncertainty: ControlNetModel,
        ignore_index: int | None = None,
    ) -> "UncertaintyControlNetModel":
        r"""
        Wrap two existing ControlNets as the semantic and uncertainty branches (separate mode). The modules are
        used as they are (not copied): e.g. a Hub segmentation ControlNet as the semantic branch and a fresh
        `ControlNetModel.from_unet(unet, conditioning_channels=1)` as the uncertainty branch.

        Args:
            semantic (`ControlNetModel`):
                The semantic branch; its `conditioning_channels` becomes `semantic_channels`.
            uncertainty (`ControlNetModel`):
                The uncertainty branch; its `conditioning_channels` becomes `uncertainty_channels`.
            ignore_index (`int`, *optional*):
                Label value of unlabeled pixels.
        """
        for name, net in (("semantic", semantic), ("uncertainty", uncertainty)):
            if not isinstance(net, ControlNetModel):
                raise ValueError(f"`{name}` must be a diffusers `ControlNetModel`, but got {type(net).__name__}.")
        return cls._wrap(
            semantic.config.conditioning_channels,
            uncertainty.config.conditioning_channels,
            ignore_index,
            semantic_controlnet=semantic,
            uncertainty_controlnet=uncertainty,
        )

    @classmethod
    def from_controlnet(
        cls,
        controlnet: ControlNetModel,
        uncertainty_channels: int = 1,
        ignore_index: int | None = None,
    ) -> "UncertaintyControlNetModel":
        r"""
        Build the `shared_trunk` variant around one existing `ControlNetModel` (used as it is, not copied): its
        conditioning embedding becomes the semantic embedding, its trunk the shared trunk, and a new uncertainty
        embedding (zero output convolution, so it adds nothing until trained) is added.

        Args:
            controlnet (`ControlNetModel`):
                E.g. a Hub segmentation ControlNet; its `conditioning_channels` becomes `semantic_channels`.
            uncertainty_channels (`int`, defaults to 1):
                Channels of the uncertainty map.
            ignore_index (`int`, *optional*):
                Label value of unlabeled pixels.
        """
        if not isinstance(controlnet, ControlNetModel):
            raise ValueError(f"`controlnet` must be a diffusers `ControlNetModel`, but got {type(controlnet).__name__}.")
        if isinstance(controlnet.controlnet_cond_embedding, nn.Identity):
            raise ValueError("`controlnet` is already the trunk of a shared-trunk UncertaintyControlNetModel.")
        return cls._wrap(controlnet.config.conditioning_channels, uncertainty_channels, ignore_index, trunk=controlnet)

    @classmethod
    def _wrap(
        cls,
        semantic_channels,
        uncertainty_channels,
        ignore_index,
        trunk=None,
        semantic_controlnet=None,
        uncertainty_controlnet=None,
    ):
        """Build the wrapper without allocating weights, then put the given modules in place."""
        if trunk is not None:
            config = dict(controlnet_config=_controlnet_kwargs(trunk), shared_trunk=True)
        else:
            semantic_kwargs = _controlnet_kwargs(semantic_controlnet)
            uncertainty_kwargs = _controlnet_kwargs(uncertainty_controlnet)
            config = dict(
                controlnet_config=semantic_kwargs,
                uncertainty_controlnet_config=None if uncertainty_kwargs == semantic_kwargs else uncertainty_kwargs,
            )
        with init_empty_weights():
            model = cls(
                semantic_channels=semantic_channels,
                uncertainty_channels=uncertainty_channels,
                ignore_index=ignore_index,
                **config,
            )
        if trunk is not None:
            # The trunk's own conditioning embedding becomes the semantic embedding; the uncertainty embedding is
            # new, initialised as diffusers initialises a ControlNet's (zero output convolution).
            model.semantic_embedding = trunk.controlnet_cond_embedding
            model.uncertainty_embedding = ControlNetConditioningEmbedding(
                trunk.config.block_out_channels[0], uncertainty_channels, trunk.config.conditioning_embedding_out_channels
            ).to(device=trunk.device, dtype=trunk.dtype)
            trunk.controlnet_cond_embedding = nn.Identity()
            model.trunk = trunk
        else:
            for controlnet in (semantic_controlnet, uncertainty_controlnet):
                _make_embedding_reusable(controlnet)
            model.semantic_controlnet = semantic_controlnet
            model.uncertainty_controlnet = uncertainty_controlnet
        return model

    # ------------------------------------------------------------------------------------- save and load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        **kwargs,
    ):
        r"""
        Save the config and all weights of both branches to one folder (`ModelMixin.save_pretrained`; not
        MultiControlNetModel's one-folder-per-ControlNet layout).

        Args:
            save_directory (`str` or `os.PathLike`):
                Folder to write to; created if missing.
            is_main_process (`bool`, defaults to `True`):
                Only the main process writes, in distributed runs.
            save_function (`Callable`, *optional*):
                Replaces `torch.save` / safetensors saving.
            safe_serialization (`bool`, defaults to `True`):
                Save as safetensors.
            variant (`str`, *optional*):
                Weight file variant, e.g. `"fp16"`.
            kwargs:
                Passed to `ModelMixin.save_pretrained` (e.g. `push_to_hub=True`, `max_shard_size`).
        """
        return ModelMixin.save_pretrained(
            self,
            save_directory,
            is_main_process=is_main_process,
            save_function=save_function,
            safe_serialization=safe_serialization,
            variant=variant,
            **kwargs,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""
        Load a model saved with [`~UncertaintyControlNetModel.save_pretrained`] from a local folder or a Hub id
        (resolved through `huggingface_hub` and its cache; works offline with `HF_HUB_OFFLINE=1` once cached).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                Folder or Hub repository id.
            kwargs:
                The arguments of `ModelMixin.from_pretrained` (`subfolder`, `torch_dtype`, `revision`, ...).
        """
        # Skip MultiControlNetModel.from_pretrained (folder-per-net layout) and use ModelMixin's.
        return super(MultiControlNetModel, cls).from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------- conditioning
    def _check_conditions(self, controlnet_cond, conditioning_scale, batch_size: int | None) -> None:
        """Validate `[semantic, uncertainty]` conditions and scales (shapes only: no host sync)."""
        if not isinstance(controlnet_cond, (list, tuple)) or len(controlnet_cond) != 2:
            raise ValueError(
                "`controlnet_cond` must be a list `[semantic, uncertainty]` of two tensors, but got "
                f"{type(controlnet_cond).__name__}"
                + (f" of length {len(controlnet_cond)}" if isinstance(controlnet_cond, (list, tuple)) else "")
                + "."
            )
        if not isinstance(conditioning_scale, (list, tuple)) or len(conditioning_scale) != 2:
            raise ValueError(
                f"`conditioning_scale` must be a list `[semantic_scale, uncertainty_scale]`, but got {conditioning_scale!r}."
            )
        expected_channels = (self.config.semantic_channels, self.config.uncertainty_channels)
        for name, cond, scale, channels in zip(
            ("semantic", "uncertainty"), controlnet_cond, conditioning_scale, expected_channels
        ):
            if _is_zero(scale):
                continue
            if (
                cond is None
                or cond.ndim != 4
                or cond.shape[1] != channels
                or (batch_size is not None and cond.shape[0] != batch_size)
            ):
                got = "None" if cond is None else tuple(cond.shape)
                expected = f"({batch_size}, {channels}, H, W) to match `sample`" if batch_size else f"(B, {channels}, H, W)"
                raise ValueError(f"The {name} condition must have shape {expected}, but got {got}.")

    def embed_conditions(
        self, controlnet_cond: list[torch.Tensor | None], conditioning_scale: list[float]
    ) -> ConditionEmbeddings:
        r"""
        The conditioning embeddings of both branches. They depend on neither the timestep nor the latents, so a
        pipeline computes them once per call and passes the result as `controlnet_cond` at every denoising step; the
        residuals are exactly those computed from the conditions themselves.

        Pass the conditions of the whole batch the model will see (e.g. both classifier-free-guidance halves):
        embedding one half and repeating it is not bitwise equal, since convolution kernels can depend on the batch
        size.

        Args:
            controlnet_cond (`list` of two `torch.Tensor`):
                `[semantic, uncertainty]` conditions as for `forward`; an entry may be `None` when its scale is 0.
            conditioning_scale (`list` of two `float`):
                `[s_sem, s_unc]`, Python numbers. A branch at 0 is not embedded. At each step `forward` accepts for
                each branch this scale or 0 (a branch outside its guidance window).
        """
        self._check_conditions(controlnet_cond, conditioning_scale, batch_size=None)
        for scale in conditioning_scale:
            if not isinstance(scale, (int, float)):
                raise ValueError(f"`conditioning_scale` must hold Python numbers, but got {type(scale).__name__}.")
        embeddings = []
        if self.config.shared_trunk:
            modules = (self.semantic_embedding, self.uncertainty_embedding)
            for cond, scale, module in zip(controlnet_cond, conditioning_scale, modules):
                embeddings.append(None if _is_zero(scale) else module(cond) * scale)
            summed = None if None in embeddings else embeddings[0] + embeddings[1]
            return ConditionEmbeddings(tuple(embeddings), tuple(conditioning_scale), summed)
        for cond, scale, net in zip(controlnet_cond, conditioning_scale, self.nets):
            if _is_zero(scale):
                embeddings.append(None)
            elif isinstance(net.controlnet_cond_embedding, _ReusableConditioningEmbedding):
                embeddings.append(net.controlnet_cond_embedding(cond))
            else:  # the branch's ControlNet embeds its condition itself (see _make_embedding_reusable)
                embeddings.append(cond)
        return ConditionEmbeddings(tuple(embeddings), tuple(conditioning_scale))

    def _check_embeddings(self, embedded: ConditionEmbeddings, conditioning_scale, batch_size: int) -> None:
        if not isinstance(conditioning_scale, (list, tuple)) or len(conditioning_scale) != 2:
            raise ValueError(
                f"`conditioning_scale` must be a list `[semantic_scale, uncertainty_scale]`, but got {conditioning_scale!r}."
            )
        for name, embedding, made_for, scale in zip(
            ("semantic", "uncertainty"), embedded.embeddings, embedded.scales, conditioning_scale
        ):
            if _is_zero(scale):
                continue
            if embedding is None or scale != made_for:
                raise ValueError(
                    f"The {name} embedding was made for conditioning scale {made_for}; a step can use that scale or 0, "
                    f"but got {scale}."
                )
            if embedding.shape[0] != batch_size:
                raise ValueError(
                    f"The {name} embedding has batch size {embedding.shape[0]}, but `sample` has {batch_size}."
                )

    # --------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: list[torch.Tensor] | ConditionEmbeddings,
        conditioning_scale: list[float],
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
        semantic_mask: torch.Tensor | None = None,
    ) -> ControlNetOutput | tuple:
        r"""
        The contract of `MultiControlNetModel.forward`, with the two conditions in the order
        `[semantic, uncertainty]`.

        Args:
            sample (`torch.Tensor`):
                The noisy latents, `(batch, channels, height, width)`.
            timestep (`torch.Tensor`, `float` or `int`):
                The denoising timestep(s).
            encoder_hidden_states (`torch.Tensor`):
                Text (or style) embeddings for cross-attention.
            controlnet_cond (`list` of two `torch.Tensor`, or [`ConditionEmbeddings`]):
                `[semantic, uncertainty]` conditions at image resolution: the one-hot label map
                `(batch, semantic_channels, H, W)` and the uncertainty map `(batch, uncertainty_channels, H, W)`.
                An entry may be `None` when its scale is 0. Or their embeddings from
                [`~UncertaintyControlNetModel.embed_conditions`], made once per pipeline call.
            conditioning_scale (`list` of two `float`):
                `[s_sem, s_unc]`. A branch whose scale is the number 0 is not computed; the result is identical to
                computing it and multiplying by 0. With embeddings, each scale is the one they were made for, or 0.
            class_labels, timestep_cond, attention_mask, added_cond_kwargs, cross_attention_kwargs, guess_mode:
                As in `ControlNetModel.forward`.
            return_dict (`bool`, defaults to `True`):
                Kept for the `MultiControlNetModel` contract; like it, the residuals are returned as a tuple
                `(down_block_res_samples, mid_block_res_sample)` either way.
            semantic_mask (`torch.Tensor`, *optional*):
                Boolean tensor of shape `(batch,)`. Where `False`, the semantic branch contributes nothing for that
                sample (an unlabeled sample in a mixed batch): its residuals (separate branches) or its embedding
                (shared trunk) are multiplied by the mask. The branch still runs on the whole batch, so the mask is
                never read on the host: no device sync and the same shapes every step (what `torch.compile` and
                CUDA graphs need), at the price of the semantic branch's work on unlabeled samples.

        Returns:
            `tuple`: `(down_block_res_samples, mid_block_res_sample)`, the summed residuals for the UNet.
        """
        batch_size = sample.shape[0]
        embedded = controlnet_cond if isinstance(controlnet_cond, ConditionEmbeddings) else None
        if embedded is not None:
            self._check_embeddings(embedded, conditioning_scale, batch_size)
            semantic_cond, uncertainty_cond = embedded.embeddings
        else:
            self._check_conditions(controlnet_cond, conditioning_scale, batch_size)
            semantic_cond, uncertainty_cond = controlnet_cond
        semantic_scale, uncertainty_scale = conditioning_scale

        # A sample whose semantic switch is off gets no semantic control (checked on shape and dtype only: its
        # values stay on the device).
        if semantic_mask is not None and (semantic_mask.dtype != torch.bool or semantic_mask.shape != (batch_size,)):
            raise ValueError(
                f"`semantic_mask` must be a boolean tensor of shape ({batch_size},), but got dtype "
                f"{semantic_mask.dtype} and shape {tuple(semantic_mask.shape)}."
            )

        net_kwargs = dict(
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            class_labels=class_labels,
            timestep_cond=timestep_cond,
            attention_mask=attention_mask,
            added_cond_kwargs=added_cond_kwargs,
            cross_attention_kwargs=cross_attention_kwargs,
            guess_mode=guess_mode,
            return_dict=False,
        )
        if self.config.shared_trunk:
            return self._forward_shared(
                sample,
                semantic_cond,
                uncertainty_cond,
                semantic_scale,
                uncertainty_scale,
                semantic_mask,
                net_kwargs,
                embedded,
            )

        def branch_input(net, cond):
            # An embedding made by embed_conditions goes past the branch's own conditioning embedding.
            if embedded is not None and isinstance(net.controlnet_cond_embedding, _ReusableConditioningEmbedding):
                return _EmbeddedCondition(cond)
            return cond

        results = []
        if not _is_zero(semantic_scale):
            net = self.semantic_controlnet
            down, mid = net(
                sample=sample,
                controlnet_cond=branch_input(net, semantic_cond),
                conditioning_scale=semantic_scale,
                **net_kwargs,
            )
            if semantic_mask is not None:
                down, mid = _mask_samples((down, mid), semantic_mask)
            results.append((down, mid))
        if not _is_zero(uncertainty_scale):
            net = self.uncertainty_controlnet
            results.append(
                net(
                    sample=sample,
                    controlnet_cond=branch_input(net, uncertainty_cond),
                    conditioning_scale=uncertainty_scale,
                    **net_kwargs,
                )
            )
        if not results:
            return self.zero_residuals(sample)
        # Merge as MultiControlNetModel.forward does: sum over branches.
        down_block_res_samples, mid_block_res_sample = results[0]
        for down, mid in results[1:]:
            down_block_res_samples = [previous + current for previous, current in zip(down_block_res_samples, down)]
            mid_block_res_sample = mid_block_res_sample + mid
        return down_block_res_samples, mid_block_res_sample

    def _forward_shared(
        self,
        sample,
        semantic_cond,
        uncertainty_cond,
        semantic_scale,
        uncertainty_scale,
        semantic_mask,
        net_kwargs,
        embedded=None,
    ):
        semantic_on, uncertainty_on = not _is_zero(semantic_scale), not _is_zero(uncertainty_scale)
        if embedded is not None and semantic_on and uncertainty_on and semantic_mask is None:
            embedding = embedded.summed
        else:
            # From embeddings (already scaled) or from the conditions, in the same operations and order.
            embedding = None
            if semantic_on:
                embedding = (
                    semantic_cond if embedded is not None else self.semantic_embedding(semantic_cond) * semantic_scale
                )
                if semantic_mask is not None:
                    embedding = embedding * semantic_mask.to(embedding.dtype).view(-1, 1, 1, 1)
            if uncertainty_on:
                uncertainty_embedding = (
                    uncertainty_cond
                    if embedded is not None
                    else self.uncertainty_embedding(uncertainty_cond) * uncertainty_scale
                )
                embedding = uncertainty_embedding if embedding is None else embedding + uncertainty_embedding
        if embedding is None:
            # Both scales 0: no control at all, so the trunk is not run either.
            return self.zero_residuals(sample)
        return self.trunk(sample=sample, controlnet_cond=embedding, conditioning_scale=1.0, **net_kwargs)

    def zero_residuals(self, sample: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        r"""
        All-zero residuals of the shapes this model returns for `sample`, without running any network: what every
        branch returns at scale 0.

        Args:
            sample (`torch.Tensor`):
                The noisy latents the residuals are for.
        """
        config = self.nets[0].config
        batch_size, _, height, width = sample.shape
        shapes = [(config.block_out_channels[0], height, width)]
        for index, channels in enumerate(config.block_out_channels):
            shapes += [(channels, height, width)] * config.layers_per_block
            if index < len(config.block_out_channels) - 1:
                # diffusers' Downsample2D: 3x3 convolution, stride 2, padding 1.
                height, width = (height + 1) // 2, (width + 1) // 2
                shapes.append((channels, height, width))
        mid_shape = (config.block_out_channels[-1], height, width)
        if config.global_pool_conditions:
            shapes = [(channels, 1, 1) for channels, _, _ in shapes]
            mid_shape = (mid_shape[0], 1, 1)
        zeros = [sample.new_zeros((batch_size, *shape)) for shape in shapes]
        return zeros, sample.new_zeros((batch_size, *mid_shape))


def _mask_samples(residuals, mask: torch.Tensor):
    """Zero the residuals of the samples where `mask` is `False` (a multiplication: no host sync, no data-dependent
    shapes); the kept samples' residuals are unchanged (multiplied by exactly 1)."""
    down, mid = residuals

    def masked(tensor):
        return tensor * mask.to(tensor.dtype).view(-1, *([1] * (tensor.ndim - 1)))

    return [masked(tensor) for tensor in down], masked(mid)
