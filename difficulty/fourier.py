"""Model-free image complexity from the 2-D Fourier spectrum.

Both scorers take a batch of grayscale images ``(N, H, W)`` (float, values in ``[0, 1]``
as :func:`difficulty.imageio.decode_gray` makes them) and return one value per image,
``(N,)``, in ``[0, 1]``; higher = more fine detail / clutter = harder.

The power spectrum
------------------
For image ``x`` (``H``×``W``) and the separable Hann window
``w[i, j] = hann_H[i] · hann_W[j]`` with ``hann_N[i] = sin²(π (i + 1) / (N + 1))``,
``i = 0 … N−1`` (the symmetric Hann window of length ``N + 2`` without its two zero end
points, so that every pixel has positive weight even for tiny images; ``w ≡ 1`` with
``window=False``):

* window-weighted mean removal: ``μ = Σ w·x / Σ w`` and ``y = (x − μ) · w`` — the
  windowed image has exactly zero mean, so no DC power leaks into the low frequencies;
* ``P[k] = |FFT2(y)[k]|²`` on the full ``H``×``W`` frequency grid ``k = (k_y, k_x)``,
  with frequencies ``f_y = fftfreq(H)``, ``f_x = fftfreq(W)`` in cycles per pixel
  (Nyquist = 0.5) and radial frequency ``ρ[k] = sqrt(f_y² + f_x²)`` (``0 … 0.5·√2``).

It is computed with ``torch.fft.rfft2`` (half the grid, real input); columns other than
``f_x = 0`` and the Nyquist column of an even ``W`` stand for two conjugate bins of equal
power and are counted twice, so every sum below is over the full grid.

High-frequency ratio (scorer ``fourier``)
-----------------------------------------
``ratio = Σ_{ρ[k] > cutoff} P[k] / Σ_k P[k]``, the share of spectral power above the
radial ``cutoff`` (cycles per pixel, ``0 < cutoff < 0.5``; the default 0.25 is half the
Nyquist frequency).  For white noise the spectrum of the windowed image is flat in
expectation, so the ratio is the share of grid bins with ``ρ > cutoff``, about
``1 − π·cutoff²`` (0.80 at 0.25).  Natural photographs, whose power falls like
``1/ρ²``, score far lower; clutter, edges and texture raise it.

Both scores are shares of the image's own power, so they do not change with brightness
or contrast (``a·x + b`` scores as ``x``).  The same holds for the amount of clutter on a
perfectly uniform background: N randomly placed shapes have, in expectation, the
spectral shape of one.  Clutter raises the scores against the low-frequency content
(illumination, sky, road) that every real scene has; see ``tests/test_fourier.py``.

Spectral entropy (scorer ``fourier_entropy``)
---------------------------------------------
With ``p[k] = P[k] / Σ P``: ``entropy = −Σ_k p[k] log p[k] / log(H·W)``, the Shannon
entropy of the normalised power spectrum over the full grid, divided by its maximum
``log(H·W)`` so that it lies in ``[0, 1]``: 0 for a single frequency, near 1 for white
noise.

A constant image has no power at all; both functions return exactly ``0`` for it, not
NaN (as for any image whose spectral power sums to zero).

One spectrum per image
----------------------
Both scorers start from the same power spectrum.  The spectrum of the last batch is kept
for as long as that batch tensor lives (and is not modified in place), so running both
scorers on one batch computes each image's FFT once.
"""

from __future__ import annotations

import importlib
import math
import weakref
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from difficulty.imageio import DEFAULT_SIZE
from difficulty.registry import register_scorer


class _Lazy:
    """A module imported on first use: registering the scorers (in a process that only
    chooses and combines scores) does not import torch; computing them does."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


if TYPE_CHECKING:
    import torch
else:
    torch = _Lazy("torch")

DEFAULT_CUTOFF = 0.25


def high_frequency_ratio(
    images: torch.Tensor, *, cutoff: float = DEFAULT_CUTOFF, window: bool = True
) -> torch.Tensor:
    """Share of spectral power above the radial ``cutoff`` (cycles/pixel), per image.

    ``images``: ``(N, H, W)`` float tensor.  Returns ``(N,)`` in ``[0, 1]`` (float64 for
    float64 input, float32 otherwise); exactly
    0 for a constant image.  The formula is in the module docstring.
    """
    _check_images(images)
    if not (0.0 < cutoff < 0.5):
        raise ValueError(f"cutoff must be in (0, 0.5) cycles per pixel, got {cutoff}")
    return _high_frequency_ratio(images, cutoff, window)


def spectral_entropy(images: torch.Tensor, *, window: bool = True) -> torch.Tensor:
    """Normalised Shannon entropy of the power spectrum, per image.

    ``images``: ``(N, H, W)`` float tensor.  Returns ``(N,)`` in ``[0, 1]`` (float64 for
    float64 input, float32 otherwise); exactly 0 for a constant image.  The formula is in
    the module docstring.
    """
    _check_images(images)
    return _spectral_entropy(images, window)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (N, H, W), got {type(images).__name__}")
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
    if images.shape[1] < 2 or images.shape[2] < 2:
        raise ValueError(f"images must be at least 2×2 pixels, got {tuple(images.shape[1:])}")


# -- computation (inputs already checked) ---------------------------------------------


@lru_cache(maxsize=16)
def _window(height: int, width: int, window: bool, device: str, dtype: torch.dtype) -> torch.Tensor:
    """``(H, W)`` separable Hann window (all ones when ``window`` is false)."""
    if not window:
        return torch.ones(height, width, device=device, dtype=dtype)
    hann_h = torch.hann_window(height + 2, periodic=False, dtype=torch.float64)[1:-1]
    hann_w = torch.hann_window(width + 2, periodic=False, dtype=torch.float64)[1:-1]
    return (hann_h[:, None] * hann_w[None, :]).to(device=device, dtype=dtype)


@lru_cache(maxsize=16)
def _multiplicity(height: int, width: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """How many full-grid bins each ``rfft2`` half-grid bin stands for, flattened ``(H·(W//2+1),)``."""
    columns = torch.full((width // 2 + 1,), 2.0, dtype=dtype)
    columns[0] = 1.0
    if width % 2 == 0:
        columns[-1] = 1.0
    return columns[None, :].expand(height, -1).reshape(-1).to(device)


@lru_cache(maxsize=16)
def _sum_weights(height: int, width: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """``(H·(W//2+1), 2)``: the bin multiplicity, in both columns.

    Column 0 of ``x @ w`` is the multiplicity-weighted sum of each row of ``x``.  A
    two-column product is used, not a matrix-vector one: MKL's matrix-vector product sums a
    row in an order that depends on where the row sits in the batch (the last bits of an
    image's value would change with the batch it came in); its matrix product does not.
    """
    multiplicity = _multiplicity(height, width, "cpu", torch.float64)
    return torch.stack([multiplicity, multiplicity], dim=1).to(device=device, dtype=dtype)


@lru_cache(maxsize=16)
def _ratio_weights(
    height: int, width: int, cutoff: float, device: str, dtype: torch.dtype
) -> torch.Tensor:
    """``(H·(W//2+1), 2)``: bin multiplicity, and multiplicity where ``ρ > cutoff``.

    One matrix product with the flattened half-grid power gives the total and the
    high-frequency power of every image at once.
    """
    f_y = torch.fft.fftfreq(height, dtype=torch.float64)
    f_x = torch.fft.rfftfreq(width, dtype=torch.float64)
    rho = torch.sqrt(f_y[:, None] ** 2 + f_x[None, :] ** 2).reshape(-1)
    multiplicity = _multiplicity(height, width, "cpu", torch.float64)
    weights = torch.stack([multiplicity, multiplicity * (rho > cutoff)], dim=1)
    return weights.to(device=device, dtype=dtype)


@dataclass
class _Spectrum:
    """The power spectrum of one batch tensor, while that tensor lives."""

    images: weakref.ref[torch.Tensor]
    key: tuple[int, bool]
    power: torch.Tensor
    constant: torch.Tensor


_last_spectrum: _Spectrum | None = None
"""The last batch's spectrum (replaced by one assignment; a stale read only recomputes)."""


def _forget_spectrum(ref: weakref.ref[torch.Tensor]) -> None:
    global _last_spectrum
    last = _last_spectrum
    if last is not None and last.images is ref:
        _last_spectrum = None


def _power(images: torch.Tensor, window: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-grid power ``|rfft2(y)|²`` flattened to ``(N, H·(W//2+1))``, and a ``(N,)`` mask
    of constant images.

    Computed in float64 for float64 input, in float32 otherwise.  The result for the last
    batch tensor is reused while that tensor lives unmodified (callers must not modify it).
    """
    global _last_spectrum
    key = (images._version, window)
    last = _last_spectrum
    if last is not None and last.images() is images and last.key == key:
        return last.power, last.constant
    power, constant = _compute_power(images, window)
    _last_spectrum = _Spectrum(weakref.ref(images, _forget_spectrum), key, power, constant)
    return power, constant


def _compute_power(images: torch.Tensor, window: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = images if images.dtype == torch.float64 else images.to(torch.float32)
    n, height, width = x.shape
    w = _window(height, width, window, str(x.device), x.dtype)
    y = x * w
    mean = y.sum(dim=(-2, -1), keepdim=True) / w.sum()
    y.addcmul_(mean, w, value=-1.0)  # (x − μ)·w, in place
    spectrum = torch.fft.rfft2(y)
    power = spectrum.real.square().addcmul_(spectrum.imag, spectrum.imag)
    constant = x.amax(dim=(-2, -1)) == x.amin(dim=(-2, -1))
    return power.reshape(n, -1), constant


def _empty(images: torch.Tensor) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float64 if images.dtype == torch.float64 else torch.float32)


def _high_frequency_ratio(images: torch.Tensor, cutoff: float, window: bool) -> torch.Tensor:
    if images.shape[0] == 0:
        return _empty(images)
    power, constant = _power(images, window)
    _, height, width = images.shape
    sums = power @ _ratio_weights(height, width, cutoff, str(power.device), power.dtype)
    total, high = sums[:, 0], sums[:, 1]
    no_power = constant | ~(total > 0)
    ratio = (high / torch.where(no_power, torch.ones_like(total), total)).clamp(0.0, 1.0)
    return torch.where(no_power, torch.zeros_like(ratio), ratio)


def _spectral_entropy(images: torch.Tensor, window: bool) -> torch.Tensor:
    if images.shape[0] == 0:
        return _empty(images)
    power, constant = _power(images, window)
    _, height, width = images.shape
    weights = _sum_weights(height, width, str(power.device), power.dtype)
    total = (power @ weights)[:, 0]
    no_power = constant | ~(total > 0)
    # p is the probability of one full-grid bin; a half-grid bin stands for
    # ``multiplicity`` bins of equal power, so its share of −Σ p log p is −m · p log p.
    p = power / torch.where(no_power, torch.ones_like(total), total)[:, None]
    entropy = -(torch.xlogy(p, p) @ weights)[:, 0] / math.log(height * width)
    entropy = entropy.clamp(0.0, 1.0)
    return torch.where(no_power, torch.zeros_like(entropy), entropy)


# -- registered scorers ---------------------------------------------------------------


class FourierSettings(BaseModel):
    """Settings of the ``fourier`` scorer (configured under ``fourier:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cutoff: float = Field(
        DEFAULT_CUTOFF, gt=0.0, lt=0.5, description="radial cutoff, cycles per pixel"
    )
    size: int = Field(
        DEFAULT_SIZE, ge=16, le=2048, description="side of the square decode grid, pixels"
    )
    window: bool = Field(True, description="apply a Hann window before the FFT")


class FourierEntropySettings(BaseModel):
    """Settings of the ``fourier_entropy`` scorer (configured under ``fourier_entropy:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(
        DEFAULT_SIZE, ge=16, le=2048, description="side of the square decode grid, pixels"
    )
    window: bool = Field(True, description="apply a Hann window before the FFT")


@register_scorer(
    "fourier",
    needs={"images"},
    settings=FourierSettings,
    description="share of spectral power above a radial cutoff (model-free image complexity)",
    tags={"image", "model_free"},
)
def fourier_score(
    images: torch.Tensor,
    *,
    cutoff: float = DEFAULT_CUTOFF,
    window: bool = True,
    size: int = DEFAULT_SIZE,
) -> np.ndarray:
    """Scorer ``fourier``: :func:`high_frequency_ratio` as ``(N,)`` float64.

    ``size`` is the decode size the image stream used to make ``images`` (it is part of
    the settings so that one config block describes the scorer); it is not used here.
    """
    return (
        high_frequency_ratio(images, cutoff=cutoff, window=window).to(torch.float64).cpu().numpy()
    )


@register_scorer(
    "fourier_entropy",
    needs={"images"},
    settings=FourierEntropySettings,
    description="normalised entropy of the power spectrum (model-free image complexity)",
    tags={"image", "model_free"},
)
def fourier_entropy_score(
    images: torch.Tensor, *, window: bool = True, size: int = DEFAULT_SIZE
) -> np.ndarray:
    """Scorer ``fourier_entropy``: :func:`spectral_entropy` as ``(N,)`` float64.

    ``size`` is the decode size the image stream used; it is not used here.
    """
    return spectral_entropy(images, window=window).to(torch.float64).cpu().numpy()
