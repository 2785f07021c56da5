"""Tests for the Vortex Pooling reimplementation: `python -m pytest -q`.

Property-based (hypothesis) where a property exists; tiny channel widths where the property does
not depend on width, so that the suite runs in a few minutes on 2 CPU cores.
"""
# How this file is organised: it mirrors the code. After the shared helpers and fixtures come
# the files in the order vortex, data, infra, train, eval, experiments; within a file, the tests
# of its Part I (the paper, in the paper's order) come before those of its Part II (the
# engineering), each under a banner naming the file and part, with "# ----" subsections that
# follow the file's own. A test that crosses files sits with the code it is about: golden
# fixtures next to what they check, GPU (`-m gpu`) and several-process tests next to their CPU
# counterparts. Then a section for the docs (README's paper -> code map, links, documented
# commands) and the command that made the golden fixtures; last, the coursework grader (also run
# as `python test_vortex.py grade HANDINS`), whose helpers must stay above its `main`.
import argparse
import ast
import base64
import contextlib
import csv
import functools
import io
import itertools
import json
import math
import os
import random
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from typing import Callable, NamedTuple
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import data
import eval as evaluation
import experiments
import infra
import train
import vortex
from vortex import (ContextModule, DeepLabV3, box_averages, footprint,
                    measured_utilization, ResNet, utilization_ratio)

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

torch.set_num_threads(min(2, torch.get_num_threads()))


# =============================================================================================
# Shared helpers and fixtures (used by several sections)
# =============================================================================================

HERE = os.path.dirname(os.path.abspath(__file__))

TINY = ["--num-images", "16", "--val-images", "3", "--image-size", "48", "--crop", "40",
        "--batch-size", "4", "--workers", "0", "--depth", "18", "--base-channels", "4",
        "--context-channels", "8", "--log-every", "1"]

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny finished run (checkpoint.pt at iteration 2, log.jsonl), shared by every test
    that needs a checkpoint: read it, or copy what you change (eval.py without --json writes
    its result beside the checkpoint: give it --json)."""
    out = str(tmp_path_factory.mktemp("tiny_run") / "run")
    train.main(TINY + ["--iters", "2", "--out-dir", out, "--no-eval"])
    return out

@pytest.fixture(scope="session")
def voc_root(tmp_path_factory):
    """A tiny VOC 2012 folder (images a, b, c, d; split train), shared: read it only (a test
    that changes it makes its own with make_voc_tree)."""
    return make_voc_tree(tmp_path_factory.mktemp("voc"), ids="abcd")

@pytest.fixture
def one_coco_image(tmp_path):
    """instances_x.json with one 40 x 40 image (id 7, a.jpg) holding one 1296 px person, and
    its images folder, in tmp_path: (annotations, images)."""
    return coco_file(tmp_path, [{"id": 7, "file_name": "a.jpg", "height": 40, "width": 40}],
                     [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": SQUARE}])

def refused(fn, match):
    """fn() must raise one line of BadInput matching `match`; returns the message."""
    with pytest.raises(infra.BadInput, match=match) as e:
        fn()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)

def cli_run(main, argv, capsys):
    """(exit code, stderr lines) of a command run as its `python X.py` would run it."""
    with pytest.raises(SystemExit) as e:
        infra.cli(lambda: main(argv))
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err.strip().splitlines()

def randomize_bn_stats(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)

# Real sample files (12 VOC 2012 pairs, 2 SBD .mat files, a COCO subset): the folder named by
# the environment variable VORTEX_SAMPLES, else ../shared/voc_samples beside this project.
SHARED = os.environ.get("VORTEX_SAMPLES") or os.path.join(HERE, "..", "shared", "voc_samples")
needs_shared = pytest.mark.skipif(
    not os.path.isdir(SHARED),
    reason="no real VOC/SBD/COCO sample files: set VORTEX_SAMPLES to a folder laid out like "
           "voc_samples (VOC2012/, SBD/, coco/), or put ../shared/voc_samples beside this clone")

# `python -m pytest -m gpu` on a machine with CUDA; skipped with a reason elsewhere (CI has none).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run `python -m pytest -m gpu` on one)")

def make_voc_tree(tmp_path, ids=("a", "b"), size=(40, 30), mask_mode="P"):
    root = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{i}.jpg")
        m = rng.integers(0, 21, (size[1], size[0]), dtype=np.uint8)
        if mask_mode == "P":
            data.save_mask(str(root / "SegmentationClass" / f"{i}.png"), m)
        else:
            Image.fromarray(m, mode="L").save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return root

def coco_file(tmp_path, images, annotations):
    cats = [{"id": 1, "name": "person"}, {"id": 62, "name": "chair"}, {"id": 5, "name": "kite"}]
    path = tmp_path / "instances_x.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": cats}))
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for im in images:
        name = im.get("file_name")
        if isinstance(name, str) and os.path.basename(name) == name and os.path.splitext(name)[1]:
            Image.new("RGB", (im.get("width", 8), im.get("height", 8))).save(
                tmp_path / "imgs" / name)
    return str(path), str(tmp_path / "imgs")

SQUARE = [[2, 2, 38, 2, 38, 38, 2, 38]]  # 36 x 36 = 1296 px

def _spawn(fn, world, *args):
    """Run fn(rank, world, init_file, *args) in `world` gloo processes."""
    init = tempfile_path()
    mp.spawn(_spawned, args=(fn, world, init) + args, nprocs=world, join=True)

def _spawned(rank, fn, *args):
    """fn, then the process ends without the interpreter's teardown, where gloo's threads can
    abort (SIGABRT, 'terminate called without an active exception'): as infra.end does under
    torchrun. An exception still ends the process the usual way, so that mp.spawn reports it."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

def tempfile_path():
    fd, path = tempfile.mkstemp(prefix="gloo-")
    os.close(fd)
    os.unlink(path)
    return path

def _init(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)


# =============================================================================================
# vortex.py, Part I: the paper (ResNet 3.1/4.1, utilization 3.2, context modules 3.3-3.4,
# Table 1, DeepLabV3)
# =============================================================================================

# ---- ResNet with output stride and multi-grid (3.1, 4.1); golden fixture: torchvision

@settings(max_examples=12)
@given(depth=st.sampled_from([18, 34, 50, 101]), os_=st.sampled_from([8, 16, 32]),
       h=st.integers(17, 70), w=st.integers(17, 70))
def test_backbone_stride_and_model_output_size(depth, os_, h, w):
    torch.manual_seed(0)
    net = ResNet(depth, output_stride=os_, base_channels=4).eval()
    with torch.no_grad():
        feat = net(torch.randn(1, 3, h, w))
    # every stride-2 stage maps n -> ceil(n / 2), so the features are ceil(n / os) in size
    assert feat.shape == (1, net.out_channels, math.ceil(h / os_), math.ceil(w / os_))
    model = DeepLabV3(5, depth=depth, context="vortex", output_stride=os_, base_channels=4,
                      context_channels=8).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, h, w)).shape == (2, 5, h, w)

def expected_dilations(n3, n4, os_, multi_grid):
    """Per-block 3x3 rates of layer3 and layer4, written out from the rule: a stage whose stride
    is traded keeps the old rate in its first (formerly strided) block, the rest double it;
    multi-grid sets layer4 to (its rate) x multi_grid."""
    r3 = 1 if os_ >= 16 else 2  # layer3's rate after the trade (OS 8 trades it)
    layer3 = (1,) + (r3,) * (n3 - 1)
    r4 = {32: 1, 16: 2, 8: 4}[os_]
    layer4 = (r3 if os_ == 8 else 1,) + (r4,) * (n4 - 1)
    if os_ == 32:
        layer4 = (1,) * n4
    if multi_grid is not None:
        layer4 = tuple(r4 * g for g in multi_grid[:n4])
    return layer3, layer4

@pytest.mark.parametrize("os_", [8, 16, 32])
@pytest.mark.parametrize("depth", [18, 50, 101])
@pytest.mark.parametrize("multi_grid", [None, (1, 2, 4), (1, 1, 1), (2, 3, 5)])
def test_per_block_dilations_for_every_output_stride_and_multigrid(os_, depth, multi_grid):
    net = ResNet(depth, output_stride=os_, multi_grid=multi_grid, base_channels=2)
    n3, n4 = len(net.layer3), len(net.layer4)
    layer3, layer4 = expected_dilations(n3, n4, os_, multi_grid)
    assert net.block_dilations["layer3"] == layer3 and net.block_dilations["layer4"] == layer4
    convs = "conv2" if depth >= 50 else "conv1"  # the conv that holds the stride
    for layer, rates in ((net.layer3, layer3), (net.layer4, layer4)):
        assert [getattr(b, convs).dilation[0] for b in layer] == list(rates)
        assert [getattr(b, convs).padding[0] for b in layer] == list(rates)
    assert net.layer3[0].downsample[0].stride[0] == (2 if os_ >= 16 else 1)
    assert net.layer4[0].downsample[0].stride[0] == (2 if os_ == 32 else 1)
    if multi_grid == (1, 2, 4) and depth == 101:  # the paper's rates (4.1)
        assert layer4 == {8: (4, 8, 16), 16: (2, 4, 8), 32: (1, 2, 4)}[os_]

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
    own = {k: tuple(v.shape) for k, v in ResNet(depth).state_dict().items()}
    assert own == {k: v for k, v in expected.items() if not k.startswith("fc.")}

def reference_resnet_forward(sd, x, counts, replace=(False, False, False)):
    """torchvision's ResNet (v1.5: stride on the 3x3 conv) written out functionally from a state
    dict, with its replace_stride_with_dilation rule for layer2..4 (a replaced stage: the first
    block at the previous dilation, the others at dilation x 2): an independent definition to
    compare our module against."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"],
                            sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5)
    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    dilation = 1
    for li, n in enumerate(counts, start=1):
        stride, previous = (2 if li > 1 else 1), dilation
        if li > 1 and replace[li - 2]:
            dilation, stride = dilation * stride, 1
        for b in range(n):
            p = f"layer{li}.{b}"
            s, d = (stride, previous) if b == 0 else (1, dilation)
            out = F.relu(bn(F.conv2d(x, sd[p + ".conv1.weight"]), p + ".bn1"))
            out = F.relu(bn(F.conv2d(out, sd[p + ".conv2.weight"], stride=s, padding=d,
                                     dilation=d), p + ".bn2"))
            out = bn(F.conv2d(out, sd[p + ".conv3.weight"]), p + ".bn3")
            idt = x
            if p + ".downsample.0.weight" in sd:
                idt = bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=s),
                         p + ".downsample.1")
            x = F.relu(out + idt)
    return x

@settings(max_examples=6)
@given(os_=st.sampled_from([8, 16, 32]), h=st.integers(33, 80), w=st.integers(33, 80))
def test_without_multigrid_the_backbone_is_torchvision_dilated_resnet(os_, h, w):
    torch.manual_seed(0)
    net = ResNet(50, output_stride=os_, multi_grid=None, base_channels=4).eval()
    randomize_bn_stats(net)
    x = torch.randn(1, 3, h, w)
    replace = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[os_]
    with torch.no_grad():
        ours = net(x)
        ref = reference_resnet_forward(net.state_dict(), x, (3, 4, 6, 3), replace)
    assert ours.shape == ref.shape == (1, 128, math.ceil(h / os_), math.ceil(w / os_))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)

# Outputs of the references themselves (torchvision, pycocotools), made once in a scratch
# environment and committed under fixtures/ (see make_fixtures at the end of this file for the
# command). The weights are not stored: both sides derive them from the tensor names.
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

def seeded_weights(template, seed=0):
    """Deterministic stand-in weights for a state_dict template (name -> tensor): numpy's PCG64
    keyed by (seed, name), so that this project and the environment that made a fixture get the
    same numbers without sharing a 170 MB file. BN scales are kept small so that 33 residual
    blocks stay in range."""
    out = {}
    for name, t in template.items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        rng, shape = np.random.default_rng([seed, zlib.crc32(name.encode())]), tuple(t.shape)
        if name.endswith("running_var"):
            v = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("running_mean"):
            v = rng.normal(0, 0.1, shape)
        elif t.dim() == 1 and name.endswith("weight"):
            v = rng.uniform(0.2, 0.6, shape)
        elif t.dim() == 1:
            v = rng.normal(0, 0.1, shape)
        else:
            v = rng.normal(0, math.sqrt(2 / max(1, int(np.prod(shape[1:])))), shape)
        out[name] = torch.from_numpy(v.astype(np.float32))
    return out

def seeded_input(h, w, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(1, 3, h, w)).astype(
        np.float32))

def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

BACKBONE_INPUT, ASPP_INPUT = (97, 113), (161, 185)

@pytest.mark.parametrize("depth,os_", [(50, 8), (50, 16), (101, 8), (101, 16)])
def test_backbone_equals_torchvision_on_the_same_weights(depth, os_):
    ref = np.load(os.path.join(FIXTURES, "torchvision_outputs.npz"))[f"resnet{depth}_os{os_}"]
    net = ResNet(depth, output_stride=os_, multi_grid=None).eval()
    net.load_state_dict(seeded_weights(net.state_dict()))
    with torch.no_grad():
        ours = net(seeded_input(*BACKBONE_INPUT))[:, ::16]
    assert ours.shape == ref.shape
    assert relative_error(ours, torch.from_numpy(ref)) < 1e-5

# ---- utilization ratio, analytic and measured (3.2, Eq. 1)

def small(constructor, *args, **kw):
    m = constructor(6, *args, out_channels=5, **kw).eval()
    randomize_bn_stats(m)
    return m

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
    # on a 41x41 map Vortex's rate-27 taps fall off the map from the centre: r drops to 0.43
    assert measured_utilization(small(ContextModule.vortex), 41, 41) < 0.5

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

# ---- context modules: ASPP, ASPP+, Module A, Vortex (3.1, 3.3, 3.4, Table 1)

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
        pooled = m.pool(x)
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

def test_table1_rows_are_defined_once_and_used_everywhere():
    """One table of Table 1's rows: the modules it builds carry its names, and every list of
    rows (vortex.py's table, the ablation, the context experiment) is taken from it."""
    for row, spec in vortex.TABLE1.items():
        assert vortex.table1_module(row, 8).name == row
        assert DeepLabV3(3, 18, spec.context, pool_k=spec.k, base_channels=2,
                         context_channels=4).context.name == row
    assert set(experiments.TABLE_ROWS) <= set(vortex.TABLE1)
    assert experiments.ABLATION_ROWS == tuple(vortex.TABLE1)
    assert experiments.CONTEXT_ROWS == tuple(vortex.TABLE1)[:2] + tuple(
        r + s for r in tuple(vortex.TABLE1)[2:] for s in ("", " w/o img"))
    for path in ("vortex.py", "train.py", "eval.py", "data.py"):  # no second list of the rows
        text = open(os.path.join(HERE, path)).read()
        assert len(re.findall(r'"A\(9\)"', text)) <= (1 if path == "vortex.py" else 0), path

# ---- DeepLabV3 (3.1, Fig. 4)

def test_model_trains_one_step_and_gradients_reach_all_parameters():
    torch.manual_seed(0)
    model = DeepLabV3(3, depth=18, context="vortex", base_channels=4, context_channels=8)
    x, y = torch.randn(2, 3, 40, 33), torch.randint(0, 3, (2, 40, 33))
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# =============================================================================================
# vortex.py, Part II: engineering (box_averages, devices, loading torchvision weights)
# =============================================================================================

# ---- box_averages: exact k x k average pooling, fast

@contextlib.contextmanager
def channel_blocks(b):
    """Run box_average with blocks of b channels, so that the per-block code path is exercised."""
    old = vortex.CPU_BLOCK_CHANNELS
    vortex.CPU_BLOCK_CHANNELS = b
    try:
        yield
    finally:
        vortex.CPU_BLOCK_CHANNELS = old

@given(n=st.integers(1, 2), c=st.integers(1, 6), h=st.integers(1, 40), w=st.integers(1, 40),
       k=st.sampled_from([1, 3, 5, 7, 9, 13, 15, 25, 27]), cip=st.booleans(),
       block=st.sampled_from([1, 4, 256]))
def test_box_average_equals_the_definition_everywhere(n, c, h, w, k, cip, block):
    """Part II's fast path equals Part I's definition (vortex.average_pool, 3.3), and that is
    torch's own nn.AvgPool2d(k, 1, k // 2)."""
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    ref = vortex.average_pool(x, k, cip)
    torch.testing.assert_close(ref, torch.nn.AvgPool2d(k, 1, k // 2, count_include_pad=cip)(x))
    with channel_blocks(block):
        torch.testing.assert_close(box_averages(x, (k,), cip)[k], ref, rtol=1e-12, atol=1e-12)

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

def test_box_averages_of_channels_last_input_equal_the_definition():
    """--channels-last feeds NHWC maps: same values and gradients, layout kept (300 channels:
    two CPU channel blocks)."""
    torch.manual_seed(0)
    x = torch.randn(2, 300, 23, 31).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = box_averages(x, (3, 9, 27))
    ws = {k: torch.randn_like(out[k]) for k in (3, 9, 27)}
    (g,) = torch.autograd.grad(sum((out[k] * w).sum() for k, w in ws.items()), x)
    ref_x = x.detach().contiguous().requires_grad_(True)
    ref = {k: F.avg_pool2d(ref_x, k, 1, k // 2, count_include_pad=False) for k in ws}
    (g_ref,) = torch.autograd.grad(sum((ref[k] * w).sum() for k, w in ws.items()), ref_x)
    for k in ws:
        torch.testing.assert_close(out[k], ref[k])
        assert out[k].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(g, g_ref)

def test_box_average_gradcheck_and_low_precision():
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_averages(t, (3, 9), False)[9], (x,))
    xb = torch.randn(1, 3, 30, 30).bfloat16()
    out = box_averages(xb, (27,))[27]  # sums in float32: a bf16 accumulator would lose ~1e-2
    assert out.dtype == torch.bfloat16
    ref = F.avg_pool2d(xb.float(), 27, 1, 13, count_include_pad=False)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)

def test_box_average_rejects_even_and_non_chained_sizes():
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="odd k"):
        box_averages(x, (4,))[4]
    with pytest.raises(ValueError, match="must divide one another"):
        box_averages(x, (3, 5))

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2),
                                       (torch.float16, 2e-3)])
def test_cuda_box_averages_equal_avgpool_forward_and_backward(dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(2, 48, 65, 71, device="cuda").to(dtype).requires_grad_(True)
    ref_x = x.detach().float().requires_grad_(True)
    ks = (3, 9, 27)
    ours = box_averages(x, ks)
    weights = [torch.randn(2, 48, 65, 71, device="cuda") for _ in ks]
    loss = sum((ours[k].float() * w).sum() for k, w in zip(ks, weights))
    (g,) = torch.autograd.grad(loss, x)
    ref = [F.avg_pool2d(ref_x, k, 1, k // 2, count_include_pad=False) for k in ks]
    (g_ref,) = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), ref_x)
    for k, r in zip(ks, ref):
        assert ours[k].dtype == dtype
        torch.testing.assert_close(ours[k].float(), r, rtol=tol, atol=tol)
    torch.testing.assert_close(g.float(), g_ref, rtol=tol, atol=tol * 10)

# ---- the model on other devices, layouts and compilers

@contextlib.contextmanager
def exact_cuda_math():
    """fp32 convolutions and matrix products without TF32, deterministic cuDNN, for comparisons."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
           torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) = old

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("context", ["vortex", "aspp"])
def test_cuda_model_equals_cpu_and_channels_last_equals_contiguous(context):
    torch.manual_seed(0)
    model = DeepLabV3(21, depth=50, context=context, base_channels=16, context_channels=32).eval()
    randomize_bn_stats(model)
    x = torch.randn(2, 3, 97, 113)
    with torch.no_grad(), exact_cuda_math():
        cpu = model(x)
        gpu = model.cuda()(x.cuda())
        model.to(memory_format=torch.channels_last)
        cl = model(x.cuda().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cl, gpu, rtol=1e-4, atol=1e-4)

def test_compiled_model_matches_eager():
    """--compile: the traced model gives the eager one's output, and it really was traced (a
    backend that records the graphs it gets: a compile that silently fell back to eager, or
    stopped at the first operation, would pass an output comparison alone)."""
    torch.manual_seed(0)
    model = DeepLabV3(3, depth=18, base_channels=4, context_channels=8).eval()
    x = torch.randn(1, 3, 37, 29)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    convs = sum(node.target == torch.conv2d or "conv" in str(node.target)
                for g in graphs for node in g.graph.nodes)
    assert graphs and convs >= 20, (len(graphs), convs)  # ResNet-18's and the module's convs

# ---- loading torchvision weights from local files; golden fixture: torchvision DeepLabV3

def torchvision_format(backbone):
    sd = dict(backbone.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, backbone.out_channels), torch.zeros(1000)
    return sd

def test_imagenet_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    src = ResNet(50, base_channels=8)
    randomize_bn_stats(src)
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_format(src), path)
    model = DeepLabV3(21, depth=50, base_channels=8)
    report = infra.load_pretrained(model, str(path), verbose=False)
    assert sorted(report["skipped"]) == ["fc.bias", "fc.weight"]
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k

def test_wrong_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_format(ResNet(50, base_channels=8)), path)
    with pytest.raises(ValueError, match=r"(?s)does not fit the ResNet-101 backbone.*"
                                         r"missing from the file \(306\): layer3\."):
        infra.load_pretrained(ResNet(101, base_channels=8), str(path), verbose=False)
    with pytest.raises(ValueError,
                       match=r"shape mismatches \(265\): bn1.bias: file \(8,\) vs model \(16,\)"):
        infra.load_pretrained(ResNet(50, base_channels=16), str(path), verbose=False)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read .*truncated.pth as a weights-only"):
        infra.load_pretrained(ResNet(50, base_channels=8), str(truncated))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        infra.load_pretrained(ResNet(50, base_channels=8), str(tmp_path / "nope.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="is not a state_dict"):
        infra.load_pretrained(ResNet(50, base_channels=8), str(tmp_path / "list.pth"))

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
    report = infra.load_pretrained(dst, str(path))
    assert {"classifier.1.weight", "aux_classifier.0.weight"} <= set(report["skipped"])
    assert not any(k.startswith(("backbone.", "classifier.0.")) for k in report["skipped"])
    for k, v in src.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(dst.state_dict()[k], v), k
    assert "skipped" in capsys.readouterr().out
    vx = DeepLabV3(21, depth=50, context="vortex", base_channels=8, context_channels=16)
    report = infra.load_pretrained(vx, str(path), verbose=False)
    assert any(k.startswith("classifier.0.") for k in report["skipped"])
    assert all(torch.equal(vx.backbone.state_dict()[k], v)
               for k, v in src.backbone.state_dict().items())

def test_aspp_equals_torchvision_deeplabv3_coco_checkpoint(tmp_path):
    """A torchvision deeplabv3_resnet101 state_dict, loaded by load_backbone_weights, gives
    torchvision's ASPP output (model.classifier[0](model.backbone(x)["out"]))."""
    ref = np.load(os.path.join(FIXTURES, "torchvision_outputs.npz"))["deeplabv3_resnet101_aspp"]
    model = DeepLabV3(21, 101, "aspp", multi_grid=None).eval()
    path = tmp_path / "deeplabv3_resnet101_coco.pth"
    torch.save(seeded_weights(torchvision_deeplab_format(model)), path)
    infra.load_pretrained(model, str(path), verbose=False)
    with torch.no_grad():
        ours = model.context(model.backbone(seeded_input(*ASPP_INPUT)))[:, ::4]
    assert ours.shape == ref.shape == (1, 64, 21, 24)
    assert relative_error(ours, torch.from_numpy(ref)) < 1e-5


# =============================================================================================
# data.py, Part I: the paper (4.1 VOC 2012 + SBD train_aug, augmentation; 4.2 COCO -> VOC)
# =============================================================================================

# ---- PASCAL VOC 2012 and train_aug

@needs_shared
def test_voc_samples_load_with_valid_labels():
    root = os.path.join(SHARED, "VOC2012")
    for split, n in (("train", 6), ("val", 6), ("trainval", 12)):
        ds = data.VOCSegmentation(root, split)
        assert len(ds) == n
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.dtype == torch.float32 and label.dtype == torch.int64
        assert image.shape[1:] == label.shape and image.shape[0] == 3
        assert set(label.unique().tolist()) <= set(range(21)) | {255}
    # 2007_000032: the per-class pixel counts recorded in SOURCES.md
    label = ds[ds.ids.index("2007_000032")][1]
    assert (label == 1).sum() == 4734 and (label == 15).sum() == 866

def test_grayscale_index_masks_are_valid(tmp_path):
    root = make_voc_tree(tmp_path, mask_mode="L")  # SegmentationClassAug style
    assert len(data.VOCSegmentation(str(root), "train")) == 2

def test_train_aug_list_arithmetic():
    sbd_train = [f"s{i}" for i in range(10)] + ["v0", "t0"]
    sbd_val = [f"s{i}" for i in range(8, 14)] + ["v1"]
    voc_train, voc_val = ["t0", "t1"], ["v0", "v1", "v2"]
    ids = data.train_aug_ids(sbd_train, sbd_val, voc_train, voc_val)
    assert len(ids) == 14 + 2 and not set(ids) & set(voc_val) and ids == sorted(ids)

# ---- augmentation (4.1)

@settings(max_examples=15)
@given(h=st.integers(5, 60), w=st.integers(5, 60), crop=st.integers(8, 48),
       lo=st.floats(0.5, 1.0), seed=st.integers(0, 10 ** 6))
def test_train_transform_keeps_labels_and_alignment(h, w, crop, lo, seed):
    rng = np.random.default_rng(seed)
    label = rng.choice(np.array([0, 3, 7, 255], np.uint8), size=(h, w))
    label = np.kron(label[: (h + 3) // 4, : (w + 3) // 4], np.ones((4, 4), np.uint8))[:h, :w]
    image = np.stack([label, label, label], -1)  # the image encodes its own label
    img, lab = data.TrainTransform(crop, (lo, 2.0))(image, label, np.random.default_rng(seed))
    assert img.shape == (3, crop, crop) and lab.shape == (crop, crop)
    assert set(lab.unique().tolist()) <= set(label.ravel().tolist()) | {255}
    pixel = (img[0] * data.STD[0] + data.MEAN[0]) * 255  # back to the raw value
    padded = (img == 0).all(0)
    assert (lab[padded] == 255).all()  # padding: image mean (0 after normalising), label 255
    # away from region borders, bilinear image and nearest label agree
    # (the crop's edge counts as a border: what lies beyond it was blended in too)
    lab_edge = F.pad(lab[None, None].float(), [2] * 4, value=-1.0)
    inner = ~padded & (F.max_pool2d(lab_edge, 5, 1)[0, 0] == -F.max_pool2d(-lab_edge, 5, 1)[0, 0])
    assert torch.allclose(pixel[inner], lab[inner].float(), atol=1.0)

@given(h=st.integers(2, 30), w=st.integers(2, 30), seed=st.integers(0, 1000))
def test_unscaled_transform_is_a_crop_of_the_original_with_coordinates_intact(h, w, seed):
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy * 8, xx * 8, np.full_like(yy, 100)], -1).astype(np.uint8)
    label = ((yy + xx) % 21).astype(np.uint8)
    img, lab = data.TrainTransform(16, (1.0, 1.0))(image, label, np.random.default_rng(seed))
    raw = ((img.permute(1, 2, 0).numpy() * data.STD + data.MEAN) * 255).round().astype(int)
    valid = lab.numpy() != 255
    ys, xs = raw[..., 0][valid] // 8, raw[..., 1][valid] // 8
    assert (lab.numpy()[valid] == (ys + xs) % 21).all()  # label matches the pixel's position
    # flipping is a mirror: x coordinates in each row are monotone (one way or the other)
    rows = raw[..., 1] // 8
    for r in range(16):
        v = rows[r][valid[r]]
        assert (np.diff(v) == 1).all() or (np.diff(v) == -1).all()

def test_flip_happens_about_half_the_time_and_twice_is_identity():
    """A left-right mirror of image and label together, about half the time; the transform of
    a mirrored pair (the same random draws) is the mirror of its transform, so a flipped pair
    flipped again is the pair itself."""
    image = np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 10, (16, 1, 3))
    label = np.tile(np.arange(16, dtype=np.uint8)[None, :] % 5, (16, 1))
    t = data.TrainTransform(16, (1.0, 1.0))
    flips = 0
    for s in range(200):
        img, lab = t(image, label, np.random.default_rng(s))
        flipped = bool(img[0, 0, 0] > img[0, 0, -1])
        flips += flipped
        assert np.array_equal(lab.numpy(), label[:, ::-1] if flipped else label)  # moved together
        mirrored = t(image[:, ::-1].copy(), label[:, ::-1].copy(), np.random.default_rng(s))
        assert torch.equal(mirrored[0], img.flip(-1)) and torch.equal(mirrored[1], lab.flip(-1))
    assert 70 < flips < 130

def test_eval_transform_keeps_the_full_image():
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    img, lab = data.EvalTransform()(image, np.zeros((37, 53), np.uint8))
    assert img.shape == (3, 37, 53) and lab.shape == (37, 53)
    back = (img.permute(1, 2, 0).numpy() * data.STD + data.MEAN) * 255
    assert np.abs(back - image).max() < 1e-3

# ---- COCO classes mapped to VOC, small objects ignored (4.2)

def test_coco_category_mapping_and_size_rule():
    assert len(data.COCO_TO_VOC) == 20
    assert sorted(data.COCO_TO_VOC.values()) == sorted(data.VOC_CLASSES[1:])
    big = np.zeros((50, 50), np.uint8)
    big[:40, :25] = 1  # 1000 px: kept
    small = np.zeros((50, 50), np.uint8)
    small[45:, 45:] = 1  # 25 px: discarded
    anns = [{"category_id": 1, "segmentation": rle_encode(big)},
            {"category_id": 2, "segmentation": rle_encode(small)},
            {"category_id": 3, "segmentation": rle_encode(small)}]
    mask = data.coco_voc_mask(anns, 50, 50, {1: 15, 2: 9})  # 3: not a VOC class
    # the small chair is discarded: ignored (255), neither chair nor background (paper 4.2)
    assert set(np.unique(mask)) == {0, 15, 255} and (mask == 15).sum() == 1000
    assert np.array_equal(mask == 255, small.astype(bool))
    assert data.coco_voc_mask(anns[2:], 50, 50, {1: 15, 2: 9}) is None  # non-VOC only
    assert data.coco_voc_mask(anns[1:], 50, 50, {1: 15, 2: 9}) is None  # small VOC only


# =============================================================================================
# data.py, Part II: engineering (safe file reading, synthetic data, the SBD and COCO
# converters)
# =============================================================================================

# ---- safe file reading: every bad input is one line naming the file

def test_bad_voc_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)VOC root not found.*expected layout"):
        data.VOCSegmentation(str(tmp_path / "nope"), "train")
    root = make_voc_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="(?s)split list not found.*val.txt.*JPEGImages"):
        data.VOCSegmentation(str(root), "val")
    with pytest.raises(FileNotFoundError, match="prepare-sbd"):
        data.VOCSegmentation(str(root), "train_aug")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nghost\n")
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*val.txt do not exist.*"
                                                r"ghost.jpg"):
        data.VOCSegmentation(str(root), "val")
    ds = data.VOCSegmentation(str(root), "train")
    # a mask rendered to RGB colours
    rgb = evaluation.colorize(data.read_mask(ds.masks[0]), data.VOC_PALETTE)
    Image.fromarray(rgb).save(ds.masks[0])
    with pytest.raises(ValueError, match="a.png has mode 'RGB'.*rendered to colours"):
        ds[0]
    # values outside 0..20, 255
    m = np.zeros((30, 40), np.uint8)
    m[0, :3] = [21, 22, 254]
    data.save_mask(ds.masks[0], m)
    with pytest.raises(ValueError, match=r"a.png holds values \[21, 22, 254\] outside 0..20"):
        ds[0]
    # size mismatch
    data.save_mask(ds.masks[0], np.zeros((31, 40), np.uint8))
    with pytest.raises(ValueError, match="size mismatch: image .*a.jpg is 40x30 but mask "
                                         ".*a.png is 40x31"):
        ds[0]
    # truncated JPEG
    jpg = open(ds.images[1], "rb").read()
    open(ds.images[1], "wb").write(jpg[: len(jpg) // 2])
    with pytest.raises(ValueError, match="cannot read image .*b.jpg"):
        ds[1]

def test_voc_root_pointing_at_vocdevkit_suggests_its_voc2012_folder(tmp_path):
    make_voc_tree(tmp_path / "VOCdevkit")  # VOCdevkit/VOC2012/...
    with pytest.raises(infra.MissingInput, match=r"looks like VOCdevkit: use its VOC2012 folder"):
        data.VOCSegmentation(str(tmp_path / "VOCdevkit"), "train")

@pytest.mark.parametrize("line", ["../../outside/pic", "/etc/passwd", "a/b", "..", "x\\y"])
def test_split_list_ids_stay_inside_the_dataset(tmp_path, line):
    root = tmp_path / "VOC2012"
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text(f"good\n{line}\n")
    with pytest.raises(infra.BadInput, match=r"val.txt, line 2: .* is not a plain id"):
        data.VOCSegmentation(str(root), "val")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nb\na\n")
    with pytest.raises(infra.BadInput, match=r"val.txt, line 3: 'a' is listed again"):
        data.VOCSegmentation(str(root), "val")

def test_read_image_scales_16_bit_and_applies_exif_orientation(tmp_path):
    ramp = np.linspace(0, 65535, 60 * 40).reshape(40, 60).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    img = data.read_image(str(tmp_path / "g16.png"))
    assert img.shape == (40, 60, 3) and abs(img.mean() - 127.5) < 1 and img.max() == 255
    photo = Image.new("RGB", (50, 30), (200, 10, 10))
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photo.save(tmp_path / "phone.jpg", exif=exif)
    assert data.read_image(str(tmp_path / "phone.jpg")).shape == (30, 50, 3)  # as stored
    assert data.read_image(str(tmp_path / "phone.jpg"), orientation=True).shape == (50, 30, 3)

def test_huge_images_are_refused_before_decoding(tmp_path, monkeypatch):
    Image.new("L", (8000, 6000)).save(tmp_path / "big.png")  # 48 megapixels in a small file
    with pytest.raises(infra.BadInput, match=r"big.png is 8000x6000 = 48 megapixels; the limit is "
                                            r"40 \(resize it first\)"):
        data.read_image(str(tmp_path / "big.png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own bomb guard
    Image.new("L", (100, 100)).save(tmp_path / "bomb.png")
    with pytest.raises(infra.BadInput, match=r"bomb.png is too large to decode safely"):
        data.read_image(str(tmp_path / "bomb.png"))

@pytest.mark.parametrize("mode", ["I;16", "1", "RGB"])
def test_masks_in_other_modes_are_named_as_they_are(tmp_path, mode):
    Image.new(mode, (8, 8)).save(tmp_path / "m.png")
    why = "rendered to colours" if mode == "RGB" else "other modes are not read as class indices"
    with pytest.raises(infra.BadInput, match=rf"m.png has mode '{re.escape(mode)}'.*{why}"):
        data.read_mask(str(tmp_path / "m.png"))

# ---- the synthetic dataset (Fig. 1 made into data)

def test_synthetic_dataset_is_deterministic_varied_and_balanced():
    a, b = data.SyntheticContext(24, 96, seed=3), data.SyntheticContext(24, 96, seed=3)
    for i in (0, 5):
        assert all(torch.equal(u, v) for u, v in zip(a[i], b[i]))
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], data.SyntheticContext(24, 96, seed=4)[0][0])
    counts, bodies = np.zeros(5), []
    for i in range(len(a)):
        lab = a[i][1]
        present = set(lab.unique().tolist())
        assert {0, 1, 2} <= present <= set(range(5))  # water and wheels in every image
        assert len(present & {3, 4}) == 1  # exactly one body: a bike or a fish
        bodies.append((present & {3, 4}).pop())
        counts += np.bincount(lab.ravel().numpy(), minlength=5)
    frac = counts / counts.sum()
    assert 0.4 < frac[0] < 0.9 and all(frac[1:] > 0.01)
    assert 6 <= bodies.count(3) <= 18  # bikes and fish in balance (24 images, p = 0.5)
    assert a.classes[3:] == ("bike", "fish") and a.palette.shape == (256, 3)

def test_synthetic_bike_and_fish_bodies_come_from_one_distribution():
    """The defining property: up close (inside a body) the two classes are indistinguishable,
    so per-class body colour statistics agree."""
    ds = data.SyntheticContext(120, 96, seed=0)
    means = {3: [], 4: []}
    for i in range(len(ds)):
        image, label = ds.load(i)
        for c in (3, 4):
            if (label == c).any():
                means[c].append(image[label == c].mean(0))
    a3, a4 = np.array(means[3]), np.array(means[4])
    assert len(a3) > 30 and len(a4) > 30
    # two-sample z-test per colour channel: the mean body colours agree within 4 standard errors
    se = np.sqrt(a3.var(0) / len(a3) + a4.var(0) / len(a4))
    assert (np.abs(a3.mean(0) - a4.mean(0)) < 4 * se).all()

def test_synthetic_context_is_far_from_the_body_and_misleading_near_it():
    """What makes context matter: no cue within a margin of the body (up close there is only
    the body); near it the cues point to the wrong class; over the whole image the proportion
    of wheels to water decides."""
    ds = data.SyntheticContext(60, 128, seed=5)
    share, near_share = {3: [], 4: []}, {3: [], 4: []}

    def wheel_share(w):
        return (w == 2).sum().item() / max(1, ((w == 1) | (w == 2)).sum().item())

    for i in range(len(ds)):
        _, label = ds.load(i)
        lab = torch.from_numpy(label.astype(np.int64))
        body = (lab >= 3).float()[None, None]
        touching = F.max_pool2d(body, 7, 1, 3)[0, 0] > 0  # within 3 px of the body
        assert not ((lab == 1) | (lab == 2))[touching].any()
        near = F.max_pool2d(body, 41, 1, 20)[0, 0] > 0  # within 20 px
        cls = int(lab[lab >= 3][0])
        share[cls].append(wheel_share(lab))
        if ((lab[near] == 1) | (lab[near] == 2)).any():
            near_share[cls].append(wheel_share(lab[near]))
    # the whole image decides: the wheel share separates bikes from fish (threshold 0.43)...
    assert max(share[4]) < 0.43 < min(share[3])
    # ...while near the body, bikes have fewer wheels around them than fish do
    assert min(len(near_share[3]), len(near_share[4])) > 20
    assert np.mean(near_share[3]) + 0.1 < np.mean(near_share[4])

# ---- SBD converter

@needs_shared
def test_prepare_sbd_converts_real_mat_files(tmp_path):
    pytest.importorskip("scipy", reason="scipy reads SBD .mat files")
    import scipy.io  # lazy on purpose: scipy is optional (the test is skipped without it)
    voc = tmp_path / "VOC2012"
    shutil.copytree(os.path.join(SHARED, "VOC2012"), voc)
    sbd = tmp_path / "dataset"
    shutil.copytree(os.path.join(SHARED, "SBD", "cls"), sbd / "cls")
    for jpg in os.listdir(os.path.join(SHARED, "SBD", "img")):
        shutil.copy(os.path.join(SHARED, "SBD", "img", jpg), voc / "JPEGImages" / jpg)
    (sbd / "train.txt").write_text("2008_000051\n2007_000033\n")  # the second is VOC val
    (sbd / "val.txt").write_text("2008_000195\n")
    logs = []
    counts = data.prepare_sbd(str(sbd), str(voc), log=logs.append)
    assert counts["train_aug"] == 2 + 6  # two SBD ids + VOC train, minus VOC val
    assert any("WARNING: expected train_aug 10582" in line for line in logs)
    for i in ("2008_000051", "2008_000195"):
        png = voc / "SegmentationClassAug" / f"{i}.png"
        gt = scipy.io.loadmat(os.path.join(SHARED, "SBD", "cls", f"{i}.mat"))["GTcls"]
        assert np.array_equal(data.read_mask(str(png)), gt["Segmentation"][0, 0])
    ds = data.VOCSegmentation(str(voc), "train_aug")
    assert len(ds) == 8 and "2007_000033" not in ds.ids
    # a second run keeps what is there; a different list is not overwritten silently
    assert data.prepare_sbd(str(sbd), str(voc), log=logs.append)["train_aug"] == 8
    (sbd / "val.txt").write_text("")
    with pytest.raises(FileExistsError, match="train_aug.txt exists .* --overwrite"):
        data.prepare_sbd(str(sbd), str(voc), log=logs.append)

def test_prepare_sbd_checks_for_scipy_before_writing_anything(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    voc = make_voc_tree(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(infra.BadInput, match="needs scipy: pip install scipy"):
        data.prepare_sbd(str(tmp_path / "sbd"), str(voc), log=lambda m: None)
    assert sorted(p for p in tmp_path.rglob("*")) == before

# ---- COCO converter; golden fixture: pycocotools

@needs_shared
def test_prepare_coco_on_real_annotations(tmp_path):
    logs = []
    ann = os.path.join(SHARED, "coco", "annotations", "instances_val2017.json")
    res = data.prepare_coco(ann, os.path.join(SHARED, "coco", "val2017"), str(tmp_path),
                            log=logs.append)
    assert res["written"] == ["000000000139"] and res["missing"] == ["000000255917.jpg"]
    assert any("missing image, left out" in line and "000000255917.jpg" in line for line in logs)
    assert (tmp_path / "ImageSets/Segmentation/val2017.txt").read_text() == "000000000139\n"
    ds = data.VOCSegmentation(str(tmp_path), "val2017")
    label = ds[0][1]
    classes = {data.VOC_CLASSES[i] for i in label.unique().tolist() if i != data.IGNORE}
    assert classes == {"background", "person", "chair", "diningtable", "tvmonitor"}
    coco = json.load(open(ann))
    # every VOC-class object under 1000 px is ignored where nothing larger lies over it
    voc = {c["id"] for c in coco["categories"] if c["name"] in data.COCO_TO_VOC}
    small = [a for a in coco["annotations"] if a["image_id"] == 139 and a["category_id"] in voc
             and data.annotation_mask(a, 426, 640).sum() < 1000]
    assert len(small) == 4  # of its 11 VOC-class objects
    for a in small:
        assert (label.numpy()[data.annotation_mask(a, 426, 640).astype(bool)] == 255).mean() > 0.5
    crowd = next(a for a in coco["annotations"] if a["iscrowd"])
    assert isinstance(crowd["segmentation"]["counts"], list)
    assert data.rle_decode(crowd["segmentation"]).sum() == 3386  # its `area` says 4015

# The encoder is the tests' own (users only decode): an independent inverse of data.rle_decode,
# checked against a string pycocotools made.
def rle_encode(mask, compressed=True):
    """(h, w) mask -> COCO RLE dict; the inverse of rle_decode."""
    flat = np.asarray(mask, dtype=np.uint8).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.r_[0, change, flat.size]
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    counts = counts or [0]
    h, w = mask.shape
    return {"size": [h, w], "counts": rle_counts_to_string(counts) if compressed else counts}

def rle_counts_to_string(counts):
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)

@given(h=st.integers(1, 30), w=st.integers(1, 30), p=st.floats(0, 1), seed=st.integers(0, 99),
       compressed=st.booleans())
def test_rle_round_trip(h, w, p, seed, compressed):
    mask = (np.random.default_rng(seed).random((h, w)) < p).astype(np.uint8)
    rle = rle_encode(mask, compressed)
    assert np.array_equal(data.rle_decode(rle), mask)
    if compressed:  # the string form is the list form, re-encoded
        assert data.rle_counts_from_string(rle["counts"]) == rle_encode(mask, False)["counts"]

def test_rle_string_matches_pycocotools():
    # mask and string produced with pycocotools 2.0.11 (mask.encode), kept here as a fixture
    mask = (np.random.default_rng(5).random((7, 9)) < 0.4).astype(np.uint8)
    known = "6120O020N20N00120N10N01030M1O10N011O"
    assert rle_encode(mask)["counts"] == known
    assert np.array_equal(data.rle_decode({"size": [7, 9], "counts": known}), mask)
    assert data.rle_counts_from_string(rle_counts_to_string([100, 5000, 3])) == [100, 5000, 3]

def test_polygon_masks_equal_pycocotools():
    """Every object of the fixture (real COCO val2017 polygons and random ones: self-intersecting,
    several parts, vertices outside the image, fractional and repeated vertices) rasterises to
    exactly pycocotools' decode(merge(frPyObjects(polygons, h, w)))."""
    with open(os.path.join(FIXTURES, "pycocotools_polygons.json")) as f:
        objects = json.load(f)["objects"]
    assert len(objects) >= 300 and sum(o["source"] == "coco" for o in objects) >= 30
    differ = [i for i, o in enumerate(objects)
              if not np.array_equal(data.polygons_to_mask(o["polygons"], o["h"], o["w"]),
                                    data.rle_decode({"size": [o["h"], o["w"]],
                                                     "counts": o["rle"]}))]
    assert differ == []

@given(seed=st.integers(0, 10 ** 6), dx=st.integers(-3, 3), dy=st.integers(-3, 3))
def test_polygon_mask_moves_with_the_polygon_and_ignores_vertex_order(seed, dx, dy):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(8, 32, (int(rng.integers(3, 9)), 2))
    mask = data.polygons_to_mask([pts.ravel().tolist()], 40, 40)
    moved = data.polygons_to_mask([(pts + (dx, dy)).ravel().tolist()], 40, 40)
    assert np.array_equal(np.roll(mask, (dy, dx), axis=(0, 1)), moved)
    for other in (pts[::-1], np.roll(pts, 2, axis=0)):  # same edges: same mask
        assert np.array_equal(data.polygons_to_mask([other.ravel().tolist()], 40, 40), mask)

@given(cx=st.floats(15, 45), cy=st.floats(15, 45), r=st.floats(4, 14), n=st.integers(3, 12),
       rot=st.floats(0, 6.3))
def test_polygon_area_within_a_pixel_boundary(cx, cy, r, n, rot):
    t = rot + np.arange(n) * 2 * np.pi / n
    xs, ys = cx + r * np.cos(t), cy + r * np.sin(t)
    area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
    perimeter = np.hypot(np.diff(np.r_[xs, xs[0]]), np.diff(np.r_[ys, ys[0]])).sum()
    mask = data.polygons_to_mask([np.c_[xs, ys].ravel().tolist()], 60, 60)
    assert abs(int(mask.sum()) - area) <= perimeter + 4

@pytest.mark.parametrize("name", ["../../escaped.jpg", "/tmp/abs.jpg", "sub/x.jpg", ".."])
def test_prepare_coco_refuses_file_names_outside_its_folders(tmp_path, name):
    ann, imgs = coco_file(tmp_path, [{"id": 7, "file_name": name, "height": 40, "width": 40}],
                          [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": SQUARE}])
    out, logs = tmp_path / "deep" / "er" / "out", []
    res = data.prepare_coco(ann, imgs, str(out), log=logs.append)  # named, skipped, counted
    assert res["written"] == [] and "is not a plain file name" in "\n".join(logs)
    with pytest.raises(infra.BadInput, match=r"image record 7: file_name .* is not a plain"):
        data.prepare_coco(ann, imgs, str(out), log=lambda m: None, strict=True)
    assert not list(tmp_path.rglob("escaped*")) and not os.path.exists("/tmp/abs.png")

def test_prepare_coco_names_and_skips_broken_records_or_stops_with_strict(tmp_path):
    good = {"id": 1, "image_id": 7, "category_id": 1, "segmentation": SQUARE}
    broken = [
        {"id": 2, "image_id": 7, "category_id": 1},  # no segmentation
        {"id": 3, "image_id": 7, "segmentation": SQUARE},  # no category
        {"id": 4, "image_id": 7, "category_id": 1, "segmentation": [[1, 2, 3, 4, 5, 6, 7]]},
        {"id": 5, "image_id": 7, "category_id": 1,
         "segmentation": [[1, 2, float("nan"), 4, 5, 6]]},
        {"id": 6, "image_id": 7, "category_id": 1, "segmentation": {"size": [40, 40],
                                                                     "counts": [5, 3]}},
        {"id": 8, "image_id": 7, "category_id": 1,  # a huge wrong size: refused, not decoded
         "segmentation": {"size": [100000, 100000], "counts": [10 ** 10]}},
        {"id": 9, "image_id": 7, "category_id": 1, "segmentation": 5},
    ]
    images = [{"id": 7, "file_name": "a.jpg", "height": 40, "width": 40},
              {"id": 8, "file_name": "b.jpg", "width": 40}]  # no height
    ann, imgs = coco_file(tmp_path, images, [good] + broken)
    logs = []
    res = data.prepare_coco(ann, imgs, str(tmp_path / "out"), log=logs.append)
    assert res["written"] == ["a"] and len(res["skipped"]) == 8
    text = "\n".join(logs)
    for phrase in ("annotation 2 (image 7): no 'segmentation'", "annotation 3 (image 7): no "
                   "'category_id'", "a polygon of 7 coordinates", "not a finite number",
                   "RLE counts that do not cover", "RLE size [100000, 100000] is not the "
                   "image's [40, 40]", "unknown type int", "image 8: no 'height'",
                   "8 broken record(s) skipped"):
        assert phrase in text, phrase
    assert "instances_x.json" in text
    mask = data.read_mask(str(tmp_path / "out" / "SegmentationClass" / "a.png"))
    assert (mask == 15).sum() == 1296
    with pytest.raises(infra.BadInput, match=r"instances_x.json: image 7: annotation 2: no "
                                            r"'segmentation'"):
        data.prepare_coco(ann, imgs, str(tmp_path / "strict"), strict=True, log=lambda m: None)

def test_prepare_coco_again_with_other_settings_refuses_or_rebuilds(tmp_path):
    """Other settings, or the same annotation file name with other contents: refused, or rebuilt
    with --overwrite; the same again is fine."""
    ann, imgs = coco_file(tmp_path, [{"id": 7, "file_name": "a.jpg", "height": 40, "width": 40}],
                          [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": SQUARE},
                           {"id": 2, "image_id": 7, "category_id": 62,
                            "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]]}])  # 324 px chair
    out = str(tmp_path / "out")
    data.prepare_coco(ann, imgs, out, log=lambda m: None)
    path = os.path.join(out, "SegmentationClass", "a.png")
    assert 255 in data.read_mask(path)  # the small chair is ignored
    with pytest.raises(infra.ExistingOutput, match="made with other settings.*--overwrite"):
        data.prepare_coco(ann, imgs, out, min_pixels=100, log=lambda m: None)
    data.prepare_coco(ann, imgs, out, min_pixels=100, overwrite=True, log=lambda m: None)
    assert 9 in data.read_mask(path) and 255 not in data.read_mask(path)  # rebuilt: a chair
    data.prepare_coco(ann, imgs, out, min_pixels=100, log=lambda m: None)  # same: fine
    assert 15 in data.read_mask(path)
    coco = json.load(open(ann))
    coco["annotations"][0]["category_id"] = 62  # the person became a chair, in place
    open(ann, "w").write(json.dumps(coco))
    with pytest.raises(infra.ExistingOutput, match="made with other settings"):
        data.prepare_coco(ann, imgs, out, min_pixels=100, log=lambda m: None)
    data.prepare_coco(ann, imgs, out, min_pixels=100, overwrite=True, log=lambda m: None)
    assert 9 in data.read_mask(path) and 15 not in data.read_mask(path)
    # another split of the same --out shares its masks: other settings refused, even overwriting
    # (found by an attack: split b's record said 5 px while its masks were split a's)
    for overwrite in (False, True):
        with pytest.raises(infra.ExistingOutput, match=r"holds split x, made with "
                                                         r"--min-pixels 100: its masks"):
            data.prepare_coco(ann, imgs, out, "b", 5, overwrite=overwrite, log=lambda m: None)
    assert not os.path.exists(os.path.join(out, "ImageSets", "Segmentation", "b.txt"))
    data.prepare_coco(ann, imgs, out, "b", 100, log=lambda m: None)  # the same settings: fine

def test_concurrent_preparation_of_one_folder_is_refused(one_coco_image, tmp_path):
    ann, imgs = one_coco_image
    out = str(tmp_path / "out")
    lock = infra.Claim("data.py prepare-coco", [("--out", out, "folder")])
    with pytest.raises(infra.BadInput, match=r"out is in use by data.py prepare-coco \(pid"):
        data.main(["prepare-coco", "--annotations", ann, "--images", imgs, "--out", out])
    lock.release()
    data.main(["prepare-coco", "--annotations", ann, "--images", imgs, "--out", out])
    assert os.path.exists(os.path.join(out, "SegmentationClass", "a.png"))

COCO_VALUES = st.one_of(st.integers(-5, 10 ** 7), st.just(10 ** 6), st.text(max_size=3),
                        st.none(), st.lists(st.integers(), max_size=2), st.floats(),
                        st.fixed_dictionaries({"size": st.just([40, 40]), "counts": st.one_of(
                            st.text(max_size=5), st.lists(st.integers(-2, 2000), max_size=4))}))

@given(field=st.sampled_from(["id", "height", "width", "file_name", "record", "ann.id",
                              "ann.image_id", "ann.category_id", "ann.segmentation", "ann"]),
       value=COCO_VALUES, strict=st.booleans())
@settings(max_examples=80)
def test_any_broken_coco_image_record_is_skipped_or_one_line(tmp_path_factory, field, value,
                                                             strict):
    tmp = tmp_path_factory.mktemp("coco")
    img = {"id": 7, "file_name": "a.jpg", "height": 40, "width": 40}
    good = {"id": 1, "image_id": 7, "category_id": 1, "segmentation": SQUARE}
    ann, imgs = coco_file(tmp, [img], [good])
    coco = json.load(open(ann))
    coco["images"] = [value] if field == "record" else [dict(img, **{field: value})]
    if field.startswith("ann"):
        coco["images"] = [img]
        coco["annotations"] = [value if field == "ann" else dict(good, **{field[4:]: value})]
    open(ann, "w").write(json.dumps(coco))
    try:
        res = data.prepare_coco(ann, imgs, str(tmp / "out"), strict=strict, log=lambda m: None)
    except infra.BadInput as e:
        assert "\n" not in str(e) and "instances_x.json" in str(e)
        return
    assert res["written"] in ([], ["a"]) and all("\n" not in w + p for w, p in res["skipped"])
    if not field.startswith("ann"):  # the one image is written, skipped, missing or empty
        assert len(res["skipped"] + res["written"] + res["missing"]) + res["no_voc"] == 1

@pytest.mark.parametrize("top", ["5", "[]", '{"images": [5], "annotations": [], "categories": []}',
                                 '{"images": [], "annotations": [[1]], "categories": [{"id": 1}]}',
                                 '{"images": {}, "annotations": [], "categories": []}'])
def test_coco_files_of_the_wrong_shape_are_one_line(tmp_path, top):
    ann, imgs = coco_file(tmp_path, [], [])
    open(ann, "w").write(top)
    try:
        res = data.main(["prepare-coco", "--annotations", ann, "--images", imgs, "--out",
                         str(tmp_path / "out"), "--strict"])
    except infra.BadInput as e:
        assert "\n" not in str(e) and "instances_x.json" in str(e)
    else:
        raise AssertionError(f"accepted {top}: {res}")
    huge = {"id": 7, "file_name": "a.jpg", "height": 10 ** 6, "width": 10 ** 6}
    coco = {"images": [huge], "annotations": [], "categories": []}
    open(ann, "w").write(json.dumps(coco))
    refused(lambda: data.prepare_coco(ann, imgs, str(tmp_path / "o2"), strict=True,
                                      log=lambda m: None),
            r"image record 7: size 1000000 x 1000000 is not whole numbers >= 1 of at most 40 "
            r"megapixels")

@given(names=st.lists(st.sampled_from(["a.jpg", "a.png", "b c.jpg", "ü.jpg", ".jpg", "x.y.jpg",
                                       "..jpg", "-d.jpg", "sub/e.jpg", "f"]), min_size=1,
                      max_size=6))
@settings(max_examples=30, deadline=None)
def test_converter_writes_only_what_its_reader_accepts(tmp_path_factory, names):
    """prepare-coco round trip: for any image names it accepts, VOCSegmentation reads every
    pair it wrote, and same-stem inputs (a.jpg, a.png) never overwrite each other."""
    top = tmp_path_factory.mktemp("conv")
    images = [{"id": i, "file_name": n, "height": 40, "width": 40} for i, n in enumerate(names)]
    anns = [{"id": 100 + i, "image_id": i, "category_id": 1, "segmentation": SQUARE}
            for i in range(len(names))]
    ann, imgs = coco_file(top, images, anns)
    res = data.prepare_coco(ann, imgs, str(top / "out"), split="s", log=lambda m: None)
    ds = data.VOCSegmentation(str(top / "out"), "s") if res["written"] else None
    assert (len(ds) if ds else 0) == len(res["written"]) == len(set(res["written"]))
    for i in range(len(ds) if ds else 0):
        image, mask = ds.load(i)
        assert mask.shape == (40, 40) and image.shape == (40, 40, 3)
    masks = os.listdir(top / "out" / "SegmentationClass") if res["written"] else []
    assert len(masks) == len(res["written"])  # one mask a written image, none overwritten


# =============================================================================================
# infra.py: one gate per kind of input. Each is proven with generated bad values: one line,
# a non-zero exit and nothing written; and where two commands read the same thing, they agree.
# (infra.py is not the paper: it has no Part I.)
# =============================================================================================

# ---- settings: one table for every command

@given(key=st.sampled_from(sorted(train.parse_args(["--out-dir", "x"]))),
       value=st.one_of(st.integers(), st.text(max_size=3), st.none(), st.booleans()))
def test_every_setting_is_part_of_a_runs_identity_unless_listed_as_safe(key, value):
    saved = train.parse_args(["--out-dir", "x"])
    now = dict(saved, **{key: value})
    differs = json.dumps(now[key], default=repr) != json.dumps(saved[key], default=repr)
    wrong = infra.resume_differences(saved, now)
    assert bool(wrong) == (differs and not (key in infra.SETTINGS and infra.SETTINGS[key].free)), (key, wrong)
    assert not wrong or wrong[0].startswith(f"--{key.replace('_', '-')} ")

RANGED = sorted(n for n in train.FLAGS
                if isinstance(infra.SETTINGS[n].allowed, tuple) and infra.SETTINGS[n].nargs is None)

@given(name=st.sampled_from(RANGED), data_=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
def test_settings_gate_refuses_every_value_out_of_its_range_in_one_line(tmp_path_factory, name,
                                                                        data_, capsys):
    s = infra.SETTINGS[name]
    lo, hi = s.allowed
    if s.kind is int:
        bad = data_.draw(st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1)))
    else:
        bad = data_.draw(st.one_of(st.floats(max_value=lo, exclude_max=True), st.floats(
            min_value=hi, exclude_min=True), st.just(float("nan"))))
    out = tmp_path_factory.mktemp("gate") / "run"
    code, err = cli_run(train.main, TINY + [f"--{name.replace('_', '-')}={bad}",
                                            "--out-dir", str(out)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --{name.replace('_', '-')}")
    assert f"must be {infra.allowed_text(name)}" in err[0] and not out.exists()

@given(rates=st.lists(st.integers(-2, 70), min_size=0, max_size=4),
       depth=st.sampled_from([18, 50]))
@settings(max_examples=25, deadline=None)
def test_a_value_train_accepts_every_reader_accepts(tiny_run, tmp_path_factory, rates, depth):
    """One table for every command: a multi-grid (or any setting) that train.py accepts, a
    checkpoint recording it is accepted by every command that reads checkpoints; one it
    refuses, they refuse. (The issue's case: train took rates eval refused.)"""
    try:
        cfg = train.parse_args(["--depth", str(depth), "--multi-grid"] + [str(r) for r in rates]
                               if rates else ["--depth", str(depth)])
        train_ok = True
    except (infra.BadInput, SystemExit):
        train_ok = False
    ck = torch.load(os.path.join(tiny_run, "checkpoint.pt"), weights_only=True)
    for d in (ck["config"], ck["train_args"]):
        d["depth"], d["multi_grid"] = depth, (cfg["multi_grid"] if train_ok else rates)
    ck["model"] = vortex.DeepLabV3(**dict(ck["config"], multi_grid=None)).state_dict()
    path = str(tmp_path_factory.mktemp("mg") / "ck.pt")
    torch.save(ck, path)
    try:
        infra.read_checkpoint(path)
        reader_ok = True
    except infra.BadInput as e:
        reader_ok = False
        assert "\n" not in str(e) and "multi_grid" in str(e)
    assert reader_ok == train_ok, (rates, depth)

def test_help_states_every_limit(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    for name in train.FLAGS:
        assert f"--{name.replace('_', '-')}" in text, name
        assert "".join(infra.SETTINGS[name].help.split()) in text, name
        if isinstance(infra.SETTINGS[name].allowed, tuple):
            assert "".join(f"[{infra.allowed_text(name)}]".split()) in text, name

# ---- checkpoints: read_weights and read_checkpoint

def changed_checkpoint(tiny_run, path, change):
    """tiny_run's checkpoint with change(ck) applied, saved to `path`."""
    ck = torch.load(os.path.join(tiny_run, "checkpoint.pt"), weights_only=True)
    change(ck)
    torch.save(ck, path)
    return str(path)

def setter(field, value):
    """A change that sets (or, with value 'delete', removes) field 'a' or 'a.b' of a checkpoint."""
    def change(ck):
        *parents, last = field.split(".", 1)
        obj = ck
        for p in parents:
            obj = obj[p]
        if value == "delete":
            del obj[last]
        else:
            obj[last] = value
    return change

BAD_CHECKPOINTS = [  # (field, value, what the one line must name)
    ("config.context", "foo", "config.context is 'foo'; allowed: one of vortex, aspp"),
    ("config.output_stride", 12, "config.output_stride is 12; allowed: one of 8, 16, 32"),
    ("config.depth", 19, "config.depth is 19"),
    ("model.classifier.bias", "delete", "its weights do not fit the model its config describes "
                                        "(model.classifier.bias: missing)"),
    ("model.classifier.weight", torch.zeros(5, 3, 1, 1), "model.classifier.weight: shape (5, 3, "
                                                         "1, 1), the model's (5, 8, 1, 1)"),
    ("config.extra", 1, "config.extra is unknown"),
    ("config.base_channels", "delete", "config.base_channels is missing"),
    ("config.dropout", 1.5, "config.dropout is 1.5; allowed: a number in [0, 0.99]"),
    ("config", [1, 2], "config is [1, 2]; allowed: a dict"),
    ("config.pool_k", 4, "config.pool_k is 4; allowed: an odd whole number"),
    ("data_args.crop", 5, "data_args is"), ("data_args.num_images", -3, "data_args is"),
    ("data_args.num_images", 7, "data_args is {'num_images': 7"),
    ("train_args", None, "train_args is None"), ("iteration", "5", "iteration is '5'"),
    ("iteration", "delete", "iteration is missing"), ("model", torch.zeros(3), "model is"),
    ("config.context", "aspp", "train_args.context is 'vortex' but config.context is 'aspp'"),
    ("train_args.context", "aspp", "train_args.context is 'aspp' but config.context"),
    ("train_args.val_split", "../../x", "train_args.val_split is '../../x'"),
    ("classes", ["a"], "len(classes) is 1 but config.num_classes is 5"),
    ("palette", [[0, 0, 0]], "palette is"), ("dataset", "imagenet", "dataset is 'imagenet'"),
]

@pytest.mark.parametrize("field,value,message", BAD_CHECKPOINTS)
def test_a_checkpoint_is_checked_as_a_whole_before_anything_is_built(tmp_path, tiny_run, field,
                                                                      value, message):
    path = changed_checkpoint(tiny_run, tmp_path / "ck.pt", setter(field, value))
    for use in (lambda: evaluation.main(["--checkpoint", path, "--workers", "0"]),
                lambda: train.main(TINY + ["--iters", "1", "--out-dir", str(tmp_path / "i"),
                                           "--init-from", path, "--no-eval"]),
                lambda: experiments.main(["erf", path, "--out", str(tmp_path / "e.png")])):
        assert path + ": " in refused(use, re.escape(message))
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # nothing evaluated, trained or drawn

FIELDS = ([f"config.{k}" for k in infra.CONFIG] + list(infra.CHECKPOINT_FIELDS) +
          list(infra.RESUME_FIELDS) + [f"train_args.{k}" for k in
                                            ("val_split", "data_root", "seed", "context")])

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(),
                   st.text(max_size=4), st.lists(st.integers(-3, 300), max_size=3),
                   st.dictionaries(st.sampled_from(["state", "num_images", "x"]),
                                   st.integers(-1, 3), max_size=2),
                   st.just(torch.zeros(2, 2)), st.just("delete"))

@given(field=st.sampled_from(FIELDS), value=VALUES)
@settings(max_examples=150)
def test_any_corrupted_field_is_one_line_naming_it_or_harmless(tiny_run, field, value):
    """Random corruptions of a valid checkpoint's fields: a one-line BadInput that names the
    field (or the weights), never another exception; accepted only when the value is allowed."""
    ck = torch.load(os.path.join(tiny_run, "checkpoint.pt"), weights_only=True)
    parent, last = (ck[field.split(".")[0]], field.split(".")[1]) if "." in field else (ck, field)
    before = json.dumps(parent.get(last, "absent"), default=repr)
    setter(field, value)(ck)
    with mock.patch.object(infra, "read_weights", lambda p: ck):
        try:
            infra.read_checkpoint("ck.pt", resume=True)
        except infra.BadInput as e:
            text = str(e)
            assert "\n" not in text and text.startswith("ck.pt") and (
                field.split(".")[-1] in text or "weights do not fit" in text), text
            return
    harmless = {"config.dropout", "train_args.val_split", "train_args.data_root",
                "train_args.seed", "scaler", "rng_cuda", "iteration", "epoch", "batch_in_epoch",
                "train_args"}  # other allowed values exist for these
    assert (field in harmless and value != "delete") or json.dumps(value, default=repr) == \
        before, (field, value)

BAD_TENSORS = [  # (tensor, what the one line says)
    (torch.full((5,), float("nan")), "holds NaN or infinite values in float32"),
    (torch.full((8,), 1e300, dtype=torch.float64), "in float32"),
    (torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), "NaN or infinite"),
    (torch.tensor([float("-inf")], dtype=torch.float16), "NaN or infinite"),
    (torch.zeros(4, dtype=torch.complex64), "only dense real tensors"),
    (torch.eye(3).to_sparse(), "only dense real tensors"),
]

@pytest.mark.parametrize("bad,message", BAD_TENSORS + [("negative variance", "negative variance")])
def test_checkpoint_gate_reads_tensors_as_the_model_will_run_them(tmp_path, tiny_run, capsys, bad,
                                                                  message):
    """Every reader of weights (eval.py, train.py --init-from, --pretrained's load_pretrained)
    refuses a tensor the model could not run, in one line naming it, and writes nothing."""
    ck = torch.load(os.path.join(tiny_run, "checkpoint.pt"), weights_only=True)
    key = "classifier.bias" if not isinstance(bad, str) else "backbone.bn1.running_var"
    ck["model"][key] = -ck["model"][key].abs() - 1 if isinstance(bad, str) else bad
    path = str(tmp_path / "ck.pt")
    torch.save(ck, path)
    before = sorted(os.listdir(tmp_path))
    for main, argv in ((evaluation.main, ["--checkpoint", path, "--workers", "0"]),
                       (train.main, TINY + ["--init-from", path, "--out-dir",
                                            str(tmp_path / "r"), "--iters", "1"]),
                       (lambda p: infra.load_pretrained(ResNet(18, base_channels=4), p), path)):
        code, err = cli_run(main, argv, capsys)
        assert code == 2 and len(err) == 1 and f"tensor model.{key}" in err[0] and message in \
            err[0], err
    assert sorted(os.listdir(tmp_path)) == before

def test_an_unreadable_checkpoint_says_it_cannot_be_read(tmp_path, tiny_run, monkeypatch):
    """Truncated (a resume), empty (--pretrained), not readable, or a folder: one line that says
    it cannot be read."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    ck = out / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cannot read .*checkpoint.pt as a weights-only torch "
                                         "checkpoint: it is truncated"):
        train.main(TINY + ["--iters", "3", "--out-dir", str(out), "--resume"])
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot read .*empty.pth as a weights-only torch "
                                         r"checkpoint"):
        infra.load_pretrained(ResNet(18, base_channels=2), str(tmp_path / "empty.pth"))
    path = os.path.join(tiny_run, "checkpoint.pt")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(infra.BadInput, match=r"cannot read .*run/checkpoint.pt: permission denied"):
        infra.read_checkpoint(path)
    monkeypatch.undo()
    with pytest.raises(infra.BadInput, match=r"cannot read .*: it is a folder"):
        infra.read_checkpoint(str(tmp_path))

def test_a_mixed_up_checkpoint_is_refused_on_the_command_line(tmp_path, tiny_run):
    path = changed_checkpoint(tiny_run, tmp_path / "ck.pt", setter("config.context", "aspp"))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--checkpoint", path],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {path}: train_args.context is 'vortex' but "
                                        f"config.context is 'aspp': they must agree (an edited "
                                        f"or mixed-up checkpoint); refused"]
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]

def test_an_empty_weights_flag_is_refused_not_random_initialisation(tmp_path, capsys):
    for flag in ("--pretrained", "--init-from", "--data-root"):
        code, err = cli_run(train.main, TINY + [flag, "", "--out-dir", str(tmp_path / "r")],
                            capsys)
        assert code == 2 and err == [f"error: {flag} '': must be a file or folder name (it is "
                                     f"empty)"]
    assert os.listdir(tmp_path) == []

# ---- outputs: Claim (never onto or into an input, locked, undone when refused)

def test_an_output_never_replaces_or_writes_into_an_input_even_with_force(tmp_path, tiny_run):
    ck = os.path.join(tiny_run, "checkpoint.pt")
    before = open(ck, "rb").read()
    refused(lambda: evaluation.main(["--checkpoint", ck, "--json", ck, "--force"]),
            r"output .*checkpoint.pt is the input --checkpoint")
    os.link(ck, tmp_path / "hard.json")  # another name of the same file
    refused(lambda: evaluation.main(["--checkpoint", ck, "--json", str(tmp_path / "hard.json"),
                                     "--force"]), r"hard.json is the input --checkpoint")
    assert open(ck, "rb").read() == before
    root = make_voc_tree(tmp_path / "voc")
    masks = root / "SegmentationClass"
    refused(lambda: evaluation.main(["--checkpoint", ck, "--dataset", "voc", "--data-root",
                                     str(root), "--split", "train", "--save-dir", str(masks),
                                     "--force"]), r"SegmentationClass lies inside the input "
                                                  r"--data-root")
    refused(lambda: evaluation.main(["--checkpoint", ck, "--dataset", "voc", "--data-root",
                                     str(masks), "--split", "train", "--save-dir", str(root),
                                     "--force"]), r"holds the input --data-root")
    img = tmp_path / "s.png"
    Image.fromarray(data.render_synthetic(0, 0, 40)[0]).save(img)
    pic = img.read_bytes()
    refused(lambda: evaluation.main(["--checkpoint", ck, "--image", str(img), "--out", str(img),
                                     "--force"]), r"s.png is the input --image")
    assert img.read_bytes() == pic and sorted(os.listdir(tmp_path)) == ["hard.json", "s.png",
                                                                        "voc"]
    shutil.copy(ck, tmp_path / "voc" / "ck.pt")  # an erf figure never lands on a checkpoint
    refused(lambda: experiments.main(["erf", str(tmp_path / "voc" / "ck.pt"), "--out",
                                      str(tmp_path / "voc" / "ck.pt"), "--force"]),
            r"is the input CHECKPOINT")
    refused(lambda: data.main(["prepare-sbd", "--sbd", str(root / "SegmentationClassAug" / "s"),
                               "--voc", str(root)]), r"SegmentationClassAug holds the input --sbd")
    assert not os.path.exists(root / "SegmentationClassAug")

@given(a=st.lists(st.sampled_from("xy"), min_size=1, max_size=3),
       b=st.lists(st.sampled_from("xy"), min_size=1, max_size=3), alias=st.booleans())
@settings(max_examples=40)
def test_outputs_related_to_an_input_are_refused_exactly(tmp_path_factory, a, b, alias):
    """Output and input paths in one tree (reached through a symbolic link or not): refused
    exactly when one is the other or lies inside it, whatever --force says."""
    top = tmp_path_factory.mktemp("tree")
    os.symlink(top, top / "link")
    out = os.path.join(top, "link" if alias else "", *a)
    inp = os.path.join(top, *b)
    related = a[:len(b)] == b or b[:len(a)] == a
    try:
        infra.refuse_inputs([out], [("--in", inp)])
        assert not related
    except infra.BadInput as e:
        assert related and "--in" in str(e)

NAMES = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12)

@given(kind=st.sampled_from(["same", "inside", "holds", "folder-for-file", "too-long", "nul",
                             "format", "no-stem"]), name=NAMES.filter(lambda s: "/" not in s and s not in
                                                          ("", ".", "..") and "\0" not in s))
@settings(max_examples=40, deadline=None)
def test_output_gate_refuses_in_one_line_and_leaves_nothing(tmp_path_factory, kind, name):
    top = tmp_path_factory.mktemp("claim")
    inp = top / "in"
    inp.mkdir()
    (inp / "data.txt").write_text("input")
    out = {"same": inp / "data.txt", "inside": inp / "sub" / "r.json", "holds": top,
           "folder-for-file": inp, "too-long": top / "new" / (name + "x" * 251 + ".json"),
           "nul": top / "new" / (name + "\0.json"), "format": top / "new" / (name + ".txt"),
           "no-stem": top / "new" / ".json"}[kind]
    before = sorted(str(p) for p in top.rglob("*"))
    with pytest.raises(infra.BadInput) as e:
        infra.Claim("test", [("--json", str(out), (".json",))], [("--in", str(inp))], force=True)
    assert "\n" not in str(e.value) and "--json" in str(e.value) or "input --in" in str(e.value)
    assert sorted(str(p) for p in top.rglob("*")) == before

def test_split_names_and_output_names_are_refused_before_anything_is_written(
        tmp_path, tiny_run, voc_root, one_coco_image):
    ck, root = os.path.join(tiny_run, "checkpoint.pt"), voc_root
    (tmp_path / "outside_list.txt").write_text("a\nb\n")
    escape = os.path.relpath(tmp_path / "outside_list", root / "ImageSets" / "Segmentation")
    refused(lambda: evaluation.main(["--checkpoint", ck, "--dataset", "voc", "--data-root",
                                     str(root), "--split", escape]),
            r"--split \.\./.*outside_list: must be a plain file name")
    for flag in ("--split", "--val-split"):
        refused(lambda: train.main(TINY + ["--dataset", "voc", "--data-root", str(root), flag,
                                           escape, "--out-dir", str(tmp_path / "r")]),
                rf"{flag} \.\./.*: must be a plain file name")
    ann, imgs = one_coco_image
    refused(lambda: data.main(["prepare-coco", "--annotations", ann, "--images", imgs, "--out",
                               str(tmp_path / "c"), "--split", "../../../escaped"]),
            r"--split \.\./\.\./\.\./escaped: must be a plain file name")
    for argv in (["prepare-coco", "--annotations", ann, "--images", imgs, "--out", imgs],
                 ["prepare-coco", "--annotations", ann, "--images",
                  str(tmp_path / "c2" / "JPEGImages"), "--out", str(tmp_path / "c2")]):
        refused(lambda: data.main(argv), r"(is|lies inside) the input --images")
    refused(lambda: data.main(["prepare-coco", "--annotations", ann, "--images", imgs, "--out",
                               ""]), r"--out '': must be a file or folder name")
    for argv in (["context", "--seeds", "1", "--out-dir", ""], ["figure", "synthetic", "--out", ""],
                 ["erf", ck, "--out", ""], ["ablation", "--seeds", "1", "--out-dir", ""]):
        refused(lambda: experiments.main(argv), r"--out(-dir)? '': must be a file or folder name")
    for flag in ("--json", "--save-dir"):
        refused(lambda: evaluation.main(["--checkpoint", ck, flag, " "]), rf"{flag} ' ': must be a file or folder name")
    assert sorted(os.listdir(tmp_path)) == ["imgs", "instances_x.json", "outside_list.txt"]
    assert sorted(os.listdir(root)) == ["ImageSets", "JPEGImages", "SegmentationClass"]

def test_outputs_are_checked_writable_before_any_work(tmp_path, tiny_run):
    (tmp_path / "file").write_text("x")
    with pytest.raises(infra.BadInput, match=r"cannot write into .*file/sub"):
        evaluation.main(["--checkpoint", os.path.join(tiny_run, "checkpoint.pt"), "--json",
                         str(tmp_path / "file" / "sub" / "r.json")])

def test_one_run_owns_its_folder_and_a_dead_holder_leaves_no_lock(tmp_path):
    """A second train.py on a folder in use is refused naming the holder; the lock goes with its
    process, even after kill -9."""
    out = str(tmp_path / "run")
    holder = infra.Claim("train.py", [("--out-dir", out, "folder")])
    with pytest.raises(infra.BadInput, match=rf"run is in use by train.py \(pid {os.getpid()} "):
        train.main(TINY + ["--iters", "1", "--out-dir", out, "--no-eval"])
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))
    holder.release()
    code = f"import sys, time; sys.path.insert(0, {HERE!r}); import infra; " \
           f"infra.Claim('a killed run', [('--out-dir', {out!r}, 'folder')]); print('locked', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(infra.BadInput, match=r"in use by a killed run \(pid"):
        train.main(TINY + ["--iters", "1", "--out-dir", out, "--no-eval"])
    proc.kill()
    proc.wait()
    train.main(TINY + ["--iters", "1", "--out-dir", out, "--no-eval"])  # the lock died with it
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))

def test_two_commands_cannot_both_write_one_output(tmp_path, tiny_run):
    """The issue's case: two `eval.py --json same.json` started together. One writes it, the
    other is refused in one line (in use, or exists); the file is one whole result."""
    out = str(tmp_path / "same.json")
    cmd = [sys.executable, os.path.join(HERE, "eval.py"), "--checkpoint",
           os.path.join(tiny_run, "checkpoint.pt"), "--workers", "0", "--json", out]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(e for code, e in results if code == 2).strip().splitlines()
    # "another process": refused in the instant between the holder's lock and its name written
    assert len(err) == 1 and re.search(r"in use by (eval.py|another process)|exists; pass --force",
                                       err[0]), err
    assert json.load(open(out))["checkpoint"].endswith("checkpoint.pt")
    assert sorted(os.listdir(tmp_path)) == ["same.json"]  # no lock, no temp file left

def test_a_lock_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "train.py")] + TINY + ["--out-dir", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)))
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(r"error: cannot write the lock .*run/\.lock: file too large: the "
                        r"file-size limit \(ulimit -f\) is 0\.0 MB.*; nothing was started\n",
                        proc.stderr), proc.stderr
    assert os.listdir(tmp_path) == []

# ---- records and names: read_text, read_list, read_record, read_log, plain_name

@given(name=st.one_of(st.text(alphabet="ab./\\\0 ", min_size=0, max_size=6), NAMES))
@settings(max_examples=50)
def test_a_name_that_becomes_a_path_stays_inside_its_folder(name):
    """One name rule for every id and field: a plain name stays in its folder and is one word
    of a list line (exactly what the converters may write and the readers accept); any other
    name is refused in one line."""
    if infra.is_plain_name(name):
        assert infra.plain_name(name, "--split") == name
        assert os.path.basename(name) == name and name == name.strip() and name.split() == [name]
        assert os.path.normpath(os.path.join("root", name)).startswith("root" + os.sep)
        path = os.path.normpath(os.path.join("/r/oot", name + ".txt"))
        assert os.path.dirname(path) == "/r/oot" and "\0" not in name
    else:
        with pytest.raises(infra.BadInput) as e:
            infra.plain_name(name, "--split")
        assert "\n" not in str(e.value) and str(e.value).startswith("--split ")

@given(ids=st.lists(st.text("abcxyz_-0123456789.", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")), unique=True, max_size=6),
    codec=st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]), newline=st.sampled_from(
        ["\n", "\r\n"]), trailer=st.sampled_from(["", " -1", "\t1"]))
@settings(max_examples=40, deadline=None)
def test_lists_are_read_whatever_editor_saved_them(tmp_path_factory, ids, codec, newline,
                                                   trailer):
    path = tmp_path_factory.mktemp("list") / "l.txt"
    path.write_bytes("".join(i + trailer + newline for i in ids).encode(codec))
    assert infra.read_list(str(path)) == ids

@given(raw=st.binary(max_size=64))
@settings(max_examples=80, deadline=None)
def test_records_and_lists_of_any_bytes_are_read_or_one_line(tmp_path_factory, raw):
    path = str(tmp_path_factory.mktemp("rec") / "r.json")
    open(path, "wb").write(raw)
    for read in (infra.read_list, infra.read_record, infra.read_log,
                 lambda p: infra.read_json(p, "annotations")):
        try:
            read(path)
        except infra.BadInput as e:
            assert "\n" not in str(e) and path in str(e)

def test_a_record_over_its_size_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"a\n" * 100)
    with pytest.raises(infra.BadInput, match=r"split list .*big.txt is 0.0 MB; the limit is 0 MB"):
        infra.read_text(str(path), "split list", limit=10)

LOG = "".join(json.dumps({"iter": i, "loss": 1.0 / i, "lr": 0.1, "img_per_s": 3.0,
                          "time": 0.0}) + "\n" for i in (1, 2, 3))

@given(cut=st.integers(0, 200), junk=st.text(alphabet='{}":,0123456789 aeilnrst\x00', max_size=8))
def test_a_torn_last_line_of_the_log_is_dropped_and_nothing_else(tmp_path_factory, cut, junk):
    """A crash while a line is written leaves a prefix of it (or junk) without its newline: it
    is dropped with a warning; a resumed run's log keeps the whole lines up to its checkpoint."""
    path = tmp_path_factory.mktemp("log") / "log.jsonl"
    torn = (LOG.splitlines()[0][:cut] + junk).replace("\n", "")
    path.write_text(LOG + torn)
    assert [r["iter"] for r in infra.read_log(str(path))] == [1, 2, 3]
    train.truncate_log(str(path), 2)
    assert path.read_text() == "".join(LOG.splitlines(True)[:2])

def test_damaged_records_of_experiments_and_preparations_are_one_line(tmp_path, one_coco_image):
    first = experiments.setting_file(experiments.SETTINGS[0][0], experiments.CONTEXT_ROWS[0], 1)
    for argv, record in (
            (["context", "--seeds", "1", "--iters", "1"], first),
            (["ablation", "--seeds", "1"] + TINY + ["--iters", "1"], "none-seed0/ablation.json")):
        for text in ("", "{", "[]", '{"config": {}, "miou": "high"}'):
            out = tmp_path / argv[0]
            os.makedirs(os.path.dirname(out / record), exist_ok=True)
            (out / record).write_text(text)
            refused(lambda: experiments.main(argv + ["--out-dir", str(out)]),
                    rf"{re.escape(record)} is not a record that can be read .*; delete it to run "
                    rf"that part again")
            assert not os.path.exists(out / ".lock")
    ann, imgs = one_coco_image
    out = str(tmp_path / "coco")
    data.prepare_coco(ann, imgs, out, log=lambda m: None)
    record = os.path.join(out, "ImageSets", "Segmentation", "x.settings.json")
    open(record, "w").write('{"annotations": ')
    refused(lambda: data.main(["prepare-coco", "--annotations", ann, "--images", imgs, "--out",
                               out]), r"x.settings.json is not a record .*; pass --overwrite")
    data.main(["prepare-coco", "--annotations", ann, "--images", imgs, "--out", out,
               "--overwrite"])
    assert infra.read_record(record)["min_pixels"] == 1000

# ---- around: atomic writes, one-line errors (cli)

def test_atomic_save_respects_umask_cleans_leftovers_and_names_failures(tmp_path):
    path = tmp_path / "checkpoint.pt"
    (tmp_path / ".tmp-abc123checkpoint.pt").write_bytes(b"x" * 100)  # a killed save's leftover
    (tmp_path / ".tmp-keepother.png").write_bytes(b"x")  # another file's: not ours to remove
    old = os.umask(0o022)
    try:
        infra.atomic_save(str(path), lambda f: f.write(b"ok"))
    finally:
        os.umask(old)
    assert path.read_bytes() == b"ok" and (path.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-keepother.png", "checkpoint.pt"]

    def fails(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    with pytest.raises(infra.BadInput, match=r"cannot write .*checkpoint.pt: no space left on "
                                            r"the device \(it stopped after 0.0 MB; \d+ MB free"):
        infra.atomic_save(str(path), fails)
    assert path.read_bytes() == b"ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-keepother.png", "checkpoint.pt"]

def test_a_failed_save_says_why_in_words(tmp_path, monkeypatch):
    """torch.save reports a full disk or the file-size limit as an 'enforce fail ... unexpected
    pos' RuntimeError: the message says which, and how far the write got."""
    path = str(tmp_path / "checkpoint.pt")

    def torch_fails(f):
        f.write(b"x" * 2 ** 20)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1048576")
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(infra.shutil, "disk_usage", lambda d: usage._replace(free=1000))
    with pytest.raises(infra.BadInput, match=r"no space left on the device \(it stopped after "
                                            r"1.0 MB; 0 MB free there\)"):
        infra.atomic_save(path, torch_fails)
    monkeypatch.undo()
    # the real file-size limit (what `ulimit -f 1024` sets in a shell): 1 MB
    code = ("import sys, torch; sys.path.insert(0, %r); import infra; "
            "infra.cli(lambda: infra.atomic_save(%r, lambda f: torch.save(torch.zeros(10 ** 6), f)))"
            % (HERE, path))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                             (2 ** 20, 2 ** 20)))
    assert p.returncode == 2, p.stderr
    assert re.fullmatch(r"error: cannot write .*checkpoint.pt: file too large: the file-size "
                        r"limit \(ulimit -f\) is 1.0 MB and it stopped after 1.0 MB\n", p.stderr)
    assert sorted(os.listdir(tmp_path)) == []

def test_errors_in_loader_workers_are_one_line(capsys):
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise infra.BadInput("cannot read image x.jpg: image file is truncated")
    with pytest.raises(SystemExit) as e:
        infra.cli(lambda: next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1))))
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: cannot read image x.jpg: image file is truncated\n"


# =============================================================================================
# train.py, Part I: the paper (4.1 recipe, poly LR, synchronised batch norm; 4.2 stages;
# the training step)
# =============================================================================================

# ---- the recipe and the poly learning rate (4.1)

def test_presets_and_flags():
    cfg = train.parse_args(["--dataset", "voc_aug", "--data-root", "x"])
    assert (cfg["depth"], cfg["output_stride"], cfg["multi_grid"], cfg["context"]) == \
        (101, 8, [1, 2, 4], "vortex")
    assert (cfg["crop"], cfg["batch_size"], cfg["lr"], cfg["iters"], cfg["momentum"],
            cfg["weight_decay"], cfg["power"], cfg["scale"]) == \
        (513, 16, 0.007, 30000, 0.9, 1e-4, 0.9, [0.5, 2.0])
    assert train.parse_args(["--dataset", "coco"])["iters"] == 200000
    cfg = train.parse_args(["--dataset", "voc_aug", "--lr", "0.01", "--context", "module_a",
                            "--pool-k", "9"])
    assert (cfg["lr"], cfg["context"], cfg["pool_k"]) == (0.01, "module_a", 9)

def test_poly_lr():
    """4.1: lr = base (1 - iter / max_iter) ^ 0.9, and our warmup (off in the paper's presets)."""
    base, n = 0.007, 300
    lrs = [train.poly_lr(base, i, n, 0.9) for i in range(n + 1)]
    assert lrs[0] == base and lrs[-1] == 0.0
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert all(math.isclose(lr, base * (1 - i / n) ** 0.9) for i, lr in enumerate(lrs))
    # a warmup ramps up, then follows the same curve; it is off in the paper's presets
    base, n = 0.02, 1000
    lrs = [train.poly_lr(base, i, n, 0.9, 0.1) for i in range(n)]
    assert lrs[0] == base * 0.01 and all(a < b for a, b in zip(lrs[:99], lrs[1:100]))
    assert all(math.isclose(lr, base * (1 - i / n) ** 0.9) for i, lr in enumerate(lrs)
               if i >= 99)
    assert train.poly_lr(base, 5, n, 0.9, 0.0) == train.poly_lr(base, 5, n, 0.9)
    assert train.parse_args([])["warmup"] == 0.3  # the synthetic preset
    assert train.parse_args(["--dataset", "voc_aug"])["warmup"] == 0.0  # the paper's schedule
    with pytest.raises(infra.BadInput, match=r"--warmup 1.5: must be a number in \[0, 0.99\]"):
        train.parse_args(["--warmup", "1.5"])

# ---- synchronised batch norm (4.1)

SYNCBN_CASES = (("normal", 0.0, torch.float64), ("large_mean", 1e4, torch.float32),
                ("float32", 0.0, torch.float32))

def _syncbn_cases(n):
    """(name, input, loss weights, BatchNorm2d) for each case, the same in every process."""
    torch.manual_seed(0)
    for name, offset, dtype in SYNCBN_CASES:
        x = (torch.randn(n, 5, 6, 7, dtype=torch.float64) * 3 + offset).to(dtype)
        w = torch.randn_like(x)
        bn = torch.nn.BatchNorm2d(5).to(dtype)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
        yield name, x, w, bn

def _ddp_batch(sizes):
    """4 images, labels partly ignored (255) so that the two halves hold different numbers of
    labelled pixels; with sizes (3, 5) the first half has none at all."""
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 3, 33, 33, generator=g), torch.randint(0, 3, (4, 33, 33), generator=g)
    t[torch.rand(t.shape, generator=g) < 0.3] = 255
    t[1, :20] = 255
    if sizes == (3, 5):
        t[:2] = 255
    return x, t

def _syncbn_worker(rank, world, init_file, sizes, out_dir):
    _init(rank, world, init_file)
    results = {}
    for name, x, w, bn in _syncbn_cases(sum(sizes)):
        sync = train.convert_sync_batchnorm(torch.nn.Sequential(bn))
        lo = sum(sizes[:rank])
        xr = x[lo:lo + sizes[rank]].clone().requires_grad_()
        y = sync(xr)
        (y * w[lo:lo + sizes[rank]]).sum().backward()
        results[name] = {"y": y.detach(), "xgrad": xr.grad, "wgrad": sync[0].weight.grad,
                         "bgrad": sync[0].bias.grad, "rm": sync[0].running_mean,
                         "rv": sync[0].running_var}
    # DDP: one SGD step of a tiny model on this rank's half of the batch, through the loop's
    # own train_step and its loss normalisation
    torch.manual_seed(1)
    model = DeepLabV3(3, depth=18, base_channels=4, context_channels=8, dropout=0.0)
    train.convert_sync_batchnorm(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, t = _ddp_batch(sizes)
    half = slice(2 * rank, 2 * rank + 2)
    run = argparse.Namespace(device=torch.device("cpu"), world=world, net=ddp, ddp=ddp,
                             amp_dtype=None, scaler=None, optimizer=opt,
                             cfg={"channels_last": False})
    train.train_step(run, [(x[half], t[half])])
    results["ddp"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()

@pytest.mark.parametrize("sizes", [(4, 4), (3, 5)])
def test_syncbn_and_ddp_equal_one_process_on_the_whole_batch(sizes, tmp_path):
    _spawn(_syncbn_worker, 2, sizes, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, x, w, bn in _syncbn_cases(sum(sizes)):
        dtype = x.dtype
        if name == "large_mean":  # reference in float64: the float32 one-pass BN is the victim
            bn, x, w = bn.double(), x.double(), w.double()
        xr = x.clone().requires_grad_()
        y = bn(xr)
        (y * w).sum().backward()
        got = {k: [r[name][k].double() for r in ranks] for k in ranks[0][name]}
        tol = dict(rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-10)
        # at mean 1e4 a float32 holds the mean to ~5e-4, i.e. 2e-4 of a std of 3
        ytol = dict(rtol=1e-5, atol=1e-3) if name == "large_mean" else tol
        torch.testing.assert_close(torch.cat(got["y"]), y.double(), **ytol)
        torch.testing.assert_close(torch.cat(got["xgrad"]), xr.grad.double(), **ytol)
        wtol = dict(rtol=1e-3, atol=1e-2) if name == "large_mean" else dict(rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sum(got["wgrad"]), bn.weight.grad.double(), **wtol)
        torch.testing.assert_close(sum(got["bgrad"]), bn.bias.grad.double(), **wtol)
        for r in range(2):  # every rank holds the same, whole-batch running statistics
            torch.testing.assert_close(got["rm"][r], bn.running_mean.double(), **tol)
            torch.testing.assert_close(got["rv"][r], bn.running_var.double(), rtol=1e-5,
                                       atol=1e-5)
        if name == "large_mean":  # the one-pass float32 formula this guards against is far off
            x32 = x.float()
            naive = (x32.square().mean((0, 2, 3)) - x32.mean((0, 2, 3)).square()).double()
            assert ((naive - x.var((0, 2, 3), unbiased=False)).abs() > 0.05).any()
    # DDP + SyncBN on 2 ranks x 2 images == one process x 4 images with plain BN
    torch.manual_seed(1)
    model = DeepLabV3(3, depth=18, base_channels=4, context_channels=8, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, t = _ddp_batch(sizes)
    # the mean over the whole batch's labelled pixels, however they fall over the ranks
    (train.loss_fn(model(x), t) / (t != 255).sum()).backward()
    opt.step()
    for k, v in model.state_dict().items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["ddp"][k].double(), v.double(), rtol=1e-4,
                                       atol=1e-5, msg=k)

def _torch_vs_ours_worker(rank, world, init_file, out_dir):
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    x = (torch.randn(8, 6, 9, 9) * 3 + 1)[rank * 4:(rank + 1) * 4].cuda().requires_grad_(True)
    outs = {}
    for name, bn in (("torch", torch.nn.SyncBatchNorm(6)), ("ours", train.SyncBatchNorm2d(6))):
        bn = bn.cuda()
        y = bn(x)
        (g,) = torch.autograd.grad((y * torch.arange(6, device="cuda")[:, None, None]).sum(), x)
        outs[name] = (y.detach().cpu(), g.cpu(), bn.running_mean.cpu(), bn.running_var.cpu())
    torch.save(outs, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()

@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")
def test_ours_equals_torch_syncbatchnorm_on_two_gpus(tmp_path):
    _spawn(_torch_vs_ours_worker, 2, str(tmp_path))
    for rank in range(2):
        outs = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        for a, b in zip(outs["torch"], outs["ours"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

# ---- the three stages of 4.2: --init-from, --freeze-bn

def test_freeze_bn_keeps_statistics_and_parameters(tmp_path, tiny_run):
    out = str(tmp_path / "run")
    src = os.path.join(tiny_run, "checkpoint.pt")
    train.main(TINY + ["--iters", "2", "--out-dir", out, "--no-eval", "--freeze-bn",
                       "--init-from", src, "--batch-size", "1"])
    before = torch.load(src, weights_only=True)["model"]
    after = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]
    bn = [k for k in before if "bn" in k or k.endswith(("running_mean", "running_var"))]
    assert bn and all(torch.equal(before[k], after[k]) for k in bn)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])

def test_init_from_another_context_takes_the_backbone_only(tmp_path, capsys):
    train.main(TINY + ["--iters", "1", "--out-dir", str(tmp_path / "aspp"), "--no-eval",
                       "--context", "aspp"])
    train.main(TINY + ["--iters", "1", "--out-dir", str(tmp_path / "vx"), "--no-eval",
                       "--init-from", str(tmp_path / "aspp" / "checkpoint.pt")])
    assert "holds a aspp model, this run is vortex: only its backbone is taken" in \
        capsys.readouterr().out

# ---- one training step: the loss is the per-pixel mean over the whole batch

@settings(max_examples=10)
@given(counts=st.lists(st.integers(0, 60), min_size=1, max_size=4), seed=st.integers(0, 99))
@example(counts=[0, 0], seed=0)  # a batch with no labelled pixel at all
def test_accumulated_micro_steps_give_the_whole_batch_per_pixel_mean(counts, seed):
    """However the labelled pixels fall over the micro-steps (some may have none), the summed
    gradients equal those of one mean over all the batch's labelled pixels. With none at all,
    the loss is 0 (not 0/0) and every gradient 0: the step changes nothing."""
    torch.manual_seed(seed)
    model = torch.nn.Conv2d(3, 4, 3, padding=1)
    run = argparse.Namespace(device=torch.device("cpu"), world=1, net=model, ddp=None,
                             amp_dtype=None, scaler=None, cfg={"channels_last": False},
                             optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    batch = []
    for n in counts:
        t = torch.full((1, 8, 8), 255)
        t.view(-1)[torch.randperm(64)[:n]] = torch.randint(0, 4, (n,))
        batch.append((torch.randn(1, 3, 8, 8), t))
    total = train.train_step(run, batch)  # one SGD step with lr 1: the update is -gradient
    grads = [b - p.detach() for b, p in zip(before, model.parameters())]
    if not any(counts):
        assert total.item() == 0.0 and all(not g.any() for g in grads)
    with torch.no_grad():
        for b, p in zip(before, model.parameters()):
            p.copy_(b)
    x, t = torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])
    ref = train.loss_fn(model(x), t) / max(1, int((t != 255).sum()))
    ref.backward()
    torch.testing.assert_close(total, ref.detach())
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


# =============================================================================================
# train.py, Part II: engineering (starting or resuming, the data stream, signals and sync
# points, the command line, several processes and nodes)
# =============================================================================================

# ---- resuming: bit for bit, the same experiment or refused

@pytest.mark.parametrize("flags,stops,position,logged", [
    ([], (3, 1), (1, 3), [1, 2, 3, 4, 5, 6, 7]),  # the second stop: exactly at the epoch's end
    # --accum-steps 3 with batch 6: micro-batches of 2, 8 per epoch of 16 images, so optimizer
    # steps straddle epoch ends
    (["--batch-size", "6", "--accum-steps", "3", "--log-every", "2"], (3, 2), (2, 2),
     [2, 3, 4, 5, 6])], ids=["plain", "accumulation"])
def test_resume_is_exact(tmp_path, flags, stops, position, logged):
    """A run stopped and resumed twice equals a straight one bitwise: weights, momentum, the
    place in the data, the losses logged; the log has no iteration twice (a stop logs its own
    line)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = TINY + flags + ["--iters", str(logged[-1]), "--no-eval"]
    train.main(args + ["--out-dir", a])
    assert train.main(args + ["--out-dir", b, "--stop-after", str(stops[0])])["stopped_at"] == \
        stops[0]
    assert train.main(args + ["--out-dir", b, "--resume", "--stop-after", str(stops[1])])[
        "stopped_at"] == sum(stops)
    train.main(args + ["--out-dir", b, "--resume"])
    ca, cb = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (a, b))
    assert ca["iteration"] == cb["iteration"] == logged[-1]
    assert (ca["epoch"], ca["batch_in_epoch"]) == (cb["epoch"], cb["batch_in_epoch"]) == position
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k  # bitwise
    for k, v in ca["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], cb["optimizer"]["state"][k]["momentum_buffer"])
    log_a, log_b = ([json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
                    for d in (a, b))
    assert [r["iter"] for r in log_b] == logged
    # a line covering the same iterations (since the line before it) holds the same loss
    spans = [{(p["iter"] if p else 0, r["iter"]): r["loss"] for p, r in zip([None] + log, log)}
             for log in (log_a, log_b)]
    same = spans[0].keys() & spans[1].keys()
    assert same and all(spans[0][k] == spans[1][k] for k in same)
    assert len(same) == (len(log_a) if flags == [] else 1)

def test_micro_batch_stream_is_the_epoch_shuffle_cut_into_micro_batches():
    ds = data.SyntheticContext(10, 32)
    stream = iter(train.SampleOrder(ds, rank=0, world=1, seed=3, micro=3, start=(1, 2)))
    keys = [next(stream) for _ in range(9)]
    s = torch.utils.data.DistributedSampler(ds, 1, 0, True, 3, True)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(2)
    e2 = list(s)
    assert keys == [(1, i) for i in e1[6:9]] + [(2, i) for i in e2[:6]]  # 3 per epoch, 1 left
    assert train.advance((1, 2), 4, 3) == (3, 0) and train.advance((0, 0), 2, 3) == (0, 2)

def test_resume_refuses_another_experiment_and_auto_starts_or_resumes(tmp_path, capsys):
    out = str(tmp_path / "run")
    with pytest.raises(infra.MissingInput, match="no checkpoint at"):
        train.main(TINY + ["--iters", "2", "--out-dir", out, "--resume"])
    assert not os.path.exists(out)  # a refused start leaves no folder behind
    assert train.main(TINY + ["--iters", "4", "--out-dir", out, "--no-eval", "--resume", "auto",
                              "--stop-after", "2"])["stopped_at"] == 2
    with pytest.raises(infra.BadInput, match="exists: pass --resume"):
        train.main(TINY + ["--iters", "4", "--out-dir", out])
    with pytest.raises(infra.BadInput, match=r"another experiment; these differ: --context aspp "
                                            r"\(checkpoint: vortex\); --lr 0.5 \(checkpoint: 0.02"):
        train.main(TINY + ["--iters", "4", "--out-dir", out, "--resume", "--context", "aspp",
                           "--lr", "0.5"])
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # a killed run logged beyond it
        f.write(json.dumps({"iter": 3, "loss": 9.0, "lr": 0.0, "img_per_s": 0, "time": 0}) + "\n")
    # safe changes are allowed (more iterations, another logging rate)
    res = train.main(TINY + ["--iters", "5", "--out-dir", out, "--no-eval", "--resume", "auto",
                             "--log-every", "1"])
    assert res["iteration"] == 5
    iters = [json.loads(line)["iter"] for line in open(os.path.join(out, "log.jsonl"))]
    assert iters == [1, 2, 3, 4, 5]  # the stale line for 3 is gone, nothing twice
    assert "resumed" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, "curves.png"))

def test_resuming_continues_the_same_experiment_or_refuses(tmp_path, tiny_run, monkeypatch,
                                                           capsys):
    root, other = (make_voc_tree(tmp_path / d, ids="abcd") for d in ("voc", "other"))
    out = str(tmp_path / "run")
    voc = TINY + ["--dataset", "voc", "--split", "train", "--val-split", "train", "--batch-size",
                  "2", "--out-dir", out, "--no-eval"]
    train.main(voc + ["--data-root", str(root), "--iters", "1"])
    refused(lambda: train.main(voc + ["--data-root", str(other), "--iters", "3", "--resume"]),
            r"another experiment; these differ: --data-root .*other/\w+ \(checkpoint: .*voc/\w+\)")
    with open(root / "ImageSets" / "Segmentation" / "train.txt", "a") as f:
        f.write("a2\n")  # the same folder, another list: other data
    for p in ("JPEGImages/a2.jpg", "SegmentationClass/a2.png"):
        shutil.copy(root / p.replace("a2", "a"), root / p)
    refused(lambda: train.main(voc + ["--data-root", str(root), "--iters", "3", "--resume"]),
            r"these differ: --split-sha256 \w+ \(checkpoint: \w+\)")
    run = str(tmp_path / "copy")
    shutil.copytree(tiny_run, run)
    if os.path.exists(os.path.join(run, ".lock")):
        os.remove(os.path.join(run, ".lock"))
    before = {f: open(os.path.join(run, f), "rb").read() for f in os.listdir(run)}
    refused(lambda: train.main(TINY + ["--iters", "1", "--out-dir", run, "--resume"]),
            r"checkpoint.pt is at iteration 2, past --iters 1; give --iters 2 or more")
    capsys.readouterr()
    train.main(TINY + ["--iters", "2", "--out-dir", run, "--resume", "--no-eval"])
    assert "is at iteration 2 (--iters): nothing left to train; nothing is done" in \
        capsys.readouterr().out
    monkeypatch.setitem(train.COMMON, "label_smoothing", 0.1)  # an option added since
    refused(lambda: train.main(TINY + ["--iters", "3", "--out-dir", run, "--resume"]),
            r"these differ: --label-smoothing 0.1 \(checkpoint: unrecorded\)")
    assert {f: open(os.path.join(run, f), "rb").read() for f in os.listdir(run)
            if f != ".lock"} == before

@pytest.mark.parametrize("field,value,message", [
    ("optimizer", "delete", "optimizer is missing"), ("rng_cpu", torch.zeros(3, dtype=torch.uint8),
                                                     "rng_cpu is"),
    ("epoch", -1, "epoch is -1"), ("scaler", None, "scaler is None"),
    ("optimizer.param_groups", [], "optimizer does not fit this model's optimizer"),
])
def test_a_resumed_checkpoint_needs_its_whole_training_state(tmp_path, tiny_run, field, value,
                                                             message):
    out = tmp_path / "run"
    out.mkdir()
    path = changed_checkpoint(tiny_run, out / "checkpoint.pt", setter(field, value))
    refused(lambda: train.main(TINY + ["--iters", "3", "--out-dir", str(out), "--resume"]),
            re.escape(message))
    assert sorted(os.listdir(out)) == ["checkpoint.pt"] and os.path.getsize(path) > 0

def test_count_include_pad_is_a_recorded_training_flag(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--iters", "1", "--out-dir", out, "--no-eval", "--count-include-pad"])
    ck = infra.read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["config"]["count_include_pad"] is True
    assert infra.model_from_checkpoint(ck).context.count_include_pad is True
    with pytest.raises(infra.BadInput, match=r"--count-include-pad False \(checkpoint: True\)"):
        train.main(TINY + ["--iters", "2", "--out-dir", out, "--no-eval", "--resume"])

def test_a_new_run_never_replaces_an_earlier_runs_results(tmp_path, tiny_run, voc_root):
    """Without --resume, a folder holding an earlier run's results (even only the log of a run
    that died before saving) is refused; --resume auto starts afresh with a new log."""
    out = tmp_path / "run"
    out.mkdir()
    for f in ("eval.json", "predictions.png", "log.jsonl"):
        (out / f).write_text("earlier")
    with pytest.raises(infra.ExistingOutput, match=r"log.jsonl exists \(and 2 more\); they are an "
                                                  r"earlier run's results"):
        train.main(TINY + ["--iters", "1", "--out-dir", str(out), "--no-eval"])
    assert sorted(os.listdir(out)) == ["eval.json", "log.jsonl", "predictions.png"]
    assert all((out / f).read_text() == "earlier" for f in os.listdir(out))
    root = voc_root  # --out-dir in the data, or holding it
    for flags in (["--dataset", "voc", "--data-root", str(root), "--out-dir", str(root / "r")],
                  ["--init-from", os.path.join(tiny_run, "checkpoint.pt"), "--out-dir",
                   tiny_run, "--resume", "auto"]):
        refused(lambda: train.main(TINY + ["--iters", "3", "--no-eval"] + flags),
                r"output .* (is|holds|lies inside) the input --(data-root|init-from)")
    assert not os.path.exists(root / "r") and not os.path.exists(os.path.join(tiny_run, ".lock"))
    out = tmp_path / "died"
    out.mkdir()
    (out / "log.jsonl").write_text('{"iter": 1, "loss": 9.9, "lr": 0.1}\n' * 3)  # died early
    with pytest.raises(infra.ExistingOutput, match="log.jsonl exists"):  # not without asking
        train.main(TINY + ["--iters", "2", "--out-dir", str(out), "--no-eval"])
    train.main(TINY + ["--iters", "2", "--out-dir", str(out), "--no-eval", "--resume", "auto"])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2] and rows[0]["loss"] != 9.9

@pytest.mark.parametrize("line", ['{"loss": 1.0, "lr": 0.1}', "garbage", '{"iter": "2", "loss": 1, '
                                  '"lr": 0.1}', "[1, 2]", '{"iter": 2, "loss": null, "lr": 0.1}'])
def test_a_damaged_log_line_before_the_last_is_one_line(tmp_path, tiny_run, line):
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    log = os.path.join(run, "log.jsonl")
    lines = open(log).read().splitlines(True)
    open(log, "w").write(lines[0] + line + "\n" + "".join(lines[1:]))
    for use in (lambda: train.main(TINY + ["--iters", "3", "--out-dir", run, "--resume"]),
                lambda: evaluation.log_figure(log, str(tmp_path / "c.png"))):
        refused(use, r"log.jsonl, line 2: not a log record .*; delete that line or the file")
    assert not os.path.exists(tmp_path / "c.png")

def test_a_resume_after_a_crash_mid_line_goes_on(tmp_path, tiny_run, capfd):
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write('{"iter": 3, "loss": 1.2')  # the crash
    assert train.main(TINY + ["--iters", "3", "--out-dir", run, "--resume", "--no-eval"])[
        "iteration"] == 3
    assert "log.jsonl: its last line is torn (a crash while writing it); dropped" in \
        capfd.readouterr().err
    assert [json.loads(x)["iter"] for x in open(os.path.join(run, "log.jsonl"))] == [1, 2, 3]

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("amp", [None, "bf16"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_resume_continues_the_run(tmp_path, amp, deterministic):
    """Stopped at 3 and resumed on CUDA. With --deterministic the resumed run equals a straight
    one as closely as two straight runs equal each other (the resume loses nothing); without
    it, cuDNN's autotuned kernels differ between processes and allocations, and the difference
    is printed (README reports it)."""
    args = TINY + ["--device", "cuda", "--iters", "6", "--no-eval"] + \
        (["--amp", amp] if amp else []) + (["--deterministic"] if deterministic else [])
    a, a2, b = (str(tmp_path / n) for n in ("a", "a2", "b"))
    train.main(args + ["--out-dir", a])
    train.main(args + ["--out-dir", a2])
    assert train.main(args + ["--out-dir", b, "--stop-after", "3"])["stopped_at"] == 3
    train.main(args + ["--out-dir", b, "--resume"])
    ck = {d: torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)["model"]
          for d in (a, a2, b)}

    def largest(x, y):
        return max((ck[x][k].double() - ck[y][k].double()).abs().max().item()
                   for k in ck[x] if ck[x][k].is_floating_point())
    spread, resumed = largest(a, a2), largest(a, b)
    print(f"CUDA, amp {amp}, deterministic {deterministic}: two straight runs differ by "
          f"{spread:.2e}, resumed vs straight {resumed:.2e}")
    torch.backends.cudnn.deterministic = False
    torch.use_deterministic_algorithms(False)
    if deterministic:
        assert resumed <= spread
    else:
        assert resumed < 1e-2

# ---- the command line: every flag checked before any work

@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--batch-size 0: must be a whole number in 1..100000"),
    (["--batch-size", "1"], "batch norm cannot normalise a single value"),
    (["--batch-size", "4", "--accum-steps", "3"], "must be divisible by ranks x --accum-steps"),
    (["--save-every", "0"], "--save-every 0: must be"), (["--log-every", "0"], "--log-every 0"),
    (["--iters", "0"], "--iters 0: must be"), (["--iters", "-3"], "--iters -3"),
    (["--val-images", "0"], "--val-images 0"), (["--out-dir", ""], "--out-dir '': must be a file or folder name"),
    (["--pool-k", "4"], "must be an odd whole number"), (["--pool-k", "0"], "--pool-k 0"),
    (["--scale", "2", "0.5"], "MIN <= MAX"), (["--scale", "0", "0"], "--scale 0.0 0.0"),
    (["--crop", "5"], "--crop 5: must be at least 4 x the output stride"),
    (["--crop", "-5"], "--crop -5"), (["--power", "0"], "--power 0.0: must be a number in"),
    (["--momentum", "1"], "--momentum 1.0: must be a number in"), (["--lr", "nan"], "--lr nan"),
    (["--lr", "-1"], "--lr -1.0"), (["--workers", "-1"], "--workers -1"),
    (["--base-channels", "0"], "--base-channels 0"),
    (["--multi-grid", "1", "2"], "must be 3 whole numbers in 1..64, one per layer4 block of "
                                 "ResNet-50"),
    (["--multi-grid", "1", "x", "4"], "--multi-grid 1 x 4: must be a whole number in 1..64"),
    (["--multi-grid", "1", "2", "100"], "--multi-grid 1 2 100: must be"),
    (["--pretrained", ""], "--pretrained '': must be a file or folder name"),
    (["--device", "banana"], "--device banana: use cpu, cuda or cuda:N"),
    (["--amp", "fp16", "--device", "cpu"], "fp16 needs CUDA"),
    (["--sync-bn", "torch", "--device", "cpu"], None),  # one rank: nothing to synchronise
    (["--num-images", "3"], "3 images cannot make one micro-batch of 4 images"),
    (["--pretrained", "/nonexistent/resnet50.pth"], "--pretrained checkpoint not found"),
    # every number has a range
    (["--seed", "-1"], "--seed -1: must be a whole number in 0..4294967295"),
    (["--seed", str(2 ** 64)], f"--seed {2 ** 64}: must be"),
    (["--lr", "1e300"], "--lr 1e+300: must be a number in [1e-08, 10]"),
    (["--weight-decay", "1e308"], "--weight-decay 1e+308: must be a number in [0, 1]"),
    (["--num-images", str(10 ** 11)], f"--num-images {10 ** 11}: must be a whole number in "),
    (["--stop-after", "0"], "--stop-after 0: must be a whole number in 1..100000000"),
    (["--image-size", "100000"], "--image-size 100000"), (["--workers", "1000"], "--workers 1000"),
    (["--scale", "0.5", "1e9"], "--scale 0.5 1000000000.0: must be a number in [0.05, 10]"),
])
def test_bad_flags_are_refused_up_front_in_one_line(tmp_path, flags, message):
    args = TINY + ["--depth", "50", "--iters", "1", "--out-dir", str(tmp_path / "r" / "deep"),
                   "--no-eval"] + flags
    if message is None:
        assert train.main(args)["iteration"] == 1
        return
    with pytest.raises(infra.BadInput, match=re.escape(message)) as e:
        train.main(args)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "r")

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_device_cuda_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(infra.BadInput, match="no CUDA device is visible"):
        train.main(TINY + ["--device", "cuda", "--out-dir", str(tmp_path / "r")])

def test_command_line_refusal_is_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--batch-size", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --batch-size 0: must be a whole number in 1..100000"]

def test_a_refused_start_leaves_nothing_behind(tmp_path, voc_root, monkeypatch):
    root = voc_root
    out = tmp_path / "new" / "run"
    with pytest.raises(infra.MissingInput, match=r"split list not found: .*bogus.txt"):
        train.main(TINY + ["--dataset", "voc", "--data-root", str(root), "--split", "train",
                           "--val-split", "bogus", "--batch-size", "2", "--iters", "1",
                           "--out-dir", str(out)])  # checked before training, not after

    def refuse(*a):  # any refusal after --out-dir was taken (e.g. --sync-bn torch on CPU)
        raise infra.BadInput("--sync-bn torch: torch.nn.SyncBatchNorm needs CUDA")
    monkeypatch.setattr(train, "synchronise_batchnorm", refuse)
    refused(lambda: train.main(TINY + ["--iters", "1", "--out-dir", str(out)]), "needs CUDA")
    assert not os.path.exists(tmp_path / "new")

# ---- sync points and signals

def test_one_training_step_reads_no_number_back_from_the_device(tmp_path, monkeypatch):
    """The loop synchronises host and device only at sync points: counting the calls that
    wait for the device (.item(), float(), int(), bool(), .tolist(), .cpu(), .numpy() and
    host -> device copies of Python numbers) made from train.py's own code, a run of 6
    iterations makes exactly as many as a run of 2 when both sync only at their end."""
    counts = {"n": 0}
    names = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy", "__index__")
    for name in names:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            if sys._getframe(1).f_code.co_filename.endswith("train.py"):
                counts["n"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    orig_tensor = torch.tensor

    def tensor(*a, **k):
        if sys._getframe(1).f_code.co_filename.endswith("train.py"):
            counts["n"] += 1
        return orig_tensor(*a, **k)
    monkeypatch.setattr(torch, "tensor", tensor)
    made = {}
    for iters in (2, 6):
        counts["n"] = 0
        train.main(TINY + ["--iters", str(iters), "--log-every", str(iters), "--save-every",
                           str(iters), "--no-eval", "--workers", "0",
                           "--out-dir", str(tmp_path / f"r{iters}")])
        made[iters] = counts["n"]
    assert made[2] == made[6] > 0, made

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    calls = {"n": 0}
    real = train.loss_fn

    def sometimes_nan(logits, target):
        calls["n"] += 1
        loss = real(logits, target)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setattr(train, "loss_fn", sometimes_nan)
    # the NaN comes at iteration 3, between sync points (log every 5, save every 2): it is
    # found at the next one (4), before that checkpoint would be written
    with pytest.raises(SystemExit, match="loss is nan in the iterations up to 4: training"):
        train.main(TINY + ["--iters", "5", "--out-dir", out, "--save-every", "2",
                           "--log-every", "5"])
    ck = infra.read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["iteration"] == 2

@pytest.mark.parametrize("sig,workers", [(signal.SIGTERM, "0"), (signal.SIGINT, "2")])
def test_signal_saves_and_exits_cleanly(tmp_path, sig, workers):
    """SIGTERM to the trainer; SIGINT to its whole process group (Ctrl-C in a terminal, which
    reaches the loader workers too)."""
    out = str(tmp_path / "run")
    args = list(TINY)
    args[args.index("--workers") + 1] = workers
    proc = subprocess.Popen([sys.executable, "-u", os.path.join(HERE, "train.py")] + args +
                            ["--iters", "100000", "--out-dir", out, "--no-eval"], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("it 2/"):
            os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    assert proc.wait(timeout=60) == train.EXIT_STOPPED, "".join(lines)  # stopped, not finished
    assert any(f"{sig.name}: checkpoint saved at iteration" in line for line in lines), lines
    ck = infra.read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert 2 <= ck["iteration"] < 100000

def test_ctrl_c_is_answered_at_once_and_twice_stops_without_saving(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-u", os.path.join(HERE, "train.py")] + TINY +
                            ["--iters", "100000", "--log-every", "5000", "--save-every", "5000",
                             "--out-dir", out, "--no-eval"], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("training synthetic")
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    first = proc.stderr.readline()
    assert re.fullmatch(r"SIGINT: a checkpoint will be saved at iteration 5000 \(the next sync "
                        r"point\), then the run stops; SIGINT again stops at once without "
                        r"saving\n", first), first
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert "SIGINT again: stopped at once, without saving; no checkpoint was saved" in \
        proc.stderr.read()
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))

def interrupt_when(proc, started):
    """SIGINT to `proc` at the first line of its output for which started(line) holds; then
    (exit code, stderr)."""
    for line in proc.stdout:
        if started(line):
            proc.send_signal(signal.SIGINT)
            break
    return proc.wait(timeout=60), proc.stderr.read()

def test_ctrl_c_during_the_final_evaluation_keeps_the_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-u", os.path.join(HERE, "train.py")] + TINY +
                            ["--iters", "1", "--val-images", "400", "--out-dir", out], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, err = interrupt_when(proc, lambda line: line.startswith("trained 1 iterations"))
    assert code == 130
    assert err.splitlines() == [f"SIGINT: stopped at once, without saving; the last checkpoint "
                                f"{out}/checkpoint.pt is kept"]
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl"]  # the claim let go too
    assert infra.read_checkpoint(os.path.join(out, "checkpoint.pt"))["iteration"] == 1

# ---- end to end, and on a GPU

def test_default_command_end_to_end_on_a_small_budget(tmp_path, capsys):
    out = str(tmp_path / "run")
    res = train.main(TINY + ["--iters", "3", "--out-dir", out])
    assert 0 <= res["miou"] <= 1 and "context_miou" in res
    for f in ("checkpoint.pt", "log.jsonl", "eval.json", "predictions.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    text = capsys.readouterr().out
    assert "mIoU" in text and "bike" in text and "predictions.png" in text
    # eval.py reads the checkpoint back, and single-image prediction writes class indices
    evaluation.main(["--checkpoint", os.path.join(out, "checkpoint.pt")])
    img = tmp_path / "photo.jpg"
    Image.fromarray(data.render_synthetic(0, 0, 50)[0]).save(img)
    evaluation.main(["--checkpoint", os.path.join(out, "checkpoint.pt"), "--image", str(img),
                     "--out", str(tmp_path / "pred.png")])
    pred = Image.open(tmp_path / "pred.png")
    assert pred.mode == "P" and pred.size == (50, 50)
    assert set(np.unique(np.asarray(pred))) <= set(range(5))
    # its picture: the photo | the prediction in the palette's colours, under a 16 px title
    panel = np.asarray(Image.open(tmp_path / "pred_panel.png").convert("RGB")).astype(int)
    assert np.abs(panel[16:66, :50] - np.asarray(Image.open(img))).max() <= 1
    assert np.array_equal(panel[16:66, 54:104], data.SYNTHETIC_PALETTE[np.asarray(pred)])
    with pytest.raises(ValueError, match="context: checkpoint has 'vortex', flags say 'aspp'"):
        evaluation.main(["--checkpoint", os.path.join(out, "checkpoint.pt"), "--context", "aspp"])

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_training_steps_stay_finite_and_learn_a_repeated_batch(amp):
    torch.manual_seed(0)
    model = DeepLabV3(5, depth=18, base_channels=8, context_channels=16).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    ds = data.SyntheticContext(4, 64)
    x = torch.stack([ds[i][0] for i in range(4)]).cuda()
    t = torch.stack([ds[i][1] for i in range(4)]).cuda()
    losses = []
    for _ in range(40):
        with torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16):
            loss = train.loss_fn(model(x), t) / t.numel()  # the per-pixel mean
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses

# ---- several processes (gloo) and two nodes (torchrun)

def _train_worker(rank, world, init_file, out_dir, extra):
    _init(rank, world, init_file)
    try:
        result = train.main(TINY + extra[rank] + ["--out-dir", out_dir])
        torch.save({"miou": torch.tensor(result["miou"])}, os.path.join(out_dir, f"r{rank}.pt"))
    except infra.BadInput as e:
        open(os.path.join(out_dir, f"r{rank}.txt"), "w").write(str(e))

def test_distributed_run_with_per_rank_statistics_evaluates_what_it_saved(tmp_path):
    """2 ranks, --sync-bn off: the ranks' batch-norm statistics differ after the last step;
    eval.json (written by the run) and eval.py on the saved checkpoint must agree exactly."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    flags = ["--iters", "3", "--sync-bn", "off", "--val-images", "5"]
    _spawn(_train_worker, 2, out, [flags, flags])
    reported = json.load(open(os.path.join(out, "eval.json")))
    checked = evaluation.main(["--checkpoint", os.path.join(out, "checkpoint.pt"), "--json",
                               str(tmp_path / "again.json"), "--workers", "0"])
    assert reported["confusion"] == checked["confusion"]
    assert "NaN" not in open(os.path.join(out, "eval.json")).read()  # strict JSON

def test_ranks_started_with_different_settings_are_refused_on_every_rank(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    _spawn(_train_worker, 2, out, [["--seed", "0"], ["--seed", "1"]])
    for r in range(2):  # both refuse (none waits forever for the other)
        assert "different settings (--seed)" in open(os.path.join(out, f"r{r}.txt")).read()
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def torchrun(nodes, argv, cwd, rank=None, port=None, **popen):
    """`torchrun` of train.py with TINY + argv: one node of two processes, or node `rank` of
    `nodes` nodes of one process each, rendezvous on localhost (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
           "--nproc_per_node", str(2 // nodes), "--master_addr", "127.0.0.1", "--master_port",
           str(port)] + (["--node_rank", str(rank)] if rank is not None else []) + [
        os.path.join(HERE, "train.py")] + TINY + ["--no-eval", "--device", "cpu"] + argv
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [open(os.path.join(cwd, f"node{rank}.{s}"), "w+") for s in ("out", "err")]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logs[0], stderr=logs[1], text=True,
                            **popen)
    proc.output = lambda: [(f.seek(0), f.read())[1] for f in logs]  # (stdout, stderr)
    return proc

def two_nodes(argv, cwd):
    port = free_port()
    procs = [torchrun(2, argv, cwd, r, port) for r in (0, 1)]
    return [(p.wait(timeout=300), *p.output()) for p in procs]

def test_two_nodes_train_checkpoint_and_resume_as_one_node(tmp_path):
    """Two `torchrun --nnodes 2` launches on one machine (gloo over localhost) train as one
    node with the same two ranks, bit for bit, through a stop and a resume."""
    one = torchrun(1, ["--iters", "4", "--out-dir", "one"], tmp_path, port=free_port())
    assert one.wait(timeout=300) == 0, one.output()
    stopped = two_nodes(["--iters", "4", "--out-dir", "two", "--stop-after", "2"], tmp_path)
    assert "checkpoint saved at iteration 2" in stopped[0][1], stopped  # torchrun: exit 1
    resumed = two_nodes(["--iters", "4", "--out-dir", "two", "--resume"], tmp_path)
    assert [code for code, _, _ in resumed] == [0, 0] and "resumed" in resumed[0][1], resumed
    a, b = (infra.read_checkpoint(str(tmp_path / d / "checkpoint.pt")) for d in ("one", "two"))
    assert b["iteration"] == 4 and all(torch.equal(a["model"][k], b["model"][k])
                                       for k in a["model"])

def test_a_lost_node_stops_the_other_in_one_line_and_resume_continues(tmp_path):
    port, argv = free_port(), ["--iters", "100000", "--save-every", "5", "--out-dir", "run"]
    procs = [torchrun(2, argv, tmp_path, r, port, start_new_session=True) for r in (0, 1)]
    ck = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline:
        time.sleep(0.5)
    worker = subprocess.run(["pgrep", "-P", str(procs[1].pid)], capture_output=True,
                            text=True).stdout.split()
    os.kill(int(worker[0]), signal.SIGKILL)  # node 1's training process dies
    t0 = time.time()
    code = procs[0].wait(timeout=90)
    assert code != 0 and time.time() - t0 < 60
    ours = [line for line in procs[0].output()[1].splitlines() if "lost another rank" in line]
    assert len(ours) == 1 and ours[0].startswith("error: rank 0 lost another rank of the run")
    assert "start every node again with --resume" in ours[0]
    procs[1].wait(timeout=90)
    at = infra.read_checkpoint(str(ck))["iteration"]
    resumed = two_nodes(["--iters", str(at + 2), "--save-every", "5", "--out-dir", "run",
                         "--resume"], tmp_path)
    assert [c for c, _, _ in resumed] == [0, 0], resumed
    assert f"resumed run at iteration {at}" in resumed[0][1]
    assert infra.read_checkpoint(str(ck))["iteration"] == at + 2


# =============================================================================================
# eval.py, Part I: the paper (mean IoU over the dataset; single- and multi-scale + flip
# inference, 4.1-4.2)
# =============================================================================================

maps = st.integers(2, 6).flatmap(lambda c: st.tuples(
    st.just(c), st.lists(st.integers(0, c - 1), min_size=30, max_size=30),
    st.lists(st.sampled_from(list(range(c)) + [255]), min_size=30, max_size=30)))

@given(maps)
def test_confusion_metrics_agree_with_a_brute_force_loop(m):
    c, pred, gt = m
    pred, gt = torch.tensor(pred), torch.tensor(gt)
    res = evaluation.miou_from_confusion(
        evaluation.confusion_update(torch.zeros(c, c, dtype=torch.int64), pred, gt))
    ious = []
    for k in range(c):
        valid = gt != 255
        tp = ((pred == k) & (gt == k) & valid).sum().item()
        fp = ((pred == k) & (gt != k) & valid).sum().item()
        fn = ((pred != k) & (gt == k)).sum().item()
        if tp + fp + fn == 0:
            assert math.isnan(res["iou"][k])  # absent from both: no IoU
        else:
            ious.append(tp / (tp + fp + fn))
            assert res["iou"][k] == pytest.approx(ious[-1])
    if ious:
        assert res["miou"] == pytest.approx(np.mean(ious)) and not math.isnan(res["miou"])

@given(maps, st.randoms(use_true_random=False))
def test_confusion_invariances(m, rnd):
    c, pred, gt = m
    pred, gt = torch.tensor(pred), torch.tensor(gt)
    conf = evaluation.confusion_update(torch.zeros(c, c, dtype=torch.int64), pred, gt)
    res = evaluation.miou_from_confusion(conf)
    # perfect prediction
    valid = gt != 255
    if valid.any():
        perfect = evaluation.miou_from_confusion(evaluation.confusion_update(
            torch.zeros(c, c, dtype=torch.int64), gt.clamp(max=c - 1), gt))
        assert perfect["miou"] == 1.0 and perfect["pixel_acc"] == 1.0
    # pixels labelled 255 never matter, whatever is predicted there
    other = pred.clone()
    other[~valid] = (other[~valid] + 1) % c
    assert torch.equal(evaluation.confusion_update(torch.zeros(c, c, dtype=torch.int64),
                                                   other, gt), conf)
    # image by image == one matrix over the concatenation
    k = rnd.randint(0, 30)
    acc = torch.zeros(c, c, dtype=torch.int64)
    evaluation.confusion_update(acc, pred[:k], gt[:k])
    evaluation.confusion_update(acc, pred[k:], gt[k:])
    assert torch.equal(acc, conf)
    # a permutation of class names changes nothing
    perm = list(range(c))
    rnd.shuffle(perm)
    perm_t = torch.tensor(perm + [0] * (256 - c))
    perm_t[255] = 255
    res2 = evaluation.miou_from_confusion(evaluation.confusion_update(
        torch.zeros(c, c, dtype=torch.int64), perm_t[pred], perm_t[gt]))
    assert (math.isnan(res["miou"]) and math.isnan(res2["miou"])) or \
        res2["miou"] == pytest.approx(res["miou"])

def test_absent_class_is_left_out_of_the_mean():
    conf = torch.tensor([[5, 0, 0], [0, 0, 0], [1, 0, 3]])
    res = evaluation.miou_from_confusion(conf)
    assert math.isnan(res["iou"][1]) and res["miou"] == pytest.approx((5 / 6 + 3 / 4) / 2)
    assert "—" in evaluation.format_table(res, ("a", "b", "c"))

@given(h=st.integers(9, 41), w=st.integers(9, 41))
def test_predict_sizes_and_single_scale_equals_plain_inference(h, w):
    torch.manual_seed(0)
    model = DeepLabV3(4, depth=18, base_channels=4, context_channels=8).eval()
    x = torch.randn(3, h, w)
    pred = evaluation.predict(model, x)
    assert pred.shape == (h, w)
    with torch.no_grad():
        assert torch.equal(pred, model(x[None]).argmax(1)[0])
        assert torch.equal(evaluation.predict_probs(model, x), model(x[None]).softmax(1)[0])
        # DeepLab's protocol written out: every scale and mirror on its own, its logits resized
        # once from feature resolution to h x w, softmax, mean
        ref = 0
        for s in (0.5, 1.25):
            xs = F.interpolate(x[None], size=(max(1, round(h * s)), max(1, round(w * s))),
                               mode="bilinear", align_corners=False)
            for flip in (False, True):
                lo = model.low_res_logits(xs.flip(-1) if flip else xs)
                p = F.interpolate(lo, size=(h, w), mode="bilinear", align_corners=False).softmax(1)
                ref = ref + (p.flip(-1) if flip else p)
    multi = evaluation.predict_probs(model, x, scales=(0.5, 1.25), flip=True)
    assert multi.shape == (4, h, w)
    torch.testing.assert_close(multi, ref[0] / 4)

def test_flip_averaging_of_a_flip_equivariant_model_changes_nothing():
    model = torch.nn.Conv2d(3, 4, 1)  # per-pixel: flipping the input flips the output
    x = torch.randn(3, 17, 23)
    torch.testing.assert_close(evaluation.predict_probs(model, x, (1.0, 0.5), flip=True),
                               evaluation.predict_probs(model, x, (1.0, 0.5), flip=False))

def _eval_worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    ds = data.SyntheticContext(5, 40, seed=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1))
    res = evaluation.evaluate(model, ds, log=lambda *a: None)
    torch.save(torch.tensor(res["confusion"]), os.path.join(out_dir, f"conf{rank}.pt"))
    dist.destroy_process_group()

def test_distributed_evaluation_counts_every_image_once(tmp_path):
    _spawn(_eval_worker, 2, str(tmp_path))  # 5 images on 2 ranks: 3 + 2
    ds = data.SyntheticContext(5, 40, seed=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1))
    res = evaluation.evaluate(model, ds, log=lambda *a: None)
    for r in range(2):
        conf = torch.load(tmp_path / f"conf{r}.pt", weights_only=True)
        assert torch.equal(conf, torch.tensor(res["confusion"]))
    assert np.sum(res["confusion"]) == 5 * 40 * 40


# =============================================================================================
# eval.py, Part II: engineering (the command line, the pictures a run writes)
# =============================================================================================

# ---- the command line

def test_eval_command_line_never_overwrites_and_names_every_file(tmp_path, tiny_run, capsys,
                                                                monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # eval.py writes its results beside the checkpoint
    ck = str(run / "checkpoint.pt")
    # results are named by what they measured; the same protocol again needs --force
    evaluation.main(["--checkpoint", ck, "--workers", "0"])
    evaluation.main(["--checkpoint", ck, "--workers", "0", "--scales", "0.5", "1", "--flip"])
    assert sorted(f for f in os.listdir(run) if f.startswith("eval_")) == [
        "eval_synthetic_val_s0.5-1_flip.json", "eval_synthetic_val_s1.json"]
    with pytest.raises(infra.ExistingOutput, match=r"eval_synthetic_val_s1.json exists; pass "
                                                  r"--force"):
        evaluation.main(["--checkpoint", ck, "--workers", "0"])
    evaluation.main(["--checkpoint", ck, "--workers", "0", "--force"])
    # one image: --out must be a PNG; exactly the files printed are written
    img = tmp_path / "photo.jpg"
    Image.fromarray(data.render_synthetic(0, 0, 50)[0]).save(img)
    with pytest.raises(infra.BadInput, match=r"--out keep.jpg: the prediction is a PNG"):
        evaluation.main(["--checkpoint", ck, "--image", str(img), "--out", "keep.jpg"])
    monkeypatch.chdir(tmp_path)  # the default goes under runs/, never beside the image
    capsys.readouterr()
    evaluation.main(["--checkpoint", ck, "--image", str(img)])
    out = capsys.readouterr().out
    assert "wrote runs/predictions/photo.png, runs/predictions/photo_panel.png" in out
    assert sorted(os.listdir(tmp_path / "runs" / "predictions")) == ["photo.png",
                                                                     "photo_panel.png"]
    with pytest.raises(infra.ExistingOutput, match="photo.png exists"):
        evaluation.main(["--checkpoint", ck, "--image", str(img)])
    # a folder: every image, one output folder
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(data.render_synthetic(0, i, 40)[0]).save(folder / f"p{i}.png")
    (folder / "notes.txt").write_text("not an image")
    evaluation.main(["--checkpoint", ck, "--image", str(folder)])
    assert sorted(os.listdir(tmp_path / "runs" / "predictions" / "photos")) == sorted(
        f"p{i}{t}" for i in range(3) for t in (".png", "_panel.png"))
    assert "predict: 3/3" in capsys.readouterr().out

@pytest.mark.parametrize("flags,message", [
    (["--scales", "0"], "--scales 0.0: must be a number in [0.05, 8]"),
    (["--scales", "1", "nan"], "--scales 1.0 nan"), (["--scales", "-1"], "--scales -1.0"),
    (["--device", "banana"], "--device banana: use cpu, cuda or cuda:N"),
    (["--workers", "-1"], "--workers -1: must be a whole number in 0..256"),
    (["--workers", "1000"], "--workers 1000: must be a whole number in 0..256"),
    (["--context", "bogus"], None), (["--depth", "19"], None),
])
def test_eval_refuses_bad_flags(flags, message):
    """Every number and name is checked before any work (the checkpoint is not even read)."""
    if message is None:
        with pytest.raises(SystemExit) as e:  # argparse's choices: usage and exit code 2
            evaluation.main(["--checkpoint", "unused.pt"] + flags)
        assert e.value.code == 2
    else:
        refused(lambda: evaluation.main(["--checkpoint", "unused.pt"] + flags), re.escape(message))

def test_eval_refuses_a_checkpoint_of_other_classes_and_broken_weights(tmp_path, tiny_run,
                                                                      voc_root):
    ck, voc = os.path.join(tiny_run, "checkpoint.pt"), str(voc_root)
    with pytest.raises(infra.BadInput, match=r"predicts 5 classes \(background, water, wheel, "
                                            r"bike, fish\), but voc has 21"):
        evaluation.main(["--checkpoint", ck, "--dataset", "voc", "--data-root", voc,
                         "--split", "train", "--json", str(tmp_path / "new" / "r.json")])
    assert not os.path.exists(tmp_path / "new")  # its --json folder is made after every check
    with pytest.raises(infra.MissingInput, match=r"split list not found: .*val2012.txt \(splits "
                                                r"there: train\)"):
        evaluation.main(["--checkpoint", ck, "--dataset", "voc", "--data-root", voc,
                         "--split", "val2012"])
    state = torch.load(ck, weights_only=True)
    state["model"]["classifier.weight"] = torch.zeros(3, 2, 1, 1)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(infra.BadInput, match=r"bad.pt: its weights do not fit .*classifier.weight"):
        evaluation.main(["--checkpoint", str(bad)])

def test_predictions_of_images_that_share_a_name_never_overwrite_each_other(tmp_path, tiny_run):
    out = tiny_run
    folder = tmp_path / "photos"
    folder.mkdir()
    for ext in ("bmp", "tif", "webp", "jpg"):
        Image.new("RGB", (30, 20), (10, 200, 30)).save(folder / f"img.{ext}")
    Image.new("RGB", (30, 20)).save(folder / "other.png")
    written = evaluation.main(["--checkpoint", os.path.join(out, "checkpoint.pt"), "--image",
                               str(folder), "--out", str(tmp_path / "pred")])
    assert len(written) == len(set(written)) == 10
    assert sorted(os.listdir(tmp_path / "pred"))[:2] == ["img_bmp.png", "img_bmp_panel.png"]
    assert all(os.path.exists(p) for p in written)

def test_nothing_to_measure_is_refused_and_absent_classes_are_null(tmp_path):
    model = torch.nn.Conv2d(3, 5, 1)
    ds = data.SyntheticContext(2, 24, seed=0)
    ds.load = lambda i: (np.zeros((24, 24, 3), np.uint8), np.full((24, 24), 255, np.uint8))
    with pytest.raises(infra.BadInput, match="nothing to measure: the 2 images have no labelled"):
        evaluation.evaluate(model, ds, log=lambda *a: None)
    infra.write_json(str(tmp_path / "r.json"), {"iou": [0.5, float("nan")], "miou": 0.5})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and json.loads(text)["iou"] == [0.5, None]

def _eval_main_worker(rank, world, init_file, ck, out_dir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    seen = []
    real = evaluation.predict
    evaluation.predict = lambda model, image, *a: seen.append(1) or real(model, image, *a)
    evaluation.main(["--checkpoint", ck, "--json", os.path.join(out_dir, "res.json"),
                     "--workers", "0", "--device", "cpu"])
    with open(os.path.join(out_dir, f"seen{rank}"), "w") as f:
        f.write(str(len(seen)))
    # done and written: skip the interpreter's teardown, where gloo's threads now and then end
    # in "terminate called without an active exception" (SIGABRT) after the work is over
    os._exit(0)

def test_eval_under_torchrun_splits_the_images_over_the_ranks(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--iters", "1", "--out-dir", out, "--no-eval", "--val-images", "5"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _spawn(_eval_main_worker, 2, os.path.join(out, "checkpoint.pt"), str(tmp_path), port)
    assert [open(tmp_path / f"seen{r}").read() for r in range(2)] == ["3", "2"]
    single = evaluation.main(["--checkpoint", os.path.join(out, "checkpoint.pt"), "--json",
                              str(tmp_path / "single.json"), "--workers", "0"])
    assert json.load(open(tmp_path / "res.json"))["confusion"] == single["confusion"]

def test_ctrl_c_during_eval_is_one_line_and_exit_130(tmp_path, tiny_run):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(30):  # 160 px: the 90% left after the first progress line outlasts the signal
        Image.fromarray(data.render_synthetic(0, i, 160)[0]).save(folder / f"p{i:02}.png")
    proc = subprocess.Popen([sys.executable, "-u", os.path.join(HERE, "eval.py"), "--checkpoint",
                             os.path.join(tiny_run, "checkpoint.pt"), "--image", str(folder),
                             "--out", str(tmp_path / "pred"), "--ms", "--flip"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, err = interrupt_when(proc, lambda line: line.startswith("predict: "))
    assert code == 130, err
    assert err.splitlines() == ["interrupted: stopped at once; the files written so far are "
                                "kept, each whole (a result file is written only at the end)"]
    written = sorted(os.listdir(tmp_path / "pred"))
    assert 0 < len(written) < 60 and not any(f.startswith(".tmp-") for f in written)
    for f in written:
        Image.open(tmp_path / "pred" / f).load()  # each whole

# ---- pictures

def test_prediction_panels_show_image_truth_and_prediction_in_the_palette(tmp_path):
    """image | ground truth | prediction, 4 px apart under a 16 px strip of titles, then a
    legend with the palette's colour of every class shown, and of no other class."""
    palette = np.zeros((256, 3), np.uint8)
    palette[:6] = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
                   (145, 30, 180)]
    label = torch.zeros(20, 30, dtype=torch.long)
    label[:10], label[10:, 15:] = 1, 2
    pred = label.clone()
    pred[:, :5] = 3
    image = torch.randn(3, 20, 30)
    path = evaluation.prediction_panels(str(tmp_path / "p.png"), [(image, pred, label)],
                                        ("background", "one", "two", "three", "four", "five"),
                                        palette)
    pic = np.asarray(Image.open(path).convert("RGB"))
    assert pic.shape[1] == 3 * 30 + 2 * 4
    raw = (image.permute(1, 2, 0).numpy() * data.STD + data.MEAN).clip(0, 1) * 255
    assert np.array_equal(pic[16:36, :30], raw.round().astype(np.uint8))
    assert np.array_equal(pic[16:36, 34:64], palette[label.numpy()])
    assert np.array_equal(pic[16:36, 68:98], palette[pred.numpy()])
    legend = {tuple(c) for c in pic[40:].reshape(-1, 3)}
    assert {tuple(palette[c]) for c in (0, 1, 2, 3)} <= legend
    assert not {tuple(palette[c]) for c in (4, 5)} & legend

def test_training_curves_have_absolute_axes_and_are_named_only_when_drawn(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 1, "loss": 2.0, "lr": 0.1}\n')
    assert evaluation.log_figure(str(log), str(tmp_path / "c.png")) is None  # one point
    log.write_text('{"iter": 1, "loss": 2.0, "lr": 0.1}\n{"iter": 9, "loss": 0.5, "lr": 0.05}\n')
    pic = np.asarray(Image.open(evaluation.log_figure(str(log), str(tmp_path / "c.png"))))
    blue = np.argwhere((pic == (31, 119, 180)).all(-1))
    # the loss falls from 2.0 to 0.5 on an axis from 0 to 2.1: the curve ends near a quarter of
    # the plot's height above its bottom, not at the bottom (a min-to-max scale would put it there)
    bottom, top = 320 - 34, 28
    end = blue[blue[:, 1].argmax()]
    assert abs((bottom - end[0]) / (bottom - top) - 0.5 / 2.1) < 0.05
    out = str(tmp_path / "run")
    train.main(TINY + ["--iters", "1", "--out-dir", out, "--log-every", "5"])
    assert "curves.png" not in capsys.readouterr().out  # a 1-line log draws no curves


# =============================================================================================
# experiments.py: research beside the paper (table, figures, bench, ablation, context, erf;
# one part: none of it is the paper)
# =============================================================================================

# ---- Table 1 in numbers, Fig. 3, the data figures, the benchmarks

def test_the_printed_table_reproduces_the_papers_utilization_ratios(capsys, monkeypatch):
    """`python experiments.py table` on the 65 x 65 map of 3.2: every row's pools and rates are
    its module's; where the paper gives a utilization ratio (3.2: ASPP 0.0059; 4.1: Module A
    0.148 and 0.479; 3.4: Vortex 1), the analytic column, counted from the real module's
    footprint, rounds to it; the measured column (autograd at the centre pixel) never exceeds
    it: ASPP's rate-36 taps fall off the map (17 of 65 x 65 read), Vortex reads every one."""
    monkeypatch.setattr(experiments, "best_times", lambda fns, reps, warmup=1: dict.fromkeys(
        fns, 1.0))  # the timing is not under test here
    experiments.print_table(size=65, channels=16, reps=1)
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:-1]}
    assert list(rows) == list(experiments.TABLE_ROWS)
    for name, cols in rows.items():
        m = vortex.table1_module(name, 16)
        assert cols[1:3] == [",".join(map(str, m.pools)), ",".join(map(str, m.dilations))]
        paper, analytic, measured = " ".join(cols[3:-5]), float(cols[-5]), float(cols[-4])
        assert paper == (vortex.TABLE1[name].ratio or "-"), name
        if paper != "-":
            value = paper.split()[0]
            decimals = len(value.split(".")[1]) if "." in value else 0
            assert round(analytic, decimals) == float(value), (name, analytic, paper)
        assert measured <= analytic
    assert rows["ASPP"][-4] == f"{17 / 65 ** 2:.4f}" and rows["Vortex"][-4] == "1.0000"

def test_fig3_footprint_picture(tmp_path):
    path = experiments.footprints_figure(str(tmp_path / "fig3.png"), size=65, cell=1)
    pic = np.asarray(Image.open(path))
    assert pic.shape == (67 + 14 + 4 + 4 * 16, 3 * 67 + 2 * 8, 3)  # framed maps, title, legend
    frame = pic[:67, :67]
    assert (frame[0] == 0).all() and (frame[-1] == 0).all() and (frame[:, 0] == 0).all()
    read = (pic[1:66] != 255).any(-1)  # not white: some branch reads it (or the centre, black)
    assert read[:, 1:66].sum() == 17  # ASPP: 17 positions fit on the map
    assert read[:, 2 * 75 + 1:2 * 75 + 66].sum() == 65 * 65  # Vortex: every position
    vx = pic[1:66, 2 * 75 + 1:2 * 75 + 66]
    assert tuple(vx[32, 33]) == experiments.BRANCH_COLOURS[1]  # next to the centre: the 3x3 pool
    assert tuple(vx[0, 0]) == experiments.BRANCH_COLOURS[3]  # the corner: the 27x27 pool

def test_figure_and_bench_commands(tmp_path, capsys):
    """`figure synthetic`: each of 6 samples, 4 px apart, is its image above its label in the
    palette's colours, over a legend whose swatches are the palette's colours of the classes
    named. No figure command replaces a file without --force. The loader benchmark runs."""
    out = tmp_path / "s.png"
    experiments.main(["figure", "synthetic", "--out", str(out)])
    pic = np.asarray(Image.open(out).convert("RGB"))
    ds = data.SyntheticContext(6, 128, seed=0)
    assert pic.shape[1] == 6 * 128 + 5 * 4
    for i in range(6):
        image, label = ds.load(i)
        panel = pic[:256, i * 132:i * 132 + 128]
        assert np.array_equal(panel[:128], image) and np.array_equal(panel[128:],
                                                                      ds.palette[label])
    x = 4  # one line of swatches (10 px squares, 4 px under the samples), each then its name
    for c, name in enumerate(ds.classes):
        assert tuple(pic[256 + 4 + 5, x + 5]) == tuple(ds.palette[c]), name
        x += 28 + 6 * len(name)
    with pytest.raises(infra.ExistingOutput, match="s.png exists; pass --force"):
        experiments.main(["figure", "synthetic", "--out", str(out)])  # never without --force
    keep = tmp_path / "fig.png"
    keep.write_bytes(b"keep")
    with pytest.raises(infra.ExistingOutput, match="fig.png exists; pass --force"):
        experiments.main(["figure", "footprints", "--out", str(keep)])
    assert keep.read_bytes() == b"keep"
    assert experiments.bench_loader(None, n=5, crop=65) > 0

@pytest.mark.gpu
@needs_cuda
def test_cuda_bench_reports_out_of_memory_and_recovers():
    """A configuration that does not fit is reported (None), and the next one still runs."""
    torch.manual_seed(0)
    model = DeepLabV3(21, 50, "vortex").cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(3 * 2 ** 30 / total)  # 3 GiB for this test
    try:
        assert experiments._steps(model, opt, 16, 513, torch.float32, "NCHW", 1, 1) is None
        ok = experiments._steps(model, opt, 2, 129, torch.bfloat16, "channels-last", 1, 1)
        assert ok is not None and ok[0] > 0
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)

# ---- the ablation (Table 1 in miniature)

def test_ablation_table_runs_every_module(tmp_path, capsys):
    out = str(tmp_path / "abl")
    rows = experiments.main(["ablation", "--seeds", "1"] + TINY + ["--iters", "1", "--out-dir", out])
    assert list(rows) == ["none", "image-level", "ASPP", "ASPP+", "A(5)", "A(9)", "A(13)", "Vortex"]
    table = open(os.path.join(out, "table1.txt")).read()
    assert "Table 1 in miniature" in table
    printed = {line.split()[0]: line.split() for line in table.splitlines()[2:2 + len(rows)]}
    for name, r in rows.items():  # each row's mean over its runs, beside the paper's figure
        assert printed[name][1] == f"{100 * r[:, 0].mean():.2f}", (name, printed[name])
        assert printed[name][-1] == str(vortex.TABLE1[name].miou or "-"), name
    assert os.path.isfile(os.path.join(out, "A(9)-seed0", "checkpoint.pt"))
    ck = torch.load(os.path.join(out, "A(9)-seed0", "checkpoint.pt"), weights_only=True)
    assert ck["config"]["context"] == "module_a" and ck["config"]["pool_k"] == 9
    assert "Effective receptive field" in table and "Vortex   (1 model(s))" in table
    # the none, ASPP and Vortex maps (48 x 48 images at 2 px a pixel, under a title), 8 px
    # apart, over two lines that say what the colours and circles mean
    assert Image.open(os.path.join(out, "erf.png")).size == (3 * 96 + 2 * 8, 14 + 96 + 28)
    # the same command again continues the table: finished runs are read back, an
    # interrupted one (checkpoint but no ablation.json) resumes, numbers unchanged
    os.remove(os.path.join(out, "ASPP-seed0", "ablation.json"))
    capsys.readouterr()
    again = experiments.main(["ablation", "--seeds", "1"] + TINY + ["--iters", "1", "--out-dir", out])
    log = capsys.readouterr().out
    assert log.count("finished earlier, read back") == 7 and "resumed" in log
    assert all(np.allclose(again[k][:, :2], rows[k][:, :2], equal_nan=True) for k in rows)
    with pytest.raises(infra.BadInput, match=r"made with other settings \(iters 1 -> 2\)"):
        experiments.main(["ablation", "--seeds", "1"] + TINY + ["--iters", "2", "--out-dir", out])
    cks = [os.path.join(out, f"{m}-seed0", "checkpoint.pt") for m in ("ASPP", "Vortex")]
    erf = str(tmp_path / "erf.png")
    radii = experiments.main(["erf", *cks, "--images", "2", "--out", erf])
    assert set(radii) == {"ASPP", "Vortex"} and os.path.isfile(erf)
    assert all(0 <= r50 <= r90 <= math.hypot(24, 24) for r50, r90 in radii.values())
    with pytest.raises(infra.ExistingOutput, match="exists"):  # never overwrites a file
        experiments.main(["erf", *cks, "--out", erf])

def test_the_ablation_runs_under_torchrun(tmp_path):
    """Every command written for torchrun runs under it: the experiments' ablation too (rank 0
    holds its folder, every rank trains and evaluates its share)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), os.path.join(HERE, "experiments.py"), "ablation",
           "--seeds", "1"] + TINY + ["--iters", "1", "--device", "cpu", "--erf-images", "1",
                                     "--out-dir", "abl"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Table 1 in miniature" in p.stdout and (tmp_path / "abl" / "erf.png").exists()
    assert not (tmp_path / "abl" / ".lock").exists()

# ---- effective receptive field

@settings(max_examples=15)
@given(sizes=st.lists(st.tuples(st.integers(5, 14), st.integers(5, 14)), min_size=1, max_size=3),
       seed=st.integers(0, 2 ** 16))
def test_effective_receptive_field_is_the_normalised_input_gradient(sizes, seed):
    # A single 3x3 convolution: the gradient of the centre logit of class c is |w_c| laid on
    # the 3x3 window around the centre (summed over RGB), whatever the image; maps of images of
    # different sizes land on one canvas with their centres aligned.
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1, bias=False)
    conv.weight.data[1] = -conv.weight.data[0]  # the argmax class depends on the image
    images = [(torch.randn(3, h, w), None) for h, w in sizes]
    erf = experiments.effective_receptive_field(conv, images, len(images))
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    assert erf.shape == (h, w)
    window = conv.weight.data[0].abs().sum(0).double()  # |w_0| = |w_1|
    expected = torch.zeros(h, w, dtype=torch.float64)
    expected[h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2] = window / window.sum()
    assert torch.allclose(erf, expected, atol=1e-6)
    assert experiments.mass_radius(erf, 1.0) == pytest.approx(math.sqrt(2))  # window corners

@given(h=st.integers(3, 40), w=st.integers(3, 40), dy=st.integers(-20, 20),
       dx=st.integers(-20, 20), f=st.floats(0.05, 1.0))
def test_mass_radius(h, w, dy, dx, f):
    erf = torch.zeros(h, w, dtype=torch.float64)
    y, x = min(max(h // 2 + dy, 0), h - 1), min(max(w // 2 + dx, 0), w - 1)
    erf[y, x] = 1.0  # all mass in one pixel: the radius is its distance, for any fraction
    dist = math.hypot(y - h // 2, x - w // 2)
    assert experiments.mass_radius(erf, f) == pytest.approx(dist)
    flat = torch.ones(h, w)
    r = [experiments.mass_radius(flat, q) for q in (0.25, 0.5, 0.9, 1.0)]
    assert r == sorted(r)
    assert r[-1] == pytest.approx(math.hypot(h // 2, w // 2))  # the farthest corner
    # a flat map: the fraction inside radius r is the fraction of pixels within r
    d = torch.hypot(*(t - c for t, c in zip(torch.meshgrid(torch.arange(h).double(),
                                                           torch.arange(w).double(),
                                                           indexing="ij"), (h // 2, w // 2))))
    assert (d <= r[1]).double().mean() >= 0.5 > (d < r[1]).double().mean()

# ---- the context experiment (Table 1 on data where context decides)

def test_ring_coverage_is_the_footprint_by_distance():
    aspp, vx = ContextModule.aspp(4), ContextModule.vortex(4)
    cov = experiments.ring_coverage(aspp, 40)
    assert cov[0] == 1 and cov[12] == 8 / 96 and cov[24] == 8 / 192 and cov[36] == 8 / 288
    assert cov[[d for d in range(1, 41) if d not in (12, 24, 36)]].sum() == 0
    assert (experiments.ring_coverage(vx, 41)[:41] == 1).all() and experiments.ring_coverage(vx, 41)[41] == 0
    assert (experiments.ring_coverage(ContextModule.none(4), 5)[1:] == 0).all()
    for k in (5, 9, 13):  # each ring's share is what the footprint holds at that distance
        grid = footprint((k,) * 4, (1, 3, 3, 3), (1, 12, 24, 36))
        r = grid.shape[0] // 2
        assert experiments.ring_coverage(ContextModule.module_a(4, k), r)[r] == (
            grid[0].sum() + grid[-1].sum() + grid[1:-1, 0].sum() + grid[1:-1, -1].sum()) / (8 * r)

def test_context_layouts_are_stratified_uniform_on_the_ring_and_fit_the_map():
    lay = experiments.context_layouts(3, 400)
    assert (np.bincount(lay["d"])[1:] == 400).all()  # equal counts at every distance 1..40
    off = lay["cue"] - lay["query"]
    nearest = np.abs(off).max(1) - 1  # Chebyshev distance to the cue's nearest descriptor
    assert (nearest == lay["d"]).all()
    assert ((lay["cue"] >= 1) & (lay["cue"] <= 63)).all() and (lay["distractor"] == -1000).all()
    assert (lay["other"] == -1).all()
    for d in (1, 2):  # uniform on the ring: every one of its 8 (d + 1) offsets, near 1/8(d + 1)
        seen = np.unique(off[lay["d"] == d], axis=0, return_counts=True)[1]
        assert len(seen) == 8 * (d + 1) and seen.min() > 0.4 * 400 / (8 * (d + 1))

def test_the_distractor_is_farther_within_reach_and_its_class_is_a_coin():
    """Rule v3: the distractor's nearest descriptor lies at >= 1.5 d and within the largest
    footprint's reach (so Vortex reads part of it in every layout); the condition is scored
    only where that is possible (d <= 26); its class is independent of everything."""
    far = experiments.context_layouts(4, 30, distractor=True)
    assert experiments.DISTRACTOR_DISTANCES == 26
    assert (np.bincount(far["d"])[1:] == 30).all() and far["d"].max() == 26
    gap = np.abs(far["distractor"] - far["query"]).max(1) - 1
    assert (gap >= np.ceil(1.5 * far["d"])).all() and (gap <= experiments.REACH).all()
    assert (np.abs(far["distractor"] - far["cue"]).max(1) >= 3).all()  # the cues do not touch
    assert ((far["distractor"] >= 1) & (far["distractor"] <= 63)).all()
    assert set(far["other"]) == {0, 1} and abs(far["other"].mean() - 0.5) < 0.05
    vx = vortex.table1_module("Vortex", 8)
    parts = experiments.gather_taps([vx], far, 8, 0)["Vortex"]
    # within reach: Vortex reads part of it, except where the tap that would is centred off
    # the map (zero padding reads 0 there, as for the cue: test_the_probe_reads_what_...)
    assert (parts["distractor"].max(1) > 0).mean() > 0.9
    # the largest footprint's reach is Vortex's: its farthest window ends at REACH
    k, offsets = experiments.tap_offsets(vx)[-1]
    assert max(max(abs(a), abs(b)) for a, b in offsets) + k // 2 == experiments.REACH

def context_map(layouts, i, cls, sigma, codes, seed, batch):
    """Layout i as the whole 65 x 65 map X that the taps describe (the same unit noise)."""
    g = torch.Generator().manual_seed(seed * 100003 + i // batch)
    noise = torch.randn(min(batch, len(layouts["d"]) - i // batch * batch), len(codes[0]), 65,
                        65, generator=g, dtype=torch.float64)[i % batch]
    x = torch.from_numpy(codes[0]).double()[:, None, None].repeat(1, 65, 65)
    for part, c in (("cue", cls), ("distractor", layouts["other"][i])):
        cy, cx = layouts[part][i]
        if cy > -1000:
            x[:, cy - 1:cy + 2, cx - 1:cx + 2] = torch.from_numpy(codes[1 + c]).double()[:, None,
                                                                                         None]
    return x + sigma * noise

@pytest.mark.parametrize("distractor,background", [(False, 1.0), (True, 1.0), (True, 0.0)])
def test_the_head_at_the_query_is_the_context_module_on_the_whole_map(distractor, background):
    """What the experiment trains (QueryHead on gathered taps) is the project's ContextModule
    and a 1x1 classifier run on the whole map (zero padding), read at the query: every row,
    with and without the image-level branch, the same weights (eval mode)."""
    torch.manual_seed(0)
    codes = experiments.context_codes(8, background)
    lay = experiments.context_layouts(5, 1, distractor)
    parts = experiments.gather_taps([vortex.table1_module(r, 8) for r in vortex.TABLE1], lay, 8,
                                    11, batch=16)
    for row in experiments.CONTEXT_ROWS:
        head = experiments.QueryHead(row, 0, 5).double().eval()
        assert isinstance(head.module, ContextModule)
        assert (head.module.image_pool is None) == (row.endswith(" w/o img") or row == "none")
        randomize_bn_stats(head)
        taps, mean, cls, d, _ = experiments.twins(parts[row.removesuffix(" w/o img")], lay, 0.7,
                                                  codes)
        with torch.no_grad():
            got = head(taps.double(), mean.double())
            for n in range(0, len(cls), 17):  # a few layouts, both twins
                i = n % len(lay["d"])
                x = context_map(lay, i, int(cls[n]), 0.7, codes, 11, 16)[None]
                y, xq = lay["query"][i]
                want = head.classifier(head.module(x))[0, :, y, xq]
                torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-5, msg=row)

def test_a_predictor_that_ignores_the_cue_scores_exactly_half_at_every_distance():
    codes = experiments.context_codes(8)
    lay = experiments.context_layouts(6, 7)
    m = vortex.table1_module("Vortex", 8)
    parts = experiments.gather_taps([m], lay, 8, 3)
    taps, mean, cls, d, _ = experiments.twins(parts["Vortex"], lay, 1.0, codes)
    for constant in (0, 1):
        acc = experiments.per_distance((torch.full_like(cls, constant) == cls).numpy(), d.numpy())
        assert (acc[1:] == 50).all()
    # anything computed from the map without the cue (here, its noise): the twins share it
    blind = torch.from_numpy(np.concatenate([parts["Vortex"]["noise"][..., 0].sum(1)] * 2))
    acc = experiments.per_distance(((blind > 0).long() == cls).numpy(), d.numpy())
    assert (acc[1:] == 50).all()

@pytest.mark.parametrize("background", [1.0, 0.0])
def test_the_distractor_alone_scores_exactly_half(background):
    """No side channel (rule v3): the twins share the distractor and its class, so what reads
    everything but the cue, the distractor's class itself or a probe of the module's taps with
    the cue erased, scores exactly 50% at every scored distance; half the twins conflict."""
    codes = experiments.context_codes(8, background)
    vx = vortex.table1_module("Vortex", 8)
    sets = {s: experiments.context_layouts(s, n, distractor=True) for s, n in ((2, 40), (3, 10))}
    parts = {s: experiments.gather_taps([vx], lay, 8, s)["Vortex"] for s, lay in sets.items()}
    lay = sets[3]
    cls, d, conflict = experiments.twins(parts[3], lay, 1.0, codes)[2:]
    other = torch.from_numpy(np.concatenate([lay["other"]] * 2))
    for guess in (other, 1 - other):  # the distractor's class, or the other one
        acc = experiments.per_distance((guess == cls).numpy(), d.numpy())
        assert (acc[1:27] == 50).all() and np.isnan(acc[27:]).all()
    assert conflict.float().mean() == 0.5 and (conflict == (other != cls)).all()
    erased = {s: dict(p, cue=0 * p["cue"]) for s, p in parts.items()}  # the cue erased (and
    fit, test = (experiments.twins(erased[s], sets[s], 1.0, codes) for s in (2, 3))  # no mean)
    for by in experiments.PROBES:
        assert (experiments.probe(fit, test, by, image_level=False)[0][1:27] == 50).all(), by
    with_cue = experiments.twins(parts[3], lay, 1.0, codes)  # the cue is what it reads
    assert np.nanmean(experiments.probe(experiments.twins(parts[2], sets[2], 1.0, codes),
                                        with_cue, "band")[0][1:11]) > 60

def test_the_border_control_makes_off_map_taps_read_like_background():
    """Zero padding: a tap off the map reads 0, a tap on the background its code (norm
    sqrt(c1)), a difference ~50x what a far cue makes. With the background's code zero (the
    border control) both read 0 up to noise; nothing else changes."""
    for bg in (1.0, 0.0):
        codes = experiments.context_codes(8, bg)
        assert np.isclose(np.linalg.norm(codes[0]), bg * np.sqrt(8))
        assert (codes[1:] == experiments.context_codes(8)[1:]).all()
    lay = experiments.context_layouts(1, 2, distractor=True)
    parts = experiments.gather_taps([vortex.table1_module("Vortex", 8)], lay, 8, 0)["Vortex"]
    off = parts["inmap"] == 0
    assert off.any() and (~off).any()  # rate-27 taps fall off the map from many queries
    clean = (parts["cue"] == 0) & (parts["distractor"] == 0)
    for bg, want_on in ((1.0, np.sqrt(8)), (0.0, 0.0)):
        taps = experiments.twins(parts, lay, 0.0, experiments.context_codes(8, bg))[0]
        norm = taps.norm(dim=2).numpy()[:len(lay["d"])]
        assert np.allclose(norm[off], 0) and np.allclose(norm[~off & clean], want_on)
    names = {s[0]: s[1:] for s in experiments.SETTINGS}
    assert names["sigma 1, distractor, background 0"] == (1.0, True, 0.0)
    assert names["sigma 1, distractor"] == (1.0, True, 1.0)

def test_the_probe_reads_what_the_footprint_holds():
    """No noise: where some tap reads part of the cue, the twins differ and the probe tells
    them apart; where no tap does, they are the same and every probe scores exactly 50%."""
    codes = experiments.context_codes(8)
    aspp, vx = (vortex.table1_module(r, 8) for r in ("ASPP", "Vortex"))
    sets = {s: experiments.context_layouts(s, n) for s, n in ((8, 150), (9, 30))}
    parts = {s: experiments.gather_taps([aspp, vx], lay, 8, s) for s, lay in sets.items()}
    for m in (aspp, vx):
        tr, te = (experiments.twins(parts[s][m.name], sets[s], 0.0, codes) for s in (8, 9))
        touched = parts[9][m.name]["cue"].max(1) > 0
        for by in experiments.PROBES:  # what no tap reads, no readout of the taps can use
            acc = experiments.probe(tr, te, by, image_level=False)[0]
            for d in range(1, 41):
                share = touched[sets[9]["d"] == d].mean()
                if share == 0:
                    assert acc[d] == 50, (m.name, by, d)
                if share == 1 and by == "distance":  # told d, a readout fits each ring's taps
                    assert acc[d] >= 99, (m.name, d)
    assert (parts[9]["Vortex"]["cue"].max(1) > 0).mean() > 0.9  # 81 x 81, clipped

def test_the_three_probes_differ_only_in_what_they_are_told():
    """The probes fit one readout per distance, per band of BANDS, or one for all; on samples
    of one band the band probe and the pooled probe are the same readout."""
    assert (experiments.probe_groups("distance") == np.arange(41)).all()
    band = experiments.probe_groups("band")
    assert band[1] == band[10] != band[11] == band[20] != band[21] == band[30] != band[31]
    assert len(set(experiments.probe_groups("pooled")[1:])) == 1
    codes = experiments.context_codes(8)
    vx = vortex.table1_module("Vortex", 8)
    sets = {s: experiments.context_layouts(s, n) for s, n in ((1, 40), (2, 10))}
    near = {}
    for s, lay in sets.items():  # keep the samples of band 1-10 only
        keep = lay["d"] <= 10
        lay = {k: v[keep] for k, v in lay.items()}
        near[s] = experiments.twins(experiments.gather_taps([vx], lay, 8, s)["Vortex"], lay, 1.0,
                                    codes)
    a, b = (experiments.probe(near[1], near[2], by)[0] for by in ("band", "pooled"))
    assert np.array_equal(a, b, equal_nan=True) and np.isnan(a[11:]).all()
    told = experiments.probe(near[1], near[2], "distance")[0]
    assert not np.array_equal(told, a, equal_nan=True)  # per distance is another readout

def test_the_vmapped_heads_are_the_heads():
    """train_heads' one forward over stacked weights (vmap of functional_call) is each
    QueryHead's own forward, in training mode (batch statistics, running averages updated per
    head) and in eval mode."""
    torch.manual_seed(0)
    for row in ("Vortex", "Vortex w/o img", "ASPP+", "none", "image-level"):
        heads = [experiments.QueryHead(row, s, 6) for s in range(3)]
        for h in heads:
            h.module.project[-1].p = 0.0  # dropout is random: compare without it
        taps, mean = torch.randn(3, 32, sum(experiments.head_shape(heads[0])[0]), 8), \
            torch.randn(3, 32, 8)
        p, b, base, forward = experiments.vmapped(heads)
        for train_mode in (True, False):
            got = forward(p, b, taps, mean) if base.train(train_mode) else None
            for m, h in enumerate(heads):
                torch.testing.assert_close(got[m], h.train(train_mode)(taps[m], mean[m]),
                                           rtol=1e-4, atol=1e-5, msg=row)
                for k, v in h.state_dict().items():
                    torch.testing.assert_close(b.get(k, p.get(k))[m].to(v.dtype), v, msg=k)

def test_precise_bn_takes_the_statistics_of_the_fixed_samples():
    """After precise_bn, each head in eval mode reads its fixed samples as it does in training
    mode (batch statistics of those samples), whatever the running averages were."""
    torch.manual_seed(0)
    for row in ("Vortex", "image-level"):
        heads = [experiments.QueryHead(row, s, 6) for s in range(2)]
        taps = torch.randn(2, 3000, sum(experiments.head_shape(heads[0])[0]), 8) * 3 + 1
        mean = torch.randn(2, 3000, 8)
        p, b, base, forward = experiments.vmapped(heads)
        for v in b.values():  # running averages far from the truth
            v.mul_(0).add_(7) if v.is_floating_point() else None
        experiments.precise_bn(base, forward, p, b, taps, mean)
        for m, h in enumerate(heads):
            h.load_state_dict({k: v[m] for d in (p, b) for k, v in d.items()})
            h.module.project[-1].p = 0.0
            got = h.eval()(taps[m], mean[m])
            torch.testing.assert_close(got, h.train()(taps[m], mean[m]), rtol=1e-3, atol=1e-3,
                                       msg=row)

CONTEXT_SETS = {}

def context_sets():
    """Small samples of the one-cue condition (sigma 1, seed 0), every Table 1 module's, as the
    command makes them (made once): {(row, 0): {"train", "test": (taps, mean, label, d, ...)}}."""
    if not CONTEXT_SETS:
        codes = experiments.context_codes(8)
        data_ = experiments.context_data(False, 0, {"train": 12, "test": 6})
        CONTEXT_SETS.update({(r, 0): {split: experiments.twins(parts[r], lay, 1.0, codes)
                                      for split, (lay, parts) in data_.items()}
                             for r in vortex.TABLE1})
    return CONTEXT_SETS

def trained(row, iters=24, sets=None):
    """A head of `row` trained as the command trains it: (test scores, fit, curve)."""
    cfg = dict(context_channels=4, lr=0.01, batch_size=64, power=0.9)
    return [v[0] for v in experiments.train_heads(cfg, iters, sets or context_sets(),
                                                  [(row, 0, None)])]

def test_control_none_scores_chance_exactly():
    """'none' reads the query's own descriptor, which the twins share: trained, and every
    probe, score exactly 50% at every distance, on the test and on the training samples."""
    (acc, conflict), fit, curve = trained("none")
    assert (acc[1:] == 50).all() and (fit[1:] == 50).all()
    assert all((c[1:] == 50).all() for c in curve.values())
    sets = context_sets()["none", 0]
    for by in experiments.PROBES:
        assert (experiments.probe(sets["train"], sets["test"], by, False)[0][1:] == 50).all()

def test_control_image_level_reads_the_same_at_every_distance():
    """The image-level branch alone reads the query's descriptor and the map's mean, which
    holds the whole cue wherever it is: on test samples whose noise is the same at every
    distance, what it reads, and so the trained module's accuracy, is the same at every d;
    a module with spatial taps reads something else at each d."""
    lay = experiments.context_layouts(9, 5)
    parts = experiments.gather_taps([vortex.table1_module(r, 8) for r in ("image-level", "A(5)")],
                                    lay, 8, 9)
    for p in parts.values():  # layout j of every distance gets the noise of layout j at d = 1
        for k in ("noise", "noise_mean"):
            p[k][:] = np.tile(p[k][:5], (40,) + (1,) * (p[k].ndim - 1))
    codes = experiments.context_codes(8)
    test = experiments.twins(parts["image-level"], lay, 1.0, codes)
    feats = torch.cat([test[0].flatten(1), test[1]], 1).view(2, 40, 5, -1)
    assert (feats == feats[:, :1]).all()
    sets = dict(context_sets())
    sets["image-level", 0] = dict(sets["image-level", 0], test=test)
    for iters in (1, 24):
        acc = trained("image-level", iters, sets)[0][0]
        assert len(set(acc[1:])) == 1 and not np.isnan(acc[1:]).any()
    spatial = experiments.twins(parts["A(5)"], lay, 1.0, codes)[0].flatten(1).view(2, 40, 5, -1)
    assert not (spatial == spatial[:, :1]).all()

@pytest.mark.parametrize("row", ["ASPP", "ASPP+", "A(5)", "A(9)"])
def test_control_without_the_branch_scores_chance_beyond_the_footprint(row):
    """Without its image-level branch a module reads only its footprint: trained, it scores
    exactly 50% at every distance d whose cue (Chebyshev d..d+2 from the query) no position of
    the footprint reaches (Fig. 3; experiments.ring_coverage), and such distances exist."""
    cov = experiments.ring_coverage(vortex.table1_module(row, 8), 42)
    blind = [d for d in range(1, 41) if cov[d:d + 3].sum() == 0]
    assert blind
    (acc, _), fit, _ = trained(row + " w/o img")
    assert (acc[blind] == 50).all() and (fit[blind] == 50).all()

@settings(deadline=None, max_examples=30)
@given(st.lists(st.floats(40, 100), min_size=2, max_size=4), st.floats(-20, 20),
       st.floats(0.1, 5))
def test_paired_differences_are_real_only_beyond_the_spread(a, shift, noise):
    """paired(): a difference is read as real only when every seed has the same sign and the
    mean beats the larger range over seeds of either row; swapping the rows flips the sign."""
    a = np.array(a)
    b = a - shift + noise * np.linspace(-1, 1, len(a))
    mean, plus, minus, spread, real = experiments.paired(a, b)
    assert math.isclose(mean, (a - b).mean(), abs_tol=1e-9) and plus + minus <= len(a)
    assert spread == max(np.ptp(a), np.ptp(b))
    assert real == (min(plus, minus) == 0 and max(plus, minus) == len(a)
                    and abs(mean) > spread)
    back = experiments.paired(b, a)
    assert math.isclose(back[0], -mean, abs_tol=1e-9) and back[4] == real
    assert not experiments.paired(a[:1], b[:1])[4]  # one seed: no spread, nothing is real

@settings(deadline=None, max_examples=30)
@given(st.integers(0, 20).map(lambda x: x / 4), st.integers(0, 12).map(lambda x: x / 4 + 0.125),
       st.integers(0, 3))
def test_converged_is_the_last_doubling_of_every_band(change, tolerance, band):
    """converged(): held when every band of the trained accuracy (mean over seeds) moved by
    less than the tolerance from the curve point at half the run to its end."""
    curve = np.full((2, 5, 41), 60.0)
    lo, hi = experiments.BANDS[band]
    curve[:, -1, lo:hi + 1] += change  # only the last point of one band moves
    curve[:, 0, :] = 50  # what happens before half the run does not count
    r = {"curve_iters": [600, 1200, 2400, 4800, 9600], "curve": curve}
    held, got = experiments.converged(r, experiments.BANDS, tolerance)
    assert math.isclose(got, change, abs_tol=1e-9) and held == (change < tolerance)

def test_a_model_told_the_band_trains_on_that_bands_samples_only():
    d = torch.arange(1, 41).repeat_interleave(3)
    cell = {"train": (torch.zeros(len(d), 2, 8), torch.zeros(len(d), 8),
                      torch.zeros(len(d), dtype=torch.long), d)}
    sets = {("A", 0): cell, ("B", 0): cell}
    models = [("A", ("A", 0), None), ("B", ("B", 0), (11, 20)), ("B", ("B", 0), (31, 40))]
    *_, rows = experiments._stacked_data(sets, models)
    assert rows[0].tolist() == list(range(len(d)))
    for r, (lo, hi) in zip(rows[1:], ((11, 20), (31, 40))):
        assert len(r) == 3 * 10 and ((d[r - len(d)] >= lo) & (d[r - len(d)] <= hi)).all()

def test_context_experiment_smoke_run(tmp_path, capsys, monkeypatch):
    """The experiment's command end to end on a tiny budget (fewer samples per distance): every
    row with and without its image-level branch, records with the three probes per seed, the
    conflict twins, fit, told the band, the learning curve; a row that has not converged runs
    again with twice the iterations up to --max-iters, and the table says which held; figures;
    the same command again reads everything back."""
    monkeypatch.setattr(experiments, "PER_DISTANCE", {"train": 6, "test": 3})  # test layouts
    out = str(tmp_path / "ctx")
    argv = ["context", "--seeds", "2", "--iters", "4", "--max-iters", "8", "--tolerance",
            "0.001", "--train-layouts", "6", "--out-dir", out]
    res = experiments.main(argv)
    assert list(res) == [s[0] for s in experiments.SETTINGS]
    for (setting, _, distractor, _), cells in zip(experiments.SETTINGS, res.values()):
        assert list(cells) == list(experiments.CONTEXT_ROWS)
        top = 26 if distractor else 40
        for row, r in cells.items():
            assert set(r["probe"]) == set(experiments.PROBES) and r["probe"]["band"].shape == (2, 41)
            for acc in list(r["probe"].values()) + [r["trained"]]:
                assert not np.isnan(acc[:, 1:top + 1]).any() and np.isnan(acc[:, top + 1:]).all()
            assert r["trained"].shape == r["trained_fit"].shape == (2, 41)
            assert np.isnan(r["trained_conflict"]).all() != distractor
            its = r["iters"]  # 'none' holds at once (it is 50 throughout); a row that did not
            held = experiments.converged(r, experiments.bands(top), 0.001)[0]  # ran again
            assert its == 4 if row == "none" else (its == 4 and held) or its == 8
            assert r["curve_iters"] == ([1, 2, 4] if its == 4 else [1, 2, 4, 8])
            record = experiments.setting_file(setting, row, its)  # one plain name, also for
            assert os.path.isfile(os.path.join(out, record)) and "/" not in record  # "w/o img"
        for row in experiments.BAND_TRAINED:  # a model per band, each distance from its band's
            assert not np.isnan(cells[row]["trained_band"][:, 1:top + 1]).any()
        assert cells["ASPP"]["trained_band"].size == 0
        assert cells["Vortex w/o img"]["probe"]["band"].shape == (2, 41)
    table = open(os.path.join(out, "table.txt")).read()
    for text in ("band probe | trained", "per distance / per band / pooled", "21-26",
                 "told the band", "Vortex w/o img /band", "on its training samples",
                 "conflict twins only", "learning curve", "convergence: held if",
                 "NOT held within the budget", "Vortex - Vortex w/o img", "* real",
                 "none                 4 iterations: held (largest change 0.0)"):
        assert text in table, text
    for setting, *_ in experiments.SETTINGS:
        pic = Image.open(os.path.join(out, experiments.setting_file(setting) + ".png"))
        assert pic.size[0] > 4 * 300 and pic.size[1] > 2 * 200 + 46
    capsys.readouterr()
    again = experiments.main(argv)
    assert "done" not in capsys.readouterr().out  # nothing trained again
    assert all(np.array_equal(again[s][r]["trained"], res[s][r]["trained"], equal_nan=True)
               for s in res for r in res[s])
    with pytest.raises(infra.BadInput, match=r"other settings \(lr 0.003 -> 0.002\)"):
        experiments.main(argv + ["--lr", "0.002"])
    one = str(tmp_path / "one")  # one setting, more training layouts, converged at once
    sub = experiments.main(["context", "--seeds", "1", "--iters", "2", "--train-layouts", "4",
                            "--tolerance", "10", "--settings", "sigma1", "--out-dir", one])
    assert list(sub) == ["sigma 1"] and sub["sigma 1"]["Vortex"]["trained"].shape == (1, 41)
    assert all(r["iters"] == 2 for r in sub["sigma 1"].values())
    assert "4 training / 3 test layouts" in open(os.path.join(one, "table.txt")).read()

def test_context_samples_picture(tmp_path):
    out = str(tmp_path / "samples.png")
    experiments.main(["figure", "descriptors", "--out", out])
    pic = np.asarray(Image.open(out))
    assert pic.shape[1] == 6 * (3 * 65 + 2) + 5 * 6
    colours = {tuple(c) for c in pic[14:14 + 3 * 65].reshape(-1, 3)}
    assert {tuple(experiments.CONTEXT_PALETTE[k]) for k in (1, 2)} <= colours


# =============================================================================================
# The docs and the reading path: README's paper -> code map, the order of every core file,
# links, documented commands; and the command that made the golden fixtures
# =============================================================================================

def definitions(path):
    """{name: (first line, last line)} of a file's functions, classes (and their methods, as
    Class.method) and module-level constants."""
    tree = ast.parse(open(os.path.join(HERE, path)).read())
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = (min([node.lineno] + [d.lineno for d in node.decorator_list]),
                              node.end_lineno)
            for sub in node.body if isinstance(node, ast.ClassDef) else ():
                if isinstance(sub, ast.FunctionDef):
                    first = min([sub.lineno] + [d.lineno for d in sub.decorator_list])
                    out[f"{node.name}.{sub.name}"] = (first, sub.end_lineno)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = (node.lineno, node.end_lineno)
    return out

def comment_start(lines, first):
    """The first line of the comment block (the paper's words) right above line `first` (1-based),
    across one blank line; `first` itself when there is none."""
    i = first - 1
    if i >= 1 and not lines[i - 1].strip():
        i -= 1
    top = i
    while top >= 1 and lines[top - 1].startswith("#"):
        top -= 1
    return top + 1 if top < i else first

def names_used_in(path, a, b):
    """Names the code on lines a..b of a file reads (calls, `X.attr`, arguments...)."""
    tree = ast.parse(open(os.path.join(HERE, path)).read())
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and
            isinstance(n.ctx, ast.Load) and a <= n.lineno <= b}

def map_problems(readme):
    """What is wrong with README's paper -> code table (see the test below), one line each."""
    rows = re.findall(r"^\| (.+?) \| `(\w+\.py)` (\d+)–(\d+) \| (.+?) \|$", readme, re.M)
    mapped = {(path, n) for _, path, _, _, names in rows for n in re.findall(r"`([\w.]+)`", names)}
    problems = [] if len(rows) >= 20 else ["the map lost its rows"]
    for concept, path, a, b, names in rows:
        defs, lines = definitions(path), open(os.path.join(HERE, path)).read().split("\n")
        banner = "# PART II: ENGINEERING THE PAPER DOES NOT DESCRIBE"
        part2 = lines.index(banner) + 1 if banner in lines else 0  # experiments.py: one part
        a, b = int(a), int(b)
        listed = re.findall(r"`([\w.]+)`", names)
        missing = [n for n in listed if n not in defs]
        if missing:
            problems.append(f"README map, {concept!r}: {missing} not defined in {path}")
            continue
        first = min(defs[n][0] for n in listed)
        want = (comment_start(lines, first), max(defs[n][1] for n in listed))
        fix = (f" Update the row's range in README.md's 'Paper → code' table to {path} "
               f"{want[0]}–{want[1]} (after an edit moves the code, the map must follow it).")
        if not (a <= want[0] and want[1] <= b):
            problems.append(f"README map, {concept!r}: {path} {a}-{b} misses part of {names}."
                            + fix)
        elif want[0] - a > 3 or b - want[1] > 3:
            problems.append(f"README map, {concept!r}: {a}-{b} is wider than {names}." + fix)
        for name in sorted(names_used_in(path, a, b)):  # same file, same part
            if name in defs and (defs[name][0] < part2) == (a < part2) and \
                    not a <= defs[name][0] <= b and (path, name) not in mapped:
                problems.append(f"README map, {concept!r}: its code uses {name} ({path}, line "
                                f"{defs[name][0]}), which is neither in {a}-{b} nor in another row")
    return problems

def test_readme_map_points_at_the_code():
    """Every row of README's paper -> code table names a file, a line range and the identifiers
    that implement one step of the paper. The range holds the WHOLE step: every identifier the
    row lists, the paper's words in the comment block above the first one, and every function
    of that file and part that the range calls is inside it or named by another row (so a row
    that stops before the derivation, the loss or the optimizer step fails). Not much wider."""
    readme = open(os.path.join(HERE, "README.md")).read()
    assert readme.index("## Paper → code") < len("\n".join(readme.split("\n")[:20]))
    assert map_problems(readme) == []

def test_the_map_check_fails_on_a_row_that_misses_part_of_its_step():
    """The check above can fail: a SyncBN row that starts at the class (the derivation and
    _SyncNormalize above it left out), a loop row without train_step, a range that lists a
    name it does not hold."""
    readme = open(os.path.join(HERE, "README.md")).read()
    t = definitions("train.py")
    sync = re.search(r"^\| 4.1 synchronised batch norm.*$", readme, re.M).group(0)
    cut = re.sub(r"`train.py` \d+–(\d+) \| .*? \|$", lambda m: f"`train.py` "
                 f"{t['SyncBatchNorm2d'][0]}–{m.group(1)} | `SyncBatchNorm2d`, "
                 f"`convert_sync_batchnorm`, `synchronise_batchnorm` |", sync)
    assert any("_SyncNormalize" in p for p in map_problems(readme.replace(sync, cut)))
    loop = re.search(r"^\| 4.1 the loop.*$", readme, re.M).group(0)
    short = re.sub(r"`train.py` \d+–\d+ \| .*? \|$", f"`train.py` {t['train'][0]}–"
                   f"{t['train'][1]} | `train` |", loop)
    assert any("uses train_step" in p for p in map_problems(readme.replace(loop, short)))
    lr = re.search(r"^\| 4.1 poly learning rate.*$", readme, re.M).group(0)
    off = re.sub(r"(\d+)–(\d+)", lambda m: f"{m.group(1)}–{int(m.group(2)) - 6}", lr, count=1)
    assert any("misses part of" in p for p in map_problems(readme.replace(lr, off)))

def test_every_core_file_reads_paper_first_then_engineering():
    """Part I (the paper) before Part II (the engineering) in every core file; its blocks in
    the paper's order; the reading-path targets: the context modules within 150 contiguous
    lines, their forward within 15, the ResNet within 170, train.py's paper part (SyncBN, poly
    LR, set-up, loop) within its first 350 lines; and the import graph points one way."""
    for path in ("vortex.py", "train.py", "eval.py", "data.py"):
        text = open(os.path.join(HERE, path)).read()
        one, two = text.index("# PART I: THE PAPER"), text.index("# PART II: ENGINEERING")
        assert one < two, path
    v = definitions("vortex.py")
    assert v["ContextModule"][1] - v["ContextModule"][0] + 1 <= 150
    assert v["ContextModule.forward"][1] - v["ContextModule.forward"][0] + 1 <= 15
    assert v["ResNet"][1] - v["conv3x3"][0] + 1 <= 170
    order = {"vortex.py": ["ResNet", "utilization_ratio", "ContextModule", "TABLE1", "DeepLabV3"],
             "data.py": ["VOCSegmentation", "train_aug_ids", "TrainTransform", "coco_voc_mask"],
             "train.py": ["PRESETS", "poly_lr", "SyncBatchNorm2d", "freeze_batchnorm", "setup",
                          "train", "train_step"],
             "eval.py": ["miou_from_confusion", "predict_probs", "evaluate"]}
    for path, names in order.items():
        d = definitions(path)
        assert [d[n][0] for n in names] == sorted(d[n][0] for n in names), path
    t = definitions("train.py")
    part2 = open(os.path.join(HERE, "train.py")).read().split("\n").index(
        "# PART II: ENGINEERING THE PAPER DOES NOT DESCRIBE")
    for name in ("SyncBatchNorm2d", "synchronise_batchnorm", "poly_lr", "make_optimizer",
                 "loss_fn", "setup", "train", "train_step"):
        assert t[name][1] < part2 <= 350, name
    ours = {"data", "vortex", "train", "eval", "experiments"}
    level = {"data": 0, "vortex": 1, "train": 2, "eval": 2, "experiments": 3}
    for path in ("data.py", "vortex.py", "train.py", "eval.py", "experiments.py"):
        tree = ast.parse(open(os.path.join(HERE, path)).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names} | {n.module for n in ast.walk(tree)
                                         if isinstance(n, ast.ImportFrom) and n.module}
        me = path[:-3]
        for other in imported & ours:
            assert level[other] < level[me] or (me, other) == ("train", "eval"), \
                f"{path} imports {other}: imports point one way, data <- vortex <- " \
                f"train/eval <- experiments"

def test_readme_and_docs_links_exist():
    for page in ["README.md"] + [os.path.join("docs", f) for f in os.listdir(
            os.path.join(HERE, "docs"))]:
        text = open(os.path.join(HERE, page)).read()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            path = os.path.normpath(os.path.join(HERE, os.path.dirname(page), target))
            assert os.path.exists(path), f"{page} links {target}, which does not exist"
    assert len(open(os.path.join(HERE, "README.md")).read().split("\n")) <= 450

def documented_commands():
    """Every `python X.py ...` / `torchrun ... X.py ...` command in the bash blocks of README and
    docs/, with shell loops expanded: (page, script, argument list)."""
    pages = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(
        os.path.join(HERE, "docs")))]
    found = []
    for page in pages:
        text = open(os.path.join(HERE, page)).read()
        for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):  # and `$ ` lines
            block = re.sub(r"\\\n\s*", " ", block).replace("\n$ ", "\n")  # continuations
            block = block[2:] if block.startswith("$ ") else block
            loops = dict(re.findall(r"for (\w+) in ([^;]+); do", block))
            for line in block.split("\n"):
                line = re.sub(r"(^|\s)#.*", "", line)  # comments
                for part in re.split(r"&&|;", line):
                    if not re.match(r"\s*(python|torchrun) ", part):
                        continue  # not a command of ours (output, pip, a loop's head)
                    words = shlex.split(part)
                    script = next((w for w in words if w in ("train.py", "eval.py", "data.py",
                                                              "experiments.py")), None)
                    if script is None or not (words[0] in ("python", "torchrun")):
                        continue
                    args = words[words.index(script) + 1:]
                    names = [v for v in loops if any("$" + v in a for a in args)]
                    for values in itertools.product(*(loops[v].split() for v in names)):
                        expanded = list(args)
                        for name, value in zip(names, values):
                            expanded = [a.replace("$" + name, value) for a in expanded]
                        found.append((page, script, expanded))
    return found

def test_every_documented_command_parses():
    """The commands of README and docs/ run as written, as far as their flags go: each is
    parsed by its script's own parser and checks (no file is read, nothing runs)."""
    commands = documented_commands()
    assert len(commands) >= 30
    scripts = {script for _, script, _ in commands}
    assert scripts == {"train.py", "eval.py", "data.py", "experiments.py"}
    for page, script, args in commands:
        try:
            if script == "train.py":
                train.parse_args(args)
            elif script == "experiments.py":
                experiments.parse(args)
            else:
                {"eval.py": evaluation, "data.py": data}[script].parser().parse_args(args)
        except (SystemExit, infra.BadInput) as e:
            raise AssertionError(f"{page}: {script} {' '.join(args)} -> {e}") from None

# Run once, in a scratch environment that has the references (they are never dependencies of
# this project), from the project root:
#   python -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 torchvision==0.28.0 \
#       pycocotools==2.0.11 numpy Pillow pytest hypothesis
#   /tmp/ref/bin/python test_vortex.py make-fixtures --coco ../shared/voc_samples/coco/annotations/instances_val2017.json
# It writes fixtures/torchvision_outputs.npz and fixtures/pycocotools_polygons.json. Where
# torchvision's compiled ops do not load against the installed torch build (here, 0.28.0 against
# torch 2.13.0+cpu: "operator torchvision::nms does not exist"), wrap the import of
# _autograd_registrations and _meta_registrations in torchvision/__init__.py of the scratch venv
# in try/except RuntimeError: the models used here are pure Python and do not need those ops.
def make_fixtures(coco_json):
    # lazy on purpose: the references exist only in the scratch environment, never here
    from importlib.metadata import version
    import torchvision
    import pycocotools.mask as mask_api
    from torchvision.models import resnet50, resnet101
    from torchvision.models.segmentation import deeplabv3_resnet101
    torch.set_num_threads(2)
    outputs = {}
    for depth, make in ((50, resnet50), (101, resnet101)):
        for os_, replace in ((8, [False, True, True]), (16, [False, False, True])):
            net = make(weights=None, replace_stride_with_dilation=replace).eval()
            net.load_state_dict(seeded_weights(net.state_dict()))
            body = torch.nn.Sequential(*list(net.children())[:-2])  # without avgpool and fc
            with torch.no_grad():
                outputs[f"resnet{depth}_os{os_}"] = body(seeded_input(*BACKBONE_INPUT))[:, ::16]
    seg = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21,
                              aux_loss=True).eval()
    seg.load_state_dict(seeded_weights(seg.state_dict()))
    with torch.no_grad():
        outputs["deeplabv3_resnet101_aspp"] = seg.classifier[0](
            seg.backbone(seeded_input(*ASPP_INPUT))["out"])[:, ::4]
    os.makedirs(FIXTURES, exist_ok=True)
    np.savez_compressed(os.path.join(FIXTURES, "torchvision_outputs.npz"),
                        **{k: v.numpy().astype(np.float32) for k, v in outputs.items()})
    objects = []
    with open(coco_json) as f:
        coco = json.load(f)
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    for a in coco["annotations"]:
        if isinstance(a["segmentation"], list):
            objects.append(dict(source="coco", id=a["id"], h=sizes[a["image_id"]][0],
                                w=sizes[a["image_id"]][1], polygons=a["segmentation"]))
    rng = np.random.default_rng(2026)
    for i in range(400):  # random objects: 1-3 parts, 3-14 vertices, some outside the image
        h, w = int(rng.integers(1, 70)), int(rng.integers(1, 70))
        parts = []
        for _ in range(int(rng.integers(1, 4))):
            pts = rng.uniform(-10, max(h, w) + 10, (int(rng.integers(3, 15)), 2))
            kind = rng.random()
            if kind < 0.2:
                pts = np.round(pts)  # integer vertices
            elif kind < 0.35:
                pts = np.round(pts * 2) / 2  # half-pixel vertices
            if rng.random() < 0.1:
                pts[1] = pts[0]  # a repeated vertex
            parts.append([round(float(v), 3) for v in pts.ravel()])
        objects.append(dict(source="random", id=i, h=h, w=w, polygons=parts))
    for o in objects:
        rle = mask_api.merge(mask_api.frPyObjects(o["polygons"], o["h"], o["w"]))
        o["rle"] = rle["counts"].decode()
    with open(os.path.join(FIXTURES, "pycocotools_polygons.json"), "w") as f:
        json.dump({"made_with": f"pycocotools {version('pycocotools')}, torchvision "
                                f"{torchvision.__version__}, torch {torch.__version__}",
                   "objects": objects}, f, separators=(",", ":"))
    print(f"wrote {FIXTURES}: {len(outputs)} torchvision outputs, {len(objects)} polygon objects")


# =============================================================================================
# Coursework checks (docs/exercises.md, docs/teaching.md). The answers live in coursework.py, the
# student's file. `python -m pytest -m exercises` grades the repository's coursework.py and
# `python test_vortex.py grade HANDINS [--csv out.csv]` a folder of hand-ins. The student's code
# never runs in this process: a child process (RUNNER below) imports the hand-in, calls each
# answer on inputs sent from here and sends back what it returned, as plain data (numbers, lists,
# tensors) read with torch.load(weights_only=True); the expected values and the verdicts are
# computed here. Every check runs on fixed examples, smallest first, so that the first failure is
# the smallest and two runs give the same verdict. The teachers' key (fixtures/
# exercise_answers.txt) is a reference coursework.py with the wrong answers the proof tests hand in.
# =============================================================================================

TIME_LIMIT = 60  # seconds for the import of a hand-in and for each exercise's calls
JUDGE_LIMIT = 120  # seconds to judge one exercise's replies here (expected values cached first)
REPLY_BYTES = 64 << 20  # the most a reply may weigh
REPLY_VALUES = 10 ** 7  # the most elements (numbers, tensors' elements, list entries) it may hold
# names a hand-in may not use (a word of its code, or part of a string): ways around the grader
FORBIDDEN = ("inspect", "_getframe", "_exit", "subprocess", "ctypes", "__main__", "test_vortex",
             "exercise_answers")

# The child: imports the hand-in at the path it is sent, answers {"stub", "calls"} requests with
# what the answer returned, as tagged plain data (RUNNER_ANSWERS: also run in this process for
# the key's answers, by the proof tests). An audit hook stops the child from reading the grader
# or the key, writing outside its own temporary folder, starting processes or killing any.
RUNNER_ANSWERS = r'''
import contextlib, importlib.util, io, numbers, os, random, struct, sys
import numpy as np
import torch


def plain(v, depth=0, _self=None):
    """v as data the grader can read with weights_only=True, tagged with its type."""
    plain = _self
    t = f"{type(v).__module__}.{type(v).__qualname__}".replace("builtins.", "")
    if depth > 4:
        return {"t": "too deeply nested"}
    if isinstance(v, torch.Tensor):
        return {"t": "torch.Tensor", "v": v.detach().cpu().as_subclass(torch.Tensor).clone()}
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "biuf" and v.dtype.itemsize <= 8:
            return {"t": "numpy.ndarray", "v": torch.from_numpy(np.array(v).astype(
                v.dtype.newbyteorder("=")))}
        return {"t": f"numpy.ndarray of {v.dtype}"}
    if v is None or isinstance(v, (bool, str)):
        return {"t": t, "v": v if not isinstance(v, str) else v[:100]}
    if isinstance(v, numbers.Integral):
        return {"t": t, "v": int(v), "number": True}
    if isinstance(v, numbers.Real):
        return {"t": t, "v": float(v), "number": True}
    if isinstance(v, (list, tuple)):
        return {"t": "tuple" if isinstance(v, tuple) else "list",
                "v": [plain(x, depth + 1) for x in list(v)[:10000]]}
    if isinstance(v, dict):
        return {"t": "dict", "v": [[plain(k, depth + 1), plain(x, depth + 1)]
                                   for k, x in list(v.items())[:100]]}
    return {"t": t}


plain.__defaults__ = (0, plain)  # its own name bound: a global replaced changes nothing


def numpy_args(a):
    if isinstance(a, torch.Tensor):
        return a.numpy()
    return type(a)(numpy_args(x) for x in a) if isinstance(a, (list, tuple)) else a


def first_line(e):
    return (str(e).strip().splitlines() or [""])[0][:160]


def answer(req, module, plain=plain, numpy_args=numpy_args, first_line=first_line):
    if "load" in req:
        spec = importlib.util.spec_from_file_location("coursework", req["load"])
        module = importlib.util.module_from_spec(spec)
        sys.modules["coursework"] = module
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                spec.loader.exec_module(module)
        except BaseException as e:
            return {"raised": type(e).__name__, "message": first_line(e)}, None
        return {"loaded": True}, module
    if not hasattr(module, req["stub"]):
        return {"missing": True}, module
    value = getattr(module, req["stub"])
    if "calls" not in req:
        return {"value": plain(value)}, module
    if not callable(value):
        return {"not callable": plain(value)["t"]}, module
    results = []
    for args in req["calls"]:
        args = numpy_args(args) if req.get("numpy") else args
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                got = value(*args)
        except BaseException as e:
            results.append({"raised": type(e).__name__, "message": first_line(e)})
            break
        results.append({"value": plain(got), "printed": bool(out.getvalue().strip())})
    return {"results": results}, module
'''
RUNNER = RUNNER_ANSWERS + r'''
import ctypes, gc, platform, resource, signal, stat

torch.set_num_threads(1)
reply = os.fdopen(int(sys.argv[1]), "wb", buffering=0)
tmp = os.path.realpath(os.getcwd()) + os.sep


def limits():
    """Memory: what torch's import mapped and 4 GiB more; files: 64 MiB each (a larger write
    fails with an OSError); no core files."""
    vm = next(int(line.split()[1]) << 10 for line in open("/proc/self/status")
              if line.startswith("VmSize:"))
    for what, n in ((resource.RLIMIT_AS, vm + (4 << 30)), (resource.RLIMIT_FSIZE, 64 << 20),
                    (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(what)[1]
        n = n if hard == resource.RLIM_INFINITY else min(n, hard)
        resource.setrlimit(what, (n, n))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def seccomp(libc):
    """x86-64 only: no new process and no program (threads only), no signal to another process,
    no ptrace or reading another's memory, no namespace, mount or module, no TIOCSTI, no
    memfd_create (319: memory that is never mapped escapes RLIMIT_AS; found by an attack)."""
    if platform.machine() != "x86_64":
        return False
    deny = (57, 58, 59, 322, 101, 310, 311, 424, 434, 438, 129, 297, 272, 308, 165, 166, 161, 319,
            155, 169, 246, 320, 321, 313, 175, 176, 303, 304, 312, 298, 323, 248, 249, 250, 428,
            429, 430, 431, 432, 433, 442, 440, 167, 168, 163, 179, 164, 227, 170, 171, 172, 173)
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    code = []  # (op, k, jump-if-true label, jump-if-false label); labels: "allow", "eperm", ...

    def op(o, k=0, jt=None, jf=None):
        code.append((o, k, jt, jf))
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    op(ld, 4), op(jeq, 0xC000003E, None, "eperm"), op(ld, 0), op(jge, 0x40000000, "eperm")
    for nr in deny:
        op(jeq, nr, "eperm")
    op(jeq, 435, "enosys"), op(jeq, 56, "clone"), op(jeq, 16, "ioctl")
    for nr in (62, 200, 234):  # kill, tkill, tgkill: to this process only
        op(jeq, nr, "self")
    op(ret, allow)  # BPF jumps only forward: the returns last
    labels = {"clone": len(code)}
    op(ld, 16), op(jset, 0x10000, "allow", "eperm")  # CLONE_THREAD
    labels["ioctl"] = len(code)
    op(ld, 24), op(jeq, 0x5412, "eperm", "allow")  # TIOCSTI
    labels["self"] = len(code)
    op(ld, 16), op(jeq, os.getpid(), "allow", "eperm")
    for name, k in (("allow", allow), ("eperm", eperm), ("enosys", enosys)):
        labels[name] = len(code)
        op(ret, k)
    prog = b"".join(struct.pack("<HBBI", o, labels[jt] - i - 1 if jt else 0,
                                labels[jf] - i - 1 if jf else 0, k)
                    for i, (o, k, jt, jf) in enumerate(code))
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("<HxxxxxxQ", len(code), ctypes.addressof(buf))
    u = ctypes.c_ulong
    if libc.prctl(38, u(1), u(0), u(0), u(0)) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    return libc.prctl(22, u(2), ctypes.c_char_p(fprog), u(0), u(0)) == 0  # SECCOMP, FILTER


def landlock(libc):
    """Where the kernel has Landlock: read only Python, the libraries and the project's modules
    (not the tests, not the key, not other hand-ins, not another process's /proc), write only in
    the temporary folder; from its ABI 6 on, no signal out of the sandbox."""
    sc, n = libc.syscall, ctypes.c_long
    sc.restype = ctypes.c_long
    abi = sc(n(444), None, n(0), n(1))
    if abi < 1:
        return False
    every = (1 << 13) - 1 | (1 << 13) * (abi >= 2) | (1 << 14) * (abi >= 3) | (1 << 15) * (abi >= 5)
    files = (1 | 2 | 4 | 1 << 14 | 1 << 15) & every  # execute, write, read, truncate, ioctl
    read = 1 | 4 | 8  # execute, read a file, read a folder
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    attr = ctypes.create_string_buffer(struct.pack("<QQQ", every, 0, 3 * (abi >= 6))[:size])
    rules = sc(n(444), attr, n(size), n(0))
    if rules < 0:
        return False
    here = os.path.realpath(os.environ.get("PYTHONPATH", "") or tmp)
    paths = [(p, read) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr/lib",
                                 "/usr/lib64", "/lib", "/lib64", "/usr/local/lib",
                                 "/etc/ld.so.cache", "/proc/self", "/proc/cpuinfo",
                                 "/proc/meminfo", "/sys/devices/system/cpu", "/dev/urandom",
                                 *[q for q in sys.path if q and os.path.realpath(q) != here]}]
    paths += [("/dev/null", read | 2), (tmp, every), (here, 8)]
    paths += [(os.path.join(here, f), read) for f in os.listdir(here)
              if f.endswith(".py") and f not in ("test_vortex.py", "coursework.py")]
    for path, access in paths:
        try:
            fd = os.open(os.path.realpath(path), os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= files
        rule = ctypes.create_string_buffer(struct.pack("<Qi", access & every, fd))
        sc(n(445), n(rules), n(1), rule, n(0))
        os.close(fd)
    if libc.prctl(38, n(1), n(0), n(0), n(0)) != 0:
        return False
    return sc(n(446), n(rules), n(0)) == 0


def confine():
    limits()
    libc = ctypes.CDLL(None, use_errno=True)
    done = [name for name, layer in (("landlock", landlock), ("seccomp", seccomp))
            if layer(libc)]
    if "seccomp" not in done:  # processes: counted per user, so not for root
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    for name in ("from_file",):  # a file read from C++: no audit event (Landlock stops it)
        for owner in (torch, torch.UntypedStorage, torch.TypedStorage):
            setattr(owner, name, None)
    return " ".join(done)


confined = confine()
del confine, landlock, seccomp, limits
gc.collect()


def guard(event, args, _tmp=tmp, _fspath=os.fspath, _isinstance=isinstance, _any=any,
          _str=str.__str__, _realpath=os.path.realpath,
          _hidden=("exercise_answers", "test_vortex"), _writes=os.O_WRONLY | os.O_RDWR
          | os.O_APPEND | os.O_CREAT | os.O_TRUNC, _denied=frozenset((
              "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
              "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill",
              "ctypes.dlopen", "ctypes.dlsym", "os.chdir", "os.remove", "os.rename",
              "os.rmdir", "os.truncate", "os.chmod", "os.link", "os.symlink",
              "shutil.rmtree", "sys.addaudithook", "fcntl.ioctl", "os.fork", "pty.fork")),
          _proc=f"/proc/{os.getpid()}", _mine=(answer, plain, numpy_args, first_line),
          _me=None):
    if event in _denied:
        raise PermissionError(f"a hand-in may not use {event}")
    if event == "import" and args[0].split(".")[0] in _hidden:
        raise PermissionError(f"a hand-in may not import {args[0]}")
    if event == "object.__setattr__" and (args[0] is _me or _any(args[0] is f for f in _mine)):
        raise PermissionError("a hand-in may not rewrite the grader")
    if event == "open" and not _isinstance(args[0], int):
        path = _fspath(args[0])  # a str subclass could lie to `in`: an exact str, resolved
        path = path.decode(errors="replace") if _isinstance(path, bytes) else _str(path)
        if args[1] is None and not path.startswith("/"):  # os.open: dir_fd would be unseen
            raise PermissionError("a hand-in opens a file with os.open by its absolute path")
        path = _realpath(path)
        if _any(h in path for h in _hidden):
            raise PermissionError("a hand-in may not read the grader or the teachers' key")
        if path.startswith("/proc/") and path.split("/")[2].isdigit() and not (
                path + "/").startswith(_proc + "/"):
            raise PermissionError("a hand-in may not read another process")
        mode, flags = args[1] or "", args[2] or 0
        if (_any(c in mode for c in "wax+") or flags & _writes) and (
                ".." in path or path.startswith("/") and not path.startswith(_tmp)):
            raise PermissionError("a hand-in may write only in its temporary folder")


guard.__defaults__ = guard.__defaults__[:-1] + (guard,)  # _me: the guard guards itself
sys.addaudithook(guard)
module = None
while True:  # requests and replies: 8 bytes of length, then torch.save's bytes
    head = sys.stdin.buffer.read(8)
    if len(head) < 8:
        break
    raw = sys.stdin.buffer.read(struct.unpack("<Q", head)[0])
    req = torch.load(io.BytesIO(raw), weights_only=True)
    resp, module = ({"ready": True, "confined": confined}, module) if "ready" in req else \
        answer(req, module)
    buf = io.BytesIO()
    torch.save(resp, buf)
    reply.write(struct.pack("<Q", len(buf.getvalue())) + buf.getvalue())
'''

@contextlib.contextmanager
def one_thread():
    """The expected values' tensors are tiny: one thread is faster than two on a busy 2-core box,
    and the same thread count everywhere gives the same numbers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)

class Wrong(Exception):
    """A verdict of failure, with its one line."""

class Child:
    """One hand-in's child process. ask() sends a request and waits `limit` seconds for the
    reply; a child that exits, hangs or replies what is not plain data raises Wrong and is gone."""

    def __init__(self, path):
        self.tmp = tempfile.mkdtemp(prefix="handin-")
        self.path = os.path.join(self.tmp, "coursework.py")  # the child reads only its folder
        shutil.copyfile(path, self.path)
        self.fd, w = os.pipe()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.tmp,
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": HERE, "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": self.tmp,
               "OPENBLAS_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(w)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     pass_fds=(w,), cwd=self.tmp, env=env, start_new_session=True)
        os.close(w)
        try:  # torch's import and the sandbox, before any of the hand-in's code runs
            self.confined = self.ask({"ready": True}, 120, "the grader's child")["confined"]
        except (Wrong, KeyError):
            self.close()
            raise RuntimeError("the grader's child process did not start: is torch importable "
                               f"by {sys.executable}?") from None

    def read(self, n, deadline):
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def ask(self, request, limit, what):
        buf = io.BytesIO()
        torch.save(request, buf)
        deadline = time.monotonic() + limit
        try:
            self.proc.stdin.write(struct.pack("<Q", len(buf.getvalue())) + buf.getvalue())
            self.proc.stdin.flush()
            n = struct.unpack("<Q", self.read(8, deadline))[0]
            if n > REPLY_BYTES:
                raise ValueError("too large")
            raw = self.read(n, deadline)
            return checked_reply(torch.load(io.BytesIO(raw), weights_only=True))
        except TimeoutError:
            self.close()
            raise Wrong(f"{what} gave no answer within {limit} s") from None
        except (EOFError, BrokenPipeError):
            code = self.close()
            status = f"status {code}" if code >= 0 else f"signal {-code}"
            raise Wrong(f"{what} ended the process ({status}) instead of returning") from None
        except Exception:
            self.close()
            raise Wrong(f"{what} sent back something that is not plain data") from None

    def close(self):
        try:  # the whole group, even if its first process has gone
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = self.proc.wait()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.proc.stdin.close()
            for folder, subs, _ in os.walk(self.tmp):  # a folder it made unreadable, opened
                for sub in subs:
                    with contextlib.suppress(OSError):
                        os.chmod(os.path.join(folder, sub), 0o700)
            shutil.rmtree(self.tmp, ignore_errors=True)
        return code

DATA_TAGS = {"torch.Tensor", "numpy.ndarray", "list", "tuple", "dict", "NoneType", "bool", "str",
             "int", "float"}
REAL_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
               torch.complex128, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.bool}  # complex: refused by array() with its own line

def checked_reply(reply):
    """The child's reply if it is what the child's own code sends: the known keys, tagged plain
    data whose tags agree with the values (a tag is built from names a class can choose), at
    most REPLY_VALUES elements counted as visited (a shared sublist counts each time) and 12
    levels; else ValueError. Nothing from the child is trusted beyond this."""
    left = [REPLY_VALUES]

    def text(v, n=400):
        if type(v) is not str or len(v) > n:
            raise ValueError("not a short str")

    def node(p, depth):
        left[0] -= 1
        if left[0] < 0 or depth > 12 or type(p) is not dict or not set(p) <= {"t", "v", "number"}:
            raise ValueError("not plain data")
        text(p.get("t"), 200)
        t, number = p["t"], p.get("number", False)
        if number is not True and number is not False:
            raise ValueError("a number flag that is not a bool")
        if "v" not in p:
            if t in DATA_TAGS or number:
                raise ValueError("a tag without its value")
            return
        v = p["v"]
        if type(v) in (torch.Tensor, torch.nn.Parameter):
            left[0] -= v.numel()
            if (t not in ("torch.Tensor", "numpy.ndarray") or number or left[0] < 0
                    or v.layout != torch.strided or v.device.type != "cpu" or v.is_quantized
                    or v.dtype not in REAL_DTYPES):
                raise ValueError("not a plain tensor")
        elif type(v) is list and t in ("list", "tuple") and not number:
            for x in v:
                node(x, depth + 1)
        elif type(v) is list and t == "dict" and not number:
            for kv in v:
                if type(kv) is not list or len(kv) != 2:
                    raise ValueError("not a pair")
                node(kv[0], depth + 1), node(kv[1], depth + 1)
        elif type(v) in (int, float):
            if not number or t in DATA_TAGS - {"int", "float"}:
                raise ValueError("a number with another tag")
        elif type(v) is bool:
            if t != "bool" or number:
                raise ValueError("a bool with another tag")
        elif type(v) is str:
            text(v)
            if number or t in DATA_TAGS - {"str"}:
                raise ValueError("a str with another tag")
        elif v is not None or t != "NoneType" or number:
            raise ValueError("not plain data")

    if type(reply) is not dict or not set(reply) <= {
            "ready", "confined", "loaded", "raised", "message", "missing", "value",
            "not callable", "results"}:
        raise ValueError("not a reply")
    for key in ("ready", "loaded", "missing"):
        if key in reply and reply[key] is not True:
            raise ValueError("not a reply")
    for key in ("confined", "raised", "message", "not callable"):
        if key in reply:
            text(reply[key])
    if "value" in reply:
        node(reply["value"], 0)
    if "results" in reply:
        if type(reply["results"]) is not list or len(reply["results"]) > 10000:
            raise ValueError("not a reply")
        for r in reply["results"]:
            if type(r) is not dict:
                raise ValueError("not a reply")
            if set(r) == {"raised", "message"}:
                text(r["raised"]), text(r["message"])
            elif set(r) == {"value", "printed"} and type(r["printed"]) is bool:
                node(r["value"], 0)
            else:
                raise ValueError("not a reply")
    return reply

@contextlib.contextmanager
def judging_limit(seconds):
    """Wrong after `seconds` of judging (in the main thread; elsewhere the reply's bounds only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(*_):
        raise Wrong(f"the answer took more than {seconds} s to check")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

def printable(text):
    """text with every control character (escape sequences, line breaks) written as an escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))

# -- reading what the child returned: tagged plain data ---------------------------------------

def type_name(p):
    t = p["t"]
    return {"str": "a str", "NoneType": "None", "list": "a list", "tuple": "a tuple",
            "dict": "a dict", "int": "an int", "float": "a float"}.get(t, t)

def number(p, what, integer=False):
    """A Python number from an int, float, NumPy scalar or one-element tensor."""
    v = p.get("v")
    if p["t"] in ("torch.Tensor", "numpy.ndarray") and v.numel() == 1 and not v.is_complex():
        v = v.item()
    elif not p.get("number"):
        raise Wrong(f"{what} is {type_name(p)}, not {'an int' if integer else 'a number'}")
    if integer and not (math.isfinite(v) and float(v).is_integer()):
        raise Wrong(f"{what} has a fraction part: it is a count, an int")
    return int(v) if integer else float(v)

def array(p, what):
    """A float64 NumPy array from a tensor, an array or nested lists of numbers; a floating-point
    result in another dtype is refused (the inputs are float64)."""
    t, v = p["t"], p.get("v")
    if t in ("torch.Tensor", "numpy.ndarray"):
        if v.is_floating_point() and v.dtype != torch.float64:
            dtype = str(v.dtype).replace("torch.", "")
            raise Wrong(f"{what} is {dtype}: return float64, the inputs' dtype")
        if v.is_complex():
            raise Wrong(f"{what} is complex, not float64")
        return v.to(torch.float64).numpy()
    if t in ("list", "tuple"):
        parts = [array(x, what) for x in v]
        if len({x.shape for x in parts}) > 1:
            raise Wrong(f"{what} is a ragged list, not an array")
        return np.array(parts, dtype=np.float64).reshape((len(parts),) + (
            parts[0].shape if parts else ()))
    if p.get("number"):
        return np.array(float(v))
    raise Wrong(f"{what} is {type_name(p)}, not a float64 tensor or array")

def items(p, what, n=None):
    """The plain elements of a list, tuple or 1-D tensor or array (of length n if given)."""
    t, v = p["t"], p.get("v")
    if t in ("torch.Tensor", "numpy.ndarray") and v.dim() == 1:
        v = [{"t": t, "v": x} for x in v]
    elif t not in ("list", "tuple"):
        raise Wrong(f"{what} is {type_name(p)}, not a list or a tuple")
    if n is not None and len(v) != n:
        raise Wrong(f"{what} has {len(v)} elements, not {n}")
    return v

def ints(p, what, n=None):
    return [number(x, what, integer=True) for x in items(p, what, n)]

# -- the checks: inputs chosen here, expected values computed here ------------------------------

class Calls(NamedTuple):
    """A function answer's check: the calls' arguments, smallest first; `describe(args)` for the
    messages; `judge(args, value)` raises Wrong; `numpy`: tensors are sent as NumPy arrays."""
    args: list
    describe: Callable
    judge: Callable
    numpy: bool = False

def seeded(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)

# Table 1's spatial modules at OS 8, A(3) and the fifth vortex, as (pools, kernels, dilations)
EXERCISE_MODULES = [(m.pools, m.kernels, m.dilations) for m in (
    [vortex.table1_module(row, 1) for row in ("ASPP", "ASPP+", "A(5)", "A(9)", "A(13)", "Vortex")]
    + [ContextModule.module_a(1, 3)])] + [((1, 3, 9, 27, 81), (1, 3, 3, 3, 3), (1, 3, 9, 27, 81))]

def footprint_size(module):
    return int(footprint(*module).sum())

def check_exercise_1(p):
    u = number(p, "EXERCISE_1_U", integer=True)
    if u != footprint_size(EXERCISE_MODULES[4]):
        raise Wrong(f"u = {u} is not the number of distinct offsets in the union of A(13)'s 25 "
                    "windows of 13 x 13 on an unbounded map (an offset read by two overlapping "
                    "windows counts once; the borders play no part)")

def check_exercise_2():
    sides = (1, 2, 3, 4, 5, 7, 9, 10, 13, 24)
    cases = sorted(((h, w, c) for h in sides for w in sides for c in (True, False)),
                   key=lambda s: (s[0] * s[1], s))

    def judge(args, value):
        x, count_include_pad = args
        got = array(value, "the result")
        want = F.avg_pool2d(x, 9, 1, 4, count_include_pad=count_include_pad).numpy()
        if got.shape != want.shape:
            raise Wrong(f"the result has shape {got.shape}, not the input's {want.shape} (a "
                        "stride-1 'same' average keeps the map's size)")
        err = np.abs(got - want)
        if not err.max() < 1e-12:
            at = tuple(int(a) for a in np.unravel_index(np.nanargmax(np.nan_to_num(
                err, nan=np.inf)), err.shape)[2:])
            raise Wrong(f"your cascade is not the 9 x 9 average F.avg_pool2d(x, 9, 1, 4, "
                        f"count_include_pad={count_include_pad}) at pixel {at}")

    def describe(args):
        return (f"a {args[0].shape[2]} x {args[0].shape[3]} float64 map, count_include_pad="
                f"{args[1]}")
    return Calls([(seeded(h * 100 + w, 1, 2, h, w), c) for h, w, c in cases], describe, judge)

def check_exercise_3():
    sides = (1, 2, 3, 5, 12)
    cases = sorted(((pools, h, w, shift) for pools in [(1, 3), (5, 5, 5, 5), (1, 3, 9), (7,)]
                    for h in sides for w in sides for shift in (0.0, -5.0)),
                   key=lambda s: (s[1] * s[2], s))

    def judge(args, value):
        x, pools = args
        if value["t"] != "dict":
            raise Wrong(f"the result is {type_name(value)}, not a dict {{k: tensor}}")
        got = {number(k, "a key", integer=True): v for k, v in value["v"]}
        if set(got) != set(pools):
            raise Wrong(f"the keys are {sorted(got)}, not the pools {sorted(set(pools))}")
        for k in sorted(got):  # the largest value of each window's on-map part
            want = F.max_pool2d(F.pad(x, (k // 2,) * 4, value=-math.inf), k, 1).numpy()
            g = array(got[k], f"the {k} x {k} pooling")
            if g.shape != want.shape or not np.array_equal(g, want):
                raise Wrong(f"your {k} x {k} max pooling is not the largest value of each "
                            "window's on-map part")

    def describe(args):
        return f"a {args[0].shape[2]} x {args[0].shape[3]} float64 map, pools {args[1]}"
    return Calls([(seeded(h * 100 + w, 1, 2, h, w) + shift, pools)
                  for pools, h, w, shift in cases], describe, judge)

def pooling_accuracy(task, pool, seed, steps=20, n=13, lr=0.03):
    """Test accuracy of a tiny ContextModule (5 x 5 pooling before a 1x1 and a 3x3 branch at
    rate 5) trained `steps` Adam steps on a cue 5 pixels to the right: on Gaussian noise, the
    sign of the 5 x 5 mean there (task "mean"); on sparse spikes of +1 and -1 (3% each), whether
    the 5 x 5 window there holds a +1 (task "max")."""
    def labels(x):
        cue = F.avg_pool2d(x, 5, 1, 2) > 0 if task == "mean" else F.max_pool2d(x, 5, 1, 2) > 0
        return torch.roll(cue, -5, dims=3)[..., 2:n - 2, 2:n - 7].float()

    def inputs(batch, gen):
        x = torch.randn(batch, 1, n, n, generator=gen)
        if task == "max":  # +1 where x > 1.88, -1 where x < -1.88, else 0
            x = (x > 1.88).float() - (x < -1.88).float()
        return x
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # both poolings of a seed: the same weights and the same data
    m = ContextModule(1, (5, 5), (1, 3), (1, 5), out_channels=8, image_pool=False, dropout=0.0)
    if pool == "max":
        m.pool = lambda x: {k: F.max_pool2d(x, k, 1, k // 2) for k in m.pools}
    head = torch.nn.Conv2d(8, 1, 1)
    opt = torch.optim.Adam(list(m.parameters()) + list(head.parameters()), lr)
    for _ in range(steps):
        x = inputs(32, g)
        logits = head(m(x))[..., 2:n - 2, 2:n - 7]
        loss = F.binary_cross_entropy_with_logits(logits, labels(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    x = inputs(64, torch.Generator().manual_seed(10 ** 6 + seed))
    with torch.no_grad():
        return ((head(m(x))[..., 2:n - 2, 2:n - 7] > 0).float() == labels(x)).float().mean().item()

@functools.lru_cache(maxsize=None)
def pooling_evidence(seeds=5):
    """{task: (winner, wins, seeds, one-sided sign-test p)}: per seed, the pooling with the
    higher test accuracy; the winner is the one that wins more seeds."""
    out = {}
    with one_thread():
        for task in ("mean", "max"):
            wins = sum(pooling_accuracy(task, "avg", s) > pooling_accuracy(task, "max", s)
                       for s in range(seeds))
            best = max(wins, seeds - wins)
            p = sum(math.comb(seeds, i) for i in range(best, seeds + 1)) / 2 ** seeds
            out[task] = ("avg" if wins > seeds - wins else "max", best, seeds, p)
    return out

def check_exercise_3_winners(p):
    what = "EXERCISE_3_WINNERS"
    if p["t"] != "dict":
        raise Wrong(f"{what} is {type_name(p)}, not a dict {{'mean': 'avg' or 'max', 'max': ...}}")
    winners = {k.get("v"): v for k, v in p["v"]}
    if set(winners) != {"mean", "max"}:
        raise Wrong(f"{what} has not exactly the keys 'mean' and 'max'")
    for task in ("mean", "max"):
        if winners[task].get("v") not in ("avg", "max"):
            raise Wrong(f"{what}[{task!r}] is not the str 'avg' or 'max'")
    for task, (winner, best, seeds, p) in pooling_evidence().items():
        if p >= 0.05:
            raise Wrong(f"the evidence is inconclusive ({best}/{seeds}, p = {p}): tell your "
                        "teacher")
        if winners[task]["v"] != winner:
            raise Wrong(f"on the {task!r} cue {winners[task]['v']} pooling lost the paired sign "
                        f"test ({best} of {seeds} seeds, p = {p:.3f}): which pooled value equals "
                        "the cue?")

def check_exercise_4():
    rng = random.Random(4)
    cases = [([1], 1, 1), ([1, 1], 1, 1), ([2, 1], 1, 2), ([1, 3], 2, 1)] + [
        ([rng.randint(1, 3) for _ in range(rng.randint(1, 4))], rng.randint(1, 3),
         rng.randint(1, 3)) for _ in range(36)]
    cases.sort(key=lambda s: (sum(s[0]) * s[1] * s[2], len(s[0]), s))

    def judge(args, value):
        (xs,) = args
        got = [array(x, "the mean and the variance") for x in items(value, "the result", 2)]
        whole = torch.cat(xs)
        want = [whole.mean(dim=(0, 2, 3)).numpy(), whole.var(dim=(0, 2, 3), unbiased=False)
                .numpy()]
        for name, g, wv in zip(("mean", "variance"), got, want):
            if g.shape != wv.shape:
                raise Wrong(f"the {name} has shape {g.shape}, not one value per channel "
                            f"{wv.shape}")
            if not np.abs(g - wv).max() < 1e-9:
                raise Wrong(f"your {name} {g.tolist()} is not the one that one process "
                            "normalises with on the whole batch")

    def describe(args):
        xs = args[0]
        return (f"per-rank batches of {[len(x) for x in xs]} float64 images of "
                f"{xs[0].shape[2]} x {xs[0].shape[3]}")
    return Calls([([seeded(100 * i + r, n, 2, h, w) + 3 * r for r, n in enumerate(sizes)],)
                  for i, (sizes, h, w) in enumerate(cases)], describe, judge)

@functools.lru_cache(maxsize=None)
def theoretical_receptive_field():
    """Side of the input square that reaches one output pixel of ResNet(18, 8) in eval mode,
    every ReLU the identity and the max pooling an average of the same window, by autograd."""
    torch.manual_seed(0)
    net = ResNet(18, 8, base_channels=2).eval()
    for mod in list(net.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.ReLU):
                setattr(mod, name, torch.nn.Identity())
            if isinstance(child, torch.nn.MaxPool2d):
                setattr(mod, name, torch.nn.AvgPool2d(child.kernel_size, child.stride,
                                                      child.padding))
    x = torch.randn(1, 3, 801, 801, requires_grad=True)
    with one_thread():
        y = net(x)
        y[0, :, y.shape[2] // 2, y.shape[3] // 2].sum().backward()
    rows = np.nonzero(x.grad[0].abs().sum(0).amax(1).numpy())[0]
    return int(rows.max() - rows.min() + 1)

def check_exercise_5(p):
    side = number(p, "EXERCISE_5_RF", integer=True)
    if side != theoretical_receptive_field():
        raise Wrong(f"{side} x {side} is not the square of input pixels that reach one output "
                    "pixel of ResNet(18, 8) on 801 x 801 in eval mode (add (kernel - 1) x "
                    "dilation x the stride so far, layer by layer, max pooling included, with "
                    "each block's own rate)")

def check_exercise_6():
    rng = random.Random(6)
    cases = [(v, n) for n in (1, 2, 3) for v in range(-(3 ** n - 1) // 2, (3 ** n - 1) // 2 + 1)]
    for n in (4, 5, 6, 7):
        top = (3 ** n - 1) // 2
        cases += [(-top, n), (top, n)] + [(rng.randint(-top, top), n) for _ in range(8)]

    def judge(args, value):
        v, n = args
        digits = ints(value, "the result")
        if not (len(digits) == n and set(digits) <= {-1, 0, 1}
                and sum(d * 3 ** i for i, d in enumerate(digits)) == v):
            raise Wrong(f"{digits} (least significant first) are not {n} digits in {{-1, 0, 1}} "
                        f"worth {v}, so the offset {v} would have no single window")
    return Calls(cases, lambda a: f"v = {a[0]}, n = {a[1]}", judge)

def check_exercise_6_side(p):
    side = number(p, "EXERCISE_6_SIDE", integer=True)
    grid = footprint(*EXERCISE_MODULES[-1])
    if not (grid.all() and side == grid.shape[0]):
        raise Wrong(f"the five-branch vortex does not tile a {side} x {side} square: its "
                    "largest windows are 81 wide, spaced 81 apart")

def check_exercise_7():
    cases = sorted(((d, i) for i, m in enumerate(EXERCISE_MODULES)
                    for d in range(footprint(*m).shape[0] // 2 + 3)))  # every ring, and beyond

    def judge(args, value):
        grid, d = footprint(*args[:3]), args[3]
        r = grid.shape[0] // 2
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        ring = np.maximum(abs(yy), abs(xx)) == d
        want = grid[ring].sum() / max(ring.sum(), 1) if d <= r else 0.0
        got = number(value, "the result")
        if not abs(got - want) < 1e-12:
            raise Wrong(f"{got:.4f} is not the fraction of the ring's offsets that the module "
                        "reads")
    return Calls([(*EXERCISE_MODULES[i], d) for d, i in cases],
                 lambda a: f"the module {a[:3]} at Chebyshev distance {a[3]}", judge)

@functools.lru_cache(maxsize=None)
def utilization_at(module, h, w, i, j):
    with one_thread():
        m = ContextModule(1, *module, out_channels=2)
        return round(measured_utilization(m, h, w, pixel=(i, j)) * h * w)

def check_exercise_8():
    modules = EXERCISE_MODULES[:-1] + [((1, 3), (3, 3), (2, 5)), ((1, 1, 3), (3, 3, 3), (1, 4, 7))]
    rng = random.Random(8)
    cases = [(m, 1, 1, 0, 0) for m in modules] + [(m, 40, 40, 0, 0) for m in modules]
    for _ in range(40):
        h, w = rng.randint(1, 40), rng.randint(1, 40)
        cases.append((rng.choice(modules), h, w, rng.randrange(h), rng.randrange(w)))
    cases.sort(key=lambda s: (s[1] * s[2], modules.index(s[0]), s[1:]))

    def judge(args, value):
        want = utilization_at(args[:3], *args[3:])
        got = number(value, "the result", integer=True)
        if got != want:
            raise Wrong(f"{got} is not the number of positions the module reads there "
                        "(autograd): which taps land on the map, and how much of each window?")

    def describe(args):
        return f"pixel ({args[5]}, {args[6]}) of a {args[3]} x {args[4]} map, module {args[:3]}"
    return Calls([(*m, h, w, i, j) for m, h, w, i, j in cases], describe, judge)

def check_exercise_9():
    def judge(args, value):
        (k,) = args
        got = number(value, "the result", integer=True)
        if got != footprint_size(vortex_module_a(k)):  # the value is exercise 1's answer: unsaid
            raise Wrong(f"A({k}) does not read {got} distinct offsets on an unbounded map")
    return Calls([(k,) for k in range(1, 24, 2)], lambda a: f"k = {a[0]}", judge)

def vortex_module_a(k):
    m = ContextModule.module_a(1, k)
    return m.pools, m.kernels, m.dilations

@functools.lru_cache(maxsize=None)
def smallest_full_module_a():
    with one_thread():
        return next(k for k in range(1, 66, 2) if measured_utilization(
            ContextModule.module_a(1, k, out_channels=2)) == 1)

def check_exercise_9_smallest_k(p):
    k = number(p, "EXERCISE_9_SMALLEST_K", integer=True)
    if k != smallest_full_module_a():
        raise Wrong(f"A({k}) is not the first Module A that reads all 65 x 65 positions at the "
                    "centre pixel (measured_utilization == 1); think in two dimensions, not "
                    "along one axis")

def check_exercise_10():
    def judge(args, value):
        b, n = args
        parts = items(value, "the result", 3)
        pools, kernels, dilations = (ints(x, "pools, kernels and dilations", n) for x in parts)
        for i, (k, m, d) in enumerate(zip(pools, kernels, dilations)):
            if k != b ** i:
                raise Wrong(f"branch {i} pools {k} x {k} windows, not b**i x b**i")
            if i == 0 and m != 1:
                raise Wrong(f"branch 0 is a {m} x {m} convolution, not 1 x 1 (it reads the "
                            "pixel itself)")
            if i > 0 and not (m % 2 == 1 and (d == k or m == 1) and m * k == b ** (i + 1)):
                raise Wrong(f"branch {i}'s {k} x {k} windows at rate {d} do not tile a "
                            f"{b ** (i + 1)} x {b ** (i + 1)} square, each offset read once")
        grid = footprint(pools, kernels, dilations)
        if not (grid.shape == (b ** n, b ** n) and grid.all()):
            raise Wrong(f"the module does not tile a {b ** n} x {b ** n} square")
    cases = [(3, 2), (3, 3), (3, 4), (5, 2), (5, 3), (7, 2), (7, 3)]
    return Calls(cases, lambda a: f"b = {a[0]}, n = {a[1]}", judge)

@functools.lru_cache(maxsize=None)
def module_gradient(module, seed):
    pools, kernels, dilations = module
    weights = [seeded(seed + i, n, n) for i, n in enumerate(kernels)]
    with one_thread():
        m = ContextModule(1, pools, kernels, dilations, out_channels=1).double()
        side = footprint(pools, kernels, dilations).shape[0]
        x = torch.zeros(1, 1, side, side, dtype=torch.float64, requires_grad=True)
        pooled = m.pool(x)
        out = sum(F.conv2d(pooled[k], wt.view(1, 1, n, n), None, 1, d * (n // 2), d)
                  [0, 0, side // 2, side // 2]
                  for k, n, d, wt in zip(pools, kernels, dilations, weights))
        (grad,) = torch.autograd.grad(out, x)
    return weights, grad[0, 0].numpy()

def check_exercise_10_gradient():
    cases = [(module, seed) for seed in (0, 1)
             for module in EXERCISE_MODULES[:-1] + [((1, 5), (1, 5), (1, 5))]]
    calls = [(*module, module_gradient(module, seed)[0]) for module, seed in cases]

    def judge(args, value):
        module, seed = next(c for c, a in zip(cases, calls) if a is args)
        want = module_gradient(module, seed)[1]
        got = array(value, "the gradient")
        side = want.shape[0]
        if got.shape != want.shape:
            raise Wrong(f"the gradient is {side} x {side} offsets wide, not {got.shape}")
        err = np.nan_to_num(np.abs(got - want), nan=np.inf)
        if not err.max() < 1e-12:
            at = tuple(int(v) - side // 2 for v in np.unravel_index(err.argmax(), err.shape))
            raise Wrong(f"your gradient at offset {at}, "
                        f"{got[at[0] + side // 2, at[1] + side // 2]:.4g}, is not autograd's")
    return Calls(calls, lambda a: f"the module {a[:3]}", judge, numpy=True)

EXERCISES = [  # (number, stub, the stub's parameters (None: a constant), check)
    (1, "EXERCISE_1_U", None, check_exercise_1),
    (2, "exercise_2_box_average_9", "x count_include_pad", check_exercise_2),
    (3, "exercise_3_max_pool", "x pools", check_exercise_3),
    (3, "EXERCISE_3_WINNERS", None, check_exercise_3_winners),
    (4, "exercise_4_sync_batch_stats", "xs", check_exercise_4),
    (5, "EXERCISE_5_RF", None, check_exercise_5),
    (6, "exercise_6_balanced_digits", "v n", check_exercise_6),
    (6, "EXERCISE_6_SIDE", None, check_exercise_6_side),
    (7, "exercise_7_ring_coverage", "pools kernels dilations d", check_exercise_7),
    (8, "exercise_8_utilization_at", "pools kernels dilations h w i j", check_exercise_8),
    (9, "exercise_9_module_a_u", "k", check_exercise_9),
    (9, "EXERCISE_9_SMALLEST_K", None, check_exercise_9_smallest_k),
    (10, "exercise_10_vortex", "b n", check_exercise_10),
    (10, "exercise_10_gradient", "pools kernels dilations weights", check_exercise_10_gradient),
]
EXPENSIVE = {"EXERCISE_3_WINNERS": pooling_evidence, "EXERCISE_5_RF": theoretical_receptive_field,
             "EXERCISE_9_SMALLEST_K": smallest_full_module_a}  # expected values, cached
SHORT = {}  # the table's column names: 1, 2, 3a, 3b, 4, ...
for _n, _stub, _, _ in EXERCISES:
    _twins = [s for m, s, _, _ in EXERCISES if m == _n]
    SHORT[_stub] = f"{_n}{'ab'[_twins.index(_stub)] if len(_twins) > 1 else ''}"

# -- reading the hand-in's source: which stubs are as shipped, which forbidden names it uses ----

def pristine(node, params):
    """The stub as shipped: `NAME = None`, or a def with these parameters whose body (after a
    docstring) is only `raise NotImplementedError`."""
    if params is None:
        return (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.value, ast.Constant) and node.value.value is None)
    if not isinstance(node, ast.FunctionDef) or node.decorator_list:
        return False
    a = node.args
    if ([x.arg for x in a.args] != params.split() or a.posonlyargs or a.kwonlyargs or a.vararg
            or a.kwarg or a.defaults):
        return False
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    exc = body[0].exc if len(body) == 1 and isinstance(body[0], ast.Raise) else None
    exc = exc.func if isinstance(exc, ast.Call) and not exc.args else exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError" and not body[0].cause

def words(node):
    """The names, attributes and imported modules of a statement, and its strings (not
    docstrings) that are a name or a dotted path ("_getframe", "os._exit"), not prose."""
    out = set()
    notes = {id(n.value) for n in ast.walk(node) if isinstance(n, ast.Expr)}  # docstrings
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.alias):
            out.update(n.name.split("."))
        elif isinstance(n, ast.ImportFrom) and n.module:
            out.update(n.module.split("."))
        elif (isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in notes
              and re.fullmatch(r"\s*[\w.]+\s*", n.value)):
            out.update(n.value.strip().split("."))
    return out

def read_handin(source):
    """({stub: "as shipped" | "edited" | "missing"}, {stub or None (the rest of the file): the
    first forbidden name it uses}), from the source alone: the grader never imports it."""
    tree = ast.parse(source)
    last = {}
    for node in tree.body:
        names = [getattr(node, "name", None)] + [
            n.id for t in getattr(node, "targets", []) + [getattr(node, "target", None)] if t
            for n in ast.walk(t) if isinstance(n, ast.Name)] + [
            a.asname or a.name for a in getattr(node, "names", []) if isinstance(a, ast.alias)]
        last.update({name: node for name in names if name})
    states = {stub: "missing" if stub not in last else
              "as shipped" if pristine(last[stub], params) else "edited"
              for _, stub, params, _ in EXERCISES}
    owner = {id(last[stub]): stub for stub in states if stub in last}
    forbidden = {}
    for node in tree.body:
        used = sorted(words(node) & set(FORBIDDEN))
        if used:
            forbidden.setdefault(owner.get(id(node)), used[0])
    return states, forbidden

# -- grading one hand-in -------------------------------------------------------------------------

def clean(text, path):
    """A child's message without what differs between two runs (addresses, the hand-in's path)."""
    text = text.replace(os.path.dirname(os.path.abspath(path)) + os.sep, "")
    text = re.sub(r"[^\s'\"]*handin-\w{8}" + re.escape(os.sep), "", text)  # the child's folder
    return re.sub(r"0x[0-9a-fA-F]+", "0x..", text)

def verdict(n, stub, params, check, state, child, path, limit):
    """("passed" | "not attempted", the one line) of one exercise; raises Wrong if it fails."""
    asked = stub if params is None else f"{stub}({', '.join(params.split())})"
    calls = check() if params else None
    request = {"stub": stub} if params is None else {"stub": stub, "calls": calls.args,
                                                      "numpy": calls.numpy}
    reply = child.ask(request, limit, asked)
    if reply.get("missing"):
        raise Wrong(f"coursework.py has no {stub} (keep the stub's name)")
    todo = f"exercise {n} not attempted: {'set' if params is None else 'write'} {stub} in " \
           "coursework.py"
    if params is None:
        if reply["value"]["t"] == "NoneType":
            if state == "as shipped":
                return "not attempted", todo
            raise Wrong(f"{stub} is None")
        EXPENSIVE.get(stub, lambda: None)()  # cached, before the clock starts
        with judging_limit(JUDGE_LIMIT):
            check(reply["value"])
        return "passed", ""
    if "not callable" in reply:
        raise Wrong(f"{stub} is {type_name({'t': reply['not callable']})}, not a function")
    with judging_limit(JUDGE_LIMIT):
        return judge_calls(stub, asked, calls, reply, state, todo, path)

def judge_calls(stub, asked, calls, reply, state, todo, path):
    for args, result in zip(calls.args, reply["results"]):
        on = f"on {calls.describe(args)}"
        if result.get("raised") == "NotImplementedError" and state == "as shipped":
            return "not attempted", todo
        if "raised" in result:
            edited = result["raised"] == "NotImplementedError"
            message = clean(result["message"], path)
            raise Wrong(f"{stub} raised {result['raised']} {on}" + f": {message}" * bool(message)
                        + " (the stub was edited, so this counts as an answer)" * edited)
        if result["value"]["t"] == "NoneType":
            did = "printed instead of returning" if result["printed"] else "returned None"
            raise Wrong(f"{stub} {did} {on}")
        try:
            calls.judge(args, result["value"])
        except Wrong as e:
            raise Wrong(f"{e} ({on})") from None
    if len(reply["results"]) != len(calls.args):
        raise Wrong(f"{asked} did not answer every call")
    return "passed", ""

def grade_handin(path, limit=TIME_LIMIT):
    """{stub: (verdict, one line)} for the hand-in coursework.py at `path`. Its code runs only
    in a child process: one for the import and the exercises, a new one after a child that
    exits or hangs (that exercise fails). Deterministic: the same file, the same grades. Every
    control character of a line is shown escaped."""
    return {stub: (v, printable(reason)) for stub, (v, reason) in grades_of(path, limit).items()}

def grades_of(path, limit):
    if not os.path.isfile(path):
        return {stub: ("not attempted", f"exercise {n} not attempted: no coursework.py")
                for n, stub, _, _ in EXERCISES}

    def every(reason):
        return {stub: ("failed", f"exercise {n}: {reason}") for n, stub, _, _ in EXERCISES}
    try:
        states, forbidden = read_handin(open(path, encoding="utf-8", errors="replace").read())
    except (SyntaxError, ValueError) as e:
        return every(f"coursework.py does not parse (line {getattr(e, 'lineno', '?')}: "
                     f"{getattr(e, 'msg', e)})")
    if None in forbidden:  # outside the stubs: every exercise fails
        return every(f"coursework.py uses {forbidden[None]}, which a hand-in may not use")
    grades, child = {}, [None]
    try:
        graded(path, limit, states, forbidden, grades, child)
    finally:
        if child[0] is not None:
            child[0].close()
    return every(grades["import"]) if "import" in grades else grades

def graded(path, limit, states, forbidden, grades, holder):
    child = None
    for n, stub, params, check in EXERCISES:
        try:
            if stub in forbidden:
                raise Wrong(f"{stub} uses {forbidden[stub]}, which a hand-in may not use")
            if child is None:
                try:
                    child = holder[0] = start_child(path, limit)
                except Wrong as e:  # a hand-in that cannot be imported fails every exercise
                    grades.clear()
                    grades["import"] = e
                    return
            grades[stub] = verdict(n, stub, params, check, states[stub], child, path, limit)
        except Exception as e:  # Wrong, or a value shaped to break a check: failed, no crash
            why = e if isinstance(e, Wrong) else f"its answer could not be checked " \
                f"({type(e).__name__}: the value is not of the kind the exercise asks for)"
            grades[stub] = ("failed", f"exercise {n}: {why}")
            if child is not None and child.proc.poll() is not None:
                child.close()
                child = holder[0] = None  # it is gone: the next exercise starts a new one

def start_child(path, limit):
    child = Child(path)
    reply = child.ask({"load": child.path}, limit, "coursework.py's import")
    if "raised" in reply:
        child.close()
        raise Wrong(f"coursework.py raised {reply['raised']} when imported: "
                    f"{clean(reply['message'], path)}")
    return child

@functools.lru_cache(maxsize=None)
def repository_grades():
    return grade_handin(os.path.join(HERE, "coursework.py"))

@pytest.mark.exercises
@pytest.mark.parametrize("stub", [s for _, s, _, _ in EXERCISES])
def test_exercise(stub):
    """`python -m pytest -m exercises`: grades coursework.py (not attempted -> skipped)."""
    verdict_, reason = repository_grades()[stub]
    if verdict_ == "not attempted":
        pytest.skip(reason)
    if verdict_ == "failed":
        pytest.fail(reason, pytrace=False)

# -- grading a class: `python test_vortex.py grade HANDINS [--csv out.csv]` ----------------------

def grade_class(folder, csv_path=None, limit=TIME_LIMIT):
    """Grade every HANDINS/<student>/coursework.py, each in its own child process; print the
    table and the failures' reasons; write the CSV (student, exercise, stub, verdict, reason)."""
    names = sorted(os.listdir(folder))
    students = [d for d in names if os.path.isdir(os.path.join(folder, d))]
    rows = [(s, SHORT[stub], stub, *grades[stub]) for s in students
            for grades in [grade_handin(os.path.join(folder, s, "coursework.py"), limit)]
            for _, stub, _, _ in EXERCISES]
    mark = {"passed": "P", "failed": "F", "not attempted": "-"}
    shown = {s: printable(s) for s in names}  # a name's line breaks and escapes, escaped
    width = max([len(shown[s]) for s in students] + [7])
    print(f"{'student':<{width}} " + "".join(f"{SHORT[s]:>4}" for _, s, _, _ in EXERCISES)
          + "  passed")
    for s in students:
        mine = [r for r in rows if r[0] == s]
        print(f"{shown[s]:<{width}} " + "".join(f"{mark[r[3]]:>4}" for r in mine)
              + f"  {sum(r[3] == 'passed' for r in mine)}/{len(mine)}")
    print("P passed, F failed, - not attempted. Why each F failed:")
    for s, short, stub, verdict_, reason in rows:
        if verdict_ == "failed":
            print(f"{shown[s]} {short}: {reason}")
    for name in names:
        if name not in students:
            print(f"skipped {shown[name]}: not a folder (a hand-in is a folder holding "
                  "coursework.py)")
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows([("student", "exercise", "stub", "verdict", "reason")] + rows)
    return rows

# -- proof: the checks pass the key, fail the wrong answers and every trick --------------------

def teachers_key():
    """The decoded key: a reference coursework.py, then WRONG and VARIANTS (docs/teaching.md)."""
    text = open(os.path.join(HERE, "fixtures", "exercise_answers.txt")).read()
    blob = "".join(line for line in text.split("\n") if not line.startswith("#"))
    return zlib.decompress(base64.b64decode(blob)).decode()

def handin(folder, name, source):
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    path = os.path.join(folder, name, "coursework.py")
    with open(path, "w") as f:
        f.write(source)
    return path

def wrong_handin(j):
    """The key with every stub that has a j-th wrong answer (WRONG in the key) replaced by it."""
    return teachers_key() + ("\nglobals().update({s: list(w.values())[%d] for s, w in "
                             "WRONG.items() if len(w) > %d})\n" % (j, j))

def test_coursework_is_the_stubs_and_nothing_else():
    """coursework.py as shipped: every stub, as shipped, and nothing else (no import)."""
    source = open(os.path.join(HERE, "coursework.py")).read()
    states, forbidden = read_handin(source)
    assert set(states.values()) == {"as shipped"} and not forbidden
    body = ast.parse(source).body[1:]
    assert [getattr(n, "name", None) or n.targets[0].id for n in body] == list(states)
    assert {n for n, _, _, _ in EXERCISES} == set(range(1, 11))
    assert len(source.splitlines()) <= 200

def test_grading_the_untouched_coursework_says_not_attempted():
    """What `python -m pytest -m exercises` reports on a fresh clone: every exercise skipped."""
    grades = repository_grades()
    for n, stub, params, _ in EXERCISES:
        todo = "set" if params is None else "write"
        assert grades[stub] == ("not attempted", f"exercise {n} not attempted: {todo} {stub} in "
                                                 "coursework.py")

class Trusted:
    """The child's answering code (RUNNER_ANSWERS) run in this process on trusted answers, the
    key's: the proof tests judge every wrong answer without a process for each."""

    def __init__(self, answers):
        ns = {}
        exec(RUNNER_ANSWERS, ns)
        self.answer, self.module = ns["answer"], argparse.Namespace(**answers)

    def ask(self, request, limit, what):
        def roundtrip(obj):
            buf = io.BytesIO()
            torch.save(obj, buf)
            return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        with one_thread():  # as in a child
            return checked_reply(roundtrip(self.answer(roundtrip(request), self.module)[0]))

@pytest.mark.parametrize("kind", ["reference", "wrong-1", "wrong-2", "wrong-3", "wrong-4",
                                  "wrong-5", "variants"])
def test_the_checks_pass_the_key_and_fail_the_wrong_answers(kind):
    """The key passes every check; wrong-j, the j-th wrong answer of each exercise that has one
    (WRONG in the key), fails it, with one line that starts with the exercise's number and gives
    no answer away; a right answer in another type (VARIANTS) is accepted, or refused with the
    type expected."""
    ns = {}
    exec(teachers_key(), ns)
    if kind == "variants":
        answers = {stub: a for stub, (a, _) in ns["VARIANTS"].items()}
        expect = {stub: word for stub, (_, word) in ns["VARIANTS"].items()}
    elif kind == "reference":
        answers, expect = {stub: ns[stub] for stub in ns["WRONG"]}, dict.fromkeys(ns["WRONG"])
    else:
        j = int(kind[-1]) - 1
        answers = {stub: list(w.values())[j] for stub, w in ns["WRONG"].items() if len(w) > j}
        expect = dict.fromkeys(answers, "")
    child = Trusted(answers)
    secrets = [str(ns[s]) for s in ("EXERCISE_1_U", "EXERCISE_5_RF", "EXERCISE_6_SIDE")]
    for n, stub, params, check in EXERCISES:
        if stub not in answers:
            continue
        try:
            verdict_, reason = verdict(n, stub, params, check, "edited", child, "", TIME_LIMIT)
        except Wrong as e:
            verdict_, reason = "failed", f"exercise {n}: {e}"
        if expect[stub] is None:
            assert verdict_ == "passed", (stub, reason)
        else:
            assert verdict_ == "failed" and reason.startswith(f"exercise {n}: "), (stub, reason)
            assert expect[stub] in reason and "\n" not in reason, (stub, reason)
            assert not any(re.search(rf"\b{s}\b", reason) for s in secrets), (stub, reason)

PATH_TRICK = """
import os


class _P(str):  # found by an attack: `in` and startswith answered by the hand-in
    def __contains__(self, x):
        return False

    def startswith(self, *a):
        return True


ROOT = os.path.dirname(os.path.abspath(vortex_file))


def exercise_9_module_a_u(k):
    return len(open(_P(os.path.join(ROOT, "fixtures", "exercise_" + "answers.txt"))).read())


def exercise_10_vortex(b, n):
    open(_P(os.path.join(ROOT, "PWNED.txt")), "w").write("x")
"""

LYING_TYPES = """
class Tensor:  # found by an attack: type tags built from a class's names
    pass


Tensor.__module__ = "torch"


class _List:
    pass


_List.__module__, _List.__qualname__ = "builtins", "list"
EXERCISE_5_RF = Tensor()
EXERCISE_9_SMALLEST_K = _List()


def exercise_6_balanced_digits(v, n):
    return _List()
"""

# Found by an attack: ways out of the audit hook. Each stub raises an error naming LEAK if what
# it tried worked (the test looks for LEAK in the reasons).
MACHINE_TRICK = """
import multiprocessing, os, signal, sys
import torch
ROOT = os.path.dirname(os.path.abspath(vortex_file))


def exercise_2_box_average_9(x, count_include_pad):
    p = multiprocessing.get_context("spawn").Process(target=os.getpid)
    p.start()
    p.join()
    raise RuntimeError(f"LEAK: a process ran ({p.exitcode})")


def exercise_3_max_pool(x, pools):
    import multiprocessing.util as u  # _posixsubprocess.fork_exec: no audit event
    pid = u.spawnv_passfds(os.fsencode(sys.executable), [sys.executable, "-c", "pass"],
                          [])
    raise RuntimeError(f"LEAK: started {pid}")


def exercise_4_sync_batch_stats(xs):  # SIGWINCH: ignored by default, so the test survives it
    signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGWINCH)
    raise RuntimeError("LEAK: signalled the grader")


def exercise_6_balanced_digits(v, n):
    try:
        fd = os.memfd_create("x")  # unmapped memory, past RLIMIT_AS
        os.write(fd, bytes(1 << 20))
        raise RuntimeError("LEAK: memfd_create")
    except PermissionError:
        pass
    b = bytearray(8 << 30)
    raise RuntimeError(f"LEAK: {len(b)} bytes")


def exercise_7_ring_coverage(pools, kernels, dilations, d):
    key = os.path.join(ROOT, "fixtures", "exercise_" + "answers.txt")
    t = torch.from_file(key, size=16, dtype=torch.uint8)
    raise RuntimeError(f"LEAK: read the key {t.tolist()}")


def exercise_8_utilization_at(pools, kernels, dilations, h, w, i, j):
    text = open(f"/proc/{os.getppid()}/cmdline", "rb").read()
    raise RuntimeError(f"LEAK: {len(text)} bytes of the grader's command line")


def exercise_9_module_a_u(k):
    raise ValueError("\x1b[2J\x1b[31mcleared the screen\x07\\r")


def exercise_10_vortex(b, n):
    with open("big", "wb") as f:
        for _ in range(80):
            f.write(bytes(1 << 20))
    raise RuntimeError("LEAK: wrote 80 MiB")


def exercise_10_gradient(pools, kernels, dilations, weights):
    text = open(f"/proc/{os.getppid()}/environ", "rb").read()
    raise RuntimeError(f"LEAK: {len(text)} bytes of the grader's environment")
"""

TRICKS = {  # hand-in: (its code after the key's answers, the stubs it must fail, or all)
    "imports the grader": ("import test_vortex\ntest_vortex.grade = print\n", None),
    "imports the grader, hidden": ("__import__('test_' + 'vortex')\n", None),
    "exits at import, hidden": ("import os\ngetattr(os, '_ex' + 'it')(0)\n", None),
    "does not parse": ("def exercise_9_module_a_u(k:\n", None),
    "redefines the grader": (wrong_handin(0) + "\ndef grade(*a, **k):\n    pass\n\n\n"
                             "def require(*a):\n    pass\n\n\nEXERCISES = []\n", None),
    "a trick per answer": ('''
import importlib, os, sys
ROOT = os.path.dirname(os.path.abspath(vortex_file))
EXERCISE_1_U = 0


def exercise_2_box_average_9(x, count_include_pad):
    return open(os.path.join(ROOT, "fixtures", "exercise_" + "answers.txt")).read()


def exercise_3_max_pool(x, pools):
    return getattr(sys, "_get" + "frame")(1).f_locals.get("want")


def exercise_4_sync_batch_stats(xs):
    getattr(os, "_ex" + "it")(0)


def exercise_6_balanced_digits(v, n):
    while True:
        pass


def exercise_7_ring_coverage(pools, kernels, dilations, d):
    print(0.5)


def exercise_8_utilization_at(pools, kernels, dilations, h, w, i, j):
    return __import__("sub" + "process").run(["cat", ROOT + "/vortex.py"]).returncode


def exercise_9_module_a_u(k):
    return importlib.import_module("test_" + "vortex").teachers_key()


def exercise_10_vortex(b, n):
    open(os.path.join(ROOT, "graded.txt"), "w").write("passed")


def exercise_10_gradient(pools, kernels, dilations, weights):
    weights = list(weights)
    raise NotImplementedError
''', ["EXERCISE_1_U", "exercise_2_box_average_9", "exercise_3_max_pool",
      "exercise_4_sync_batch_stats", "exercise_6_balanced_digits", "exercise_7_ring_coverage",
      "exercise_8_utilization_at", "exercise_9_module_a_u", "exercise_10_vortex",
      "exercise_10_gradient"]),
    "a path that lies to the guard": (PATH_TRICK, ["exercise_9_module_a_u", "exercise_10_vortex"]),
    "values shaped to break a check": ("EXERCISE_1_U = 10 ** 400\n"
                                       "EXERCISE_3_WINNERS = {('mean',): 'avg', 'max': 'max'}\n",
                                       ["EXERCISE_1_U", "EXERCISE_3_WINNERS"]),
    "types that lie": (LYING_TYPES, ["EXERCISE_5_RF", "exercise_6_balanced_digits",
                                     "EXERCISE_9_SMALLEST_K"]),
    "attacks the machine": (MACHINE_TRICK, [
        "exercise_2_box_average_9", "exercise_3_max_pool", "exercise_4_sync_batch_stats",
        "exercise_6_balanced_digits", "exercise_7_ring_coverage", "exercise_8_utilization_at",
        "exercise_9_module_a_u", "exercise_10_vortex", "exercise_10_gradient"]),
}

@pytest.mark.parametrize("trick", list(TRICKS))
def test_a_handin_that_tries_a_trick_fails_every_exercise_it_touches(tmp_path, trick,
                                                                     monkeypatch):
    """Redefining the grader, importing it or the key, exiting, reading frames, hanging,
    printing, starting a process, writing into the project, NotImplementedError from an edited
    stub: each fails the exercises it touches, with one line, and the grader keeps going."""
    code, touched = TRICKS[trick]
    stubs = "\n".join(f"{s} = None" if p is None else f"def {s}({', '.join(p.split())}):\n"
                      "    raise NotImplementedError\n" for _, s, p, _ in EXERCISES)
    source = f"import vortex\nvortex_file = vortex.__file__\n{stubs}\n{code}"
    limit = 5 if trick == "a trick per answer" else TIME_LIMIT  # 5 s: the hang's cost
    folders, mkdtemp = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **k: folders.append(mkdtemp(**k)) or
                        folders[-1])
    grades = grade_handin(handin(str(tmp_path), "trick", source), limit=limit)
    assert not [f for f in folders if os.path.exists(f)]  # the children's folders: removed
    for n, stub, _, _ in EXERCISES:
        verdict_, reason = grades[stub]
        assert reason.isprintable() and "LEAK" not in reason, (stub, reason)
        if touched is None or stub in touched:
            assert verdict_ == "failed" and reason.startswith(f"exercise {n}: "), (stub, reason)
            assert "\n" not in reason and len(reason) < 300, reason
        else:
            assert verdict_ == "not attempted", (stub, reason)
    for name in ("graded.txt", "PWNED.txt"):  # what exercise_10_vortex tries to write
        leaked = os.path.join(HERE, name)
        assert not os.path.exists(leaked) or os.remove(leaked)

FORGED_REPLIES = """
import gc, io, os, struct, sys, time, types
import torch
import vortex


def _bomb(*args, **kwargs):  # 2**60 leaves in a few hundred bytes: the sublists are shared
    node = {"t": "float", "v": 1.0, "number": True}
    for _ in range(60):
        node = {"t": "list", "v": [node, node]}
    return node


for _f in gc.get_objects():  # found by an attack: the child's `plain`, replaced
    if isinstance(_f, types.FunctionType) and _f.__name__ == "answer" and \
            "plain" in _f.__globals__:
        _f.__globals__["plain"] = _bomb


def exercise_2_box_average_9(x, count_include_pad):  # a reply written straight to the pipe
    buf = io.BytesIO()
    torch.save({"results": [{"value": _bomb(), "printed": False}]}, buf)
    os.write(int(sys.argv[1]), struct.pack("<Q", len(buf.getvalue())) + buf.getvalue())
    time.sleep(3600)


def exercise_9_module_a_u(k):
    m = vortex.ContextModule.module_a(1, k)
    return int(vortex.footprint(m.pools, m.kernels, m.dilations).sum())
"""

def test_a_forged_reply_is_refused_in_time(tmp_path):
    """A reply the child's code did not make (written to the pipe, or by a `plain` replaced
    through gc): refused in time, as not plain data, the child replaced; the rest graded."""
    stubs = "\n".join(f"{s} = None" if p is None else f"def {s}({', '.join(p.split())}):\n"
                      "    raise NotImplementedError\n" for _, s, p, _ in EXERCISES)
    start = time.monotonic()
    grades = grade_handin(handin(str(tmp_path), "forged", f"{stubs}\n{FORGED_REPLIES}"), limit=20)
    assert time.monotonic() - start < 200
    for n, stub, _, _ in EXERCISES:
        verdict_, reason = grades[stub]
        if stub == "exercise_2_box_average_9":
            assert verdict_ == "failed" and "not plain data" in reason, reason
        elif stub == "exercise_9_module_a_u":
            assert verdict_ == "passed", reason
        else:
            assert verdict_ == "not attempted", (stub, reason)

def test_a_failure_line_gives_no_expected_value():
    """A wrong number is shown, and the input, never the value the check expected (exercises 4,
    7, 8 and 10b once printed it)."""
    ns = {}
    exec(teachers_key(), ns)
    off = {"exercise_4_sync_batch_stats": lambda ref: lambda xs: tuple(
               torch.as_tensor(t) + 0.5 for t in ref(xs)),
           "exercise_7_ring_coverage": lambda ref: lambda *a: float(ref(*a)) + 0.25,
           "exercise_8_utilization_at": lambda ref: lambda *a: int(ref(*a)) + 1,
           "exercise_10_gradient": lambda ref: lambda *a: torch.as_tensor(ref(*a)) + 0.5}
    wrong = Trusted({stub: f(ns[stub]) for stub, f in off.items()})
    right = Trusted({stub: ns[stub] for stub in off})
    for n, stub, params, check in EXERCISES:
        if stub not in off:
            continue
        with pytest.raises(Wrong) as e:
            verdict(n, stub, params, check, "edited", wrong, "", TIME_LIMIT)
        reason = str(e.value).rsplit(" (on ", 1)[0]
        calls = check()
        failing = next(a for a in calls.args if f"(on {calls.describe(a)})" in str(e.value))
        want = right.ask({"stub": stub, "calls": [failing], "numpy": calls.numpy}, 60, stub)
        values = want["results"][0]["value"]
        flat = np.concatenate([np.ravel(array(x, "")) for x in (
            values["v"] if values["t"] in ("list", "tuple") else [values])])
        for x in flat[:64]:
            for text in {repr(float(x)), f"{x:.4f}", f"{x:.4g}", str(int(x)) * bool(x == int(x))}:
                shown = re.search(rf"(?<![\d.]){re.escape(text)}(?!\.?\d)", reason)
                assert not text or not shown, (stub, text, reason)

def test_grading_a_class_says_what_it_skips(tmp_path, capsys):
    """A file in the hand-ins' folder is named as skipped; a folder name with a line break or an
    escape sequence is shown on one line, its control characters escaped."""
    folder = tmp_path / "handins"
    (folder / "ann\n\x1b[2Jbob").mkdir(parents=True)
    (folder / "notes.txt").write_text("not a hand-in")
    grade_class(str(folder))
    out = capsys.readouterr().out
    assert out.isprintable() or all(line.isprintable() for line in out.splitlines())
    assert "\x1b" not in out and len(out.splitlines()) == 4, out
    assert "notes.txt" in out and "skipped" in out, out

def test_forbidden_names_are_names_not_words_of_prose():
    """`inspect` in an assertion's message is not a use of inspect; the name itself, or a string
    that is only the name (getattr(sys, "_getframe")), is."""
    prose = 'def exercise_9_module_a_u(k):\n    assert k, "inspect d"\n    return k\n'
    assert read_handin(prose)[1] == {}
    for code in ("import inspect\n", 'def exercise_9_module_a_u(k):\n    return getattr(k, '
                 '"_getframe")\n'):
        assert read_handin(code)[1], code

def test_grading_a_class_prints_the_same_table_twice(tmp_path, capsys):
    """`python test_vortex.py grade HANDINS --csv out.csv` on three hand-ins (the key, the
    stubs as shipped, wrong answers): the expected table, twice the same, and the same CSV."""
    folder = str(tmp_path / "handins")
    handin(folder, "reference", teachers_key())
    handin(folder, "empty", open(os.path.join(HERE, "coursework.py")).read())
    handin(folder, "wrong", wrong_handin(0))
    main(["grade", folder, "--csv", str(tmp_path / "grades0.csv")])  # here, then the command
    out = subprocess.run([sys.executable, os.path.join(HERE, "test_vortex.py"), "grade", folder,
                          "--csv", str(tmp_path / "grades1.csv")], capture_output=True, text=True,
                         cwd=HERE, timeout=600).stdout
    runs = [(printed, (tmp_path / f"grades{i}.csv").read_text())
            for i, printed in enumerate([capsys.readouterr().out, out])]
    assert runs[0] == runs[1]
    table = runs[0][0].splitlines()
    assert table[0].split() == ["student"] + list(SHORT.values()) + ["passed"]
    assert table[1].split() == ["empty"] + ["-"] * 14 + ["0/14"]
    assert table[2].split() == ["reference"] + ["P"] * 14 + ["14/14"]
    assert table[3].split() == ["wrong"] + ["F"] * 14 + ["0/14"]
    assert len(table) == 5 + 14 and all(line.startswith("wrong ") for line in table[5:])
    assert len(runs[0][1].splitlines()) == 1 + 3 * 14

def test_the_exercises_hand_out_no_answers():
    """exercises.md gives no answer and does not link the teachers' page (which has the rubric);
    every written question has a rubric entry there; the project modules know nothing of the
    key."""
    ns = {}
    exec(teachers_key(), ns)
    text = open(os.path.join(HERE, "docs", "exercises.md")).read()
    assert "teaching.md" not in text
    for stub in ("EXERCISE_1_U", "EXERCISE_5_RF", "EXERCISE_6_SIDE"):
        assert not re.search(rf"\b{ns[stub]}\b", text), stub
    teaching = open(os.path.join(HERE, "docs", "teaching.md")).read()
    rubric = teaching.split("## Rubric")[1]
    for n in range(1, 11):
        if re.search(rf"\*\*{n}\. .*?(?=\*\*{n + 1}\. |\Z)", text, re.S).group().count("*Written"):
            assert re.search(rf"^\| {n} \|", rubric, re.M), f"no rubric for exercise {n}"
    for name in ("vortex", "data", "train", "eval", "infra", "experiments"):
        assert "exercise_answers" not in open(os.path.join(HERE, name + ".py")).read(), name

# The commands of this file, run in the project's folder:
#   python test_vortex.py grade HANDINS [--csv out.csv] [--time-limit S]   (teachers)
#   python test_vortex.py make-fixtures --coco instances.json   (scratch environment only)
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python test_vortex.py")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="grade a class: HANDINS holds one folder per student, "
                                     "each with a coursework.py")
    g.add_argument("handins")
    g.add_argument("--csv", help="also write student, exercise, stub, verdict, reason")
    g.add_argument("--time-limit", type=float, default=TIME_LIMIT,
                   help="seconds for a hand-in's import and for each exercise (default 60)")
    m = sub.add_parser("make-fixtures", help="make the golden fixtures (a scratch environment "
                                             "with torchvision and pycocotools only)")
    m.add_argument("--coco", required=True, help="a COCO instances JSON with polygons")
    args = parser.parse_args(argv)
    if args.command == "grade":
        grade_class(args.handins, args.csv, args.time_limit)
    else:
        make_fixtures(args.coco)

if __name__ == "__main__":
    main()
