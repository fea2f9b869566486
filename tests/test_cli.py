import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import random_image
from PIL import Image

from gdq_engine.cli import main
from gdq_engine.io import save_image
from gdq_engine.models import save_checkpoint


@pytest.fixture
def ckpt(tmp_path, tiny_edsr):
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_edsr, path)
    return str(path)


def test_module_help():
    out = subprocess.run([sys.executable, "-m", "gdq_engine", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("upscale", "eval", "train", "info"):
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", ["upscale", "eval", "train", "info"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "edsr-baseline-x4" in out and "C++ extension: built" in out


def test_upscale_file_and_folder(tmp_path, ckpt):
    src = tmp_path / "in"
    src.mkdir()
    save_image(random_image(20, 26), src / "a.png")
    save_image(random_image(17, 31, seed=1), src / "b.jpg")
    assert main(["upscale", str(src / "a.png"), str(tmp_path / "a_x2.png"), "--model", ckpt,
                 "--compare", str(tmp_path / "cmp.png"), "--patch-size", "16", "--stride", "12"]) == 0
    assert Image.open(tmp_path / "a_x2.png").size == (52, 40)
    assert Image.open(tmp_path / "cmp.png").size == (52 * 2 + 8, 40)
    assert main(["upscale", str(src), str(tmp_path / "out"), "--model", ckpt, "--whole-image"]) == 0
    assert Image.open(tmp_path / "out" / "b_x2.png").size == (62, 34)


def test_upscale_bad_input_writes_nothing(tmp_path, ckpt, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    assert main(["upscale", str(tmp_path / "bad.png"), str(tmp_path / "o.png"), "--model", ckpt]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
    assert main(["upscale", str(tmp_path / "bad.png"), str(tmp_path / "o.png"), "--model",
                 str(tmp_path / "nope.pt")]) == 2
    assert "neither a checkpoint file nor a known model" in capsys.readouterr().err
    tiny = np.zeros((2, 2, 3), np.uint8)
    Image.fromarray(tiny).save(tmp_path / "tiny.png")
    assert main(["upscale", str(tmp_path / "tiny.png"), str(tmp_path / "o.png"), "--model", ckpt]) == 2
    assert "too small" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_eval_prints_table_and_json(tmp_path, ckpt, capsys):
    hr = tmp_path / "hr"
    hr.mkdir()
    for i in range(2):
        save_image(random_image(40, 46, seed=i), hr / f"{i}.png")
    assert main(["eval", "--model", ckpt, "--data", str(hr), "--bicubic", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| hr | bicubic | x2 |" in out and f"| hr | {ckpt} | x2 |" in out
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["method"] for r in rows] == ["bicubic", ckpt]
    assert all(len(r["per_image_psnr"]) == 2 for r in rows)
