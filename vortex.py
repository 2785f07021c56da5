"""Vortex Pooling, read next to the paper: the model.

Xie, Zhou, Wu, "Vortex Pooling: Improving Context Representation in Semantic Segmentation" (2018).

Part I, the paper, in its order (read it without opening Part II):
  ResNet with output stride 8 and multi-grid ............ paper 3.1, 4.1 "Multi-grid"
  Utilization ratio, analytic and measured ............... 3.2, Eq. (1)
  ContextModule: ASPP, ASPP+, Module A, Vortex ........... 3.1, 3.3, 3.4, Fig. 2-3, Table 1
  DeepLabV3: backbone -> context module -> classifier .... 3.1, Fig. 4 (it needs the modules)
Part II, the engineering the paper does not describe: box_averages (the pooling of 3.3 / 3.4,
exact and fast), memory reuse on the CPU, loading torchvision weights from local files.
"""
import ctypes
from collections import namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# =============================================================================================
# PART I: THE PAPER
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 3.1: "Given a H x W x 3 color image I as input, DeepLab v3 feeds it to the feature net (e.g.,
# ResNet-101) to get the feature map X ... X is in size of h x w x c1. For the best model ... H
# and W are about 8 times larger than h and w." 4.1 "Multi-grid": "For the three bottleneck
# blocks in block4 of ResNet, Chen et al. [2017b] multiplied the dilation rate by (1, 2, 4)."
# ResNet (He et al. 2016) with torchvision's module names and layout (README, departures), so
# that its ImageNet checkpoints (e.g. resnet101-63fe2227.pth) load with no key surgery.

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

    Output stride (4.1): a stride-2 stage that would pass `output_stride` runs at stride 1 and
    dilates instead, so every filter sees the pixels it was trained on: the strided conv keeps its
    rate r (a stride-2 conv is a stride-1 conv, then subsampling), every later conv needs 2r
    (torchvision's replace_stride_with_dilation). Per-block rates of the 3x3 convs (ResNet-50+):

        output     layer3                 layer4, multi_grid=None   layer4, multi_grid=(1, 2, 4)
        stride     (first, rest)          (torchvision's geometry)  (paper 4.1, the default)
        32         stride 2: 1, 1         stride 2: 1, 1, 1         1, 2, 4
        16         stride 2: 1, 1         stride 1: 1, 2, 2         2, 4, 8
         8         stride 1: 1, 2         stride 1: 2, 4, 4         4, 8, 16

    Multi-grid (4.1, after DeepLab v3): block i of layer4 uses the stage's rate x multi_grid[i]
    (mmsegmentation uses the entries as the rates). `multi_grid=None`: torchvision's, exactly.
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
            first = rate  # the strided conv keeps its rate either way
            if stride < output_stride:  # keep the stride
                s, stride = 2, stride * 2
            else:  # trade it for dilation: the convs after the strided one double their rate
                s, rate = 1, rate * 2
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


# ---------------------------------------------------------------------------------------------
# 3.2: "ASPP uses 25 descriptors in X when computing each new feature descriptor ... We define
# the utilization ratio as follows: r = u / (hw) (1) where u is the number of descriptors we
# used to aggregate each new descriptor." Counted over a module's branches (pools k, kernels n,
# dilations d), not its image-level branch, which sees everything (the paper leaves it out too).
# Analytic: u = the union of the branches' footprints on an unbounded map. ASPP: 1 + 3*9 taps - 3
# repeated centres = 25 (the paper's footnote); Vortex tiles 81 x 81, so r = 1 for h, w <= 81.
# Measured on a real map (autograd), taps off the map read zero padding: r drops.

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

def utilization_ratio(module, h=65, w=65):
    """Paper Eq. (1), analytic: r = min(u, h w) / (h w), u = |footprint| (see above)."""
    u = int(footprint(module.pools, module.kernels, module.dilations).sum())
    return min(u, h * w) / (h * w)

def measured_utilization(module, h=65, w=65, pixel=None, return_map=False):
    """Eq. (1) on a real ContextModule: the fraction of the h x w inputs that change the branches'
    output at `pixel` (default: the centre), by autograd through pooling and convolutions (not BN
    and ReLU: an inactive ReLU would hide a dependency). return_map: also that map (Fig. 3)."""
    i, j = pixel if pixel is not None else (h // 2, w // 2)
    x = torch.randn(1, module.branches[0][0].in_channels, h, w, dtype=torch.float64,
                    requires_grad=True)
    pooled = module.pool(x)  # the module's own pooling, as its forward pools
    gen = torch.Generator().manual_seed(0)
    total = 0
    for k, branch in zip(module.pools, module.branches):
        conv = branch[0]
        y = F.conv2d(pooled[k], conv.weight.double(), None, 1, conv.padding, conv.dilation)
        # A random projection of the output channels: exact zeros only where there is no path.
        total = total + (y[0, :, i, j] * torch.rand(y.shape[1], generator=gen,
                                                    dtype=torch.float64)).sum()
    (grad,) = torch.autograd.grad(total, x)
    used = grad[0].abs().amax(dim=0) > 0
    ratio = used.sum().item() / (h * w)
    return (ratio, used.numpy()) if return_map else ratio


# ---------------------------------------------------------------------------------------------
# 3.1: "[ASPP] is composed by a 1 x 1 convolution and three 3 x 3 convolutions with dilation
# rates equal to (12, 24, 36)". 3.3: "We first take each k x k square region in X as our
# subregion ... we use average pooling ... After applying pooling operation, we use four
# convolution layers with different dilation rates". 3.4: "we use small k for the subregions
# near from the given pixel ... large k [far away] ... The k values for the four convolution
# layers in Module B are set to (1, 3, 9, 27)".
# Table 1's context modules, one class: branch i is k_i x k_i average pooling -> conv (kernel_i,
# dilation d_i, 256 channels) -> BN -> ReLU; the modules differ only in (k_i, kernel_i, d_i):
#     module             pooling k_i       conv kernels     dilations d_i (OS 8)     paper
#     ASPP               1, 1, 1, 1        1, 3, 3, 3       1, 12, 24, 36            3.1, Fig. 2
#     ASPP+              1, 1, 1, 1        3, 3, 3, 3       1, 12, 24, 36            4.1, Table 1
#     Module A (k)       k, k, k, k        1, 3, 3, 3       1, 12, 24, 36            3.3, Fig. 3a
#     Module B (Vortex)  1, 3, 9, 27       1, 3, 3, 3       1, 3, 9, 27              3.4, Fig. 3b
# Plus DeepLab v3's image-level branch (3.1, in forward) and a 1x1 projection (Fig. 4 (ii)). Module
# A's 25 sub-regions (3.3) are the 1x1 branch's one plus 3 x 8 off-centre taps: A(1) is ASPP.
# The pooling: k x k windows at stride 1, size kept, averaging only the pixels on the map
# (count_include_pad=False; README); computed by box_averages (Part II), tested equal, faster.

def average_pool(x, k, count_include_pad=False):
    """3.3: the mean of each k x k square region of X around every descriptor (stride 1)."""
    return x if k == 1 else F.avg_pool2d(x, k, 1, k // 2, count_include_pad=count_include_pad)

def conv_bn_relu(cin, cout, kernel=1, dilation=1):
    pad = dilation * (kernel // 2)  # keeps the map size
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

class ContextModule(nn.Module):
    """Feature aggregation of paper 3.1-3.4: parallel (pool -> conv) branches + image pooling.
    State-dict names: branches.i.{0: conv, 1: bn}, image_pool.{0, 1}, project.{0, 1}."""

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
        # DeepLab v3's projection of the concatenation; its dropout is DeepLab's code, not the paper
        self.project = nn.Sequential(*conv_bn_relu(n * out_channels, out_channels),
                                     nn.Dropout(dropout))

    def pool(self, x):
        """3.3 / 3.4: {k: average_pool(x, k)} for each branch's k, by the fast box_averages."""
        return box_averages(x, self.pools, self.count_include_pad)

    def forward(self, x):
        pooled = self.pool(x)  # 3.3 / 3.4: every branch reads X pooled over its own windows
        # 3.1: each branch convolves its pooled map (dilated), then BN and ReLU
        feats = [branch(pooled[k]) for k, branch in zip(self.pools, self.branches)]
        if self.image_pool is not None:  # 3.1: the image-level feature Y_g
            g = self.image_pool(x.mean(dim=(2, 3), keepdim=True))
            feats.append(g.expand(-1, -1, *x.shape[2:]))  # bilinear upsampling of 1x1 = a copy
        # 3.1 / Fig. 4: concatenate, project with a 1x1 conv
        return self.project(torch.cat(feats, dim=1))

    # -- the named constructors: Table 1's rows ------------------------------------------------
    # DeepLab v3 halves the ASPP rates at output stride 16; Vortex keeps its own (paper: OS 8 only)
    ASPP_DILATIONS = {8: (1, 12, 24, 36), 16: (1, 6, 12, 18), 32: (1, 3, 6, 9)}

    @classmethod
    def aspp(cls, in_channels, output_stride=8, **kw):
        """ASPP of DeepLab v3 (paper 3.1, Fig. 2): 1x1 conv + three 3x3 convs, rates 12/24/36."""
        return cls(in_channels, (1, 1, 1, 1), (1, 3, 3, 3), cls.ASPP_DILATIONS[output_stride],
                   name="ASPP", **kw)

    @classmethod
    def aspp_plus(cls, in_channels, output_stride=8, **kw):
        """ASPP+ (paper 4.1, Table 1): ASPP with its 1x1 branch replaced by a 3x3 conv."""
        return cls(in_channels, (1, 1, 1, 1), (3, 3, 3, 3), cls.ASPP_DILATIONS[output_stride],
                   name="ASPP+", **kw)

    @classmethod
    def module_a(cls, in_channels, k=5, output_stride=8, **kw):
        """Module A (paper 3.3, Fig. 3a): k x k average pooling before every ASPP branch."""
        return cls(in_channels, (k,) * 4, (1, 3, 3, 3), cls.ASPP_DILATIONS[output_stride],
                   name=f"A({k})", **kw)

    @classmethod
    def vortex(cls, in_channels, output_stride=8, **kw):
        """Module B, Vortex Pooling (3.4, Fig. 3b): pools k = 1, 3, 9, 27, convs dilated alike."""
        return cls(in_channels, (1, 3, 9, 27), (1, 3, 3, 3), (1, 3, 9, 27), name="Vortex", **kw)

    @classmethod
    def none(cls, in_channels, output_stride=8, **kw):
        """A control (no context): one 1x1 conv branch, no image-level branch."""
        return cls(in_channels, (1,), (1,), (1,), image_pool=False, name="none", **kw)

    @classmethod
    def image_level(cls, in_channels, output_stride=8, **kw):
        """A control: the 1x1 and image-level branches (3.1) that every other module also has."""
        return cls(in_channels, (1,), (1,), (1,), name="image-level", **kw)

# The --context names of train.py and of checkpoints -> constructors.
CONSTRUCTORS = {"vortex": ContextModule.vortex, "aspp": ContextModule.aspp,
                "aspp+": ContextModule.aspp_plus, "module_a": ContextModule.module_a,
                "none": ContextModule.none, "image-level": ContextModule.image_level}
CONTEXTS = tuple(CONSTRUCTORS)

# Table 1, defined once (experiments.py's row lists read it; "none" and "image-level" are our
# controls). A row: --context, Module A's k (--pool-k; 5 if no Module A), the paper's mIoU on
# VOC 2012 val (ResNet-50) and the utilization ratio the paper gives (3.2, 3.3, 4.1).
Row = namedtuple("Row", ["context", "k", "miou", "ratio"])
TABLE1 = {"none": Row("none", 5, None, None),
          "image-level": Row("image-level", 5, None, None),
          "ASPP": Row("aspp", 5, 75.4, "0.0059"),
          "ASPP+": Row("aspp+", 5, 75.6, None),
          "A(5)": Row("module_a", 5, 76.1, "0.148"),
          "A(9)": Row("module_a", 9, 75.6, "0.479"),
          "A(13)": Row("module_a", 13, 75.8, None),
          "Vortex": Row("vortex", 5, 76.6, "1 (h,w<=81)")}

def make_context(context, in_channels, output_stride=8, pool_k=5, **kw):
    """A context module by its --context name (`pool_k` is Module A's k)."""
    if context not in CONSTRUCTORS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    if context == "module_a":
        kw["k"] = pool_k
    return CONSTRUCTORS[context](in_channels, output_stride=output_stride, **kw)

def table1_module(row, in_channels, output_stride=8, **kw):
    """A row of TABLE1, by its name, as a ContextModule."""
    return make_context(TABLE1[row].context, in_channels, output_stride, TABLE1[row].k, **kw)


# ---------------------------------------------------------------------------------------------
# 3.1: "Yaspp and Yg are concatenated and feeded to another 1 x 1 convolution layer and bilinear
# upsampling layer to get the final prediction." 4.2 / Fig. 4: "we extract the convolution
# feature maps, and use our Vortex Pooling for feature encoding ... we also use a global average
# pooling ... Then a 1 x 1 convolution layer is applied to get the final prediction."
# image -> ResNet (X) -> context module -> 1x1 conv classifier -> bilinear upsampling. No 3x3
# conv + BN + ReLU before the classifier (torchvision's DeepLabHead has one, the paper does not).

class DeepLabV3(nn.Module):
    """DeepLab v3 whose ASPP can be swapped for Module A (k: `pool_k`) or Vortex Pooling (Table 1);
    forward gives logits at the input's size. `DeepLabV3(21, 101, "aspp", multi_grid=None)` has
    torchvision's `deeplabv3_resnet101` geometry (the same ASPP output on the same weights); the
    paper's model adds multi-grid (the default)."""

    def __init__(self, num_classes, depth=101, context="vortex", output_stride=8, pool_k=5,
                 multi_grid=(1, 2, 4), base_channels=64, context_channels=256, dropout=0.1,
                 count_include_pad=False):
        super().__init__()
        self.config = dict(num_classes=num_classes, depth=depth, context=context,
                           output_stride=output_stride, pool_k=pool_k,
                           multi_grid=None if multi_grid is None else tuple(multi_grid),
                           base_channels=base_channels, context_channels=context_channels,
                           dropout=dropout, count_include_pad=count_include_pad)
        self.backbone = ResNet(depth, output_stride, multi_grid, base_channels)
        self.context = make_context(context, self.backbone.out_channels, output_stride, pool_k,
                                    out_channels=context_channels, dropout=dropout,
                                    count_include_pad=count_include_pad)
        self.classifier = nn.Conv2d(context_channels, num_classes, 1)

    def low_res_logits(self, x):
        """Class scores at feature resolution (the input's size / output stride), before the
        bilinear upsampling of Fig. 4 (multi-scale inference resizes these once, eval.py)."""
        return self.classifier(self.context(self.backbone(x)))

    def forward(self, x):
        # align_corners=False, PyTorch's convention (DeepLab's TF code: True; README, departures)
        return F.interpolate(self.low_res_logits(x), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)


# =============================================================================================
# PART II: ENGINEERING THE PAPER DOES NOT DESCRIBE
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# box_averages: average_pool (Part I) for several k at once, exact and fast (avg_pool2d's k^2
# adds a pixel make Vortex's pooling cost 3x ASPP's convolutions on a CPU). A box sum is separable
# (along W, then H), and an (a*b)-tap sum is an a-tap sum, then a b-tap sum with taps a apart:
# 27x27 = 9x9, then 3x3 dilated 9; ONE cascade, on a zero-padded canvas (README). Backward: a box
# sum is its own adjoint, so the cascade's adjoint is the cascade reversed, adding the incoming
# gradients as it goes (Horner): S3'g3 + S9'g9 + S27'g27 = T1(g3 + T3(g9 + T9(g27))).

CPU_BLOCK_CHANNELS = 256  # 256 channels of a 91x91 float canvas ~ 8 MB: stays in the L3 cache

def _step(a, taps, spacing, work):
    """One cascade level: a separable taps x taps sum ("valid" mode), along W into work[0], then
    along H into work[1] (fresh tensors per add, measured, doubled the CPU time: page faults)."""
    for dim, buf in ((3, work[0]), (2, work[1])):
        shape = list(a.shape)
        shape[dim] -= spacing * (taps - 1)
        out = buf[: torch.Size(shape).numel()].view(shape)
        torch.add(a.narrow(dim, 0, shape[dim]), a.narrow(dim, spacing, shape[dim]), out=out)
        for j in range(2, taps):
            out.add_(a.narrow(dim, j * spacing, shape[dim]))
        a = out
    return a

def _plan(ref, ks, count_include_pad):
    """What both directions share: steps (taps, spacing, reach), a step per prime factor of
    k / k_prev (ks odd, each dividing the next), each leaving sums of size taps * spacing on a
    canvas `reach` pixels smaller a side; inv: 1 / (pixels averaged) per k; blocks of channels;
    a zero canvas `margin` (the largest radius) wider than the map a side, two scratch buffers."""
    steps, done = [], 1
    for k in ks:
        if k % 2 == 0 or k < 1:
            raise ValueError(f"box_averages needs odd k >= 1 (a centred window), got {k}")
        if k % done:
            raise ValueError(f"pool sizes {tuple(ks)} must divide one another (like 3, 9, 27) to "
                             f"share one cascade; call box_averages once per size instead")
        n, p = k // done, 3
        while n > 1:
            while n % p == 0:
                steps.append((p, done, done * (p - 1) // 2))
                done, n = done * p, n // p
            p += 2
    n, c, h, w = ref.shape
    acc = torch.promote_types(ref.dtype, torch.float32)  # bf16/fp16 cannot hold a 729-term sum

    def counts(m, k):  # along one axis of length m: how many of a window's k pixels are on it
        i = torch.arange(m, device=ref.device)
        return (torch.clamp(i + k // 2, max=m - 1) - torch.clamp(i - k // 2, min=0) + 1).to(acc)
    inv = {k: torch.full((h, w), 1.0 / (k * k), dtype=acc, device=ref.device) if count_include_pad
           else 1.0 / (counts(h, k)[:, None] * counts(w, k)[None, :]) for k in ks}
    step = CPU_BLOCK_CHANNELS if ref.device.type == "cpu" else c
    blocks = [(c0, min(c0 + step, c)) for c0 in range(0, c, step)]
    margin = sum(reach for _, _, reach in steps)
    canvas = ref.new_zeros((n, blocks[0][1], h + 2 * margin, w + 2 * margin), dtype=acc)
    work = (torch.empty_like(canvas).view(-1), torch.empty_like(canvas).view(-1))
    return steps, inv, blocks, canvas, work, margin

class _BoxAverages(torch.autograd.Function):
    """The cascade for ks (> 1, a divisibility chain), per channel block, and its adjoint."""

    @staticmethod
    def forward(ctx, x, ks, count_include_pad):
        ctx.ks, ctx.cip = ks, count_include_pad
        h, w = x.shape[2:]
        steps, inv, blocks, canvas, work, margin0 = _plan(x, ks, count_include_pad)
        outs = {k: torch.empty_like(x) for k in ks}
        for c0, c1 in blocks:
            a, margin = canvas[:, : c1 - c0], margin0
            a[:, :, margin:margin + h, margin:margin + w] = x[:, c0:c1]  # border stays zero
            for taps, spacing, reach in steps:
                a, margin, k = _step(a, taps, spacing, work), margin - reach, taps * spacing
                if k in outs:  # a now holds k x k sums; divide by the counts
                    torch.mul(a[:, :, margin:margin + h, margin:margin + w], inv[k],
                              out=outs[k][:, c0:c1])
        return tuple(outs[k] for k in ks)

    @staticmethod
    def backward(ctx, *grads):
        ref = next(g for g in grads if g is not None)
        h, w = ref.shape[2:]
        steps, inv, blocks, canvas, work, margin0 = _plan(ref, ctx.ks, ctx.cip)
        g_of = {k: g for k, g in zip(ctx.ks, grads) if g is not None}
        dx = torch.empty_like(ref)
        for c0, c1 in blocks:
            a, margin = canvas[:, : c1 - c0], margin0
            a[:, :, margin:margin + h, margin:margin + w] = 0
            for taps, spacing, reach in reversed(steps):
                k = taps * spacing
                if k in g_of:  # add g_k / count_k where the forward pass emitted S_k
                    a[:, :, margin:margin + h, margin:margin + w] += g_of[k][:, c0:c1] * inv[k]
                a, margin = _step(a, taps, spacing, work), margin - reach
            dx[:, c0:c1] = a  # margin is 0 here: a is exactly the map
        return dx, None, None

def box_averages(x, ks, count_include_pad=False):
    """{k: k x k stride-1 average pooling of `x` (N, C, H, W)} for every k in `ks` (1: x itself),
    one cascade for the sizes > 1, which must divide one another (Vortex's 3, 9, 27). Equals
    nn.AvgPool2d(k, 1, k // 2, count_include_pad) at every pixel (borders too); differentiable."""
    ks = sorted(set(int(k) for k in ks))
    out = {1: x} if 1 in ks else {}
    big = tuple(k for k in ks if k > 1)
    if big:
        if x.dim() != 4:
            raise ValueError(f"box_averages expects (N, C, H, W), got shape {tuple(x.shape)}")
        out.update(zip(big, _BoxAverages.apply(x, big, count_include_pad)))
    return out

def keep_freed_memory():
    """Make glibc keep freed memory for reuse (no mmap for large blocks, no heap trimming), not
    page-fault every large map in again (README, "Fast, exact average pooling"). Process-wide,
    inherited by loader workers; False (nothing done) if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold,
                                                                         2 ** 31 - 1))
    except (OSError, AttributeError):
        return False

def _torchvision_aspp_name(key):
    """torchvision DeepLabHead ASPP key (after 'classifier.0.') -> our ContextModule key."""
    parts = key.split(".")
    if parts[:2] == ["convs", "4"]:  # ASPPPooling: 0 is the pool, 1 conv, 2 BN
        return ".".join(["image_pool", str(int(parts[2]) - 1)] + parts[3:])
    return key.replace("convs.", "branches.", 1)  # project.0 (conv), .1 (BN) keep their names

def _check_and_load(target, tensors, path, what):
    """Load `tensors` into `target` strictly, or raise one error listing every problem."""
    own = target.state_dict()
    problems = {"missing from the file": sorted(set(own) - set(tensors)),
                "not in the model": sorted(set(tensors) - set(own)),
                "shape mismatches": [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                                     for k, v in sorted(tensors.items())
                                     if k in own and v.shape != own[k].shape]}
    if any(problems.values()):
        lines = [f"{path} does not fit the {what}:"]
        lines += [f"  {label} ({len(items)}): {', '.join(items[:8])}"
                  + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")
                  for label, items in problems.items() if items]
        lines.append("  (expected a torchvision ResNet of the same depth, e.g. "
                     "resnet101-63fe2227.pth for depth 101, or a torchvision "
                     "deeplabv3_resnet*_coco checkpoint)")
        raise ValueError("\n".join(lines))
    target.load_state_dict(tensors, strict=True)

def load_backbone_weights(module, sd, path="the weights", verbose=True):
    """Load a torchvision state dict `sd` (read from `path` by infra.load_pretrained) into a ResNet
    or a DeepLabV3: an ImageNet ResNet's (our keys plus fc.*) or a deeplabv3_resnet*_coco-*
    checkpoint's (4.2's first stage; its ASPP fits "aspp"). Returns {"loaded", "skipped"} (the
    file's keys); a ValueError lists every key that does not fit."""
    backbone = module.backbone if hasattr(module, "backbone") else module
    context = getattr(module, "context", None)
    segmentation = any(k.startswith("backbone.") for k in sd)  # else an ImageNet classifier
    if segmentation:
        bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    else:
        bb = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    _check_and_load(backbone, bb, path, f"ResNet-{backbone.depth} backbone")
    loaded = ["backbone." + k for k in bb] if segmentation else list(bb)
    aspp = {k[len("classifier.0."):]: v for k, v in sd.items() if k.startswith("classifier.0.")}
    if segmentation and aspp and getattr(context, "name", None) == "ASPP":
        _check_and_load(context, {_torchvision_aspp_name(k): v for k, v in aspp.items()},
                        path, "ASPP context module")
        loaded += ["classifier.0." + k for k in aspp]
    skipped = [k for k in sd if k not in set(loaded)]
    if verbose:
        groups = sorted({".".join(k.split(".")[:2]) for k in skipped})
        print(f"loaded {len(loaded)} tensors from {path}; skipped {len(skipped)}"
              + (f" ({', '.join(groups)})" if groups else ""))
    return {"loaded": loaded, "skipped": skipped}
