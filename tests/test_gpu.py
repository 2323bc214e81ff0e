"""The CUDA path (skipped without a GPU): data on the device as uint8, batched augmentation
there, bf16 autocast + channels_last training, fusion on the device."""

import pytest
import torch

import resprune as rp
from resprune.config import TrainConfig
from resprune.data import DeviceLoader, load_arrays
from resprune.train import Trainer

pytestmark = pytest.mark.gpu


def test_loader_lives_on_gpu():
    tr, _ = load_arrays("digits")
    dl = DeviceLoader(tr, 256, train=True, augment=True, pad=2, device="cuda", channels_last=True)
    assert dl.images.is_cuda and dl.images.dtype == torch.uint8
    x, y = next(iter(dl))
    assert x.is_cuda and y.is_cuda and x.is_contiguous(memory_format=torch.channels_last)


def test_bf16_channels_last_training_learns():
    tr, te = load_arrays("digits")
    train = DeviceLoader(tr, 128, train=True, augment=True, pad=2, device="cuda", channels_last=True)
    test = DeviceLoader(te, 512, device="cuda", channels_last=True,
                        mean=tuple(train.mean.flatten().tolist()), std=tuple(train.std.flatten().tolist()))
    model = rp.create_model("resnet20", in_chans=1)
    cfg = TrainConfig(epochs=4, lr=0.1, l1=0.05, device="cuda", bf16=True, channels_last=True)
    hist = Trainer(model, train, test, cfg, None, "gpu", log=lambda s: None).fit()
    assert hist[-1].test_acc > 80


def test_fusion_on_gpu():
    from helpers import randomize_, rel_err

    m = randomize_(rp.create_model("resnet56"), seed=1).cuda().eval()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        assert rel_err(rp.fuse(m)(x), m(x)) <= 1e-4  # TF32/cuDNN convs: looser than the CPU 1e-5
