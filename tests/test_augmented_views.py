"""Augmented views of the test photos (crops, flips, scales) for the int8 accuracy check."""

import numpy as np
import pytest

pytest.importorskip("skimage")

from mulayer.errors import MuLayerError  # noqa: E402
from mulayer.models.accuracy import output_sqnr_db  # noqa: E402
from mulayer.models.pretrained import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    TEST_PHOTOS,
    augmented_test_views,
    load_photos,
)


def test_two_hundred_distinct_views_of_the_test_photos_only():
    views = augmented_test_views()
    assert len(views) >= 200
    assert {name.split("/")[0] for name in views} == set(TEST_PHOTOS)
    stacked = np.concatenate(list(views.values()))
    assert stacked.shape == (len(views), 3, 224, 224) and stacked.dtype == np.float32
    assert np.isfinite(stacked).all()
    # Pixel values stay within the normalized [0, 1] range of the photos.
    low = (0 - IMAGENET_MEAN) / IMAGENET_STD
    high = (1 - IMAGENET_MEAN) / IMAGENET_STD
    assert (stacked >= low.reshape(1, 3, 1, 1) - 1e-4).all()
    assert (stacked <= high.reshape(1, 3, 1, 1) + 1e-4).all()
    # Every view differs from every other (crops, flips and scales are random) ...
    flat = stacked.reshape(len(views), -1)
    assert len({row.tobytes() for row in flat}) == len(views)
    # ... and from every calibration photo.
    calibration = load_photos().calibration_batch().reshape(-1, flat.shape[1])
    assert not {row.tobytes() for row in calibration} & {row.tobytes() for row in flat}


def test_views_are_reproducible_and_seeded():
    a, b = augmented_test_views(3, seed=7), augmented_test_views(3, seed=7)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    c = augmented_test_views(3, seed=8)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    with pytest.raises(MuLayerError, match="per_photo=0"):
        augmented_test_views(0)


def test_output_sqnr_db():
    rng = np.random.default_rng()
    xs = {str(i): rng.standard_normal((1, 8)).astype(np.float32) for i in range(4)}
    assert output_sqnr_db(lambda x: x, lambda x: x, xs) == float("inf")
    # An error of 1% of the amplitude everywhere: 40 dB.
    assert output_sqnr_db(lambda x: 1.01 * x, lambda x: x, xs) == pytest.approx(40.0, abs=1e-3)
