"""Re-implementations of the original Med3DVLM modules, in their own layout and with their own parameter
names, used as references for the converters. Written from the reference facts, not copied."""

from __future__ import annotations

import torch
from torch import nn


class OrigDecompConv(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, duplicate_norms=False):
        super().__init__()
        norms = [nn.BatchNorm3d(cout) for _ in range(3)]
        if duplicate_norms:  # mirthAI/DCFormer registers the BatchNorms a second time
            self.norm = nn.ModuleList(norms)
        p = k // 2
        self.c1 = nn.Sequential(nn.Conv3d(cin, cout, (k, 1, 1), stride, (p, 0, 0), groups=groups), norms[0])
        self.c2 = nn.Sequential(nn.Conv3d(cin, cout, (1, k, 1), stride, (0, p, 0), groups=groups), norms[1])
        self.c3 = nn.Sequential(nn.Conv3d(cin, cout, (1, 1, k), stride, (0, 0, p), groups=groups), norms[2])

    def forward(self, x):
        return self.c1(x) + self.c2(x) + self.c3(x)


class OrigMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.mlp(x)


class OrigBlock(nn.Module):
    def __init__(self, cin, cout, k, downsample, scale_name, duplicate_norms):
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.pool = nn.MaxPool3d(3, 2, 1)
            self.proj = nn.Conv3d(cin, cout, 1, 1, 0, bias=False)
        self.dwconv = OrigDecompConv(cout, cout, k, groups=cout, duplicate_norms=duplicate_norms)
        self.mlp = OrigMlp(cout, 4 * cout)
        self.scale_name = scale_name
        self.register_parameter(scale_name, nn.Parameter(torch.rand(cout)))

    def forward(self, x):
        if self.downsample:
            x = self.proj(self.pool(x))
        y = self.dwconv(x).permute(0, 2, 3, 4, 1)
        y = getattr(self, self.scale_name) * self.mlp(y)
        return x + y.permute(0, 4, 1, 2, 3)


class OrigEncoder(nn.Module):
    def __init__(self, stem, dims, depths, kernels, scale_name="scale", duplicate_norms=False):
        super().__init__()
        dup = duplicate_norms
        self.s0 = nn.Sequential(nn.Sequential(
            OrigDecompConv(1, stem, 7, 4, duplicate_norms=dup),
            *(OrigDecompConv(stem, stem, 3, duplicate_norms=dup) for _ in range(3)),
        ))
        widths = [stem, *dims]
        for i, (d, n, k) in enumerate(zip(dims, depths, kernels)):
            blocks = [OrigBlock(widths[i] if b == 0 else d, d, k, b == 0, scale_name, dup) for b in range(n)]
            setattr(self, f"s{i + 1}", nn.Sequential(*blocks))
        self.n_stages = len(dims) + 1

    def forward(self, x):
        x = x.permute(0, 1, 3, 4, 2)  # the original runs in (B, C, H, W, D)
        outs = []
        for i in range(self.n_stages):
            x = getattr(self, f"s{i}")(x)
            b, c, h, w, t = x.shape
            outs.append(x.permute(0, 4, 2, 3, 1).reshape(b, t * h * w, c))  # b c h w t -> b (t h w) c
        return outs


class OrigModel(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.encoder = OrigEncoder(**kw)

    def forward(self, x):
        return self.encoder(x)


class OrigMultiModalProjector(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.mm_projector = nn.Sequential(nn.Linear(cin, cout), nn.Sequential(nn.GELU(), nn.Linear(cout, cout)))

    def forward(self, x):
        return self.mm_projector(x)


class OrigMixerLayer(nn.Module):
    def __init__(self, tokens, channels, tokens_out, channels_out):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.mlp1 = OrigMultiModalProjector(tokens, tokens_out)
        self.mlp2 = OrigMultiModalProjector(channels, channels_out)

    def forward(self, x):
        x = self.mlp1(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return self.mlp2(self.ln2(x))


class OrigMixerProjector(nn.Module):
    """MixerLowHighHybridMLP: layer i outputs width out_dim // 2**(depth - i - 1)."""

    def __init__(self, low, low_out, high, high_out, out_dim):
        super().__init__()
        depth = len(low_out)

        def stream(inp, outs):
            layers, (n, c) = [], inp
            for i, n_out in enumerate(outs):
                c_out = out_dim // 2 ** (depth - i - 1)
                layers.append(OrigMixerLayer(n, c, n_out, c_out))
                n, c = n_out, c_out
            return nn.ModuleList(layers)

        self.low_mixer, self.high_mixer = stream(low, low_out), stream(high, high_out)

    def forward(self, feats):
        low, high = feats
        for a, b in zip(self.low_mixer, self.high_mixer):
            low, high = a(low), b(high)
        return torch.cat([low, high], dim=1)


def randomize_batchnorm(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()
