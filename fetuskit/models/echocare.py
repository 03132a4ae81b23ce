"""``echocare``: the FETUS 2026 baseline network, rebuilt layer for layer from MONAI 1.6.1 blocks.

The encoder is a 2-D Swin-V2 (MONAI ``SwinTransformer``, the architecture of the EchoCare
ultrasound foundation model) with frozen weights and LoRA on the q and v projections. A
UNETR-style decoder maps it to 15 classes. A CHD head and our own view head read the pooled
bottleneck.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch
from torch import nn

from fetuskit.labels import NUM_CLASSES, NUM_VIEWS
from fetuskit.models.base import ModelOutput
from fetuskit.models.chd_heads import build_chd_head
from fetuskit.models.foreign import load_echocare_encoder
from fetuskit.models.heads import Network, check_heads_output, check_image_batch, mlp_head
from fetuskit.models.lora import LoRAQKV
from fetuskit.models.registry import register_model

if TYPE_CHECKING:
    from monai.networks.nets.swin_unetr import SwinTransformer

# MONAI is imported inside the constructors, not at module level: importing it takes seconds,
# and the container pays that on every run even when no echocare member is in the ensemble.

logger = logging.getLogger(__name__)

# The input adapter turns the gray channel into the 3 channels the encoder was pretrained on.
ENCODER_IN_CHANNELS = 3
# MONAI's instance norm without learnable affine parameters, as in the baseline decoder.
_NORM = ("instance", {"affine": False})


@dataclass
class EchoCareConfig:
    """Settings of ``echocare``; the defaults reproduce the FETUS 2026 baseline exactly.

    Attributes:
        input_size: side in pixels of the square input at training and inference.
        embed_dim: channels of the first Swin stage; stage i has ``embed_dim * 2**i``.
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        window_size: side of the attention window in tokens.
        patch_size: side of the patch embedding in pixels.
        feature_size: channels of the first decoder level; level i has ``feature_size * 2**i``.
        lora_rank: rank of the q and v adapters.
        lora_alpha: LoRA scale numerator; the update is multiplied by ``lora_alpha / lora_rank``.
        chd_hidden: hidden width of the CHD head.
        chd_head: ``"pooled"`` or ``"multiscale"``; see ``fetuskit.models.chd_heads``.
        chd_head_levels: deepest Swin outputs the multiscale CHD head reads.
        chd_head_areas: the multiscale CHD head also reads the predicted structure areas.
        view_hidden: hidden width of the view head.
        encoder_weights: path of an EchoCare encoder checkpoint (``echocare_encoder.pth``
            layout) loaded when the model is built, or None to keep the random initialisation.
        gradient_checkpointing: recompute Swin blocks in the backward pass to save memory.
    """

    input_size: int = 256
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    patch_size: int = 2
    feature_size: int = 64
    lora_rank: int = 5
    lora_alpha: float = 5.0
    chd_hidden: int = 512
    chd_head: str = "pooled"
    chd_head_levels: int = 3
    chd_head_areas: bool = False
    view_hidden: int = 256
    encoder_weights: str | None = None
    gradient_checkpointing: bool = False


class UNETRDecoder(nn.Module):
    """UNETR decoder over the adapted input and the five Swin outputs, to segmentation logits.

    Block names follow MONAI's ``SwinUNETR``; ``encoder5`` is the extra skip block of the
    FETUS 2026 baseline that projects the fourth Swin output before ``decoder5``.
    """

    def __init__(self, in_channels: int, embed_dim: int, feature_size: int, out_channels: int) -> None:
        super().__init__()
        fs = feature_size

        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock

        def skip_block(inputs: int, outputs: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(2, inputs, outputs, kernel_size=3, stride=1, norm_name=_NORM, res_block=True)

        def up_block(inputs: int, outputs: int) -> UnetrUpBlock:
            return UnetrUpBlock(
                2, inputs, outputs, kernel_size=3, upsample_kernel_size=2, norm_name=_NORM, res_block=True
            )

        self.encoder1 = skip_block(in_channels, fs)
        self.encoder2 = skip_block(embed_dim, fs)
        self.encoder3 = skip_block(2 * embed_dim, 2 * fs)
        self.encoder4 = skip_block(4 * embed_dim, 4 * fs)
        self.encoder5 = skip_block(8 * embed_dim, 8 * fs)
        self.encoder10 = skip_block(16 * embed_dim, 16 * fs)
        self.decoder5 = up_block(16 * fs, 8 * fs)
        self.decoder4 = up_block(8 * fs, 4 * fs)
        self.decoder3 = up_block(4 * fs, 2 * fs)
        self.decoder2 = up_block(2 * fs, fs)
        self.decoder1 = up_block(fs, fs)
        self.out = UnetOutBlock(2, fs, out_channels)
        self.bottleneck_channels = 16 * fs

    def bottleneck(self, deepest: torch.Tensor) -> torch.Tensor:
        """Map the deepest Swin output (N, 16 * embed, h, w) to the (N, 16 * feature_size, h, w) bottleneck."""
        return self.encoder10(deepest)

    def forward(self, image: torch.Tensor, hidden: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits (N, out, H, W), bottleneck) for the adapted image and the 5 Swin outputs."""
        skip0 = self.encoder1(image)
        skip1 = self.encoder2(hidden[0])
        skip2 = self.encoder3(hidden[1])
        skip3 = self.encoder4(hidden[2])
        skip4 = self.encoder5(hidden[3])
        bottleneck = self.bottleneck(hidden[4])
        up = self.decoder5(bottleneck, skip4)
        up = self.decoder4(up, skip3)
        up = self.decoder3(up, skip2)
        up = self.decoder2(up, skip1)
        up = self.decoder1(up, skip0)
        return self.out(up), bottleneck


def add_lora(swin: SwinTransformer, rank: int, alpha: float) -> None:
    """Replace the qkv layer of every WindowAttention in ``swin`` with a :class:`LoRAQKV` wrapper."""
    from monai.networks.nets.swin_unetr import WindowAttention

    for module in swin.modules():
        if isinstance(module, WindowAttention):
            module.qkv = LoRAQKV(module.qkv, rank, alpha)


class EchoCareNet(Network):
    """The FETUS 2026 baseline network with a view head; see :class:`EchoCareConfig`.

    ``forward(x)`` takes (N, 1, H, W) float images in [0, 1] with H and W divisible by
    ``patch_size * 2**len(depths)`` (32 by default) and returns
    :class:`~fetuskit.models.base.ModelOutput` logits. Only the LoRA adapters, the input
    adapter, the decoder and the heads train; every other Swin weight is frozen.
    """

    def __init__(self, config: EchoCareConfig) -> None:
        super().__init__()
        if len(config.depths) != 4 or len(config.num_heads) != 4:
            raise ValueError(
                f"echocare needs 4 Swin stages, got depths={config.depths} num_heads={config.num_heads}"
            )
        self.config = config
        self.size_multiple = config.patch_size * 2 ** len(config.depths)

        self.in_adapter = nn.Conv2d(1, ENCODER_IN_CHANNELS, kernel_size=1, bias=False)
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.swin = SwinTransformer(
            in_chans=ENCODER_IN_CHANNELS,
            embed_dim=config.embed_dim,
            window_size=(config.window_size, config.window_size),
            patch_size=(config.patch_size, config.patch_size),
            depths=config.depths,
            num_heads=config.num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=config.gradient_checkpointing,
            spatial_dims=2,
            use_v2=True,
        )
        # Freeze the pretrained encoder before wrapping, so only the adapters train.
        self.swin.requires_grad_(False)
        add_lora(self.swin, config.lora_rank, config.lora_alpha)

        self.unetr = UNETRDecoder(ENCODER_IN_CHANNELS, config.embed_dim, config.feature_size, NUM_CLASSES)
        pooled = self.unetr.bottleneck_channels
        self.chd_head = build_chd_head(
            config.chd_head,
            pooled_features=pooled,
            level_channels=[config.embed_dim * 2**level for level in range(len(config.depths) + 1)],
            hidden=config.chd_hidden,
            levels=config.chd_head_levels,
            use_areas=config.chd_head_areas,
        )
        self.view_head = mlp_head(pooled, config.view_hidden, NUM_VIEWS)
        self.reset_in_adapter()

    def reset_in_adapter(self) -> None:
        """Set the input adapter to copy the gray channel to all three encoder channels."""
        nn.init.ones_(self.in_adapter.weight)

    def reset_lora(self) -> None:
        """Re-initialise every LoRA adapter so that it adds exactly 0."""
        for module in self.swin.modules():
            if isinstance(module, LoRAQKV):
                module.reset_lora()

    def _adapt(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.size_multiple, "echocare")
        height, width = x.shape[-2:]
        if height == width == self.size_multiple:
            # The bottleneck would be one cell, and instance norm over one value is undefined.
            raise ValueError(
                f"echocare needs more than one bottleneck cell, got a {height}x{width} input; "
                f"use at least {self.size_multiple}x{2 * self.size_multiple} pixels"
            )
        return self.in_adapter(x)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the 5 channel-normalised Swin outputs; stage i is (N, embed * 2**i, H / 2**(i+1), W / 2**(i+1))."""
        return self.swin(self._adapt(x), normalize=True)

    def heads_input(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Return the (N, 16 * feature_size) spatial mean of the decoder bottleneck."""
        return self.unetr.bottleneck(features[-1]).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        image = self._adapt(x)
        hidden = self.swin(image, normalize=True)
        seg, bottleneck = self.unetr(image, hidden)
        chd, view = self.predict_heads(bottleneck.mean(dim=(2, 3)), hidden, seg)
        check_heads_output(chd, view)
        return ModelOutput(seg=seg, chd=chd, view=view)


@register_model(
    "echocare",
    EchoCareConfig,
    tiny_config={
        "embed_dim": 16,
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 2, 2, 4),
        "window_size": 4,
        "feature_size": 8,
        "lora_rank": 2,
        "lora_alpha": 2.0,
        "chd_hidden": 16,
        "view_hidden": 16,
    },
)
def build_echocare(config: EchoCareConfig, load_weights: bool) -> EchoCareNet:
    """Build ``echocare`` and, if ``load_weights``, load ``config.encoder_weights`` into its encoder."""
    model = EchoCareNet(config)
    if load_weights and config.encoder_weights:
        load_echocare_encoder(model, config.encoder_weights)
    return model
