"""Every Triton kernel variant the engine launches compiles for sm_90 and sm_80 without a GPU
(Triton's bundled ptxas), on tensor-core MMAs, without spills or fused multiply-adds.

The variants are recorded from real engine runs in Triton's interpreter; compiling needs a process
without ``TRITON_INTERPRET``, so the command line runs in a subprocess (as a user would run it).
"""

import json
import os
import subprocess
import sys

import pytest

aot = pytest.importorskip("gdq_engine.kernels.aot", reason="triton is a test dependency", exc_type=ImportError)

CONV = "_packed_conv3x3_kernel"
PADDED = "_padded_conv3x3_tma_kernel"
FP = "_fp_conv3x3_kernel"
DENSE = "_dense_conv_kernel"


def _env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "launches.json"
    subprocess.run([sys.executable, "-m", "gdq_engine.kernels.aot", "--record", str(path)], env=_env(True),
                   check=True)
    return path, [aot.Launch.from_json(d) for d in json.loads(path.read_text())]


def test_recording_sees_every_bit_width_epilogue_and_tail(launches):
    _, recorded = launches
    convs = [dict(x.constexprs) for x in recorded if x.kernel == CONV]
    # conv1 of each container, with ReLU and re-quantized (packed) output at its own width
    assert {c["A_BITS"] for c in convs if c["RELU"] and c["O_BITS"]} == {2, 4, 8}
    # ... and 2/3/4-bit codes one per byte (the GPU engine's default): the 8-bit kernel, narrower range
    assert {c["O_HI"] for c in convs if c["RELU"] and c["O_BITS"] == 8} >= {3, 7, 15, 255}
    # conv2: unsigned mid codes, residual, fp32 out; residual scale 0.1 is its own variant
    assert {c["SCALE_RES"] for c in convs if c["HAS_RES"]} == {False, True}
    assert all(not c["O_BITS"] for c in convs if c["HAS_RES"])
    # ... read as signed bytes when they fit int8 one per byte (intgraph.reads_signed), else unsigned
    assert {c["A_SIGNED"] for c in convs if c["HAS_RES"] and c["A_BITS"] == 8} == {False, True}
    assert not any(c["A_SIGNED"] for c in convs if c["HAS_RES"] and c["A_BITS"] < 8)
    # the integer tail: the fused upsampler's 64 -> 256 conv re-quantizes into one 256-wide tile
    assert any(c["BLOCK_N"] == 256 and c["O_BITS"] == 8 and c["O_LO"] < 0 for c in convs)
    # the padded layout (containers="padded"): conv1 re-quantizes, conv2 writes the stream and the next codes
    padded = [dict(x.constexprs) for x in recorded if x.kernel == PADDED]
    assert any(c["RELU"] and c["O_BITS"] == 8 for c in padded)
    assert any(c["HAS_RES"] and c["NEXT_BITS"] == 8 for c in padded)
    # 8-bit mid codes as offset codes, narrower ones as signed bytes: every padded conv takes signed bytes
    assert {(c["A_SIGNED"], c["A_OFFSET"]) for c in padded if c["HAS_RES"]} == {(False, True), (True, False)}
    assert any(c["O_OFFSET"] for c in padded)
    # a dynamic policy's group graphs skip the padding patches (items=): conv1 and conv2 of each width
    skipping = [c for c in convs if c["SKIP_PAD"]]
    assert {c["O_HI"] for c in skipping if c["RELU"]} >= {3, 15, 255}
    assert any(c["HAS_RES"] and c["NEXT_BITS"] == 8 for c in skipping)
    # every quantize_pack variant takes the stream (fp32, or an fp16 engine's fp16) or a bf16 engine's
    # tail input as it is, and writes bytes
    packs = [dict(x.signature) for x in recorded if x.kernel == "_quantize_pack_kernel"]
    assert {s["x_ptr"] for s in packs} == {"*fp32", "*fp16", "*bf16"} and all(s["out_ptr"] == "*u8" for s in packs)
    # the fp16 stream (residual_stream="auto" on CUDA): conv2 reads and writes it, with the next codes,
    # in the group graphs (items=), the static graph and the padded layout
    half = [(x.kernel, dict(x.constexprs)) for x in recorded
            if dict(x.signature).get("res_ptr") == "*fp16" and dict(x.constexprs)["HAS_RES"]]
    assert all(dict(x.signature)["out_ptr"] == "*fp16" for x in recorded if dict(x.signature).get("res_ptr") == "*fp16")
    assert {(k, c.get("SKIP_PAD"), c["NEXT_BITS"]) for k, c in half} >= {(CONV, True, 8), (CONV, False, 8),
                                                                        (PADDED, None, 8)}
    # the FP last conv (runtime/lastconv.py): fp16 in, fp32 out, 3 output channels
    fps = [x for x in recorded if x.kernel == FP]
    assert all(dict(fp.signature)["x_ptr"] == "*fp16" and dict(fp.signature)["out_ptr"] == "*fp32" for fp in fps)
    assert {(dict(fp.constexprs)["COUT"], dict(fp.constexprs)["AFFINE"]) for fp in fps} == {(3, False), (3, True)}
    # the stitch of a batch's windows into the image (runtime/stitch.py): fp32 in and out
    (stitch,) = [x for x in recorded if x.kernel == "_stitch_kernel"]
    assert dict(stitch.signature)["sr_ptr"] == dict(stitch.signature)["canvas_ptr"] == "*fp32"
    # RDN's dense convs, one launch over their segments: 3x3 layers of 1..3 segments writing codes, the
    # 1x1 fusion of 4 writing fp32 (and the next block's codes), 8-bit unsigned codes read shifted
    dense = [dict(x.constexprs) for x in recorded if x.kernel == DENSE]
    assert {(c["TAPS"], c["SEGS"], c["O_BITS"]) for c in dense} == {(9, 1, 8), (9, 2, 8), (9, 3, 8), (1, 4, 0)}
    assert {c["SHIFT"] for c in dense} == {False, True} and {c["NEXT"] for c in dense} == {False, True}
    assert len(set(recorded)) == len(recorded)


def test_record_launches_restores_the_launcher_after_an_error():
    from gdq_engine.kernels import ops

    before = ops._launcher
    with pytest.raises(RuntimeError, match="boom"):
        aot.record_launches(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert ops._launcher is before


def test_problems_flags_each_rule():
    ok = dict(kernel=CONV, arch=90, mma=8, local_bytes=0, fma_f32=0, shared_bytes=4096)
    assert aot.problems(ok) == []
    assert aot.problems({**ok, "mma": 0}) == ["no tensor-core MMA"]
    assert "spills" in aot.problems({**ok, "local_bytes": 64})[0]
    assert "fused multiply-adds" in aot.problems({**ok, "fma_f32": 2})[0]
    too_big = {**ok, "shared_bytes": aot.SHARED_LIMIT[90] + 1}
    assert "shared memory" in aot.problems(too_big)[0] and aot.problems(too_big, fixed=False) == []
    assert aot.problems({**ok, "kernel": "_quantize_pack_kernel", "mma": 0}) == []
    assert aot.problems({**ok, "kernel": FP, "mma": 0}) == ["no tensor-core MMA"]


def test_every_engine_variant_compiles_for_sm90_and_sm80(launches, tmp_path):
    path, recorded = launches
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "gdq_engine.kernels.aot", "--launches", str(path), "--arch", "90", "80",
                          "--out", str(out)], env=_env(False), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["meta"]["triton"] and report["meta"]["command"].startswith("python -m gdq_engine.kernels.aot")
    reports = report["reports"]
    assert len(reports) == 2 * len(recorded)
    for r in reports:
        assert r["problems"] == [], r
        assert r["local_bytes"] == 0 and r["fma_f32"] == 0 and r["registers"] <= 255
        if r["kernel"] in (CONV, PADDED, FP, DENSE):
            assert r["mma"] > 0, r  # wgmma on sm_90, mma.sync s8 (f16 for the FP conv) on sm_80
        if r["kernel"] == PADDED and r["arch"] == 90:
            # Both operands come by TMA box copies, no per-thread copies; signed and offset codes
            # (every padded variant the engine launches) feed the wgmmas from shared memory as they landed.
            assert r["copies_tma"] > 0 and r["copies_async"] == 0, r
            assert r["mma_a_shared"] == r["mma"], r
        if r["kernel"] == CONV and r["arch"] == 90 and " A_BITS=8 " in r["variant"]:
            # Operands reach the wgmmas through shared memory as loaded: the K-contiguous weights need
            # no byte-wise transposition through registers (the N-contiguous layout made 16 byte
            # stores per thread per K step), and signed 8-bit codes are A operands as they are.
            assert r["byte_stores_shared"] == 0, r
            if " A_SIGNED=1 " in r["variant"]:
                assert r["mma_a_shared"] == r["mma"], r
        if r["kernel"] == DENSE and r["arch"] == 90:
            # the dense conv's codes (signed bytes, or narrow unsigned ones read as signed) feed its
            # wgmmas from shared memory as loaded; shifted 8-bit unsigned ones go through registers
            assert r["byte_stores_shared"] == 0, r
            if " SHIFT=0 " in r["variant"]:
                assert r["mma_a_shared"] == r["mma"], r
    assert {r["arch"] for r in reports} == {80, 90}


def _compile_for_sm90(tmp_path, launches, *flags: str) -> list[dict]:
    """``python -m gdq_engine.kernels.aot --launches ... --arch 90 *flags`` on ``launches`` (a
    subprocess without ``TRITON_INTERPRET``): the reports, in the launches' order."""
    from dataclasses import asdict

    path, out = tmp_path / "launches.json", tmp_path / "report.json"
    path.write_text(json.dumps([asdict(x) for x in launches]))
    run = subprocess.run([sys.executable, "-m", "gdq_engine.kernels.aot", "--launches", str(path), "--arch", "90",
                          *flags, "--out", str(out)], env=_env(False), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads(out.read_text())["reports"]


def test_l1_activation_copies_compile_to_cached_copies_that_feed_the_mma_from_shared_memory(launches, tmp_path):
    """``A_L1`` (benchmarks/kernels.py's "L1 A" rows), compiled for sm_90 with the fixed config (one
    tap per K step): the a8 conv1's activation tiles come by ``cp.async.ca`` (cached in L1) and
    still feed the wgmmas from shared memory. Without it every copy of that conv is ``.cg``."""
    from dataclasses import replace

    _, recorded = launches
    conv1 = next(x for x in recorded if x.kernel == CONV and dict(x.constexprs)["A_BITS"] == 8
                 and dict(x.constexprs)["A_SIGNED"] and dict(x.constexprs)["O_BITS"] == 8)
    assert dict(conv1.constexprs)["A_L1"] is False
    l1 = replace(conv1, constexprs=tuple((k, True if k == "A_L1" else v) for k, v in conv1.constexprs))
    plain, cached = _compile_for_sm90(tmp_path, [conv1, l1])
    assert plain["copies_l1"] == 0 and cached["copies_l1"] > 0, (plain, cached)
    assert cached["mma_a_shared"] == cached["mma"] > 0 and cached["byte_stores_shared"] == 0, cached


def test_conversions_by_adds_leave_no_conversion_in_the_flat_and_padded_epilogues(launches, tmp_path):
    """``ROUND_ADD`` / ``I2F_ADD`` (``ops.CVT_ADD``; benchmarks/kernels.py's "cvt" rows), compiled
    for sm_90 with the fixed configs: the upsampler's shuffled codes, conv2 with the next codes and
    the padded conv2 lose every int32 -> fp32, floor and fp32 -> int32 conversion of their epilogue
    to adds (one round-down add per code), with no spills; the engine's launches keep them."""
    from dataclasses import replace

    _, recorded = launches
    first = [next(x for x in recorded if x.kernel == CONV and want(dict(x.constexprs))) for want in (
        lambda c: c["A_BITS"] == 8 and c["SHUFFLE"] == 2 and c["O_BITS"] == 8,
        lambda c: c["A_BITS"] == 8 and c["NEXT_BITS"] == 8 and not c["A_SIGNED"])]
    first.append(next(x for x in recorded if x.kernel == PADDED and dict(x.constexprs)["NEXT_BITS"] == 8))
    assert all(dict(x.constexprs)["ROUND_ADD"] is dict(x.constexprs)["I2F_ADD"] is False for x in recorded
               if x.kernel in (CONV, PADDED))
    pairs = [(x, replace(x, constexprs=tuple((k, True if k in ("ROUND_ADD", "I2F_ADD") else v)
                                             for k, v in x.constexprs))) for x in first]
    reports = _compile_for_sm90(tmp_path, [x for pair in pairs for x in pair])
    for plain, by_adds in zip(reports[::2], reports[1::2]):
        assert plain["conversions"] > 0 and plain["round_adds"] == 0, plain
        assert by_adds["conversions"] == 0 and by_adds["round_adds"] > 0, by_adds
        assert by_adds["local_bytes"] == 0 and by_adds["problems"] == [] and by_adds["mma"] == plain["mma"], by_adds


def test_saturating_codes_leave_one_conversion_per_code_in_the_flat_and_padded_epilogues(launches, tmp_path):
    """``ROUND_SAT`` (``ops.CVT_SAT``; benchmarks/kernels.py's "cvt sat" rows) with the adds, compiled
    for sm_90 with the fixed configs: conv1's codes from 0 (its ReLU folded in), the upsampler's
    shuffled signed codes, conv2's next codes and the padded conv2's each take one saturating floor
    conversion and no floor, conversion or round-down add; no spills; the engine's launches keep it off."""
    from dataclasses import replace

    _, recorded = launches
    first = [next(x for x in recorded if x.kernel == CONV and want(dict(x.constexprs))) for want in (
        lambda c: c["A_BITS"] == 8 and c["O_BITS"] == 8 and c["O_LO"] == 0 and c["RELU"] and c["SHUFFLE"] == 1,
        lambda c: c["A_BITS"] == 8 and c["SHUFFLE"] == 2 and c["O_BITS"] == 8,
        lambda c: c["A_BITS"] == 8 and c["NEXT_BITS"] == 8 and not c["A_SIGNED"])]
    first.append(next(x for x in recorded if x.kernel == PADDED and dict(x.constexprs)["NEXT_BITS"] == 8))
    assert not any(dict(x.constexprs)["ROUND_SAT"] for x in recorded if x.kernel in (CONV, PADDED))
    sat = [replace(x, constexprs=tuple((k, True if k in ("ROUND_ADD", "I2F_ADD", "ROUND_SAT") else v)
                                       for k, v in x.constexprs)) for x in first]
    reports = _compile_for_sm90(tmp_path, first + sat)
    for plain, by_sat in zip(reports[:len(first)], reports[len(first):]):
        assert plain["sat_cvts"] == 0 and plain["conversions"] > 0, plain
        assert by_sat["sat_cvts"] > 0 and by_sat["conversions"] == 0 and by_sat["round_adds"] == 0, by_sat
        assert by_sat["local_bytes"] == 0 and by_sat["problems"] == [] and by_sat["mma"] == plain["mma"], by_sat


def test_every_padded_autotuning_config_moves_operands_by_tma_into_the_mma(launches, tmp_path):
    """The padded conv1 with each of its autotuning candidates on sm_90, the persistent ones
    (one flattened loop over row tiles) included: TMA copies only, A from shared memory, no spills."""
    _, recorded = launches
    conv1 = next(x for x in recorded if x.kernel == PADDED and dict(x.constexprs)["O_BITS"] == 8)
    reports = _compile_for_sm90(tmp_path, [conv1], "--all-configs")
    assert {"PERSISTENT=0", "PERSISTENT=1", "PERSISTENT=2"} <= {w for r in reports for w in r["config"].split()}
    for r in reports:
        assert r["copies_tma"] > 0 and r["copies_async"] == 0 and r["mma_a_shared"] == r["mma"] > 0, r
        assert r["local_bytes"] == 0, r


def test_fp_conv_compiles_for_one_row_images_and_every_tile_config(launches, tmp_path):
    """The FP last conv with H == W == 1, which Triton's launcher passes as constants (the first
    kernel called ``H.to()`` and failed to compile on a GPU, 2026-11-26; the interpreter cannot
    see that), and with every autotuning candidate: fp16 wgmmas, no spills."""
    from dataclasses import replace

    from gdq_engine.kernels import ops

    _, recorded = launches
    fps = [x for x in recorded if x.kernel == FP]
    assert sorted(dict(x.constexprs)["AFFINE"] for x in fps) == [False, True]  # plain, and finishing the image
    fp = next(x for x in fps if dict(x.constexprs)["AFFINE"])
    one_row = replace(fp, signature=tuple((n, t) for n, t in fp.signature if n not in ("H", "W")),
                      constexprs=(("H", 1), ("W", 1), *fp.constexprs))
    reports = _compile_for_sm90(tmp_path, [*fps, one_row], "--all-configs")
    assert len(reports) == 3 * len(ops.FP_TUNE_CONFIGS)
    assert any("H=1" in r["variant"] for r in reports)
    for r in reports:
        assert r["problems"] == [] and r["local_bytes"] == 0 and r["mma"] == r["mma_a_shared"] > 0, r

