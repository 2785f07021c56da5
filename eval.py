"""Evaluation. Part I, the paper: the metric (mean IoU over the whole dataset), and inference
at the image's own size, single scale (4.1) or multi-scale with flipping (4.2). Part II: the
command line (a dataset split, or images: `python eval.py --help`) and the pictures a run writes.
"""
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import infra
import vortex

PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

# =============================================================================================
# PART I: THE PAPER
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# The metric. confusion[t, p] counts pixels of true class t predicted as p, over all pixels of
# all images (not a mean of per-image scores). IoU_c = TP / (TP + FP + FN).

def confusion_update(confusion, pred, target, ignore=data.IGNORE):
    """Add one prediction/target pair (any shape, same shape) to a (C, C) int64 matrix."""
    c, target = confusion.shape[0], target.reshape(-1).to(torch.int64)
    keep = target != ignore
    pred, target = pred.reshape(-1)[keep].to(target.device, torch.int64), target[keep]
    bad = target[(target < 0) | (target >= c)]
    if bad.numel():
        raise infra.BadInput(f"target holds classes {bad.unique().tolist()} outside 0..{c - 1} "
                             f"and {ignore}")
    confusion += torch.bincount(target * c + pred, minlength=c * c).view(c, c).to(confusion)
    return confusion

def miou_from_confusion(confusion):
    """Per-class IoU (NaN for a class absent from both prediction and ground truth: it has no
    IoU, and is left out of the mean, never counted as 0 or 1), mIoU, pixel accuracy and mean
    class accuracy (over classes present in the ground truth)."""
    conf = confusion.double()
    tp, gt, pr = conf.diag(), conf.sum(1), conf.sum(0)
    iou = torch.where(gt + pr - tp > 0, tp / (gt + pr - tp).clamp(min=1), math.nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), math.nan)
    return {"miou": iou.nanmean().item(), "iou": iou.tolist(),  # NaN where nothing counts
            "pixel_acc": (tp.sum() / conf.sum()).item(), "mean_acc": acc.nanmean().item(),
            "confusion": confusion.tolist()}


# ---------------------------------------------------------------------------------------------
# Inference at the image's own size, any size; optionally multi-scale and flipped.

@torch.no_grad()
def predict_probs(model, image, scales=(1.0,), flip=False):
    """Class probabilities (C, H, W) of a normalised image (3, H, W), DeepLab v3's way (paper
    4.2): at each scale s (and mirrored, in the same batch) the logits of the s H x s W image
    are resized ONCE, from feature resolution straight to H x W, then softmaxed; all scales and
    flips averaged. One scale 1.0 and no flip is exactly softmax(model(image))."""
    x = image.unsqueeze(0) if image.dim() == 3 else image
    h, w = x.shape[-2:]
    scores = getattr(model, "low_res_logits", model)  # any per-pixel model works too
    total = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))),
                                              mode="bilinear", align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        logits = F.interpolate(scores(batch), size=(h, w), mode="bilinear", align_corners=False)
        probs = logits.float().softmax(1)
        total = total + (probs[:1] + probs[1:].flip(-1) if flip else probs)
    return (total / (len(scales) * (2 if flip else 1)))[0]

def predict(model, image, scales=(1.0,), flip=False):
    """Per-pixel class indices (H, W) of a normalised image (3, H, W)."""
    return predict_probs(model, image, scales, flip).argmax(0)

def evaluate(model, dataset, scales=(1.0,), flip=False, device=None, save_dir=None, log=print,
             workers=0, amp=None):
    """Full-image evaluation: miou_from_confusion's dict. `workers` processes decode images while
    the model runs, under autocast with `amp` ('bf16'/'fp16'; probabilities averaged in fp32).
    Distributed, each rank takes every world_size-th image, so each counts once (a
    DistributedSampler would pad with repeats), and the matrices are all-reduced."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
    was_training = model.training
    model.eval()
    c = len(dataset.classes)
    confusion = torch.zeros(c, c, dtype=torch.int64, device=device)
    indices = range(len(dataset))
    if dist.is_available() and dist.is_initialized():
        indices = indices[dist.get_rank()::dist.get_world_size()]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices),
                                         batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    t0 = time.time()
    for n, (i, (image, label)) in enumerate(zip(indices, loader), 1):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = predict(model, image.to(device, non_blocking=True), scales, flip)
        confusion_update(confusion, pred, label.to(device, non_blocking=True))
        if save_dir:
            name = dataset.ids[i] if isinstance(dataset.ids[i], str) else f"{i:05d}"  # synthetic
            save_prediction(os.path.join(save_dir, name), image, pred.cpu(), dataset.palette,
                            list(dataset.classes), label)
        infra.progress("eval", n, len(indices), t0, log)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
    model.train(was_training)
    if confusion.sum() == 0:
        raise infra.BadInput(f"nothing to measure: the {len(dataset)} images have no labelled "
                            f"pixel (every pixel is {data.IGNORE}, ignored)")
    return miou_from_confusion(confusion.cpu())

# =============================================================================================
# PART II: ENGINEERING THE PAPER DOES NOT DESCRIBE
# =============================================================================================

def parser():
    """The command line: evaluate a split, or predict images (every flag passes infra's gates)."""
    p = infra.Parser(description="Evaluate a train.py checkpoint: full-image mIoU "
                                 "(paper 4.1/4.2), or predict images.")
    infra.add_flags(p, ("checkpoint", "dataset", "data_root", "split", "scales"), required=(
        "checkpoint",), split="list to evaluate (default: the checkpoint's validation split, "
                              "else val; val2017 for coco)")
    p.add_argument("--ms", action="store_true",
                   help=f"the paper's 4.2 scales {PAPER_SCALES} (overrides --scales)")
    p.add_argument("--flip", action="store_true", help="also average the mirrored image")
    infra.add_flags(p, ("context", "depth", "save_dir", "json", "image", "out", "force",
                        "workers", "amp", "device"),  # context, depth: the checkpoint's
                    image=f"predict this image, or every image in this folder, instead (images "
                          f"over {data.MAX_IMAGE_PIXELS // 10 ** 6} megapixels are refused)",
                    out="with --image: the prediction PNG, or for a folder of images a folder "
                        "(default: runs/predictions/<name>.png or runs/predictions/<folder>/)")
    return p

def main(argv=None):
    args = parser().parse_args(argv)
    vortex.keep_freed_memory()  # large tensors reuse memory instead of page-faulting it in
    args.scales = PAPER_SCALES if args.ms else tuple(args.scales or [1.0])
    args.workers = 2 if args.workers is None else args.workers
    infra.check_settings(vars(args))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.image:
        raise infra.BadInput("--image runs in one process: use torchrun only to split "
                             "the evaluation of a dataset over GPUs")
    device = infra.setup_distributed(args.device, fixed_sizes=False)[2]
    try:
        ck = infra.read_checkpoint(args.checkpoint)
        model = infra.model_from_checkpoint(ck, args.checkpoint, context=args.context,
                                            depth=args.depth).to(device).eval()
        return (predict_images if args.image else evaluate_checkpoint)(model, ck, args, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

def evaluate_checkpoint(model, ck, args, device):
    """mIoU of the checkpoint on a dataset split; table on screen, numbers in a JSON file."""
    classes, ta, scales, say = ck["classes"], ck["train_args"], args.scales, infra.rank0_print
    name = args.dataset or ck["dataset"]
    # the checkpoint's own split and root, else the defaults (val2017: prepare-coco's name)
    same = name == ck["dataset"]
    split = args.split or (ta["val_split"] if same else None) or (
        "val2017" if name == "coco" else "val")
    root = args.data_root or (ta["data_root"] if same else None)
    # a file per protocol: single-scale and multi-scale + flip numbers live side by side
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                    f"eval_{name}_{split}_s{'-'.join(f'{v:g}' for v in scales)}"
                                    f"{'_flip' if args.flip else ''}.json")
    with infra.Claim("eval.py", [("--json", out, (".json",))] + (
            [("--save-dir", args.save_dir, "folder")] if args.save_dir else []),
            [("--checkpoint", args.checkpoint), ("--data-root", root)], args.force, rank0=True):
        if args.save_dir:
            infra.on_rank0(infra.existing, [args.save_dir], args.force,
                           "pass --force to write into it")
        ds = data.get_dataset(name, split, root, train=False, **ck["data_args"])
        if len(ds.classes) != len(classes):
            raise infra.BadInput(f"{args.checkpoint} predicts {len(classes)} classes ("
                                 f"{', '.join(classes[:6])}{', ...' * (len(classes) > 6)}), but "
                                 f"{name} has {len(ds.classes)}: evaluate it on the dataset it "
                                 f"was trained for")
        result = evaluate(model, ds, scales, args.flip, device, save_dir=args.save_dir, log=say,
                          workers=args.workers, amp=args.amp)
        say(f"{name} {split} ({len(ds)} images), scales {scales}, flip {args.flip}:")
        say(format_table(result, classes, getattr(ds, "context_classes", ())))
        result.update(dataset=name, split=split, scales=list(scales), flip=args.flip,
                      classes=list(classes), checkpoint=args.checkpoint)
        infra.on_rank0(infra.write_json, out, result)
    say("numbers written to", out + (f"; pictures in {args.save_dir}" if args.save_dir else ""))
    return result

def predict_images(model, ck, args, device, log=print):
    """--image (one image or a folder's): <out>/<stem>.png (palette PNG), <stem>_panel.png each."""
    classes, palette, source, out = ck["classes"], np.asarray(ck["palette"]), args.image, args.out
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source)
                       if f.lower().endswith(infra.PICTURES))
        if not files:
            raise infra.MissingInput(f"--image {source}: no image files "
                                     f"({', '.join(infra.PICTURES)})")
        folder = out or os.path.join("runs", "predictions",
                                     os.path.basename(os.path.normpath(source)))
        names = [os.path.splitext(os.path.basename(f)) for f in files]
        bare = [s for s, _ in names]
        # img.bmp and img.tif would both become img.png: such names keep their extension
        stems = [os.path.join(folder, s + ("_" + x[1:].lower() if bare.count(s) > 1 else ""))
                 for s, x in names]
    elif not os.path.isfile(source):
        raise infra.MissingInput(f"--image {source}: no such file or folder")
    elif out and os.path.splitext(out)[1].lower() != ".png":
        raise infra.BadInput(f"--out {out}: the prediction is a PNG; give a name like pred.png")
    else:
        files, stems = [source], [os.path.splitext(out)[0] if out else os.path.join(
            "runs", "predictions", os.path.splitext(os.path.basename(source))[0])]
    outputs = [s + t for s in stems for t in (".png", "_panel.png")]
    twice = sorted({o for o in outputs if outputs.count(o) > 1})
    if twice:
        raise infra.BadInput(f"--image {source}: two outputs would share the name {twice[0]}; "
                             f"rename one of the images")
    claimed = [("--out", os.path.dirname(stems[0]), "folder")] if os.path.isdir(source) else \
        [("--out", o, (".png",)) for o in outputs]
    hint = "pass --force to overwrite, or choose another --out"
    with infra.Claim("eval.py", claimed, [("--checkpoint", args.checkpoint), ("--image", source)],
                     args.force, hint):
        infra.existing(outputs, args.force, hint)
        if ck["dataset"] == "synthetic":
            log(f"note: this checkpoint was trained on the built-in synthetic data; it knows "
                f"only {', '.join(classes)}, so a photo comes out in those classes")
        written, t0 = [], time.time()
        for n, (f, stem) in enumerate(zip(files, stems), 1):
            image = data.normalize(data.read_image(f, orientation=True)).to(device)
            pred = predict(model, image, args.scales, args.flip).cpu()
            written += save_prediction(stem, image.cpu(), pred, palette, classes)
            if len(files) == 1:
                log(f"{f}: classes found: {', '.join(classes[c] for c in pred.unique().tolist())}")
            else:
                infra.progress("predict", n, len(files), t0, log)
    log("wrote " + ", ".join(written) if len(written) <= 4 else
        f"wrote {len(written)} files in {os.path.dirname(stems[0])} "
        f"(<name>.png: class indices; <name>_panel.png: image | prediction)")
    return written


# ---------------------------------------------------------------------------------------------
# Pictures a run writes (Pillow only, atomically), with primitives experiments.py's figures use.

def format_table(result, classes, highlight=()):
    lines = [f"{'class':14} {'IoU':>7}"] + [
        f"{name:14} {'—' if math.isnan(v) else f'{100 * v:6.2f}':>7}"
        f"{'  (context-dependent)' if c in highlight else ''}"
        for c, (name, v) in enumerate(zip(classes, result["iou"]))]
    return "\n".join(lines + [f"{'mIoU':14} {100 * result['miou']:7.2f}",
                              f"pixel accuracy {100 * result['pixel_acc']:.2f}   "
                              f"mean class accuracy {100 * result['mean_acc']:.2f}"])

def colorize(label, palette):
    return np.asarray(palette, dtype=np.uint8)[np.asarray(label, dtype=np.int64) & 255]

def hstack(parts, gap, axis=1):
    """RGB uint8 pictures side by side (axis=0: one above another), `gap` px of white apart."""
    size, across = max(p.shape[1 - axis] for p in parts), 1 - axis
    parts = [np.pad(p, [(0, size - p.shape[a]) if a == across else (0, 0) for a in range(3)],
                    constant_values=255) for p in parts]
    white = np.full((size, gap, 3) if axis else (gap, size, 3), 255, np.uint8)
    return np.concatenate([x for p in parts for x in (p, white)][:-1], axis)

def legend(width, names, palette, indices):
    """A white strip `width` px wide: a swatch and the name of each class in `indices`, wrapped."""
    items, x, y = [], 4, 4
    for i in indices:
        name = names[i] if i < len(names) else ("ignored" if i == data.IGNORE else str(i))
        if x + 28 + 6 * len(name) > width and x > 4:  # wrap, unless the line is empty
            x, y = 4, y + 16
        items.append((x, y, int(i), name))
        x += 28 + 6 * len(name)
    strip = Image.new("RGB", (width, y + 16), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, y, i, name in items:
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(v) for v in palette[i]),
                       outline=(0, 0, 0))
        draw.text((x + 14, y), name, fill=(0, 0, 0))
    return np.asarray(strip)

def prediction_panels(path, rows, classes, palette):
    """A PNG at `path`: image | (ground truth |) prediction for each (image, prediction, label or
    None) of `rows`, under column titles and above a legend of the classes shown."""
    panels, present = [], set()
    for image, pred, label in rows:
        shown = [m for m in (label, pred) if m is not None]
        img = (image.permute(1, 2, 0).numpy() * data.STD + data.MEAN).clip(0, 1)
        panels.append(hstack([(img * 255).round().astype(np.uint8)] +
                             [colorize(m.numpy(), palette) for m in shown], 4))
        present |= {c for m in shown for c in m.unique().tolist()}
    width = max(p.shape[1] for p in panels)
    head = Image.new("RGB", (width, 16), (255, 255, 255))
    titles = ["image"] + ["ground truth"] * (rows[0][2] is not None) + ["prediction"]
    for k, title in enumerate(titles):
        ImageDraw.Draw(head).text((k * (rows[0][0].shape[-1] + 4) + 2, 2), title, fill=(0, 0, 0))
    return infra.save_picture(path, np.concatenate([np.asarray(head), hstack(
        panels + [legend(width, classes, palette, sorted(present))], 4, axis=0)], 0))

def save_prediction(stem, image, pred, palette, classes, label=None):
    """stem.png (the class indices as a palette PNG) and stem_panel.png (prediction_panels)."""
    data.save_mask(stem + ".png", pred.numpy().astype(np.uint8), palette)
    return stem + ".png", prediction_panels(stem + "_panel.png", [(image, pred, label)],
                                            classes, palette)

def prediction_picture(model, dataset, device, path, n=4):
    """image | ground truth | prediction for n validation images (prediction_panels). Where the
    dataset names classes told apart only by context (synthetic bike and fish), the images are
    taken in turn from each, so that the picture shows all of them."""
    ctx, order = getattr(dataset, "context_classes", ()), []
    if ctx:
        buckets = {c: [] for c in ctx}
        for i in range(min(64, len(dataset))):
            counts = np.bincount(dataset.load(i)[1].ravel(), minlength=256)
            buckets[max(ctx, key=lambda c: counts[c])].append(i)
        order = [i for group in zip(*buckets.values()) for i in group]
    picks = (order + [i for i in range(len(dataset)) if i not in order])[:n]
    model.eval()
    rows = [(image, predict(model, image.to(device)).cpu(), label)
            for image, label in (dataset[i] for i in picks)]
    return prediction_panels(path, rows, list(dataset.classes), dataset.palette)

def log_figure(log_path, out, size=(560, 320)):
    """Loss and learning rate against iterations from log.jsonl, both axes from 0 with their
    values (a curve's height means what its numbers say): `out`, or None under two lines."""
    rows = infra.read_log(log_path) if os.path.exists(log_path) else []
    if len(rows) < 2:
        return None
    it = np.array([r["iter"] for r in rows], float)
    pic = Image.new("RGB", size, (255, 255, 255))
    draw, (x0, y0, x1, y1) = ImageDraw.Draw(pic), (58, 28, size[0] - 64, size[1] - 34)
    span = max(1, it[-1] - it[0])
    for f in (0, 0.25, 0.5, 0.75, 1):  # grid, iteration ticks
        draw.line([x0, y1 - (y1 - y0) * f, x1, y1 - (y1 - y0) * f], fill=(232, 232, 232))
        a = it[0] + f * (it[-1] - it[0])
        draw.text((x0 + (x1 - x0) * (a - it[0]) / span - 12, y1 + 4), f"{a:.0f}", fill=(0, 0, 0))
    for key, colour, tx in (("loss", (31, 119, 180), 4), ("lr", (214, 39, 40), x1 + 6)):
        v = np.array([r[key] for r in rows], float)
        top = float(np.nanmax(v)) * 1.05 or 1.0
        draw.line(list(zip(x0 + (x1 - x0) * (it - it[0]) / span, y1 - (y1 - y0) * v / top)),
                  fill=colour, width=2)
        for f in (0, 0.5, 1):
            draw.text((tx, y1 - (y1 - y0) * f - 6), f"{f * top:.3g}", fill=colour)
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text((x0, 4), "training loss (blue, left axis) and learning rate (red, right axis), "
                       "both from 0", fill=(0, 0, 0))
    draw.text(((x0 + x1) // 2 - 24, y1 + 18), "iteration", fill=(0, 0, 0))
    return infra.save_picture(out, np.asarray(pic))

if __name__ == "__main__":
    infra.end(lambda: infra.cli(main) and 0)
