"""Research and measurement beside the paper: what the four paper files do not need to run.

The paper's model, data, training and evaluation live in vortex.py, data.py, train.py and
eval.py; this script measures and pictures them. Imports point one way:
data <- vortex <- train, eval <- experiments.

  python experiments.py table                       # Table 1's modules: Eq. (1), parameters, time
  python experiments.py figure footprints --out F   # Fig. 3 drawn from the real modules
  python experiments.py figure synthetic --out F    # samples of the built-in synthetic data
  python experiments.py figure descriptors --out F  # samples of the 65x65 context experiment
  python experiments.py bench modules|training|inference|loader   # speed, as side-by-side ratios
  python experiments.py ablation --seeds 3 [train.py flags]       # Table 1 in miniature + ERF
  python experiments.py context --seeds 2   # Table 1's question at the paper's geometry
  python experiments.py erf CK [CK ...] --out F     # effective receptive fields of checkpoints

Nothing is overwritten without --force; an interrupted experiment continues where it stopped."""
import copy
import json
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import eval as evaluation
import infra
import train
import vortex
from eval import colorize, hstack, legend, predict
from infra import BadInput
from train import loss_fn, poly_lr, set_lr
from vortex import (TABLE1, DeepLabV3, box_averages, footprint, make_context,
                    measured_utilization, table1_module, utilization_ratio)


# =============================================================================================
# 1. TABLE 1'S MODULES IN NUMBERS (paper 3.2, Eq. 1) AND FIG. 3
# =============================================================================================

TABLE_ROWS = tuple(row for row in TABLE1 if TABLE1[row].miou) + ("none",)  # as printed


@torch.no_grad()
def print_table(size=65, channels=2048, reps=3):
    """Paper 3.2 / Table 1 in numbers: utilization ratios, parameters, forward time."""
    x = torch.randn(1, channels, size, size)
    modules = {row: table1_module(row, channels).eval() for row in TABLE_ROWS}
    times = best_times({row: (lambda m=m: m(x)) for row, m in modules.items()}, reps)
    print(f"Context modules on X = 1x{channels}x{size}x{size} (ResNet-101 at output stride 8, "
          f"513x513 input), CPU, {torch.get_num_threads()} threads, best of {reps}")
    print(f"{'module':8} {'pooling k':12} {'dilations':12} {'r paper':>11} {'r analytic':>10} "
          f"{'r measured':>10} {'params':>10} {'forward s':>9} {'x ASPP':>7}")
    for row, m in modules.items():
        with torch.enable_grad():
            measured = measured_utilization(table1_module(row, 8), size, size)
        print(f"{row:8} {','.join(map(str, m.pools)):12} {','.join(map(str, m.dilations)):12} "
              f"{TABLE1[row].ratio or '-':>11} {utilization_ratio(m, size, size):10.4f} "
              f"{measured:10.4f} {sum(p.numel() for p in m.parameters()):10,d} "
              f"{times[row]:9.3f} {times[row] / times['ASPP']:7.2f}")
    print("r analytic: Eq. 1, the footprint counted on an unbounded map; r measured: autograd on "
          "the real module (8 channels) at the centre pixel, taps off the map not counted.")


def ring_coverage(module, max_distance=40):
    """Fig. 3 as a curve: for d = 0..max_distance, the share of the 8d offsets at Chebyshev
    distance d (offset 0 for d = 0) that the module's footprint reads on an unbounded map."""
    grid = footprint(module.pools, module.kernels, module.dilations)
    r = grid.shape[0] // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    ring = np.maximum(abs(yy), abs(xx))
    return np.array([grid[ring == d].sum() / max(1, 8 * d) for d in range(max_distance + 1)])


def caption(width, *lines):
    """A white strip `width` px wide with a line of text per 14 px: every figure's titles."""
    strip = Image.new("RGB", (width, 14 * len(lines)), (255, 255, 255))
    for i, text in enumerate(lines):
        ImageDraw.Draw(strip).text((2, 1 + 14 * i), text, fill=(0, 0, 0))
    return np.asarray(strip)


BRANCH_COLOURS = ((200, 30, 30), (240, 150, 20), (40, 110, 200), (60, 160, 60))


def footprints_figure(path, size=65, cell=4):
    """The paper's Fig. 3 from the real modules: for ASPP, Module A(5) and Module B, the
    positions of a size x size map that feed the centre output (autograd), coloured by the
    branch that reads them (the finest on top), white where nothing reads, the output pixel
    black, framed by a black border; a title and a legend of the branches under each map."""
    panels = []
    for m in [table1_module(row, 8) for row in ("ASPP", "A(5)", "Vortex")]:
        ratio, used = measured_utilization(m, size, size, return_map=True)
        pic = np.full((size, size, 3), 255, np.uint8)
        for i in sorted(range(len(m.pools)), key=lambda i: -m.pools[i] - m.dilations[i]):
            fp = footprint(m.pools[i:i + 1], m.kernels[i:i + 1], m.dilations[i:i + 1])
            r, c = fp.shape[0] // 2, size // 2  # the footprint centred on the centre pixel
            a, b = max(0, c - r), min(size, c + r + 1)
            region = np.zeros((size, size), bool)
            region[a:b, a:b] = fp[a - (c - r):b - (c - r), a - (c - r):b - (c - r)]
            pic[region & used] = BRANCH_COLOURS[i]
        pic[size // 2, size // 2] = 0
        pic = np.pad(np.kron(pic, np.ones((cell, cell, 1), np.uint8)), ((1, 1), (1, 1), (0, 0)))
        names = [f"{k}x{k} pool, {n}x{n} conv" + (f", rate {d}" if n > 1 else "")
                 for k, n, d in zip(m.pools, m.kernels, m.dilations)]
        panels.append(np.concatenate([pic, caption(pic.shape[1], f"{m.name}: r = {ratio:.4f} "
                                                   f"of the {size}x{size} map"),
                                      legend(pic.shape[1], names, BRANCH_COLOURS,
                                             range(len(names)))], 0))
    return infra.save_picture(path, hstack(panels, 8))


# =============================================================================================
# 2. BENCHMARKS: speed as ratios measured side by side in one run (machines are noisy)
# =============================================================================================

def best_times(fns, reps, warmup=1):
    """Best wall time (s) of each of {name: fn}, run interleaved (a, b, a, b, ...) after
    `warmup` calls each, so that machine noise hits all; CUDA work is waited for."""
    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def separable_box_average(x, k, count_include_pad):
    """vortex.box_averages' alternative on a GPU: native pooling run separably, k x 1 then
    1 x k, each pass divided by its own count (their product is the 2-D count)."""
    r = k // 2
    rows = F.avg_pool2d(x, (k, 1), 1, (r, 0), count_include_pad=count_include_pad)
    return F.avg_pool2d(rows, (1, k), 1, (0, r), count_include_pad=count_include_pad)


def _poolings(x):
    """The three ways to pool X for Vortex (k = 3, 9, 27): {name: fn}."""
    return {"cascade": lambda: list(box_averages(x, (3, 9, 27)).values()),
            "separable": lambda: [separable_box_average(x, k, False) for k in (3, 9, 27)],
            "avg_pool2d": lambda: [F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
                                   for k in (3, 9, 27)]}


def torchvision_deeplab():
    """torchvision's deeplabv3_resnet101 (random weights, eval), or None saying why: it is never
    a dependency (where it imports, e.g. a scratch environment, we compare against it)."""
    try:
        from torchvision.models.segmentation import deeplabv3_resnet101
    except Exception as e:  # not installed, or its compiled ops do not fit this torch
        print(f"(no comparison with torchvision's DeepLabV3: {type(e).__name__}: "
              f"{(str(e).splitlines() or [''])[0]})")
        return None
    return deeplabv3_resnet101(weights=None, weights_backbone=None, aux_loss=False).eval()


@torch.no_grad()
def bench_modules(reps=5, model_reps=2):
    """CPU speed targets: the context module and the whole model, Vortex against ASPP (and
    torchvision's DeepLabV3 where it imports), and the pooling against a copy of X."""
    x = torch.randn(1, 2048, 65, 65)
    mods = {c: make_context(c, 2048).eval() for c in ("aspp", "vortex")}
    pools, theirs = _poolings(x), torchvision_deeplab()
    fns = {"aspp": lambda: mods["aspp"](x), "vortex": lambda: mods["vortex"](x),
           "pool": pools["cascade"], "copy": x.clone, "avg_pool2d": pools["avg_pool2d"]}
    if theirs is not None:
        fns["torchvision"] = lambda: theirs.classifier[0](x)
    t, gb = best_times(fns, reps), x.numel() * x.element_size() / 1e9
    print(f"context module, input 1x2048x65x65, best of {reps}, {torch.get_num_threads()} threads:")
    print(f"  ASPP {t['aspp']:.3f} s   Vortex {t['vortex']:.3f} s   "
          f"ratio Vortex/ASPP = {t['vortex'] / t['aspp']:.3f}   (target <= 1.05)")
    print(f"  pooling k=3,9,27: box_averages {t['pool'] * 1e3:.1f} ms = {4 * gb / t['pool']:.1f} "
          f"GB/s (reads X, writes 3 maps); a copy of X {t['copy'] * 1e3:.1f} ms = "
          f"{2 * gb / t['copy']:.1f} GB/s; pooling / copy time per byte "
          f"{(t['pool'] / 4) / (t['copy'] / 2):.1f}; avg_pool2d {t['avg_pool2d']:.3f} s "
          f"({t['avg_pool2d'] / t['pool']:.0f}x the cascade)")
    if theirs is not None:
        print(f"  ASPP / torchvision's ASPP (DeepLabV3 head) = {t['aspp'] / t['torchvision']:.3f}"
              f"   (target <= 1.02)")
    img = torch.randn(1, 3, 513, 513)
    fns = {c: (lambda m=DeepLabV3(21, 101, c).eval(): m(img)) for c in ("aspp", "vortex")}
    if theirs is not None:
        ours = DeepLabV3(21, 101, "aspp", multi_grid=None).eval()
        fns.update(ours=lambda: ours(img), torchvision=lambda: theirs(img))
    t = best_times(fns, model_reps)
    print(f"whole model, DeepLab v3 ResNet-101 OS 8, input 1x3x513x513, best of {model_reps}:")
    print(f"  ASPP {t['aspp']:.2f} s   Vortex {t['vortex']:.2f} s   "
          f"ratio Vortex/ASPP = {t['vortex'] / t['aspp']:.3f}   (target <= 1.03; "
          f"paper: 10.37 vs 10.13 FPS on a GPU = 1.024)")
    if theirs is not None:
        print(f"  ours (ASPP, no multi-grid) / torchvision deeplabv3_resnet101 = "
              f"{t['ours'] / t['torchvision']:.3f}   (target <= 1.02; theirs adds a 3x3 head conv)")


def bench_modules_cuda(batch=8, reps=20):
    """On a GPU, forward + backward for X = batch x 2048 x 65 x 65 in fp32 and bf16: Vortex's
    pooling three ways and the context modules, Vortex/ASPP."""
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, X = {batch}x2048x65x65, forward + backward, "
          f"best of {reps} after 3 warm-up, ms:")
    mods = {c: make_context(c, 2048).to(dev) for c in ("vortex", "aspp")}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(batch, 2048, 65, 65, device=dev, dtype=dtype, requires_grad=True)

        def module(m):
            def run():
                with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    m(x.detach().float()).float().sum().backward()
            return run
        fns = {name: (lambda fn=fn: sum(o.float().sum() for o in fn()).backward())
               for name, fn in _poolings(x).items()}
        fns.update({c: module(m) for c, m in mods.items()})
        t = {k: 1000 * v for k, v in best_times(fns, reps, warmup=3).items()}
        print(f"  {str(dtype).split('.')[1]:9} pooling: cascade {t['cascade']:.2f}, separable "
              f"{t['separable']:.2f}, avg_pool2d {t['avg_pool2d']:.2f};  context module: ASPP "
              f"{t['aspp']:.2f}, Vortex {t['vortex']:.2f} ({t['vortex'] / t['aspp']:.3f}x)")


def bench_inference(reps=2):
    """Seconds per 500x375 image, ResNet-101 OS 8 + Vortex (untrained: the cost does not depend
    on the weights), single scale vs the paper's 6 scales + flip, against the pixel-count ratio
    2 * sum(s^2) = 17.4 (the model's cost is nearly linear in pixels)."""
    torch.manual_seed(0)
    model, image = DeepLabV3(21, 101, "vortex").eval(), torch.randn(3, 375, 500)
    t = best_times({"single": lambda: predict(model, image),
                    "multi": lambda: predict(model, image, evaluation.PAPER_SCALES, True)},
                   reps, 0)
    theory = 2 * sum(s * s for s in evaluation.PAPER_SCALES)
    print(f"ResNet-101 OS 8 + Vortex, 500x375 image, CPU {torch.get_num_threads()} threads, "
          f"best of {reps}:\n  single scale {t['single']:.2f} s/image; 6 scales + flip "
          f"{t['multi']:.2f} s/image; ratio {t['multi'] / t['single']:.1f} (theory {theory:.1f})")


def bench_loader(voc=None, n=300, crop=513):
    """Samples per second of one process making augmented crop x crop training samples, from a
    VOC folder or from 12 VOC-sized (500x375) synthetic JPEGs in VOC's layout."""
    with tempfile.TemporaryDirectory() as tmp:
        root = voc or tmp
        if voc is None:
            for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
                os.makedirs(os.path.join(tmp, sub))
            for i in range(12):
                img, lab = data.render_synthetic(0, i, 500)
                Image.fromarray(img[:375]).save(os.path.join(tmp, "JPEGImages", f"s{i}.jpg"),
                                                quality=90)
                data.save_mask(os.path.join(tmp, "SegmentationClass", f"s{i}.png"), lab[:375])
            with open(os.path.join(tmp, "ImageSets/Segmentation/train.txt"), "w") as f:
                f.write("\n".join(f"s{i}" for i in range(12)))
        split = "trainval" if os.path.isfile(
            os.path.join(root, "ImageSets/Segmentation/trainval.txt")) else "train"
        ds = data.VOCSegmentation(root, split, data.TrainTransform(crop), num_classes=21)
        torch.set_num_threads(1)  # one loader worker = one core
        ds[0]
        t0 = time.perf_counter()
        for i in range(n):
            ds.set_epoch(i // len(ds))
            img, lab = ds[i % len(ds)]
            assert img.shape == (3, crop, crop) and lab.shape == (crop, crop)
        dt = time.perf_counter() - t0
    print(f"{n} augmented {crop}x{crop} samples from {len(ds)} JPEGs in {root} ({split}): "
          f"{n / dt:.0f} samples/s in one process (target >= 100)")
    return n / dt


def training_step(model, opt, x, t, dtype=None):
    """One SGD step on (x, t), under autocast when `dtype` is bf16/fp16."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype not in (None, torch.float32)):
        loss = loss_fn(model(x), t) / t.numel()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_training(device_arg=None):
    """Training steps of ResNet-101 OS 8, SGD, Vortex against ASPP one after the other at each
    configuration: on the CPU crop 321, batch 2, fp32; on a GPU crop 513, batch 2/4/8 x fp32 /
    bf16, with the peak memory after the warm-up (cuDNN's autotuning tries workspaces as large
    as the free memory once); each in NCHW and channels-last. Out of memory is a cell."""
    device = infra.pick_device(device_arg)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    models = {c: DeepLabV3(21, 101, c).to(device) for c in ("vortex", "aspp")}
    opts = {c: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for c, m in models.items()}
    crop, warmup, steps = (513, 3, 10) if cuda else (321, 1, 3)
    print(f"training steps, DeepLab v3 ResNet-101 OS 8, crop {crop}, " + (
        f"one {torch.cuda.get_device_name(device)}" if cuda else
        f"CPU {torch.get_num_threads()} threads") + f", SGD, best of {steps} steps after "
        f"{warmup} warm-up, torch {torch.__version__}")
    print(f"{'batch':>5} {'precision':9} {'layout':13} {'Vortex img/s':>12} {'peak GiB':>8} "
          f"{'ASPP img/s':>10} {'peak GiB':>8} {'Vortex/ASPP time':>16}")
    rows = []
    for batch in (2, 4, 8) if cuda else (2,):
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))[:1 + cuda]:
            for layout in ("NCHW", "channels-last"):
                r = {c: _steps(models[c], opts[c], batch, crop, dtype, layout, warmup, steps)
                     for c in models}
                cells = [f"{r[c][0]:12.2f} {r[c][1]:8.1f}" if r[c] else f"{'out of memory':>21}"
                         for c in models]
                ratio = f"{r['aspp'][0] / r['vortex'][0]:16.3f}" if all(r.values()) else "-"
                print(f"{batch:5d} {name:9} {layout:13} {cells[0]} {cells[1]:>19} {ratio:>16}",
                      flush=True)
                rows.append((batch, name, layout, r))
    return rows


def _steps(model, opt, batch, crop, dtype, layout, warmup, steps):
    """(images/s, peak GiB on a GPU, NaN on the CPU) of SGD steps at one configuration, or None
    if out of memory."""
    device = next(model.parameters()).device
    cuda, fmt = device.type == "cuda", (torch.channels_last if layout == "channels-last" else
                                        torch.contiguous_format)
    model.to(memory_format=fmt)
    x = t = None
    try:
        x = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=fmt)
        t = torch.randint(0, 21, (batch, crop, crop), device=device)
        for _ in range(warmup):
            training_step(model, opt, x, t, dtype)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        best = best_times({"step": lambda: training_step(model, opt, x, t, dtype)}, steps, 0)
        return batch / best["step"], (torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda
                                      else math.nan)
    except torch.OutOfMemoryError:
        return None
    finally:
        opt.zero_grad(set_to_none=True)
        x = t = None
        if cuda:
            torch.cuda.empty_cache()


# =============================================================================================
# 3. TABLE 1 IN MINIATURE AND THE EFFECTIVE RECEPTIVE FIELD
# =============================================================================================

ABLATION_ROWS = tuple(TABLE1)  # with the image-level control: what the others add to it
ABLATION_KEYS = ("dataset", "depth", "base_channels", "context_channels", "output_stride",
                 "multi_grid", "crop", "scale", "batch_size", "iters", "lr", "num_images",
                 "val_images", "image_size", "context", "pool_k", "seed", "count_include_pad",
                 "warmup")


def read_back(path, key, fields):
    """A finished part's record (infra.read_record) if `path` holds one made with settings
    `key`, else None; one made with other settings is refused, naming the differences."""
    if not os.path.exists(path):
        return None
    rec = infra.read_record(path, dict(fields, config=dict), "delete it to run that part again")
    if rec.get("config") != key:
        old = rec.get("config") or {}
        diff = [f"{k} {old.get(k)} -> {key[k]}" for k in key if old.get(k) != key[k]]
        raise BadInput(f"{path} holds a run made with other settings ({'; '.join(diff)}); "
                       f"use the same flags, or another --out-dir")
    return rec


def ablation_run(run):
    """One cell of the table: (mIoU, context-class mIoU, seconds). A finished run is read back
    from its ablation.json, an interrupted one resumed: the same command again continues."""
    done = os.path.join(run["out_dir"], "ablation.json")
    key = json.loads(json.dumps({k: run[k] for k in ABLATION_KEYS}))
    rec = read_back(done, key, dict.fromkeys(("miou", "context_miou", "seconds"),
                                             (int, float, type(None))))
    if rec is not None:
        print(f"{run['out_dir']}: finished earlier, read back")
    else:
        resume, t = os.path.exists(os.path.join(run["out_dir"], "checkpoint.pt")), time.time()
        res = train.train(dict(run, resume="auto", no_eval=False))
        rec = dict(config=key, miou=res["miou"], seconds=time.time() - t, resumed=resume,
                   context_miou=res.get("context_miou", math.nan))
        if not dist.is_initialized() or dist.get_rank() == 0:
            infra.write_json(done, rec)
    return rec["miou"], rec["context_miou"], rec["seconds"]


def ablation(cfg, seeds):
    """Paper Table 1 in miniature: every context module, the same budget and seeds; then the
    effective receptive fields of the trained none / ASPP / Vortex models."""
    root = cfg["out_dir"]
    rows = {name: np.array([ablation_run(dict(
        cfg, context=TABLE1[name].context, pool_k=TABLE1[name].k, seed=seed,
        out_dir=os.path.join(root, f"{name}-seed{seed}"))) for seed in range(seeds)])
        for name in ABLATION_ROWS}
    lines = [f"Table 1 in miniature: {cfg['dataset']}, ResNet-{cfg['depth']}, {cfg['iters']} "
             f"iterations, seeds 0..{seeds - 1}, single-scale evaluation",
             f"{'module':11} {'mIoU':>14} {'context classes':>16} {'s/run':>7} {'paper (VOC)':>12}"]
    for name, r in rows.items():
        lines.append(f"{name:11} {100 * r[:, 0].mean():7.2f} ± {100 * r[:, 0].std():4.2f} "
                     f"{100 * np.nanmean(r[:, 1]):9.2f} ± {100 * np.nanstd(r[:, 1]):4.2f} "
                     f"{r[:, 2].mean():7.0f} {TABLE1[name].miou or '-':>12}")
    rank, _, device = infra.setup_distributed(cfg["device"])
    if rank == 0:
        lines += ["", "Effective receptive field (gradient of the centre pixel's logit, mean over "
                      f"{cfg['erf_images']} validation images and {seeds} seed(s)):"]
        erf_figure([os.path.join(root, f"{name}-seed{seed}", "checkpoint.pt") for name in
                    ("none", "ASPP", "Vortex") for seed in range(seeds)],
                   os.path.join(root, "erf.png"), cfg["erf_images"], device, log=lines.append)
        print("\n".join(lines))
        infra.atomic_save(os.path.join(root, "table1.txt"),
                          lambda f: f.write("\n".join(lines).encode() + b"\n"))
    return rows


# ---------------------------------------------------------------------------------------------
# Effective receptive field (paper section 1, after Zhou et al. 2014: it is much smaller than
# the theoretical one; measured as in Luo et al. 2016). Per image, g = |d logit_c(centre) /
# d image| summed over RGB, c the class predicted at the centre, normalised to sum 1: where the
# decision at the centre comes from. Maps of any size are averaged with their centres aligned.
# ---------------------------------------------------------------------------------------------

def centred_mean(maps):
    """Mean of 2-D maps, each placed so that its centre (h // 2, w // 2) lands on the centre of
    a canvas as large as the largest."""
    h, w = max(m.shape[0] for m in maps), max(m.shape[1] for m in maps)
    canvas = torch.zeros(h, w, dtype=torch.float64)
    for m in maps:
        top, left = h // 2 - m.shape[0] // 2, w // 2 - m.shape[1] // 2
        canvas[top:top + m.shape[0], left:left + m.shape[1]] += m
    return canvas / len(maps)


def effective_receptive_field(model, dataset, num_images=32, device=None, log=None):
    """The mean normalised input-gradient map (H, W) of the centre pixel's predicted-class
    logit over the first `num_images` images (eval mode: images are independent); progress to
    `log` (None: nowhere)."""
    device = device or next(model.parameters()).device
    model.eval()
    maps, n, t0 = [], min(num_images, len(dataset)), time.time()
    for i in range(n):
        x = dataset[i][0].unsqueeze(0).to(device).requires_grad_(True)
        out = model(x)
        centre = out[0, :, out.shape[-2] // 2, out.shape[-1] // 2]
        centre[centre.argmax()].backward()
        g = x.grad[0].abs().sum(0).double().cpu()
        maps.append(g / g.sum().clamp_min(1e-300))
        if log:
            infra.progress("erf", i + 1, n, t0, log)
    return centred_mean(maps)


def _distances(h, w):
    """The distance of every pixel of an h x w map to its centre (h // 2, w // 2), flattened."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.hypot((yy - h // 2).double(), (xx - w // 2).double()).flatten()


def mass_within(erf, radii):
    """The share of the map's mass within distance r of the centre, for each r in `radii`."""
    d, m = _distances(*erf.shape), erf.flatten().double()
    return [(m[d <= r].sum() / m.sum()).item() for r in radii]


def mass_radius(erf, fraction=0.9):
    """The smallest r such that the pixels within r of the centre hold `fraction` of the mass."""
    d = _distances(*erf.shape)
    order = d.argsort(stable=True)
    cum = erf.flatten()[order].double().cumsum(0)
    # against cum[-1], not erf.sum(): fraction 1 then finds the last pixel with any mass exactly
    k = int(torch.searchsorted(cum, (fraction * cum[-1]).reshape(1)).clamp(max=len(d) - 1))
    return d[order][k].item()


ERF_CIRCLES = ((0.5, (255, 255, 255)), (0.9, (0, 230, 255)))  # mass, colour


def erf_figure(checkpoints, out, num_images=32, device="cpu", data_root=None, cell=2,
               log=print, progress=print):
    """Effective receptive fields side by side in picture `out`, checkpoints of one module (e.g.
    seeds) averaged into one panel: colours on a square-root scale (so that the tails show),
    circles holding 50% and 90% of the mass, a colour bar, and a plot of the mass within r for
    every module and a flat map. Results to `log`. Returns {module: (r50, r90)} in pixels."""
    groups = {}
    for path in checkpoints:
        ck = infra.read_checkpoint(path)
        model = infra.model_from_checkpoint(ck, path).to(device)
        ta = ck.get("train_args", {})  # the checkpoint's own validation images
        ds = data.get_dataset(ck.get("dataset", "synthetic"), ta.get("val_split", "val"),
                              data_root or ta.get("data_root"), train=False,
                              seed=ta.get("seed", 0), **ck.get("data_args", {}))
        groups.setdefault(model.context.name, []).append(
            effective_receptive_field(model, ds, num_images, device, progress))
    erfs = {name: centred_mean(maps) for name, maps in groups.items()}
    h, w = next(iter(erfs.values())).shape
    panels, radii, curves = [], {}, []
    for name, erf in dict(flat=torch.ones(h, w), **erfs).items():  # flat: the mass spread evenly
        h, w = erf.shape
        steps = np.linspace(0, math.hypot(h // 2, w // 2), 64)
        curves.append((name, mass_within(erf, steps), steps[-1]))
        r50, r90 = radii[name] = tuple(mass_radius(erf, mass) for mass, _ in ERF_CIRCLES)
        if name == "flat":
            log(f"{'flat':8} (the same mass spread evenly over a {h}x{w} image): 50% within "
                f"{r50:5.1f} px, 90% within {r90:5.1f} px")
            continue
        log(f"{name:8} ({len(groups[name])} model(s)): 50% of the gradient within {r50:5.1f} px, "
            f"90% within {r90:5.1f} px of the centre")
        pic = Image.fromarray(heat((erf / erf.max()).sqrt().numpy())).resize(
            (w * cell, h * cell), Image.NEAREST)
        c = ((w // 2 + 0.5) * cell, (h // 2 + 0.5) * cell)
        for radius, (_, colour) in zip((r50, r90), ERF_CIRCLES):
            r = radius * cell
            ImageDraw.Draw(pic).ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline=colour,
                                        width=2)
        panels.append(np.concatenate([caption(pic.width, f"{name}: 50% / 90% within "
                                                         f"{r50:.0f} / {r90:.0f} px"),
                                      np.asarray(pic)], 0))
    height, width = panels[-1].shape[:2]
    infra.save_picture(out, hstack(panels + [_colour_bar(height), _curves_panel(
        curves, width, height)], 8))
    log(f"wrote {out}")
    return {name: r for name, r in radii.items() if name in groups}


def heat(v):
    """Values in [0, 1] -> uint8 RGB, black-red-yellow-white."""
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)


def _colour_bar(height, width=96):
    """The ERF panels' colour scale (square root: 0.25 of the peak sits half way up) and what
    the two circles mean."""
    pic = Image.new("RGB", (width, height), (255, 255, 255))
    top, bottom = 18, height - 50
    pic.paste(Image.fromarray(heat(np.linspace(1, 0, bottom - top)[:, None].repeat(14, 1))),
              (4, top))
    draw = ImageDraw.Draw(pic)
    draw.rectangle([4, top, 18, bottom - 1], outline=(0, 0, 0))
    for p in (1, 0.5, 0):  # bar position p shows the value p^2 of the peak
        draw.text((22, top + (1 - p) * (bottom - top - 1) - 6), f"{p * p:g}", fill=(0, 0, 0))
    draw.text((2, 2), "of the peak", fill=(0, 0, 0))
    for i, (mass, colour) in enumerate(ERF_CIRCLES):
        y = bottom + 6 + 20 * i
        draw.ellipse([4, y, 16, y + 12], outline=colour if i else (0, 0, 0), width=2)
        draw.text((20, y), f"{mass:.0%} mass", fill=(0, 0, 0))
    return np.asarray(pic)


def _curves_panel(curves, width, height, margin=26):
    """The mass within r against r [(name, shares at evenly spaced radii, largest radius)]: a
    model whose curve rises early looks near; the flat map's curve is the reference."""
    pic = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(pic)
    x0, y0, x1, y1 = margin, 18, width - 8, height - margin
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    colours = [(110, 110, 110), (40, 40, 40), (31, 119, 180), (214, 39, 40), (44, 160, 44),
               (148, 103, 189)]
    for i, (name, ys, _) in enumerate(curves):
        pts = [(x0 + (x1 - x0) * j / (len(ys) - 1), y1 - (y1 - y0) * y) for j, y in enumerate(ys)]
        draw.line(pts, fill=colours[i % len(colours)], width=2)
        draw.text((x0 + 6, y0 + 4 + 12 * i), name, fill=colours[i % len(colours)])
    for xy, text in (((2, 1), "fraction of the mass within r"), ((x0 - 8, y1 + 4), "r = 0"),
                     ((x1 - 40, y1 + 4), f"{curves[0][2]:.0f} px"), ((4, y0), "1"),
                     ((4, y1 - 10), "0")):
        draw.text(xy, text, fill=(0, 0, 0))
    return np.asarray(pic)


# =============================================================================================
# 4. TABLE 1'S QUESTION AT THE PAPER'S GEOMETRY: THE 65x65 CONTEXT EXPERIMENT
# =============================================================================================
# What can each context module read at each distance (paper 3.2-3.4, Fig. 3)? Paper 3.1 splits
# segmentation into descriptor extraction and feature aggregation; this is the second alone, at
# the paper's size, X generated by the rule docs/experiments.md states. A module's output at
# the query depends only on what its branches read there, its "taps" (k x k averages of X at
# its convolutions' offsets, zero off the map, and the image-level mean). X is linear in its
# parts (background, cue, distractor, unit noise), so the taps are gathered once per part and
# assembled for any class and sigma, and the project's own module runs at the query alone.

CONTEXT_SIZE = 65  # h = w of X for a 513 x 513 image at output stride 8 (paper 3.2)
CONTEXT_DISTANCES = 40  # d = 1..40: as far as Vortex Pooling's 81 x 81 footprint reaches
CUE = 3  # the cue's side
REACH = 40  # the largest footprint's reach (Vortex: rate 27 + 27 // 2), Chebyshev
DISTRACTOR_RATIO = 1.5  # the distractor's nearest descriptor is at >= 1.5 d
# scored where a distractor at >= 1.5 d still lies within REACH: d = 1..26 (beyond, no module
# could see which cue is nearer)
DISTRACTOR_DISTANCES = int(REACH // DISTRACTOR_RATIO)


def context_codes(c1, background=1.0):
    """(3, c1) float32 codes of background, cue P and cue Q: rows 1..3 of the c1 x c1 Sylvester
    Hadamard matrix (orthogonal, +-1, zero mean; c1 a power of two >= 4), the background's
    scaled by `background` (0: the border control, see SETTINGS)."""
    if c1 < 4 or c1 & (c1 - 1):
        raise BadInput(f"descriptor channels must be a power of two >= 4, got {c1}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < c1:
        h = np.block([[h, h], [h, -h]])
    codes = h[1:4].copy()
    codes[0] *= background
    return codes


def ring(r):
    """The 8r offsets (dy, dx) at Chebyshev distance r, in a fixed order (top, right, bottom,
    left)."""
    side = np.arange(-r, r)
    return np.concatenate([np.stack([np.full(2 * r, -r), side], 1),
                           np.stack([side, np.full(2 * r, r)], 1),
                           np.stack([np.full(2 * r, r), -side], 1),
                           np.stack([-side, np.full(2 * r, -r)], 1)])


def context_distances(distractor):
    """The distances a condition is drawn and scored at: 1..40, with a distractor 1..26."""
    return DISTRACTOR_DISTANCES if distractor else CONTEXT_DISTANCES


def context_layouts(seed, per_distance, distractor=False, size=CONTEXT_SIZE):
    """`per_distance` layouts for each d = 1..context_distances(distractor), a pure function of
    the arguments: int arrays d (N,), query, cue and distractor (N, 2) (cue centres; -1000 where
    there is none) and other (N,), the distractor's class (0: P, 1: Q; -1: none)."""
    rng = np.random.default_rng([seed, 21])
    n = per_distance * context_distances(distractor)
    out = {"d": np.repeat(np.arange(1, context_distances(distractor) + 1), per_distance),
           "query": np.zeros((n, 2), np.int64), "cue": np.zeros((n, 2), np.int64),
           "distractor": np.full((n, 2), -1000, np.int64), "other": np.full(n, -1, np.int64)}
    lo, hi = CUE // 2, size - 1 - CUE // 2  # where a cue's centre fits on the map
    for i, d in enumerate(out["d"]):
        while True:
            off = ring(d + CUE // 2)[rng.integers(8 * (d + CUE // 2))]  # nearest cue pixel at d
            q = np.array([rng.integers(max(0, lo - o), min(size - 1, hi - o) + 1) for o in off])
            if not distractor:
                break
            # the distractor's nearest pixel: >= 1.5 d and within the largest footprint
            far = rng.integers(int(np.ceil(DISTRACTOR_RATIO * d)), REACH + 1)
            c2 = q + ring(far + CUE // 2)[rng.integers(8 * (far + CUE // 2))]
            if ((c2 >= lo) & (c2 <= hi)).all() and np.abs(c2 - (q + off)).max() >= CUE:
                out["distractor"][i] = c2
                break
        out["query"][i], out["cue"][i] = q, q + off
    if distractor:  # its class alone says nothing: each layout's twins share it (see twins)
        out["other"] = rng.integers(0, 2, n)
    return out


def tap_offsets(module):
    """Per branch of a ContextModule: its pooling k and the (dy, dx) offsets its convolution
    reads, in the order of the weight's kernel positions (row by row)."""
    return [(k, [(d * a, d * b) for a in range(-(n // 2), n // 2 + 1)
                 for b in range(-(n // 2), n // 2 + 1)])
            for k, n, d in zip(module.pools, module.kernels, module.dilations)]


def _windows(centres, k, size):
    """Clipped k x k windows around `centres` (N, 2): (y0, y1, x0, x1, in-map), inclusive."""
    y, x = centres[:, 0], centres[:, 1]
    inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
    return tuple(np.clip(v, 0, size - 1) for v in (y - k // 2, y + k // 2, x - k // 2,
                                                   x + k // 2)) + (inside,)


def _square_share(win, centres, half):
    """Each window's share of pixels in the square of half-side `half` around `centres` (0
    where there is none: centres at -1000)."""
    y0, y1, x0, x1, _ = win
    oy = np.clip(np.minimum(y1, centres[:, 0] + half) - np.maximum(y0, centres[:, 0] - half) + 1,
                 0, None)
    ox = np.clip(np.minimum(x1, centres[:, 1] + half) - np.maximum(x0, centres[:, 1] - half) + 1,
                 0, None)
    return oy * ox / ((y1 - y0 + 1) * (x1 - x0 + 1))


def gather_taps(modules, layouts, c1, seed, batch=1000, size=CONTEXT_SIZE):
    """The parts of every module's taps at every layout's query, {module name: arrays}: inmap
    (N, T) 1 where the tap is on the map; cue and distractor (N, T) the share of the tap's
    window that cue covers; noise (N, T, c1) the tap in unit noise; noise_mean (N, c1). T: the
    module's taps, branch after branch. Layout i's noise is drawn from (seed, i // batch) and
    averaged over windows through an integral image."""
    n = len(layouts["d"])
    specs = {m.name: [(k, off) for k, offs in tap_offsets(m) for off in offs] for m in modules}
    out = {name: dict(inmap=np.zeros((n, len(t)), np.float32),
                      cue=np.zeros((n, len(t)), np.float32),
                      distractor=np.zeros((n, len(t)), np.float32),
                      noise=np.zeros((n, len(t), c1), np.float32),
                      noise_mean=np.zeros((n, c1), np.float32)) for name, t in specs.items()}
    for b0 in range(0, n, batch):
        sl = slice(b0, min(n, b0 + batch))
        g = torch.Generator().manual_seed(seed * 100003 + b0 // batch)
        noise = torch.randn(sl.stop - sl.start, c1, size, size, generator=g, dtype=torch.float64)
        integral = F.pad(noise.cumsum(2).cumsum(3), (1, 0, 1, 0))
        rows, mean = torch.arange(sl.stop - sl.start), noise.mean((2, 3)).float().numpy()
        for name, taps in specs.items():
            out[name]["noise_mean"][sl] = mean
            for t, (k, (dy, dx)) in enumerate(taps):
                win = _windows(layouts["query"][sl] + np.array([dy, dx]), k, size)
                y0, y1, x0, x1, inside = (torch.from_numpy(v) for v in win)
                s = (integral[rows, :, y1 + 1, x1 + 1] - integral[rows, :, y0, x1 + 1]
                     - integral[rows, :, y1 + 1, x0] + integral[rows, :, y0, x0])
                count = ((y1 - y0 + 1) * (x1 - x0 + 1)).double()[:, None]
                out[name]["noise"][sl, t] = (s / count * inside[:, None]).float().numpy()
                out[name]["inmap"][sl, t] = win[4]
                for part in ("cue", "distractor"):
                    out[name][part][sl, t] = _square_share(win, layouts[part][sl],
                                                           CUE // 2) * win[4]
    return out


def twins(parts, layouts, sigma, codes):
    """Every layout twice, cue P then cue Q, a distractor keeping its class: tensors taps
    (N, T, c1), image-level mean (N, c1), label, distance and conflict (the distractor has the
    other class: only "the nearer cue decides" gets the twin right)."""
    n = len(layouts["d"])
    cls, other = np.repeat([0, 1], n), np.concatenate([layouts["other"]] * 2)
    parts = {k: np.concatenate([v, v]) for k, v in parts.items()}
    bg, cue = codes[0], codes[1 + cls][:, None, :]
    oth = codes[1 + np.maximum(other, 0)][:, None, :]
    taps = (parts["inmap"][..., None] * bg + parts["cue"][..., None] * (cue - bg)
            + parts["distractor"][..., None] * (oth - bg) + sigma * parts["noise"])
    area = CUE * CUE / CONTEXT_SIZE ** 2
    mean = (bg + area * (cue[:, 0] - bg) + area * (other >= 0).astype(np.float32)[:, None]
            * (oth[:, 0] - bg) + sigma * parts["noise_mean"])
    return (torch.from_numpy(taps), torch.from_numpy(mean), torch.from_numpy(cls),
            torch.from_numpy(np.concatenate([layouts["d"]] * 2)),
            torch.from_numpy((other >= 0) & (other != cls)))


CONTEXT_CHANNELS = 8  # c1 (paper: 2048); three orthogonal codes need few channels
PER_DISTANCE = {"train": 500, "test": 250}  # layouts per distance, each with its twin
# (name, sigma, distractor, background code scale): sigma 1 and 0.5 (which limits are geometry,
# which signal-to-noise), a distractor (3.4: the nearer cue decides) and the border control
# (background code zero: a tap off the map reads what a tap on the background reads)
SETTINGS = (("sigma 1, distractor", 1.0, True, 1.0),
            ("sigma 1, distractor, background 0", 1.0, True, 0.0),
            ("sigma 1", 1.0, False, 1.0), ("sigma 0.5", 0.5, False, 1.0))
BANDS = ((1, 10), (11, 20), (21, 30), (31, 40))
PROBES = {"distance": "probe per distance (told d)", "band": "probe per band (told the band)",
          "pooled": "pooled probe (one readout for all d)"}
CURVE = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)  # the learning curve's points, fractions of a run
NO_IMAGE = " w/o img"  # a module of Table 1 without its image-level branch (issue 36)
WITH_BRANCH = tuple(row for row in TABLE1 if TABLE1[row].miou)  # ASPP ... Vortex
CONTEXT_ROWS = ("none", "image-level") + tuple(r + s for r in WITH_BRANCH for s in ("", NO_IMAGE))
BAND_TRAINED = ("Vortex", "Vortex" + NO_IMAGE)  # also trained once per band, on its samples
PAIRS = (("Vortex", "ASPP"), ("Vortex", "A(5)"), ("Vortex", "A(13)"), ("A(5)", "ASPP"),
         ("Vortex w/o img", "ASPP w/o img"), ("Vortex w/o img", "A(13) w/o img"),
         ("Vortex w/o img", "image-level")) + tuple((r, r + NO_IMAGE) for r in WITH_BRANCH)
PRECISE_BN = 8192  # training samples whose statistics batch norm takes before an evaluation
RECORD = {"probe": dict, "probe_conflict": dict, "trained": list, "trained_conflict": list,
          "trained_fit": list, "trained_band": list, "trained_band_fit": list, "curve": dict}


def bands(top):
    """BANDS clipped to the distances 1..top that a condition scores."""
    return tuple((lo, min(hi, top)) for lo, hi in BANDS if lo <= top)


class QueryHead(nn.Module):
    """A row of CONTEXT_ROWS as the project's own ContextModule (vortex.table1_module on
    CONTEXT_CHANNELS; NO_IMAGE: image_pool=False) and a 1x1 classifier, run at the query pixel
    of N maps from its taps (N, T, c1) and image means (N, c1). The N query pixels lie side by
    side as one N x 1 map, so every layer is the module's own: a branch's convolution at a pixel
    is its weight dotted with the taps it reads, then its BatchNorm2d (over the N pixels, as
    over a map's) and ReLU, the image-level branch, the projection and dropout (paper 3.1)."""

    def __init__(self, row, seed=0, width=16):
        super().__init__()
        torch.manual_seed(seed)  # the same initial weights whatever else is trained beside
        base = row.removesuffix(NO_IMAGE)
        self.row, self.module = row, table1_module(base, CONTEXT_CHANNELS, out_channels=width,
                                                   **({} if base == row else {"image_pool": False}))
        self.classifier = nn.Conv2d(width, 2, 1)

    def forward(self, taps, mean):
        m, feats, t0 = self.module, [], 0
        for (_, offsets), branch in zip(tap_offsets(m), m.branches):
            x, t0 = taps[:, t0:t0 + len(offsets)], t0 + len(offsets)
            w = branch[0].weight.flatten(2).permute(2, 1, 0).flatten(0, 1)  # (T * c1, out)
            feats.append(branch[2](branch[1]((x.flatten(1) @ w).T[None, :, :, None])))
        if m.image_pool is not None:
            feats.append(m.image_pool(mean.T[None, :, :, None]))
        return self.classifier(m.project(torch.cat(feats, 1)))[0, :, :, 0].T


def head_shape(head):
    """What decides whether heads can share a stack: taps per branch, image-level branch."""
    m = head.module
    return tuple(len(offs) for _, offs in tap_offsets(m)), m.image_pool is not None


def per_distance(correct, d):
    """Accuracy (%) at each distance 0..40 of boolean `correct` (N,); NaN where none is."""
    total = np.bincount(d, minlength=CONTEXT_DISTANCES + 1)
    hits = np.bincount(d[correct], minlength=CONTEXT_DISTANCES + 1)
    return np.where(total > 0, 100 * hits / np.maximum(1, total), np.nan)


def scores(correct, s):
    """(accuracy by distance, the same on the conflict twins only) of samples s."""
    d, conflict = s[3].numpy(), s[4].numpy()
    return per_distance(correct, d), per_distance(correct[conflict], d[conflict])


def probe_groups(by):
    """The group each distance 0..40 is fitted in: its own, its band's, or one for all."""
    if by == "distance":
        return np.arange(CONTEXT_DISTANCES + 1)
    group = np.ones(CONTEXT_DISTANCES + 1, np.int64)
    if by == "band":
        group[0] = 0
        for i, (lo, hi) in enumerate(BANDS):
            group[lo:hi + 1] = i + 1
    return group


def probe(fit, test, by="distance", image_level=True):
    """What a footprint holds (Fig. 3 measured): a linear readout of the cue's class from the
    taps (and the image-level mean where the module has that branch), a Fisher discriminant
    with a small ridge in closed form, fitted on `fit` per group of distances (probe_groups):
    its scores on `test`."""
    def flat(s):
        return (torch.cat([s[0].flatten(1), s[1]], 1) if image_level else s[0].flatten(1)).double()
    xs, xt, ys, yt = flat(fit), flat(test), fit[2], test[2]
    group = torch.from_numpy(probe_groups(by))
    gs, gt = group[fit[3]], group[test[3]]
    correct = torch.zeros(len(yt), dtype=torch.bool)
    for g in gs.unique():  # torch, not numpy: its BLAS threads would fight torch's
        x, y, sel = xs[gs == g], ys[gs == g], gt == g
        mu = torch.stack([x[y == c].mean(0) for c in (0, 1)])
        centred = x - mu[y]
        cov = centred.T @ centred / max(1, len(x) - 2)
        cov += (1e-3 * cov.trace() / len(cov) + 1e-9) * torch.eye(len(cov), dtype=cov.dtype)
        w = torch.linalg.solve(cov, mu[1] - mu[0])
        correct[sel] = ((xt[sel] - mu.mean(0)) @ w > 1e-9 * w.abs().sum()) == (yt[sel] == 1)
    return scores(correct.numpy(), test)


# ---------------------------------------------------------------------------------------------
# Many small heads train at once: their weights stacked, one forward runs each on its own batch
# (vmap over functional_call of the QueryHead itself: own weights, batch norm, dropout draws);
# Adam is elementwise, so they do not interact. Adam, not SGD: with SGD and momentum (lr
# 0.02-0.2) training stayed at chance for 600 steps, the cue's share of a pooled feature is tiny.
# ---------------------------------------------------------------------------------------------

def vmapped(heads):
    """(params, buffers, base, forward): the heads' stacked state, a weightless copy of one head
    whose train()/eval() sets the mode, and forward(params, buffers, taps (M, N, T, c1), means
    (M, N, c1)) -> logits (M, N, 2), every head on its own samples."""
    p, b = torch.func.stack_module_state(heads)
    base = copy.deepcopy(heads[0]).to("meta")

    def one(p_, b_, taps, mean):
        return torch.func.functional_call(base, (p_, b_), (taps, mean))
    return p, b, base, torch.func.vmap(one, randomness="different")


def precise_bn(base, forward, p, b, taps, mean):
    """Each head's batch-norm statistics become those of its fixed training samples, the weights
    fixed ("precise BN", Wu & Johnson 2021: one pass in training mode with momentum 1). Running
    averages lag behind weights that still move: that lag alone cost a curve point up to 10."""
    bns = [m for m in base.modules() if isinstance(m, nn.BatchNorm2d)]
    base.train()
    for bn in bns:
        bn.momentum = 1.0
    with torch.no_grad():
        forward(p, b, taps, mean)
    for bn in bns:
        bn.momentum = 0.1


def _stacked_data(sets, models):
    """The training samples of `models` [(row, seed, band), ...] in one tensor each (taps
    flattened, mean, label) and each model's rows in them: all of its (row, seed) set's, or its
    band's (rows of a 2-d tensor gather several times faster)."""
    srcs = list(dict.fromkeys(s for _, s, _ in models))
    tr = [sets[s]["train"] for s in srcs]
    starts = dict(zip(srcs, np.cumsum([0] + [len(t[2]) for t in tr[:-1]]).tolist()))
    rows = []
    for _, s, band in models:
        d = sets[s]["train"][3]
        keep = torch.ones(len(d), dtype=torch.bool) if band is None else \
            (d >= band[0]) & (d <= band[1])
        rows.append(starts[s] + torch.nonzero(keep)[:, 0])
    return (torch.cat([t[0].flatten(1) for t in tr]), torch.cat([t[1] for t in tr]),
            torch.cat([t[2] for t in tr]), rows)


def accuracy(head, s):
    """scores() of one head in eval mode on samples s."""
    with torch.no_grad():
        return scores((head.eval()(s[0], s[1]).argmax(1) == s[2]).numpy(), s)


def train_heads(cfg, iters, sets, models):
    """Train the QueryHeads of `models` [(row, seed, band), ...] (one shape; band None: every
    distance, else (lo, hi): that band's samples only) on sets[base row, seed] together: Adam,
    poly policy over `iters`, every evaluation (at the CURVE points) after precise_bn. Returns
    per model: test scores, accuracy by distance on its training samples, {iteration: curve}."""
    heads = [QueryHead(row, seed, cfg["context_channels"]) for row, seed, _ in models]
    keys = [(row.removesuffix(NO_IMAGE), seed) for row, seed, _ in models]
    p, b, base, forward = vmapped(heads)
    optimizer = torch.optim.Adam(p.values(), cfg["lr"])
    taps, mean, label, rows = _stacked_data(sets, [(r, k, band) for (r, _, band), k
                                                   in zip(models, keys)])
    n, batch = len(models), cfg["batch_size"]
    n_bn = min(PRECISE_BN, min(len(r) for r in rows))  # the same samples at every evaluation
    fixed = torch.cat([r[torch.randperm(len(r), generator=torch.Generator().manual_seed(1))
                         [:n_bn]] for r in rows])
    orders = [torch.Generator().manual_seed(seed) for _, seed, _ in models]
    points, curves = sorted({max(1, round(f * iters)) for f in CURVE}), [{} for _ in models]

    def stacked(idx, k):
        return taps[idx].view(n, k, -1, CONTEXT_CHANNELS), mean[idx].view(n, k, -1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # dropout's draws
        for it in range(iters):
            set_lr(optimizer, poly_lr(cfg["lr"], it, iters, cfg["power"]))
            idx = torch.cat([r[torch.randint(len(r), (batch,), generator=g)]
                             for r, g in zip(rows, orders)])
            base.train()
            losses = F.cross_entropy(forward(p, b, *stacked(idx, batch)).flatten(0, 1),
                                     label[idx], reduction="none").view(n, -1).mean(1)
            losses.sum().backward()  # each model's own gradient: the slices do not interact
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if it + 1 in points:
                precise_bn(base, forward, p, b, *stacked(fixed, n_bn))
                for m, (head, k) in enumerate(zip(heads, keys)):
                    head.load_state_dict({name: v[m] for d in (p, b) for name, v in d.items()})
                    curves[m][it + 1] = accuracy(head, sets[k]["test"])[0]
    bad = [models[m] for m in range(n) if not math.isfinite(losses[m].item())]
    if bad:
        raise FloatingPointError(f"{bad}: non-finite loss; try a lower --lr")
    return ([accuracy(h, sets[k]["test"]) for h, k in zip(heads, keys)],
            [accuracy(h, sets[k]["train"])[0] for h, k in zip(heads, keys)], curves)


# ---------------------------------------------------------------------------------------------
# The command: per setting, every row probed and trained with seeds 0..SEEDS-1 (a seed draws
# layouts, noise and initialisation); rows that have not converged run again with twice the
# iterations; a record per (setting, row, iterations), read back by the same command again.
# ---------------------------------------------------------------------------------------------

def setting_file(setting):
    """The file name a setting's records and figure start with."""
    return setting.replace(" ", "").replace(",", "-")


def context_data(distractor, seed, per):
    """One seed's training and test layouts of a condition and every Table 1 module's taps there
    (`per`: layouts per distance of each split); seed 0 draws what rule v3 drew."""
    modules = [table1_module(r, CONTEXT_CHANNELS) for r in TABLE1]
    out = {}
    for i, split in enumerate(("train", "test")):
        lay = context_layouts(4 * seed + 1 + i + 2 * distractor, per[split], distractor)
        out[split] = (lay, gather_taps(modules, lay, CONTEXT_CHANNELS, 7 + i + 2 * seed))
    return out


def context_experiment(cfg, seeds):
    """Every chosen setting x CONTEXT_ROWS until converged or --max-iters; prints and writes the
    tables, a figure per setting and the learning curves."""
    out, t0 = cfg["out_dir"], time.time()
    per = dict(PER_DISTANCE, train=cfg["train_layouts"])
    key = json.loads(json.dumps(dict(
        {k: cfg[k] for k in ("batch_size", "lr", "context_channels", "power")}, per=per,
        channels=CONTEXT_CHANNELS, rule=4, seeds=seeds, evaluation="precise BN",
        band_trained=BAND_TRAINED)))
    chosen = [x for x in SETTINGS if setting_file(x[0]) in cfg["settings"]]
    results, cache = {}, {}
    for setting, sigma, distractor, bg in chosen:
        recs, todo, iters = {}, list(CONTEXT_ROWS), cfg["iters"]
        cols = bands(context_distances(distractor))
        while todo:
            path = {row: os.path.join(out, f"{setting_file(setting)}-{row}-{iters}.json")
                    for row in todo}
            for row in todo:
                recs[row] = read_back(path[row], dict(key, setting=setting, iters=iters), RECORD)
            pending = [row for row in todo if recs[row] is None]
            if pending:
                if cache.get("for") != (distractor, seeds):  # layouts serve a condition's settings
                    cache = {"for": (distractor, seeds), "data": [
                        context_data(distractor, s, per) for s in range(seeds)]}
                codes = context_codes(CONTEXT_CHANNELS, bg)
                sets = {(r, s): {split: twins(parts[r], lay, sigma, codes)
                                 for split, (lay, parts) in cache["data"][s].items()}
                        for r in TABLE1 for s in range(seeds)}
                for row, rec in train_rows(cfg, iters, sets, pending, seeds, cols).items():
                    recs[row] = dict(rec, config=dict(key, setting=setting, iters=iters))
                    infra.write_json(path[row], recs[row])
                print(f"context experiment: {setting}, {iters} iterations: "
                      f"{', '.join(pending)} done, {(time.time() - t0) / 60:.1f} min", flush=True)
            todo = [row for row in todo if 2 * iters <= cfg["max_iters"] and not converged(
                record_arrays(recs[row]), cols, cfg["tolerance"])[0]]
            iters *= 2
        results[setting] = {row: record_arrays(recs[row]) for row in CONTEXT_ROWS}
    cache = None
    table = "\n\n".join(context_table(cfg, s, d, results[s], seeds) for s, _, d, _ in chosen)
    table += f"\n\n{len(chosen)} settings, {seeds} seed(s): {(time.time() - t0) / 60:.1f} min"
    print(table)
    infra.atomic_save(os.path.join(out, "table.txt"), lambda f: f.write(table.encode() + b"\n"))
    coverage = {row: ring_coverage(table1_module(row, CONTEXT_CHANNELS)) for row in TABLE1}
    for setting, *_ in chosen:
        context_figure(results[setting], coverage, setting,
                       os.path.join(out, f"{setting_file(setting)}.png"))
    context_curves_figure(results, os.path.join(out, "curves.png"))
    print(f"wrote {os.path.join(out, 'table.txt')}, one figure per setting and curves.png in {out}")
    return results


def train_rows(cfg, iters, sets, rows, seeds, cols):
    """Probe and train `rows` of one setting (one stack of heads per shape): their records."""
    models = [(row, s, None) for row in rows for s in range(seeds)]
    models += [(row, s, band) for row in rows if row in BAND_TRAINED for s in range(seeds)
               for band in cols]
    stacks, got = {}, {}
    for m in models:
        stacks.setdefault(head_shape(QueryHead(m[0], 0, 1)), []).append(m)
    for stack in stacks.values():
        got.update(zip(stack, zip(*train_heads(cfg, iters, sets, stack))))
    recs = {}
    for row in rows:
        mine = [got[row, s, None] for s in range(seeds)]
        told = [[np.full(CONTEXT_DISTANCES + 1, np.nan) for _ in range(seeds)] for _ in "tf"]
        for (r, s, band), (final, fit, _) in got.items():  # each distance from its band's model
            if r == row and band is not None:
                for to, acc in zip(told, (final[0], fit)):
                    to[s][band[0]:band[1] + 1] = acc[band[0]:band[1] + 1]
        image_level = head_shape(QueryHead(row, 0, 1))[1]
        probes = [{by: probe(sets[row.removesuffix(NO_IMAGE), s]["train"],
                             sets[row.removesuffix(NO_IMAGE), s]["test"], by, image_level)
                   for by in PROBES} for s in range(seeds)]
        recs[row] = {
            "probe": {by: [p[by][0].tolist() for p in probes] for by in PROBES},
            "probe_conflict": {by: [p[by][1].tolist() for p in probes] for by in PROBES},
            "trained": [f[0].tolist() for f, _, _ in mine],
            "trained_conflict": [f[1].tolist() for f, _, _ in mine],
            "trained_fit": [fit.tolist() for _, fit, _ in mine],
            "trained_band": [a.tolist() for a in told[0]] if row in BAND_TRAINED else [],
            "trained_band_fit": [a.tolist() for a in told[1]] if row in BAND_TRAINED else [],
            "curve": {"iters": sorted(mine[0][2]),
                      "trained": [[c[i].tolist() for i in sorted(c)] for _, _, c in mine]}}
    return recs


def record_arrays(rec):
    """A record as arrays (null, a distance a condition does not score, -> NaN)."""
    def arr(v):
        return np.array(v, dtype=float)
    out = {k: {by: arr(v) for by, v in rec[k].items()} for k in ("probe", "probe_conflict")}
    out.update({k: arr(rec[k]) for k in RECORD if k not in out and k != "curve"})
    return dict(out, curve_iters=rec["curve"]["iters"], curve=arr(rec["curve"]["trained"]),
                iters=rec["config"]["iters"])


def band_mean(a, lo, hi):
    """The mean of a band's distances (every distance weighs the same)."""
    return a[..., lo:hi + 1].mean(-1)


def converged(r, cols, tolerance):
    """(held, largest change): every band's trained accuracy (mean over seeds) moved by less
    than `tolerance` points over the run's last doubling (CURVE point at half the run to end)."""
    its, curve = r["curve_iters"], r["curve"].mean(0)
    half = its.index(max(1, round(its[-1] / 2)))
    change = max(abs(band_mean(curve[-1], lo, hi) - band_mean(curve[half], lo, hi))
                 for lo, hi in cols)
    return bool(change < tolerance), change


def paired(a, b):
    """Per-seed differences a - b (a seed draws both rows' data and initialisation): (mean,
    seeds +, seeds -, spread, real). spread: the larger range over seeds of either row alone,
    what a re-run moves a row by; real: every seed the same sign and |mean| > spread."""
    d, spread = a - b, max(np.ptp(a), np.ptp(b))
    real = len(d) > 1 and ((d > 0).all() or (d < 0).all()) and abs(d.mean()) > spread
    return d.mean(), int((d > 0).sum()), int((d < 0).sum()), spread, bool(real)


def context_table(cfg, setting, distractor, res, seeds):
    """One setting, by band: the band probe | the trained module (mean ± s.e. over seeds); the
    three probes; fit; told the band; the conflict twins; learning curves; convergence; paired
    comparisons of the trained rows."""
    cols = bands(context_distances(distractor))
    cols_all = cols + ((1, context_distances(distractor)),)

    def mean(a, lo, hi):
        return f"{band_mean(a, lo, hi).mean():5.1f}"

    def with_se(a, lo, hi):
        v = band_mean(a, lo, hi)
        return f"{v.mean():5.1f} ± {v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan:3.1f}"

    def block(title, cell, rows=tuple(res), suffix=""):
        return [title] + [f"{row + suffix:15}" + "".join(f"{cell(res[row], lo, hi):>22}"
                                                         for lo, hi in cols_all) for row in rows]
    lines = [f"{setting}: one query, a cue at distance d, 65x65x{CONTEXT_CHANNELS}, "
             f"{cfg['train_layouts']} training / {PER_DISTANCE['test']} test layouts x 2 twins "
             f"per distance, drawn per seed; accuracy (%), chance exactly 50; {seeds} seed(s), "
             f"batches of {cfg['batch_size']}, iterations per row: see convergence",
             f"{'module':15}" + "".join(f"{f'{lo}-{hi}':>22}" for lo, hi in cols_all)]
    lines += block("band probe | trained (mean ± s.e. over seeds)", lambda r, lo, hi:
                   f"{mean(r['probe']['band'], lo, hi)} | {with_se(r['trained'], lo, hi)}")
    lines += block("probes (mean over seeds): per distance / per band / pooled", lambda r, lo, hi:
                   " / ".join(f"{band_mean(r['probe'][by], lo, hi).mean():4.1f}" for by in PROBES))
    lines += block("trained, on its training samples | on the test samples (mean over seeds)",
                   lambda r, lo, hi: f"{mean(r['trained_fit'], lo, hi)} | "
                                     f"{mean(r['trained'], lo, hi)}")
    lines += block("told the band (a module per band, trained on that band's samples only, as "
                   "the band probe is fitted): band probe | test | training samples",
                   lambda r, lo, hi: " | ".join(mean(a, lo, hi) for a in (
                       r["probe"]["band"], r["trained_band"], r["trained_band_fit"])),
                   [row for row in res if len(res[row]["trained_band"])], " /band")
    if distractor:
        lines += block("conflict twins only (the distractor has the other class, so only the "
                       "nearer cue decides): band probe | trained", lambda r, lo, hi:
                       f"{mean(r['probe_conflict']['band'], lo, hi)} | "
                       f"{with_se(r['trained_conflict'], lo, hi)}")
    lines.append("learning curve, trained (mean over seeds), bands " +
                 " / ".join(f"{lo}-{hi}" for lo, hi in cols) + " at iteration:")
    lines += [f"{row:15}" + "  ".join(f"{it}: " + "/".join(
        f"{band_mean(acc, lo, hi):.1f}" for lo, hi in cols) for it, acc in
        zip(r["curve_iters"], r["curve"].mean(0))) for row, r in res.items()]
    lines.append(f"convergence: held if every band's trained accuracy (mean over seeds) moved by "
                 f"< {cfg['tolerance']} points over the run's last doubling of iterations; a row "
                 f"that did not ran again with twice the iterations, up to {cfg['max_iters']}")
    for row, r in res.items():
        held, change = converged(r, cols, cfg["tolerance"])
        lines.append(f"{row:15}{r['iters']:7d} iterations: " + (
            "held" if held else "NOT held within the budget") + f" (largest change {change:.1f})")
    lines.append("paired by seed (a seed draws data and initialisation): mean difference in "
                 "points (seeds +/-, spread: the larger range over seeds of either row); "
                 "* real: every seed the same sign and |mean| > spread")
    for a, b in PAIRS:
        parts = []
        for lo, hi in cols_all:
            m, plus, minus, spread, real = paired(band_mean(res[a]["trained"], lo, hi),
                                                  band_mean(res[b]["trained"], lo, hi))
            parts.append(f"{lo}-{hi} {m:+5.1f} ({plus}+/{minus}-, {spread:3.1f}){'*' * real:1}")
        lines.append(f"  {a + ' - ' + b:30} " + "  ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The context experiment's figures: accuracy (40..100 %) against distance, a panel per module of
# Table 1 (with and without its image-level branch), and against iterations, the curves.
# ---------------------------------------------------------------------------------------------

CONTEXT_COLOURS = ((120, 120, 120), (148, 103, 189), (31, 119, 180), (23, 190, 207),
                   (255, 127, 14), (188, 140, 60), (140, 86, 75), (214, 39, 40))  # TABLE1's order


def _colour(row):
    return CONTEXT_COLOURS[list(TABLE1).index(row.removesuffix(NO_IMAGE))]


def _polyline(draw, points, fill, width=1, dash=0):
    """A line through `points`, broken where a value is NaN; dashed every `dash` px if > 0."""
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        if math.isnan(ya) or math.isnan(yb):
            continue
        steps = max(1, int(math.hypot(xb - xa, yb - ya) // dash)) if dash else 1
        for s in range(0, steps, 2 if dash else 1):
            f0, f1 = s / steps, min(1, (s + 1) / steps)
            draw.line([xa + f0 * (xb - xa), ya + f0 * (yb - ya), xa + f1 * (xb - xa),
                       ya + f1 * (yb - ya)], fill=fill, width=width)


def _axes(size, title, ticks, lo=40):
    """A white panel, accuracy lo..100 % up the side and `ticks` {x: label} under the box:
    (picture, draw, box, y(accuracy)); NaN stays NaN (not scored)."""
    pic = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(pic)
    x0, y0, x1, y1 = box = (30, 20, size[0] - 14, size[1] - 20)

    def y(v):
        return v if math.isnan(v) else y1 - (y1 - y0) * (min(max(v, lo), 100) - lo) / (100 - lo)
    for v in (50, 75, 100):
        draw.text((2, y(v) - 6), f"{v}", fill=(0, 0, 0))
        draw.line([x0, y(v), x1, y(v)], fill=(0, 0, 0) if v == 50 else (235, 235, 235))
    for x, label in ticks.items():
        draw.text((x - 4, y1 + 3), str(label), fill=(0, 0, 0))
    draw.text((x0, 4), title, fill=(0, 0, 0))
    return pic, draw, box, y


def _context_panel(name, res, coverage, size=(300, 200)):
    """One module against distance 1..40: grey bars, the share of the positions at d that its
    footprint reads; black, its band probe (grey: without the image-level branch); colour, the
    module trained (mean ± s.e. over seeds, shaded; dashed: without the branch)."""
    n, colour, title = CONTEXT_DISTANCES, _colour(name), name
    for row, dash in ((name, 0), (name + NO_IMAGE, 3)):
        if row in res:
            title += f"{' / w/o' if dash else ':'} {np.nanmean(res[row]['trained'].mean(0)[1:]):.1f}"
    x0, x1 = 30, size[0] - 14
    xs = [x0 + (x1 - x0) * (d - 0.5) / n for d in range(n + 2)]  # bar edges for d = 1..n
    centres = [(xs[d] + xs[d + 1]) / 2 for d in range(1, n + 1)]
    pic, draw, (_, y0, _, y1), y = _axes(size, title + "%", {centres[d - 1]: d for d in
                                                             (1, 10, 20, 30, 40)})
    for d in range(1, n + 1):
        if coverage[d] > 0:
            draw.rectangle([xs[d], y1 - (y1 - y0) * coverage[d], xs[d + 1] - 1, y1],
                           fill=(222, 222, 222))
    for row, dash, grey in ((name, 0, (0, 0, 0)), (name + NO_IMAGE, 3, (150, 150, 150))):
        if row not in res:
            continue
        tr = res[row]["trained"]
        mean = tr.mean(0)
        se = tr.std(0, ddof=1) / np.sqrt(len(tr)) if len(tr) > 1 else 0 * mean
        ok = [d for d in range(1, n + 1) if not math.isnan(mean[d])]
        draw.polygon([(centres[d - 1], y(mean[d] + se[d])) for d in ok] +
                     [(centres[d - 1], y(mean[d] - se[d])) for d in reversed(ok)],
                     fill=tuple(255 - (255 - c) // 3 for c in colour))
        _polyline(draw, [(c, y(p)) for c, p in zip(centres, res[row]["probe"]["band"].mean(0)[1:])],
                  grey)
        _polyline(draw, [(c, y(m)) for c, m in zip(centres, mean[1:])], colour, 2, dash)
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    return np.asarray(pic)


def _figure(head_lines, rows, out):
    """Text lines on top of picture rows, padded to one width, written atomically to `out`."""
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 6), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    return infra.save_picture(out, np.concatenate([caption(width, *head_lines)] + rows, 0))


def context_figure(results, coverage, setting, out):
    """One setting: a panel per module of Table 1 (_context_panel); results {row:
    record_arrays(...)}."""
    panels = [_context_panel(name, results, coverage[name]) for name in TABLE1]
    return _figure([
        f"{setting}: accuracy (%) reading the class of a 3x3 cue at distance d (descriptors) "
        "from the query pixel of a 65x65 map; chance 50; blank: d not scored.",
        "Colour: the module trained, mean ± s.e. over seeds (shaded); dashed: the same without "
        "its image-level branch. Black / grey: the band probe, with / without the branch.",
        "Grey bars: share of the positions at distance d that its footprint reads (Fig. 3; "
        "full = all). Title: mean over d, trained with / without the branch."],
        [hstack(panels[i:i + 4], 6) for i in range(0, len(panels), 4)], out)


def _curve_panel(title, curves, size=(230, 170)):
    """Accuracy (%) of one band against iterations (log scale), a line per row (mean over
    seeds; dashed: without the image-level branch), curves [(iterations, accuracies, row)]."""
    first, last = min(c[0][0] for c in curves), max(c[0][-1] for c in curves)

    def x(it):
        return 30 + (size[0] - 44) * math.log(it / first) / max(1e-9, math.log(last / first))
    pic, draw, box, y = _axes(size, title, {x(first) - 6: first, x(last) - 6: last})
    for its, acc, row in curves:
        _polyline(draw, [(x(i), y(a)) for i, a in zip(its, acc)], _colour(row), 2,
                  3 if row.endswith(NO_IMAGE) else 0)
    draw.rectangle(box, outline=(0, 0, 0))
    return np.asarray(pic)


def context_curves_figure(results, out):
    """Learning curves of the trained rows: a row of panels per setting, a panel per band."""
    rows = [hstack([_curve_panel(
        f"{setting.replace('background', 'bg')}: d {lo}-{hi}",
        [(r["curve_iters"], band_mean(r["curve"].mean(0), lo, hi), row)
         for row, r in results[setting].items()]) for lo, hi in bands(context_distances(d))], 6)
        for setting, _, d, _ in SETTINGS if setting in results]
    names = list(TABLE1)
    return _figure([
        "Learning curves of the context experiment: accuracy (%) of each trained module (mean "
        "over seeds) on a band of distances against training iterations",
        "(log scale; poly learning rate over each run; dashed: without the image-level branch; "
        "a row's last run). Chance 50."],
        [legend(max(r.shape[1] for r in rows), names, [_colour(n) for n in names],
                range(len(names)))] + rows, out)


# =============================================================================================
# 5. PICTURES OF THE DATA
# =============================================================================================

def synthetic_samples_figure(out, n=6, size=128, seed=0):
    """n synthetic samples: images on top, labels below, and a legend."""
    ds = data.SyntheticContext(n, size, seed)
    grid = hstack([np.concatenate([ds.load(i)[0], colorize(ds.load(i)[1], ds.palette)], 0)
                   for i in range(n)], 4)
    return infra.save_picture(out, np.concatenate([grid, legend(
        grid.shape[1], ds.classes, ds.palette, range(len(ds.classes)))], 0))


CONTEXT_VIEW = ("background", "query", "cue P", "cue Q")
CONTEXT_PALETTE = np.zeros((256, 3), dtype=np.uint8)
CONTEXT_PALETTE[:4] = [(245, 245, 245), (0, 0, 0), (200, 0, 0), (0, 60, 200)]


def context_samples_figure(out, cell=3, distances=(2, 12, 24), seed=0):
    """Samples of the context experiment: 65x65 maps with the query pixel (circled) and its cue
    at a few distances, then with a distractor at >= 1.5 d, of a random class (P or Q)."""
    maps = []
    for distractor in (False, True):
        lay = context_layouts(seed, 1, distractor)
        for d in distances:
            view = np.zeros((CONTEXT_SIZE, CONTEXT_SIZE), np.uint8)
            for part, kind in (("cue", 2), ("distractor", 2 + lay["other"][d - 1])):
                cy, cx = lay[part][d - 1]
                if cy > -1000:
                    view[cy - 1:cy + 2, cx - 1:cx + 2] = kind
            view[tuple(lay["query"][d - 1])] = 1
            pic = Image.fromarray(np.kron(colorize(view, CONTEXT_PALETTE),
                                          np.ones((cell, cell, 1), np.uint8)))
            qy, qx = lay["query"][d - 1] * cell + cell // 2
            ImageDraw.Draw(pic).ellipse([qx - 6, qy - 6, qx + 6, qy + 6], outline=(0, 0, 0))
            maps.append(np.concatenate([caption(pic.width + 2, f"d = {d}, " + (
                "distractor" if distractor else "one cue")), np.pad(
                    np.asarray(pic), ((1, 1), (1, 1), (0, 0)))], 0))  # framed: the map's border
    grid = hstack(maps, 6)
    return infra.save_picture(out, np.concatenate([grid, legend(
        grid.shape[1], CONTEXT_VIEW, CONTEXT_PALETTE, range(len(CONTEXT_VIEW)))], 0))


# =============================================================================================
# 6. THE COMMAND LINE
# =============================================================================================
# Flags that are settings of the project come from infra.SETTINGS (one table, one check for
# every command: a value one command accepts, every command accepts); the flags of this script
# alone are in OWN, each with its range, said in --help and checked by parse.

FIGURES = {"footprints": footprints_figure, "synthetic": synthetic_samples_figure,
           "descriptors": context_samples_figure}
BENCHES = ("modules", "training", "inference", "loader")
OWN = {"size": (1, 1024), "reps": (1, 1000), "n": (1, 10 ** 6), "erf_images": (1, 10 ** 5),
       "images": (1, 10 ** 5), "max_iters": (1, 10 ** 8), "train_layouts": (1, 10 ** 5),
       "tolerance": (0.001, 10)}


def _flags(parser, own=(), **settings):
    """Add settings' flags (name=(default, what it means here); default ...: required) and
    this script's own [(flag, type, default, help)], their limits in the help."""
    infra.add_flags(parser, settings)
    for action in parser._actions:
        if action.dest in settings:
            action.default, here = settings[action.dest]
            action.required = action.default is ...
            allowed = infra.allowed_text(action.dest).replace("a flag", "text")
            action.help = here + (f" (default {action.default})" if action.default not in (
                None, False, ...) else "") + (f" [{allowed}]" if allowed != "text" else "")
    for flag, kind, default, text in own:
        lo, hi = OWN[flag.lstrip("-").replace("-", "_")]
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default {default}) "
                            f"[{'a whole number in' if kind is int else 'a number in'} {lo}..{hi}]")


def parser():
    """The command line (--help, and each command's --help, explain every flag)."""
    p = infra.Parser(
        description="Research and measurement beside the Vortex Pooling reimplementation: "
                    "Table 1's modules in numbers, figures, benchmarks and the experiments. "
                    "`python experiments.py COMMAND --help` explains a command's flags.")
    _flags(p, threads=(0, "torch CPU threads"))
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("table", help="Table 1's modules on a 1x2048x65x65 map: utilization ratio "
                                     "(paper Eq. 1; analytic and measured), parameters, time")
    _flags(s, [("--size", int, 65, "feature-map side h = w (65: a 513x513 image at OS 8)"),
               ("--reps", int, 3, "timing repetitions (the best is kept)")])
    s = sub.add_parser("figure", help="draw a figure to a picture file")
    s.add_argument("what", choices=FIGURES, help="footprints: the paper's Fig. 3 from the real "
                   "modules; synthetic: samples of the built-in data; descriptors: samples of "
                   "the 65x65 context experiment")
    s.add_argument("--out", default=None, help="the picture to write (default <what>.png)")
    _flags(s, force=(False, "overwrite --out"))
    s = sub.add_parser("bench", help="speed as ratios measured side by side in one run")
    s.add_argument("what", choices=BENCHES, help="modules: the context modules and the whole "
                   "model, Vortex/ASPP (on a GPU also the pooling methods); training: training "
                   "steps (CPU: crop 321; CUDA: batch 2/4/8 x fp32/bf16 x NCHW/channels-last); "
                   "inference: single scale vs 6 scales + flip; loader: augmented 513x513 "
                   "samples/s in one process")
    s.add_argument("--voc", default=None, help="loader: a VOC2012 folder (default: VOC-sized "
                                               "synthetic JPEGs in a temporary folder)")
    _flags(s, [("--reps", int, 3, "timing repetitions (modules, inference)"),
               ("-n", int, 300, "loader: samples to time")], 
           device=(None, "training: " + infra.SETTINGS["device"].help))
    s = sub.add_parser("ablation", help="Table 1 in miniature: train and evaluate every module "
                       "of Table 1 plus 'none' with seeds 0..SEEDS-1, then the effective "
                       "receptive fields of none, ASPP and Vortex; any other flag is train.py's "
                       "and applies to every run (python train.py --help)")
    _flags(s, [("--erf-images", int, 32, "validation images averaged in --out-dir/erf.png")],
           seeds=(..., "seeds per module"))
    s = sub.add_parser("context", help="Table 1's question at the paper's geometry: accuracy "
                       "reading the class of a cue 1..40 descriptors from a pixel of a 65x65 map, "
                       "per module with and without its image-level branch: probes of its taps "
                       "and the module trained until converged")
    _flags(s, [("--max-iters", int, 38400, "the budget: a row that has not converged runs again "
                                           "with twice the iterations, up to this"),
               ("--tolerance", float, 1.0, "converged: every band moved by less than this many "
                                           "points over a run's last doubling of iterations"),
               ("--train-layouts", int, PER_DISTANCE["train"], f"training layouts per distance, "
                f"each with its twin (the test keeps {PER_DISTANCE['test']})")],
           seeds=(..., "seeds per row; a seed draws the data and the initialisation"),
           iters=(9600, "iterations of a row's first run"),
           batch_size=(512, "query pixels per batch"), lr=(0.003, "Adam's"),
           context_channels=(16, "the modules' width"))
    s.add_argument("--settings", nargs="+", choices=[setting_file(x[0]) for x in SETTINGS],
                   default=None, metavar="SETTING", help="run only these settings (default all: "
                   + ", ".join(setting_file(x[0]) for x in SETTINGS) + ")")
    s.add_argument("--out-dir", default=os.path.join("runs", "context-distance"),
                   help="records, table.txt and the figures (default runs/context-distance); "
                        "the same command again continues there")
    s = sub.add_parser("erf", help="effective receptive fields of train.py checkpoints (gradient "
                       "of the centre pixel's logit w.r.t. the image, mean over validation "
                       "images; checkpoints of one module are averaged)")
    s.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    s.add_argument("--out", default=os.path.join("runs", "erf.png"), help="the picture "
                                                                         "(runs/erf.png)")
    _flags(s, [("--images", int, 32, "validation images per checkpoint")],
           data_root=(None, "the data the checkpoints were trained on, if not where they say"),
           device=(None, infra.SETTINGS["device"].help), force=(False, "overwrite --out"))
    return p


def parse(argv=None):
    """(args, cfg): the command line checked before any work; cfg is train.py's configuration
    for `ablation` (its other flags), the trained modules' settings for `context`, else None."""
    p = parser()
    args, rest = p.parse_known_args(argv)
    if rest and args.cmd != "ablation":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    infra.check_settings({k: v for k, v in vars(args).items() if k in infra.SETTINGS})
    for k, (lo, hi) in OWN.items():
        v = getattr(args, k, None)
        if v is not None and not lo <= v <= hi:  # NaN too
            raise BadInput(f"--{k.replace('_', '-')} {v}: must be "
                           f"{'a whole number' if type(v) is int else 'a number'} in {lo}..{hi}")
    if getattr(args, "out", None) is not None:
        infra.path(args.out, "--out")
    if args.cmd == "context":
        if args.max_iters < args.iters:
            raise BadInput(f"--max-iters {args.max_iters}: must be at least --iters {args.iters}")
        return args, dict(iters=args.iters, max_iters=args.max_iters, tolerance=args.tolerance,
                          batch_size=args.batch_size, lr=args.lr, power=0.9,
                          context_channels=args.context_channels,
                          train_layouts=args.train_layouts,
                          settings=args.settings or [setting_file(x[0]) for x in SETTINGS],
                          out_dir=infra.path(args.out_dir, "--out-dir"))
    if args.cmd == "ablation":
        out = [] if any(a == "--out-dir" or a.startswith("--out-dir=") for a in rest) else \
            ["--out-dir", os.path.join("runs", "ablation")]
        return args, train.parse_args(rest + out, prog="experiments.py ablation")
    return args, None


def main(argv=None):
    args, cfg = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vortex.keep_freed_memory()  # large tensors reuse memory instead of page-faulting it in
    torch.manual_seed(0)
    if args.cmd == "table":
        return print_table(args.size, reps=args.reps)
    if args.cmd == "figure":
        out = args.out or f"{args.what}.png"
        with infra.Claim("experiments.py figure", [("--out", out, infra.PICTURES)], (),
                         args.force):
            return print("wrote", FIGURES[args.what](out))
    if args.cmd == "bench":
        if args.what == "modules" and torch.cuda.is_available():
            bench_modules_cuda()
        return {"modules": lambda: bench_modules(reps=max(args.reps, 3)),
                "training": lambda: bench_training(args.device),
                "inference": lambda: bench_inference(args.reps),
                "loader": lambda: bench_loader(args.voc, args.n)}[args.what]()
    if args.cmd == "erf":
        with infra.Claim("experiments.py erf", [("--out", args.out, infra.PICTURES)], [
                ("--data-root", args.data_root)] + [("CHECKPOINT", c) for c in args.checkpoints],
                args.force):
            return erf_figure(args.checkpoints, args.out, args.images,
                              infra.pick_device(args.device), args.data_root)
    try:
        first = os.environ.get("RANK", "0") == "0"  # under torchrun: rank 0 holds the folder
        with infra.Claim(f"experiments.py {args.cmd}", [("--out-dir", cfg["out_dir"], "folder")]
                         if first else []):
            return context_experiment(cfg, args.seeds) if args.cmd == "context" else \
                ablation(dict(cfg, erf_images=args.erf_images), args.seeds)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    infra.end(lambda: infra.cli(main) and 0)
