import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from gdq_engine.cli import main
from gdq_engine.io import save_image


def test_module_help():
    out = subprocess.run([sys.executable, "-m", "gdq_engine", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("upscale", "eval", "bench", "calibrate", "train", "info"):
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", ["upscale", "eval", "bench", "calibrate", "train", "info"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "edsr-baseline-x4" in out and "C++ extension: built" in out
    from gdq_engine.ops import cpu_ops

    assert f"CPU integer conv: {cpu_ops.conv_path(64, 64)}" in out


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


def test_upscale_one_image_into_a_folder_and_a_folder_into_a_file_name(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    src.mkdir()
    save_image(random_image(20, 26), src / "a.png")
    (tmp_path / "out").mkdir()
    assert main(["upscale", str(src / "a.png"), str(tmp_path / "out"), "--model", ckpt, "--whole-image"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_x2.png"]
    assert Image.open(tmp_path / "out" / "a_x2.png").size == (52, 40)
    capsys.readouterr()
    assert main(["upscale", str(src), str(tmp_path / "o.png"), "--model", ckpt]) == 2
    assert "give an output folder, not the image file name" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


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
    assert "| hr | bicubic | x2 | - | - |" in out and "| hr | fp | x2 | 32.00 |" in out
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["method"] for r in rows] == ["bicubic", "fp"]
    assert all(len(r["per_image_psnr"]) == 2 for r in rows)


def test_eval_quantized_policies(tmp_path, ckpt, capsys):
    hr = tmp_path / "hr"
    hr.mkdir()
    for i in range(2):
        save_image(random_image(104, 120, seed=i), hr / f"{i}.png")
    assert main(["eval", "--model", ckpt, "--data", str(hr), "--calib", str(hr), "--patch-size", "12", "--stride",
                 "10", "--policies", "fp", "static:8", "static:4", "entropy:2,4,8", "--json",
                 str(tmp_path / "q.json")]) == 0
    rows = json.loads((tmp_path / "q.json").read_text())
    assert [r["method"] for r in rows] == ["fp", "static:8", "static:4", "entropy:2,4,8"]
    assert [r["fab"] for r in rows[:3]] == [32.0, 8.0, 4.0] and 2.0 <= rows[3]["fab"] <= 8.0
    assert rows[1]["bitops_per_image"] > rows[2]["bitops_per_image"]
    # model size: the FP model in fp32; the quantized ones (8-bit weights, whatever the activations) smaller
    assert rows[0]["model_bytes"]["packed_weights"] == 0 and rows[1]["model_bytes"]["packed_weights"] > 0
    assert rows[1]["model_bytes"]["total"] < rows[0]["model_bytes"]["total"]
    assert rows[1]["model_bytes"]["packed_weights"] == rows[2]["model_bytes"]["packed_weights"]
    assert abs(rows[1]["psnr"] - rows[0]["psnr"]) < abs(rows[2]["psnr"] - rows[0]["psnr"]) + 1e-9
    assert main(["eval", "--model", ckpt, "--data", str(hr), "--policies", "turbo:3"]) == 2
    assert "unknown policy spec" in capsys.readouterr().err


def test_bench_times_policies_on_the_same_frames(tmp_path, ckpt, capsys):
    """bench: one row per policy on the same frames (crops of the input folder's images, cycled),
    the first row the reference of the speed-up and PSNR columns; JSON with the environment."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        save_image(random_image(30, 44, seed=i), images / f"{i}.png")
    common = ["bench", "--model", ckpt, "--input", str(images), "--calib", str(images), "--patch-size", "12",
              "--stride", "10"]
    assert main([*common, "--output", "48x40", "--frames", "3", "--reps", "2", "--policies", "fp", "static:8",
                 "static:4", "--json", str(tmp_path / "new" / "b.json")]) == 0
    captured = capsys.readouterr()
    assert "| fp | fp |" in captured.out and "identical" in captured.out
    assert "device: cpu" in captured.err and "3 float frame(s) of 24x20 -> 48x40; 2 rounds" in captured.err
    record = json.loads((tmp_path / "new" / "b.json").read_text())
    assert record["environment"]["command"].startswith("python -m gdq_engine bench --model")
    assert [Path(p).name for p in record["workload"]["frames"]] == ["0.png", "1.png", "0.png"]
    rows = record["rows"]
    assert [r["method"] for r in rows] == ["fp", "static:8", "static:4"]
    assert [r["fab"] for r in rows] == [32.0, 8.0, 4.0]
    assert [r["backend"] for r in rows] == ["fp", "cpp", "cpp"]
    assert rows[0]["psnr_y"] is None and rows[0]["identical_frames"] == 3 and rows[0]["speedup"] == 1.0
    assert rows[2]["identical_frames"] == 0 and rows[1]["psnr_y"] > rows[2]["psnr_y"] > 10
    for r in rows:
        assert r["output"] == "48x40" and r["patches"] == 6 and r["ms"] > 0
        assert r["mpix_per_s"] == pytest.approx(48 * 40 / 1e6 / (r["ms"] / 1e3))
        assert r["speedup"] == pytest.approx(rows[0]["ms"] / r["ms"])
    # frames as decoded images are (uint8 in host memory): the same rows, on 8-bit outputs
    assert main([*common, "--output", "48x40", "--frames", "2", "--reps", "1", "--policies", "fp", "static:8",
                 "--host-uint8", "--json", str(tmp_path / "u.json")]) == 0
    assert "2 uint8 host frame(s)" in capsys.readouterr().err
    record = json.loads((tmp_path / "u.json").read_text())
    assert record["workload"]["frame_memory"] == "host uint8"
    assert [r["fab"] for r in record["rows"]] == [32.0, 8.0] and record["rows"][1]["psnr_y"] > 10
    for args, message in ((["--output", "47x40"], "not a multiple of the model's scale 2"),
                          (["--output", "48"], "bad size '48'"),
                          (["--frames", "0"], "--frames and --reps must be at least 1"),
                          (["--policies", "fp", "fp"], "names fp twice"),
                          (["--input", str(tmp_path / "none")], "image folder not found")):
        assert main([*common, *args]) == 2
        assert message in capsys.readouterr().err


def test_upscale_with_policy(tmp_path, ckpt, capsys):
    save_image(random_image(20, 26), tmp_path / "a.png")
    (tmp_path / "calib").mkdir()
    save_image(random_image(100, 100), tmp_path / "calib" / "c.png")
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "a8.png"), "--model", ckpt, "--policy",
                 "static:8", "--calib", str(tmp_path / "calib"), "--patch-size", "16", "--stride", "12"]) == 0
    assert Image.open(tmp_path / "a8.png").size == (52, 40)
    common = ["--model", ckpt, "--policy", "static:4", "--calib", str(tmp_path / "calib"), "--patch-size", "16",
              "--stride", "12"]
    for containers in ("packed", "bytes"):
        assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / f"{containers}.png"), *common,
                     "--containers", containers]) == 0
    packed, one_per_byte = (np.asarray(Image.open(tmp_path / f"{c}.png")) for c in ("packed", "bytes"))
    assert np.array_equal(packed, one_per_byte)
    # the padded layout is the Triton kernels' (tests/test_triton_kernels.py): a clear error on the C++ backend
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "p.png"), *common, "--backend", "cpp",
                 "--containers", "padded"]) == 2
    assert "containers='padded' needs a backend with the padded layout" in capsys.readouterr().err
    # a bf16 residual stream on the reference backend runs; the C++ backend keeps fp32 and says so
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "s.png"), *common, "--backend", "reference",
                 "--dtype", "bfloat16", "--residual-stream", "dtype"]) == 0
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "s.png"), *common, "--backend", "cpp",
                 "--dtype", "bfloat16", "--residual-stream", "dtype"]) == 2
    assert "keeps the residual stream in float32 only" in capsys.readouterr().err


def test_engine_options_reach_the_engine(tmp_path, ckpt, monkeypatch):
    """The GPU-only switches pass through to Engine (on this CPU they change nothing)."""
    import gdq_engine.engine as engine_module

    seen, real = {}, engine_module.Engine.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "__init__", spy)
    save_image(random_image(20, 26), tmp_path / "a.png")
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", ckpt, "--image-graphs",
                 "--group-streams"]) == 0
    assert seen["image_graphs"] is True and seen["group_streams"] is True
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "c.png"), "--model", ckpt]) == 0
    assert seen["image_graphs"] is None and seen["group_streams"] is False  # the engine's defaults
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "d.png"), "--model", ckpt,
                 "--no-image-graphs"]) == 0
    assert seen["image_graphs"] is False and seen["progress"] is True  # one image: a bar over its patches
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("f1.png", "f2.png"):
        save_image(random_image(20, 26), folder / name)
    assert main(["upscale", str(folder), str(tmp_path / "out"), "--model", ckpt]) == 0
    assert seen["progress"] is False and seen["image_graphs"] is None  # a folder: the bar counts images
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f1_x2.png", "f2_x2.png"]


def test_calibrate_then_use_the_quantized_checkpoint(tmp_path, ckpt, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        save_image(random_image(90, 90, seed=i), calib / f"{i}.png")
    qpath = tmp_path / "q.pt"
    assert main(["calibrate", "--model", ckpt, "--policy", "entropy:2,4,8", "--calib", str(calib),
                 "--calib-patch", "16", "--out", str(qpath)]) == 0
    assert "entropy thresholds" in capsys.readouterr().out
    meta = torch.load(qpath, weights_only=True)["meta"]
    assert meta["command"].startswith("python -m gdq_engine calibrate")
    save_image(random_image(20, 26), tmp_path / "a.png")
    # The quantized checkpoint is a model like any other: its own policy, no calibration needed.
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "q.png"), "--model", str(qpath),
                 "--patch-size", "16", "--stride", "12"]) == 0
    assert Image.open(tmp_path / "q.png").size == (52, 40)
    assert main(["eval", "--model", str(qpath), "--data", str(calib), "--policies", "model", "fp",
                 "--patch-size", "16", "--stride", "12", "--json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())
    assert 2.0 <= rows[0]["fab"] <= 8.0 and rows[1]["fab"] == 32.0
    assert main(["calibrate", "--model", ckpt, "--policy", "fp", "--out", str(tmp_path / "x.pt")]) == 2
    dqc = tmp_path / "dqc.pt"
    assert main(["calibrate", "--model", ckpt, "--policy", "static:4", "--calib", str(calib), "--calib-patch", "16",
                 "--dqc-iters", "3", "--dqc-patch", "16", "--out", str(dqc)]) == 0
    assert len(torch.load(dqc, weights_only=True)["meta"]["dqc_loss"]["4"]) == 3
    # One table for several checkpoints: each .pt in --policies runs with its own policy, beside the base model.
    assert main(["eval", "--model", ckpt, "--data", str(calib), "--policies", "fp", str(qpath), str(dqc),
                 "--patch-size", "16", "--stride", "12", "--json", str(tmp_path / "t.json")]) == 0
    table = json.loads((tmp_path / "t.json").read_text())
    assert [r["method"] for r in table] == ["fp", "q.pt", "dqc.pt"]
    assert table[0]["fab"] == 32.0 and table[1] == {**rows[0], "method": "q.pt"} and table[2]["fab"] == 4.0
    assert main(["eval", "--model", ckpt, "--data", str(calib), "--policies", str(tmp_path / "missing.pt")]) == 2
