"""Research and measurement beside the paper, what the four paper files do not need to run:
`python experiments.py COMMAND --help` (commands: table, figure, bench, ablation, context, erf).
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

# ==== 1. TABLE 1'S MODULES IN NUMBERS (paper 3.2, Eq. 1) AND FIG. 3 ===========================

TABLE_ROWS = tuple(row for row in TABLE1 if TABLE1[row].miou) + ("none",)  # as printed

def print_table(size=65, channels=2048, reps=3):
    """Paper 3.2 / Table 1 in numbers: utilization ratios, parameters, forward time."""
    x = torch.randn(1, channels, size, size)
    modules = {row: table1_module(row, channels).eval() for row in TABLE_ROWS}
    with torch.no_grad():
        times = best_times({row: (lambda m=m: m(x)) for row, m in modules.items()}, reps)
    print(f"Context modules on X = 1x{channels}x{size}x{size} (ResNet-101 at output stride 8, "
          f"513x513 input), CPU, {torch.get_num_threads()} threads, best of {reps}")
    print(f"{'module':8} {'pooling k':12} {'dilations':12} {'r paper':>11} {'r analytic':>10} "
          f"{'r measured':>10} {'params':>10} {'forward s':>9} {'x ASPP':>7}")
    for row, m in modules.items():
        measured = measured_utilization(table1_module(row, 8), size, size)
        print(f"{row:8} {','.join(map(str, m.pools)):12} {','.join(map(str, m.dilations)):12} "
              f"{TABLE1[row].ratio or '-':>11} {utilization_ratio(m, size, size):10.4f} "
              f"{measured:10.4f} {sum(p.numel() for p in m.parameters()):10,d} "
              f"{times[row]:9.3f} {times[row] / times['ASPP']:7.2f}")
    print("r analytic: Eq. 1, the footprint counted on an unbounded map; r measured: autograd on "
          "the real module (8 channels) at the centre pixel, taps off the map not counted.")

def ring_coverage(module, max_distance=40):
    """Fig. 3 as a curve: per Chebyshev distance d, the share of the offsets the footprint reads."""
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
    """Fig. 3 from the real modules: what feeds the centre output (autograd), by branch."""
    panels = []
    for m in [table1_module(row, 8) for row in ("ASPP", "A(5)", "Vortex")]:
        ratio, used = measured_utilization(m, size, size, return_map=True)
        pic = np.full((size, size, 3), 255, np.uint8)
        for i in sorted(range(len(m.pools)), key=lambda i: -m.pools[i] - m.dilations[i]):
            fp = footprint(m.pools[i:i + 1], m.kernels[i:i + 1], m.dilations[i:i + 1])
            fp = np.pad(fp, max(0, size // 2 - fp.shape[0] // 2))  # centred on the centre pixel
            o = fp.shape[0] // 2 - size // 2
            pic[fp[o:o + size, o:o + size] & used] = BRANCH_COLOURS[i]
        pic[size // 2, size // 2] = 0
        pic = np.pad(np.kron(pic, np.ones((cell, cell, 1), np.uint8)), ((1, 1), (1, 1), (0, 0)))
        names = [f"{k}x{k} pool, {n}x{n} conv" + (f", rate {d}" if n > 1 else "")
                 for k, n, d in zip(m.pools, m.kernels, m.dilations)]
        title = caption(pic.shape[1], f"{m.name}: r = {ratio:.4f} of the {size}x{size} map")
        panels.append(np.concatenate([pic, title, legend(pic.shape[1], names, BRANCH_COLOURS,
                                                         range(len(names)))], 0))
    return infra.save_picture(path, hstack(panels, 8))

# ==== 2. BENCHMARKS: speed as ratios measured side by side in one run (machines are noisy) ====

def best_times(fns, reps, warmup=1):
    """Best time (s) of each fn, run interleaved (a, b, a, b...) so that machine noise hits all."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    best = dict.fromkeys(fns, math.inf)
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best

@torch.no_grad()
def bench_modules(reps=5, model_reps=2):
    """Forward, fp32, on the GPU where there is one: Vortex/ASPP, the pooling against a copy."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(1, 2048, 65, 65, device=dev)
    mods = {c: make_context(c, 2048).eval().to(dev) for c in ("aspp", "vortex")}
    t = best_times({"aspp": lambda: mods["aspp"](x), "vortex": lambda: mods["vortex"](x),
                    "pool": lambda: box_averages(x, (3, 9, 27)), "copy": x.clone,
                    "avg_pool2d": lambda: [F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
                                           for k in (3, 9, 27)]}, reps)
    gb = x.numel() * x.element_size() / 1e9
    print(f"context module, input 1x2048x65x65, best of {reps}, " + (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else
        f"{torch.get_num_threads()} threads") + ":")
    print(f"  ASPP {t['aspp']:.3f} s   Vortex {t['vortex']:.3f} s   "
          f"ratio Vortex/ASPP = {t['vortex'] / t['aspp']:.3f}   (target <= 1.05)")
    print(f"  pooling k=3,9,27: box_averages {t['pool'] * 1e3:.1f} ms = {4 * gb / t['pool']:.1f} "
          f"GB/s (reads X, writes 3 maps); a copy of X {t['copy'] * 1e3:.1f} ms = "
          f"{2 * gb / t['copy']:.1f} GB/s; pooling / copy time per byte "
          f"{(t['pool'] / 4) / (t['copy'] / 2):.1f}; avg_pool2d {t['avg_pool2d']:.3f} s "
          f"({t['avg_pool2d'] / t['pool']:.0f}x the cascade)")
    img = torch.randn(1, 3, 513, 513, device=dev)
    t = best_times({c: (lambda m=DeepLabV3(21, 101, c).eval().to(dev): m(img))
                    for c in ("aspp", "vortex")}, model_reps)
    print(f"whole model, DeepLab v3 ResNet-101 OS 8, input 1x3x513x513, best of {model_reps}:")
    print(f"  ASPP {t['aspp']:.2f} s   Vortex {t['vortex']:.2f} s   "
          f"ratio Vortex/ASPP = {t['vortex'] / t['aspp']:.3f}   (target <= 1.03; "
          f"paper: 10.37 vs 10.13 FPS on a GPU = 1.024)")

def bench_inference(reps=2):
    """Seconds per 500x375 image, 1 vs 6 scales + flip, against the pixel ratio 2 sum(s^2)."""
    model, image = DeepLabV3(21, 101, "vortex").eval(), torch.randn(3, 375, 500)
    t = best_times({"single": lambda: predict(model, image),
                    "multi": lambda: predict(model, image, evaluation.PAPER_SCALES, True)}, reps, 0)
    theory = 2 * sum(s * s for s in evaluation.PAPER_SCALES)
    print(f"ResNet-101 OS 8 + Vortex, 500x375 image, CPU {torch.get_num_threads()} threads, "
          f"best of {reps}:\n  single scale {t['single']:.2f} s/image; 6 scales + flip "
          f"{t['multi']:.2f} s/image; ratio {t['multi'] / t['single']:.1f} (theory {theory:.1f})")

def bench_loader(voc=None, n=300, crop=513):
    """Augmented samples per second in one process: a VOC folder or 12 VOC-sized JPEGs."""
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

def bench_training(device_arg=None):
    """SGD steps, Vortex and ASPP one after the other per configuration; out of memory is a
    cell (peak memory after the warm-up, when cuDNN's autotuning has tried its workspaces)."""
    device = infra.pick_device(device_arg)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    models = {c: DeepLabV3(21, 101, c).to(device) for c in ("vortex", "aspp")}
    opts = {c: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for c, m in models.items()}
    crop, warmup, steps = (513, 3, 10) if cuda else (321, 1, 3)
    print(f"training steps, DeepLab v3 ResNet-101 OS 8, crop {crop}, " + (
        f"one {torch.cuda.get_device_name(device)}" if cuda else
        f"CPU {torch.get_num_threads()} threads") + f", SGD, best of {steps} steps after "
        f"{warmup} warm-up, torch {torch.__version__}")
    print(f"{'batch':>5} {'precision':9} {'layout':13} {'Vortex img/s':>12} {'peak GiB':>8} "
          f"{'ASPP img/s':>10} {'peak GiB':>8} {'Vortex/ASPP time':>16}")
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

def _steps(model, opt, batch, crop, dtype, layout, warmup, steps):
    """(images/s, peak GiB or NaN on the CPU) at one configuration; None: out of memory."""
    device = next(model.parameters()).device
    cuda, fmt = device.type == "cuda", (torch.channels_last if layout == "channels-last" else
                                        torch.contiguous_format)
    model.to(memory_format=fmt)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(model(x), t) / t.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    try:
        x = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=fmt)
        t = torch.randint(0, 21, (batch, crop, crop), device=device)
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        best = best_times({"step": step}, steps, 0)["step"]
        return batch / best, (torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda
                              else math.nan)
    except torch.OutOfMemoryError:
        return None
    finally:
        opt.zero_grad(set_to_none=True)
        x = t = None
        if cuda:
            torch.cuda.empty_cache()

# ==== 3. TABLE 1 IN MINIATURE AND THE EFFECTIVE RECEPTIVE FIELD ==============================

ABLATION_ROWS = tuple(TABLE1)  # with the image-level control: what the others add to it
ABLATION_KEYS = ("dataset", "depth", "base_channels", "context_channels", "output_stride",
                 "multi_grid", "crop", "scale", "batch_size", "iters", "lr", "num_images",
                 "val_images", "image_size", "context", "pool_k", "seed", "count_include_pad",
                 "warmup")

def read_back(path, key, fields):
    """The record at `path` if made with settings `key`, None if none; others are refused."""
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
    """(mIoU, context-class mIoU, seconds) of one run, read back when finished, else resumed."""
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
    """Table 1 in miniature (every module, one budget and seeds), then none/ASPP/Vortex's ERF."""
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

def centred_mean(maps):
    """Mean of 2-D maps, their centres (h // 2, w // 2) aligned on a canvas of the largest."""
    h, w = max(m.shape[0] for m in maps), max(m.shape[1] for m in maps)
    canvas = torch.zeros(h, w, dtype=torch.float64)
    for m in maps:
        top, left = h // 2 - m.shape[0] // 2, w // 2 - m.shape[1] // 2
        canvas[top:top + m.shape[0], left:left + m.shape[1]] += m
    return canvas / len(maps)

def effective_receptive_field(model, dataset, num_images=32, device=None, log=None):
    """Effective receptive field (paper 1, after Zhou et al. 2014; as in Luo et al. 2016): per
    image (eval mode), |d logit_c(centre) / d image| over RGB, normalised to sum 1; their mean."""
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

def mass_radius(erf, fraction=0.9):
    """The smallest r such that the pixels within r of the centre hold `fraction` of the mass."""
    h, w = erf.shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    d = torch.hypot((yy - h // 2).double(), (xx - w // 2).double()).flatten()
    order = d.argsort(stable=True)
    cum = erf.flatten()[order].double().cumsum(0)
    # against cum[-1], not erf.sum(): fraction 1 then finds the last pixel with any mass exactly
    k = int(torch.searchsorted(cum, (fraction * cum[-1]).reshape(1)).clamp(max=len(d) - 1))
    return d[order][k].item()

ERF_CIRCLES = ((0.5, (255, 255, 255)), (0.9, (0, 230, 255)))  # mass, colour

def erf_figure(checkpoints, out, num_images=32, device="cpu", data_root=None, cell=2, log=print):
    """ERFs side by side, a module's checkpoints (seeds) averaged; returns {module: (r50, r90)}."""
    groups = {}
    for path in checkpoints:
        ck = infra.read_checkpoint(path)
        model = infra.model_from_checkpoint(ck, path).to(device)
        ta = ck["train_args"]  # the checkpoint's own validation images (read_checkpoint: there)
        ds = data.get_dataset(ck["dataset"], ta["val_split"], data_root or ta["data_root"],
                              train=False, seed=ta["seed"], **ck["data_args"])
        groups.setdefault(model.context.name, []).append(
            effective_receptive_field(model, ds, num_images, device, print))
    erfs = {name: centred_mean(maps) for name, maps in groups.items()}
    h, w = next(iter(erfs.values())).shape
    r50, r90 = (mass_radius(torch.ones(h, w), mass) for mass, _ in ERF_CIRCLES)  # the yardstick
    log(f"{'flat':8} (the same mass spread evenly over a {h}x{w} image): 50% within "
        f"{r50:5.1f} px, 90% within {r90:5.1f} px")
    panels, radii = [], {}
    for name, erf in erfs.items():
        (h, w), (r50, r90) = erf.shape, tuple(mass_radius(erf, mass) for mass, _ in ERF_CIRCLES)
        radii[name] = r50, r90
        log(f"{name:8} ({len(groups[name])} model(s)): 50% of the gradient within {r50:5.1f} px, "
            f"90% within {r90:5.1f} px of the centre")
        v = (erf / erf.max()).sqrt().numpy()[..., None]  # sqrt: tails show; black-red-yellow-white
        pic = Image.fromarray((np.clip(3 * v - np.arange(3), 0, 1) * 255).astype(np.uint8)).resize(
            (w * cell, h * cell), Image.NEAREST)
        cx, cy = (w // 2 + 0.5) * cell, (h // 2 + 0.5) * cell
        for r, (_, colour) in zip((r50 * cell, r90 * cell), ERF_CIRCLES):
            ImageDraw.Draw(pic).ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=2)
        title = caption(pic.width, f"{name}: 50% / 90% within {r50:.0f} / {r90:.0f} px")
        panels.append(np.concatenate([title, np.asarray(pic)], 0))
    grid = hstack(panels, 8)  # the colour scale and circles, said once under the maps
    notes = caption(grid.shape[1], "colour: sqrt of the share of", "the peak; circles: 50% / 90%")
    infra.save_picture(out, np.concatenate([grid, notes], 0))
    log(f"wrote {out}")
    return radii

# ==== 4. TABLE 1'S QUESTION AT THE PAPER'S GEOMETRY: THE 65x65 CONTEXT EXPERIMENT =============
# What can each module read at each distance (paper 3.2-3.4, Fig. 3; docs/experiments.md)? X is
# linear in its parts (background, cue, distractor, noise): each tapped once, for any class, sigma.

CONTEXT_SIZE = 65  # h = w of X for a 513 x 513 image at output stride 8 (paper 3.2)
CONTEXT_DISTANCES = 40  # d = 1..40: as far as Vortex Pooling's 81 x 81 footprint reaches
CUE = 3  # the cue's side
REACH = 40  # the largest footprint's reach (Vortex: rate 27 + 27 // 2), Chebyshev
DISTRACTOR_RATIO = 1.5  # the distractor's nearest descriptor is at >= 1.5 d
DISTRACTOR_DISTANCES = int(REACH // DISTRACTOR_RATIO)  # 26: the last d whose distractor fits REACH
SCORED = {False: CONTEXT_DISTANCES, True: DISTRACTOR_DISTANCES}  # by distractor: d = 1..SCORED

def context_codes(c1, background=1.0):
    """Orthogonal +-1 codes of background (times `background`), cue P and cue Q (Hadamard)."""
    if c1 < 4 or c1 & (c1 - 1):
        raise BadInput(f"descriptor channels must be a power of two >= 4, got {c1}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < c1:
        h = np.block([[h, h], [h, -h]])
    return h[1:4] * np.array([[background], [1], [1]], np.float32)

def ring(r):
    """The 8r offsets (dy, dx) at Chebyshev distance r: top, right, bottom, left."""
    side = np.arange(-r, r)
    top, right = np.stack([np.full(2 * r, -r), side], 1), np.stack([side, np.full(2 * r, r)], 1)
    return np.concatenate([top, right, -top, -right])

def context_layouts(seed, per_distance, distractor=False, size=CONTEXT_SIZE):
    """`per_distance` layouts per scored d, a pure function of the arguments (-1000: none)."""
    rng = np.random.default_rng([seed, 21])
    n = per_distance * SCORED[distractor]
    out = {"d": np.repeat(np.arange(1, SCORED[distractor] + 1), per_distance),
           "query": np.zeros((n, 2), np.int64), "cue": np.zeros((n, 2), np.int64),
           "distractor": np.full((n, 2), -1000, np.int64), "other": np.full(n, -1, np.int64)}
    lo, hi = CUE // 2, size - 1 - CUE // 2  # where a cue's centre fits on the map
    for i, d in enumerate(out["d"]):
        while True:
            off = ring(d + CUE // 2)[rng.integers(8 * (d + CUE // 2))]  # nearest cue pixel at d
            q = np.array([rng.integers(max(0, lo - o), min(size - 1, hi - o) + 1) for o in off])
            if not distractor:
                break
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
    """Per branch: its pooling k and the (dy, dx) offsets its convolution reads (row by row)."""
    return [(k, [(d * a, d * b) for a in range(-(n // 2), n // 2 + 1)
                 for b in range(-(n // 2), n // 2 + 1)])
            for k, n, d in zip(module.pools, module.kernels, module.dilations)]

def gather_taps(modules, layouts, c1, seed, batch=1000, size=CONTEXT_SIZE):
    """Every module's taps at every query, by part: inmap, cue, distractor, noise, noise_mean."""
    n = len(layouts["d"])
    specs = {m.name: [(k, off) for k, offs in tap_offsets(m) for off in offs] for m in modules}
    out = {name: dict({p: np.zeros((n, len(t)), np.float32) for p in ("inmap", "cue",
                                                                       "distractor")},
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
                y, x = (layouts["query"][sl] + np.array([dy, dx])).T
                inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
                # the k x k window around the tap, clipped to the map (inclusive)
                y0, y1, x0, x1 = (np.clip(v, 0, size - 1) for v in (y - k // 2, y + k // 2,
                                                                     x - k // 2, x + k // 2))
                area = (y1 - y0 + 1) * (x1 - x0 + 1)
                a, b, c, e = (torch.from_numpy(v) for v in (y0, y1 + 1, x0, x1 + 1))
                s = (integral[rows, :, b, e] - integral[rows, :, a, e] - integral[rows, :, b, c]
                     + integral[rows, :, a, c])
                out[name]["noise"][sl, t] = (s / torch.from_numpy(area)[:, None] *
                                             torch.from_numpy(inside)[:, None]).float().numpy()
                out[name]["inmap"][sl, t] = inside
                for part in ("cue", "distractor"):  # the share of the window that part covers
                    cy, cx = layouts[part][sl].T
                    oy = np.minimum(y1, cy + CUE // 2) - np.maximum(y0, cy - CUE // 2) + 1
                    ox = np.minimum(x1, cx + CUE // 2) - np.maximum(x0, cx - CUE // 2) + 1
                    out[name][part][sl, t] = np.clip(oy, 0, None) * np.clip(ox, 0, None) / \
                        area * inside
    return out

def twins(parts, layouts, sigma, codes):
    """Every layout twice, cue P then Q: (taps, mean, label, d, conflict)."""
    cls, other = np.repeat([0, 1], len(layouts["d"])), np.concatenate([layouts["other"]] * 2)
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
# (name, sigma, distractor (3.4), background code scale; 0: the border control): docs/experiments.md
SETTINGS = (("sigma 1, distractor", 1.0, True, 1.0),
            ("sigma 1, distractor, background 0", 1.0, True, 0.0),
            ("sigma 1", 1.0, False, 1.0), ("sigma 0.5", 0.5, False, 1.0))
BANDS = ((1, 10), (11, 20), (21, 30), (31, 40))
PROBES = ("distance", "band", "pooled")  # a readout per distance (told d), per band, or one
CURVE = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)  # the learning curve's points, fractions of a run
NO_IMAGE = " w/o img"  # a module of Table 1 without its image-level branch
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
    """A row of CONTEXT_ROWS and a 1x1 classifier at N query pixels, side by side as one N x 1
    map, from taps (N, T, c1) and means (N, c1): a convolution at a pixel dots its taps."""

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
    return tuple(len(offs) for _, offs in tap_offsets(head.module)), \
        head.module.image_pool is not None

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
    d = np.arange(CONTEXT_DISTANCES + 1)
    band = np.searchsorted([lo for lo, _ in BANDS], d, side="right")  # d = 0: 0, then 1, 2, ...
    return {"distance": d, "band": band, "pooled": np.ones_like(d)}[by]

def probe(fit, test, by="distance", image_level=True):
    """What a footprint holds: ridge Fisher discriminants per probe_groups(by); `test`'s scores."""
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

def vmapped(heads):
    """(stacked params, buffers, a mode-setting base, forward: each head its own batch, draws)."""
    p, b = torch.func.stack_module_state(heads)
    base = copy.deepcopy(heads[0]).to("meta")

    def one(p_, b_, taps, mean):
        return torch.func.functional_call(base, (p_, b_), (taps, mean))
    return p, b, base, torch.func.vmap(one, randomness="different")

def precise_bn(base, forward, p, b, taps, mean):
    """Batch norm takes the statistics of each head's fixed samples ("precise BN", Wu & Johnson
    2021): running averages lag behind moving weights, which alone cost a curve point up to 10."""
    bns = [m for m in base.modules() if isinstance(m, nn.BatchNorm2d)]
    base.train()
    for bn in bns:
        bn.momentum = 1.0
    with torch.no_grad():
        forward(p, b, taps, mean)
    for bn in bns:
        bn.momentum = 0.1

def _stacked_data(sets, models):
    """`models`' training samples (taps flattened: 2-d rows gather faster), each one's rows."""
    srcs = list(dict.fromkeys(s for _, s, _ in models))
    tr = [sets[s]["train"] for s in srcs]
    starts = dict(zip(srcs, np.cumsum([0] + [len(t[2]) for t in tr[:-1]]).tolist()))
    rows = []
    for _, s, band in models:
        d, (lo, hi) = sets[s]["train"][3], band or (0, CONTEXT_DISTANCES)
        rows.append(starts[s] + torch.nonzero((d >= lo) & (d <= hi))[:, 0])
    return (torch.cat([t[0].flatten(1) for t in tr]), torch.cat([t[1] for t in tr]),
            torch.cat([t[2] for t in tr]), rows)

def accuracy(head, s):
    with torch.no_grad():
        return scores((head.eval()(s[0], s[1]).argmax(1) == s[2]).numpy(), s)

def train_heads(cfg, iters, sets, models):
    """Train `models` [(row, seed, band or None)] of one shape at once: per model, test scores,
    fit, {iteration: test accuracy}. Adam: elementwise, no interplay; SGD stayed at chance."""
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

def setting_file(setting, row=None, iters=None):
    """The name of a setting's figure or of a (setting, row, iters) record: plain, so no "/"."""
    name = setting.replace(" ", "").replace(",", "-")
    if row is not None:
        name += f"-{row.replace(NO_IMAGE, '-without-image-level')}-{iters}.json"
    return infra.plain_name(name, "a record's name")

def context_data(distractor, seed, per):
    """One seed's layouts of a condition and every module's taps (seed 0: rule v3's)."""
    modules, out = [table1_module(r, CONTEXT_CHANNELS) for r in TABLE1], {}
    for i, split in enumerate(("train", "test")):
        lay = context_layouts(4 * seed + 1 + i + 2 * distractor, per[split], distractor)
        out[split] = (lay, gather_taps(modules, lay, CONTEXT_CHANNELS, 7 + i + 2 * seed))
    return out

def context_experiment(cfg, seeds):
    """Every chosen setting, row and seed (docs/experiments.md): records, table, figures."""
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
        cols = bands(SCORED[distractor])
        while todo:
            config = dict(key, setting=setting, iters=iters)
            path = {row: os.path.join(out, setting_file(setting, row, iters)) for row in todo}
            recs.update({row: read_back(path[row], config, RECORD) for row in todo})
            pending = [row for row in todo if recs[row] is None]
            if pending:
                if cache.get("for") != distractor:  # layouts serve a condition's settings
                    cache = {"for": distractor, "data": [context_data(distractor, s, per)
                                                         for s in range(seeds)]}
                codes = context_codes(CONTEXT_CHANNELS, bg)
                sets = {(r, s): {split: twins(parts[r], lay, sigma, codes)
                                 for split, (lay, parts) in cache["data"][s].items()}
                        for r in TABLE1 for s in range(seeds)}
                for row, rec in train_rows(cfg, iters, sets, pending, seeds, cols).items():
                    recs[row] = dict(rec, config=config)
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
    for setting, *_ in chosen:
        context_figure(results[setting], setting, os.path.join(out, f"{setting_file(setting)}.png"))
    print(f"wrote {os.path.join(out, 'table.txt')} and one figure per setting in {out}")
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
        base, image_level = row.removesuffix(NO_IMAGE), head_shape(QueryHead(row, 0, 1))[1]
        probes = [{by: probe(sets[base, s]["train"], sets[base, s]["test"], by, image_level)
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
    out = {k: {by: np.array(v, float) for by, v in rec[k].items()} if RECORD[k] is dict else
           np.array(rec[k], float) for k in RECORD if k != "curve"}
    return dict(out, curve_iters=rec["curve"]["iters"], iters=rec["config"]["iters"],
                curve=np.array(rec["curve"]["trained"], float))

def band_mean(a, lo, hi):
    return a[..., lo:hi + 1].mean(-1)

def converged(r, cols, tolerance):
    """(held, largest change): every band moved by < `tolerance` over the run's last doubling."""
    its, curve = r["curve_iters"], r["curve"].mean(0)
    half = its.index(max(1, round(its[-1] / 2)))
    change = max(abs(band_mean(curve[-1], lo, hi) - band_mean(curve[half], lo, hi))
                 for lo, hi in cols)
    return bool(change < tolerance), change

def paired(a, b):
    """Per-seed a - b: (mean, seeds +, seeds -, spread, real), as context_table's legend says."""
    d, spread = a - b, max(np.ptp(a), np.ptp(b))
    real = len(d) > 1 and ((d > 0).all() or (d < 0).all()) and abs(d.mean()) > spread
    return d.mean(), int((d > 0).sum()), int((d < 0).sum()), spread, bool(real)

def context_table(cfg, setting, distractor, res, seeds):
    """One setting's table by band: the blocks below, curves, convergence, paired rows."""
    cols = bands(SCORED[distractor])
    spans = cols + ((1, SCORED[distractor]),)  # the bands, then all distances

    def m(a, lo, hi):  # a band's mean over seeds
        return f"{band_mean(a, lo, hi).mean():5.1f}"

    def se(a, lo, hi):  # ... and its standard error
        v = band_mean(a, lo, hi)
        s = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan  # one seed: none
        return f"{m(a, lo, hi)} ± {s:3.1f}"
    blocks = [  # (title, rows, the cell of a row's record r at band lo..hi)
        ("band probe | trained (mean ± s.e. over seeds)", res,
         lambda r, *b: f"{m(r['probe']['band'], *b)} | {se(r['trained'], *b)}"),
        ("probes (mean over seeds): per distance / per band / pooled", res,
         lambda r, *b: " / ".join(f"{band_mean(r['probe'][by], *b).mean():4.1f}" for by in PROBES)),
        ("trained, on its training samples | on the test samples (mean over seeds)", res,
         lambda r, *b: f"{m(r['trained_fit'], *b)} | {m(r['trained'], *b)}"),
        ("told the band (a module per band, trained on that band's samples only, as the band "
         "probe is fitted): band probe | test | training samples",
         {row + " /band": r for row, r in res.items() if len(r["trained_band"])},
         lambda r, *b: " | ".join(m(a, *b) for a in (r["probe"]["band"], r["trained_band"],
                                                     r["trained_band_fit"])))]
    if distractor:
        blocks.append(("conflict twins only (the distractor has the other class, so only the "
                       "nearer cue decides): band probe | trained", res, lambda r, *b:
                       f"{m(r['probe_conflict']['band'], *b)} | {se(r['trained_conflict'], *b)}"))
    lines = [f"{setting}: one query, a cue at distance d, 65x65x{CONTEXT_CHANNELS}, "
             f"{cfg['train_layouts']} training / {PER_DISTANCE['test']} test layouts x 2 twins "
             f"per distance, drawn per seed; accuracy (%), chance exactly 50; {seeds} seed(s), "
             f"batches of {cfg['batch_size']}, iterations per row: see convergence",
             f"{'module':15}" + "".join(f"{f'{lo}-{hi}':>22}" for lo, hi in spans)]
    for title, rows, cell in blocks:
        lines += [title] + [f"{row:15}" + "".join(f"{cell(r, *span):>22}" for span in spans)
                            for row, r in rows.items()]
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
        cells = [(lo, hi, *paired(*(band_mean(res[x]["trained"], lo, hi) for x in (a, b))))
                 for lo, hi in spans]
        lines.append(f"  {a + ' - ' + b:30} " + "  ".join(
            f"{lo}-{hi} {d:+5.1f} ({plus}+/{minus}-, {spread:3.1f}){'*' * real:1}"
            for lo, hi, d, plus, minus, spread, real in cells))
    return "\n".join(lines)

CONTEXT_COLOURS = ((120, 120, 120), (148, 103, 189), (31, 119, 180), (23, 190, 207),
                   (255, 127, 14), (188, 140, 60), (140, 86, 75), (214, 39, 40))  # TABLE1's order

def context_figure(results, setting, out, size=(300, 200)):
    """One setting, a panel per module of Table 1; results {row: record_arrays(...)}."""
    n, panels, (x0, y0, x1, y1) = CONTEXT_DISTANCES, [], (30, 20, size[0] - 14, size[1] - 20)
    xs = [x0 + (x1 - x0) * (d - 0.5) / n for d in range(n + 2)]  # bar edges for d = 1..n
    centres = [(xs[d] + xs[d + 1]) / 2 for d in range(1, n + 1)]

    def y(v):
        return v if math.isnan(v) else y1 - (y1 - y0) * (min(max(v, 40), 100) - 40) / 60
    for name, colour in zip(TABLE1, CONTEXT_COLOURS):
        pic = Image.new("RGB", size, (255, 255, 255))
        draw, coverage = ImageDraw.Draw(pic), ring_coverage(table1_module(name, 8))
        for d in range(1, n + 1):
            if coverage[d] > 0:
                draw.rectangle([xs[d], y1 - (y1 - y0) * coverage[d], xs[d + 1] - 1, y1],
                               fill=(222, 222, 222))
        for v in (50, 75, 100):
            draw.text((2, y(v) - 6), f"{v}", fill=(0, 0, 0))
            draw.line([x0, y(v), x1, y(v)], fill=(0, 0, 0) if v == 50 else (235, 235, 235))
        for d in (1, 10, 20, 30, 40):
            draw.text((centres[d - 1] - 4, y1 + 3), str(d), fill=(0, 0, 0))
        shown = [row for row in (name, name + NO_IMAGE) if row in results]
        draw.text((x0, 4), name + ": " + " / w/o ".join(
            f"{np.nanmean(results[row]['trained'].mean(0)[1:]):.1f}" for row in shown) + "%",
            fill=(0, 0, 0))
        for row, width, grey in zip(shown, (2, 1), ((0, 0, 0), (150, 150, 150))):
            for acc, fill, w in ((results[row]["probe"]["band"].mean(0), grey, 1),
                                 (results[row]["trained"].mean(0), colour, width)):
                for d in range(1, n):  # a line from d to d + 1; NaN (not scored) leaves a gap
                    if not (math.isnan(acc[d]) or math.isnan(acc[d + 1])):
                        draw.line([centres[d - 1], y(acc[d]), centres[d], y(acc[d + 1])],
                                  fill=fill, width=w)
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        panels.append(np.asarray(pic))
    rows = [hstack(panels[i:i + 4], 6) for i in range(0, len(panels), 4)]
    return infra.save_picture(out, hstack([caption(
        rows[0].shape[1], f"{setting}: accuracy (%) reading the class of a 3x3 cue at distance d "
        "(descriptors) from the query pixel of a 65x65 map; chance 50; blank: d not scored.",
        "Colour: the module trained, mean over seeds (thick); thin: the same without its "
        "image-level branch. Black / grey: the band probe, with / without the branch.",
        "Grey bars: share of the positions at distance d that its footprint reads (Fig. 3; "
        "full = all). Title: mean over d, trained with / without the branch.")] + rows, 6, 0))

# ==== 5. PICTURES OF THE DATA ===============================================================

def _with_legend(out, pictures, gap, names, palette):
    grid = hstack(pictures, gap)
    return infra.save_picture(out, np.concatenate([grid, legend(
        grid.shape[1], names, palette, range(len(names)))], 0))

def synthetic_samples_figure(out, n=6, size=128, seed=0):
    """n synthetic samples: images on top, labels below, and a legend."""
    ds = data.SyntheticContext(n, size, seed)
    return _with_legend(out, [np.concatenate([ds.load(i)[0], colorize(ds.load(i)[1], ds.palette)],
                                             0) for i in range(n)], 4, ds.classes, ds.palette)

CONTEXT_PALETTE = np.zeros((256, 3), dtype=np.uint8)
CONTEXT_PALETTE[:4] = [(245, 245, 245), (0, 0, 0), (200, 0, 0), (0, 60, 200)]

def context_samples_figure(out, cell=3, distances=(2, 12, 24), seed=0):
    """65x65 maps, the query circled, its cue at a few distances; then with a distractor."""
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
            pic = Image.fromarray(colorize(view, CONTEXT_PALETTE).repeat(cell, 0).repeat(cell, 1))
            qy, qx = lay["query"][d - 1] * cell + cell // 2
            ImageDraw.Draw(pic).ellipse([qx - 6, qy - 6, qx + 6, qy + 6], outline=(0, 0, 0))
            title = caption(pic.width + 2, f"d = {d}, {'distractor' if distractor else 'one cue'}")
            framed = np.pad(np.asarray(pic), ((1, 1), (1, 1), (0, 0)))  # the map's border
            maps.append(np.concatenate([title, framed], 0))
    return _with_legend(out, maps, 6, ("background", "query", "cue P", "cue Q"), CONTEXT_PALETTE)

# ==== 6. THE COMMAND LINE ===================================================================

FIGURES = {"footprints": footprints_figure, "synthetic": synthetic_samples_figure,
           "descriptors": context_samples_figure}
COMMANDS = {  # command: what it does (its line in --help)
    "table": "Table 1's modules on a 1x2048x65x65 map: utilization (Eq. 1), parameters, time",
    "figure": "draw a figure to a picture file",
    "bench": "speed as ratios measured side by side in one run",
    "ablation": "Table 1 in miniature: every module with seeds 0..SEEDS-1, then the effective "
                "receptive fields; any other flag is train.py's and applies to every run",
    "context": "Table 1's question at the paper's geometry: how well each module reads a cue "
               "1..40 descriptors from a pixel of a 65x65 map (docs/experiments.md)",
    "erf": "effective receptive fields of train.py checkpoints (a module's are averaged)"}
# (commands, flag, default (...: required), help, argparse extras); type: infra.SETTINGS or OWN
OWN = {"size": (1, 1024), "reps": (1, 1000), "n": (1, 10 ** 6), "erf_images": (1, 10 ** 5),
       "images": (1, 10 ** 5), "max_iters": (1, 10 ** 8), "train_layouts": (1, 10 ** 5),
       "tolerance": (0.001, 10)}
ARGS = (
    ("figure", "what", None, "footprints: Fig. 3 from the real modules; synthetic: samples of "
     "the built-in data; descriptors: samples of the context experiment", dict(choices=FIGURES)),
    ("bench", "what", None, "modules: the context modules and the whole model; training: SGD "
     "steps on --device; inference: 1 vs 6 scales + flip; loader: augmented samples/s",
     dict(choices=("modules", "training", "inference", "loader"))),
    ("erf", "checkpoints", None, "train.py checkpoints", dict(nargs="+", metavar="CHECKPOINT")),
    ("table", "--size", 65, "feature-map side h = w (65: a 513x513 image at OS 8)"),
    ("table bench", "--reps", 3, "timing repetitions, the best kept (bench: modules, inference)"),
    ("figure", "--out", None, "the picture to write (default <what>.png)"),
    ("erf", "--out", os.path.join("runs", "erf.png"), "the picture"),
    ("figure erf", "--force", False, "overwrite --out"),
    ("bench", "--voc", None, "loader: a VOC2012 folder (default: VOC-sized synthetic JPEGs)"),
    ("bench", "-n", 300, "loader: samples to time"),
    ("bench erf", "--device", None, infra.SETTINGS["device"].help),
    ("ablation", "--erf-images", 32, "validation images averaged in --out-dir/erf.png"),
    ("ablation context", "--seeds", ..., "seeds per row; a seed draws weights (context: data too)"),
    ("context", "--iters", 9600, "iterations of a row's first run"),
    ("context", "--max-iters", 38400, "a row not converged runs again, twice as long, up to this"),
    ("context", "--tolerance", 1.0, "converged: bands moved < this many points in a last doubling"),
    ("context", "--train-layouts", PER_DISTANCE["train"], "layouts per distance, each with a twin"),
    ("context", "--batch-size", 512, "query pixels per batch"),
    ("context", "--lr", 0.003, "Adam's"),
    ("context", "--context-channels", 16, "the modules' width"),
    ("context", "--settings", None, "run only these of %(choices)s (default all)",
     dict(nargs="+", choices=[setting_file(x[0]) for x in SETTINGS], metavar="SETTING")),
    ("context", "--out-dir", os.path.join("runs", "context-distance"),
     "records, table.txt and the figures; the same command again continues there"),
    ("erf", "--images", 32, "validation images per checkpoint"),
    ("erf", "--data-root", None, "the data the checkpoints were trained on, if not theirs"))

def _argument(parser, flag, default, text, extra=None):
    name = flag.lstrip("-").replace("-", "_")
    if name in infra.SETTINGS:
        infra.add_flags(parser, [name])
        action, allowed = parser._actions[-1], infra.allowed_text(name)
        action.default, action.required = default, default is ...
    else:
        lo, hi = OWN.get(name, (None, None))
        kind = type(default) if name in OWN else str
        allowed = name in OWN and f"{'a whole number' if kind is int else 'a number'} in {lo}..{hi}"
        action = parser.add_argument(flag, type=kind, default=default, **(extra or {}))
    action.help = text + (f" (default {default})" if default not in (None, False, ...) else "") \
        + (f" [{allowed}]" if allowed and allowed not in ("a flag", "text") else "")

def parse(argv=None):
    """(args, cfg) checked before any work; cfg: train.py's for ablation, context's, or None."""
    p = infra.Parser(description=__doc__)
    _argument(p, "--threads", 0, "torch CPU threads")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    subs = {c: sub.add_parser(c, help=t, description=t) for c, t in COMMANDS.items()}
    for where, *argument in ARGS:
        for name in where.split():
            _argument(subs[name], *argument)
    args, rest = p.parse_known_args(argv)
    if rest and args.cmd != "ablation":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    infra.check_settings(vars(args))  # --out too: a file name, as every command's
    for k, (lo, hi) in OWN.items():
        v = getattr(args, k, None)
        if v is not None and not lo <= v <= hi:  # NaN too
            raise BadInput(f"--{k.replace('_', '-')} {v}: must be "
                           f"{'a whole number' if type(v) is int else 'a number'} in {lo}..{hi}")
    if args.cmd == "context":
        if args.max_iters < args.iters:
            raise BadInput(f"--max-iters {args.max_iters}: must be at least --iters {args.iters}")
        return args, dict({k: getattr(args, k) for k in (
            "iters", "max_iters", "tolerance", "batch_size", "lr", "context_channels",
            "out_dir", "train_layouts")}, power=0.9,
            settings=args.settings or [setting_file(x[0]) for x in SETTINGS])
    if args.cmd == "ablation":  # its --out-dir's default first: one given later wins
        return args, train.parse_args(["--out-dir", os.path.join("runs", "ablation")] + rest,
                                      prog="experiments.py ablation")
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
        with infra.Claim("experiments.py figure", [("--out", out, infra.PICTURES)], (), args.force):
            return print("wrote", FIGURES[args.what](out))
    if args.cmd == "bench":
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
