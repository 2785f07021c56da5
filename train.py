"""Training: one command on a CPU (built-in synthetic data) and on a GPU box (the paper's recipe).

  python train.py                                   # synthetic data, small ResNet, CPU, minutes
  torchrun --nproc_per_node=8 train.py --dataset voc_aug --data-root VOCdevkit/VOC2012 \\
      --pretrained resnet101-63fe2227.pth           # paper 4.1: ResNet-101, OS 8, Vortex, ...

Paper 4.1: poly learning rate (base 0.007, power 0.9, every iteration), 30k iterations, batch 16,
random scale 0.5-2.0 and flips, 513 crops, multi-grid (1, 2, 4), batch norm updated and
synchronised across GPUs. Paper 4.2: COCO (200k iterations) -> train_aug -> trainval.
The loop is plain PyTorch: DistributedDataParallel started by torchrun, our own SyncBatchNorm,
atomic checkpoints that resume exactly, SIGINT/SIGTERM save and stop.
"""
import argparse
import json
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import eval as evaluation
from vortex import CONTEXTS, DeepLabV3, load_backbone_weights

# Each dataset carries its preset; explicit flags override it (see --help).
PRESETS = {
    "synthetic": dict(depth=18, base_channels=16, context_channels=64, output_stride=8,
                      crop=112, scale=(0.75, 1.5), batch_size=8, iters=1500, lr=0.02,
                      split="train", val_split="val", num_images=1024, val_images=128,
                      image_size=128, log_every=50, save_every=500, workers=1),
    "voc_aug": dict(depth=101, base_channels=64, context_channels=256, output_stride=8,
                    crop=513, scale=(0.5, 2.0), batch_size=16, iters=30000, lr=0.007,
                    split="train_aug", val_split="val", log_every=20, save_every=2000),
    "voc": dict(depth=101, base_channels=64, context_channels=256, output_stride=8, crop=513,
                scale=(0.5, 2.0), batch_size=16, iters=30000, lr=0.007, split="train",
                val_split="val", log_every=20, save_every=2000),
    "coco": dict(depth=101, base_channels=64, context_channels=256, output_stride=8, crop=513,
                 scale=(0.5, 2.0), batch_size=16, iters=200000, lr=0.007, split="train2017",
                 val_split="val2017", log_every=20, save_every=5000),
}
COMMON = dict(context="vortex", pool_k=5, multi_grid=(1, 2, 4), momentum=0.9, weight_decay=1e-4,
              power=0.9, seed=0, workers=4, num_images=None, val_images=None, image_size=None)


# ---------------------------------------------------------------------------------------------
# Synchronised batch norm from primitives (paper 4.1, "Batch Normalization": with 2-4 images per
# GPU, per-GPU statistics are too noisy; the statistics must be those of the whole batch).
#
# For channel c over the N = sum of all ranks' n_r values x (all images, all pixels):
#   mean  mu = (sum_r S_r) / N,             S_r = sum of rank r's x          (all_reduce 1)
#   var   s2 = (sum_r Q_r) / N,             Q_r = sum of rank r's (x - mu)^2 (all_reduce 2)
# Two reductions instead of one of (sum x, sum x^2): E[x^2] - E[x]^2 cancels catastrophically
# when |mean| >> std (float32 keeps ~7 digits), while sum (x - mu)^2 sums non-negative terms.
# Output: y = gamma * xhat + beta, xhat = (x - mu) / sqrt(s2 + eps); gamma and beta are plain
# autograd, only xhat needs a hand-written backward. With g = dL/dxhat (L = every rank's loss),
#   dL/dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(s2 + eps),
# means over all N values: one more all_reduce of (sum g, sum g * xhat). The running variance
# uses the unbiased s2 * N / (N - 1), as nn.BatchNorm2d does. Uneven per-rank batches are fine:
# every sum carries its own count.
# ---------------------------------------------------------------------------------------------

class _SyncNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps, group):
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        sums = torch.cat([count, x.sum(dim=(0, 2, 3)).double()])
        dist.all_reduce(sums, group=group)
        n, mean = sums[0], (sums[1:] / sums[0]).to(x.dtype)
        centred = x - mean[None, :, None, None]
        sq = centred.square().sum(dim=(0, 2, 3)).double()
        dist.all_reduce(sq, group=group)
        var = (sq / n).to(x.dtype)
        invstd = torch.rsqrt(var + eps)
        xhat = centred * invstd[None, :, None, None]
        ctx.save_for_backward(xhat, invstd)
        ctx.group = group
        ctx.n = n
        return xhat, mean, var, n.to(x.dtype)

    @staticmethod
    def backward(ctx, g, _gm, _gv, _gn):
        xhat, invstd = ctx.saved_tensors
        sums = torch.cat([g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))]).double()
        dist.all_reduce(sums, group=ctx.group)
        c = xhat.shape[1]
        mean_g, mean_gx = (sums[:c] / ctx.n).to(g.dtype), (sums[c:] / ctx.n).to(g.dtype)
        dx = (g - mean_g[None, :, None, None] - xhat * mean_gx[None, :, None, None])
        return dx * invstd[None, :, None, None], None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole distributed batch (works on
    CPU/gloo and CUDA/NCCL). Not distributed, or in eval mode: exactly nn.BatchNorm2d."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        xhat, mean, var, n = _SyncNormalize.apply(x, self.eps, None)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else \
                    1.0 / self.num_batches_tracked.item()
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * n / (n - 1).clamp(min=1), alpha=m)
        y = xhat * self.weight[None, :, None, None] + self.bias[None, :, None, None] \
            if self.affine else xhat
        return y.to(x.dtype)


def convert_sync_batchnorm(module):
    """Replace every nn.BatchNorm2d in `module` (in place) by a SyncBatchNorm2d with the same
    weights and running statistics. Returns the module."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm2d):
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            like = next(t for t in list(child.parameters()) + list(child.buffers())
                        if t.is_floating_point())
            sync.to(device=like.device, dtype=like.dtype)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


# ---------------------------------------------------------------------------------------------
# The learning-rate policy (paper 4.1): lr = base * (1 - it / max_it) ^ power, every iteration.
# ---------------------------------------------------------------------------------------------

def poly_lr(base, it, max_it, power=0.9):
    return base * (1 - it / max_it) ** power


# ---------------------------------------------------------------------------------------------
# Distributed set-up, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).
# Multi-node works through torchrun's own rendezvous; nothing here is home-made.
# ---------------------------------------------------------------------------------------------

def setup_distributed(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def rank0_print(*a, **k):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


# ---------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and numbers (torch.load(weights_only=True) reads them),
# written to a temp file and renamed, so a crash mid-write never destroys the last good one.
# ---------------------------------------------------------------------------------------------

def save_checkpoint(path, model, optimizer, scaler, it, epoch, batch_in_epoch, cfg, dataset):
    ck = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
          "scaler": scaler.state_dict() if scaler is not None else {},
          "iteration": it, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
          "rng_cpu": torch.get_rng_state(),
          "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0),
          "config": model.config, "train_args": cfg, "dataset": cfg["dataset"],
          "classes": list(dataset.classes), "palette": np.asarray(dataset.palette).tolist(),
          "data_args": cfg["val_data_args"]}
    data.atomic_save(path, lambda f: torch.save(ck, f))


class EpochSampler(torch.utils.data.Sampler):
    """This rank's indices for one epoch (DistributedSampler's shuffle, seeded by epoch),
    starting after the batches already consumed, so a resumed run sees the same data order."""

    def __init__(self, dataset, rank, world, seed, epoch, start_batch, batch):
        s = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=seed,
                                                drop_last=True)
        s.set_epoch(epoch)
        idx = list(s)
        self.batches = len(idx) // batch
        self.indices = idx[start_batch * batch: self.batches * batch]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def loss_fn(logits, target):
    return F.cross_entropy(logits, target, ignore_index=data.IGNORE)


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    preset_text = "\n".join(
        f"  {name}: " + ", ".join(f"{k}={v}" for k, v in p.items()) for name, p in PRESETS.items())
    p = argparse.ArgumentParser(
        description="Train DeepLab v3 with a swappable context module (Vortex Pooling, paper "
                    "4.1/4.2). Every hyper-parameter defaults to its dataset's preset; an "
                    "explicit flag overrides it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"dataset presets:\n{preset_text}\ncommon defaults: " +
               ", ".join(f"{k}={v}" for k, v in COMMON.items() if v is not None))
    a = p.add_argument
    a("--dataset", choices=list(PRESETS), default="synthetic",
      help="synthetic (built in, default), voc (train), voc_aug (train_aug, paper 4.1), coco")
    a("--data-root", default=None, help="VOC2012 folder, or the prepare-coco output folder")
    a("--split", default=None, help="training list under ImageSets/Segmentation (preset)")
    a("--val-split", default=None, help="list evaluated at the end (preset: val)")
    a("--context", choices=CONTEXTS, default=None, help="context module (default: vortex)")
    a("--pool-k", type=int, default=None, help="Module A's pooling size k (default 5)")
    a("--depth", type=int, choices=[18, 34, 50, 101, 152], default=None, help="ResNet depth")
    a("--base-channels", type=int, default=None,
      help="ResNet width (64 = standard; the synthetic preset uses a slim 16)")
    a("--context-channels", type=int, default=None, help="context module width (paper: 256)")
    a("--output-stride", type=int, choices=[8, 16, 32], default=None, help="paper: 8")
    a("--multi-grid", type=int, nargs="+", default=None, help="layer4 rate multipliers (1 2 4)")
    a("--crop", type=int, default=None, help="training crop side (paper: 513)")
    a("--scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
      help="random scale range (paper: 0.5 2.0)")
    a("--batch-size", type=int, default=None, help="GLOBAL batch, split over ranks (paper: 16)")
    a("--iters", type=int, default=None, help="training iterations (paper: 30000)")
    a("--lr", type=float, default=None, help="base learning rate of the poly policy (0.007)")
    a("--power", type=float, default=None, help="poly power (0.9)")
    a("--momentum", type=float, default=None, help="SGD momentum (0.9)")
    a("--weight-decay", type=float, default=None, help="SGD weight decay (1e-4)")
    a("--seed", type=int, default=None, help="seed of weights, data order and augmentation")
    a("--workers", type=int, default=None, help="data-loader processes per rank")
    a("--num-images", type=int, default=None, help="synthetic: training images")
    a("--val-images", type=int, default=None, help="synthetic: validation images")
    a("--image-size", type=int, default=None, help="synthetic: image side")
    a("--pretrained", default=None, help="local torchvision ImageNet ResNet or "
                                         "deeplabv3_resnet*_coco checkpoint to start from")
    a("--init-from", default=None, help="our own checkpoint to take the weights from (the "
                                        "next stage of the three-stage recipe, paper 4.2)")
    a("--resume", action="store_true", help="continue --out-dir's checkpoint exactly")
    a("--out-dir", default=None, help="where checkpoint, log and pictures go "
                                      "(default runs/<dataset>-<context>)")
    a("--save-every", type=int, default=None, help="checkpoint every N iterations")
    a("--log-every", type=int, default=None, help="progress line every N iterations")
    a("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], default=None,
      help="mixed precision: bf16 autocast (default with --amp), or fp16 with a gradient scaler "
           "(CUDA only)")
    a("--channels-last", action="store_true", help="NHWC memory format (faster convolutions)")
    a("--compile", action="store_true", help="torch.compile the model (off by default)")
    a("--no-eval", action="store_true", help="skip the evaluation at the end")
    a("--ablation", type=int, metavar="SEEDS", default=None,
      help="Table 1 in miniature: train and evaluate every module of Table 1 plus 'none' "
           "(same backbone, iterations and seeds 0..SEEDS-1; other flags apply to all runs) and "
           "print mIoU mean +- std per module, then draw the effective receptive fields of "
           "none, ASPP and Vortex (--out-dir/erf.png); runs go to --out-dir/<module>-seed<k>, "
           "and the same command again continues an interrupted table")
    a("--erf-images", type=int, default=32,
      help="with --ablation: validation images averaged in the effective-receptive-field "
           "figure (--out-dir/erf.png) of the trained none, ASPP and Vortex models")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--bench", action="store_true", help="instead of training: time training steps of "
      "ResNet-101 OS 8 at crop 321, batch 2, NCHW vs channels-last (CPU)")
    a("--stop-after", type=int, default=None,
      help="testing aid: behave as if SIGTERM arrived after N iterations of this run")
    args = p.parse_args(argv)
    cfg = dict(COMMON)
    cfg.update(PRESETS[args.dataset])
    for k, v in vars(args).items():
        if v is not None or k not in cfg:
            cfg[k] = v
    cfg["scale"], cfg["multi_grid"] = tuple(cfg["scale"]), tuple(cfg["multi_grid"])
    cfg["out_dir"] = cfg["out_dir"] or os.path.join(
        "runs", "ablation" if args.ablation else f"{args.dataset}-{cfg['context']}")
    cfg["val_data_args"] = ({"num_images": cfg["val_images"], "image_size": cfg["image_size"]}
                            if args.dataset == "synthetic" else {})
    return cfg


def build(cfg):
    train_set = data.get_dataset(cfg["dataset"], cfg["split"], cfg["data_root"], train=True,
                                 crop=cfg["crop"], scale=cfg["scale"], seed=cfg["seed"],
                                 **({"num_images": cfg["num_images"],
                                     "image_size": cfg["image_size"]}
                                    if cfg["dataset"] == "synthetic" else {}))
    torch.manual_seed(cfg["seed"])
    model = DeepLabV3(len(train_set.classes), depth=cfg["depth"], context=cfg["context"],
                      output_stride=cfg["output_stride"], pool_k=cfg["pool_k"],
                      multi_grid=cfg["multi_grid"], base_channels=cfg["base_channels"],
                      context_channels=cfg["context_channels"])
    return model, train_set


def train(cfg):
    rank, world, device = setup_distributed(cfg["device"])
    if cfg["batch_size"] % world:
        raise SystemExit(f"--batch-size {cfg['batch_size']} (global) is not divisible by the "
                         f"world size {world}")
    per_rank = cfg["batch_size"] // world
    out = cfg["out_dir"]
    ck_path = os.path.join(out, "checkpoint.pt")
    if os.path.exists(ck_path) and not cfg["resume"]:
        raise SystemExit(f"{ck_path} exists: pass --resume to continue it, or choose another "
                         f"--out-dir (nothing is overwritten without asking)")
    if cfg["resume"] and not os.path.exists(ck_path):
        raise SystemExit(f"--resume: no checkpoint at {ck_path}")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    model, train_set = build(cfg)
    if cfg["pretrained"] and not cfg["resume"]:
        load_backbone_weights(model, cfg["pretrained"], verbose=rank == 0)
    if cfg["init_from"] and not cfg["resume"]:
        src = evaluation.load_checkpoint(cfg["init_from"])
        missing, unexpected = model.load_state_dict(src["model"], strict=False)
        rank0_print(f"initialised from {cfg['init_from']} (iteration {src['iteration']}); "
                    f"missing {len(missing)}, unexpected {len(unexpected)}")
        if missing or unexpected:
            raise SystemExit(f"--init-from {cfg['init_from']} does not fit this model: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
    if world > 1:
        convert_sync_batchnorm(model)
    model.to(device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    # DeepLab v3's code decays the convolution weights but not the batch-norm parameters; we
    # follow it (and leave the classifier's bias undecayed too): decay on weights with dim > 1.
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg["lr"], momentum=cfg["momentum"])
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[cfg["amp"]]
    if cfg["amp"] == "fp16" and device.type != "cuda":
        raise SystemExit("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    scaler = torch.amp.GradScaler("cuda") if cfg["amp"] == "fp16" else None
    it, epoch, batch_in_epoch = 0, 0, 0
    if cfg["resume"]:
        ck = evaluation.load_checkpoint(ck_path)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck["scaler"]:
            scaler.load_state_dict(ck["scaler"])
        it, epoch, batch_in_epoch = ck["iteration"], ck["epoch"], ck["batch_in_epoch"]
        torch.set_rng_state(ck["rng_cpu"])
        if device.type == "cuda" and ck["rng_cuda"].numel():
            torch.cuda.set_rng_state(ck["rng_cuda"])
        rank0_print(f"resumed {ck_path} at iteration {it}")
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        net = torch.compile(net)

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log_path = os.path.join(out, "log.jsonl")
    rank0_print(f"training {cfg['dataset']} ({len(train_set)} images), ResNet-{cfg['depth']} "
                f"OS {cfg['output_stride']}, context {cfg['context']}, {world} rank(s) x "
                f"{per_rank} images, {cfg['iters']} iterations, device {device}; "
                f"out: {out}")
    t0, it0 = time.time(), it
    window = []
    run_steps = 0
    try:
        while it < cfg["iters"]:
            train_set.set_epoch(epoch)
            sampler = EpochSampler(train_set, rank, world, cfg["seed"], epoch, batch_in_epoch,
                                   per_rank)
            if sampler.batches == 0:
                raise SystemExit(f"{len(train_set)} images cannot make one batch of {per_rank} "
                                 f"per rank")
            # The loader gets its own generator: creating an iterator would otherwise draw from
            # the global RNG (dropout's), and a resumed run creates one more than a straight run.
            loader = torch.utils.data.DataLoader(
                train_set, per_rank, sampler=sampler, num_workers=cfg["workers"], drop_last=True,
                pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(cfg["seed"] + epoch))
            for images, labels in loader:
                lr = poly_lr(cfg["lr"], it, cfg["iters"], cfg["power"])
                for g in optimizer.param_groups:
                    g["lr"] = lr
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if cfg["channels_last"]:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = loss_fn(net(images), labels)
                if not torch.isfinite(loss.detach()).all():
                    raise FloatingPointError(
                        f"loss is {loss.item()} at iteration {it}: training stopped. The last "
                        f"good checkpoint ({ck_path}, if any) is left as it was; try a lower "
                        f"--lr or no --amp fp16")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                it += 1
                run_steps += 1
                batch_in_epoch += 1
                window.append(loss.item())
                if it % cfg["log_every"] == 0 or it == cfg["iters"]:
                    dt = time.time() - t0
                    ips = (it - it0) * cfg["batch_size"] / dt
                    eta = (cfg["iters"] - it) * dt / max(1, it - it0)
                    mem = (f"  mem {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB"
                           if device.type == "cuda" else "")
                    rank0_print(f"it {it}/{cfg['iters']}  loss {np.mean(window):.4f}  lr {lr:.2e}"
                                f"  {ips:.1f} img/s  ETA {eta / 60:.1f} min{mem}")
                    if rank == 0:
                        with open(log_path, "a") as f:
                            f.write(json.dumps({"iter": it, "loss": float(np.mean(window)),
                                                "lr": lr, "img_per_s": ips,
                                                "time": time.time()}) + "\n")
                    window = []
                if cfg["stop_after"] is not None and run_steps >= cfg["stop_after"]:
                    stop["signal"] = stop["signal"] or "SIGTERM (--stop-after)"
                flag = torch.tensor([1.0 if stop["signal"] else 0.0], device=device)
                if world > 1:  # every rank stops at the same iteration
                    dist.all_reduce(flag)
                if flag.item() > 0:
                    if rank == 0:
                        save_checkpoint(ck_path, model, optimizer, scaler, it, epoch,
                                        batch_in_epoch, cfg, train_set)
                    rank0_print(f"{stop['signal'] or 'signal on another rank'}: checkpoint "
                                f"saved at iteration {it} to {ck_path}; continue with the same "
                                f"command plus --resume")
                    return {"stopped_at": it, "checkpoint": ck_path}
                if rank == 0 and (it % cfg["save_every"] == 0 or it == cfg["iters"]):
                    save_checkpoint(ck_path, model, optimizer, scaler, it, epoch,
                                    batch_in_epoch, cfg, train_set)
                if it >= cfg["iters"]:
                    break
            if batch_in_epoch >= sampler.batches:
                epoch, batch_in_epoch = epoch + 1, 0
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    train_time = time.time() - t0
    rank0_print(f"trained {it - it0} iterations in {train_time / 60:.1f} min; checkpoint: "
                f"{ck_path}")
    result = {"train_seconds": train_time, "checkpoint": ck_path, "iteration": it}
    if not cfg["no_eval"]:
        result.update(final_evaluation(model, cfg, train_set, device, out))
    return result


def final_evaluation(model, cfg, train_set, device, out):
    """Single-scale, no flip (paper 4.1 for ablations), via eval.py's one implementation."""
    val = data.get_dataset(cfg["dataset"], cfg["val_split"], cfg["data_root"], train=False,
                           seed=cfg["seed"], **cfg["val_data_args"])
    t = time.time()
    res = evaluation.evaluate(model, val, device=device, log=rank0_print)
    rank0_print(f"{cfg['dataset']} {cfg['val_split']} ({len(val)} images, single scale):")
    rank0_print(evaluation.format_table(res, train_set.classes,
                                        getattr(train_set, "context_classes", ())))
    summary = {"miou": res["miou"], "iou": res["iou"], "pixel_acc": res["pixel_acc"],
               "eval_seconds": time.time() - t}
    ctx = getattr(train_set, "context_classes", ())
    if ctx:
        summary["context_miou"] = float(np.nanmean([res["iou"][c] for c in ctx]))
    if not dist.is_initialized() or dist.get_rank() == 0:
        data.atomic_save(os.path.join(out, "eval.json"),
                         lambda f: f.write(json.dumps(dict(res, **summary), indent=1).encode()))
        pic = prediction_picture(model, val, device, os.path.join(out, "predictions.png"))
        rank0_print(f"evaluation numbers: {os.path.join(out, 'eval.json')}; pictures: {pic}; "
                    f"training log: {os.path.join(out, 'log.jsonl')}")
    return summary


def prediction_picture(model, dataset, device, path, n=4):
    """image | ground truth | prediction for the first n images, stacked."""
    model.eval()
    rows = []
    for i in range(min(n, len(dataset))):
        image, label = dataset[i]
        pred = evaluation.predict(model, image.to(device)).cpu()
        rows.append(evaluation.panel(image, pred, dataset.palette, label))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    data.atomic_save(path, lambda f: Image.fromarray(np.concatenate(rows, 0)).save(f, "PNG"))
    return path


def bench(steps=3, crop=321, batch=2):
    """Training images/s of one process on this machine: ResNet-101 OS 8 + Vortex, crop 321,
    batch 2, SGD steps, NCHW vs channels-last measured side by side (alternating)."""
    torch.manual_seed(0)
    model = DeepLabV3(21, 101, "vortex")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, crop, crop)
    t = torch.randint(0, 21, (batch, crop, crop))

    def step(cl):
        model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
        start = time.perf_counter()
        loss_fn(model(xi), t).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    step(False), step(True)  # warm-up
    best = {False: float("inf"), True: float("inf")}
    for _ in range(steps):
        for cl in (False, True):
            best[cl] = min(best[cl], step(cl))
    print(f"training step, ResNet-101 OS 8 + Vortex, crop {crop}, batch {batch}, CPU "
          f"{torch.get_num_threads()} threads, best of {steps}:")
    for cl, name in ((False, "NCHW"), (True, "channels-last")):
        print(f"  {name:14} {best[cl]:.2f} s/step  {batch / best[cl]:.2f} img/s")
    print(f"  channels-last speed-up {best[False] / best[True]:.2f}x")


ABLATION = (("none", "none", 5), ("ASPP", "aspp", 5), ("ASPP+", "aspp+", 5),
            ("A(5)", "module_a", 5), ("A(9)", "module_a", 9), ("A(13)", "module_a", 13),
            ("Vortex", "vortex", 5))
PAPER_TABLE1 = {"ASPP": 75.4, "ASPP+": 75.6, "A(5)": 76.1, "A(9)": 75.6, "A(13)": 75.8,
                "Vortex": 76.6}


ABLATION_KEYS = ("dataset", "depth", "base_channels", "context_channels", "output_stride",
                 "multi_grid", "crop", "scale", "batch_size", "iters", "lr", "num_images",
                 "val_images", "image_size", "context", "pool_k", "seed")


def ablation_run(run):
    """One cell of the table: (mIoU, context-class mIoU, seconds). A finished run is read back
    from its ablation.json and an interrupted one is resumed, so re-running the same command
    continues the table instead of starting over."""
    done = os.path.join(run["out_dir"], "ablation.json")
    key = json.loads(json.dumps({k: run[k] for k in ABLATION_KEYS}))
    if os.path.exists(done):
        with open(done) as f:
            rec = json.load(f)
        if rec.get("config") != key:
            raise SystemExit(f"{done} holds a run of another configuration ({rec.get('config')}); "
                             f"choose another --out-dir")
        print(f"{run['out_dir']}: finished earlier, read back")
        return rec["miou"], rec["context_miou"], rec["seconds"]
    resume = os.path.exists(os.path.join(run["out_dir"], "checkpoint.pt"))
    t = time.time()
    res = train(dict(run, resume=resume, no_eval=False))
    rec = dict(config=key, miou=res["miou"], context_miou=res.get("context_miou", float("nan")),
               seconds=time.time() - t, resumed=resume)
    if not dist.is_initialized() or dist.get_rank() == 0:
        data.atomic_save(done, lambda f: f.write(json.dumps(rec, indent=1).encode()))
    return rec["miou"], rec["context_miou"], rec["seconds"]


def ablation(cfg, seeds):
    """Paper Table 1 in miniature: every context module, the same budget and seeds; then the
    effective receptive fields of the trained none / ASPP / Vortex models (eval.erf_figure)."""
    root = cfg["out_dir"]
    rows = []
    for name, context, k in ABLATION:
        runs = [ablation_run(dict(cfg, context=context, pool_k=k, seed=seed,
                                  out_dir=os.path.join(root, f"{name}-seed{seed}")))
                for seed in range(seeds)]
        rows.append((name, np.array(runs)))
    lines = [f"Table 1 in miniature: {cfg['dataset']}, ResNet-{cfg['depth']}, {cfg['iters']} "
             f"iterations, seeds 0..{seeds - 1}, single-scale evaluation",
             f"{'module':8} {'mIoU':>14} {'context classes':>16} {'s/run':>7} {'paper (VOC)':>12}"]
    for name, r in rows:
        lines.append(f"{name:8} {100 * r[:, 0].mean():7.2f} ± {100 * r[:, 0].std():4.2f} "
                     f"{100 * np.nanmean(r[:, 1]):9.2f} ± {100 * np.nanstd(r[:, 1]):4.2f} "
                     f"{r[:, 2].mean():7.0f} {PAPER_TABLE1.get(name, '-'):>12}")
    rank, _, device = setup_distributed(cfg["device"])
    if rank != 0:
        return {name: r for name, r in rows}
    lines.append("")
    lines.append("Effective receptive field (gradient of the centre pixel's logit, mean over "
                 f"{cfg['erf_images']} validation images and {seeds} seed(s)):")
    checkpoints = [os.path.join(root, f"{name}-seed{seed}", "checkpoint.pt")
                   for name in ("none", "ASPP", "Vortex") for seed in range(seeds)]
    evaluation.erf_figure(checkpoints, os.path.join(root, "erf.png"), cfg["erf_images"], device,
                          log=lines.append)
    table = "\n".join(lines)
    print(table)
    data.atomic_save(os.path.join(root, "table1.txt"), lambda f: f.write(table.encode() + b"\n"))
    return {name: r for name, r in rows}


def main(argv=None):
    cfg = parse_args(argv)
    if cfg["bench"]:
        return bench()
    if cfg["ablation"]:
        return ablation(cfg, cfg["ablation"])
    try:
        return train(cfg)
    except FloatingPointError as e:
        sys.exit(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
