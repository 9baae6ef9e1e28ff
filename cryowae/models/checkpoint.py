"""Checkpoints: atomic saving, safe validated loading, and the restorer for inference.

Two files live in a run directory: ``checkpoint.pt`` (everything needed to resume:
weights, optimiser, step, RNG states, memory bank, balancer) and ``model.pt`` (what
inference needs: weights, architecture, training config, voxel size, normalisation,
tilt geometry and a sample of training codes). Both carry the cryowae version and a
format number, and both are written under a temporary name and renamed, so an
interrupted run never leaves a file that cannot be loaded.

Safety: a checkpoint holds only tensors, numbers, strings, None and lists, tuples and
dicts of them (configs are stored as plain dicts, RNG states as tensors or dicts of
integers); `save_state` refuses anything else. Loading uses
``torch.load(weights_only=True)``, whose unpickler builds only those types and refuses
every other Python object, so opening a shared ``model.pt`` cannot run code.
`SAFE_GLOBALS` is the explicit allow-list of further globals our files would need: it is
empty, because tensors, ``OrderedDict`` (module state dicts) and the optimiser's state
are all within torch's own weights-only set.

Formats: 1 (cryowae 0.1 before the settings objects: flat ``train_config`` with
``tilt_min``/``tilt_max``/``tilt_axis`` and the architecture keys) and 2 (nested
``restorer`` and ``geometry`` settings, the geometry also at the top level of
``model.pt``). Both are read; format 2 is written. A model trained with the
posterior-family branch holds ``stochastic``: the `StochasticConfig` as plain values
(``architecture``) and the weights of everything but the mean path (``weights``; the
mean path's are the top-level ``weights``); files without it load as before.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cryowae import __version__
from cryowae.errors import CryowaeInputError
from cryowae.io.atomic import atomic_path
from cryowae.models.restorer import RestorerConfig, WAERestorer
from cryowae.physics.geometry import TiltGeometry

FORMAT = 2
#: formats `load_state` accepts (see the module docstring)
READABLE_FORMATS = (1, 2)
KIND_MODEL = "cryowae-restorer"
KIND_CHECKPOINT = "cryowae-checkpoint"
#: globals allowed in ``torch.load(weights_only=True)`` beyond torch's own set: none
SAFE_GLOBALS: tuple[Any, ...] = ()
#: the values a checkpoint may hold (containers: list, tuple, dict with str/int keys)
PLAIN_TYPES = (torch.Tensor, bool, int, float, str, type(None))


def check_plain(value: Any, where: str = "state") -> None:
    """Raise `TypeError` unless `value` is made of `PLAIN_TYPES`, lists, tuples and dicts
    with string or integer keys: what `load_state` can read back without running code."""
    if isinstance(value, PLAIN_TYPES):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__}")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a checkpoint "
                    "(store plain values: tensors, numbers, strings, lists, dicts)")


def save_state(path: str | os.PathLike, state: dict[str, Any], kind: str) -> Path:
    """Save `state` with format, kind and version atomically (temporary name, rename).

    Raises `TypeError` if `state` holds anything but plain values (`check_plain`)."""
    payload = {"format": FORMAT, "kind": kind, "cryowae_version": __version__} | state
    check_plain(payload)
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

    The file is read with ``torch.load(weights_only=True)`` (plus `SAFE_GLOBALS`): a
    file that holds any other Python object is refused before anything in it runs.
    Raises `CryowaeInputError` for a missing, corrupt, truncated or refused file, a file
    of another kind or format, or one written by an incompatible cryowae version.
    """
    p = Path(path)
    if p.is_dir():
        p = p / ("model.pt" if kind == KIND_MODEL else "checkpoint.pt")
    if not p.is_file():
        raise CryowaeInputError(f"{p}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise CryowaeInputError(
                f"{p}: refused: it holds Python objects that a cryowae checkpoint never "
                "contains (loading it could run code)") from None
        raise CryowaeInputError(f"{p}: not a readable cryowae checkpoint "
                                "(UnpicklingError)") from None
    except OSError:
        raise  # permission denied, I/O error: the CLI names them
    except Exception as exc:  # garbage bytes make the restricted unpickler fail anyhow
        raise CryowaeInputError(f"{p}: not a readable cryowae checkpoint "
                                f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or "format" not in state or "kind" not in state:
        raise CryowaeInputError(f"{p}: not a cryowae checkpoint")
    if state["kind"] != kind:
        want = "model.pt" if kind == KIND_MODEL else "checkpoint.pt"
        raise CryowaeInputError(f"{p}: is a {state['kind']} file, expected a {kind} ({want})")
    if state["format"] not in READABLE_FORMATS:
        raise CryowaeInputError(f"{p}: checkpoint format {state['format']} is not supported "
                                f"by cryowae {__version__} (formats "
                                f"{', '.join(map(str, READABLE_FORMATS))})")
    if _major_minor(state.get("cryowae_version", "")) != _major_minor(__version__):
        raise CryowaeInputError(
            f"{p}: written by cryowae {state.get('cryowae_version')}, incompatible with "
            f"{__version__}; retrain or use that version")
    return state


@dataclass
class LoadedRestorer:
    """A trained restorer ready for inference (a `cryowae.models.protocol.Restorer`).

    Attributes
    ----------
    model
        The network in eval mode on `device`.
    voxel_size
        Voxel size (A) of the training data.
    norm
        (mean, std) of the training tomogram(s): informative only, since every
        tomogram is normalised with its own global statistics before restoration.
    geometry
        Tilt geometry of the training data (degrees, axis), source ``"model"``.
    patch_size
        Training patch size (voxels); tiles for inference default to a multiple.
    codes
        A sample (N, latent_dim) of the latent codes seen at the end of training.
    train_config
        The training configuration as stored (a plain dict; format 1 files hold the flat
        form, format 2 the nested one: read it with `TrainConfig.from_dict`).
    stochastic
        The whole `cryowae.models.stochastic.StochasticRestorer` (eval mode, on
        `device`) when the model was trained with a posterior-family branch, else None.
        ``model`` is then its mean path (``stochastic.mean``), so restoration is the
        same code path for both kinds of model.
    """

    model: WAERestorer
    voxel_size: float
    norm: tuple[float, float]
    geometry: TiltGeometry
    patch_size: int
    codes: torch.Tensor
    train_config: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    path: str = ""
    stochastic: Any = None

    # the loose triple, kept while callers outside models/ still read it
    @property
    def tilt_min(self) -> float:
        """``geometry.tilt_min`` (degrees)."""
        return self.geometry.tilt_min

    @property
    def tilt_max(self) -> float:
        """``geometry.tilt_max`` (degrees)."""
        return self.geometry.tilt_max

    @property
    def tilt_axis(self) -> str:
        """``geometry.axis`` (``"y"`` or ``"x"``)."""
        return self.geometry.axis


def geometry_of(state: dict[str, Any]) -> TiltGeometry:
    """The training tilt geometry stored in a ``model.pt`` state: its ``geometry`` entry
    (format 2) or the tilt keys of its ``train_config`` (nested or flat, format 1)."""
    if "geometry" in state:
        return TiltGeometry.from_dict(state["geometry"])
    cfg = state["train_config"]
    return TiltGeometry.from_dict(cfg.get("geometry", cfg))


def load_restorer(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedRestorer:
    """Load ``model.pt`` (or a run directory holding one) for inference."""
    dev = torch.device(device)
    state = load_state(path, KIND_MODEL, map_location="cpu")
    try:
        model = WAERestorer(RestorerConfig.from_dict(state["architecture"]))
        model.load_state_dict(state["weights"])
        stochastic = _stochastic_from(state.get("stochastic"), model)
        cfg = state["train_config"]
        geometry = geometry_of(state)
        patch_size = int(cfg["patch_size"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise CryowaeInputError(f"{path}: checkpoint weights or settings do not match the "
                                f"restorer ({type(exc).__name__}: {str(exc)[:80]})") from None
    model.eval().to(dev)
    if stochastic is not None:
        stochastic.eval().to(dev)
    return LoadedRestorer(
        model=model, voxel_size=float(state["voxel_size"]), norm=tuple(state["norm"]),
        geometry=geometry, patch_size=patch_size,
        codes=state.get("codes", torch.zeros(0, model.latent_dim)).float(),
        train_config=cfg, device=dev, path=str(path), stochastic=stochastic)


def _stochastic_from(saved: dict[str, Any] | None, mean: WAERestorer) -> Any:
    """The `StochasticRestorer` stored in ``model.pt`` around the loaded mean path (the
    same module object), or None. Raises `RuntimeError`/`KeyError` when its weights do
    not fit its architecture."""
    if saved is None:
        return None
    from cryowae.models.stochastic import StochasticConfig, StochasticRestorer

    model = StochasticRestorer(StochasticConfig.from_dict(saved["architecture"]), mean=mean)
    missing, unexpected = model.load_state_dict(saved["weights"], strict=False)
    if unexpected or any(not k.startswith("mean.") for k in missing):
        raise RuntimeError(f"stochastic weights do not fit (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return model


def save_restorer(path: str | os.PathLike, model: WAERestorer, train_config: dict[str, Any],
                  voxel_size: float, norm: tuple[float, float], codes: torch.Tensor,
                  extra: dict[str, Any] | None = None,
                  geometry: TiltGeometry | None = None, stochastic: Any = None) -> Path:
    """Write ``model.pt`` for inference.

    `train_config` is the plain dict of `TrainConfig.to_dict`; `geometry` defaults to
    the one it holds (a config without one raises `KeyError`). `stochastic`: the
    `StochasticRestorer` whose mean path is `model`, stored beside it (module
    docstring), or None.
    """
    if geometry is None:
        geometry = TiltGeometry.from_dict(train_config.get("geometry", train_config))
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    branch = {}
    if stochastic is not None:
        if stochastic.mean is not model:
            raise ValueError("save_restorer: `model` must be the stochastic model's mean path")
        branch = {"stochastic": {
            "architecture": stochastic.config.to_dict(),
            "weights": {k: v.detach().cpu() for k, v in stochastic.state_dict().items()
                        if not k.startswith("mean.")}}}
    return save_state(path, branch | {
        "architecture": model.config.to_dict(), "weights": weights,
        "train_config": train_config, "geometry": geometry.to_dict(),
        "voxel_size": float(voxel_size), "norm": [float(norm[0]), float(norm[1])],
        "codes": codes.detach().cpu().float(), "extra": extra or {},
    }, KIND_MODEL)
