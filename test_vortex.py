"""Tests for the Vortex Pooling reimplementation: `python -m pytest -q`.

Property-based (hypothesis) where a property exists; tiny channel widths where the property does
not depend on width, so that the suite runs in a few minutes on 2 CPU cores.
"""
import contextlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vortex
from vortex import (ContextModule, DeepLabV3, box_average, box_averages, footprint,
                    load_backbone_weights, measured_utilization, resnet, utilization_ratio)

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

torch.set_num_threads(min(2, torch.get_num_threads()))


# ----------------------------------------------------------------------------- ResNet / shapes

@settings(max_examples=12)
@given(depth=st.sampled_from([18, 34, 50, 101]), os_=st.sampled_from([8, 16, 32]),
       h=st.integers(17, 70), w=st.integers(17, 70))
def test_backbone_stride_and_model_output_size(depth, os_, h, w):
    torch.manual_seed(0)
    net = resnet(depth, output_stride=os_, base_channels=4).eval()
    with torch.no_grad():
        feat = net(torch.randn(1, 3, h, w))
    # every stride-2 stage maps n -> ceil(n / 2), so the features are ceil(n / os) in size
    assert feat.shape == (1, net.out_channels, math.ceil(h / os_), math.ceil(w / os_))
    model = DeepLabV3(5, depth=depth, context="vortex", output_stride=os_, base_channels=4,
                      context_channels=8).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, h, w)).shape == (2, 5, h, w)


@pytest.mark.parametrize("os_,layer3,layer4", [(8, 2, (4, 8, 16)), (16, 1, (2, 4, 8)),
                                               (32, 1, (1, 2, 4))])
def test_multigrid_dilations_are_those_of_paper_4_1(os_, layer3, layer4):
    net = resnet(101, output_stride=os_, base_channels=4)
    assert net.block_dilations["layer4"] == layer4
    assert net.block_dilations["layer3"] == (layer3,) * 23
    assert tuple(b.conv2.dilation[0] for b in net.layer4) == layer4
    assert all(b.conv2.dilation[0] == b.conv2.padding[0] == layer3 for b in net.layer3)


def torchvision_resnet_shapes(depth):
    """Key -> shape of torchvision's ResNet-50/101/152 state_dict, written from its naming rules."""
    counts = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}[depth]
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,),
                       f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
                       f"{prefix}.num_batches_tracked": ()})
    bn("bn1", 64)
    cin = 64
    for li, n in enumerate(counts, start=1):
        planes = 64 * 2 ** (li - 1)
        for b in range(n):
            p = f"layer{li}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, cin, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, cin, 1, 1)
                bn(f"{p}.downsample.1", 4 * planes)
            cin = 4 * planes
    shapes.update({"fc.weight": (1000, 2048), "fc.bias": (1000,)})
    return shapes


@pytest.mark.parametrize("depth,entries", [(50, 320), (101, 626)])
def test_state_dict_is_torchvision_minus_fc(depth, entries):
    expected = torchvision_resnet_shapes(depth)
    assert len(expected) == entries  # 626 for ResNet-101, fc included (torchvision's count)
    own = {k: tuple(v.shape) for k, v in resnet(depth).state_dict().items()}
    assert own == {k: v for k, v in expected.items() if not k.startswith("fc.")}


def reference_resnet_forward(sd, x, counts):
    """torchvision's ResNet (v1.5: stride on the 3x3 conv) written out functionally from a state
    dict: an independent definition to compare our module against."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"],
                            sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5)
    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for li, n in enumerate(counts, start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            stride = 2 if (b == 0 and li > 1) else 1
            out = F.relu(bn(F.conv2d(x, sd[p + ".conv1.weight"]), p + ".bn1"))
            out = F.relu(bn(F.conv2d(out, sd[p + ".conv2.weight"], stride=stride, padding=1),
                            p + ".bn2"))
            out = bn(F.conv2d(out, sd[p + ".conv3.weight"]), p + ".bn3")
            idt = x
            if p + ".downsample.0.weight" in sd:
                idt = bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride),
                         p + ".downsample.1")
            x = F.relu(out + idt)
    return x


def randomize_bn_stats(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def test_output_stride_32_without_multigrid_is_torchvision_resnet():
    torch.manual_seed(0)
    net = resnet(50, output_stride=32, multi_grid=(1, 1, 1), base_channels=8).eval()
    randomize_bn_stats(net)
    x = torch.randn(2, 3, 75, 64)
    with torch.no_grad():
        ours = net(x)
        ref = reference_resnet_forward(net.state_dict(), x, (3, 4, 6, 3))
    assert ours.shape == ref.shape == (2, 256, 3, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="depth must be one of"):
        resnet(42)
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        resnet(50, output_stride=4)
    with pytest.raises(ValueError, match="one entry per layer4 block"):
        resnet(50, multi_grid=(1, 2))
    with pytest.raises(ValueError, match="context must be one of"):
        DeepLabV3(21, depth=18, context="psp", base_channels=4)


# ----------------------------------------------------------------------------- box average

@contextlib.contextmanager
def channel_blocks(b):
    """Run box_average with blocks of b channels, so that the per-block code path is exercised."""
    old = vortex.CPU_BLOCK_CHANNELS, vortex.CONTEXT_BLOCK_CHANNELS
    vortex.CPU_BLOCK_CHANNELS = vortex.CONTEXT_BLOCK_CHANNELS = b
    try:
        yield
    finally:
        vortex.CPU_BLOCK_CHANNELS, vortex.CONTEXT_BLOCK_CHANNELS = old


@given(n=st.integers(1, 2), c=st.integers(1, 6), h=st.integers(1, 40), w=st.integers(1, 40),
       k=st.sampled_from([1, 3, 5, 7, 9, 13, 15, 25, 27]), cip=st.booleans(),
       block=st.sampled_from([1, 4, 256]))
def test_box_average_equals_avgpool2d_everywhere(n, c, h, w, k, cip, block):
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    ref = torch.nn.AvgPool2d(k, 1, k // 2, count_include_pad=cip)(x)
    with channel_blocks(block):
        torch.testing.assert_close(box_average(x, k, cip), ref, rtol=1e-12, atol=1e-12)




@given(c=st.integers(1, 5), h=st.integers(1, 36), w=st.integers(1, 36), cip=st.booleans(),
       ks=st.sampled_from([(3, 9, 27), (3, 9), (9, 27), (5, 25), (3, 15), (27,)]),
       block=st.sampled_from([2, 256]))
def test_shared_cascade_forward_and_backward_equal_the_definition(c, h, w, cip, ks, block):
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    gs = {k: torch.randn(2, c, h, w, dtype=torch.float64) for k in ks}
    xa = x.clone().requires_grad_()
    with channel_blocks(block):
        out = box_averages(xa, ks, cip)
        sum((out[k] * gs[k]).sum() for k in ks).backward()
    xr = x.clone().requires_grad_()
    ref = {k: F.avg_pool2d(xr, k, 1, k // 2, count_include_pad=cip) for k in ks}
    sum((ref[k] * gs[k]).sum() for k in ks).backward()
    for k in ks:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-12, atol=1e-12)


def test_box_average_gradcheck_and_low_precision():
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_averages(t, (3, 9), False)[9], (x,))
    xb = torch.randn(1, 3, 30, 30).bfloat16()
    out = box_average(xb, 27)  # sums in float32: a bf16 accumulator would lose ~1e-2
    assert out.dtype == torch.bfloat16
    ref = F.avg_pool2d(xb.float(), 27, 1, 13, count_include_pad=False)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_box_average_rejects_even_and_non_chained_sizes():
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="odd k"):
        box_average(x, 4)
    with pytest.raises(ValueError, match="must divide one another"):
        box_averages(x, (3, 5))


# ----------------------------------------------------------------------------- context modules

def small(constructor, *args, **kw):
    m = constructor(6, *args, out_channels=5, **kw).eval()
    randomize_bn_stats(m)
    return m


@pytest.mark.parametrize("ctor,pools,kernels,dilations", [
    (ContextModule.aspp, (1, 1, 1, 1), (1, 3, 3, 3), (1, 12, 24, 36)),
    (ContextModule.aspp_plus, (1, 1, 1, 1), (3, 3, 3, 3), (1, 12, 24, 36)),
    (lambda c, **kw: ContextModule.module_a(c, 9, **kw), (9,) * 4, (1, 3, 3, 3), (1, 12, 24, 36)),
    (ContextModule.vortex, (1, 3, 9, 27), (1, 3, 3, 3), (1, 3, 9, 27)),
    (ContextModule.none, (1,), (1,), (1,))])
def test_named_constructors_are_the_rows_of_table_1(ctor, pools, kernels, dilations):
    m = ctor(16, out_channels=8)
    assert (m.pools, m.kernels, m.dilations) == (pools, kernels, dilations)
    assert [b[0].kernel_size[0] for b in m.branches] == list(kernels)
    assert [b[0].dilation[0] for b in m.branches] == list(dilations)
    assert (m.image_pool is None) == (m.name == "none")


def test_aspp_rates_follow_output_stride():
    assert ContextModule.aspp(4, output_stride=16).dilations == (1, 6, 12, 18)
    assert ContextModule.vortex(4, output_stride=16).dilations == (1, 3, 9, 27)


@given(h=st.integers(1, 30), w=st.integers(1, 30))
def test_module_a_with_k1_is_aspp(h, w):
    torch.manual_seed(0)
    aspp = small(ContextModule.aspp)
    a1 = ContextModule.module_a(6, 1, out_channels=5).eval()
    a1.load_state_dict(aspp.state_dict())
    x = torch.randn(2, 6, h, w)
    with torch.no_grad():
        torch.testing.assert_close(a1(x), aspp(x), rtol=0, atol=0)


@given(h=st.integers(1, 30), w=st.integers(1, 30))
def test_vortex_first_branch_is_plain_1x1_and_others_see_pooled_maps(h, w):
    torch.manual_seed(0)
    m = small(ContextModule.vortex)
    x = torch.randn(1, 6, h, w)
    with torch.no_grad():
        pooled = m.pooled_inputs(x)
        assert pooled[1] is x  # k = 1: no pooling at all
        for k, branch in zip(m.pools, m.branches):
            expected = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False) if k > 1 else x
            torch.testing.assert_close(branch(pooled[k]), branch(expected))


@pytest.mark.parametrize("block", [1, 4, 512])
@pytest.mark.parametrize("ctor", [ContextModule.vortex, ContextModule.aspp,
                                  lambda c, **kw: ContextModule.module_a(c, 5, **kw)])
def test_context_module_forward_is_its_definition(ctor, block):
    """forward == concat(branch(pool(x)) for each branch, image branch) -> projection, whatever
    the channel blocks it is computed in (forward and gradient)."""
    torch.manual_seed(0)
    m = small(ctor)
    x = torch.randn(2, 6, 13, 10, dtype=torch.float64)
    m.double()
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with channel_blocks(block):
        out = m(xa)
    feats = [b(F.avg_pool2d(xr, k, 1, k // 2, count_include_pad=False) if k > 1 else xr)
             for k, b in zip(m.pools, m.branches)]
    g = m.image_pool(F.adaptive_avg_pool2d(xr, 1))
    feats.append(F.interpolate(g, size=(13, 10), mode="bilinear", align_corners=False))
    ref = m.project(torch.cat(feats, 1))
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(xa.grad, xr.grad)


def test_model_trains_one_step_and_gradients_reach_all_parameters():
    torch.manual_seed(0)
    model = DeepLabV3(3, depth=18, context="vortex", base_channels=4, context_channels=8)
    x, y = torch.randn(2, 3, 40, 33), torch.randint(0, 3, (2, 40, 33))
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- utilization

def test_paper_utilization_numbers():
    assert math.isclose(utilization_ratio(ContextModule.aspp(4)), 25 / 65 ** 2)  # 0.0059
    assert round(utilization_ratio(ContextModule.module_a(4, 5)), 3) == 0.148
    assert round(utilization_ratio(ContextModule.module_a(4, 9)), 3) == 0.479
    vx = ContextModule.vortex(4)
    assert all(utilization_ratio(vx, s, s) == 1.0 for s in (33, 65, 81))
    assert utilization_ratio(vx, 82, 82) < 1.0  # footprint is exactly 81 x 81
    assert int(footprint(vx.pools, vx.kernels, vx.dilations).sum()) == 81 * 81


def test_measured_utilization_at_the_border_of_a_65_map():
    # Centre of 65x65: ASPP's rate-36 taps fall off the map, leaving 1 + 8 + 8 descriptors.
    assert measured_utilization(small(ContextModule.aspp)) == 17 / 65 ** 2
    assert measured_utilization(small(ContextModule.vortex)) == 1.0
    # A corner pixel of Vortex sees a 41 x 41 quarter of its 81 x 81 footprint.
    assert measured_utilization(small(ContextModule.vortex), pixel=(0, 0)) == 41 * 41 / 65 ** 2


@settings(max_examples=20)
@given(branches=st.lists(st.tuples(st.sampled_from([1, 3, 9]), st.sampled_from([1, 3]),
                                   st.integers(1, 7)), min_size=1, max_size=3),
       extra=st.integers(0, 4))
def test_analytic_utilization_equals_measured_when_all_taps_fit(branches, extra):
    pools, kernels, dilations = zip(*branches)  # pools 1, 3, 9 share one cascade
    m = ContextModule(4, pools, kernels, dilations, out_channels=3)
    r = footprint(pools, kernels, dilations).shape[0] // 2
    side = 2 * r + 1 + 2 * extra
    assert measured_utilization(m, side, side) == pytest.approx(utilization_ratio(m, side, side))


# ----------------------------------------------------------------------------- checkpoints

def torchvision_format(backbone):
    sd = dict(backbone.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, backbone.out_channels), torch.zeros(1000)
    return sd


def test_imagenet_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    src = resnet(50, base_channels=8)
    randomize_bn_stats(src)
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_format(src), path)
    model = DeepLabV3(21, depth=50, base_channels=8)
    report = load_backbone_weights(model, str(path), verbose=False)
    assert sorted(report["skipped"]) == ["fc.bias", "fc.weight"]
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k


def test_wrong_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_format(resnet(50, base_channels=8)), path)
    with pytest.raises(ValueError, match=r"(?s)does not fit the ResNet-101 backbone.*"
                                         r"missing from the file \(306\): layer3\."):
        load_backbone_weights(resnet(101, base_channels=8), str(path), verbose=False)
    with pytest.raises(ValueError, match=r"shape mismatches \(265\): bn1.bias: file \(8,\) vs model \(16,\)"):
        load_backbone_weights(resnet(50, base_channels=16), str(path), verbose=False)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read .*truncated.pth as a weights-only"):
        load_backbone_weights(resnet(50, base_channels=8), str(truncated))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone_weights(resnet(50, base_channels=8), str(tmp_path / "nope.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="is not a state_dict"):
        load_backbone_weights(resnet(50, base_channels=8), str(tmp_path / "list.pth"))


def torchvision_deeplab_format(model):
    """Our DeepLabV3(context='aspp') as torchvision's deeplabv3_resnet* checkpoint would name it."""
    sd = {"backbone." + k: v for k, v in model.backbone.state_dict().items()}
    names = {"branches.0": "convs.0", "branches.1": "convs.1", "branches.2": "convs.2",
             "branches.3": "convs.3", "image_pool.0": "convs.4.1", "image_pool.1": "convs.4.2",
             "project.0": "project.0", "project.1": "project.1"}
    for k, v in model.context.state_dict().items():
        head, rest = ".".join(k.split(".")[:2]), ".".join(k.split(".")[2:])
        sd[f"classifier.0.{names[head]}.{rest}"] = v
    c = model.context.project[0].out_channels
    sd["classifier.1.weight"] = torch.zeros(c, c, 3, 3)  # the extra 3x3 conv the paper lacks
    sd["classifier.4.weight"], sd["classifier.4.bias"] = torch.zeros(21, c, 1, 1), torch.zeros(21)
    sd["aux_classifier.0.weight"] = torch.zeros(c, 4, 3, 3)
    return sd


def test_torchvision_deeplabv3_checkpoint_loads_backbone_and_aspp(tmp_path, capsys):
    torch.manual_seed(0)
    src = DeepLabV3(21, depth=50, context="aspp", base_channels=8, context_channels=16)
    randomize_bn_stats(src)
    path = tmp_path / "deeplabv3_resnet50_coco.pth"
    torch.save(torchvision_deeplab_format(src), path)
    dst = DeepLabV3(21, depth=50, context="aspp", base_channels=8, context_channels=16)
    report = load_backbone_weights(dst, str(path))
    assert "classifier.1.weight" in report["skipped"] and "aux_classifier.0.weight" in report["skipped"]
    assert not any(k.startswith(("backbone.", "classifier.0.")) for k in report["skipped"])
    for k, v in src.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(dst.state_dict()[k], v), k
    assert "skipped" in capsys.readouterr().out
    vx = DeepLabV3(21, depth=50, context="vortex", base_channels=8, context_channels=16)
    report = load_backbone_weights(vx, str(path), verbose=False)
    assert any(k.startswith("classifier.0.") for k in report["skipped"])
    assert all(torch.equal(vx.backbone.state_dict()[k], v)
               for k, v in src.backbone.state_dict().items())


def test_command_line_table_runs(capsys):
    vortex.print_table(size=9, channels=16, reps=1)
    out = capsys.readouterr().out
    for name in ("ASPP", "ASPP+", "A(5)", "A(9)", "A(13)", "Vortex", "none"):
        assert f"\n{name} " in out
