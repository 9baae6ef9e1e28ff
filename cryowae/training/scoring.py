"""Proper scoring rules for families of predictions: the Fourier-weighted energy score.

For m >= 2 predictions y_1..y_m of one target y (all (Z, Y, X) patches), each with
simulated target noise n_i added (`cryowae.training.noise.draw_noise`), the energy score
with beta = 1 is

    ES = (1/m) sum_i d(y_i + n_i, y) - 1 / (2 m (m - 1)) sum_{i != j} d(y_i + n_i, y_j + n_j)
    d(a, b) = sqrt( sum_k w(k) |F(a - b)(k)|^2 )

F the ortho 3D FFT, summed over the full spectrum (rfft columns counted by
`hermitian_weights`), w(k) >= 0 the loss weights (`cryowae.training.loss.fourier_weights`:
0 where the target was not measured, 1 where the input saw it, the wedge weight where
it did not). The expected score is minimised by predictions distributed as the noisy
target given the input (strictly proper: the expected ES is the energy distance, the
MMD with the kernel -d, between the predictive and the target's distribution, plus a
constant), which is why noise is added to the predictions: the target is noisy.
Unbiased in m (the pair term excludes i = j), so m = 2 already gives unbiased gradients.

Variants (`VARIANTS`, dispatched by `family_score`): the energy score of a whole patch
is weakly sensitive to the spread in high dimension, so the sum can be split into
groups G of coefficients (or real-space blocks), one energy score per group, summed:

- ``whole``: one group (the definition above);
- ``shells``: one group per radial shell (`shell_groups`);
- ``regions``: measured-by-the-input and wedge coefficients apart (`region_groups`);
- ``shell_regions``: shells x regions;
- ``blocks``: real-space blocks of `block`^3 voxels of the weighted residual field
  ``F^-1(sqrt(w) F(a - b))`` (by Parseval its block norms add up to d^2);
- ``coefficients``: every Fourier coefficient apart: the energy score of a complex
  number is ``|a - b|`` in the complex plane (the CRPS for the real DC / Nyquist
  coefficients), weighted by ``sqrt(w h)``, h the multiplicity.

Each group's energy score is proper, so every sum is proper too; what differs is how
strongly the score reacts to a wrong spread (measured in `tests/test_scoring.py`).
Values are sums (not means) over coefficients and groups: their scale differs between
variants, so a trainer weighs them like any other term. All functions are pure,
batched and differentiable; scores are returned per batch item (B,).
"""

from __future__ import annotations

import torch

from cryowae.errors import CryowaeInputError
from cryowae.physics.fourier import hermitian_weights, shell_index

VARIANTS = ("whole", "shells", "regions", "shell_regions", "blocks", "coefficients")
_DIMS = (-3, -2, -1)
#: added under every square root: keeps gradients finite where two predictions
#: coincide (its bias is at most 1e-6 per group, in normalised intensity units)
_TINY = 1e-12


def _check(predictions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Validate (B, m, Z, Y, X) predictions against a (B, [1,] Z, Y, X) target; return
    the target as (B, Z, Y, X)."""
    if predictions.ndim != 5 or predictions.shape[1] < 2:
        raise CryowaeInputError(f"predictions must be (B, m, Z, Y, X) with m >= 2, got "
                                f"{tuple(predictions.shape)}")
    t = target[:, 0] if target.ndim == 5 else target
    if t.shape != predictions.shape[:1] + predictions.shape[2:]:
        raise CryowaeInputError(f"target {tuple(target.shape)} does not match predictions "
                                f"{tuple(predictions.shape)}")
    return t


def _prepare(predictions: torch.Tensor, target: torch.Tensor, noise: torch.Tensor | None,
             valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy predictions (B, m, Z, Y, X) and target (B, 1, Z, Y, X), both masked by the
    real-space `valid` mask (B, 1, Z, Y, X) when given."""
    t = _check(predictions, target)[:, None]
    p = predictions if noise is None else predictions + noise
    if valid is not None:
        p, t = p * valid, t * valid
    return p, t


def _weighted_spectra(p: torch.Tensor, t: torch.Tensor, weights: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(w h) F(.) of predictions (B, m, K) and target (B, 1, K), K the rfft size."""
    if weights.shape[-3:] != (*p.shape[-3:-1], p.shape[-1] // 2 + 1):
        raise CryowaeInputError(f"weights {tuple(weights.shape)} do not match the rfft of "
                                f"patches {tuple(p.shape[-3:])}")
    scale = (weights.clamp_min(0) * hermitian_weights(p.shape[-1], device=p.device)).sqrt()
    scale = (scale[None] if scale.ndim == 3 else scale)[:, None]
    fp = torch.fft.rfftn(p.float(), dim=_DIMS, norm="ortho") * scale
    ft = torch.fft.rfftn(t.float(), dim=_DIMS, norm="ortho") * scale
    return fp.flatten(2), ft.flatten(2)


def _energy(sq_to_target: torch.Tensor, sq_pairs: torch.Tensor, m: int) -> torch.Tensor:
    """Energy score from squared group distances: (B, m, G) to the target and
    (B, P, G) for the P = m (m - 1) / 2 pairs i < j; summed over groups -> (B,)."""
    skill = torch.sqrt(sq_to_target + _TINY).mean(dim=1)
    spread = torch.sqrt(sq_pairs + _TINY).sum(dim=1) / (m * (m - 1))
    return (skill - spread).sum(dim=-1)


def _pairs(m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.triu_indices(m, m, offset=1, device=device).unbind(0)


def energy_score(predictions: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                 noise: torch.Tensor | None = None, groups: torch.Tensor | None = None,
                 n_groups: int | None = None, valid: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Fourier-weighted energy score, summed over groups of coefficients.

    Parameters
    ----------
    predictions
        (B, m, Z, Y, X) predictions, m >= 2, normalised intensity.
    target
        (B, Z, Y, X) or (B, 1, Z, Y, X) target.
    weights
        (B, Z, Y, X // 2 + 1) or (Z, Y, X // 2 + 1) Fourier weights w(k) >= 0.
    noise
        (B, m, Z, Y, X) target noise added to the predictions, or None.
    groups
        Integer group label of each rfft coefficient, shaped like `weights`; None: one
        group (the whole patch).
    n_groups
        Number of labels (default: max label + 1).
    valid
        (B, 1, Z, Y, X) real-space mask of voxels that came from real data, or None.

    Returns
    -------
    torch.Tensor
        (B,) energy scores (lower is better).
    """
    p, t = _prepare(predictions, target, noise, valid)
    m = p.shape[1]
    fp, ft = _weighted_spectra(p, t, weights)
    i, j = _pairs(m, p.device)
    to_t = (fp - ft).abs().square()  # (B, m, K)
    pairs = (fp[:, i] - fp[:, j]).abs().square()  # (B, P, K)
    if groups is None:
        return _energy(to_t.sum(-1, keepdim=True), pairs.sum(-1, keepdim=True), m)
    g = groups.long()
    g = (g[None] if g.ndim == 3 else g).expand(p.shape[0], *g.shape[-3:]).flatten(1)
    n = int(g.max()) + 1 if n_groups is None else int(n_groups)

    def grouped(v: torch.Tensor) -> torch.Tensor:
        out = v.new_zeros(*v.shape[:2], n)
        return out.scatter_add_(2, g[:, None].expand_as(v), v)

    return _energy(grouped(to_t), grouped(pairs), m)


def coefficient_score(predictions: torch.Tensor, target: torch.Tensor,
                      weights: torch.Tensor, noise: torch.Tensor | None = None,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Energy score of every Fourier coefficient apart (a CRPS per coefficient in the
    complex plane, weighted by sqrt(w h)), summed: (B,). Same arguments as
    `energy_score`; it equals `energy_score` with one group per coefficient."""
    p, t = _prepare(predictions, target, noise, valid)
    m = p.shape[1]
    fp, ft = _weighted_spectra(p, t, weights)
    i, j = _pairs(m, p.device)
    return _energy((fp - ft).abs().square(), (fp[:, i] - fp[:, j]).abs().square(), m)


def block_score(predictions: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                noise: torch.Tensor | None = None, block: int = 4,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """Energy score per real-space block of `block`^3 voxels of the weighted residual
    fields ``F^-1(sqrt(w) F(.))``, summed over blocks: (B,). Patch sizes must be
    multiples of `block`; other arguments as `energy_score`.

    The inverse FFT keeps only the Friedel-symmetric part of sqrt(w) on the rfft's
    kx = 0 (and even Nyquist) planes, so with one block the size of the patch this
    equals `energy_score` exactly when w is symmetric (unrotated wedge masks, radial
    weights) and to about 0.5% for the rotated masks of training (measured on 8^3
    patches), whose samples at k and -k on those planes can differ."""
    p, t = _prepare(predictions, target, noise, valid)
    if any(s % block for s in p.shape[-3:]):
        raise CryowaeInputError(f"patch {tuple(p.shape[-3:])} is not a multiple of the "
                                f"block size {block}")
    m = p.shape[1]
    if weights.shape[-3:] != (*p.shape[-3:-1], p.shape[-1] // 2 + 1):
        raise CryowaeInputError(f"weights {tuple(weights.shape)} do not match the rfft of "
                                f"patches {tuple(p.shape[-3:])}")
    scale = weights.clamp_min(0).sqrt()
    scale = (scale[None] if scale.ndim == 3 else scale)[:, None]
    shape = tuple(p.shape[-3:])

    def filtered(v: torch.Tensor) -> torch.Tensor:
        f = torch.fft.rfftn(v.float(), dim=_DIMS, norm="ortho") * scale
        u = torch.fft.irfftn(f, s=shape, dim=_DIMS, norm="ortho")
        z, y, x = (s // block for s in shape)
        u = u.reshape(*u.shape[:2], z, block, y, block, x, block)
        return u.permute(0, 1, 2, 4, 6, 3, 5, 7).flatten(2, 4).flatten(3)  # (B, n, G, b^3)

    up, ut = filtered(p), filtered(t)
    i, j = _pairs(m, p.device)
    return _energy((up - ut).square().sum(-1), (up[:, i] - up[:, j]).square().sum(-1), m)


def shell_groups(shape: tuple[int, int, int], device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, int]:
    """Radial-shell labels of a patch's rfft grid (`shell_index`: the corners beyond
    Nyquist count in the last shell) and the number of groups."""
    return shell_index(shape, device=device)


def region_groups(target_measured: torch.Tensor, input_measured: torch.Tensor
                  ) -> tuple[torch.Tensor, int]:
    """Labels 0 where the input measured a coefficient, 1 where only the target did
    (the wedge the network fills), 2 where the target was not measured (weight 0):
    (B, Z, Y, X // 2 + 1) from the training batch's masks, and 3 groups."""
    m_in = (input_measured > 0.5).expand_as(target_measured)
    m_tg = target_measured > 0.5
    lab = torch.where(m_tg, torch.where(m_in, 0, 1), 2)
    return lab.long(), 3


def family_score(variant: str, predictions: torch.Tensor, target: torch.Tensor,
                 weights: torch.Tensor, noise: torch.Tensor | None = None,
                 target_measured: torch.Tensor | None = None,
                 input_measured: torch.Tensor | None = None, block: int = 4,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """The energy score `variant` (one of `VARIANTS`) per batch item (B,).

    ``regions`` and ``shell_regions`` need the batch's `target_measured` (B, Z, Y, X//2+1)
    and `input_measured` (Z, Y, X//2+1) masks; ``blocks`` uses `block`."""
    if variant not in VARIANTS:
        raise CryowaeInputError(f"unknown score variant {variant!r}: use {', '.join(VARIANTS)}")
    shape = tuple(int(s) for s in predictions.shape[-3:])
    if variant == "coefficients":
        return coefficient_score(predictions, target, weights, noise, valid)
    if variant == "blocks":
        return block_score(predictions, target, weights, noise, block, valid)
    if variant == "whole":
        return energy_score(predictions, target, weights, noise, valid=valid)
    shells, n_sh = shell_groups(shape, predictions.device)  # type: ignore[arg-type]
    if variant == "shells":
        return energy_score(predictions, target, weights, noise, shells, n_sh, valid)
    if target_measured is None or input_measured is None:
        raise CryowaeInputError(f"the {variant} score needs the target and input masks")
    regions, n_rg = region_groups(target_measured, input_measured)
    if variant == "regions":
        return energy_score(predictions, target, weights, noise, regions, n_rg, valid)
    return energy_score(predictions, target, weights, noise, shells * n_rg + regions,
                        n_sh * n_rg, valid)
