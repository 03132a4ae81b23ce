"""Commands that convert external data into FETUS case files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fetuskit.convert import (
    FOCUS_CLASS_MAP,
    FOCUS_MASK_PATTERN,
    ConversionError,
    ConvertConfig,
    convert_focus_split,
    convert_png_folder,
    parse_class_map,
)
from train.cli import app


def _run_conversion(convert, *args) -> None:
    try:
        convert(*args)
    except ConversionError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(code=2) from error


@app.command("convert-focus")
def convert_focus(
    split_dir: Annotated[Path, typer.Argument(help="A FOCUS split folder, such as focus/testing.")],
    dst: Annotated[Path, typer.Argument(help="Output folder for images/, labels/ and list.json.")],
) -> None:
    """Convert a FOCUS split into FETUS 4CH files with classes 5 (heart) and 7 (thoracic cavity).

    Reads images/NNN.png and annfiles_mask/NNN-cardiac.png and NNN-thorax.png. Class 5 is the
    cardiac ellipse, class 7 the thorax ellipse outside the heart, 0 elsewhere. FOCUS has no
    chamber, vessel or disease annotation, so these files score only classes 5 and 7 and their
    CHD label vectors are all zeros. Images are padded to a centred square and resized to
    512x512, bilinear for images and nearest for masks. Each image file stores the padding,
    scale, original size, source file and CC BY 4.0 licence as attributes.
    """
    _run_conversion(convert_focus_split, split_dir, dst)


@app.command("convert-png")
def convert_png(
    images_dir: Annotated[Path, typer.Argument(help="Folder of .png images.")],
    masks_dir: Annotated[Path, typer.Argument(help="Folder of binary .png masks, one per image and class.")],
    dst: Annotated[Path, typer.Argument(help="Output folder for images/, labels/ and list.json.")],
    class_map: Annotated[
        str,
        typer.Option(help="Mask name to FETUS class, in priority order: the first entry wins where masks overlap."),
    ] = FOCUS_CLASS_MAP,
    mask_pattern: Annotated[
        str,
        typer.Option(help="Mask file name; {stem} is the image file's stem, {key} a name from --class-map."),
    ] = FOCUS_MASK_PATTERN,
    view: Annotated[int, typer.Option(help="FETUS view id 1..4 (1 = 4CH) written to every image.")] = 1,
    licence: Annotated[str, typer.Option(help="Licence text stored with every image file.")] = "",
) -> None:
    """Convert PNG images with one binary PNG mask per class into FETUS files.

    Masks contain only 0 and 255 (or 0 and 1). Every case is checked first: missing masks, size
    mismatches and non-binary masks are all reported at once and nothing is written.
    """
    try:
        config = ConvertConfig(
            class_map=parse_class_map(class_map, view),
            mask_pattern=mask_pattern,
            view_id=view,
            licence=licence,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    _run_conversion(convert_png_folder, images_dir, masks_dir, dst, config)
