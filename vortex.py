"""Vortex Pooling, read next to the paper.

Xie, Zhou, Wu, "Vortex Pooling: Improving Context Representation in Semantic Segmentation" (2018).
This file holds the whole model, top to bottom:

  1. ResNet backbone with output stride 8/16/32 and multi-grid      (paper 3.1 and 4.1 "Multi-grid")
  2. box_average: exact k x k average pooling, fast                  (the pooling of 3.3 and 3.4)
  3. ContextModule: ASPP, ASPP+, Module A, Module B (Vortex), none    (3.1-3.4, Table 1, Fig. 2-4)
  4. DeepLabV3: backbone + context module + 1x1 classifier           (3.1, Fig. 4)
  5. Utilization ratio, analytic (Eq. 1) and measured with autograd  (3.2)
  6. Loading ImageNet / torchvision DeepLabV3 checkpoints from local files
  7. `python vortex.py`: the table of 3.2/Table 1 in numbers; `--bench`: speed ratios.

Run `python vortex.py --help` for the command line.
"""
import argparse
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# 1. ResNet (He et al. 2016) with torchvision's module names, so that torchvision's ImageNet
#    checkpoints (e.g. resnet101-63fe2227.pth) load with no key surgery: conv1, bn1, layer1..4,
#    blocks with conv1/bn1/conv2/bn2(/conv3/bn3) and downsample.0 (conv) / downsample.1 (BN).
#
#    Stride placement. torchvision (ResNet "v1.5") puts a stage's stride on the 3x3 conv of its
#    FIRST bottleneck. DeepLab v3's TF-slim ResNet also strides on a unit's 3x3 conv, but in the
#    LAST unit of a block (the same arithmetic, grouped differently); the Caffe ResNet of DeepLab
#    v1/v2 is the one that strides on the first 1x1 conv, skipping 3 of every 4 input pixels
#    before any 3x3 filter sees them. We follow torchvision, because the checkpoints people can
#    get are torchvision's, and a weight trained with the stride in one place is wrong with it in
#    another.
# ---------------------------------------------------------------------------------------------


def conv3x3(cin, cout, stride=1, dilation=1):
    # padding = dilation keeps the map size for a dilated 3x3 ("atrous") conv at stride 1.
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Unlike torchvision's, it accepts dilation > 1 (both convs)."""
    expansion = 1

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride and dilation here, as torchvision's), 1x1 expand (ResNet-50+)."""
    expansion = 4

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
          50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
          152: (Bottleneck, (3, 8, 36, 3))}


class ResNet(nn.Module):
    """ResNet feature extractor; forward returns the last feature map X of paper 3.1.

    Output stride (paper 4.1, "Inference strategy"): the stem and layer1/layer2 always reduce
    the image 8x. A further stride-2 stage (layer3, layer4) that would push the stride past
    `output_stride` runs at stride 1 and dilates its 3x3 convs instead (DeepLab's atrous
    convolution), so that every filter sees the same pixels it was trained on:
      - the first block's 3x3 conv held the stride; a stride-2 conv at rate r is a stride-1 conv
        at rate r followed by subsampling, so without the subsampling it keeps rate r;
      - every conv after it worked on the subsampled grid, so it now needs rate 2r.
    This is TF-slim's `stack_blocks_dense` (DeepLab v3), torchvision's
    `replace_stride_with_dilation` and mmsegmentation's `contract_dilation`. Per-block rates of
    the 3x3 convs (`block_dilations`), for ResNet-50/101/152:

        output     layer3                 layer4, multi_grid=None   layer4, multi_grid=(1, 2, 4)
        stride     (first, rest)          (torchvision's geometry)  (paper 4.1, the default)
        32         stride 2: 1, 1         stride 2: 1, 1, 1         1, 2, 4
        16         stride 2: 1, 1         stride 1: 1, 2, 2         2, 4, 8
         8         stride 1: 1, 2         stride 1: 2, 4, 4         4, 8, 16

    Multi-grid (paper 4.1, "Multi-grid", after DeepLab v3): the i-th block of layer4 uses
    `rate * multi_grid[i]`, where rate is the stage's rate after the stride is traded (4 at
    OS 8), the first block included. That is DeepLab v3's block4 (4, 8, 16 at OS 8; slim's
    block4 has no stride of its own) and mmsegmentation's result too. It changes the geometry
    of layer4's first block from the one its ImageNet weights were trained at (rate 2 at OS 8
    would be exact, multi-grid gives it 4) and of the other two (4 -> 8, 16): fine-tuning
    adapts them. `multi_grid=None` reproduces torchvision's dilated ResNet exactly (tested
    against it). ResNet-18 has two layer4 blocks and uses the first two entries.

    `base_channels` (64 in every standard ResNet) scales all widths; tests use small values.
    """

    def __init__(self, depth=101, output_stride=8, multi_grid=(1, 2, 4), base_channels=64):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        block, counts = DEPTHS[depth]
        if multi_grid is not None:
            if len(multi_grid) < counts[3] or min(multi_grid) < 1:
                raise ValueError(f"multi_grid needs one positive entry per layer4 block "
                                 f"({counts[3]}), got {tuple(multi_grid)}")
            multi_grid = tuple(int(g) for g in multi_grid)[: counts[3]]  # ResNet-18: (1, 2)
        self.depth, self.output_stride, self.multi_grid = depth, output_stride, multi_grid
        c = base_channels
        self.conv1 = nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.inplanes = c
        self.block_dilations = {}
        self.layer1 = self._make_layer("layer1", block, c, [1] * counts[0], 1)
        self.layer2 = self._make_layer("layer2", block, 2 * c, [1] * counts[1], 2)
        stride, rate = 8, 1  # after layer2
        for i, name in ((2, "layer3"), (3, "layer4")):
            if stride < output_stride:  # keep the stride
                s, first, rate, stride = 2, rate, rate, stride * 2
            else:  # trade it for dilation: the strided conv keeps its rate, the rest double it
                s, first, rate = 1, rate, rate * 2
            dilations = [first] + [rate] * (counts[i] - 1)
            if name == "layer4" and multi_grid is not None:
                dilations = [rate * g for g in multi_grid]
            setattr(self, name, self._make_layer(name, block, 2 ** i * c, dilations, s))
        self.out_channels = 8 * c * block.expansion
        del self.inplanes
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, name, block, planes, dilations, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.inplanes, planes, stride, dilations[0], downsample)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes, 1, d) for d in dilations[1:]]
        self.block_dilations[name] = tuple(dilations)
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet(depth, output_stride=8, multi_grid=(1, 2, 4), base_channels=64):
    """The backbone of paper 3.1/4.1: `resnet(101)` is DeepLab v3's ResNet-101, OS 8, multi-grid.

    `resnet(101, output_stride=os, multi_grid=None)` is exactly torchvision's
    `resnet101(replace_stride_with_dilation=...)` for that output stride (and, at OS 32, plain
    `resnet101`) without its pooling and `fc` layers.
    """
    return ResNet(depth, output_stride, multi_grid, base_channels)


# ---------------------------------------------------------------------------------------------
# 2. Exact, fast k x k average pooling (stride 1, "same" size) -- the pooling of Module A (3.3)
#    and Module B (3.4).
#
#    Definition (the reference the tests compare against):
#        box_average(x, k, count_include_pad) == nn.AvgPool2d(k, 1, k // 2, count_include_pad)(x)
#    Our default is count_include_pad=False: each output is the mean of the input pixels that
#    lie inside the window *and* inside the map. With True, the window is always divided by k*k,
#    so padding counts as zeros and damps the border: a 27x27 window on a 65x65 map divides the
#    corner pixel's 14*14 real values by 729, i.e. scales it by 0.27.
#
#    Speed. Summing k*k values per pixel (avg_pool2d) costs O(k^2); for Vortex (k = 3, 9, 27)
#    that is 3x the cost of the four ASPP convolutions on CPU. We use two identities:
#      (a) separability: a k x k box sum is a k-tap sum along W followed by one along H;
#      (b) cascading: a (a*b)-tap box sum is an a-tap box sum followed by a b-tap sum whose taps
#          are a apart ("dilated by a"): {0..a-1} + a*{0..b-1} = {0..ab-1}, each offset once.
#    So a 9x9 box = 3x3 box, then 3x3 taps dilated 3; 27x27 = 9x9 box, then 3x3 taps dilated 9.
#    Vortex's three pooled maps come out of ONE cascade, 4 adds per pixel per level.
#    Borders: every sum runs on a zero-padded canvas in "valid" mode, so a sum never mixes in
#    values from the other side or from outside the map: the result is exact at every pixel, and
#    dividing by the count of in-map pixels (a separable product of row and column counts)
#    gives the count_include_pad=False mean.
#    Cache: the cascade runs on blocks of channels whose canvas stays in the CPU cache.
#    Backward: a box sum on zero-extended maps is symmetric, so its adjoint is itself; the
#    adjoint of the cascade that produced (S3, S9, S27) is the same cascade run in reverse
#    order with the incoming gradients added in as it passes them (Horner's rule):
#        S3^T g3 + S9^T g9 + S27^T g27 = T1(g3 + T3(g9 + T9(g27)))     (T_d: 3x3 taps dilated d)
#    so the backward pass costs what the forward does.
# ---------------------------------------------------------------------------------------------

CPU_BLOCK_CHANNELS = 256  # 256 channels of a 91x91 float canvas ~ 8 MB: stays in the L3 cache
CONTEXT_BLOCK_CHANNELS = 512  # input channels per pooling + convolution block (ContextModule)


def _cascade_steps(ks):
    """Steps (taps, spacing) that build box sums of the sizes in `ks` one after another.

    `ks` (odd, increasing) must form a divisibility chain (3 | 9 | 27); each k / k_prev is split
    into prime factors, each one tap-sum. Returns (steps, emit) with emit[i] = the k completed
    after step i (or None).
    """
    steps, emit, done = [], [], 1
    for k in ks:
        if k % 2 == 0 or k < 1:
            raise ValueError(f"box_average needs odd k >= 1 (a centred window), got {k}")
        if k % done:
            raise ValueError(f"pool sizes {tuple(ks)} must divide one another (like 3, 9, 27) to "
                             f"share one cascade; call box_average once per size instead")
        n, p = k // done, 3
        while n > 1:
            while n % p == 0:
                steps.append((p, done))
                emit.append(None)
                done, n = done * p, n // p
            p += 2
        if emit:
            emit[-1] = k
    return steps, emit


def _tap_sum(a, taps, spacing, dim, out):
    """out = sum of `taps` slices of `a` along `dim`, `spacing` apart ("valid" mode)."""
    length = out.shape[dim]
    torch.add(a.narrow(dim, 0, length), a.narrow(dim, spacing, length), out=out)
    for j in range(2, taps):
        out.add_(a.narrow(dim, j * spacing, length))
    return out


def _step(a, taps, spacing, work):
    """One cascade level on an (N, C, H', W') canvas: separable taps x taps sum, valid mode.

    Writes into the two preallocated flat buffers `work` (fresh tensors for every add would
    cost page faults and cache misses that, measured, doubled the pooling time on CPU).
    """
    n, c, h, w = a.shape
    s = spacing * (taps - 1)
    along_w = work[0][: n * c * h * (w - s)].view(n, c, h, w - s)
    both = work[1][: n * c * (h - s) * (w - s)].view(n, c, h - s, w - s)
    return _tap_sum(_tap_sum(a, taps, spacing, 3, along_w), taps, spacing, 2, both)


def _inverse_counts(h, w, k, count_include_pad, dtype, device):
    """1 / (number of pixels averaged) at every position: a separable row-count x col-count."""
    if count_include_pad:
        return torch.full((h, w), 1.0 / (k * k), dtype=dtype, device=device)
    r = k // 2

    def counts(n):
        i = torch.arange(n, device=device)
        return (torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1).to(dtype)
    return 1.0 / (counts(h)[:, None] * counts(w)[None, :])


def _blocks(x):
    """Channel blocks to work on: cache-sized on CPU, all channels at once elsewhere."""
    step = CPU_BLOCK_CHANNELS if x.device.type == "cpu" else x.shape[1]
    return [(c, min(c + step, x.shape[1])) for c in range(0, x.shape[1], step)]


def _workspace(x, margin, dtype):
    """Zero canvas for one channel block, `margin` pixels wider than the map on every side,
    and two scratch buffers of the same size for the cascade levels."""
    b0, b1 = _blocks(x)[0]
    n, _, h, w = x.shape
    canvas = x.new_zeros((n, b1 - b0, h + 2 * margin, w + 2 * margin), dtype=dtype)
    return canvas, (torch.empty_like(canvas).view(-1), torch.empty_like(canvas).view(-1))


def _box_averages_forward(x, ks, count_include_pad):
    """Pooled maps for every k in ks (> 1, a divisibility chain), one cascade per channel block."""
    n, c, h, w = x.shape
    steps, emit = _cascade_steps(ks)
    reach = [s * (t - 1) // 2 for t, s in steps]  # how far each level looks, in pixels
    acc = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 cannot hold a 729-term sum
    inv = {k: _inverse_counts(h, w, k, count_include_pad, acc, x.device) for k in ks}
    outs = {k: torch.empty_like(x) for k in ks}
    margin0 = sum(reach)  # the largest window's radius
    canvas, work = _workspace(x, margin0, acc)
    for c0, c1 in _blocks(x):
        a = canvas[:, : c1 - c0]
        a[:, :, margin0:margin0 + h, margin0:margin0 + w] = x[:, c0:c1]  # border stays zero
        margin = margin0
        for i, (taps, spacing) in enumerate(steps):
            a, margin = _step(a, taps, spacing, work), margin - reach[i]
            if emit[i] is not None:  # a now holds k x k sums; divide by the counts
                k = emit[i]
                torch.mul(a[:, :, margin:margin + h, margin:margin + w], inv[k],
                          out=outs[k][:, c0:c1])
    return [outs[k] for k in ks]


def _box_averages_backward(grads, ks, count_include_pad):
    """Adjoint of _box_averages_forward: the same cascade in reverse order (Horner's rule)."""
    ref = next(g for g in grads if g is not None)
    n, c, h, w = ref.shape
    steps, emit = _cascade_steps(ks)
    reach = [s * (t - 1) // 2 for t, s in steps]
    acc = torch.promote_types(ref.dtype, torch.float32)
    inv = {k: _inverse_counts(h, w, k, count_include_pad, acc, ref.device) for k in ks}
    g_of = {k: g for k, g in zip(ks, grads) if g is not None}
    dx = torch.empty_like(ref)
    margin0 = sum(reach)
    canvas, work = _workspace(ref, margin0, acc)
    for c0, c1 in _blocks(ref):
        a, margin = canvas[:, : c1 - c0], margin0
        a[:, :, margin:margin + h, margin:margin + w] = 0
        for i in reversed(range(len(steps))):
            k = emit[i]
            if k in g_of:  # add g_k / count_k where the forward pass emitted S_k
                a[:, :, margin:margin + h, margin:margin + w] += g_of[k][:, c0:c1] * inv[k]
            a, margin = _step(a, *steps[i], work), margin - reach[i]
        dx[:, c0:c1] = a  # margin is 0 here: a is exactly the map
    return dx


class _BoxAverages(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ks, count_include_pad):
        ctx.ks, ctx.cip = ks, count_include_pad
        return tuple(_box_averages_forward(x, ks, count_include_pad))

    @staticmethod
    def backward(ctx, *grads):
        return _box_averages_backward(grads, ctx.ks, ctx.cip), None, None


# The alternative on a GPU: PyTorch's native pooling kernels run separably, a k x 1 average then
# a 1 x k one. Each pass divides by its own count; with count_include_pad=False the 2-D count is
# the product of the row and column counts, so it is the same mean (with True, k * k = k x k).
# Measured on an H100 (`python vortex.py --bench`, README), the cascade is faster there too
# (13.7 vs 25.7 ms forward + backward at 8 x 2048 x 65 x 65, fp32; avg_pool2d: 76.7 ms), so it
# stays the default everywhere; "separable" switches the GPU path.
GPU_POOLING = "cascade"


def _separable_box_average(x, k, count_include_pad):
    r = k // 2
    rows = F.avg_pool2d(x, (k, 1), 1, (r, 0), count_include_pad=count_include_pad)
    return F.avg_pool2d(rows, (1, k), 1, (0, r), count_include_pad=count_include_pad)


def box_averages(x, ks, count_include_pad=False):
    """k x k stride-1 average pooling of `x` (N, C, H, W) for every k in `ks`, sharing one cascade.

    Returns a dict {k: pooled}. k = 1 is the identity. Sizes > 1 must divide one another
    (e.g. Vortex's 3, 9, 27). Exact: equals nn.AvgPool2d(k, 1, k // 2, count_include_pad) at every
    pixel, borders included. Differentiable (the backward is the reversed cascade). On CUDA,
    separable native pooling instead (see GPU_POOLING).
    """
    ks = sorted(set(int(k) for k in ks))
    out = {1: x} if 1 in ks else {}
    big = tuple(k for k in ks if k > 1)
    if big:
        if x.dim() != 4:
            raise ValueError(f"box_average expects (N, C, H, W), got shape {tuple(x.shape)}")
        if x.is_cuda and GPU_POOLING == "separable":
            _cascade_steps(big)  # the same checks of the sizes as everywhere
            out.update((k, _separable_box_average(x, k, count_include_pad)) for k in big)
        else:
            out.update(zip(big, _BoxAverages.apply(x, big, count_include_pad)))
    return out


def box_average(x, k, count_include_pad=False):
    """Exact fast k x k, stride-1, size-preserving average pooling (paper 3.3/3.4); any odd k."""
    return box_averages(x, (k,), count_include_pad)[k]


# ---------------------------------------------------------------------------------------------
# 3. The context modules of Table 1: one class. Each branch i is
#        k_i x k_i average pooling -> kernel_i x kernel_i conv (dilation d_i, 256 ch) -> BN -> ReLU
#    and the modules differ only in (k_i, kernel_i, d_i):
#
#        module             pooling k_i       conv kernels     dilations d_i (OS 8)     paper
#        ASPP               1, 1, 1, 1        1, 3, 3, 3       1, 12, 24, 36            3.1, Fig. 2
#        ASPP+              1, 1, 1, 1        3, 3, 3, 3       1, 12, 24, 36            4.1, Table 1
#        Module A (k)       k, k, k, k        1, 3, 3, 3       1, 12, 24, 36            3.3, Fig. 3a
#        Module B (Vortex)  1, 3, 9, 27       1, 3, 3, 3       1, 3, 9, 27              3.4, Fig. 3b
#        none               1                 1                1                        (ablation)
#
#    At output stride 16 DeepLab v3 halves the ASPP rates to 6, 12, 18; Vortex keeps 1, 3, 9, 27
#    (the paper gives no other setting). Plus the image-level branch of DeepLab v3 (3.1): global
#    average pooling -> 1x1 conv 256 -> BN -> ReLU -> upsample, concatenated with the others
#    (Fig. 4 (ii)); "none" has no image-level branch either, so it has no context at all.
#    Module A pools before all four branches: its 25 sub-regions (3.3) are the 1x1 branch's one
#    plus 3 x 8 off-centre taps; so Module A with k = 1 is ASPP exactly.
# ---------------------------------------------------------------------------------------------


def conv_bn_relu(cin, cout, kernel=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ContextModule(nn.Module):
    """Feature aggregation of paper 3.1-3.4: parallel (pool -> conv) branches + image pooling.

    Built with the named constructors `aspp`, `aspp_plus`, `module_a`, `vortex`, `none`.
    Output: (N, out_channels, h, w), the concatenation of all branches projected by a 1x1 conv.
    State-dict names: branches.i.{0: conv, 1: bn}, image_pool.{0, 1}, project.{0, 1}.
    """

    def __init__(self, in_channels, pools, kernels, dilations, out_channels=256,
                 image_pool=True, dropout=0.1, count_include_pad=False, name="context"):
        super().__init__()
        if not len(pools) == len(kernels) == len(dilations):
            raise ValueError("pools, kernels and dilations need one entry per branch")
        self.name, self.pools = name, tuple(pools)
        self.kernels, self.dilations = tuple(kernels), tuple(dilations)
        self.count_include_pad = count_include_pad
        self.branches = nn.ModuleList(conv_bn_relu(in_channels, out_channels, k, d)
                                      for k, d in zip(kernels, dilations))
        self.image_pool = conv_bn_relu(in_channels, out_channels) if image_pool else None
        n = len(pools) + (1 if image_pool else 0)
        # DeepLab v3's projection of the concatenation. The dropout (drop rate 0.1) is not in
        # the paper; DeepLab's reference code applies it here (keep_prob 0.9) and we follow it.
        self.project = nn.Sequential(*conv_bn_relu(n * out_channels, out_channels),
                                     nn.Dropout(dropout))

    # -- the named constructors: Table 1's rows -------------------------------------------------
    @staticmethod
    def _aspp_rates(output_stride):
        return {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[output_stride]

    @classmethod
    def aspp(cls, in_channels, output_stride=8, **kw):
        """ASPP of DeepLab v3 (paper 3.1, Fig. 2): 1x1 conv + three 3x3 convs, rates 12/24/36."""
        return cls(in_channels, (1, 1, 1, 1), (1, 3, 3, 3), (1,) + cls._aspp_rates(output_stride),
                   name="ASPP", **kw)

    @classmethod
    def aspp_plus(cls, in_channels, output_stride=8, **kw):
        """ASPP+ (paper 4.1, Table 1): ASPP with its 1x1 branch replaced by a 3x3 conv."""
        return cls(in_channels, (1, 1, 1, 1), (3, 3, 3, 3), (1,) + cls._aspp_rates(output_stride),
                   name="ASPP+", **kw)

    @classmethod
    def module_a(cls, in_channels, k=5, output_stride=8, **kw):
        """Module A (paper 3.3, Fig. 3a): k x k average pooling before every ASPP branch."""
        return cls(in_channels, (k,) * 4, (1, 3, 3, 3), (1,) + cls._aspp_rates(output_stride),
                   name=f"A({k})", **kw)

    @classmethod
    def vortex(cls, in_channels, output_stride=8, **kw):
        """Module B, Vortex Pooling (paper 3.4, Fig. 3b): pooling k = 1, 3, 9, 27 before 3x3
        convs dilated 1 (a 1x1 conv: nothing to dilate), 3, 9, 27. Fine near, coarse far."""
        return cls(in_channels, (1, 3, 9, 27), (1, 3, 3, 3), (1, 3, 9, 27), name="Vortex", **kw)

    @classmethod
    def none(cls, in_channels, output_stride=8, **kw):
        """No context (ablation): one 1x1 conv branch, no image-level branch."""
        return cls(in_channels, (1,), (1,), (1,), image_pool=False, name="none", **kw)

    @classmethod
    def image_level(cls, in_channels, output_stride=8, **kw):
        """A control: the 1x1 branch and the image-level branch (3.1) alone, no spatial
        context; what every other module has besides its dilated or pooled branches."""
        return cls(in_channels, (1,), (1,), (1,), name="image-level", **kw)

    # -------------------------------------------------------------------------------------------
    def pooled_inputs(self, x):
        """The k x k average-pooled copies of X that the branches read (one shared cascade)."""
        return box_averages(x, self.pools, self.count_include_pad)

    def branch_convs(self, x):
        """conv_i(pool_{k_i}(X)) for every branch i (before its BN and ReLU).

        Computed over blocks of input channels: a convolution is a sum over its input channels
        and pooling works channel by channel, so sum_b conv_i(pool(X_b), W_i[:, b]) is the same
        thing. A block's pooled maps are small and still in the cache when the convolutions
        read them; pooling all of X first would write three fresh 2048x65x65 copies (100 MB)
        per forward, which measured 20-30% slower than ASPP on CPU instead of ~1.0x.
        """
        step = CONTEXT_BLOCK_CHANNELS if x.device.type == "cpu" else x.shape[1]
        outs = [branch[0](x) if k == 1 else None for k, branch in zip(self.pools, self.branches)]
        if all(k == 1 for k in self.pools):
            return outs
        for c0 in range(0, x.shape[1], step):
            pooled = box_averages(x[:, c0:c0 + step], self.pools, self.count_include_pad)
            for i, (k, branch) in enumerate(zip(self.pools, self.branches)):
                if k > 1:
                    conv = branch[0]
                    y = F.conv2d(pooled[k], conv.weight[:, c0:c0 + step], None, 1, conv.padding,
                                 conv.dilation)
                    outs[i] = y if outs[i] is None else outs[i].add_(y)
        return outs

    def forward(self, x):
        feats = [branch[1:](y) for y, branch in zip(self.branch_convs(x), self.branches)]
        if self.image_pool is not None:
            g = self.image_pool(x.mean(dim=(2, 3), keepdim=True))
            # Bilinear upsampling of a 1x1 map is a constant map: expand is the same, for free.
            feats.append(g.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(feats, dim=1))


CONTEXTS = ("vortex", "aspp", "aspp+", "module_a", "none")


def make_context(context, in_channels, output_stride=8, pool_k=5, **kw):
    """Context module by name: one of CONTEXTS (`pool_k` is Module A's k)."""
    if context == "module_a":
        return ContextModule.module_a(in_channels, pool_k, output_stride, **kw)
    makers = {"vortex": ContextModule.vortex, "aspp": ContextModule.aspp,
              "aspp+": ContextModule.aspp_plus, "none": ContextModule.none}
    if context not in makers:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    return makers[context](in_channels, output_stride, **kw)


# ---------------------------------------------------------------------------------------------
# 4. DeepLab v3 with a swappable context module (paper 3.1, 4.2, Fig. 4):
#    image -> ResNet (X: h x w x c1) -> context module -> 1x1 conv classifier -> bilinear
#    upsampling to the image size. torchvision's DeepLabHead adds a 3x3 conv + BN + ReLU between
#    the context module and the classifier; neither the paper nor DeepLab v3 has it, nor do we.
# ---------------------------------------------------------------------------------------------


class DeepLabV3(nn.Module):
    """DeepLab v3 whose ASPP can be swapped for Module A or Vortex Pooling (Table 1).

    `context` in CONTEXTS; `pool_k` is Module A's k. Forward returns logits (N, classes, H, W)
    at the input's size, for any H, W (also sizes not divisible by the output stride).
    `DeepLabV3(21, 101, "aspp", multi_grid=None)` has the geometry of torchvision's
    `deeplabv3_resnet101` (its ASPP output is the same on the same weights); the paper's model
    (the default) adds multi-grid (1, 2, 4) in layer4 (see ResNet).
    """

    def __init__(self, num_classes, depth=101, context="vortex", output_stride=8, pool_k=5,
                 multi_grid=(1, 2, 4), base_channels=64, context_channels=256, dropout=0.1,
                 count_include_pad=False):
        super().__init__()
        self.config = dict(num_classes=num_classes, depth=depth, context=context,
                           output_stride=output_stride, pool_k=pool_k,
                           multi_grid=None if multi_grid is None else tuple(multi_grid),
                           base_channels=base_channels,
                           context_channels=context_channels, dropout=dropout,
                           count_include_pad=count_include_pad)
        self.backbone = resnet(depth, output_stride, multi_grid, base_channels)
        self.context = make_context(context, self.backbone.out_channels, output_stride, pool_k,
                                    out_channels=context_channels, dropout=dropout,
                                    count_include_pad=count_include_pad)
        self.classifier = nn.Conv2d(context_channels, num_classes, 1)

    def low_res_logits(self, x):
        """Class scores at feature resolution (the input's size / output stride), before the
        bilinear upsampling of Fig. 4 (multi-scale inference resizes these once, eval.py)."""
        return self.classifier(self.context(self.backbone(x)))

    def forward(self, x):
        # align_corners=False (PyTorch's and torchvision's convention). DeepLab's TF code uses
        # align_corners=True with input sizes 8k+1 (513); the difference is a sub-pixel shift.
        return F.interpolate(self.low_res_logits(x), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)


# ---------------------------------------------------------------------------------------------
# 5. Utilization ratio (paper 3.2, Eq. 1):  r = u / (h w), u = number of descriptors of X used
#    to compute one descriptor of the context output (the image-level branch is left out, as in
#    the paper: it sees everything by construction).
#    Analytic: u = size of the union of all branches' footprints on an unbounded map. A branch
#    with pooling k, kernel n and dilation d reads, along each axis, the offsets
#        { d t + o : |t| <= n // 2, |o| <= k // 2 }.
#    For ASPP: 1 + 3*9 taps - 3 repeated centres = 25 (the paper's footnote), r = 25/65^2 = 0.0059.
#    Module A(k): 25 k x k sub-regions, r = 25 k^2/65^2 while they do not overlap.
#    Vortex: the footprints tile an 81 x 81 square, so r = 1 whenever h, w <= 81.
#    Measured: which pixels of a real h x w input change a given output pixel, by autograd. At
#    the borders of a small map taps fall off the map (zero padding) and r drops below the
#    analytic value: at the centre of 65 x 65, ASPP's rate-36 taps all fall outside.
# ---------------------------------------------------------------------------------------------


def footprint(pools, kernels, dilations):
    """Boolean (2R+1) x (2R+1) array: offsets (relative to the centre) that feed one output."""
    axes = [{d * t + o for t in range(-(n // 2), n // 2 + 1) for o in range(-(k // 2), k // 2 + 1)}
            for k, n, d in zip(pools, kernels, dilations)]
    r = max(max(abs(v) for v in a) for a in axes)
    grid = np.zeros((2 * r + 1, 2 * r + 1), dtype=bool)
    for a in axes:
        idx = np.array(sorted(a)) + r
        grid[np.ix_(idx, idx)] = True
    return grid


def ring_coverage(module, max_distance=40):
    """For d = 0..max_distance: the fraction of the 8d offsets at Chebyshev distance d (the one
    offset 0 for d = 0) that the module's footprint reads on an unbounded map (Fig. 3 as a
    curve: where the footprint lands, the module can see)."""
    grid = footprint(module.pools, module.kernels, module.dilations)
    r = grid.shape[0] // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    ring = np.maximum(abs(yy), abs(xx))
    return np.array([grid[ring == d].sum() / max(1, 8 * d) for d in range(max_distance + 1)])


def utilization_ratio(module, h=65, w=65):
    """Paper Eq. (1), analytic: r = min(u, h w) / (h w), u = |footprint| (see above)."""
    u = int(footprint(module.pools, module.kernels, module.dilations).sum())
    return min(u, h * w) / (h * w)


def measured_utilization(module, h=65, w=65, pixel=None, return_map=False):
    """Eq. (1) measured on a real ContextModule: the fraction of the h x w input positions whose
    value changes the branches' output at `pixel` (default: the centre), found by autograd
    through the module's own pooling and convolutions (BN and ReLU are per-pixel and left out,
    since a ReLU that happens to be off would hide a dependency). With return_map, also the
    (h, w) boolean map of those positions (the paper's Fig. 3, drawn from the module)."""
    i, j = pixel if pixel is not None else (h // 2, w // 2)
    module = copy.deepcopy(module).double()
    x = torch.randn(1, module.branches[0][0].in_channels, h, w, dtype=torch.float64,
                    requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    total = 0
    for y in module.branch_convs(x):
        # A random projection of the output channels: exact zeros only where there is no path.
        total = total + (y[0, :, i, j] * torch.rand(y.shape[1], generator=gen,
                                                    dtype=torch.float64)).sum()
    (grad,) = torch.autograd.grad(total, x)
    used = grad[0].abs().amax(dim=0) > 0
    ratio = used.sum().item() / (h * w)
    return (ratio, used.numpy()) if return_map else ratio


# ---------------------------------------------------------------------------------------------
# 6. Pretrained weights from local files (nothing is downloaded).
#    - torchvision ImageNet ResNets (resnet50-0676ba61.pth, resnet101-63fe2227.pth, ...): keys
#      are ours plus fc.*; fc is ignored.
#    - torchvision segmentation checkpoints (deeplabv3_resnet50/101_coco-*.pth: COCO images with
#      the 20 VOC classes, the paper's first training stage, 4.2): backbone.* goes into our
#      backbone; for context="aspp" its ASPP (classifier.0.*) goes into our context module.
#      Its extra 3x3 head conv (classifier.1/2), classifier (classifier.4) and auxiliary head
#      (aux_classifier.*) have no counterpart in the paper's model and are skipped.
# ---------------------------------------------------------------------------------------------


def _torchvision_aspp_name(key):
    """torchvision DeepLabHead ASPP key (after 'classifier.0.') -> our ContextModule key."""
    parts = key.split(".")
    if parts[0] == "convs" and parts[1] == "4":  # ASPPPooling: 0 is the pool, 1 conv, 2 BN
        return ".".join(["image_pool", str(int(parts[2]) - 1)] + parts[3:])
    if parts[0] == "convs":
        return ".".join(["branches"] + parts[1:])
    return key  # project.0 (conv), project.1 (BN)


def _load_checkpoint_dict(path):
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:  # truncated file, not a torch file, pickled code objects...
        first = (str(e).strip().splitlines() or ["empty or unreadable file"])[0]
        raise ValueError(f"cannot read {path} as a weights-only torch checkpoint "
                         f"({type(e).__name__}: {first})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state_dict (a dict of name -> tensor)")
    return sd


def _check_and_load(target, tensors, path, what):
    """Load `tensors` into `target` strictly, or raise one error listing every problem."""
    own = target.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def show(items):
            more = f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
            return ", ".join(items[:8]) + more
        lines = [f"{path} does not fit the {what}:"]
        if missing:
            lines.append(f"  missing from the file ({len(missing)}): {show(missing)}")
        if unexpected:
            lines.append(f"  not in the model ({len(unexpected)}): {show(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {show(shapes)}")
        lines.append("  (expected a torchvision ResNet of the same depth, e.g. "
                     "resnet101-63fe2227.pth for depth 101, or a torchvision "
                     "deeplabv3_resnet*_coco checkpoint)")
        raise ValueError("\n".join(lines))
    target.load_state_dict(tensors, strict=True)


def load_backbone_weights(module, path, verbose=True):
    """Load a torchvision checkpoint from a local file into a ResNet or a DeepLabV3.

    Returns {"loaded": [keys], "skipped": [keys]}, keys named as in the file, and prints a
    summary when verbose. Raises ValueError naming missing/unexpected keys and shape mismatches.
    """
    sd = _load_checkpoint_dict(path)
    backbone = module.backbone if hasattr(module, "backbone") else module
    context = getattr(module, "context", None)
    loaded, skipped = [], []
    if any(k.startswith("backbone.") for k in sd):  # torchvision segmentation checkpoint
        bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        _check_and_load(backbone, bb, path, f"ResNet-{backbone.depth} backbone")
        loaded += ["backbone." + k for k in bb]
        aspp = {k[len("classifier.0."):]: v for k, v in sd.items()
                if k.startswith("classifier.0.")}
        if context is not None and getattr(context, "name", None) == "ASPP" and aspp:
            _check_and_load(context, {_torchvision_aspp_name(k): v for k, v in aspp.items()},
                            path, "ASPP context module")
            loaded += ["classifier.0." + k for k in aspp]
        skipped = [k for k in sd if k not in set(loaded)]
    else:  # ImageNet classification checkpoint
        skipped = [k for k in sd if k.startswith("fc.")]
        bb = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        _check_and_load(backbone, bb, path, f"ResNet-{backbone.depth} backbone")
        loaded = list(bb)
    if verbose:
        groups = sorted({".".join(k.split(".")[:2]) for k in skipped})
        print(f"loaded {len(loaded)} tensors from {path}; skipped {len(skipped)}"
              + (f" ({', '.join(groups)})" if groups else ""))
    return {"loaded": loaded, "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# 7. Command line: the utilization / cost table, and the speed benchmark.
# ---------------------------------------------------------------------------------------------

PAPER_RATIO = {"ASPP": "0.0059", "A(5)": "0.148", "A(9)": "0.479", "Vortex": "1 (h,w<=81)"}


def _time(fn, reps):
    """Best-of-`reps` wall time of fn() after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _side_by_side(fns, reps):
    """Time several functions interleaved (a, b, a, b, ...) so that machine noise hits all."""
    for fn in fns.values():
        fn()
    best = {name: math.inf for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def table_modules(in_channels=2048):
    return [ContextModule.aspp(in_channels), ContextModule.aspp_plus(in_channels),
            ContextModule.module_a(in_channels, 5), ContextModule.module_a(in_channels, 9),
            ContextModule.module_a(in_channels, 13), ContextModule.vortex(in_channels),
            ContextModule.none(in_channels)]


@torch.no_grad()
def print_table(size=65, channels=2048, reps=3):
    """Paper 3.2/Table 1 in numbers: utilization ratios, parameters, forward time."""
    x = torch.randn(1, channels, size, size)
    modules = [m.eval() for m in table_modules(channels)]
    times = _side_by_side({m.name: (lambda m=m: m(x)) for m in modules}, reps)
    print(f"Context modules on X = 1x{channels}x{size}x{size} (ResNet-101 at output stride 8, "
          f"513x513 input), CPU, {torch.get_num_threads()} threads, best of {reps}")
    print(f"{'module':8} {'pooling k':12} {'dilations':12} {'r paper':>11} {'r analytic':>10} "
          f"{'r measured':>10} {'params':>10} {'forward s':>9} {'x ASPP':>7}")
    for m in modules:
        with torch.enable_grad():
            measured = measured_utilization(table_modules(8)[modules.index(m)], size, size)
        print(f"{m.name:8} {','.join(map(str, m.pools)):12} {','.join(map(str, m.dilations)):12} "
              f"{PAPER_RATIO.get(m.name, '-'):>11} {utilization_ratio(m, size, size):10.4f} "
              f"{measured:10.4f} {sum(p.numel() for p in m.parameters()):10,d} "
              f"{times[m.name]:9.3f} {times[m.name] / times['ASPP']:7.2f}")
    print("r analytic: paper Eq. 1 with the footprint counted on an unbounded map; r measured: "
          "autograd on the real module at the centre pixel (taps falling off the map do not count; "
          "measured on an 8-channel copy, the footprint does not depend on width).")


@torch.no_grad()
def bench(reps=5, model_reps=2):
    """The speed targets, as ratios measured side by side in this run."""
    x = torch.randn(1, 2048, 65, 65)
    aspp, vortex = ContextModule.aspp(2048).eval(), ContextModule.vortex(2048).eval()
    t = _side_by_side({"aspp": lambda: aspp(x), "vortex": lambda: vortex(x),
                       "pool": lambda: box_averages(x, (3, 9, 27)),
                       "avg_pool2d": lambda: [F.avg_pool2d(x, k, 1, k // 2,
                                                           count_include_pad=False)
                                              for k in (3, 9, 27)]}, reps)
    print(f"context module, input 1x2048x65x65, best of {reps}, {torch.get_num_threads()} threads:")
    print(f"  ASPP {t['aspp']:.3f} s   Vortex {t['vortex']:.3f} s   "
          f"ratio Vortex/ASPP = {t['vortex'] / t['aspp']:.3f}   (target <= 1.10)")
    print(f"  pooling k=3,9,27: box_averages {t['pool']:.3f} s, avg_pool2d {t['avg_pool2d']:.3f} s"
          f" ({t['avg_pool2d'] / t['pool']:.0f}x slower)")
    img = torch.randn(1, 3, 513, 513)
    models = {c: DeepLabV3(21, 101, c).eval() for c in ("aspp", "vortex")}
    t = _side_by_side({c: (lambda m=m: m(img)) for c, m in models.items()}, model_reps)
    print(f"whole model, DeepLab v3 ResNet-101 OS 8, input 1x3x513x513, best of {model_reps}:")
    print(f"  ASPP {t['aspp']:.2f} s   Vortex {t['vortex']:.2f} s   "
          f"ratio Vortex/ASPP = {t['vortex'] / t['aspp']:.3f}   (target <= 1.03; "
          f"paper: 10.37 vs 10.13 FPS on a GPU = 1.024)")


def bench_cuda(batch=8, reps=20):
    """On a GPU: the pooling of Vortex (k = 3, 9, 27) forward + backward, cascade vs separable
    native pooling vs avg_pool2d, and the context modules forward + backward, Vortex/ASPP, for
    ResNet-101's X at 513 x 513 (batch x 2048 x 65 x 65), fp32 and bf16."""
    global GPU_POOLING
    dev = torch.device("cuda")

    def timed(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps * 1000
    print(f"{torch.cuda.get_device_name(dev)}, X = {batch}x2048x65x65, forward + backward, "
          f"mean of {reps} after 3 warm-up, ms:")
    saved = GPU_POOLING
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(batch, 2048, 65, 65, device=dev, dtype=dtype, requires_grad=True)

        def pool(method):
            def run():
                global GPU_POOLING
                GPU_POOLING = method
                if method == "avg_pool2d":
                    outs = [F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
                            for k in (3, 9, 27)]
                else:
                    outs = list(box_averages(x, (3, 9, 27)).values())
                sum(o.float().sum() for o in outs).backward()
            return run
        t = {m: timed(pool(m)) for m in ("cascade", "separable", "avg_pool2d")}
        mods = {c: ContextModule.vortex(2048) if c == "vortex" else ContextModule.aspp(2048)
                for c in ("vortex", "aspp")}
        ctx = {}
        for method in ("cascade", "separable"):
            for c, m in mods.items():
                m.to(dev)

                def run(m=m):
                    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                        m(x.detach().float()).float().sum().backward()
                GPU_POOLING = method
                ctx[method, c] = timed(run)
        print(f"  {str(dtype).split('.')[1]:9} pooling: cascade {t['cascade']:.2f}, separable "
              f"{t['separable']:.2f}, avg_pool2d {t['avg_pool2d']:.2f};  context module: ASPP "
              f"{ctx['cascade', 'aspp']:.2f}, Vortex with cascade {ctx['cascade', 'vortex']:.2f} "
              f"({ctx['cascade', 'vortex'] / ctx['cascade', 'aspp']:.3f}x), with separable "
              f"{ctx['separable', 'vortex']:.2f} "
              f"({ctx['separable', 'vortex'] / ctx['separable', 'aspp']:.3f}x)")
    GPU_POOLING = saved


BRANCH_COLOURS = ((200, 30, 30), (240, 150, 20), (40, 110, 200), (60, 160, 60))


def draw_footprints(path, size=65, cell=4):
    """The paper's Fig. 3 drawn from the real modules: for ASPP, Module A(5) and Module B, the
    input positions of a size x size map that feed the centre output (autograd, see
    measured_utilization), coloured by the branch that reads them (the finest drawn on top),
    white where nothing reads, the output pixel black; a legend under each panel. Written
    atomically."""
    import tempfile
    from PIL import Image, ImageDraw
    mods = [ContextModule.aspp(8), ContextModule.module_a(8, 5), ContextModule.vortex(8)]
    panels = []
    for m in mods:
        ratio, used = measured_utilization(m, size, size, return_map=True)
        pic = np.full((size, size, 3), 255, np.uint8)
        widest_first = sorted(range(len(m.pools)), key=lambda i: -m.pools[i] - m.dilations[i])
        for i in widest_first:
            fp = footprint(m.pools[i:i + 1], m.kernels[i:i + 1], m.dilations[i:i + 1])
            r, c = fp.shape[0] // 2, size // 2  # footprint centred on the centre pixel
            a, b = max(0, c - r), min(size, c + r + 1)
            region = np.zeros((size, size), bool)
            region[a:b, a:b] = fp[a - (c - r):b - (c - r), a - (c - r):b - (c - r)]
            pic[region & used] = BRANCH_COLOURS[i]
        pic[size // 2, size // 2] = 0
        pic = np.kron(pic, np.ones((cell, cell, 1), np.uint8))
        text = Image.new("RGB", (pic.shape[1], 14 + 14 * len(m.pools)), (255, 255, 255))
        draw = ImageDraw.Draw(text)
        draw.text((2, 1), f"{m.name}: r = {ratio:.4f} of the {size}x{size} map", fill=(0, 0, 0))
        for i, (k, n, d) in enumerate(zip(m.pools, m.kernels, m.dilations)):
            y = 15 + 14 * i
            draw.rectangle([4, y + 1, 14, y + 11], fill=BRANCH_COLOURS[i], outline=(0, 0, 0))
            draw.text((20, y), f"{k}x{k} pool, {n}x{n} conv" + (f", rate {d}" if n > 1 else ""),
                      fill=(0, 0, 0))
        panels.append(np.concatenate([pic, np.asarray(text)], 0))
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255)
              for p in panels]
    gap = np.full((height, 8, 3), 255, np.uint8)
    out = np.concatenate([x for p in panels for x in (p, gap)][:-1], 1)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".png")
    os.close(fd)
    Image.fromarray(out).save(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Vortex Pooling (Xie et al. 2018): the context modules of Table 1 in numbers. "
                    "With no flags: a table of utilization ratios (paper Eq. 1), parameter counts "
                    "and forward times of ASPP, ASPP+, Module A(5/9/13), Module B (Vortex), none.")
    p.add_argument("--bench", action="store_true",
                   help="measure instead the speed ratios Vortex/ASPP for the context module "
                        "(1x2048x65x65) and the whole ResNet-101 model (1x3x513x513), side by "
                        "side, on the CPU; with a GPU also the pooling methods and the context "
                        "modules there (forward + backward)")
    p.add_argument("--size", type=int, default=65,
                   help="feature-map side h = w for the table (65: a 513x513 image at OS 8)")
    p.add_argument("--reps", type=int, default=3, help="timing repetitions (best one is kept)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--force", action="store_true", help="with --figure: overwrite the PNG")
    p.add_argument("--figure", metavar="PNG", default=None,
                   help="instead: draw the paper's Fig. 3 from the real modules (which positions "
                        "of a 65x65 map feed the centre pixel, for ASPP, A(5), Vortex) to PNG")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.figure:
        if os.path.exists(args.figure) and not args.force:
            p.error(f"{args.figure} exists; pass --force to overwrite it")
        print("wrote", draw_footprints(args.figure, args.size))
    elif args.bench:
        if torch.cuda.is_available():
            bench_cuda()
        bench(reps=max(args.reps, 3))
    else:
        print_table(args.size, reps=args.reps)


if __name__ == "__main__":
    main()
