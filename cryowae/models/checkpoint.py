"""Checkpoints: atomic saving, validated loading, and the restorer for inference.

Two files live in a run directory: ``checkpoint.pt`` (everything needed to resume:
weights, optimiser, step, RNG states, memory bank, balancer) and ``model.pt`` (what
inference needs: weights, architecture, training config, voxel size, normalisation,
tilt range and a sample of training codes). Both carry the cryowae version and a format
number, and both are written under a temporary name and renamed, so an interrupted run
never leaves a file that cannot be loaded.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cryowae import __version__
from cryowae.errors import CryowaeInputError
from cryowae.io.atomic import atomic_path
from cryowae.models.restorer import RestorerConfig, WAERestorer

FORMAT = 1
KIND_MODEL = "cryowae-restorer"
KIND_CHECKPOINT = "cryowae-checkpoint"


def save_state(path: str | os.PathLike, state: dict[str, Any], kind: str) -> Path:
    """Save `state` with format, kind and version atomically (temporary name, rename)."""
    payload = {"format": FORMAT, "kind": kind, "cryowae_version": __version__} | state
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _major_minor(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return (-1,)


def load_state(path: str | os.PathLike, kind: str,
               map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a file written by `save_state`.

    Raises `CryowaeInputError` for a missing, corrupt or truncated file, a file of
    another kind, or one written by an incompatible cryowae version.
    """
    p = Path(path)
    if p.is_dir():
        p = p / ("model.pt" if kind == KIND_MODEL else "checkpoint.pt")
    if not p.is_file():
        raise CryowaeInputError(f"{p}: no such checkpoint file")
    try:
        state = torch.load(p, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            AttributeError, ModuleNotFoundError) as exc:
        raise CryowaeInputError(f"{p}: not a readable cryowae checkpoint "
                                f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or "format" not in state or "kind" not in state:
        raise CryowaeInputError(f"{p}: not a cryowae checkpoint")
    if state["kind"] != kind:
        want = "model.pt" if kind == KIND_MODEL else "checkpoint.pt"
        raise CryowaeInputError(f"{p}: is a {state['kind']} file, expected a {kind} ({want})")
    if state["format"] != FORMAT:
        raise CryowaeInputError(f"{p}: checkpoint format {state['format']} is not supported "
                                f"by cryowae {__version__} (format {FORMAT})")
    if _major_minor(state.get("cryowae_version", "")) != _major_minor(__version__):
        raise CryowaeInputError(
            f"{p}: written by cryowae {state.get('cryowae_version')}, incompatible with "
            f"{__version__}; retrain or use that version")
    return state


@dataclass
class LoadedRestorer:
    """A trained restorer ready for inference.

    Attributes
    ----------
    model
        The network in eval mode on `device`.
    voxel_size
        Voxel size (A) of the training data.
    norm
        (mean, std) of the training tomogram(s): informative only, since every
        tomogram is normalised with its own global statistics before restoration.
    tilt_min, tilt_max, tilt_axis
        Tilt geometry of the training data (degrees).
    patch_size
        Training patch size (voxels); tiles for inference default to a multiple.
    codes
        A sample (N, latent_dim) of the latent codes seen at the end of training.
    train_config
        The resolved training configuration (dict).
    """

    model: WAERestorer
    voxel_size: float
    norm: tuple[float, float]
    tilt_min: float
    tilt_max: float
    tilt_axis: str
    patch_size: int
    codes: torch.Tensor
    train_config: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    path: str = ""


def load_restorer(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedRestorer:
    """Load ``model.pt`` (or a run directory holding one) for inference."""
    dev = torch.device(device)
    state = load_state(path, KIND_MODEL, map_location="cpu")
    try:
        model = WAERestorer(RestorerConfig(**state["architecture"]))
        model.load_state_dict(state["weights"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CryowaeInputError(f"{path}: checkpoint weights do not match the restorer "
                                f"({type(exc).__name__})") from None
    model.eval().to(dev)
    cfg = state["train_config"]
    return LoadedRestorer(
        model=model, voxel_size=float(state["voxel_size"]), norm=tuple(state["norm"]),
        tilt_min=float(cfg["tilt_min"]), tilt_max=float(cfg["tilt_max"]),
        tilt_axis=str(cfg["tilt_axis"]), patch_size=int(cfg["patch_size"]),
        codes=state.get("codes", torch.zeros(0, model.latent_dim)).float(),
        train_config=cfg, device=dev, path=str(path))


def save_restorer(path: str | os.PathLike, model: WAERestorer, train_config: dict[str, Any],
                  voxel_size: float, norm: tuple[float, float], codes: torch.Tensor,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.pt`` for inference."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_state(path, {
        "architecture": model.config.to_dict(), "weights": weights,
        "train_config": train_config, "voxel_size": float(voxel_size),
        "norm": [float(norm[0]), float(norm[1])], "codes": codes.detach().cpu().float(),
        "extra": extra or {},
    }, KIND_MODEL)
