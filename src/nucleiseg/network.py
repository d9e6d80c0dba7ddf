"""MobileNetV2 encoder (torchvision's parameter names) + U-Net decoder of transposed convolutions.

The encoder is written here because torchvision's CPU build does not import with torch 2.13; its
``state_dict`` keys are exactly torchvision's ``mobilenet_v2().features.*`` so the official ImageNet
checkpoints load into it unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDE = 32  # input sides must be a multiple of this (the encoder downsamples 5 times)

# (expand_ratio t, channels c, repeats n, first stride s), torchvision's inverted_residual_setting
_MOBILENET_V2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                         (6, 160, 3, 2), (6, 320, 1, 1)]
# indices of ``features`` whose outputs feed the decoder, at strides 2, 4, 8, 16, 32
_SKIP_INDICES = (1, 3, 6, 13, 18)
_SKIP_CHANNELS = (16, 24, 32, 96, 1280)


DEFAULT_DECODER = (96, 64, 48, 32, 16)  # decoder block widths, strides 16, 8, 4, 2, 1


class ConvBNReLU(nn.Sequential):
    """Conv + BatchNorm + ReLU6, named ``0`` / ``1`` like torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel=1))
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Encoder(nn.Module):
    """torchvision's MobileNetV2 ``features`` (width 1.0), returning the five skip feature maps."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in _MOBILENET_V2_SETTING:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBNReLU(cin, 1280, kernel=1))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _SKIP_INDICES:
                skips.append(x)
        return skips


class UpBlock(nn.Module):
    """Transposed-conv x2 upsampling, concatenation with the skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(cout + cskip, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class UNet(nn.Module):
    """U-Net on a MobileNetV2 encoder; input (N, 3, H, W) in [0, 1]-ish, output (N, out_channels, H, W) logits.

    H and W must be multiples of :data:`STRIDE`. ImageNet mean/std normalisation is part of the network
    (fixed buffers), so exported models take the same input as the Python pipeline.
    """

    def __init__(self, out_channels: int, decoder_channels: tuple[int, ...] = DEFAULT_DECODER,
                 full_res_channels: int = 0):
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError("decoder_channels needs 5 entries (strides 16, 8, 4, 2, 1)")
        # optional full-resolution skip: a 3x3 conv of the image feeds the last decoder block, whose
        # encoder skips otherwise start at stride 2 (for thin borders between small touching nuclei)
        self.full_res = (nn.Sequential(nn.Conv2d(3, full_res_channels, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(full_res_channels), nn.ReLU(inplace=True))
                         if full_res_channels > 0 else None)
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.encoder = MobileNetV2Encoder()
        skips = list(_SKIP_CHANNELS[:-1][::-1]) + [full_res_channels]  # 96, 32, 24, 16, then the optional full-res one
        blocks, cin = [], _SKIP_CHANNELS[-1]
        for cskip, cout in zip(skips, decoder_channels):
            blocks.append(UpBlock(cin, cskip, cout))
            cin = cout
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, out_channels, kernel_size=1)
        self.frozen_encoder = False
        self.frozen_encoder_bn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean) / self.input_std
        feats = self.encoder(x)
        skips = feats[:-1][::-1] + [self.full_res(x) if self.full_res is not None else None]
        x = feats[-1]
        for block, skip in zip(self.decoder, skips):
            x = block(x, skip)
        return self.head(x)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Keep the pretrained encoder fixed: no gradients, BatchNorm statistics frozen (eval mode)."""
        self.frozen_encoder = frozen
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def freeze_encoder_bn(self, frozen: bool = True) -> None:
        """Fine-tune the encoder's convolutions but keep its BatchNorm statistics fixed.

        Small, mixed-modality batches give noisy batch statistics; re-normalising with them moves the
        pretrained features and makes training-mode and evaluation-mode outputs disagree.
        """
        self.frozen_encoder_bn = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> "UNet":
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()
        elif self.frozen_encoder_bn:
            for m in self.encoder.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self
