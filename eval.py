"""Evaluation: full-image mean IoU from a confusion matrix, multi-scale + flip inference.

Part I, the paper: the metric (mean IoU over the whole dataset), and inference at the image's
own size, single scale (4.1, ablations) or scales 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 with
left-right flipping (4.2, DeepLab v3's protocol), 21 classes, VOC 2012 val.
Part II: checkpoints, the command line, the measurements of the experiments (accuracy by
distance, effective receptive fields), and every picture the project draws.

  python eval.py --checkpoint runs/synthetic-vortex/checkpoint.pt            # its own val set
  python eval.py --checkpoint ck.pt --dataset voc --data-root VOC2012 --ms --flip --save-dir out
  python eval.py --checkpoint ck.pt --image photo.jpg          # -> runs/predictions/photo.png
  python eval.py --checkpoint ck.pt --image photos/            # every image of a folder
  python eval.py --erf runs/ablation/{ASPP,Vortex}-seed0/checkpoint.pt --out runs/erf.png

Nothing is overwritten without --force; known-bad input is one line and exit code 2.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import vortex
from vortex import DeepLabV3

PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

# =============================================================================================
# PART I: THE PAPER
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# The metric. confusion[t, p] counts pixels of true class t predicted as p, over all pixels of
# all images (not a mean of per-image scores). IoU_c = TP / (TP + FP + FN).
# ---------------------------------------------------------------------------------------------

def confusion_update(confusion, pred, target, ignore=data.IGNORE):
    """Add one prediction/target pair (any shape, same shape) to a (C, C) int64 matrix."""
    c = confusion.shape[0]
    pred, target = pred.reshape(-1).to(torch.int64), target.reshape(-1).to(torch.int64)
    keep = target != ignore
    if ((target[keep] < 0) | (target[keep] >= c)).any():
        bad = target[keep][(target[keep] < 0) | (target[keep] >= c)].unique().tolist()
        raise data.BadInput(f"target holds classes {bad} outside 0..{c - 1} and {ignore}")
    idx = target[keep] * c + pred[keep].to(target.device)
    confusion += torch.bincount(idx, minlength=c * c).reshape(c, c).to(confusion.device)
    return confusion


def miou_from_confusion(confusion):
    """Per-class IoU (NaN for a class absent from both prediction and ground truth: it has no
    IoU, and is left out of the mean, never counted as 0 or 1), mIoU, pixel accuracy and mean
    class accuracy (over classes present in the ground truth)."""
    conf = confusion.double()
    tp = conf.diag()
    gt, pr = conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
    present = ~iou.isnan()
    total = conf.sum()
    return {"miou": iou[present].mean().item() if present.any() else math.nan,
            "iou": iou.tolist(),
            "pixel_acc": (tp.sum() / total).item() if total > 0 else math.nan,
            "mean_acc": acc[~acc.isnan()].mean().item() if (~acc.isnan()).any() else math.nan,
            "confusion": confusion.tolist()}


# ---------------------------------------------------------------------------------------------
# Inference at the image's own size, any size; optionally multi-scale and flipped.
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def predict_probs(model, image, scales=(1.0,), flip=False):
    """Class probabilities (C, H, W) of a normalised image (3, H, W), DeepLab v3's way (paper
    4.2): for every scale s (and the mirror image, in the same batch) the image is resized to
    s H x s W, its logits at feature resolution are resized ONCE, straight to H x W, then the
    softmax is taken, and the probabilities of all scales and flips are averaged. With one scale
    1.0 and no flip this is exactly softmax(model(image))."""
    x = image.unsqueeze(0) if image.dim() == 3 else image
    h, w = x.shape[-2:]
    scores = getattr(model, "low_res_logits", model)  # any per-pixel model works too
    total = None
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))),
                                              mode="bilinear", align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        logits = F.interpolate(scores(batch), size=(h, w), mode="bilinear", align_corners=False)
        probs = logits.float().softmax(1)
        if flip:
            probs = probs[:1] + probs[1:].flip(-1)
        total = probs if total is None else total + probs
    return (total / (len(scales) * (2 if flip else 1)))[0]


def predict(model, image, scales=(1.0,), flip=False):
    """Per-pixel class indices (H, W) of a normalised image (3, H, W)."""
    return predict_probs(model, image, scales, flip).argmax(0)


def _shard(n):
    """This rank's image indices: rank, rank + world, ... Every image is seen exactly once
    (a DistributedSampler would pad with repeats, which would be counted twice)."""
    if dist.is_available() and dist.is_initialized():
        return range(dist.get_rank(), n, dist.get_world_size())
    return range(n)


def evaluate(model, dataset, scales=(1.0,), flip=False, device=None, num_classes=None,
             save_dir=None, log=print, palette=None, workers=0, amp=None):
    """Full-image evaluation; returns miou_from_confusion's dict. Images are decoded by
    `workers` loader processes while the model runs; `amp` ('bf16'/'fp16') runs the model under
    autocast (the probabilities are averaged in fp32). In a distributed run each rank takes
    every world_size-th image and the matrices are summed with all_reduce."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    num_classes = num_classes or len(dataset.classes)
    palette = palette if palette is not None else dataset.palette
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    indices = list(_shard(len(dataset)))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices),
                                         batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    t0 = time.time()
    for n, (i, (image, label)) in enumerate(zip(indices, loader), 1):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = predict(model, image.to(device, non_blocking=True), scales, flip)
        confusion_update(confusion, pred, label.to(device, non_blocking=True))
        if save_dir:
            name = getattr(dataset, "ids", None)
            name = name[i] if name else f"{i:05d}"
            save_prediction(os.path.join(save_dir, name), image, pred.cpu(), palette, label,
                            list(dataset.classes))
        data.progress("eval", n, len(indices), t0, log)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
    model.train(was_training)
    if confusion.sum() == 0:
        raise data.BadInput(f"nothing to measure: the {len(dataset)} images have no labelled "
                            f"pixel (every pixel is {data.IGNORE}, ignored)")
    return miou_from_confusion(confusion.cpu())

# =============================================================================================
# PART II: ENGINEERING THE PAPER DOES NOT DESCRIBE
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# Checkpoints (written by train.py).
# ---------------------------------------------------------------------------------------------

def load_checkpoint(path):
    """A train.py checkpoint (dict of tensors and plain values), read by vortex's one reader of
    weight files (weights_only=True; non-finite weights refused, naming the tensor)."""
    ck = vortex.read_weights_file(path)
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise data.BadInput(f"{path} is not a train.py checkpoint (no 'model' and 'config' entries)")
    return ck


def model_from_checkpoint(ck, path="checkpoint", **expected):
    """Build the checkpoint's model; a flag that contradicts its architecture is an error."""
    cfg = dict(ck["config"])
    wrong = [f"{k}: checkpoint has {cfg.get(k)!r}, flags say {v!r}" for k, v in expected.items()
             if v is not None and k in cfg and cfg[k] != v]
    if wrong:
        raise data.BadInput(f"{path} does not match the requested architecture: " + "; ".join(wrong))
    cfg["multi_grid"] = None if cfg.get("multi_grid") is None else tuple(cfg["multi_grid"])
    model = DeepLabV3(**cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
        raise data.BadInput(f"{path}: its weights do not fit the model its config describes "
                            f"({'; '.join(lines)[:300]})") from None
    return model


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

def bench(reps=2):
    """Seconds per 500x375 image, ResNet-101 OS 8 (untrained weights: the cost does not depend on
    them), single scale vs the paper's 6 scales + flip, against the theoretical cost ratio
    2 * sum(s^2) = 17.4 (pixels processed; the model's cost is nearly linear in pixels)."""
    torch.manual_seed(0)
    model = DeepLabV3(21, 101, "vortex").eval()
    image = torch.randn(3, 375, 500)
    t = vortex.best_times({"single": lambda: predict(model, image),
                           "multi": lambda: predict(model, image, PAPER_SCALES, True)}, reps, 0)
    theory = 2 * sum(s * s for s in PAPER_SCALES)
    print(f"ResNet-101 OS 8 + Vortex, 500x375 image, CPU {torch.get_num_threads()} threads, "
          f"best of {reps}:")
    print(f"  single scale {t['single']:.2f} s/image; 6 scales + flip {t['multi']:.2f} s/image; "
          f"ratio {t['multi'] / t['single']:.1f} (theory {theory:.1f})")


IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_SPLIT = {"coco": "val2017"}  # prepare-coco names splits after the COCO files


def setup_distributed(device_arg, deterministic=False, fixed_sizes=True):
    """(rank, world size, device) of this process; under torchrun (WORLD_SIZE > 1) the process
    group is started from its environment, one process per GPU (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_arg, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # fixed 513 crops: let cuDNN time its kernels once and keep the fastest (not for images
        # of many sizes: it would time them again for each). They are not bitwise reproducible
        # from run to run; --deterministic trades speed for that.
        torch.backends.cudnn.benchmark = fixed_sizes and not deterministic
        torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def pick_device(device_arg, local_rank=0):
    """--device: None (CUDA when visible, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg != "cpu" and not (device_arg == "cuda" or device_arg.startswith("cuda:")):
        raise data.BadInput(f"--device {device_arg}: use cpu, cuda or cuda:N")
    if device_arg == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise data.BadInput(f"--device {device_arg}: no CUDA device is visible "
                            f"(torch.cuda.is_available() is False); use --device cpu")
    index = int(device_arg.split(":")[1]) if device_arg[5:].isdigit() else local_rank
    if index >= torch.cuda.device_count():
        raise data.BadInput(f"--device {device_arg}: only {torch.cuda.device_count()} CUDA "
                            f"device(s)")
    return torch.device("cuda", index)


def result_name(dataset, split, scales, flip):
    """eval_<dataset>_<split>_s<scales>[_flip].json: a file per protocol, so that the
    single-scale and the multi-scale + flip numbers of one checkpoint live side by side."""
    s = "-".join(f"{v:g}" for v in scales)
    return f"eval_{dataset}_{split}_s{s}{'_flip' if flip else ''}.json"


def predict_images(model, ck, source, out, scales, flip, device, force, log=print):
    """Predict one image or every image of a folder: <out>/<stem>.png (class indices, palette)
    and <out>/<stem>_panel.png each. Returns the paths written."""
    classes = ck.get("classes") or list(data.VOC_CLASSES)
    palette = np.asarray(ck.get("palette", data.VOC_PALETTE))
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source)
                       if f.lower().endswith(IMAGE_TYPES))
        if not files:
            raise data.MissingInput(f"--image {source}: no image files ({', '.join(IMAGE_TYPES)})")
        folder = out or os.path.join("runs", "predictions", os.path.basename(
            os.path.normpath(source)))
        names = [os.path.splitext(os.path.basename(f)) for f in files]
        clash = {s for s, _ in names if sum(t == s for t, _ in names) > 1}
        # img.bmp and img.tif would both become img.png: such names keep their extension
        stems = [os.path.join(folder, s + ("_" + x[1:].lower() if s in clash else ""))
                 for s, x in names]
    else:
        if not os.path.isfile(source):
            raise data.MissingInput(f"--image {source}: no such file or folder")
        if out and not out.lower().endswith(".png"):
            raise data.BadInput(f"--out {out}: the prediction is a PNG; give a name ending in .png")
        files = [source]
        stems = [os.path.splitext(out)[0] if out else os.path.join(
            "runs", "predictions", os.path.splitext(os.path.basename(source))[0])]
    outputs = [s + t for s in stems for t in (".png", "_panel.png")]
    twice = sorted({o for o in outputs if outputs.count(o) > 1})
    if twice:
        raise data.BadInput(f"--image {source}: two outputs would share the name {twice[0]}; "
                            f"rename one of the images")
    data.refuse_existing(outputs, force)
    if ck.get("dataset") == "synthetic":
        log(f"note: this checkpoint was trained on the built-in synthetic data; it knows only "
            f"{', '.join(classes)}, so a photo comes out in those classes")
    written, t0 = [], time.time()
    for n, (f, stem) in enumerate(zip(files, stems), 1):
        image = data.normalize(data.read_image(f, orientation=True)).to(device)
        pred = predict(model, image, scales, flip).cpu()
        written += save_prediction(stem, image.cpu(), pred, palette, classes=classes)
        if len(files) == 1:
            log(f"{f}: classes found: {', '.join(classes[c] for c in pred.unique().tolist())}")
        else:
            data.progress("predict", n, len(files), t0, log)
    log("wrote " + ", ".join(written) if len(written) <= 4 else
        f"wrote {len(written)} files in {os.path.dirname(stems[0])} "
        f"(<name>.png: class indices; <name>_panel.png: image | prediction)")
    return written
def parser():
    """The command line (--help explains every flag)."""
    p = argparse.ArgumentParser(description="Evaluate a train.py checkpoint: full-image mIoU "
                                            "(paper 4.1/4.2), or predict images.")
    p.add_argument("--checkpoint", help="a checkpoint written by train.py")
    p.add_argument("--erf", nargs="+", metavar="CHECKPOINT", default=None,
                   help="instead: draw the effective receptive fields of these checkpoints "
                        "(gradient of the centre pixel's logit w.r.t. the image, mean over "
                        "validation images; checkpoints of one module are averaged) to --out "
                        "(default runs/erf.png)")
    p.add_argument("--erf-images", type=int, default=32,
                   help="with --erf: validation images per checkpoint (default 32)")
    p.add_argument("--bench", action="store_true",
                   help="time single-scale vs 6-scale + flip inference of ResNet-101 on a "
                        "500x375 image (needs no checkpoint)")
    p.add_argument("--dataset", choices=["synthetic", "voc", "voc_aug", "coco"], default=None,
                   help="dataset to evaluate on (default: the one the checkpoint was trained on)")
    p.add_argument("--data-root", default=None,
                   help="VOC2012 folder (voc, voc_aug) or the prepare-coco output folder (coco); "
                        "default: the one the checkpoint was trained with")
    p.add_argument("--split", default=None,
                   help="list to evaluate (default: the checkpoint's validation split, else val; "
                        "val2017 for coco)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="inference scales (paper 4.1 ablations: 1.0)")
    p.add_argument("--ms", action="store_true",
                   help=f"the paper's 4.2 scales {PAPER_SCALES} (overrides --scales)")
    p.add_argument("--flip", action="store_true", help="also average the mirrored image")
    p.add_argument("--context", default=None, help="expected context module (checked)")
    p.add_argument("--depth", type=int, default=None, help="expected ResNet depth (checked)")
    p.add_argument("--save-dir", default=None,
                   help="write palette prediction PNGs and image|truth|prediction panels here")
    p.add_argument("--json", default=None,
                   help="write all numbers here (default: beside the checkpoint, "
                        "eval_<dataset>_<split>_s<scales>[_flip].json)")
    p.add_argument("--image", default=None,
                   help="predict this image, or every image in this folder, instead (images "
                        f"over {data.MAX_IMAGE_PIXELS // 10 ** 6} megapixels are refused: "
                        "resize them first)")
    p.add_argument("--out", default=None,
                   help="with --image: the prediction PNG (one image; default "
                        "runs/predictions/<name>.png) or folder (a folder of images; default "
                        "runs/predictions/<folder>/); with --erf: the figure")
    p.add_argument("--force", action="store_true", help="overwrite files that exist")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (0: none)")
    p.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], default=None,
                   help="run the model under autocast (probabilities averaged in fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when "
                                                  "available)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    vortex.keep_freed_memory()  # large tensors reuse memory instead of page-faulting it in
    if args.bench:
        return bench()
    scales = PAPER_SCALES if args.ms else tuple(args.scales)
    if not all(math.isfinite(s) and 0 < s <= 8 for s in scales):
        raise data.BadInput(f"--scales {' '.join(map(str, scales))}: each must be a number in "
                            f"(0, 8] (paper: 0.5 ... 1.75)")
    if args.workers < 0 or args.erf_images < 1:
        raise data.BadInput("--workers must be >= 0 and --erf-images >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (args.image or args.erf):
        raise data.BadInput("--image and --erf run in one process: use torchrun only to split "
                            "the evaluation of a dataset over GPUs")
    rank, _, device = setup_distributed(args.device, fixed_sizes=False)
    try:
        return run_command(p, args, scales, device, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_command(p, args, scales, device, rank):
    """The action main() was asked for: --erf, --image, or a dataset's evaluation."""
    if args.erf:
        out = args.out or os.path.join("runs", "erf.png")
        data.refuse_existing([out], args.force)
        return erf_figure(args.erf, out, args.erf_images, device, args.data_root)
    if not args.checkpoint:
        p.error("--checkpoint is required (unless --bench or --erf)")
    ck = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ck, args.checkpoint, context=args.context,
                                  depth=args.depth).to(device).eval()
    if args.image:
        return predict_images(model, ck, args.image, args.out, scales, args.flip, device,
                              args.force)
    return evaluate_checkpoint(model, ck, args, scales, device, rank)


def evaluate_checkpoint(model, ck, args, scales, device, rank=0):
    """mIoU of the checkpoint on a dataset split; table on screen, numbers in a JSON file."""
    classes = ck.get("classes") or list(data.VOC_CLASSES)
    palette = np.asarray(ck.get("palette", data.VOC_PALETTE))
    ta = ck.get("train_args", {})
    name = args.dataset or ck.get("dataset", "synthetic")
    same = name == ck.get("dataset")
    split = args.split or (ta.get("val_split") if same else None) or DEFAULT_SPLIT.get(name, "val")
    root = args.data_root or (ta.get("data_root") if same else None)
    ds = data.get_dataset(name, split, root, train=False, **ck.get("data_args", {}))
    if len(ds.classes) != len(classes):
        raise data.BadInput(f"{args.checkpoint} predicts {len(classes)} classes "
                            f"({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}), "
                            f"but {name} has {len(ds.classes)}: evaluate it on the dataset it "
                            f"was trained for")
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                    result_name(name, split, scales, args.flip))
    data.refuse_existing([out] + ([args.save_dir] if args.save_dir else []), args.force)
    if dist.is_initialized():
        dist.barrier()  # every rank has checked the outputs before any rank writes one
    say = print if rank == 0 else (lambda *a: None)
    result = evaluate(model, ds, scales, args.flip, device, len(classes), log=say,
                      save_dir=args.save_dir, palette=palette, workers=args.workers,
                      amp=args.amp)
    say(f"{name} {split} ({len(ds)} images), scales {scales}, flip {args.flip}:")
    say(format_table(result, classes, getattr(ds, "context_classes", ())))
    result.update(dataset=name, split=split, scales=list(scales), flip=args.flip,
                  classes=list(classes), checkpoint=args.checkpoint)
    if rank == 0:
        data.write_json(out, result)
    say("numbers written to", out + (f"; pictures in {args.save_dir}" if args.save_dir else ""))
    return result




# ---------------------------------------------------------------------------------------------
# Measurements of the experiments (train.py --ablation).
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Effective receptive field (paper section 1: "Zhou et al. [2014] showed that the effective
# receptive field is much smaller than the theoretical threshold"; measured as in Luo et al.
# 2016). For each image, g = |d logit_c(centre) / d image| summed over RGB, with c the class the
# model predicts at the centre pixel, normalised so that sum(g) = 1: where the decision at the
# centre comes from. Maps of different sizes are added on one canvas with their centres aligned.
# ---------------------------------------------------------------------------------------------

def centred_mean(maps):
    """Mean of 2-D maps of any sizes, each placed so that its centre (h // 2, w // 2) lands on
    the centre of a canvas as large as the largest."""
    h, w = max(m.shape[0] for m in maps), max(m.shape[1] for m in maps)
    canvas = torch.zeros(h, w, dtype=torch.float64)
    for m in maps:
        top, left = h // 2 - m.shape[0] // 2, w // 2 - m.shape[1] // 2
        canvas[top:top + m.shape[0], left:left + m.shape[1]] += m
    return canvas / len(maps)


def effective_receptive_field(model, dataset, num_images=32, device=None, log=None):
    """Mean normalised input-gradient map (H, W) of the centre pixel's predicted-class logit
    over the first `num_images` images of `dataset` (eval mode: images are independent).
    Progress goes to `log` (None: nowhere)."""
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
            data.progress("erf", i + 1, n, t0, log)
    return centred_mean(maps)


def _distances(h, w):
    """Distance of every pixel of an h x w map to its centre (h // 2, w // 2), flattened."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.hypot((yy - h // 2).double(), (xx - w // 2).double()).flatten()


def mass_within(erf, radii):
    """Fraction of the map's mass within distance r of the centre, for each r in `radii`."""
    d, m = _distances(*erf.shape), erf.flatten().double()
    return [(m[d <= r].sum() / m.sum()).item() for r in radii]


def mass_radius(erf, fraction=0.9):
    """Smallest r such that the pixels within distance r of the centre (h // 2, w // 2) hold
    `fraction` of the map's total mass."""
    d = _distances(*erf.shape)
    order = d.argsort(stable=True)
    cum = erf.flatten()[order].double().cumsum(0)
    # against cum[-1], not erf.sum(): fraction 1 then finds the last pixel with any mass exactly
    k = int(torch.searchsorted(cum, (fraction * cum[-1]).reshape(1)).clamp(max=len(d) - 1))
    return d[order][k].item()


# ---------------------------------------------------------------------------------------------
# Pictures: everything the project draws (Pillow only), written atomically.
# ---------------------------------------------------------------------------------------------

def format_table(result, classes, highlight=()):
    lines = [f"{'class':14} {'IoU':>7}"]
    for c, (name, v) in enumerate(zip(classes, result["iou"])):
        mark = "  (context-dependent)" if c in highlight else ""
        lines.append(f"{name:14} {'—' if math.isnan(v) else f'{100 * v:6.2f}':>7}{mark}")
    lines.append(f"{'mIoU':14} {100 * result['miou']:7.2f}")
    lines.append(f"pixel accuracy {100 * result['pixel_acc']:.2f}   "
                 f"mean class accuracy {100 * result['mean_acc']:.2f}")
    return "\n".join(lines)


def denormalize(image):
    """Normalised (3, H, W) tensor -> uint8 (H, W, 3)."""
    img = image.permute(1, 2, 0).numpy() * data.STD + data.MEAN
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def panel(image, pred, palette, label=None):
    """image | ground truth | prediction, side by side, 4 px white gaps."""
    parts = [denormalize(image)]
    if label is not None:
        parts.append(colorize(label.numpy(), palette))
    parts.append(colorize(pred.numpy(), palette))
    return hstack(parts, 4)


def titled(rows, widths, classes, palette, present):
    """Panels stacked (4 px apart) under column titles, above a legend of the classes present.
    `widths`: the width of each column of the first row, for placing the titles."""
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    names = ["image", "ground truth", "prediction"] if len(widths) == 3 else ["image",
                                                                             "prediction"]
    head = Image.new("RGB", (width, 16), (255, 255, 255))
    x = 0
    for name, w in zip(names, widths):
        ImageDraw.Draw(head).text((x + 2, 2), name, fill=(0, 0, 0))
        x += w + 4
    return np.concatenate([np.asarray(head)] + rows +
                          [legend(width, classes, palette, sorted(present))], 0)


def hstack(parts, gap):
    """RGB uint8 pictures side by side, `gap` px of white between them, shorter ones padded
    with white at the bottom."""
    height = max(p.shape[0] for p in parts)
    parts = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255)
             for p in parts]
    white = np.full((height, gap, 3), 255, np.uint8)
    return np.concatenate([x for p in parts for x in (p, white)][:-1], 1)


def save_prediction(stem, image, pred, palette, label=None, classes=None):
    """stem.png: the prediction as a palette PNG (values = class indices); stem_panel.png:
    image | (ground truth |) prediction with titles and a legend. Returns both paths."""
    data.save_mask(stem + ".png", pred.numpy().astype(np.uint8), palette)
    present = set(pred.unique().tolist()) | (set(label.unique().tolist())
                                             if label is not None else set())
    names = classes or [str(i) for i in range(256)]
    pic = titled([panel(image, pred, palette, label)], [image.shape[-1]] * (3 if label is not None
                                                                          else 2),
                 names, palette, present)
    data.atomic_save(stem + "_panel.png", lambda f: Image.fromarray(pic).save(f, format="PNG"))
    return stem + ".png", stem + "_panel.png"


def erf_figure(checkpoints, out, num_images=32, device="cpu", data_root=None, cell=2,
               log=print, progress=print):
    """Effective receptive fields of trained models side by side, written to PNG `out`.
    Checkpoints of the same module (e.g. several seeds) are averaged into one panel. Colours on
    a square-root scale (so that the tails show); the white and blue circles hold 50% and 90%
    of the mass; a last panel plots the mass within radius r for every module and for a flat
    map. Results go to `log`, progress to `progress`. Returns {module: (r50, r90)} in pixels."""
    groups = {}
    for path in checkpoints:
        ck = load_checkpoint(path)
        model = model_from_checkpoint(ck, path).to(device)
        ta = ck.get("train_args", {})  # the checkpoint's own validation images
        ds = data.get_dataset(ck.get("dataset", "synthetic"), ta.get("val_split", "val"),
                              data_root or ta.get("data_root"), train=False,
                              seed=ta.get("seed", 0), **ck.get("data_args", {}))
        erf = effective_receptive_field(model, ds, num_images, device, progress)
        groups.setdefault(model.context.name, []).append(erf)
    panels, radii, curves = [], {}, []
    for name, maps in groups.items():
        erf = centred_mean(maps)
        h, w = erf.shape
        steps = np.linspace(0, math.hypot(h // 2, w // 2), 64)
        if not curves:  # the reference: the same mass spread evenly over the whole image
            flat = torch.ones(h, w)
            curves.append(("flat", mass_within(flat, steps), steps[-1]))
            log(f"{'flat':8} (the same mass spread evenly over a {h}x{w} image): 50% within "
                f"{mass_radius(flat, 0.5):5.1f} px, 90% within {mass_radius(flat, 0.9):5.1f} px")
        curves.append((name, mass_within(erf, steps), steps[-1]))
        r50, r90 = mass_radius(erf, 0.5), mass_radius(erf, 0.9)
        radii[name] = (r50, r90)
        log(f"{name:8} ({len(maps)} model(s)): 50% of the gradient within {r50:5.1f} px, 90% "
            f"within {r90:5.1f} px of the centre")
        pic = Image.fromarray(heat((erf / erf.max()).sqrt().numpy())).resize((w * cell, h * cell),
                                                                   Image.NEAREST)
        draw = ImageDraw.Draw(pic)
        c = ((w // 2 + 0.5) * cell, (h // 2 + 0.5) * cell)
        for radius, colour in ((r50, (255, 255, 255)), (r90, ERF_CIRCLE_90)):
            r = radius * cell
            draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline=colour, width=2)
        title = Image.new("RGB", (pic.width, 14), (255, 255, 255))
        ImageDraw.Draw(title).text((2, 1), f"{name}: 50% / 90% within {r50:.0f} / {r90:.0f} px",
                                   fill=(0, 0, 0))
        panels.append(np.concatenate([np.asarray(title), np.asarray(pic)], 0))
    height, width = panels[-1].shape[:2]
    panels += [_colour_bar(height), _curves_panel(curves, width, height)]
    figure = hstack(panels, 8)
    data.atomic_save(out, lambda f: Image.fromarray(figure).save(f, format="PNG"))
    log(f"wrote {out}")
    return radii


ERF_CIRCLE_90 = (0, 230, 255)


def heat(v):
    """Values in [0, 1] -> uint8 RGB, black-red-yellow-white."""
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)


def _colour_bar(height, width=96):
    """The ERF panels' colour scale: colour against the fraction of the peak gradient (square
    root scale, so 0.25 of the peak sits half way up), and what the two circles mean."""
    pic = Image.new("RGB", (width, height), (255, 255, 255))
    top, bottom = 18, height - 50
    ramp = np.linspace(1, 0, bottom - top)[:, None].repeat(14, 1)
    pic.paste(Image.fromarray(heat(ramp)), (4, top))
    draw = ImageDraw.Draw(pic)
    draw.rectangle([4, top, 18, bottom - 1], outline=(0, 0, 0))
    for p in (1, 0.5, 0):  # bar position p shows the value p^2 of the peak
        draw.text((22, top + (1 - p) * (bottom - top - 1) - 6), f"{p * p:g}", fill=(0, 0, 0))
    draw.text((2, 2), "of the peak", fill=(0, 0, 0))
    draw.ellipse([4, bottom + 6, 16, bottom + 18], outline=(0, 0, 0), width=2)
    draw.text((20, bottom + 6), "50% mass", fill=(0, 0, 0))
    draw.ellipse([4, bottom + 26, 16, bottom + 38], outline=ERF_CIRCLE_90, width=2)
    draw.text((20, bottom + 26), "90% mass", fill=(0, 0, 0))
    return np.asarray(pic)


def _curves_panel(curves, width, height, margin=26):
    """Plot of mass-within-radius curves [(name, fractions at evenly spaced radii, max radius)]:
    a model whose curve rises early looks near; the flat map's curve is the reference."""
    pic = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(pic)
    x0, y0, x1, y1 = margin, 18, width - 8, height - margin
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    colours = [(110, 110, 110), (40, 40, 40), (31, 119, 180), (214, 39, 40), (44, 160, 44),
               (148, 103, 189)]
    for i, (name, ys, rmax) in enumerate(curves):
        pts = [(x0 + (x1 - x0) * j / (len(ys) - 1), y1 - (y1 - y0) * y) for j, y in enumerate(ys)]
        draw.line(pts, fill=colours[i % len(colours)], width=2)
        draw.text((x0 + 6, y0 + 4 + 12 * i), name, fill=colours[i % len(colours)])
    draw.text((2, 1), "fraction of the mass within r", fill=(0, 0, 0))
    draw.text((x0 - 8, y1 + 4), "r = 0", fill=(0, 0, 0))
    draw.text((x1 - 40, y1 + 4), f"{curves[0][2]:.0f} px", fill=(0, 0, 0))
    draw.text((4, y0), "1", fill=(0, 0, 0))
    draw.text((4, y1 - 10), "0", fill=(0, 0, 0))
    return np.asarray(pic)


CONTEXT_COLOURS = ((120, 120, 120), (148, 103, 189), (31, 119, 180), (23, 190, 207),
                   (255, 127, 14), (188, 140, 60), (140, 86, 75), (214, 39, 40))


def _context_panel(title, probe, trained, coverage, colour, size=(300, 200), lo=40):
    """One module: accuracy (%) against distance 1..40, the probe (black), the trained module
    (colour, mean +- standard error over seeds, shaded) over grey bars for the share of the
    positions at each distance that its footprint reads (full height = all), chance dashed."""
    w, h = size
    pic = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(pic)
    x0, y0, x1, y1 = 30, 20, w - 8, h - 20
    n = len(probe) - 1
    xs = [x0 + (x1 - x0) * (d - 0.5) / n for d in range(n + 2)]  # bar edges for d = 1..n
    centres = [(xs[d] + xs[d + 1]) / 2 for d in range(1, n + 1)]

    def y(v):  # accuracy in % -> pixel row
        return y1 - (y1 - y0) * (min(max(v, lo), 100) - lo) / (100 - lo)
    for d in range(1, n + 1):
        if coverage[d] > 0:
            draw.rectangle([xs[d], y1 - (y1 - y0) * coverage[d], xs[d + 1] - 1, y1],
                           fill=(222, 222, 222))
    for v in (50, 75, 100):
        draw.text((2, y(v) - 6), f"{v}", fill=(0, 0, 0))
        if v != 50:
            draw.line([x0, y(v), x1, y(v)], fill=(235, 235, 235))
    for x in range(x0, x1, 8):  # chance, dashed
        draw.line([x, y(50), x + 4, y(50)], fill=(0, 0, 0))
    mean = trained.mean(0)
    se = trained.std(0, ddof=1) / np.sqrt(len(trained)) if len(trained) > 1 else 0 * mean
    band = ([(c, y(m + s)) for c, m, s in zip(centres, mean[1:], se[1:])] +
            [(c, y(m - s)) for c, m, s in reversed(list(zip(centres, mean[1:], se[1:])))])
    draw.polygon(band, fill=tuple(255 - (255 - c) // 3 for c in colour))
    draw.line([(c, y(m)) for c, m in zip(centres, mean[1:])], fill=colour, width=2)
    draw.line([(c, y(p)) for c, p in zip(centres, probe[1:])], fill=(0, 0, 0), width=1)
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    for d in (1, 10, 20, 30, 40):
        draw.text((centres[d - 1] - 4, y1 + 3), str(d), fill=(0, 0, 0))
    draw.text((x0, 4), title, fill=(0, 0, 0))
    return np.asarray(pic)


def _heat_map(title, rows, values, cell=(6, 14), left=80):
    """Modules x distance 1..40, accuracy 50% (black) .. 100% (white)."""
    n = len(next(iter(values))) - 1
    pic = Image.new("RGB", (left + n * cell[0] + 4, 18 + len(rows) * cell[1] + 16),
                    (255, 255, 255))
    v = np.clip((np.array([a[1:] for a in values]) - 50) / 50, 0, 1)
    block = np.kron(heat(v), np.ones((cell[1], cell[0], 1), np.uint8))
    pic.paste(Image.fromarray(block), (left, 18))
    draw = ImageDraw.Draw(pic)
    draw.text((left, 3), title, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        draw.text((2, 18 + i * cell[1] + 1), row, fill=(0, 0, 0))
    for d in (1, 10, 20, 30, 40):
        draw.text((left + (d - 1) * cell[0], 18 + len(rows) * cell[1] + 2), str(d),
                  fill=(0, 0, 0))
    return np.asarray(pic)


def context_figure(results, coverage, setting, out):
    """The context experiment's figure for one setting (train.py --context-experiment): a panel
    per module (see _context_panel), then heat maps of the probe and of the trained modules.
    results: {module: {"probe": (41,), "trained": (seeds, 41)}} accuracies in %."""
    panels = []
    for (name, r), colour in zip(results.items(), CONTEXT_COLOURS):
        panels.append(_context_panel(f"{name}: probe {r['probe'][1:].mean():.1f}, trained "
                                     f"{r['trained'][:, 1:].mean():.1f}%", r["probe"],
                                     r["trained"], coverage[name], colour))
    rows = [hstack(panels[i:i + 4], 6) for i in range(0, len(panels), 4)]
    names = list(results)
    maps = hstack([_heat_map("probe (best linear readout of the taps)", names,
                             [results[m]["probe"] for m in names]),
                   _heat_map("trained module (mean over seeds)", names,
                             [results[m]["trained"].mean(0) for m in names]),
                   _colour_bar_50(18 + len(names) * 14 + 16)], 12)
    width = max(r.shape[1] for r in rows + [maps])
    rows = [np.pad(r, ((0, 6), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows + [maps]]
    head = Image.new("RGB", (width, 46), (255, 255, 255))
    draw = ImageDraw.Draw(head)
    draw.text((4, 2), f"{setting}: accuracy (%) reading the class of a 3x3 cue at distance d "
                      f"(descriptors) from the query pixel of a 65x65 map; chance 50 (dashed).",
              fill=(0, 0, 0))
    draw.text((4, 16), "Black: the probe, the best linear readout of what the module reads. "
                       "Colour: the module trained, mean +- s.e. over seeds (shaded).",
              fill=(0, 0, 0))
    draw.text((4, 30), "Grey bars: share of the positions at distance d that the module's "
                       "footprint reads (Fig. 3; full height = all).", fill=(0, 0, 0))
    figure = np.concatenate([np.asarray(head)] + rows, 0)
    data.atomic_save(out, lambda f: Image.fromarray(figure).save(f, format="PNG"))
    return out


def _colour_bar_50(height, width=60):
    """The heat maps' scale: accuracy 50% (black) to 100% (white)."""
    pic = Image.new("RGB", (width, height), (255, 255, 255))
    top, bottom = 18, height - 16
    pic.paste(Image.fromarray(heat(np.linspace(1, 0, bottom - top)[:, None].repeat(12, 1))),
              (2, top))
    draw = ImageDraw.Draw(pic)
    draw.text((18, top - 4), "100%", fill=(0, 0, 0))
    draw.text((18, (top + bottom) // 2 - 6), "75%", fill=(0, 0, 0))
    draw.text((18, bottom - 10), "50%", fill=(0, 0, 0))
    return np.asarray(pic)


def colorize(label, palette):
    return np.asarray(palette, dtype=np.uint8)[np.asarray(label, dtype=np.int64) & 255]


def legend(width, names, palette, indices):
    """A white strip `width` px wide: a colour swatch and the name of each class in `indices`,
    wrapped onto as many lines as needed."""
    entries = [(int(i), names[i] if i < len(names) else ("ignored" if i == data.IGNORE else str(i)))
               for i in indices]
    lines, x = [[]], 4
    for i, name in entries:
        w = 14 + 6 * len(name) + 14
        if x + w > width and lines[-1]:
            lines.append([])
            x = 4
        lines[-1].append((x, i, name))
        x += w
    strip = Image.new("RGB", (width, 16 * len(lines) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        for x, i, name in line:
            y = 4 + 16 * row
            draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(v) for v in palette[i]),
                           outline=(0, 0, 0))
            draw.text((x + 14, y), name, fill=(0, 0, 0))
    return np.asarray(strip)


def curves_figure(log_path, out, size=(560, 320)):
    """Loss and learning rate against iterations, from log.jsonl, as a PNG (Pillow only). Both
    axes start at 0 and carry their values, so a curve's height means what its numbers say.
    Returns `out`, or None when the log has fewer than two lines (nothing is drawn)."""
    if not os.path.exists(log_path):
        return None
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) < 2:
        return None
    it = np.array([r["iter"] for r in rows], float)
    pic = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(pic)
    x0, y0, x1, y1 = 58, 28, size[0] - 64, size[1] - 34

    def x(a):
        return x0 + (x1 - x0) * (a - it[0]) / max(1, it[-1] - it[0])
    for f in (0, 0.25, 0.5, 0.75, 1):  # grid, iteration ticks
        draw.line([x0, y1 - (y1 - y0) * f, x1, y1 - (y1 - y0) * f], fill=(232, 232, 232))
        a = it[0] + f * (it[-1] - it[0])
        draw.text((x(a) - 12, y1 + 4), f"{a:.0f}", fill=(0, 0, 0))
    for key, colour, tx in (("loss", (31, 119, 180), 4), ("lr", (214, 39, 40), x1 + 6)):
        v = np.array([r[key] for r in rows], float)
        top = float(np.nanmax(v)) * 1.05 or 1.0
        draw.line([(x(a), y1 - (y1 - y0) * b / top) for a, b in zip(it, v)], fill=colour,
                  width=2)
        for f in (0, 0.5, 1):
            draw.text((tx, y1 - (y1 - y0) * f - 6), f"{f * top:.3g}", fill=colour)
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text((x0, 4), "training loss (blue, left axis) and learning rate (red, right axis), "
                       "both from 0", fill=(0, 0, 0))
    draw.text(((x0 + x1) // 2 - 24, y1 + 18), "iteration", fill=(0, 0, 0))
    data.atomic_save(out, lambda f: pic.save(f, "PNG"))
    return out


def pick_examples(dataset, n=4, look=64):
    """n image indices for a picture: where the dataset names classes told apart only by context
    (synthetic bike and fish), taken in turn from each, so that the picture shows all of them."""
    ctx = getattr(dataset, "context_classes", ())
    if not ctx:
        return list(range(min(n, len(dataset))))
    buckets = {c: [] for c in ctx}
    for i in range(min(look, len(dataset))):
        counts = np.bincount(dataset.load(i)[1].ravel(), minlength=256)
        buckets[max(ctx, key=lambda c: counts[c])].append(i)
    order = [i for group in zip(*buckets.values()) for i in group]
    return (order + [i for i in range(len(dataset)) if i not in order])[:n]


def prediction_picture(model, dataset, device, path, n=4):
    """image | ground truth | prediction for n validation images, with column titles and a
    legend of the classes shown."""
    model.eval()
    rows, present = [], set()
    for i in pick_examples(dataset, n):
        image, label = dataset[i]
        pred = predict(model, image.to(device)).cpu()
        rows.append(panel(image, pred, dataset.palette, label))
        present |= set(label.unique().tolist()) | set(pred.unique().tolist())
    pic = titled(rows, [dataset[0][0].shape[-1]] * 3, list(dataset.classes),
                            dataset.palette, present)
    data.atomic_save(path, lambda f: Image.fromarray(pic).save(f, "PNG"))
    return path


BRANCH_COLOURS = ((200, 30, 30), (240, 150, 20), (40, 110, 200), (60, 160, 60))


def footprints_figure(path, size=65, cell=4):
    """The paper's Fig. 3 drawn from the real modules: for ASPP, Module A(5) and Module B, the
    input positions of a size x size map that feed the centre output (autograd, see
    measured_utilization), coloured by the branch that reads them (the finest drawn on top),
    white where nothing reads, the output pixel black; a legend under each panel. Written
    atomically."""
    mods = [vortex.table1_module(row, 8) for row in ("ASPP", "A(5)", "Vortex")]
    panels = []
    for m in mods:
        ratio, used = vortex.measured_utilization(m, size, size, return_map=True)
        pic = np.full((size, size, 3), 255, np.uint8)
        widest_first = sorted(range(len(m.pools)), key=lambda i: -m.pools[i] - m.dilations[i])
        for i in widest_first:
            fp = vortex.footprint(m.pools[i:i + 1], m.kernels[i:i + 1], m.dilations[i:i + 1])
            r, c = fp.shape[0] // 2, size // 2  # footprint centred on the centre pixel
            a, b = max(0, c - r), min(size, c + r + 1)
            region = np.zeros((size, size), bool)
            region[a:b, a:b] = fp[a - (c - r):b - (c - r), a - (c - r):b - (c - r)]
            pic[region & used] = BRANCH_COLOURS[i]
        pic[size // 2, size // 2] = 0
        pic = np.kron(pic, np.ones((cell, cell, 1), np.uint8))
        pic = np.pad(pic, ((1, 1), (1, 1), (0, 0)))  # the map's border, black, outside it
        text = Image.new("RGB", (pic.shape[1], 14 + 14 * len(m.pools)), (255, 255, 255))
        draw = ImageDraw.Draw(text)
        draw.text((2, 1), f"{m.name}: r = {ratio:.4f} of the {size}x{size} map", fill=(0, 0, 0))
        for i, (k, n, d) in enumerate(zip(m.pools, m.kernels, m.dilations)):
            y = 15 + 14 * i
            draw.rectangle([4, y + 1, 14, y + 11], fill=BRANCH_COLOURS[i], outline=(0, 0, 0))
            draw.text((20, y), f"{k}x{k} pool, {n}x{n} conv" + (f", rate {d}" if n > 1 else ""),
                      fill=(0, 0, 0))
        panels.append(np.concatenate([pic, np.asarray(text)], 0))
    out = hstack(panels, 8)
    data.atomic_save(path, lambda f: Image.fromarray(out).save(f, "PNG"))
    return path


def synthetic_samples_figure(out, n=6, size=128, seed=0):
    """A picture of n synthetic samples: images on top, labels below, and a legend."""
    ds = data.SyntheticContext(n, size, seed)
    cols = [np.concatenate(ds.load(i)[:1] + (colorize(ds.load(i)[1], ds.palette),), 0)
            for i in range(n)]
    grid = np.concatenate([np.pad(c, ((0, 0), (2, 2), (0, 0)), constant_values=255)
                           for c in cols], 1)
    pic = np.concatenate([grid, legend(grid.shape[1], ds.classes, ds.palette,
                                       range(len(ds.classes)))], 0)
    data.atomic_save(out, lambda f: Image.fromarray(pic).save(f, format="PNG"))
    return out


CONTEXT_VIEW = ("background", "query", "cue P", "cue Q")
CONTEXT_PALETTE = np.zeros((256, 3), dtype=np.uint8)
CONTEXT_PALETTE[:4] = [(245, 245, 245), (0, 0, 0), (200, 0, 0), (0, 60, 200)]


def context_samples_figure(out, cell=3, distances=(2, 12, 30), seed=0):
    """Samples of the context experiment (train.py --context-experiment): 65x65 maps with the
    query pixel and its cue at a few distances, then with a distractor of the other class."""
    maps = []
    for distractor in (False, True):
        for d in distances:
            lay = data.context_layouts(seed, 1, distractor)
            i = d - 1
            view = np.zeros((data.CONTEXT_SIZE, data.CONTEXT_SIZE), np.uint8)
            for part, kind in (("cue", 2), ("distractor", 3)):
                cy, cx = lay[part][i]
                if cy > -1000:
                    view[cy - 1:cy + 2, cx - 1:cx + 2] = kind
            view[tuple(lay["query"][i])] = 1
            pic = Image.fromarray(np.kron(colorize(view, CONTEXT_PALETTE),
                                          np.ones((cell, cell, 1), np.uint8)))
            qy, qx = lay["query"][i] * cell + cell // 2
            ImageDraw.Draw(pic).ellipse([qx - 6, qy - 6, qx + 6, qy + 6], outline=(0, 0, 0))
            title = Image.new("RGB", (pic.width + 2, 14), (255, 255, 255))
            ImageDraw.Draw(title).text((2, 1), f"d = {d}" + (", distractor" if distractor
                                                              else ", one cue"), fill=(0, 0, 0))
            framed = np.pad(np.asarray(pic), ((1, 1), (1, 1), (0, 0)))  # the map's border
            maps.append(np.concatenate([np.asarray(title), framed], 0))
    grid = hstack(maps, 6)
    pic = np.concatenate([grid, legend(grid.shape[1], CONTEXT_VIEW, CONTEXT_PALETTE,
                                       range(len(CONTEXT_VIEW)))], 0)
    data.atomic_save(out, lambda f: Image.fromarray(pic).save(f, format="PNG"))
    return out

if __name__ == "__main__":
    data.cli(main)
