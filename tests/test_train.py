import torch
from conftest import random_image

from gdq_engine.io import save_image
from gdq_engine.models import load_model
from gdq_engine.train.data import PairedPatches
from gdq_engine.train.fp import FPTrainConfig, train_fp


def _folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        save_image(random_image(40, 44, seed=i), d / f"{i}.png")
    return d


def test_paired_patches_are_aligned(tmp_path):
    data = PairedPatches([_folder(tmp_path)], scale=2, lr_patch=8, progress=False)
    lr, hr = data.sample(6, torch.Generator().manual_seed(0))
    assert lr.shape == (6, 3, 8, 8) and hr.shape == (6, 3, 16, 16)
    from gdq_engine.metrics import imresize

    # The LR crop is (up to 8-bit rounding and crop-border effects) the bicubic of the HR crop.
    down = imresize(hr, 0.5)
    assert (down[..., 2:-2, 2:-2] - lr[..., 2:-2, 2:-2]).abs().mean() < 0.02


def test_train_resumes_and_loads(tmp_path):
    folder = _folder(tmp_path)
    cfg = FPTrainConfig(scale=2, model_config=dict(n_feats=8, n_blocks=1, res_scale=1.0), data=(str(folder),),
                        val=str(folder), iters=3, batch=2, lr_patch=8, val_every=3, save_every=1, warmup=1)
    out = train_fp(cfg, tmp_path / "m.pt", device="cpu", progress=False, log=lambda *_: None)
    state = torch.load(tmp_path / "m.state.pt", weights_only=True)
    assert state["step"] == 3
    first = load_model(out)
    # Resume with a longer schedule: starts from step 3, not from scratch.
    cfg.iters = 5
    lines = []
    train_fp(cfg, tmp_path / "m.pt", device="cpu", progress=False, log=lines.append)
    assert any("resumed" in line and "step 3" in line for line in lines)
    second = load_model(tmp_path / "m.pt")
    meta = torch.load(tmp_path / "m.pt", weights_only=True)["meta"]
    assert meta["steps"] == 5 and meta["history"]["val_psnr"][0][0] == 3
    assert not torch.equal(first.head.weight, second.head.weight)
