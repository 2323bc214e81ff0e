"""The longest real path that runs without data: build → sparsify → prune → fuse → profile.

``python -m resprune.demo``. The scales are driven down by the L1 proximal step alone
(no task loss), so the numbers show the mechanics, not accuracy; ``resprune run
quickstart`` is the end-to-end job with real images and training.
"""

from __future__ import annotations

import torch

import resprune as rp


def main() -> None:
    torch.manual_seed(0)
    model = rp.create_model("resnet56")
    base = rp.profile(model)
    # Sparsify: random per-layer importance, then soft-thresholding (the proximal step of L1).
    with torch.no_grad():
        for _, m in rp.sparsity.removable_scales(model):
            m.scale.copy_(torch.rand(()) ** 2)
            m.scale.copy_(torch.sign(m.scale) * (m.scale.abs() - 0.3).clamp_min(0))
    model.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    print(rp.scale_stats(model, threshold=1e-2).summary())
    report = rp.prune_(model, rp.PruneConfig(threshold=1e-2))
    deploy = rp.fuse(model)
    with torch.no_grad():
        err = float((deploy(x) - y).abs().max() / y.abs().max())
    prof = rp.profile(deploy)
    print(report.summary())
    print(f"\n{'model':<22}{'MACs (M)':>10}{'params (M)':>12}{'convs':>7}")
    for name, p, n in (
        ("resnet56 (ResConv)", base, sum(isinstance(t, torch.nn.Conv2d) for t in rp.create_model("resnet56").modules())),
        ("pruned + fused", prof, sum(isinstance(t, torch.nn.Conv2d) for t in deploy.modules())),
    ):
        print(f"{name:<22}{p.macs / 1e6:>10.2f}{p.params / 1e6:>12.3f}{n:>7}")
    print(f"\nmax relative output difference, fused pruned vs sparse model: {err:.2e}")


if __name__ == "__main__":
    main()
