"""Gradient sign maps: one int8 code per parameter, and how they are coloured.

Codes (band = 1e-5): 0 for |g| > band (or not finite), -1 for -band <= g < 0,
+1 for 0 < g <= band, 2 for g == 0.
"""

import math

import numpy as np


def sign_codes(grad, band=1e-5):
    """Gradient sign-map codes (int8, same shape as `grad`).

    0: |g| > band (or not finite), -1: -band <= g < 0, +1: 0 < g <= band, 2: g == 0.
    """
    g = np.asarray(grad, dtype=np.float64)
    codes = np.zeros(g.shape, dtype=np.int8)
    codes[(g >= -band) & (g < 0)] = -1
    codes[(g > 0) & (g <= band)] = 1
    codes[g == 0] = 2
    return codes


#: RGB colour of each sign-map code: white outside the band, red negative,
#: green positive, black exactly zero; grey pads the image.
SIGN_COLOURS = {0: (255, 255, 255), -1: (220, 40, 40), 1: (40, 170, 60), 2: (0, 0, 0)}
_PAD = (128, 128, 128)


def sign_map_image(codes):
    """Sign codes (any shape) as an RGB uint8 image [rows, cols, 3], near square."""
    flat = np.asarray(codes).reshape(-1)
    cols = max(1, math.ceil(math.sqrt(flat.size)))
    rows = max(1, math.ceil(flat.size / cols))
    image = np.empty((rows * cols, 3), np.uint8)
    image[:] = _PAD
    for code, colour in SIGN_COLOURS.items():
        image[: flat.size][flat == code] = colour
    return image.reshape(rows, cols, 3)
