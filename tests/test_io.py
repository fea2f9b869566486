"""Reading and writing image files: bit depths, EXIF orientation, output paths checked first."""

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from gdq_engine import Engine, upscale_file
from gdq_engine.cli import main
from gdq_engine.io import check_output_path, load_image, load_image_rgba, save_image


def _grey16(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, size=(h, w), dtype=np.uint16)


def test_16_bit_grey_files_keep_their_values(tmp_path):
    """Pillow's convert("RGB") clips 16-bit grey at 255 (a white image); the loader scales it."""
    grey = _grey16(13, 22, seed=3)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = load_image(tmp_path / "g16.png")
    want = torch.from_numpy(grey.astype(np.float64) / 65535).float()
    assert img.shape == (3, 13, 22) and img.dtype == torch.float32
    for c in range(3):
        assert torch.equal(img[c], want)
    assert load_image_rgba(tmp_path / "g16.png")[1] is None


def test_float_and_32_bit_grey_files(tmp_path):
    g = np.random.default_rng(5).random((9, 11), dtype=np.float32)
    Image.fromarray(g, "F").save(tmp_path / "f.tif")
    assert torch.equal(load_image(tmp_path / "f.tif")[1], torch.from_numpy(g))
    Image.fromarray(g * 2, "F").save(tmp_path / "f2.tif")
    with pytest.raises(ValueError, match=r"f2.tif: a float image must hold values in \[0, 1\]"):
        load_image(tmp_path / "f2.tif")
    Image.fromarray(np.full((6, 7), 70000, np.int32), "I").save(tmp_path / "i32.tif")
    with pytest.raises(ValueError, match="must be 16-bit"):
        load_image(tmp_path / "i32.tif")


@pytest.mark.parametrize("orientation, turn", [(1, None), (3, Image.Transpose.ROTATE_180),
                                               (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    """Phone photos store their pixels unrotated and an EXIF tag that says how to show them."""
    rgb = (random_image(10, 17, seed=orientation).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    stored = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "photo.png", exif=exif)
    shown = stored if turn is None else stored.transpose(turn)
    want = torch.from_numpy(np.asarray(shown).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(load_image(tmp_path / "photo.png"), want)


def test_pil_images_of_16_bit_grey_upscale_as_their_values(tiny_edsr):
    engine = Engine(tiny_edsr, device="cpu", patch_size=16, stride=12)
    grey = _grey16(18, 21, seed=9)
    out = engine.upscale(Image.fromarray(grey))
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (42, 36)
    as_float = torch.from_numpy(grey.astype(np.float64) / 65535).float().expand(3, -1, -1)
    want = (engine.upscale(as_float) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(out), want)


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "a.PNG") == tmp_path / "a.PNG"
    with pytest.raises(ValueError, match="unsupported output format '.xyz'"):
        check_output_path(tmp_path / "new" / "a.xyz", make_folder=True)
    assert not (tmp_path / "new").exists()  # the suffix is checked before a folder is made
    with pytest.raises(ValueError, match="does not exist"):
        check_output_path(tmp_path / "new" / "a.png")
    assert check_output_path(tmp_path / "new" / "deeper" / "a.png", make_folder=True).parent.is_dir()
    with pytest.raises(ValueError, match="does not exist"):
        save_image(random_image(4, 4), tmp_path / "missing" / "b.png")


def test_upscale_file_checks_every_output_before_upscaling(tiny_edsr, tmp_path, monkeypatch):
    engine = Engine(tiny_edsr, device="cpu", patch_size=16, stride=12)
    save_image(random_image(12, 14), tmp_path / "in.png")
    monkeypatch.setattr(engine, "upscale", lambda *a, **k: pytest.fail("upscaled before the outputs were checked"))
    for outputs in ({"dst": tmp_path / "gone" / "o.png"}, {"compare": tmp_path / "cmp.txt"},
                    {"dst": tmp_path / "o.gif"}):
        kwargs = {"dst": tmp_path / "o.png", **outputs}
        with pytest.raises(ValueError):
            upscale_file(engine, tmp_path / "in.png", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_cli_makes_the_output_folder_and_refuses_bad_outputs_before_the_model_loads(tmp_path, ckpt, capsys,
                                                                                   monkeypatch):
    save_image(random_image(12, 14), tmp_path / "in.png")
    assert main(["upscale", str(tmp_path / "in.png"), str(tmp_path / "new" / "deep" / "o.png"), "--model", ckpt,
                 "--compare", str(tmp_path / "cmp" / "c.png")]) == 0
    assert Image.open(tmp_path / "new" / "deep" / "o.png").size == (28, 24)
    assert Image.open(tmp_path / "cmp" / "c.png").size == (28 * 2 + 8, 24)

    import gdq_engine.cli as cli

    monkeypatch.setattr(cli, "_engine", lambda *a, **k: pytest.fail("the model loaded before the outputs were checked"))
    for argv, message in [([str(tmp_path / "in.png"), str(tmp_path / "n2" / "o.xyz")], "unsupported output format"),
                          ([str(tmp_path / "in.png"), str(tmp_path / "o.png"), "--compare", str(tmp_path / "c.gif")],
                           "unsupported output format"),
                          ([str(tmp_path / "nope.png"), str(tmp_path / "n3" / "o.png")],
                           "no such image file or folder")]:
        assert main(["upscale", *argv, "--model", ckpt]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "n2").exists() and not (tmp_path / "n3").exists() and not (tmp_path / "o.png").exists()


def test_cli_compare_takes_one_image(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(2):
        save_image(random_image(12, 14, seed=k), src / f"{k}.png")
    assert main(["upscale", str(src), str(tmp_path / "out"), "--model", ckpt,
                 "--compare", str(tmp_path / "c.png")]) == 2
    assert "--compare takes one input image" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("dtype, form", [(d, f) for d in (torch.float16, torch.bfloat16, torch.float64, torch.uint16)
                                         for f in ("tensor", "numpy") if (d, f) != (torch.bfloat16, "numpy")])
def test_results_come_back_in_the_input_dtype(tiny_edsr, dtype, form):
    """Computed in fp32, as the fp32 input's result; floats cast, uint16 rounded to 65535 x (numpy
    has no bfloat16)."""
    engine = Engine(tiny_edsr, device="cpu", patch_size=16, stride=12)
    g = torch.Generator().manual_seed(int(dtype.itemsize) * 7 + len(form))
    if dtype == torch.uint16:
        x = torch.randint(0, 65536, (3, 17, 19), generator=g, dtype=torch.int32).to(torch.uint16)
        as_float = x.float() / 65535
    else:
        x = torch.rand(3, 17, 19, generator=g).to(dtype)
        as_float = x.float()
    ref = engine.upscale(as_float)
    want = (ref * 65535).round().to(torch.uint16) if dtype == torch.uint16 else ref.to(dtype)
    if form == "numpy":
        out = engine.upscale(x.permute(1, 2, 0).numpy())
        assert isinstance(out, np.ndarray) and out.dtype == x.numpy().dtype
        out = torch.from_numpy(out).permute(2, 0, 1)
    else:
        out = engine.upscale(x)
    assert out.dtype == dtype and out.shape == (3, 34, 38)
    assert torch.equal(out, want)


def test_integer_inputs_other_than_8_and_16_bit_are_refused(tiny_edsr):
    engine = Engine(tiny_edsr, device="cpu", patch_size=16, stride=12)
    with pytest.raises(ValueError, match="uint8 or uint16, got dtype torch.int16"):
        engine.upscale(torch.zeros(3, 8, 8, dtype=torch.int16))
    with pytest.raises(ValueError, match="uint8 or uint16, got dtype int32"):
        engine.upscale(np.zeros((8, 8, 3), np.int32))


def test_cli_folder_skips_a_bad_image_and_writes_the_others(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    src.mkdir()
    save_image(random_image(12, 14, seed=1), src / "a.png")
    (src / "b.png").write_bytes(b"\x89PNG truncated")
    Image.fromarray(np.zeros((3, 9, 3), np.uint8)).save(src / "c.png")  # too small
    save_image(random_image(13, 11, seed=2), src / "d.png")
    assert main(["upscale", str(src), str(tmp_path / "out"), "--model", ckpt]) == 2
    err = capsys.readouterr().err
    assert f"skipped {src / 'b.png'}: " in err and "not a readable image" in err and "too small" in err
    assert "error: 2 of 4 images were skipped" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x2.png", "d_x2.png"]
    assert Image.open(tmp_path / "out" / "d_x2.png").size == (22, 26)


def test_cli_folder_images_of_one_stem_get_names_of_their_own(tmp_path, ckpt):
    src = tmp_path / "in"
    src.mkdir()
    save_image(random_image(12, 14, seed=1), src / "a.png")
    save_image(random_image(13, 11, seed=2), src / "a.jpg")
    save_image(random_image(10, 10, seed=3), src / "b.png")
    assert main(["upscale", str(src), str(tmp_path / "out"), "--model", ckpt]) == 0
    sizes = {p.name: Image.open(p).size for p in (tmp_path / "out").iterdir()}
    assert sizes == {"a_png_x2.png": (28, 24), "a_jpg_x2.png": (22, 26), "b_x2.png": (20, 20)}


def test_images_over_pillows_pixel_limit_are_a_value_error(tmp_path, monkeypatch):
    save_image(random_image(12, 14), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # Pillow refuses more than twice this
    with pytest.raises(ValueError, match="big.png is not a readable image: .*exceeds limit"):
        load_image(tmp_path / "big.png")


@pytest.mark.parametrize("mode", ["L", "LA", "I;16", "RGB", "RGBA", "P"])
def test_upscale_file_writes_grey_sources_grey(tiny_edsr, tmp_path, mode):
    """A grey file gives a grey file: the luma of the RGB result Pillow's "L" conversion takes;
    alpha is kept; colour files stay colour."""
    engine = Engine(tiny_edsr, device="cpu", patch_size=16, stride=12)
    rgb = (random_image(14, 15, seed=len(mode)).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    src = Image.fromarray(rgb).convert(mode) if mode != "I;16" else Image.fromarray(
        np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257)
    src.save(tmp_path / "in.png")
    upscale_file(engine, tmp_path / "in.png", tmp_path / "out.png")
    out = Image.open(tmp_path / "out.png")
    grey, alpha = mode in ("L", "LA", "I;16"), mode in ("LA", "RGBA")
    assert out.mode == {(True, False): "L", (True, True): "LA", (False, False): "RGB", (False, True): "RGBA"}[
        (grey, alpha)]
    rgb_in, _ = load_image_rgba(tmp_path / "in.png")
    colour = Image.fromarray((engine.upscale((rgb_in * 255).round().to(torch.uint8))).permute(1, 2, 0).numpy())
    want = colour.convert("L") if grey else colour
    assert np.array_equal(np.asarray(out.convert(want.mode)), np.asarray(want))


def test_alpha_into_jpeg_is_dropped_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="JPG has no alpha channel"):
        save_image(random_image(8, 9), tmp_path / "a.jpg", alpha=torch.full((1, 8, 9), 0.5))
    assert Image.open(tmp_path / "a.jpg").mode == "RGB"
    save_image(random_image(8, 9), tmp_path / "a.webp", alpha=torch.full((1, 8, 9), 0.5))
    assert Image.open(tmp_path / "a.webp").mode == "RGBA"
