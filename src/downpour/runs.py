"""A trained run, loaded back from its run directory: config, model with its final parameters, preprocessing.

Everything that looks at a finished run (evaluation, pictures, detection, the report) starts from
:func:`load_run`, so all of them feed the network exactly what training fed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from downpour import checkpoint as ckpt
from downpour import config as config_mod
from downpour import rundir
from downpour.config import Config, DataConfig
from downpour.data.whitening import remove_example_mean
from downpour.errors import CheckpointError, DownpourError
from downpour.models import build_model

# Sources whose example shape is fixed by the data itself, not by a config key.
_FIXED_SHAPES = {"lfw-faces": (1, 25, 25), "digits": (1, 8, 8)}


def example_shape(config: DataConfig) -> tuple[int, int, int]:
    """The ``(C, H, W)`` of one training example of ``config`` (what :func:`downpour.data.load_dataset` yields)."""
    if config.source in _FIXED_SHAPES:
        return _FIXED_SHAPES[config.source]
    if config.source == "natural-patches":
        return (1, config.patch_size, config.patch_size)
    return (config.channels, config.image_size, config.image_size)  # natural-images and image sources like it


@dataclass
class TrainedRun:
    """A run directory's model (eval mode, final parameters) and the preprocessing its training examples had.

    ``preprocess`` maps raw images in [0, 1] to the flat vectors the model was trained on; ``features`` runs the
    model on them and returns one flat feature vector per image.
    """

    run_dir: Path
    config: Config
    model: nn.Module
    input_shape: tuple[int, int, int]  # (C, H, W) of one example
    whitening: Tensor | None  # (D, D) ZCA matrix applied after per-example mean removal, or None
    step: int  # the global step of the loaded checkpoint
    centre: Tensor | None = None  # (D,) the training mean removed before whitening (data.whiten_centre), or None

    @property
    def input_dim(self) -> int:
        """Values per example, ``C·H·W``."""
        return math.prod(self.input_shape)

    def preprocess(self, x: Tensor) -> Tensor:
        """Raw images ``(N, C, H, W)`` in [0, 1] → ``(N, D)``: each example's mean removed, then ZCA (if trained so).

        The same steps as :func:`downpour.data.load_dataset`, with the run's saved whitening matrix.
        """
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise DownpourError(f"expected images (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        flat = remove_example_mean(x.float().reshape(x.shape[0], -1))  # (N, D)
        if self.whitening is None:
            return flat
        return (flat - self.centre if self.centre is not None else flat) @ self.whitening  # ZCA is symmetric

    @torch.no_grad()
    def features(self, x: Tensor, *, batch_size: int = 256) -> Tensor:
        """The model's feature representation of raw images ``(N, C, H, W)``: ``(N, F)``, computed in batches."""
        pieces = [self.model(self.preprocess(x[i : i + batch_size])).flatten(1) for i in range(0, len(x), batch_size)]
        return torch.cat(pieces) if pieces else torch.empty(0, 0)  # (N, F)


def _load_whitening(run_dir: Path, dim: int) -> tuple[Tensor, Tensor | None]:
    """The run's ZCA matrix ``(D, D)`` and the training mean removed before it ``(D,)`` (None unless the run was
    trained with ``data.whiten_centre``)."""
    path = run_dir / rundir.WHITENING
    try:
        tensors = load_file(str(path))
        zca, mean = tensors.get("zca"), tensors.get("mean")
    except FileNotFoundError:
        raise CheckpointError(f"run {run_dir} was trained with data.whiten = true but {path} is missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt whitening matrix {path}: {exc}") from None
    if zca is None or tuple(zca.shape) != (dim, dim):
        found = "no 'zca' tensor" if zca is None else f"shape {tuple(zca.shape)}"
        raise CheckpointError(f"whitening matrix {path} has {found}; expected ({dim}, {dim})")
    if not bool(torch.isfinite(zca).all()):
        raise CheckpointError(f"whitening matrix {path} holds NaN or Inf values (the data had no variance?); "
                              "train the run again")  # fmt: skip
    if mean is not None and (tuple(mean.shape) != (dim,) or not bool(torch.isfinite(mean).all())):
        raise CheckpointError(f"whitening mean in {path} has shape {tuple(mean.shape)} or non-finite values; "
                              f"expected ({dim},)")  # fmt: skip
    return zca.float(), None if mean is None else mean.float()


def diverged_checkpoint(run_dir: Path) -> str | None:
    """How the run diverged (the first clause of its summary's ``divergence``) when the checkpoint on disk is the
    diverged one, which a first session that diverges saves for inspection; else None (a resumed session that
    diverged kept the earlier, good checkpoint)."""
    summary = rundir.read_json_object(Path(run_dir) / rundir.SUMMARY) or {}
    state = rundir.read_json_object(Path(run_dir) / rundir.CHECKPOINT / ckpt.STATE_FILE) or {}
    step = state.get("step")
    if summary.get("diverged") is True and summary.get("checkpoint_step") == step == summary.get("steps"):
        return str(summary.get("divergence") or f"training diverged at step {step}").split(";")[0]
    return None


def load_run(run_dir: Path) -> TrainedRun:
    """Read ``run_dir``'s ``config.toml``, latest checkpoint and whitening matrix; rebuild the model (eval mode).

    A missing or corrupt run directory, or a checkpoint that does not fit the config's model or was trained on
    other data, another cost or seed (another run's), raises a :class:`DownpourError` naming the file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DownpourError(f"run directory {run_dir} does not exist (or is not a directory)")
    if not (run_dir / rundir.CONFIG).is_file():
        raise DownpourError(f"{run_dir} is not a run directory: {rundir.config_missing(run_dir)}")
    config = config_mod.load(run_dir / rundir.CONFIG)
    checkpoint = ckpt.load(run_dir / rundir.CHECKPOINT)
    shape = example_shape(config.data)
    dim = math.prod(shape)
    try:
        model = build_model(config.model, dim, seed=config.train.seed, shape=shape)
    except DownpourError as exc:
        raise CheckpointError(f"cannot rebuild the model of {run_dir}: {exc}") from None
    params = [p for p in model.parameters() if p.requires_grad]
    expected = {name: list(p.shape) for name, p in model.named_parameters()}  # as train.model_signature saves them
    saved = checkpoint.state.get("model", {})
    if saved.get("name") not in (None, config.model.name) or saved.get("param_shapes", expected) != expected:
        raise CheckpointError(
            f"checkpoint {run_dir / rundir.CHECKPOINT} does not fit the model of {run_dir / rundir.CONFIG}: "
            f"saved {saved.get('name')!r} {saved.get('param_shapes')} vs {config.model.name!r} {expected}"
        )
    # another run's weights? (config.toml records the count held out, where a checkpoint saved before it was
    # recorded says the default)
    if problems := config_mod.trained_differently(checkpoint.state.get("config"), config, ignoring=("data.held_out",)):
        raise CheckpointError(
            f"checkpoint {run_dir / rundir.CHECKPOINT} was saved by a run trained otherwise than "
            f"{run_dir / rundir.CONFIG} says ({'; '.join(problems)}): it is another run's, or the files were edited"
        )
    pieces = [snap["values"].reshape(-1) for snap in checkpoint.shard_snapshots()]
    values = torch.cat(pieces) if pieces else torch.empty(0)  # (num_params,): the shards in order
    count = sum(p.numel() for p in params)
    if values.numel() != count:
        raise CheckpointError(
            f"checkpoint {run_dir / rundir.CHECKPOINT} holds {values.numel()} parameters; the model has {count}"
        )
    nn.utils.vector_to_parameters(values.float(), params)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # evaluation never trains; gradients with respect to the input still flow
    whitening, centre = _load_whitening(run_dir, dim) if config.data.whiten else (None, None)
    if config.data.whiten_centre and config.data.whiten and centre is None:
        raise CheckpointError(f"run {run_dir} was trained with data.whiten_centre = true but "
                              f"{run_dir / rundir.WHITENING} holds no 'mean'")  # fmt: skip
    return TrainedRun(run_dir, config, model, shape, whitening, int(checkpoint.state.get("step", 0)), centre)
