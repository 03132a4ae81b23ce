"""Commands: convert-weights and refiner (fine-tuning of the boundary refiner)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fetuskit.errors import FetusError
from fetuskit.refine.training import RefinerTrainingConfig, RefinerTrainingError, train_refiner
from fetuskit.refine.weights import BACKENDS, WeightsError, convert_weights
from train.cli import app


@app.command("convert-weights")
def convert_weights_command(
    source: Annotated[Path, typer.Argument(help="Published checkpoint, e.g. sam-med2d_b.pth (unpickled in full).")],
    destination: Annotated[Path, typer.Argument(help="Slim weights file to write; loads with weights_only=True.")],
    kind: Annotated[str, typer.Option(help=f"Backend of the checkpoint: one of {sorted(BACKENDS)}.")] = "sam-med2d",
) -> None:
    """Convert a published refiner checkpoint into a slim, model-only weights file.

    The source is fully unpickled, so convert only files from a trusted origin. Every model
    entry must load strictly; optimizer state and other entries are dropped.
    """
    try:
        written = convert_weights(source, destination, kind)
    except (WeightsError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(f"wrote {written}")


@app.command("refiner")
def refiner_command(
    data: Annotated[Path, typer.Option(help="Labelled cases: a folder of .h5 images or a JSON case list.")],
    out: Annotated[Path, typer.Option(help="Output folder for refiner.pt, refiner_config.json and metrics.jsonl.")],
    backend: Annotated[str, typer.Option(help=f"Refiner backend: one of {sorted(BACKENDS)}.")] = "litemedsam",
    weights: Annotated[
        Path | None, typer.Option(help="Starting weights (slim file); default: the backend's packaged weights.")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the labelled images.")] = 5,
    prompts_per_image: Annotated[int, typer.Option(help="Classes decoded together per image and step.")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    margin: Annotated[int, typer.Option(help="Box margin in image pixels.")] = 5,
    max_shift: Annotated[int, typer.Option(help="Largest boundary shift of the mask perturbations, in pixels.")] = 3,
    use_point: Annotated[bool, typer.Option(help="Add the interior point as a positive click.")] = False,
    use_mask_prompt: Annotated[bool, typer.Option(help="Pass the perturbed mask as a mask prompt.")] = False,
    enclosing_class: Annotated[
        list[int] | None,
        typer.Option(help="Class trained on the filled region it outlines, e.g. 7 (thoracic cavity); repeatable."),
    ] = None,
    train_adapters: Annotated[
        bool, typer.Option(help="Also train SAM-Med2D's encoder adapters (encodes every step, slow on CPU).")
    ] = False,
    max_cases: Annotated[int | None, typer.Option(help="Use only the first N labelled cases.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the perturbations and the prompt order.")] = 0,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Fine-tune the refiner's mask decoder on prompts from perturbed ground-truth masks."""
    try:
        config = RefinerTrainingConfig(
            backend=backend,
            weights=None if weights is None else str(weights),
            epochs=epochs,
            prompts_per_image=prompts_per_image,
            lr=lr,
            margin=margin,
            max_shift=max_shift,
            use_point=use_point,
            use_mask_prompt=use_mask_prompt,
            enclosing_classes=tuple(enclosing_class or ()),
            train_adapters=train_adapters,
            max_cases=max_cases,
            seed=seed,
            device=device,
        )
        summary = train_refiner(data, out, config)
    except (RefinerTrainingError, WeightsError, FetusError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(f"wrote {summary['weights']}; loss per epoch {[round(x, 4) for x in summary['losses']]}")
