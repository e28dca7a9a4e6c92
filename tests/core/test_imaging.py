import io
import threading

import numpy as np
import pytest
from PIL import Image

from dermt2im.core.imaging import DecodeError, decode_image, encode_png


def _png(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def test_header_truncated_jpeg_is_a_decode_error():
    data = _jpeg(Image.new("RGB", (64, 64), (120, 80, 60)))
    for cut in (3, 20, 100):
        with pytest.raises(DecodeError):
            decode_image(data[:cut])


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    arr = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    d = decode_image(_png(arr))
    assert d.rgb.dtype == np.uint8 and d.rgb.shape == (8, 8, 3)
    assert 120 <= int(d.rgb[0, 0, 0]) <= 135  # mid-grey, not saturated white


def test_rgba_is_composited_and_limit_enforced_from_header():
    rgba = np.zeros((4, 4, 4), np.uint8)
    d = decode_image(_png(rgba))
    assert d.mode == "RGBA" and (d.rgb == 255).all()  # fully transparent over white
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(_png(np.zeros((20, 20, 3), np.uint8)), max_pixels=100)


def test_decoding_is_thread_safe_and_leaves_pillow_limits_alone():
    before = Image.MAX_IMAGE_PIXELS
    data = _png(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    errors = []

    def work():
        try:
            for _ in range(20):
                decode_image(data)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and Image.MAX_IMAGE_PIXELS == before


def test_png_text_chunks_roundtrip():
    data = encode_png(np.zeros((4, 4, 3), np.uint8), {"prompt": "a lesion", "seed": "7"})
    assert Image.open(io.BytesIO(data)).text == {"prompt": "a lesion", "seed": "7"}
