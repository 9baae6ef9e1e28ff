"""The running average of the weights that `train` validates and stores in model.pt.

With the weights w_t after optimiser step t (t = 1, 2, ...) and the decay d (``ema_decay``
of `TrainConfig`), the average is

    a_1 = w_1,    a_t = d_t a_{t-1} + (1 - d_t) w_t,    d_t = min(d, (1 + n) / (10 + n))

where n = t - 1 is the number of steps averaged so far: the warm-up factor keeps the
first steps' weights (far from any solution) from lingering in the average for ~1/(1-d)
steps. Buffers (the code standardisation) are averaged with the parameters.

Why: the weights of one step scatter around the path the optimiser follows (at the CPU
presets' batch of 4 the Pearson correlation of single-step weights to ground truth
moved by 0.02-0.04 between neighbouring tenths of a run), and so do the held-out
validation loss and the plateau call that read them. The average over the last ~1/(1-d)
steps follows the path without that scatter. The optimiser steps the raw weights; the
average never feeds back into training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel


def _ema_with_warmup(decay: float):
    """`AveragedModel`'s ``multi_avg_fn`` for the average above (torch's own
    `get_ema_multi_avg_fn` has no warm-up: its decay is fixed from the first step)."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers: keep the current value
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


class WeightAverage:
    """The running average of `model`'s parameters and buffers (module docstring).

    ``module`` is a copy of `model` with the averaged weights, to evaluate or save; call
    `update` after each optimiser step. `decay` 0 keeps no copy: ``module`` is `model`
    itself and `update` does nothing.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay {decay} must lie in [0, 1)")
        self._model = model
        self._avg = AveragedModel(model, multi_avg_fn=_ema_with_warmup(decay),
                                  use_buffers=True) if decay > 0 else None

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (the trained model itself when averaging is off)."""
        return self._model if self._avg is None else self._avg.module

    def update(self) -> None:
        """Fold the model's current weights into the average."""
        if self._avg is not None:
            self._avg.update_parameters(self._model)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the count of steps averaged, for checkpoints."""
        if self._avg is None:
            return {}
        return {k: v.detach().cpu() for k, v in self._avg.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict`'s output; an empty one (a checkpoint written without
        averaging) restarts the average from the model's current weights."""
        if self._avg is None:
            return
        if state:
            self._avg.load_state_dict(state)
        else:
            self._avg.n_averaged.zero_()
            self._avg.update_parameters(self._model)


__all__ = ["WeightAverage"]
