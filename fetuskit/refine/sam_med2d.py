"""SAM-Med2D: SAM's ViT-B image encoder with an adapter in every block, at 256 x 256 input.

Built from the modules of the ``segment_anything`` package (1.0): the blocks subclass its
``Block`` and the encoder reuses ``ImageEncoderViT.forward``; only the adapter is new. The
state_dict keys equal those of the published ``sam-med2d_b.pth`` (OpenGVLab/SAM-Med2D), so its
``ckpt["model"]`` entry loads strictly after ``fetuskit.refine.weights.convert_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.image_encoder import (
    Block,
    ImageEncoderViT,
    window_partition,
    window_unpartition,
)
from torch import nn

from fetuskit.refine.segmenter import PromptableSegmenter


@dataclass(frozen=True)
class SamMed2DConfig:
    """Architecture of SAM-Med2D. The defaults are the published ViT-B model (271 M parameters).

    ``image_size`` is the square network input in pixels; the image embedding grid is
    ``image_size // patch_size`` on each side and the low-resolution masks are 4 times that.
    """

    image_size: int = 256
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    adapter_ratio: float = 0.25
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256

    @classmethod
    def tiny(cls) -> SamMed2DConfig:
        """Return a small random-weight configuration (64 px input) for fast logic tests."""
        return cls(
            image_size=64,
            embed_dim=32,
            depth=2,
            num_heads=2,
            window_size=2,
            global_attn_indexes=(1,),
            prompt_embed_dim=32,
            decoder_heads=2,
            decoder_mlp_dim=64,
            iou_head_hidden_dim=32,
        )


class Adapter(nn.Module):
    """Channel gate, then a strided spatial branch added as a skip, then LayerNorm.

    Input and output are (B, H, W, C) token grids, as inside SAM's ViT blocks. H and W must be
    even, so that the stride-2 convolution and its transpose give back the same grid.
    """

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        # Registration order fixes the state_dict order: norm, channel, spatial.
        # LayerNorm keeps PyTorch's default eps 1e-5, unlike the 1e-6 of the ViT blocks.
        self.norm = nn.LayerNorm(dim)
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, dim, bias=False),
            nn.Sigmoid(),
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x.permute(0, 3, 1, 2)
        gate = self.channel(features.mean(dim=(2, 3)))
        gated = features * gate[:, :, None, None]
        features = features + self.spatial(gated)
        return self.norm(features.permute(0, 2, 3, 1))


class AdapterBlock(Block):
    """SAM ViT block whose MLP step also adds the adapter: x + mlp(norm2(x)) + adapter(norm2(x))."""

    def __init__(self, dim: int, adapter_ratio: float, **block_kwargs) -> None:
        super().__init__(dim=dim, **block_kwargs)
        self.Adapter = Adapter(dim, adapter_ratio)  # noqa: N815 -- key name of the published weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (height, width))
        x = shortcut + x

        normed = self.norm2(x)
        return x + self.mlp(normed) + self.Adapter(normed)


class AdapterImageEncoder(ImageEncoderViT):
    """SAM's ``ImageEncoderViT`` (rel-pos, windowed attention) with adapter blocks.

    Input (B, 3, S, S) float32 normalised with SAM's pixel mean/std on the 0-255 scale; output
    (B, 256, S / 16, S / 16).
    """

    def __init__(self, config: SamMed2DConfig) -> None:
        # depth=0 builds the patch embedding, position embedding, an empty block list and the
        # neck; the adapter blocks fill that list in place, so the key order stays SAM's.
        super().__init__(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=0,
            num_heads=config.num_heads,
            out_chans=config.prompt_embed_dim,
            qkv_bias=True,
            norm_layer=_layer_norm_eps6,
            use_rel_pos=True,
            rel_pos_zero_init=True,
            window_size=config.window_size,
            global_attn_indexes=config.global_attn_indexes,
        )
        grid = config.image_size // config.patch_size
        for index in range(config.depth):
            is_global = index in config.global_attn_indexes
            self.blocks.append(
                AdapterBlock(
                    config.embed_dim,
                    config.adapter_ratio,
                    num_heads=config.num_heads,
                    mlp_ratio=4.0,
                    qkv_bias=True,
                    norm_layer=_layer_norm_eps6,
                    use_rel_pos=True,
                    rel_pos_zero_init=True,
                    window_size=0 if is_global else config.window_size,
                    input_size=(grid, grid),
                )
            )


def _layer_norm_eps6(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


def build_sam_med2d(config: SamMed2DConfig | None = None) -> PromptableSegmenter:
    """Build SAM-Med2D with PyTorch's default initialisation; load weights separately."""
    config = config or SamMed2DConfig()
    grid = config.image_size // config.patch_size
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_heads,
        ),
        transformer_dim=config.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    return PromptableSegmenter(AdapterImageEncoder(config), prompt_encoder, mask_decoder)

