"""Set up and run a training stage from case lists, a config and a run folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from fetuskit.training.checkpoints import LATEST_CHECKPOINT
from fetuskit.training.config import TrainConfig, save_config
from fetuskit.training.data import CaseTensors, load_labelled, load_unlabelled
from fetuskit.training.distributed import DistContext, init_distributed, shutdown
from fetuskit.training.losses import chd_pos_weight_from_labels
from fetuskit.training.rng import seed_everything
from fetuskit.training.tasks import TASKS, FeatureCheck
from fetuskit.training.trainer import Trainer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


class RunFolderError(ValueError):
    """A run folder that does not fit the request (resuming a missing run, overwriting another)."""


def prepare_run_folder(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    """Create the run folder and save the resolved config in it.

    A fresh run rejects a folder that already contains a checkpoint. A resumed run needs
    ``latest.pt`` and a config equal to the saved one except for ``schedule.iterations``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_path = run_dir / CONFIG_FILE
    if resume:
        if not (run_dir / LATEST_CHECKPOINT).is_file():
            raise RunFolderError(f"cannot resume: {run_dir / LATEST_CHECKPOINT} not found; start without --resume")
        if saved_path.is_file():
            saved = json.loads(saved_path.read_text())
            current = config.to_dict()
            saved.get("schedule", {}).pop("iterations", None)
            current_without = json.loads(json.dumps(current))
            current_without["schedule"].pop("iterations", None)
            if saved != current_without:
                raise RunFolderError(
                    f"the config differs from the one saved in {saved_path}; resume with the same "
                    "--config and --set values (only schedule.iterations may change)"
                )
    elif (run_dir / LATEST_CHECKPOINT).is_file():
        raise RunFolderError(f"{run_dir} already contains a run; pass --resume to continue it or choose another --out")
    save_config(config, saved_path)


def load_case_list(source: Path | None) -> list[Any]:
    """Load a case list (folder or JSON) with ``fetuskit.cases.load_cases``; None gives []."""
    if source is None:
        return []
    from fetuskit.cases import load_cases

    return load_cases(source)


def train(
    config: TrainConfig,
    labelled_source: Path,
    unlabelled_source: Path | None,
    validation_source: Path | None,
    run_dir: Path,
    resume: bool = False,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Build the model, load the data into memory and run the configured stage.

    Without ``unlabelled_source`` the run is supervised only (the EMA teacher is still kept
    and validated). Only the main process of a torchrun job writes to ``run_dir``. ``model``
    is a network prepared by the caller (stage 2 builds it from a stage-1 checkpoint); None
    builds ``config.model``.

    Returns:
        The trainer's summary: final iteration, best score and its iteration.
    """
    from fetuskit.models import build_model

    if config.stage not in TASKS:
        raise ValueError(f"unknown stage {config.stage!r}; known stages: {', '.join(sorted(TASKS))}")
    context = init_distributed(config.run.device)
    try:
        run_dir = Path(run_dir)
        if context.is_main:
            prepare_run_folder(run_dir, config, resume)
        seed_everything(config.run.seed + context.rank)
        torch.set_float32_matmul_precision("high")

        if model is None:
            model = build_model(config.model.name, **config.model.options)
        size = config.data.input_size or int(model.input_size)
        model.to(context.device)

        labelled = load_labelled(load_case_list(labelled_source), size)
        unlabelled = load_unlabelled(load_case_list(unlabelled_source), size) if unlabelled_source else None
        validation = _load_validation(validation_source, int(model.input_size)) if context.is_main else None
        _log_data(labelled, unlabelled, validation, size)

        task = _build_task(config, labelled, unlabelled, context)
        trainer = Trainer(config, model, task, validation, run_dir, context)
        if resume:
            trainer.resume(run_dir / LATEST_CHECKPOINT)
        return trainer.run()
    finally:
        shutdown(context)


def _load_validation(source: Path | None, size: int) -> CaseTensors | None:
    # Validation images are cached at the model's own input size, as process.py prepares them.
    if source is None:
        return None
    return load_labelled(load_case_list(source), size, keep_full_masks=True)


def _build_task(config: TrainConfig, labelled: CaseTensors, unlabelled: CaseTensors | None, context: DistContext):
    if config.loss.chd_pos_weight is not None:
        pos_weight = torch.tensor(config.loss.chd_pos_weight, dtype=torch.float32)
    else:
        pos_weight = chd_pos_weight_from_labels(labelled.chd, labelled.views, config.loss.chd_pos_weight_max)
    logger.info("CHD positive weights: %s", [round(float(w), 2) for w in pos_weight])
    feature_check = FeatureCheck(config) if config.features.extractor else None
    return TASKS[config.stage](
        config,
        labelled,
        unlabelled,
        rank=context.rank,
        world_size=context.world_size,
        chd_pos_weight=pos_weight,
        feature_check=feature_check,
    )


def _log_data(
    labelled: CaseTensors, unlabelled: CaseTensors | None, validation: CaseTensors | None, size: int
) -> None:
    logger.info(
        "training at %d px: %d labelled, %d unlabelled, %d validation cases in memory",
        size, len(labelled), len(unlabelled) if unlabelled else 0, len(validation) if validation else 0,
    )
