"""A tiny 2D U-Net for the lung model: [N, 1, H, W] windowed CT -> [N, 3, H, W] softmax (in the graph).

``depth`` resolution levels (3 or 4) plus a bottleneck, ``base`` channels at full resolution
(doubling per level, at most 4x base), two 3x3 conv + BatchNorm + ReLU per block, max-pool down,
bilinear upsampling + concatenation up. A fourth level widens the receptive field (context around a
lesion) for few extra operations, since it runs at 1/16 of the input size. With ``base=12``,
``depth=3`` it has about 0.17 M parameters. BatchNorm folds into the convs at ONNX export, so the
exported graph is Conv/Relu/MaxPool/Resize/Concat/Softmax only. H and W must be multiples of
2**depth.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet2D(nn.Module):
    def __init__(self, base: int = 12, classes: int = 3, softmax: bool = True, depth: int = 3) -> None:
        super().__init__()
        if depth not in (3, 4):
            raise ValueError(f"depth must be 3 or 4, not {depth}")
        ch = [base * min(2 ** i, 4) for i in range(depth)]  # per level; the bottleneck keeps the last width
        self.depth = depth
        for i, c in enumerate(ch, start=1):  # enc1.. / dec1..: the names of the 3-level checkpoints
            setattr(self, f"enc{i}", _block(1 if i == 1 else ch[i - 2], c))
            setattr(self, f"dec{i}", _block((ch[i] if i < depth else ch[-1]) + c, c))
        self.mid = _block(ch[-1], ch[-1])
        self.head = nn.Conv2d(ch[0], classes, 1)
        self.softmax = softmax

    @staticmethod
    def _up(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(1, self.depth + 1):
            x = getattr(self, f"enc{i}")(x if i == 1 else F.max_pool2d(x, 2))
            skips.append(x)
        x = self.mid(F.max_pool2d(x, 2))
        for i in range(self.depth, 0, -1):
            skip = skips[i - 1]
            x = getattr(self, f"dec{i}")(torch.cat([self._up(x, skip), skip], 1))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x)
        return torch.softmax(z, dim=1) if self.softmax else z


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_onnx(model: UNet2D, path, size: int, *, input_name: str = "ct", output_name: str = "probs") -> None:
    """ONNX opset 17, dynamic batch, softmax inside the graph."""
    model = model.eval()
    dummy = torch.zeros(2, 1, size, size)
    with torch.no_grad():
        torch.onnx.export(model, (dummy,), str(path), opset_version=17, input_names=[input_name],
                          output_names=[output_name], dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}},
                          dynamo=False)
