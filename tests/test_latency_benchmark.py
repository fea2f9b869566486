"""benchmarks/latency.py in CPU mode on tiny frames: every row runs, rotates over its frames, and its
columns agree with what the engine computes (the timings themselves are not checked); and
benchmarks/cpu_kernels.py and rdn_quality.py write every row."""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import latency  # noqa: E402

TRAIN = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "train"
needs_data = pytest.mark.skipif(not TRAIN.is_dir(), reason="../shared/data/train is not present")


def run(tmp_path, *args) -> dict:
    assert latency.main(["--output", "96x96", "--frames", "2", "--reps", "1", "--calib-count", "4",
                         "--out", str(tmp_path), *args]) == 0
    (path,) = tmp_path.glob("latency-*.json")
    return json.loads(path.read_text())


@needs_data
def test_cpu_rows_cover_fp_quantized_and_granular_methods(tmp_path):
    result = run(tmp_path, "--profile", "static a8 + int8 tail", "--profile", "granular {2,4,8} + int8 tail",
                 "--trace", str(tmp_path / "traces"))
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "bf16 CL", "static a8 (fp32 FP layers)", "static a8", "static a4", "static a2",
                          "entropy {2,4,8}", "static a8 + int8 tail", "granular {2,4,8}",
                          "granular {2,4,8} + int8 tail", "static a8 (reference)"]
    assert len(result["workload"]["frames"]) == 2 and len({*result["workload"]["frames"]}) == 2
    assert rows["fp32"]["speedup_vs_fp32"] == rows["bf16 CL"]["speedup_vs_bf16"] == 1.0 and rows["fp32"]["fab"] == 32.0
    assert [rows[f"static a{b}"]["fab"] for b in (8, 4, 2)] == [8.0, 4.0, 2.0]
    from gdq_engine.quantized import resolve_backend

    # "auto": the C++ kernels on CPUs with AVX512-VNNI or AVX2 (every CI machine so far), else the reference
    assert rows["static a8"]["backend"] == resolve_backend("auto", torch.device("cpu"))
    assert rows["static a8 (reference)"]["backend"] == "reference"
    assert rows["fp32"]["containers"] is None and {r["containers"] for n, r in rows.items() if n[0] in "seg"} == {
        "packed"}
    # the CPU rows keep the contract's fp32 residual stream (residual_stream="auto" off Triton/CUDA)
    assert rows["fp32"]["residual_stream"] is None
    assert {r["residual_stream"] for n, r in rows.items() if n[0] in "seg"} == {"float32"}
    assert {r["fp_dtype"] for name, r in rows.items() if name[0] in "se" and "fp32" not in name
            and "reference" not in name} == {str(latency.cpu_fp_dtype()).replace("torch.", "")}
    assert rows["static a8 (fp32 FP layers)"]["fp_dtype"] == rows["static a8 (reference)"]["fp_dtype"] == "float32"
    # The backends are bit-identical, so the two fp32 a8 rows give the same image, and the same digest.
    assert rows["static a8 (fp32 FP layers)"]["psnr_vs_fp32"] == rows["static a8 (reference)"]["psnr_vs_fp32"] > 40
    digests = {name: r["output_sha256"] for name, r in rows.items()}
    assert digests["static a8 (fp32 FP layers)"] == digests["static a8 (reference)"]
    assert all(re.fullmatch("[0-9a-f]{16}", d) for d in digests.values()) and len({*digests.values()}) > 5
    assert not any("repeat_equal" in r for r in rows.values())  # GPU only
    assert rows["granular {2,4,8}"]["fab"] in (2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
    assert 30 < rows["static a8 + int8 tail"]["psnr_vs_fp32"] < rows["static a8 (fp32 FP layers)"]["psnr_vs_fp32"]
    for r in rows.values():
        assert len(r["groups"]) == 2  # one report per frame
        assert r["ms"] > 0 and r["ms_per_mpix"] == pytest.approx(r["ms"] / (96 * 96 / 1e6))
        assert "pct_of_floor" not in r  # GPU only: no measured int8 peak on CPU
        # one round here: the host's work is the call's time (a CPU engine reads no device results)
        assert r["wait_ms"] == 0 and r["host_ms"] == r["ms"] and "ms_rounds" not in r
    # on CPU no pair of AB_PAIRS is complete but granular + tail against static a8 + tail
    assert [(p["reference"], p["other"]) for p in result["ab"]] == [("static a8 + int8 tail",
                                                                     "granular {2,4,8} + int8 tail")]
    assert result["ab"][0]["ratio"] == pytest.approx(rows["static a8 + int8 tail"]["ms"]
                                                      / rows["granular {2,4,8} + int8 tail"]["ms"])
    assert [p["method"] for p in result["profiles"]] == ["static a8 + int8 tail", "granular {2,4,8} + int8 tail"]
    assert isinstance(result["autotune_choices"], dict)  # the tile configs behind the rows (filled on a GPU)
    assert [p["trace"] for p in result["profiles"]] == ["trace-static-a8-int8-tail.json",
                                                        "trace-granular-2-4-8-int8-tail.json"]
    for profile in result["profiles"]:
        assert profile["output"] == "96x96" and 0 < len(profile["ops"]) <= 15
        trace = json.loads((tmp_path / "traces" / profile["trace"]).read_text())  # one frame, Chrome's format
        assert any(e.get("ph") == "X" for e in trace["traceEvents"])
        assert "launches_per_frame" not in profile and "syncs" not in profile  # GPU only
        assert profile["total_ms_per_frame"] >= sum(op["self_ms_per_frame"] for op in profile["ops"]) * (1 - 1e-9)
        ops = {op["op"] for op in profile["ops"]}
        if rows["static a8"]["backend"] == "cpp":
            assert "gdq_engine::packed_conv3x3_cpu" in ops
        else:  # the reference's integer convs are float convs of the codes
            assert any("conv" in op for op in ops), ops
        assert all(op["self_ms_per_frame"] >= 0 and 0 <= op["share"] <= 1 for op in profile["ops"])
    # 96x96 output at x4: one 24x24 LR patch per frame; MACs from the model's convs.
    from gdq_engine import load_model
    from gdq_engine.runtime.cost import conv_macs

    assert rows["fp32"]["gmacs"] == pytest.approx(sum(conv_macs(load_model("edsr-baseline-x4"), 24, 24)) / 1e9)


def test_gpu_rows_compare_byte_packed_and_padded_containers_in_one_run():
    from gdq_engine import load_model

    cases = dict(latency.cases_for(True, load_model("edsr-baseline-x4"), Path("g.pt"), "none"))
    packed = cases["granular {2,4,8} + int8 tail, packed"]
    assert packed == dict(cases["granular {2,4,8} + int8 tail"], containers="packed")
    padded = cases["static a8 + int8 tail, padded"]
    assert padded == dict(cases["static a8 + int8 tail"], containers="padded")
    assert all("containers" not in kw for name, kw in cases.items() if not name.endswith(("packed", "padded")))
    # the A/B row of the last conv: cuDNN's instead of the Triton FP kernel, all else equal
    assert cases["static a8 + int8 tail, cuDNN last conv"] == dict(cases["static a8 + int8 tail"], last_conv="torch")
    assert list(cases).index("static a8 + int8 tail, cuDNN last conv") == list(cases).index("static a8 + int8 tail") + 1
    # ... and of the residual stream: fp32 instead of the fp16 stream residual_stream="auto" gives there
    assert cases["static a8 + int8 tail, fp32 stream"] == dict(cases["static a8 + int8 tail"],
                                                               residual_stream="float32")
    # ... and of the output glue: the stitch, graph-output copy and output glue in torch (torch_glue)
    assert cases["static a8 + int8 tail, torch glue"] == dict(cases["static a8 + int8 tail"], glue="torch")
    assert cases["static a8 + int8 tail, torch stitch"] == dict(cases["static a8 + int8 tail"], glue="stitch")
    # ... and of the groups' streams
    assert cases["entropy {2,4,8}, group streams"] == dict(cases["entropy {2,4,8}"], group_streams=True)
    # ... and of image graphs (make_engine runs every other row tiled: image_graphs=False)
    assert cases["static a8 + int8 tail, image graph"] == dict(cases["static a8 + int8 tail"], image_graphs=True)
    assert cases["granular {2,4,8} + int8 tail, image graph"] == dict(cases["granular {2,4,8} + int8 tail"],
                                                                      image_graphs=True)
    assert [name for name, kw in cases.items() if "image_graphs" in kw] == [
        "granular {2,4,8} + int8 tail, image graph", "static a8 + int8 tail, image graph"]
    # RDN's dense blocks: no padded layout and always an fp32 stream, so no such A/B rows; one of their own
    from gdq_engine.models import RDN

    rdn = dict(latency.cases_for(True, RDN(2, n_feats=16, n_blocks=1, n_layers=1, growth=16), None, "none"))
    edsr = dict(latency.cases_for(True, load_model("edsr-baseline-x4"), None, "none"))
    assert set(edsr) - set(rdn) == {"static a8 + int8 tail, padded", "static a8 + int8 tail, fp32 stream"}
    assert set(rdn) - set(edsr) == {"static a8, segment chain"}
    assert rdn["static a8, segment chain"] == dict(rdn["static a8"], dense="chain")
    cpu = dict(latency.cases_for(False, load_model("edsr-baseline-x4"), None, "none"))
    assert not any(name.endswith(("padded", "last conv", "stream", "glue", "stitch", "streams", "graph"))
                   for name in cpu)


def test_torch_glue_turns_off_the_stitch_the_lent_outputs_and_the_fused_output_glue():
    pytest.importorskip("gdq_engine.kernels.ops", reason="triton is a test dependency", exc_type=ImportError)
    from conftest import random_image

    from gdq_engine import Engine
    from gdq_engine.models import EDSR
    from gdq_engine.runtime.graphs import GraphCache
    from gdq_engine.runtime.lastconv import KernelConv2d

    torch.manual_seed(0)
    engine = Engine(EDSR(scale=2, n_feats=16, n_blocks=1).eval(), policy="static", bits=8, backend="triton",
                    calib=random_image(12, 12, n=2), device="cpu", patch_size=8, stride=8)
    engine.network_graphs = GraphCache(lend=True)  # as on CUDA
    engine.stitcher.kernel_on_cpu = True
    canvas = torch.zeros(3, 16, 16)
    assert engine.stitcher.fused(canvas, canvas[None]) and engine.model.tail.fuse_output
    latency.torch_glue(engine, parts=("stitch",))  # the "torch stitch" row: the stitch only
    assert not engine.stitcher.fused(canvas, canvas[None])
    assert engine.network_graphs.lend and engine.model.tail.fuse_output
    latency.torch_glue(engine)
    assert not engine.stitcher.fused(canvas, canvas[None]) and not engine.network_graphs.lend
    assert isinstance(engine.model.tail, KernelConv2d) and not engine.model.tail.fuse_output
    with pytest.raises(ValueError, match="glue parts"):
        latency.torch_glue(engine, parts=("stich",))


@needs_data
def test_host_uint8_frames_and_a_row_subset(tmp_path):
    """--host-uint8: every row gets uint8 host frames and hands back uint8 (PSNR on [0, 1] values,
    so equal to the float run's within 8-bit rounding); --rows keeps fp32 (the PSNR reference)."""
    host = run(tmp_path / "host", "--host-uint8", "--rows", "static a8 + int8 tail")
    assert [r["method"] for r in host["rows"]] == ["fp32", "static a8 + int8 tail"]
    assert host["workload"]["frame_memory"] == "host uint8"
    float_run = run(tmp_path / "float", "--rows", "static a8 + int8 tail")
    assert float_run["workload"]["frame_memory"] == "cpu float32"
    h, f = host["rows"][1], float_run["rows"][1]
    assert host["rows"][0]["psnr_vs_fp32"] == float("inf") and 30 < h["psnr_vs_fp32"]
    assert abs(h["psnr_vs_fp32"] - f["psnr_vs_fp32"]) < 1.0 and h["ms"] > 0
    with pytest.raises(SystemExit):
        latency.main(["--rows", "static a9", "--out", str(tmp_path)])


@needs_data
def test_rdn_gets_quantized_rows(tmp_path):
    result = run(tmp_path, "--arch", "rdn", "--scale", "2", "--output", "48x48",  # RDN is heavy: a small frame
                 "--rows", "static a8,entropy {2,4,8}")
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "static a8", "entropy {2,4,8}"]
    assert rows["static a8"]["fab"] == 8.0 and 30 < rows["static a8"]["psnr_vs_fp32"] < float("inf")
    assert result["workload"] == {**result["workload"], "model": "rdn-x2", "weights": "untrained"}


def test_floor_is_the_slower_of_compute_and_memory():
    peaks = {"int8_tops": 1000.0, "hbm_gbs": 2000.0}
    assert latency.floor_ms(10**12, 10**6, peaks) == pytest.approx(2.0)  # 2e12 ops / 1e15 op/s
    assert latency.floor_ms(10, 4 * 10**9, peaks) == pytest.approx(2.0)  # 4e9 B / 2e12 B/s


def test_frames_are_distinct_crops_tiled_by_reflection(tmp_path):
    from gdq_engine.io import save_image

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        save_image(torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(i)), paths[-1])
    frames = latency.lr_frames(paths, 25, 30)
    assert [tuple(f.shape) for f in frames] == [(1, 3, 25, 30)] * 2
    assert not torch.equal(frames[0], frames[1])
    assert torch.equal(frames[0][..., 10:20, :12], frames[0][..., :10, :12].flip(2))


def test_cpu_kernels_benchmark_writes_every_row(tmp_path):
    """benchmarks/cpu_kernels.py on one patch, one repeat: every conv row, quantize_pack, the
    upsampler conv by output kind (sizes from the shapes) and torch's last conv land in the JSON."""
    from gdq_engine.ops import cpu_ops

    if not cpu_ops.available():
        pytest.skip("gdq_engine._C not built")
    import cpu_kernels

    assert cpu_kernels.main(["--patches", "1", "--reps", "1", "--default-malloc", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("cpu-kernels-*.json")
    data = json.loads(path.read_text())
    assert [(r["op"], r["a_bits"]) for r in data["rows"]] == [
        (k, a) for a in (8, 4, 2) for k in ("conv1", "conv2")] + [("quantize_pack", 8)]
    assert all(r["cpp_ms"] > 0 for r in data["rows"])
    # one patch: the 4x HR map of 64 channels is 384 x 384 pixels, 1, 2 or 4 bytes per value
    sizes = {r["writes"]: r["out_mb"] for r in data["upsampler"]}
    assert sizes == pytest.approx({"codes": 384 * 384 * 64 / 1e6, "bf16": 384 * 384 * 128 / 1e6,
                                   "fp32": 384 * 384 * 256 / 1e6})
    assert data["torch_bf16_cl_last_conv_ms"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU sessions run benchmarks/kernels.py itself")
def test_gpu_kernels_benchmark_smoke_runs_every_row(tmp_path):
    """benchmarks/kernels.py --smoke: the GPU script's rows on one 8x8 patch in Triton's
    interpreter, so a GPU session never loses its step to a bug in the script."""
    pytest.importorskip("triton")
    import kernels

    assert kernels.main(["--smoke", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("kernels-*.json")
    data = json.loads(path.read_text())
    got = [(r["conv"], r["a_bits"], r["w_bits"], r["container"]) for r in data["rows"]]
    variants = ("", " N-major w", " L1 A", " cvt", " cvt sat")
    ab = [f"{conv}{variant}" for conv in ("conv1", "conv2") for variant in variants]
    ab += ["conv2 res early", "conv2+next", "conv2+next res early", "conv2 float16 stream",
           "conv2+next float16 stream", "conv1 padded", "conv2 padded", "conv2+next padded"]
    ab += [f"upsampler{variant}" for variant in variants]
    ab += [f"upsampler shuffled {out}{cvt}" for out in ("fp16", "codes") for cvt in ("", " cvt", " cvt sat")]
    want = [(name, 8, 8, 8) for name in ab] + [("last conv fp16", 16, 16, 16)]
    want += [("conv2+next padded", a, 8, 8) for a in (4, 2)]
    want += [(f"{k} bytes", a, 8, 8) for a in (4, 2) for k in ("conv1", "conv2")]
    want += [("conv2+next", a, 8, a) for a in (4, 2)]
    want += [(k, a, w, a) for a in (8, 4, 2) for w in (8, 4, 2) for k in ("conv1", "conv2") if (a, w) != (8, 8)]
    assert got == want and data["timing"] == "smoke" and data["complete"]
    assert all(r["us"] > 0 and r["floor_us"] > 0 and r["cuda_us"] is None for r in data["rows"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU sessions run benchmarks/kernels.py itself")
def test_gpu_kernels_benchmark_smoke_sm90_rows(tmp_path, monkeypatch):
    """benchmarks/kernels.py --sm90 --smoke: the Gluon body conv's pairs, its a4 / a2 rows, signed
    codes through registers (``regs``), the interleaved rounds of the rows issue 4 compares, each
    default undone where it changes the row's conv, and the upsampler's rows (in the interpreter they
    run the flat kernel: the Gluon kernel needs an sm_90 GPU), named as with Triton 3.6, whose Gluon
    builds halo boxes."""
    pytest.importorskip("triton")
    from gdq_engine.kernels import body_conv_sm90

    import kernels

    monkeypatch.setattr(body_conv_sm90, "HALO_VIEWS", True)
    assert kernels.main(["--smoke", "--sm90", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("kernels-sm90-*.json")
    data = json.loads(path.read_text())
    rows = data["rows"]
    names = [r["conv"] for r in rows]
    s4, s6 = "s4 p2 rows ws g1", "s6 p2 rows ws g1"
    codes = {"conv1": f"{s4} f1 tma halo cvt sat", "conv2+next": f"{s4} f1 tma halo cvt sat"}
    want = [n for c, d in codes.items() for n in (c, f"{c} sm90 {d}")]
    stream = f"{s4} f1 tma res halo cvt"  # the fp16 stream by TMA, no saturating codes ("auto")
    want += ["conv2+next float16 stream", f"conv2+next float16 stream sm90 {stream}"]
    want += [n for _ in (4, 2) for n in (f"conv1 bytes sm90 {codes['conv1']}",
                                         f"conv2+next bytes float16 stream sm90 {stream}")]
    regs = [f"conv1 sm90 {codes['conv1']} regs", f"conv1 bytes sm90 {codes['conv1']} regs",
            f"conv2+next bytes float16 stream sm90 {stream} regs"]
    # the fp16 stream's residual copied late, in 2 boxes (the ring one halo box shorter), both
    boxes = [f"conv2+next float16 stream sm90 {k}" for k in (
        f"{s4} f1 tma res late halo cvt", "s3 p2 rows ws g1 f1 tma res2 halo cvt",
        "s3 p2 rows ws g1 f1 tma res2 late halo cvt")]
    # two pairs a program: conv1, conv2 + next codes on the fp16 stream, and that with 2 residual
    # boxes copied late, the ring kept
    pairs = [f"conv1 sm90 {codes['conv1']} pairs2", f"conv2+next float16 stream sm90 {stream} pairs2",
             f"conv2+next float16 stream sm90 {s4} f1 tma res2 late halo cvt pairs2"]
    want += regs + boxes + pairs
    for c in codes:
        want += [f"{c} sm90 {k}" for k in (f"{s6} f1 tma", f"{s6} f1 tma cvt sat", f"{s4} f1 tma halo sat",
                                           f"{s4} f1 tma halo cvt", f"{s4} f2 tma halo cvt sat")]
    want += [f"conv2+next float16 stream sm90 {k}" for k in (
        f"{s6} f1 tma", f"{s6} f1 tma res cvt", f"{s4} f1 tma res halo", f"{s4} f1 tma halo cvt",
        f"{s4} f1 tma res halo cvt sat", f"{s4} f2 tma res halo cvt")]
    for out, cvts in (("codes", ("", " cvt", " cvt sat")), ("fp16", ("", " cvt"))):
        up = f"upsampler shuffled {out}"
        want += [up, f"{up} sm90 {s6} f1 tma cvt"]
        want += [f"{up} sm90 {s4} f1 tma halo{cvt}" for cvt in cvts]
    assert names == want
    assert [r["a_bits"] for r in rows[6:16]] == [4, 4, 2, 2, 8, 4, 4, 8, 8, 8]
    # the interleaved rounds: the engine's rows, the regs rows and the residual boxes' rows, each
    # pair's ratios round by round
    rounds = data["interleaved"]
    keys = [f"{r['conv']} a{r['a_bits']}" for r in rows[:19]
            if r.get("engine") or r["conv"] in regs + boxes + pairs]
    assert len(keys) == 15 and [r["a_bits"] for r in rows[16:19]] == [8, 8, 8]
    assert rounds["rounds"] == 2 and list(rounds["us"]) == keys
    # three batches: the engine's, a4 / a2 and regs rows, then the residual boxes' rows, then the
    # pairs' rows, the engine's a8 rows timed in each
    assert [len(t) for t in rounds["us"].values()] == [6, 6] + [2] * 13
    a8 = {"conv1": keys[0], "conv2+next": keys[1]}
    want_pairs = [(k, a8[k.split()[0]]) for k in keys[2:6]] + [(keys[6], keys[0]), (keys[7], keys[2]),
                                                               (keys[8], keys[3])] + [(k, keys[1]) for k in keys[9:12]]
    want_pairs += [(keys[12], keys[0]), (keys[13], keys[1]), (keys[14], keys[1])]
    assert [(p["row"], p["against"]) for p in rounds["pairs"]] == want_pairs
    for p in rounds["pairs"]:
        assert len(p["row_us"]) == len(p["against_us"]) == 2 and set(p["row_us"]) <= set(rounds["us"][p["row"]])
        assert set(p["against_us"]) <= set(rounds["us"][p["against"]])
        ratios = [a / b for a, b in zip(p["row_us"], p["against_us"])]
        assert p["ratios"] == pytest.approx(ratios) and min(ratios) <= p["median_ratio"] <= max(ratios)
    # the residual boxes' rows and the pairs' against the engine's row of their own batch
    assert all(p["against_us"] == rounds["us"][keys[1]][2:4] for p in rounds["pairs"][7:10])
    assert [p["against_us"] for p in rounds["pairs"][10:]] == [rounds["us"][keys[i]][4:] for i in (0, 1, 1)]
    # the A/B pairs carry the variables that turn their switch on (benchmarks/pick_switches.py)
    assert [p.get("env") for p in rounds["pairs"]] == [None] * 4 + [{"GDQ_SM90_A_REGS": "1"}] * 3 + [
        {"GDQ_SM90_RES_BUFS": b, "GDQ_SM90_RES_LATE": lt} for b, lt in (("1", "1"), ("2", "0"), ("2", "1"))] + [
        {"GDQ_SM90_PAIRS": "2"}] * 2 + [{"GDQ_SM90_PAIRS": "2", "GDQ_SM90_RES_BUFS": "2", "GDQ_SM90_RES_LATE": "1"}]
    import pick_switches

    assert pick_switches.main([str(path)]) == 0
    # the rows benchmarks/targets.py checks: the engine's convs (not the fp32 stream's, which the
    # engine's body does not keep on GPUs), a8, a4 and a2; the upsampler's with its switches
    engine = [r["conv"] for r in rows if r.get("engine")]
    assert engine == [f"conv1 sm90 {codes['conv1']}", f"conv2+next float16 stream sm90 {stream}", *names[6:10],
                      f"upsampler shuffled codes sm90 {s4} f1 tma halo cvt sat",
                      f"upsampler shuffled fp16 sm90 {s4} f1 tma halo cvt"]
    import targets

    lines, _ = targets.check(rows, 0.02, rounds)  # CPU times: the verdict means nothing; every engine row gets a line
    assert len(lines) == len(engine) and all(line.endswith(("met", "MISSED")) for line in lines)
    # each a4 / a2 row finds the a8 row it is held against (a renamed row would leave it without one)
    assert not any("no a8 row" in line for line in lines)
    assert sum("x the a8 row's time" in line and "median of 2 interleaved rounds" in line for line in lines) == 4


def test_kernel_targets_verdict(tmp_path, capsys):
    """benchmarks/targets.py: a8 engine rows against 1.6x and 70%, a4 / a2 rows against their a8 row
    of the same conv (within the tolerance); rows without "engine" do not count; no engine rows: 2."""
    import targets

    def row(conv, bits, us, speedup=2.0, pct=75.0, engine=True):
        return {"conv": conv, "a_bits": bits, "us": us, "speedup_vs_fp16": speedup, "pct_of_floor": pct,
                "engine": engine}

    good = [row("conv1 sm90 x", 8, 18.0), row("conv1 bytes sm90 x", 4, 18.3), row("conv1 bytes sm90 x", 2, 17.9),
            row("conv2+next sm90 x", 8, 47.5, speedup=1.3, engine=False)]
    assert targets.check(good, 0.02)[1]
    assert not targets.check(good, 0.01)[1]  # 18.3 / 18.0 is 1.7% slower
    for bad in (row("conv1 sm90 y", 8, 18.0, speedup=1.5), row("conv1 sm90 y", 8, 18.0, pct=69.9),
                row("conv9 bytes sm90 x", 4, 10.0)):  # no a8 row of its kind
        lines, ok = targets.check(good + [bad], 0.02)
        assert not ok and lines[-1].endswith("MISSED")
    # interleaved rounds decide a narrow row's ratio where they pair it with its a8 row
    slow = [good[0], row("conv1 bytes sm90 x", 4, 18.9)]  # 5% slower in the single pass
    pair = {"row": "conv1 bytes sm90 x a4", "against": "conv1 sm90 x a8", "ratios": [1.0, 1.01, 1.03],
            "median_ratio": 1.01}
    assert not targets.check(slow, 0.02)[1]
    lines, ok = targets.check(slow, 0.02, {"pairs": [pair]})
    assert ok and "1.010x" in lines[1] and "median of 3 interleaved rounds (single pass 1.050x)" in lines[1]
    assert not targets.check(good, 0.02, {"pairs": [dict(pair, median_ratio=1.03)]})[1]
    assert targets.check(slow, 0.02, {"pairs": [dict(pair, row="conv1 bytes sm90 x a2")]})[1] is False  # not its pair
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"rows": slow, "interleaved": {"pairs": [pair]}}))
    assert targets.main([str(path)]) == 0
    path.write_text(json.dumps({"rows": good, "environment": {"gpu": "test GPU"}}))
    assert targets.main([str(path)]) == 0 and "all met (test GPU" in capsys.readouterr().out
    path.write_text(json.dumps({"rows": good[:1] + [row("conv1 bytes sm90 x", 4, 19.0)]}))
    assert targets.main([str(path)]) == 1 and "NOT all met" in capsys.readouterr().out
    path.write_text(json.dumps({"rows": [dict(r, engine=False) for r in good]}))
    assert targets.main([str(path)]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU sessions run benchmarks/ncu_convs.py under ncu")
def test_ncu_driver_smoke_launches_each_conv(capsys):
    """benchmarks/ncu_convs.py --smoke: the four convs the ncu step profiles, in the interpreter."""
    pytest.importorskip("triton")
    import ncu_convs

    assert ncu_convs.main(["--smoke", "--reps", "2"]) == 0
    assert "launched conv1, conv2, upsampler, last_conv, conv2_fp16" in capsys.readouterr().out
    assert ncu_convs.parse_config("64,32,8,3") == (64, 32, 8, 3)
    assert ncu_convs.parse_sm90("6,2,1") == (6, 2, True, False, False, False, None)
    assert ncu_convs.parse_sm90("8,1,0,1") == (8, 1, False, True, False, False, None)
    assert ncu_convs.parse_sm90("4,2,1,1,1") == (4, 2, True, True, True, False, None)
    assert ncu_convs.parse_sm90("6,2,1,1,0,1") == (6, 2, True, True, False, True, None)
    assert ncu_convs.parse_sm90("6,2,1,1,0,1,1") == (6, 2, True, True, False, True, True)
    assert ncu_convs.parse_sm90("6,2,1,1,0,1,0") == (6, 2, True, True, False, True, False)
    assert ncu_convs.main(["--smoke", "--sm90", "4,2,0"]) == 0
    assert "conv2_fp16, conv1_sm90, conv2_fp16_sm90" in capsys.readouterr().out
    assert ncu_convs.main(["--smoke", "--sm90", "6,2,1,1,0,1,1"]) == 0  # the Gaussian layer's weights
    assert "conv2_fp16, conv1_sm90, conv2_fp16_sm90" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ncu_convs.main(["--smoke", "--config", "64,32"])


def test_an_unknown_profile_row_is_refused_before_any_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "make_engine", lambda *a, **k: pytest.fail("an engine was built"))
    with pytest.raises(SystemExit):
        latency.main(["--output", "96x96", "--frames", "1", "--profile", "static a8", "--profile", "no such row",
                      "--default-malloc", "--out", str(tmp_path)])
    assert not list(tmp_path.glob("latency-*.json"))


@needs_data
def test_a_failing_row_is_reported_and_the_other_rows_are_kept(tmp_path, monkeypatch, capsys):
    """One row raising (as the first quantized row did on a GPU on 2026-11-26) loses that row only:
    the rest are timed and written, the failure is in the JSON and the table, and the exit status is 1."""
    real = latency.make_engine

    def make_engine(model, kw, device, calib):
        if kw.get("dtype") == torch.bfloat16:
            raise RuntimeError("x must be a CPU fp32 or bf16 tensor")
        return real(model, kw, device, calib)

    monkeypatch.setattr(latency, "make_engine", make_engine)
    assert latency.main(["--arch", "rdn", "--scale", "2", "--output", "96x96", "--frames", "1", "--reps", "1",
                         "--rows", "bf16 CL", "--out", str(tmp_path)]) == 1
    (path,) = tmp_path.glob("latency-*.json")
    result = json.loads(path.read_text())
    assert [r["method"] for r in result["rows"]] == ["fp32"]
    assert "speedup_vs_bf16" not in result["rows"][0] and result["rows"][0]["speedup_vs_fp32"] == 1.0
    assert result["failures"] == [{"output": "96x96", "method": "bf16 CL",
                                   "error": "RuntimeError: x must be a CPU fp32 or bf16 tensor"}]
    assert "FAILED 96x96 bf16 CL: RuntimeError" in capsys.readouterr().out


def test_gpu_session_script_fits_the_device_tool_limits():
    """benchmarks/gpu_session.sh: each call's step limits fit the 15-minute device budget with room
    for the machine's start and the transfers (call 1 under 450 s and call 2 under 325 s; the
    opt-in kernel-test and memcheck steps not counted; call 3, the kernels' alternative to call 2,
    under 300 s; the no-install stage call under 300 s), both calls time the decisive rows first,
    and the script parses (``bash -n``)."""
    import re
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    third, rest = text.split('if [ "${1:-1}" = 3 ]; then', 1)[1].split("\nfi\n\n", 1)
    second, first = rest.split('if [ "${1:-1}" = 2 ]; then', 1)[1].split("\nfi\n\n", 1)
    first = re.sub(r'if \[ "\$\{GDQ_(MEMCHECK|KERNEL_TESTS).*?\nfi\n', "", first, flags=re.S)  # opt-in
    limits = [[int(n) for n in re.findall(r"^\s*step \S+ (\d+) ", part, re.M)] for part in (first, second, third)]
    assert [len(steps) for steps in limits] == [4, 3, 3], limits
    assert sum(limits[0]) <= 450 and sum(limits[1]) <= 325 and sum(limits[2]) <= 300, limits
    assert "latency_1080p " in first and "latency_1080p_again" in second  # a first and a second process
    rows = re.search(r'^DECISIVE="([^"]*)"\nDECISIVE="\$DECISIVE;([^"]*)"', text, re.M)
    decisive = latency.split_row_names(rows.group(1) + ";" + rows.group(2))
    from gdq_engine import load_model

    names = dict(latency.cases_for(True, load_model("edsr-baseline-x4"), Path("g.pt"), "none"))
    assert len(decisive) == 5 and set(decisive) <= names.keys(), decisive
    assert text.count('--rows "$DECISIVE"') == 4  # call 1's latency, call 2's first two, the stage call's
    # the no-install call: its test step and two latency processes (the loop's limits) under 300 s
    stage = text.split('if [ "${1:-1}" = stage ]; then', 1)[1].split("\nfi\n\n", 1)[0]
    tests = [int(n) for n in re.findall(r"^\s*step \S+ (\d+) ", stage, re.M)]
    loop = [int(n) for n in re.search(r"echo (\d+) \|\| echo (\d+)", stage).groups()]
    assert len(tests) == 1 and sum(tests + loop) <= 300 and "pip install" not in stage, (tests, loop)


def test_gpu_sm90_script_rdn_and_bench_steps_name_real_rows_and_options():
    """benchmarks/gpu_sm90.sh's ``rdn`` step keeps only rows latency.py has for RDN on a GPU, and
    its ``bench_cli`` step's options parse (a typo there would cost a GPU session's minutes)."""
    import re
    import shlex

    from gdq_engine.cli import build_parser
    from gdq_engine.models.rdn import RDN

    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_sm90.sh").read_text()
    rdn = re.search(r"^\s*step rdn \d+ (.*?[^\\])$", text, re.M | re.S).group(1).replace("\\\n", " ")
    args = shlex.split(rdn)
    assert args[:3] == ["python", "benchmarks/latency.py", "--gpu"]
    names = dict(latency.cases_for(True, RDN(2, n_feats=16, n_blocks=1, n_layers=1, growth=16), None, "none"))
    wanted = latency.split_row_names(args[args.index("--rows") + 1])
    assert len(wanted) == 6 and set(wanted) <= names.keys(), wanted
    bench = re.search(r"^\s*step bench_cli \d+ (.*?[^\\])$", text, re.M | re.S).group(1).replace("\\\n", " ")
    args = shlex.split(bench.replace('"$OUT', '"out'))
    assert args[:3] == ["python", "-m", "gdq_engine"]
    parsed = build_parser().parse_args(args[3:])
    assert parsed.command == "bench" and parsed.dtype == "float16" and parsed.tail_bits == 8


def _switch_pairs(regs: list[float], late: float, res2: float, both: float) -> list[dict]:
    """``interleaved`` pairs as kernels.py --sm90 writes them: the a4 pair (no env), the regs rows'
    and the residual boxes' rows against the engine's, with these median ratios."""
    pairs = [{"row": "conv1 bytes sm90 x a4", "against": "conv1 sm90 x a8", "median_ratio": 0.9}]
    pairs += [{"row": f"r{i}", "against": "e", "median_ratio": m, "env": {"GDQ_SM90_A_REGS": "1"}}
              for i, m in enumerate(regs)]
    pairs += [{"row": name, "against": "e", "median_ratio": m, "env": {"GDQ_SM90_RES_BUFS": b, "GDQ_SM90_RES_LATE": lt}}
              for name, m, b, lt in (("late", late, "1", "1"), ("res2", res2, "2", "0"), ("both", both, "2", "1"))]
    return pairs


def test_pick_switches_takes_the_switches_faster_everywhere_and_the_best_alternative():
    """benchmarks/pick_switches.py: a switch whose rows' median ratio is below 1 - margin and none
    above 1 + margin is taken; of alternatives setting the same variables, the lowest median; the
    a4 pairs (no env) are no switch."""
    import pick_switches

    chosen, lines = pick_switches.pick(_switch_pairs([0.97, 0.98, 1.0], 0.995, 0.95, 0.96), 0.01)
    assert chosen == {"GDQ_SM90_A_REGS": "1", "GDQ_SM90_RES_BUFS": "2", "GDQ_SM90_RES_LATE": "0"}
    assert len(lines) == 4 and sum(line.endswith("faster") for line in lines) == 3
    chosen, _ = pick_switches.pick(_switch_pairs([0.97, 0.98, 1.02], 0.97, 1.0, 0.96), 0.01)
    assert chosen == {"GDQ_SM90_RES_BUFS": "2", "GDQ_SM90_RES_LATE": "1"}  # regs slower on one row: not taken
    assert pick_switches.pick(_switch_pairs([0.995], 0.995, 0.999, 1.0), 0.01)[0] == {}
    # groups setting some of the same variables (two pairs a program, alone and with two residual
    # boxes) are alternatives too: the fastest wins, whatever else it sets
    pairs = _switch_pairs([0.97], 1.0, 0.96, 1.0) + [
        {"row": "p", "against": "e", "median_ratio": 0.95, "env": {"GDQ_SM90_PAIRS": "2"}},
        {"row": "p2", "against": "e", "median_ratio": 0.9,
         "env": {"GDQ_SM90_PAIRS": "2", "GDQ_SM90_RES_BUFS": "2", "GDQ_SM90_RES_LATE": "1"}}]
    assert pick_switches.pick(pairs, 0.01)[0] == {"GDQ_SM90_A_REGS": "1", "GDQ_SM90_PAIRS": "2",
                                                  "GDQ_SM90_RES_BUFS": "2", "GDQ_SM90_RES_LATE": "1"}
    pairs[-1]["median_ratio"] = 0.985  # faster, but slower than both of its alternatives: each of those taken
    assert pick_switches.pick(pairs, 0.01)[0] == {"GDQ_SM90_A_REGS": "1", "GDQ_SM90_PAIRS": "2",
                                                  "GDQ_SM90_RES_BUFS": "2", "GDQ_SM90_RES_LATE": "0"}


def test_gpu_sm90_kernels_picked_step_reruns_kernels_with_the_winning_switches(tmp_path):
    """benchmarks/gpu_sm90.sh's ``kernels_picked`` step, run by sh with ``python`` on PATH a shim that
    stands in for kernels.py (it records the environment it got and writes a JSON): the winners of
    the first JSON's rounds reach kernels.py as variables, and targets.py reads the new JSON; with
    no winner, no second run."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    text = (root / "benchmarks" / "gpu_sm90.sh").read_text()
    script = re.search(r"step kernels_picked \d+ sh -c '(.*?)' _ \"\$OUT\"", text, re.S).group(1)
    rows = [{"conv": "conv1 sm90 x", "a_bits": 8, "us": 18.0, "speedup_vs_fp16": 3.0, "pct_of_floor": 72.0,
             "engine": True}]
    out, bin_dir = tmp_path / "out", tmp_path / "bin"
    out.mkdir()
    bin_dir.mkdir()
    picked_json = tmp_path / "picked.json"
    picked_json.write_text(json.dumps({"rows": rows}))
    shim = bin_dir / "python"
    shim.write_text(f"""#!/bin/sh
if [ "$1" = benchmarks/kernels.py ]; then
    echo "A_REGS=$GDQ_SM90_A_REGS RES_BUFS=$GDQ_SM90_RES_BUFS RES_LATE=$GDQ_SM90_RES_LATE args=$*" > {tmp_path}/got
    cp {picked_json} "$4/kernels-sm90-shim.json"
    exit 0
fi
exec {sys.executable} "$@"
""")
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("PICK_FROM", None)
    for regs, want in (([0.97, 0.98, 0.99], "A_REGS=1 RES_BUFS=2 RES_LATE=0"), ([1.0], None)):
        (out / "kernels-sm90-first.json").write_text(json.dumps(
            {"rows": rows, "interleaved": {"pairs": _switch_pairs(regs, 1.0, 0.95 if want else 1.0, 1.0)}}))
        (tmp_path / "got").unlink(missing_ok=True)
        done = subprocess.run(["sh", "-c", script, "_", str(out)], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        if want:
            got = (tmp_path / "got").read_text()
            assert got.startswith(want) and f"--sm90 --out {out}/picked" in got, got
            assert (out / "picked" / "switches").read_text().split() == [
                "GDQ_SM90_A_REGS=1", "GDQ_SM90_RES_BUFS=2", "GDQ_SM90_RES_LATE=0"]
            assert "issue 4's targets: all met" in done.stdout, done.stdout
        else:
            assert not (tmp_path / "got").exists() and "no switch won" in done.stdout


def test_gpu_sm90_tests_picked_step_runs_the_gpu_tests_with_the_picked_switches(tmp_path):
    """benchmarks/gpu_sm90.sh's ``tests_picked`` step, run by sh with ``python`` on PATH a shim that
    stands in for pytest (it records the environment and arguments it got): the switches
    ``kernels_picked`` wrote reach the Gluon conv's, the integer tail's and the image graphs' GPU tests
    as variables, on PYTEST_N workers; with no switches file, no tests."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    text = (root / "benchmarks" / "gpu_sm90.sh").read_text()
    script = re.search(r"step tests_picked \d+ sh -c '(.*?)' \\\n\s*_ \"\$OUT\" \"\$\{PYTEST_N:-\}\"", text,
                       re.S).group(1)
    out, bin_dir = tmp_path / "out", tmp_path / "bin"
    (out / "picked").mkdir(parents=True)
    bin_dir.mkdir()
    shim = bin_dir / "python"
    shim.write_text(f"""#!/bin/sh
echo "A_REGS=$GDQ_SM90_A_REGS RES_BUFS=$GDQ_SM90_RES_BUFS AUTOTUNE=$GDQ_TRITON_AUTOTUNE args=$*" > {tmp_path}/got
""")
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    for workers in ("12", ""):
        (out / "picked" / "switches").write_text("GDQ_SM90_A_REGS=1 GDQ_SM90_RES_BUFS=2\n")
        done = subprocess.run(["sh", "-c", script, "_", str(out), workers], cwd=root, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        got = (tmp_path / "got").read_text()
        assert got.startswith("A_REGS=1 RES_BUFS=2 AUTOTUNE=0 args=-m pytest "), got
        assert (" -n 12 " in got) == bool(workers), got
        assert "tests/test_body_conv_sm90.py tests/test_inttail.py tests/test_imagegraph.py -k not compiles" in got, got
    (tmp_path / "got").unlink()
    (out / "picked" / "switches").unlink()
    done = subprocess.run(["sh", "-c", script, "_", str(out), "12"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "no switches picked" in done.stdout and not (tmp_path / "got").exists()


@pytest.mark.parametrize("flags, want", [({"avx2", "fma"}, torch.float32), ({"avx512f", "avx512_bf16"}, torch.float32),
                                         ({"amx_bf16", "amx_tile"}, torch.bfloat16), (set(), torch.float32)])
def test_cpu_rows_run_fp_layers_in_bf16_only_where_it_beats_fp32(monkeypatch, flags, want):
    """The CPU rows' quantized engines take bf16 FP layers on CPUs with AMX-BF16, fp32 elsewhere
    (emulated bf16 is several times slower, AVX512-BF16 without AMX slower too:
    benchmarks/cpu_fp_dtype.py); the bf16 CL row stays either way."""
    import common

    from gdq_engine import load_model

    monkeypatch.setattr(common, "cpu_flags", lambda: flags)
    cases = dict(latency.cases_for(False, load_model("edsr-baseline-x4"), Path("g.pt"), "none"))
    assert cases["bf16 CL"]["dtype"] == torch.bfloat16
    assert {kw["dtype"] for name, kw in cases.items() if name[0] in "seg" and "dtype" in kw} == {want}
    assert "dtype" not in cases["static a8 (fp32 FP layers)"]


def test_recorded_syncs_name_each_site_with_its_callers_and_count_collections():
    """What sync_sites reads on a GPU, fed here by hand: sync warnings are counted per site with
    the Python stack of the first (outermost first, the caller named), other warnings are not,
    and garbage collections in the block are counted."""
    import gc
    import warnings

    def synchronising_op():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    def caller():
        synchronising_op()

    with latency.recorded_syncs() as syncs:
        caller()
        caller()
        warnings.warn("something else", UserWarning, stacklevel=1)
        gc.collect()
    ((site, n),) = syncs["sites"].items()
    assert site.startswith("test_latency_benchmark.py:") and n == 2 and syncs["count"] == 2
    stack = syncs["stacks"][site]
    assert stack[-1].endswith(" synchronising_op") and stack[-2].endswith(" caller")
    assert len(stack) <= latency.STACK_FRAMES and not any(f.startswith("warnings.py") for f in stack)
    assert syncs["gc_collections"] >= 1


def test_syncs_at_the_switch_into_warn_mode_are_set_apart():
    """A sync warning raised inside torch's set_sync_debug_mode (the switch that starts the count,
    seen on H100 runs before a frame began) is moved out of the engine's count into mode_switch;
    the frame's own sites stay."""
    import warnings

    def set_sync_debug_mode():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    def to_host():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    with latency.recorded_syncs() as syncs:
        set_sync_debug_mode()
        to_host()
        to_host()
    assert syncs["count"] == 3 and len(syncs["sites"]) == 2
    kept = latency.drop_mode_switch(syncs)
    assert kept["count"] == 2 and kept["mode_switch"] == 1
    ((site, n),) = kept["sites"].items()
    assert n == 2 and kept["stacks"][site][-1].endswith(" to_host") and set(kept["stacks"]) == {site}
    assert latency.drop_mode_switch(kept)["mode_switch"] == 0


def test_row_names_with_braces_survive_the_comma_split():
    """--rows splits on commas outside braces, so the dynamic policies' rows can be named."""
    assert latency.split_row_names("static a8, entropy {2,4,8},granular {2,4,8} + int8 tail") == [
        "static a8", "entropy {2,4,8}", "granular {2,4,8} + int8 tail"]
    assert latency.split_row_names("fp16 CL,fp16 CL compile(max-autotune),") == [
        "fp16 CL", "fp16 CL compile(max-autotune)"]
    # names with a comma of their own: semicolons separate
    assert latency.split_row_names("static a8 + int8 tail; static a8 + int8 tail, image graph;entropy {2,4,8};") == [
        "static a8 + int8 tail", "static a8 + int8 tail, image graph", "entropy {2,4,8}"]


def test_gpu_timing_counts_allocator_events_and_collections_around_the_calls(monkeypatch):
    """gpu_ms (GPU rows) also returns the caching allocator's device allocations, frees and
    retries and Python's collections over the timed calls, with their number; here do_bench and
    the allocator's counters are stand-ins (no GPU): each call allocates twice and frees once."""
    import gc

    import triton.testing

    stats = {"num_device_alloc": 5, "num_device_free": 1, "num_alloc_retries": 0}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: dict(stats))

    def fake_do_bench(fn, warmup, rep, return_mode):
        for _ in range(3):
            fn()
        return 1.25

    def call():
        stats["num_device_alloc"] += 2
        stats["num_device_free"] += 1
        gc.collect()

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    ms, around = latency.gpu_ms(call)
    assert ms == 1.25
    assert around == {"calls": 3, "num_device_alloc": 6, "num_device_free": 3, "num_alloc_retries": 0,
                      "gc_collections": around["gc_collections"]}
    assert around["gc_collections"] >= 3  # a full collection counts in every generation


class StubEngine:
    """upscale() that records its frames and reports fixed seconds of waiting."""

    def __init__(self, wait_s: float):
        self.wait_s, self.seen = wait_s, []

    def upscale(self, frame, return_report=False):
        from gdq_engine import UpscaleReport

        self.seen.append(int(frame))
        return frame, UpscaleReport(wait_seconds=self.wait_s)


def test_rounds_call_every_engine_once_per_round_and_split_host_from_waits():
    """interleaved_ms: a warm-up round then ``rounds`` rounds, each calling every engine once with
    the frames rotating, and per engine the median call time, the median wait and their
    difference (host_ms); AB_PAIRS' ratios come from the chosen key."""
    frames = [torch.tensor(i) for i in range(3)]
    engines = [StubEngine(0.0), StubEngine(0.5e-3)]
    out = latency.interleaved_ms(engines, frames, rounds=4)
    assert [e.seen for e in engines] == [[0, 1, 2, 0, 1], [1, 2, 0, 1, 2]]
    assert out[0]["wait_ms"] == 0 and out[1]["wait_ms"] == pytest.approx(0.5)
    for t in out:
        assert t["ms"] >= 0 and t["host_ms"] == pytest.approx(t["ms"] - t["wait_ms"], abs=1e-3)
    rows = [{"output": "8x8", "method": "entropy {2,4,8}", "ms_rounds": 3.0, "ms": 9.0},
            {"output": "8x8", "method": "entropy {2,4,8}, group streams", "ms_rounds": 2.0, "ms": 1.0},
            {"output": "8x8", "method": "static a8 + int8 tail", "ms": 1.0}]
    assert latency.ab_pairs(rows, "ms_rounds") == [
        {"output": "8x8", "reference": "entropy {2,4,8}", "other": "entropy {2,4,8}, group streams",
         "reference_ms": 3.0, "other_ms": 2.0, "ratio": 1.5}]
    from gdq_engine import load_model
    from gdq_engine.models import RDN

    names = dict(latency.cases_for(True, load_model("edsr-baseline-x4"), Path("granular.pt"), "none"))
    names.update(latency.cases_for(True, RDN(2, n_feats=16, n_blocks=1, n_layers=1, growth=16), None, "none"))
    assert all(name in names for pair in latency.AB_PAIRS for name in pair)  # every pair names GPU rows


@needs_data
def test_a_sigterm_stops_the_rows_and_keeps_those_timed_with_their_rounds(tmp_path, monkeypatch, capsys):
    """A GPU session step's time limit (``timeout`` sends SIGTERM, then kills 10 s later): the row
    being built stops, the rows timed so far get their rounds (host and wait columns) and are
    written with ``"complete": false``, the profiles are skipped, the exit status is 3, and the
    process's own SIGTERM handler is back afterwards."""
    import os
    import signal

    real = latency.make_engine

    def make_engine(model, kw, device, calib):
        if kw.get("dtype") == torch.bfloat16:  # the second row
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, kw, device, calib)

    monkeypatch.setattr(latency, "make_engine", make_engine)
    before = signal.getsignal(signal.SIGTERM)
    assert latency.main(["--arch", "rdn", "--scale", "2", "--output", "48x48", "--frames", "1", "--reps", "2",
                         "--profile", "fp32", "--out", str(tmp_path)]) == 3
    assert signal.getsignal(signal.SIGTERM) is before
    (path,) = tmp_path.glob("latency-*.json")
    result = json.loads(path.read_text())
    assert result["complete"] is False and "profiles" not in result and result["failures"] == []
    (row,) = result["rows"]
    assert row["method"] == "fp32" and row["ms"] > 0 and row["host_ms"] == row["ms"]
    assert "cut short after 1 rows" in capsys.readouterr().out


def test_autotune_choices_name_each_tuner_and_key(monkeypatch):
    """The tile configs the results files record: one entry per autotuner and tuning key, none
    before the kernels are imported."""
    from types import SimpleNamespace

    import common

    monkeypatch.delitem(sys.modules, "gdq_engine.kernels.ops", raising=False)
    assert common.autotune_choices() == {}
    tuner = SimpleNamespace  # what the choices read of a triton.autotune object: its cache
    fake = SimpleNamespace(_tuned_conv=tuner(cache={(64, 64, 8): "BLOCK_M: 128, num_warps: 4"}),
                           _tuned_padded_conv=tuner(cache={}), _tuned_fp_conv=tuner(cache={(3,): "BLOCK_M: 4"}))
    monkeypatch.setitem(sys.modules, "gdq_engine.kernels.ops", fake)
    assert common.autotune_choices() == {"conv (64, 64, 8)": "BLOCK_M: 128, num_warps: 4", "fp (3,)": "BLOCK_M: 4"}


def test_rdn_quality_trains_then_tables_fp_against_each_width(tmp_path, monkeypatch):
    """benchmarks/rdn_quality.py end to end at toy size: trains when the model is missing, evaluates
    every policy row, and writes both commands beside the rows."""
    import rdn_quality

    from gdq_engine.io import save_image

    hr = tmp_path / "hr"
    hr.mkdir()
    save_image(torch.rand(3, 72, 76, generator=torch.Generator().manual_seed(3)), hr / "a.png")
    calib = tmp_path / "calib"  # crops of the inference patch (96 LR pixels at x2)
    calib.mkdir()
    save_image(torch.rand(3, 200, 200, generator=torch.Generator().manual_seed(4)), calib / "c.png")
    model = tmp_path / "rdn.pt"
    monkeypatch.setattr(rdn_quality, "ARCH_CONFIG", dict(n_feats=8, n_blocks=2, n_layers=2, growth=8))
    monkeypatch.setattr(sys, "argv", ["rdn_quality.py", "--model", str(model), "--iters", "2", "--data", str(hr),
                                      "--train-data", str(hr), "--val", "", "--calib", str(calib),
                                      "--out", str(tmp_path / "out"), "--device", "cpu"])
    rdn_quality.main()
    assert model.is_file()
    (path,) = (tmp_path / "out").glob("rdn-quality-*.json")
    result = json.loads(path.read_text())
    assert [r["method"] for r in result["rows"]] == ["bicubic", *rdn_quality.POLICIES]
    assert {r["fab"] for r in result["rows"] if r["method"].startswith("static")} == {8.0, 6.0, 4.0, 3.0, 2.0}
    assert result["train_command"].startswith("python -m gdq_engine train --arch rdn --arch-config n_feats=8")
    assert "--policies fp static:8" in result["eval_command"] and result["environment"]["command"]


@needs_data
def test_cpu_fp_dtype_times_each_row_in_both_dtypes_and_names_the_faster(tmp_path, capsys):
    """benchmarks/cpu_fp_dtype.py: the FP network, static a8 and static a8 + int8 tail, each with fp32
    and bf16 FP layers, and per row the dtype that ran faster in that run."""
    import cpu_fp_dtype

    assert cpu_fp_dtype.main(["--output", "96x96", "--frames", "2", "--reps", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("cpu-fp-dtype-*.json")
    result = json.loads(path.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == [f"{name}, {dtype}" for name in ("FP", "static a8", "static a8 + int8 tail")
                          for dtype in ("float32", "bfloat16")]
    assert [r["fab"] for r in rows.values()] == [32.0, 32.0, 8.0, 8.0, 8.0, 8.0]
    for name, dtype in result["faster_dtype"].items():
        other = "bfloat16" if dtype == "float32" else "float32"
        assert rows[f"{name}, {dtype}"]["ms"] <= rows[f"{name}, {other}"]["ms"]
    assert result["environment"]["command"] and "faster:" in capsys.readouterr().out
