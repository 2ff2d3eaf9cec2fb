"""A tiny 2D U-Net for the lung model: [N, 1, H, W] windowed CT -> [N, 3, H, W] softmax (in the graph).

Three resolution levels plus a bottleneck, ``base`` channels at full resolution (doubling per level),
two 3x3 conv + BatchNorm + ReLU per block, max-pool down, bilinear upsampling + concatenation up.
With ``base=12`` it has about 0.3 M parameters. BatchNorm folds into the convs at ONNX export, so the
exported graph is Conv/Relu/MaxPool/Resize/Concat/Softmax only. H and W must be multiples of 8.
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
    def __init__(self, base: int = 12, classes: int = 3, softmax: bool = True) -> None:
        super().__init__()
        c1, c2, c3, c4 = base, base * 2, base * 4, base * 4
        self.enc1, self.enc2, self.enc3 = _block(1, c1), _block(c1, c2), _block(c2, c3)
        self.mid = _block(c3, c4)
        self.dec3, self.dec2, self.dec1 = _block(c4 + c3, c3), _block(c3 + c2, c2), _block(c2 + c1, c1)
        self.head = nn.Conv2d(c1, classes, 1)
        self.softmax = softmax

    @staticmethod
    def _up(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        m = self.mid(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([self._up(m, e3), e3], 1))
        d2 = self.dec2(torch.cat([self._up(d3, e2), e2], 1))
        d1 = self.dec1(torch.cat([self._up(d2, e1), e1], 1))
        return self.head(d1)

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
