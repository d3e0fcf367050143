import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from data_pipeline.images import BadImage, atomic_write_bytes, is_gray, jpeg_roundtrip, read_image, rgb_to_luma
from data_pipeline.sources import skimage_dir


def test_luma_of_live1_color_equals_live1_gray(data_root):
    names = sorted(p.name for p in (data_root / "live1_color").glob("*.png"))
    assert len(names) == 29
    for name in names:
        rgb = read_image(data_root / "live1_color" / name, "rgb")
        gray = read_image(data_root / "live1_gray" / name, "gray")
        assert np.array_equal(rgb_to_luma(rgb), gray), name


def test_gray_mode_converts_rgb_files_to_luma(photo_pair):
    gray, rgb = photo_pair
    assert np.array_equal(read_image(skimage_dir() / "astronaut.png", "gray"), gray)
    assert rgb.shape == gray.shape + (3,) and rgb.dtype == np.uint8
    assert 16 <= gray.min() and gray.max() <= 235  # studio range


@pytest.mark.parametrize("kind, reason", [
    ("empty", "empty file"),
    ("truncated", "not a readable image"),
    ("text", "not a readable image"),
    ("tiny", "too small"),
    ("cmyk", "unsupported pixel mode CMYK"),
    ("huge", r"too large \(20000x14000, 280 MP; at most 179 MP"),
    ("transparent", r"has transparent pixels \(LA\)"),
    ("palette_transparent", r"has transparent pixels \(P\)"),
    ("animation", "has 3 frames"),
    ("pages", "has 2 frames"),
    ("gray_in_rgb", "grayscale image, but the dataset mode is rgb"),
])
def test_bad_inputs_give_a_reason(tmp_path, photo_pair, kind, reason):
    gray, _ = photo_pair
    path = tmp_path / f"{kind}.png"
    mode = "gray"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path = tmp_path / "truncated.jpg"
        Image.fromarray(gray).save(path, quality=90)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "tiny":
        Image.fromarray(gray[:16, :16]).save(path)
    elif kind == "huge":  # a PNG header (the size is checked before decoding) and a little data
        path.write_bytes(_png_header(20000, 14000))
    elif kind == "cmyk":  # a print shop's JPEG
        path = tmp_path / "cmyk.jpg"
        Image.fromarray(gray).convert("CMYK").save(path)
    elif kind == "transparent":
        alpha = np.full_like(gray, 255)
        alpha[:8] = 0
        Image.fromarray(np.dstack([gray, alpha]), "LA").save(path)
    elif kind == "palette_transparent":  # a GIF-style palette whose first entry is see-through
        Image.fromarray(gray).convert("P").save(path, transparency=int(np.asarray(Image.fromarray(gray).convert("P"))[0, 0]))
    elif kind == "animation":
        path = tmp_path / "animation.gif"
        Image.fromarray(gray).save(path, save_all=True, append_images=[Image.fromarray(np.roll(gray, i, 1)) for i in (1, 2)])
    elif kind == "pages":
        path = tmp_path / "pages.tif"
        Image.fromarray(gray).save(path, save_all=True, append_images=[Image.fromarray(gray[::-1])])
    else:
        Image.fromarray(gray).save(path)
        mode = "rgb"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning from 89 MP on
        with pytest.raises(BadImage, match=reason):
            read_image(path, mode, min_size=32)


def test_a_100_mp_image_reads_without_pillows_decompression_bomb_warning(tmp_path):
    (tmp_path / "large.png").write_bytes(_png_header(10000, 10000))  # Pillow fills in the rows the data lacks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "large.png", None).shape == (10000, 10000)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(bytes(width + 1)))


def test_bilevel_palette_and_camera_mpo_files_read_as_their_pixels(tmp_path, photo_pair):
    gray, rgb = photo_pair
    Image.fromarray(gray > 128).save(tmp_path / "bilevel.png")
    assert np.array_equal(read_image(tmp_path / "bilevel.png", None), np.where(gray > 128, 255, 0))
    palette = Image.fromarray(rgb).quantize(64)
    palette.save(tmp_path / "palette.png")  # opaque: the palette's colours, as RGB
    assert np.array_equal(read_image(tmp_path / "palette.png", None), np.asarray(palette.convert("RGB")))
    # a phone's JPEG with a preview appended (MPO): the photo itself, not "2 frames"
    Image.fromarray(rgb).save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[Image.fromarray(rgb[::4, ::4].copy())])
    assert np.array_equal(read_image(tmp_path / "phone.jpg", None), jpeg_roundtrip(rgb, 75))


def test_16_bit_gray_files_read_as_8_bit_as_pillow_reads_16_bit_rgb(tmp_path, photo_pair):
    gray, _ = photo_pair
    deep = gray.astype(np.uint16) * 257  # 8-bit values scaled to the 16-bit range
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    h, w = gray.shape
    (tmp_path / "deep.pgm").write_bytes(f"P5\n{w} {h}\n65535\n".encode() + deep.astype(">u2").tobytes())
    for name in ("deep.png", "deep.tif", "deep.pgm"):
        assert np.array_equal(read_image(tmp_path / name, None), gray), name


def test_a_gray_photo_stored_as_rgb_is_gray_and_stays_gray_through_jpeg(photo_pair):
    gray, rgb = photo_pair
    stored = np.repeat(gray[..., None], 3, axis=2)
    assert is_gray(gray) and is_gray(stored) and not is_gray(rgb)
    decoded = jpeg_roundtrip(stored, 10)  # libjpeg's luma weights sum to one: Y is the gray value, chroma flat
    assert is_gray(decoded) and np.array_equal(decoded[..., 0], jpeg_roundtrip(gray, 10))


def test_jpeg_roundtrip_loses_information_monotonically(photo_pair):
    gray, rgb = photo_pair
    for img in (gray, rgb):
        err = [np.abs(jpeg_roundtrip(img, q).astype(int) - img).mean() for q in (10, 40, 95)]
        assert err[0] > err[1] > err[2] > 0
        assert jpeg_roundtrip(img, 10).shape == img.shape


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"a" * 10)
    atomic_write_bytes(target, b"b" * 3)
    assert target.read_bytes() == b"bbb"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_skimage_testset_writes_lossless_gray_and_color_folders(tmp_path):
    from data_pipeline.skimage_testset import COLOR_PHOTOS, GRAY_PHOTOS, main

    assert main([str(tmp_path)]) == 0
    gray = sorted(p.stem for p in (tmp_path / "gray").glob("*.png"))
    color = sorted(p.stem for p in (tmp_path / "color").glob("*.png"))
    assert gray == sorted(COLOR_PHOTOS + GRAY_PHOTOS) and color == sorted(COLOR_PHOTOS)
    for name in COLOR_PHOTOS:  # lossless: the color file is the source, the gray one its luma
        rgb = read_image(tmp_path / "color" / f"{name}.png", None)
        assert np.array_equal(rgb, read_image(skimage_dir() / f"{name}.png", "rgb"))
        assert np.array_equal(read_image(tmp_path / "gray" / f"{name}.png", None), rgb_to_luma(rgb))
    assert read_image(tmp_path / "gray" / "camera.png", None).ndim == 2
