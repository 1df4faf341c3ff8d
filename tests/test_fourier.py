"""Fourier complexity scorers: analytic cases, a full-grid reference, clutter, properties."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, ImageDraw
from pydantic import ValidationError

from difficulty.fourier import (
    FourierEntropySettings,
    FourierSettings,
    high_frequency_ratio,
    spectral_entropy,
)
from difficulty.registry import SCORERS


def _reference(image: np.ndarray, cutoff: float, window: bool) -> tuple[float, float]:
    """Ratio and entropy straight from the docstring formulas, on the full FFT grid (float64)."""
    height, width = image.shape
    if window:
        w = np.outer(np.hanning(height + 2)[1:-1], np.hanning(width + 2)[1:-1])
    else:
        w = np.ones((height, width))
    x = image.astype(np.float64)
    y = (x - (w * x).sum() / w.sum()) * w
    power = np.abs(np.fft.fft2(y)) ** 2
    rho = np.hypot(*np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij"))
    total = power.sum()
    p = power / total
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)) / math.log(
        height * width
    )
    return float(power[rho > cutoff].sum() / total), float(entropy)


def _grid_share_above(height: int, width: int, cutoff: float) -> float:
    """Share of the (non-DC) full frequency grid with radial frequency above ``cutoff``."""
    rho = np.hypot(*np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij"))
    return float((rho > cutoff).sum() / (height * width - 1))


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("window", [True, False])
def test_constant_image_scores_exactly_zero(value: float, window: bool) -> None:
    images = torch.full((3, 64, 48), value)
    assert torch.equal(high_frequency_ratio(images, window=window), torch.zeros(3))
    assert torch.equal(spectral_entropy(images, window=window), torch.zeros(3))


def test_constant_image_in_a_batch_does_not_disturb_the_others() -> None:
    rng = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 32, 32, generator=rng)
    batch = torch.cat([noise[:1], torch.full((1, 32, 32), 0.7), noise[1:]])
    ratio = high_frequency_ratio(batch)
    assert ratio[1] == 0
    assert torch.allclose(ratio[[0, 2]], high_frequency_ratio(noise))


@pytest.mark.parametrize(("height", "width"), [(64, 64), (96, 81), (33, 50)])
@pytest.mark.parametrize("window", [True, False])
def test_matches_full_grid_reference(height: int, width: int, window: bool) -> None:
    rng = np.random.default_rng(height * width)
    # Smooth structure plus noise, so that the spectrum is far from flat.
    yy, xx = np.mgrid[0:height, 0:width]
    images = np.stack(
        [
            np.sin(xx / (3 + k)) * np.cos(yy / (5 + k)) * 0.3
            + 0.5
            + rng.normal(0, 0.05, (height, width))
            for k in range(4)
        ]
    ).astype(np.float32)
    for cutoff in (0.05, 0.25, 0.45):
        ratio = high_frequency_ratio(torch.from_numpy(images), cutoff=cutoff, window=window)
        entropy = spectral_entropy(torch.from_numpy(images), window=window)
        for i, image in enumerate(images):
            ref_ratio, ref_entropy = _reference(image, cutoff, window)
            assert float(ratio[i]) == pytest.approx(ref_ratio, abs=2e-4)
            assert float(entropy[i]) == pytest.approx(ref_entropy, abs=2e-4)


@pytest.mark.parametrize("cutoff", [0.1, 0.25, 0.4])
@pytest.mark.parametrize(
    ("height", "width", "window"), [(128, 128, True), (128, 128, False), (90, 121, True)]
)
def test_white_noise_ratio_is_the_grid_share_above_the_cutoff(
    cutoff: float, height: int, width: int, window: bool
) -> None:
    # White noise has a flat expected power spectrum, and so does the windowed noise
    # (E|FFT(n·w)[k]|² = σ² Σ w² for every k); the mean removal only takes power out of
    # the DC bin (and, with a window, a few bins beside it).  So the expected ratio is
    # the share of grid bins above the cutoff.
    generator = torch.Generator().manual_seed(int(cutoff * 1000) + height)
    noise = torch.rand(20, height, width, generator=generator)
    measured = float(high_frequency_ratio(noise, cutoff=cutoff, window=window).mean())
    expected = _grid_share_above(height, width, cutoff)
    assert measured == pytest.approx(expected, abs=0.01)
    if cutoff == 0.25:
        assert expected == pytest.approx(1 - math.pi * cutoff**2, abs=0.01)


def test_white_noise_has_near_maximal_entropy_and_a_sinusoid_low() -> None:
    generator = torch.Generator().manual_seed(5)
    noise = torch.rand(8, 128, 128, generator=generator)
    assert float(spectral_entropy(noise).min()) > 0.9
    xx = torch.arange(128, dtype=torch.float32)
    wave = 0.5 + 0.4 * torch.cos(2 * math.pi * (16 / 128) * xx)[None, None, :].expand(1, 128, 128)
    # Unwindowed, an on-grid cosine is two bins of equal power: entropy log 2 / log(H·W).
    assert float(spectral_entropy(wave, window=False)) == pytest.approx(
        math.log(2) / math.log(128 * 128), abs=1e-4
    )
    # The window spreads each peak over its main lobe (a few bins in each direction).
    assert float(spectral_entropy(wave)) < 0.3


@pytest.mark.parametrize("window", [True, False])
def test_sinusoid_above_or_below_the_cutoff(window: bool) -> None:
    xx = torch.arange(128, dtype=torch.float32)
    # Frequencies on the FFT grid (k / 128 cycles per pixel): no leakage without a window.
    fine = 0.5 + 0.4 * torch.cos(2 * math.pi * (48 / 128) * xx)[None, None, :].expand(1, 128, 128)
    coarse = 0.5 + 0.4 * torch.cos(2 * math.pi * (8 / 128) * xx)[None, :, None].expand(1, 128, 128)
    assert float(high_frequency_ratio(fine, cutoff=0.25, window=window)) > 0.99
    assert float(high_frequency_ratio(coarse, cutoff=0.25, window=window)) < 0.01


def _cluttered(level: int, rng: np.random.Generator, size: int = 128) -> torch.Tensor:
    """An empty scene (a smooth illumination gradient) with ``level`` random rectangles and lines."""
    yy, xx = np.mgrid[0:size, 0:size]
    canvas = Image.fromarray((60 + 120 * (0.6 * xx / size + 0.4 * yy / size)).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(level):
        x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
        x1, y1 = x0 + int(rng.integers(4, 40)), y0 + int(rng.integers(4, 40))
        shade = int(rng.integers(0, 256))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=shade)
        else:
            draw.line([x0, y0, x1, y1], fill=shade, width=int(rng.integers(1, 3)))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255)


def test_more_clutter_scores_higher_on_average() -> None:
    # The canvas is a smooth gradient, not a uniform grey: both scores are shares of the
    # image's own power, so on a perfectly uniform canvas N shapes of the same statistics
    # have (in expectation) the same spectral shape as one shape — clutter shows up
    # against the low-frequency content every real scene has.
    rng = np.random.default_rng(11)
    levels = [0, 2, 8, 32, 96]
    ratios, entropies = [], []
    for level in levels:
        batch = torch.stack([_cluttered(level, rng) for _ in range(20)])
        ratios.append(float(high_frequency_ratio(batch).mean()))
        entropies.append(float(spectral_entropy(batch).mean()))
    assert all(a < b for a, b in itertools.pairwise(ratios)), ratios
    assert all(a < b for a, b in itertools.pairwise(entropies)), entropies


@settings(max_examples=30, deadline=None)
@given(
    images=arrays(np.float32, (2, 16, 20), elements=st.floats(0.0, 1.0, width=32)),
    gain=st.floats(0.05, 1.0),
    offset=st.floats(0.0, 0.5),
)
def test_scores_do_not_depend_on_brightness_or_contrast(
    images: np.ndarray, gain: float, offset: float
) -> None:
    tensor = torch.from_numpy(images).to(torch.float64)
    if bool((tensor.amax(dim=(1, 2)) - tensor.amin(dim=(1, 2)) < 1e-3).any()):
        return  # (almost) constant images: covered by the exact-zero test
    scaled = tensor * gain + offset
    assert torch.allclose(high_frequency_ratio(scaled), high_frequency_ratio(tensor), atol=1e-4)
    assert torch.allclose(spectral_entropy(scaled), spectral_entropy(tensor), atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    images=arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(2, 24), st.integers(2, 24)),
        elements=st.floats(0.0, 1.0, width=32),
    ),
    cutoff=st.floats(0.01, 0.49),
    window=st.booleans(),
)
def test_scores_are_finite_and_in_unit_range(
    images: np.ndarray, cutoff: float, window: bool
) -> None:
    tensor = torch.from_numpy(images)
    for scores in (
        high_frequency_ratio(tensor, cutoff=cutoff, window=window),
        spectral_entropy(tensor, window=window),
    ):
        assert scores.shape == (images.shape[0],)
        assert bool(torch.isfinite(scores).all())
        assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0


def test_each_image_is_scored_independently_of_its_batch() -> None:
    generator = torch.Generator().manual_seed(3)
    batch = torch.rand(5, 40, 40, generator=generator).cumsum(dim=2) / 40
    together = high_frequency_ratio(batch)
    alone = torch.cat([high_frequency_ratio(batch[i : i + 1]) for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_empty_batch_gives_empty_scores() -> None:
    assert high_frequency_ratio(torch.empty(0, 16, 16)).shape == (0,)
    assert spectral_entropy(torch.empty(0, 16, 16)).shape == (0,)


def test_bad_inputs_are_refused_with_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W\).*\(16, 16\)"):
        high_frequency_ratio(torch.zeros(16, 16))
    with pytest.raises(TypeError, match="floating"):
        spectral_entropy(torch.zeros(1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"cutoff.*0\.6"):
        high_frequency_ratio(torch.zeros(1, 16, 16), cutoff=0.6)
    with pytest.raises(TypeError, match="ndarray"):
        high_frequency_ratio(np.zeros((1, 16, 16)))  # type: ignore[arg-type]


def test_scorers_are_registered_with_their_settings() -> None:
    fourier = SCORERS["fourier"]
    entropy = SCORERS["fourier_entropy"]
    assert fourier.needs == {"images"} and entropy.needs == {"images"}
    assert fourier.settings is FourierSettings and entropy.settings is FourierEntropySettings
    images = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(0))
    values = fourier.fn(images=images, **FourierSettings(cutoff=0.2).model_dump())
    assert isinstance(values, np.ndarray) and values.shape == (4,) and values.dtype == np.float64
    assert np.allclose(values, high_frequency_ratio(images, cutoff=0.2).numpy())
    values = entropy.fn(images=images, **FourierEntropySettings().model_dump())
    assert np.allclose(values, spectral_entropy(images).numpy())


@pytest.mark.parametrize(
    "bad",
    [
        {"cutoff": 0.0},
        {"cutoff": 0.5},
        {"cutoff": -1},
        {"size": 4},
        {"window": "sometimes"},
        {"cuttoff": 0.2},
    ],
)
def test_settings_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        FourierSettings(**bad)  # type: ignore[arg-type]


def test_entropy_settings_have_no_cutoff() -> None:
    with pytest.raises(ValidationError):
        FourierEntropySettings(cutoff=0.2)  # type: ignore[call-arg]
    assert FourierEntropySettings().size == 128


# -- one spectrum per image for both scorers --------------------------------------------------


def _count_ffts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = torch.fft.rfft2

    def counting(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.fft, "rfft2", counting)
    return calls


def test_both_scorers_share_one_spectrum_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.rand(6, 32, 32, generator=torch.Generator().manual_seed(3))
    fresh_ratio = high_frequency_ratio(images.clone(), cutoff=0.2)
    fresh_entropy = spectral_entropy(images.clone())
    calls = _count_ffts(monkeypatch)
    ratio = SCORERS["fourier"].fn(images=images, cutoff=0.2)
    entropy = SCORERS["fourier_entropy"].fn(images=images)
    assert calls == [(6, 32, 32)]  # one FFT of the batch for both scorers
    assert np.array_equal(ratio, fresh_ratio.double().numpy())
    assert np.array_equal(entropy, fresh_entropy.double().numpy())


def test_spectrum_is_recomputed_for_a_new_or_changed_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(3, 16, 16, generator=gen)
    calls = _count_ffts(monkeypatch)
    before = spectral_entropy(images)
    images[0] = 0.5  # in place: the cached spectrum no longer belongs to these pixels
    after = spectral_entropy(images)
    assert len(calls) == 2 and after[0] == 0.0 and after[1] == before[1]
    spectral_entropy(images, window=False)  # another window is another spectrum
    other = images.clone()
    spectral_entropy(other)  # equal pixels, another tensor
    assert len(calls) == 4


def test_spectrum_is_released_with_its_batch() -> None:
    import gc
    import weakref

    import difficulty.fourier as fourier

    images = torch.rand(2, 16, 16)
    high_frequency_ratio(images)
    assert fourier._last_spectrum is not None
    power = weakref.ref(fourier._last_spectrum.power)
    del images
    gc.collect()
    assert fourier._last_spectrum is None and power() is None


@pytest.mark.parametrize("scorer", ["fourier", "fourier_entropy"])
def test_an_image_scores_the_same_in_any_batch(scorer: str) -> None:
    """Bit for bit: values do not depend on the batch size, the neighbours or the threads."""
    images = torch.rand(70, 64, 64, generator=torch.Generator().manual_seed(5))
    fn = SCORERS[scorer].fn
    whole = fn(images=images)
    for lo, hi in [(0, 1), (3, 40), (10, 70), (0, 69), (33, 34)]:
        assert np.array_equal(fn(images=images[lo:hi].clone()), whole[lo:hi]), (lo, hi)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert np.array_equal(fn(images=images.clone()), whole)
    finally:
        torch.set_num_threads(threads)
