"""runtime/hostreads.py: the seconds the host waits in reads of device results, summed per block,
and UpscaleReport.wait_seconds (on a GPU: 0 < waits < the call; one synchronising read per frame)."""

import time

import pytest
import torch

from gdq_engine.runtime.hostreads import PendingRead, counting_waits, to_host, waiting


def test_waiting_blocks_add_to_the_innermost_count_only():
    with counting_waits() as outer:
        with waiting():
            time.sleep(0.02)
        with counting_waits() as inner:
            with waiting():
                time.sleep(0.01)
        assert inner[0] >= 0.01
    assert 0.02 <= outer[0] < 0.02 + inner[0]  # the inner block's wait is not the outer's
    with waiting():  # outside any count: timed for nobody, and no error
        pass


def test_to_host_of_a_cpu_tensor_is_the_tensor_and_no_wait():
    t = torch.arange(4)
    with counting_waits() as total:
        assert to_host(t) is t
    assert total[0] == 0.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_a_pending_read_gives_the_values_it_was_queued_with(device):
    """The read is queued when made: work queued after it (here an in-place add) does not change
    what wait() returns, on the host (pinned memory from a GPU); its wait is timed there."""
    t = torch.arange(12, dtype=torch.float32, device=device).view(3, 4)
    read = PendingRead(t)
    t.add_(1)
    with counting_waits() as total:
        got = read.wait()
    assert got.device.type == "cpu" and torch.equal(got, torch.arange(12.0).view(3, 4))
    assert got.is_pinned() == (device == "cuda") and (total[0] > 0) == (device == "cuda")


def test_a_cpu_engine_reports_no_waits():
    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    engine = Engine(EDSR(scale=2, n_feats=8, n_blocks=1).eval(), policy="fp", patch_size=None, device="cpu")
    _, report = engine.upscale(torch.rand(3, 12, 10), return_report=True)
    assert report.wait_seconds == 0.0 and report.seconds > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["fp", "static", "static, image graphs"])
def test_a_cuda_engine_waits_in_its_one_read_per_frame(policy):
    """The engine's reads are timed (0 < wait < the call), and a warm frame of an FP or static
    engine synchronises with the device once: its final read (latency.sync_sites, the profile's
    check), also as an image graph's replay; a uint8 result copied into host memory is one more,
    also timed."""
    import sys
    from pathlib import Path

    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import latency

    torch.manual_seed(0)
    kw = dict(policy="fp")
    if policy.startswith("static"):
        kw = dict(policy="static", bits=8, calib=torch.rand(4, 3, 24, 24), image_graphs="image" in policy)
    engine = Engine(EDSR(scale=2, n_feats=16, n_blocks=2).eval(), device="cuda", **kw)
    frame = torch.rand(1, 3, 60, 70, device="cuda")
    for _ in range(2):  # eager, then the capture of the network's (or the image's) graph
        _, report = engine.upscale(frame, return_report=True)
    assert (engine.image_graphs is not None) == ("image" in policy)
    assert 0 < report.wait_seconds < report.seconds
    syncs = latency.sync_sites(engine, frame)
    assert syncs["count"] == 1, syncs
    host = (frame * 255).round().to(torch.uint8).cpu()
    _, report = engine.upscale(host, return_report=True)
    assert 0 < report.wait_seconds < report.seconds
