"""Training: one command on a CPU (built-in synthetic data) and on a GPU box (the paper's recipe).

  python train.py                                   # synthetic data, small ResNet, CPU, minutes
  torchrun --nproc_per_node=8 train.py --dataset voc_aug --data-root VOCdevkit/VOC2012 \\
      --pretrained resnet101-63fe2227.pth           # paper 4.1: ResNet-101, OS 8, Vortex, ...

Part I, the paper (4.1): synchronised batch norm, the poly learning rate, SGD, the set-up of one
run (device, model, batch-norm choice, DistributedDataParallel, optimizer) and the loop, in the
first ~350 lines. Paper 4.2: COCO (200k iterations) -> train_aug -> trainval (BN frozen), by
--init-from and --freeze-bn.
Part II: resuming, output folders, signals, progress, the command line and its checks, the
benchmarks and the two experiments (--ablation, --context-experiment).
"""
import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as evaluation
from data import BadInput, MissingInput
import vortex
from vortex import CONTEXTS, DEPTHS, TABLE1, DeepLabV3, load_backbone_weights

# =============================================================================================
# PART I: THE PAPER
# =============================================================================================

# The recipe. Each dataset carries its preset (paper 4.1 for voc_aug: ResNet-101, OS 8, 513
# crops, scale 0.5-2.0, batch 16, 30k iterations, lr 0.007; 4.2: COCO 200k iterations); an
# explicit flag overrides it (see --help).
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
              power=0.9, seed=0, workers=4, num_images=None, val_images=None, image_size=None,
              accum_steps=1, sync_bn="auto", count_include_pad=False)


# ---------------------------------------------------------------------------------------------
# 4.1 "Batch Normalization": synchronised batch norm from primitives (with 2-4 images per
# GPU, per-GPU statistics are too noisy; the statistics must be those of the whole batch).
# On CUDA, --sync-bn auto uses torch.nn.SyncBatchNorm instead: the same mathematics in fused
# kernels (~8 passes over the activation and 2 collectives per layer instead of our ~22 and 3).
# This one is the readable derivation, and the one that runs on CPU (gloo).
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
        if not self.affine:  # xhat is saved for backward: never hand it to an in-place ReLU
            return xhat.to(x.dtype, copy=True)
        return (xhat * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(
            x.dtype)


def convert_sync_batchnorm(module):
    """Replace every nn.BatchNorm2d in `module` (in place) by a SyncBatchNorm2d with the same
    weights and running statistics. Returns the module."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm2d):
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            like = next((t for t in list(child.parameters()) + list(child.buffers())
                         if t.is_floating_point()), None)  # none: affine=False, no statistics
            if like is not None:
                sync.to(device=like.device, dtype=like.dtype)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


def synchronise_batchnorm(model, choice, device, world):
    """--sync-bn: 'auto' = torch's fused SyncBatchNorm on CUDA, ours on CPU; 'off' = per-rank
    statistics. Returns what was done."""
    if world == 1 or choice == "off":
        return "off (one rank)" if world == 1 else "off"
    if choice == "auto":
        choice = "torch" if device.type == "cuda" else "ours"
    if choice == "torch":
        if device.type != "cuda":
            raise BadInput("--sync-bn torch: torch.nn.SyncBatchNorm needs CUDA (NCCL); on CPU "
                           "use --sync-bn ours (or auto)")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        convert_sync_batchnorm(model)
    return choice


def freeze_batchnorm(model):
    """Paper 4.2's last stage (after DeepLab v3): batch-norm statistics and affine parameters
    stay as they are. Call after every model.train()."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# 4.1 "Learning rate policy": lr = base * (1 - iter / max_iter) ^ power, set every iteration;
# SGD with momentum; pixel-wise cross-entropy, 255 (void, borders, discarded objects) ignored.
# ---------------------------------------------------------------------------------------------

def poly_lr(base, it, max_it, power=0.9):
    return base * (1 - it / max_it) ** power


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


def make_optimizer(model, cfg):
    """SGD with momentum (paper 4.1). DeepLab v3's code decays the convolution weights but not
    the batch-norm parameters; we follow it (and leave biases undecayed too): decay on weights
    with dim > 1."""
    return torch.optim.SGD(
        [{"params": [p for p in model.parameters() if p.dim() > 1],
          "weight_decay": cfg["weight_decay"]},
         {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}],
        lr=cfg["lr"], momentum=cfg["momentum"])


def loss_fn(logits, target):
    """Cross-entropy summed over the labelled pixels (255 ignored); the loop divides it by the
    number of labelled pixels of the whole batch."""
    return F.cross_entropy(logits, target, ignore_index=data.IGNORE, reduction="sum")


# ---------------------------------------------------------------------------------------------
# One run (4.1): the device this process drives (torchrun starts one process per GPU), the
# model, the batch-norm choice, DistributedDataParallel and the optimizer. What is not the
# paper's (a resumed run, the output folder, the data order) is one named call into Part II.
# ---------------------------------------------------------------------------------------------

def setup(cfg):
    """Everything before the first step. Returns the run's state (an argparse.Namespace)."""
    rank, world, device = evaluation.setup_distributed(cfg["device"], cfg["deterministic"])
    same_settings_on_every_rank(cfg)  # torchrun: one command line for every rank
    train_set = data.get_dataset(cfg["dataset"], cfg["split"], cfg["data_root"], train=True,
                                 crop=cfg["crop"], scale=cfg["scale"], seed=cfg["seed"],
                                 **synthetic_args(cfg, "num_images"))
    torch.manual_seed(cfg["seed"])
    model = DeepLabV3(len(train_set.classes), depth=cfg["depth"], context=cfg["context"],
                      output_stride=cfg["output_stride"], pool_k=cfg["pool_k"],
                      multi_grid=cfg["multi_grid"], base_channels=cfg["base_channels"],
                      context_channels=cfg["context_channels"],
                      count_include_pad=cfg["count_include_pad"])
    run = argparse.Namespace(cfg=cfg, rank=rank, world=world, device=device, model=model,
                             train_set=train_set, micro=micro_batch(cfg, world, len(train_set)),
                             ck_path=os.path.join(cfg["out_dir"], "checkpoint.pt"),
                             log_path=os.path.join(cfg["out_dir"], "log.jsonl"))
    checkpoint = start_or_resume(run)  # Part II: a new run takes --pretrained / --init-from
    model.train()
    if cfg["freeze_bn"]:  # 4.2's last stage: fixed statistics need no synchronisation
        freeze_batchnorm(model)
        run.sync_bn = "off (frozen)"
    else:  # 4.1 "Batch Normalization": statistics of the whole batch, over all GPUs
        run.sync_bn = synchronise_batchnorm(model, cfg["sync_bn"], device, world)
    model.to(device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    run.optimizer = make_optimizer(model, cfg)
    run.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[cfg["amp"]]
    run.scaler = torch.amp.GradScaler("cuda") if cfg["amp"] == "fp16" else None
    run.iteration, run.position = restore(run, checkpoint)  # Part II: weights, RNG, data order
    run.ddp = (nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1 else None)
    run.net = torch.compile(run.ddp or model) if cfg["compile"] else (run.ddp or model)
    run.batches = micro_batches(run)  # Part II: this rank's micro-batches, from run.position
    return run


# ---------------------------------------------------------------------------------------------
# The loop (4.1): the poly learning rate set every iteration; a batch of --batch-size images
# split over the ranks and --accum-steps micro-steps; DDP all-reduces the gradients on the last
# micro-step; SGD steps. The host waits for the GPU only at a sync point (a progress line, a
# checkpoint, the end, a stop), where a non-finite loss stops training before any save.
# ---------------------------------------------------------------------------------------------

def train(cfg):
    run = setup(cfg)
    it, position, accum = run.iteration, run.position, cfg["accum_steps"]
    window, steps, t0, it0 = torch.zeros((), device=run.device), 0, time.time(), it
    announce(run)
    try:
        with stop_signals(cfg, run.rank, it) as stop:
            while it < cfg["iters"]:
                set_lr(run.optimizer, poly_lr(cfg["lr"], it, cfg["iters"], cfg["power"]))
                batch = [next(run.batches) for _ in range(accum)]  # this rank's micro-batches
                labelled = labelled_pixels(run, batch)  # in the whole batch, all ranks (>= 1)
                for k, (images, labels) in enumerate(batch):  # gradients all-reduced on the last
                    with (run.ddp.no_sync() if run.ddp and k < accum - 1
                          else contextlib.nullcontext()):
                        window += micro_step(run, images, labels, labelled)
                optimizer_step(run)
                it, steps, position = it + 1, steps + 1, advance(position, accum, run.per_epoch)
                stop.count(it, it - it0)
                if sync_due(cfg, it, stop):
                    loss, stopping = sync_point(run, window, steps, stop, it)
                    report(run, it, it0, t0, loss)
                    window.zero_()
                    steps = 0
                    if run.rank == 0 and (stopping or it % cfg["save_every"] == 0
                                          or it == cfg["iters"]):
                        save_checkpoint(run, it, position)
                    if stopping:
                        rank0_print(f"{stop.name}: checkpoint saved at iteration {it} to "
                                    f"{run.ck_path}; continue with the same command plus --resume")
                        return {"stopped_at": it, "checkpoint": run.ck_path}
        run.batches = None  # shuts the loader workers down
        rank0_print(f"trained {it - it0} iterations in {(time.time() - t0) / 60:.1f} min; "
                    f"checkpoint: {run.ck_path}")
        result = {"train_seconds": time.time() - t0, "checkpoint": run.ck_path, "iteration": it}
        if not cfg["no_eval"]:
            same_model_on_every_rank(run)  # what is evaluated is what was saved
            result.update(final_evaluation(run))
        return result
    finally:
        run.batches = None  # before the process group goes
        release_out_dir(run)


def micro_step(run, images, labels, labelled):
    """Forward and backward of one micro-batch. Its summed cross-entropy is divided by the
    labelled pixels of the whole batch (all micro-steps, all ranks): every step's gradient is
    the batch's per-pixel mean however the pixels fall over ranks and micro-steps, and a batch
    with no labelled pixel contributes nothing. Returns this micro-batch's share of the loss."""
    images = images.to(run.device, non_blocking=True)
    labels = labels.to(run.device, non_blocking=True)
    if run.cfg["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        loss = loss_fn(run.net(images), labels) / labelled
    scaled = loss * run.world  # DDP averages the ranks' gradients: their sum is wanted
    (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    return loss.detach().float()


def optimizer_step(run):
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


# =============================================================================================
# PART II: ENGINEERING THE PAPER DOES NOT DESCRIBE
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# Distributed helpers. The process group comes from torchrun's environment (RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR...) through eval.setup_distributed; multi-node works through torchrun's
# own rendezvous; nothing here is home-made.
# ---------------------------------------------------------------------------------------------

def same_settings_on_every_rank(cfg):
    """Every rank of a run must have the same settings (a different --seed on one rank would
    silently change what each epoch sees): refused on every rank, naming the flags."""
    if not dist.is_initialized():
        return
    mine = {k: v for k, v in cfg.items() if k != "device"}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, json.dumps(mine, sort_keys=True, default=str))
    every = [json.loads(e) for e in every]
    differ = sorted(k for k in every[0] if any(e.get(k) != every[0][k] for e in every))
    if differ:
        raise BadInput(f"the ranks were started with different settings ("
                       f"{', '.join('--' + k.replace('_', '-') for k in differ)}): every rank of "
                       f"a run needs the same command line")


def labelled_pixels(run, batch):
    """Labelled pixels (not 255) in the micro-batches of one step, summed over the ranks: the
    loss's denominator (at least 1, so that a batch with none gives zero loss, not 0/0)."""
    n = sum(int((labels != data.IGNORE).sum()) for _, labels in batch)
    n = torch.tensor(float(n), dtype=torch.float64, device=run.device)
    if run.world > 1:
        dist.all_reduce(n)
    return n.clamp(min=1).float()


def same_model_on_every_rank(run):
    """rank 0's batch-norm statistics on every rank (with --sync-bn off each rank's last step
    left its own), so that the evaluated model is the saved one."""
    if run.world > 1:
        for b in run.model.buffers():
            dist.broadcast(b, src=0)


def rank0_print(*a, **k):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


def from_rank0(obj):
    """rank 0's (small, picklable) object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(tree, device):
    """rank 0's nested dict/list of tensors on every rank (others pass None): the structure
    travels as an object, the tensors one by one over the process group. Only rank 0 reads the
    checkpoint file, so a multi-node run needs no shared filesystem."""
    if not dist.is_initialized():
        return tree
    flat = []

    def strip(t):
        if isinstance(t, torch.Tensor):
            flat.append(t)
            return ("__tensor__", len(flat) - 1, tuple(t.shape), str(t.dtype).split(".")[1])
        if isinstance(t, dict):
            return {k: strip(v) for k, v in t.items()}
        if isinstance(t, (list, tuple)):
            return type(t)(strip(v) for v in t)
        return t
    spec = from_rank0(strip(tree) if dist.get_rank() == 0 else None)
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def fill(t):
        if isinstance(t, tuple) and len(t) == 4 and t[0] == "__tensor__":
            out = flat[t[1]].to(comm) if flat else torch.empty(t[2], dtype=getattr(torch, t[3]),
                                                               device=comm)
            dist.broadcast(out, src=0)
            return out.cpu()
        if isinstance(t, dict):
            return {k: fill(v) for k, v in t.items()}
        if isinstance(t, (list, tuple)):
            return type(t)(fill(v) for v in t)
        return t
    return fill(spec)


def on_rank0(fn, *args):
    """fn(*args) on rank 0 alone; its (small) result, or its BadInput, on every rank."""
    result = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = (None, fn(*args))
        except BadInput as e:
            result = (type(e), str(e))
    error, value = from_rank0(result)
    if error is not None:
        raise error(value)
    return value



# ---------------------------------------------------------------------------------------------
# Starting or resuming a run. Only rank 0 looks at --out-dir and reads checkpoints; the other
# ranks receive what they need over the process group, so no shared filesystem is needed.
# A resumed run must be the same experiment: RESUME_MUST_MATCH must equal the checkpoint's.
# Everything else (--iters to extend, --workers, --log-every, --save-every, --amp, --device,
# --sync-bn, ...) may change on resume.
# ---------------------------------------------------------------------------------------------

RESUME_MUST_MATCH = ("dataset", "split", "context", "pool_k", "depth", "base_channels",
                     "context_channels", "output_stride", "multi_grid", "crop", "scale",
                     "batch_size", "accum_steps", "lr", "power", "momentum", "weight_decay", "seed",
                     "num_images", "image_size", "freeze_bn", "count_include_pad")
EXIT_STOPPED = 3  # a graceful stop (signal): a checkpoint was saved, the run is not finished


def start_or_resume(run):
    """A new run (its weights from --pretrained / --init-from) or a resumed one. Sets
    run.resumed; returns the checkpoint on rank 0 (None elsewhere and for a new run). A refused
    start leaves no folder behind."""
    cfg = run.cfg
    if cfg["amp"] == "fp16" and run.device.type != "cuda":
        raise BadInput("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    size = 2.2 * sum(t.numel() * t.element_size() for t in run.model.state_dict().values())
    made, ck = first_missing(cfg["out_dir"]), None  # the folders this run will have made

    def decide():
        nonlocal ck
        run.lock = data.FolderLock(cfg["out_dir"], "train.py")  # one run owns --out-dir
        ck = check_out_dir(cfg, run.ck_path, size)
        return ck is not None
    try:
        run.resumed = on_rank0(decide)
        if not run.resumed:
            take_weights(run.model, cfg, verbose=run.rank == 0)
    except BadInput:
        if run.rank == 0:
            release_out_dir(run, remove=True)
            remove_empty(cfg["out_dir"], made)
        raise
    return ck


def release_out_dir(run, remove=False):
    """Let go of --out-dir's lock (rank 0 holds it; the system drops it if the process dies)."""
    if getattr(run, "lock", None) is not None:
        run.lock.release(remove)
        run.lock = None


def first_missing(path):
    """The outermost folder of `path` that does not exist yet (None if it all exists)."""
    p, top = os.path.abspath(path), None
    while not os.path.exists(p):
        p, top = os.path.dirname(p), p
    return top


def remove_empty(path, top):
    """Remove `path` and its parents up to `top` while they are empty folders."""
    p = os.path.abspath(path)
    while top and os.path.isdir(p) and not os.listdir(p):
        os.rmdir(p)
        if p == top:
            break
        p = os.path.dirname(p)


def take_weights(model, cfg, verbose):
    """--pretrained (torchvision files) or --init-from (our checkpoint of an earlier stage)."""
    if cfg["pretrained"]:
        try:
            load_backbone_weights(model, cfg["pretrained"], verbose=verbose)
        except (ValueError, FileNotFoundError) as e:
            raise BadInput(f"--pretrained {e}") from None
        if cfg["multi_grid"] is not None and verbose:
            print(f"note: multi-grid {cfg['multi_grid']} gives layer4 other dilations than "
                  f"torchvision's weights were trained at (fine-tuning adapts them; "
                  f"--multi-grid none keeps torchvision's geometry)")
    if cfg["init_from"]:
        src = evaluation.load_checkpoint(cfg["init_from"])
        sd, theirs = src["model"], src["config"].get("context")
        if theirs != model.config["context"]:  # its context module cannot serve this one
            sd = {k: v for k, v in sd.items() if k.startswith("backbone.")}
            if verbose:
                print(f"--init-from {cfg['init_from']} holds a {theirs} model, this run is "
                      f"{model.config['context']}: only its backbone is taken")
        target = model if theirs == model.config["context"] else model.backbone
        sd = sd if target is model else {k[len("backbone."):]: v for k, v in sd.items()}
        try:
            target.load_state_dict(sd)
        except RuntimeError as e:
            raise BadInput(f"--init-from {cfg['init_from']} does not fit this model: "
                           f"{str(e).splitlines()[1].strip()}") from None
        if verbose:
            print(f"initialised from {cfg['init_from']} (iteration {src['iteration']})")


def restore(run, ck):
    """Model, optimizer, scaler, RNG and data position from rank 0's checkpoint, on every rank.
    Returns (iteration, (epoch, micro-batch in epoch))."""
    if not run.resumed:
        return 0, (0, 0)
    state = broadcast_tensors(
        {k: ck[k] for k in ("model", "optimizer", "scaler", "rng_cpu", "rng_cuda", "iteration",
                            "epoch", "batch_in_epoch")} if ck is not None else None, run.device)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"].to(torch.uint8))
    if run.device.type == "cuda" and state["rng_cuda"].numel():
        torch.cuda.set_rng_state(state["rng_cuda"].to(torch.uint8))
    rank0_print(f"resumed {run.ck_path} at iteration {state['iteration']}")
    return state["iteration"], (state["epoch"], state["batch_in_epoch"])


def check_out_dir(cfg, ck_path, checkpoint_bytes):
    """Rank 0: decide between a new run and a resume, refuse a resume of another experiment,
    and check that --out-dir can take the checkpoints. Returns the checkpoint or None."""
    exists = os.path.exists(ck_path)
    if cfg["resume"] == "yes" and not exists:
        raise MissingInput(f"--resume: no checkpoint at {ck_path} (--resume auto starts a new "
                           f"run when there is none)")
    if exists and cfg["resume"] is None:
        raise BadInput(f"{ck_path} exists: pass --resume to continue it, or choose another "
                       f"--out-dir (nothing is overwritten without asking)")
    ck = read_checkpoint_for_resume(cfg, ck_path) if exists else None
    out = cfg["out_dir"]  # made only now, when the run starts
    data.refuse_existing([out], force=True)  # made, and checked writable
    free, limit = shutil.disk_usage(out).free, resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if free < 1.2 * checkpoint_bytes:  # the new checkpoint's temp file beside the old one
        raise BadInput(f"--out-dir {out}: {free / 2 ** 30:.2f} GiB free, but a checkpoint "
                       f"of this model takes about {checkpoint_bytes / 2 ** 30:.2f} GiB")
    if limit != resource.RLIM_INFINITY and limit < checkpoint_bytes:
        raise BadInput(f"the file-size limit (ulimit -f) is {limit / 2 ** 20:.0f} MB, but a "
                       f"checkpoint of this model takes about {checkpoint_bytes / 2 ** 20:.0f} MB")
    # a resumed run keeps its log up to the checkpoint; a new one starts a new log (a run that
    # died before its first checkpoint may have left one)
    truncate_log(os.path.join(out, "log.jsonl"), ck["iteration"] if ck is not None else 0)
    return ck


# ---------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and numbers (torch.load(weights_only=True) reads them),
# written by rank 0 to a temp file and renamed, so a crash mid-write never destroys the last
# good one (data.atomic_save).
# ---------------------------------------------------------------------------------------------

def save_checkpoint(run, it, position):
    ck = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
          "scaler": run.scaler.state_dict() if run.scaler is not None else {},
          "iteration": it, "epoch": position[0], "batch_in_epoch": position[1],
          "rng_cpu": torch.get_rng_state(),
          "rng_cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else torch.empty(0),
          "config": run.model.config, "train_args": run.cfg, "dataset": run.cfg["dataset"],
          "classes": list(run.train_set.classes),
          "palette": np.asarray(run.train_set.palette).tolist(),
          "data_args": run.cfg["val_data_args"]}
    data.atomic_save(run.ck_path, lambda f: torch.save(ck, f))
    evaluation.curves_figure(run.log_path, os.path.join(run.cfg["out_dir"], "curves.png"))


def resume_differences(saved, cfg):
    """The flags in RESUME_MUST_MATCH whose value differs from the checkpoint's."""
    now, then = (json.loads(json.dumps({k: c.get(k) for k in RESUME_MUST_MATCH}))
                 for c in (cfg, saved))
    return [f"--{k.replace('_', '-')} {now[k]} (checkpoint: {then[k]})"
            for k in RESUME_MUST_MATCH if k in saved and then[k] != now[k]]


def read_checkpoint_for_resume(cfg, path):
    """Rank 0 reads the checkpoint and refuses a resume that would be another experiment."""
    ck = evaluation.load_checkpoint(path)
    wrong = resume_differences(ck.get("train_args", {}), cfg)
    if wrong:
        raise BadInput(f"--resume: {path} is another experiment; these differ: "
                       f"{'; '.join(wrong)}. Use the checkpoint's values, or another --out-dir. "
                       f"Safe to change on resume: --iters, --workers, --log-every, --save-every, "
                       f"--amp, --device, --sync-bn, --channels-last, --compile, "
                       f"--deterministic, --no-eval")
    return ck


def truncate_log(path, iteration):
    """Drop the log lines written after the checkpoint's iteration (a killed run's tail), so
    that a resumed run does not log the same iterations twice."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["iter"] <= iteration]
    if keep:
        data.atomic_save(path, lambda f: f.write("".join(keep).encode()))
    else:
        os.unlink(path)


# ---------------------------------------------------------------------------------------------
# The data: one stream of micro-batches for the whole run. Epoch e is a shuffle of the dataset
# (DistributedSampler's, seeded by e), cut into this rank's micro-batches; the stream starts at
# any (epoch, micro-batch) and runs on into the next epochs, so one loader serves the whole run
# (its workers live as long as it does), an optimizer step may take its micro-batches across an
# epoch's end, and a resumed run sees exactly the data it would have seen.
# ---------------------------------------------------------------------------------------------

class MicroBatchStream(torch.utils.data.Sampler):
    """(epoch, index) keys of this rank's samples, micro-batch after micro-batch, from `start`."""

    def __init__(self, dataset, rank, world, seed, micro, start=(0, 0)):
        self.args, self.micro, self.start = (dataset, world, rank, True, seed, True), micro, start
        self.per_epoch = len(dataset) // world // micro  # micro-batches per epoch and rank

    def __iter__(self):
        epoch, b = self.start
        while True:
            s = torch.utils.data.DistributedSampler(*self.args)
            s.set_epoch(epoch)
            idx = list(s)
            for i in idx[b * self.micro: self.per_epoch * self.micro]:
                yield epoch, i
            epoch, b = epoch + 1, 0


def quiet_worker(_):
    """Loader workers leave Ctrl-C (SIGINT to the whole process group) to the trainer, which
    saves and stops at its next sync point and then shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def advance(position, micro_batches, per_epoch):
    """(epoch, micro-batch in epoch) after `micro_batches` more."""
    n = position[0] * per_epoch + position[1] + micro_batches
    return n // per_epoch, n % per_epoch


def micro_batches(run):
    """This rank's micro-batches from run.position on, through one DataLoader for the run."""
    cfg = run.cfg
    run.per_epoch = len(run.train_set) // run.world // run.micro  # micro-batches per epoch
    return iter(torch.utils.data.DataLoader(
        run.train_set, run.micro, sampler=MicroBatchStream(run.train_set, run.rank, run.world,
                                                           cfg["seed"], run.micro, run.position),
        num_workers=cfg["workers"], pin_memory=run.device.type == "cuda",
        persistent_workers=cfg["workers"] > 0, worker_init_fn=quiet_worker,
        prefetch_factor=4 if cfg["workers"] > 0 else None,
        # its own generator: an iterator would otherwise draw a seed from the global RNG
        generator=torch.Generator().manual_seed(cfg["seed"])))


# ---------------------------------------------------------------------------------------------
# Around the loop: signals, sync points, progress lines, the final evaluation.
# ---------------------------------------------------------------------------------------------

class stop_signals(contextlib.AbstractContextManager):
    """SIGINT/SIGTERM (and the testing aid --stop-after) ask the loop to save and stop at its
    next sync point, which is said at once; the same signal again stops at once, without
    saving (the last checkpoint stays as it was), exit code 130."""

    def __init__(self, cfg, rank, it):
        self.cfg, self.rank, self.it = cfg, rank, it
        self.name, self.now = None, False

    def __enter__(self):
        def on_signal(signum, frame):
            name = signal.Signals(signum).name
            if self.name is not None:
                if self.rank == 0:
                    print(f"{name} again: stopped at once, without saving; the last checkpoint "
                          f"is left as it was", file=sys.stderr, flush=True)
                raise SystemExit(130)
            self.name = name
            if self.rank == 0:
                print(f"{name}: a checkpoint will be saved at iteration {self.next_sync()} (the "
                      f"next sync point), then the run stops; {name} again stops at once "
                      f"without saving", file=sys.stderr, flush=True)
        self.old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def next_sync(self):
        return next(j for j in range(self.it + 1, self.cfg["iters"] + 1)
                    if sync_iteration(self.cfg, j))

    def count(self, it, steps_this_run):
        self.it = it
        self.now = self.cfg["stop_after"] is not None and steps_this_run == self.cfg["stop_after"]
        if self.now:
            self.name = self.name or "SIGTERM (--stop-after)"

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def sync_iteration(cfg, it):
    """The loop's sync points: a progress line, a checkpoint, the end."""
    return it % cfg["log_every"] == 0 or it % cfg["save_every"] == 0 or it == cfg["iters"]


def sync_due(cfg, it, stop):
    return sync_iteration(cfg, it) or stop.now


def sync_point(run, window, steps, stop, it):
    """The loop's one host synchronisation: the mean loss of the iterations since the last one,
    over all ranks, and whether any rank was asked to stop (one all_reduce, one copy)."""
    finite = torch.stack([p.detach().isfinite().all() for p in run.model.parameters()]).all()
    flags = torch.stack([window, torch.tensor(float(stop.name is not None), device=run.device),
                         (~finite).float()])
    if run.world > 1:
        dist.all_reduce(flags)
    total, stops, bad_weights = flags.tolist()
    loss = total / steps  # each step added its batch's mean loss, in shares over the ranks
    if not math.isfinite(loss) or bad_weights:
        what = f"loss is {loss}" if not math.isfinite(loss) else "weights are not finite"
        raise FloatingPointError(
            f"{what} in the iterations up to {it}: training stopped. The last good checkpoint "
            f"({run.ck_path}, if any) is left as it was; try a lower --lr or no --amp fp16")
    stop.name = stop.name or ("signal on another rank" if stops > 0 else None)
    return loss, stops > 0


def announce(run):
    cfg = run.cfg
    rank0_print(f"training {cfg['dataset']} ({len(run.train_set)} images), ResNet-{cfg['depth']} "
                f"OS {cfg['output_stride']}, context {cfg['context']}, {run.world} rank(s) x "
                f"{run.micro} images x {cfg['accum_steps']} micro-step(s), sync BN "
                f"{run.sync_bn}{', BN frozen' if cfg['freeze_bn'] else ''}, {cfg['iters']} "
                f"iterations, device {run.device}; out: {cfg['out_dir']}")


def report(run, it, it0, t0, loss):
    """A progress line with the speed since the last line and the ETA, and a line of
    log.jsonl (rank 0)."""
    cfg, now = run.cfg, time.time()
    last_it, last_t = getattr(run, "last_report", (it0, t0))
    run.last_report = (it, now)
    ips = (it - last_it) * cfg["batch_size"] / max(now - last_t, 1e-9)
    eta = (cfg["iters"] - it) * (now - t0) / max(1, it - it0)
    lr = run.optimizer.param_groups[0]["lr"]
    mem = (f"  mem {torch.cuda.max_memory_allocated(run.device) / 2 ** 30:.1f} GiB"
           if run.device.type == "cuda" else "")
    rank0_print(f"it {it}/{cfg['iters']}  loss {loss:.4f}  lr {lr:.2e}  {ips:.1f} img/s  "
                f"ETA {eta / 60:.1f} min{mem}")
    if run.rank == 0:
        with open(run.log_path, "a") as f:
            f.write(json.dumps({"iter": it, "loss": loss, "lr": lr, "img_per_s": ips,
                                "time": time.time()}) + "\n")


def final_evaluation(run):
    """Single-scale, no flip (paper 4.1 for ablations), via eval.py's one implementation."""
    cfg, model, out = run.cfg, run.model, run.cfg["out_dir"]
    torch.backends.cudnn.benchmark = False  # whole images of many sizes: no autotuning per size
    val = data.get_dataset(cfg["dataset"], cfg["val_split"], cfg["data_root"], train=False,
                           seed=cfg["seed"], **cfg["val_data_args"])
    t = time.time()
    res = evaluation.evaluate(model, val, device=run.device, log=rank0_print,
                              workers=cfg["workers"], amp=cfg["amp"])
    rank0_print(f"{cfg['dataset']} {cfg['val_split']} ({len(val)} images, single scale):")
    ctx = getattr(run.train_set, "context_classes", ())
    rank0_print(evaluation.format_table(res, run.train_set.classes, ctx))
    summary = {"miou": res["miou"], "iou": res["iou"], "pixel_acc": res["pixel_acc"],
               "eval_seconds": time.time() - t}
    if ctx:
        summary["context_miou"] = float(np.nanmean([res["iou"][c] for c in ctx]))
    if run.rank == 0:
        data.write_json(os.path.join(out, "eval.json"), dict(res, **summary))
        pics = [evaluation.prediction_picture(model, val, run.device,
                                              os.path.join(out, "predictions.png"))]
        logs = [p for p in (run.log_path, os.path.join(out, "curves.png")) if os.path.exists(p)]
        rank0_print(f"evaluation numbers: {os.path.join(out, 'eval.json')}; pictures: "
                    f"{', '.join(pics)}" + (f"; training log: {' and '.join(logs)}" if logs else ""))
    return summary


# ---------------------------------------------------------------------------------------------
# The command line, and the checks that refuse nonsense before any work starts.
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
               ", ".join(f"{k}={v}" for k, v in COMMON.items() if v is not None) +
               f"\n\nexit codes: 0 finished, 1 failed (e.g. non-finite loss), 2 refused input, "
               f"{EXIT_STOPPED} stopped by a signal after saving a checkpoint (resume it), 130 "
               f"stopped by a second signal without saving")
    experiment_flags(p.add_argument)
    run_flags(p.add_argument)
    args = p.parse_args(argv)
    cfg = dict(COMMON)
    cfg.update(PRESETS[args.dataset])
    if args.context_experiment:
        cfg.update(CONTEXT_PRESET)
    for k, v in vars(args).items():
        if v is not None or k not in cfg:
            cfg[k] = v
    cfg["scale"] = tuple(cfg["scale"])
    cfg["multi_grid"] = parse_multi_grid(cfg["multi_grid"], cfg["depth"],
                                         explicit=args.multi_grid is not None)
    cfg["out_dir"] = cfg["out_dir"] or os.path.join(
        "runs", "ablation" if args.ablation else "context-distance" if args.context_experiment
        else f"{args.dataset}-{cfg['context']}")
    cfg["val_data_args"] = synthetic_args(cfg, "val_images")
    check_config(cfg)
    return cfg


def experiment_flags(a):
    """The flags that define the experiment: data, model, optimisation (see --help)."""
    a("--dataset", choices=list(PRESETS), default="synthetic",
      help="synthetic (built in, default), voc (train), voc_aug (train_aug, paper 4.1), coco")
    a("--data-root", default=None, help="the VOC2012 folder, or the prepare-coco output folder")
    a("--split", default=None, help="training list under ImageSets/Segmentation (preset)")
    a("--val-split", default=None, help="list evaluated at the end (preset: val)")
    a("--context", choices=CONTEXTS, default=None, help="context module (default: vortex)")
    a("--pool-k", type=int, default=None, help="Module A's pooling size k, odd (default 5)")
    a("--count-include-pad", action="store_const", const=True, default=None,
      help="average Module A's and Vortex's k x k windows over the zero padding too, dividing "
           "by k*k at the border (nn.AvgPool2d's default) instead of by the in-map pixels (ours; "
           "the paper does not say); recorded in the checkpoint")
    a("--depth", type=int, choices=sorted(DEPTHS), default=None, help="ResNet depth")
    a("--base-channels", type=int, default=None,
      help="ResNet width (64 = standard; the synthetic preset uses a slim 16)")
    a("--context-channels", type=int, default=None, help="context module width (paper: 256)")
    a("--output-stride", type=int, choices=[8, 16, 32], default=None, help="paper: 8")
    a("--multi-grid", nargs="+", default=None, metavar="RATE",
      help="layer4 rate multipliers, one per block (paper: 1 2 4), or 'none' for torchvision's "
           "dilated geometry (what its pretrained weights were trained at)")
    a("--crop", type=int, default=None, help="training crop side (paper: 513)")
    a("--scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
      help="random scale range (paper: 0.5 2.0)")
    a("--batch-size", type=int, default=None,
      help="GLOBAL batch per optimizer step, split over ranks and --accum-steps (paper: 16)")
    a("--accum-steps", type=int, default=None,
      help="micro-steps per optimizer step (gradient accumulation; default 1). Batch norm sees "
           "one micro-batch: --batch-size / (ranks x accum-steps) images per rank")
    a("--iters", type=int, default=None, help="optimizer steps (paper: 30000)")
    a("--lr", type=float, default=None, help="base learning rate of the poly policy (0.007)")
    a("--power", type=float, default=None, help="poly power (0.9)")
    a("--momentum", type=float, default=None, help="SGD momentum, in [0, 1) (0.9)")
    a("--weight-decay", type=float, default=None, help="SGD weight decay (1e-4)")
    a("--seed", type=int, default=None, help="seed of weights, data order and augmentation")
    a("--workers", type=int, default=None, help="data-loader processes per rank (0: none)")
    a("--num-images", type=int, default=None, help="synthetic: training images")
    a("--val-images", type=int, default=None, help="synthetic: validation images")
    a("--image-size", type=int, default=None, help="synthetic: image side")


def run_flags(a):
    """The flags of how a run goes: weights, resume, output, speed, devices."""
    a("--pretrained", default=None, help="local torchvision ImageNet ResNet or "
                                         "deeplabv3_resnet*_coco checkpoint to start from")
    a("--init-from", default=None, help="our own checkpoint to take the weights from (the "
                                        "next stage of the three-stage recipe, paper 4.2)")
    a("--freeze-bn", action="store_true",
      help="keep batch-norm statistics and parameters fixed (paper 4.2's last stage on "
           "trainval, after DeepLab v3: with a smaller --lr, e.g. 0.001)")
    a("--sync-bn", choices=["auto", "torch", "ours", "off"], default=None,
      help="batch-norm statistics over all ranks: auto (default) = torch.nn.SyncBatchNorm's "
           "fused kernels on CUDA, ours (readable, runs on CPU/gloo) elsewhere; off = per rank")
    a("--resume", nargs="?", const="yes", choices=["yes", "auto"], default=None,
      help="continue --out-dir's checkpoint exactly (refused if it is another experiment); "
           "'--resume auto' resumes when a checkpoint exists and starts otherwise: use it with "
           "torchrun --max-restarts")
    a("--out-dir", default=None, help="where checkpoint, log and pictures go "
                                      "(default runs/<dataset>-<context>)")
    a("--save-every", type=int, default=None, help="checkpoint every N iterations")
    a("--log-every", type=int, default=None,
      help="progress line every N iterations (the loop synchronises with the GPU only then)")
    a("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], default=None,
      help="mixed precision: bf16 autocast (default with --amp), or fp16 with a gradient scaler "
           "(CUDA only); also used by the final evaluation")
    a("--channels-last", action="store_true", help="NHWC memory format (faster convolutions)")
    a("--compile", action="store_true", help="torch.compile the model (off by default)")
    a("--deterministic", action="store_true",
      help="reproducible CUDA kernels (no cuDNN autotuning, deterministic algorithms where "
           "they exist): slower; without it two CUDA runs differ in the last digits")
    a("--no-eval", action="store_true", help="skip the evaluation at the end")
    a("--ablation", type=int, metavar="SEEDS", default=None,
      help="Table 1 in miniature: train and evaluate every module of Table 1 plus 'none' "
           "(same backbone, iterations and seeds 0..SEEDS-1; other flags apply to all runs) and "
           "print mIoU mean +- std per module, then draw the effective receptive fields of "
           "none, ASPP and Vortex (--out-dir/erf.png); runs go to --out-dir/<module>-seed<k>, "
           "and the same command again continues an interrupted table")
    a("--context-experiment", type=int, metavar="SEEDS", default=None,
      help="Table 1's question at the paper's geometry: for every context module (none, "
           "image-level, ASPP, ASPP+, A(5), A(9), A(13), Vortex), the accuracy with which the "
           "class of a cue 1..40 descriptors from a query pixel of a 65x65 map is read, by the "
           "best linear readout of the module's taps (the probe) and by the module trained with "
           "seeds 0..SEEDS-1, at noise 1 and 0.5 and with a distractor (--out-dir/table.txt, "
           "a figure per setting); defaults "
           f"{', '.join(f'{k}={v}' for k, v in CONTEXT_PRESET.items())}; --iters, "
           "--batch-size, --lr, --context-channels override them; the same command again "
           "continues an interrupted experiment")
    a("--erf-images", type=int, default=32,
      help="with --ablation: validation images averaged in the effective-receptive-field "
           "figure (--out-dir/erf.png) of the trained none, ASPP and Vortex models")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    a("--bench", action="store_true", help="instead of training: time training steps (CPU: "
      "ResNet-101 OS 8 + Vortex at crop 321, NCHW vs channels-last; CUDA: + ASPP at crop 513, "
      "batch 2/4/8 x fp32/bf16 x NCHW/channels-last, images/s and peak memory)")
    a("--stop-after", type=int, default=None,
      help="testing aid: behave as if SIGTERM arrived after N iterations of this run")


def parse_multi_grid(values, depth, explicit):
    """'none' -> None; numbers -> a tuple with one rate per layer4 block (the preset's 1 2 4 is
    cut to ResNet-18/34's two blocks; an explicit value must fit exactly)."""
    if values is None or [str(v).lower() for v in values] == ["none"]:
        return None
    blocks = DEPTHS[depth][1][3]
    try:
        rates = tuple(int(v) for v in values)
    except ValueError:
        rates = ()
    if explicit and (len(rates) != blocks or min(rates, default=0) < 1):
        raise BadInput(f"--multi-grid {' '.join(map(str, values))}: ResNet-{depth} has {blocks} "
                       f"layer4 blocks: give {blocks} whole numbers >= 1 (paper: 1 2 4), or none")
    return rates[:blocks]


def check_config(cfg):
    """One line naming the flag and what is allowed, for every value that cannot work."""
    def need(ok, flag, allowed):
        if not ok:
            value = cfg[flag.replace("-", "_")]
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
            raise BadInput(f"--{flag} {shown}: {allowed}")
    for k in ("batch-size", "iters", "save-every", "log-every", "erf-images", "accum-steps",
              "base-channels", "context-channels"):
        need(cfg[k.replace("-", "_")] >= 1, k, "must be a whole number >= 1")
    for k in ("val-images", "num-images", "ablation", "context-experiment"):
        need(cfg[k.replace("-", "_")] is None or cfg[k.replace("-", "_")] >= 1, k,
             "must be a whole number >= 1")
    need(not (cfg["ablation"] and cfg["context_experiment"]), "context-experiment",
         "runs on its own: give it or --ablation, not both")
    need(cfg["image_size"] is None or cfg["image_size"] >= 32, "image-size", "must be >= 32")
    need(cfg["workers"] >= 0, "workers", "must be >= 0 (0: load in the training process)")
    need(cfg["pool_k"] >= 1 and cfg["pool_k"] % 2 == 1, "pool-k",
         "Module A's pooling window must be odd and >= 1 (a centred window: 1, 3, 5, ...)")
    need(cfg["crop"] >= 4 * cfg["output_stride"], "crop",
         f"must be at least 4 x the output stride ({4 * cfg['output_stride']}), so that the "
         f"context module sees a feature map of 4 x 4 or more (paper: 513)")
    lo, hi = cfg["scale"]
    need(math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi, "scale",
         "needs 0 < MIN <= MAX (paper: 0.5 2.0)")
    for k in ("lr", "power"):
        need(math.isfinite(cfg[k]) and cfg[k] > 0, k, "must be a finite number > 0")
    need(0 <= cfg["momentum"] < 1, "momentum", "must be in [0, 1) (paper: 0.9)")
    need(math.isfinite(cfg["weight_decay"]) and cfg["weight_decay"] >= 0, "weight-decay",
         "must be a finite number >= 0")


def micro_batch(cfg, world, n_images):
    """Images per rank and micro-step; refuses a batch that cannot train batch norm."""
    per, accum = cfg["batch_size"] / (world * cfg["accum_steps"]), cfg["accum_steps"]
    if not per.is_integer():
        raise BadInput(f"--batch-size {cfg['batch_size']} (global) must be divisible by "
                       f"ranks x --accum-steps = {world} x {accum}")
    synced = world > 1 and cfg["sync_bn"] != "off"
    seen = int(per) * (world if synced else 1)
    if seen < 2 and not cfg["freeze_bn"]:
        raise BadInput(f"--batch-size {cfg['batch_size']}: batch norm would see {seen} image per "
                       f"step ({world} rank(s), {accum} micro-step(s)); the image-level branch "
                       f"pools an image to one value per channel, and batch norm cannot "
                       f"normalise a single value: use at least 2 images per micro-step (per "
                       f"rank, or over all ranks with --sync-bn), or --freeze-bn")
    if n_images // world // int(per) == 0:
        raise BadInput(f"{n_images} images cannot make one micro-batch of {int(per)} images "
                       f"per rank on {world} rank(s)")
    return int(per)


def synthetic_args(cfg, count):
    """The synthetic dataset's size flags (count: 'num_images' or 'val_images'), else none."""
    return ({"num_images": cfg[count], "image_size": cfg["image_size"]}
            if cfg["dataset"] == "synthetic" else {})


def bench(device_arg=None):
    device = evaluation.pick_device(device_arg)
    return bench_cuda(device) if device.type == "cuda" else bench_cpu()


def training_step(model, opt, x, t, dtype=None):
    """One SGD step on (x, t), under autocast when `dtype` is bf16/fp16 (the benchmarks)."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype not in (None, torch.float32)):
        loss = loss_fn(model(x), t) / t.numel()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_cpu(steps=3, crop=321, batch=2):
    """Training steps of one process on this machine, ResNet-101 OS 8, crop 321, batch 2, SGD:
    Vortex and ASPP, NCHW and channels-last, all measured side by side (interleaved)."""
    torch.manual_seed(0)
    models = {c: DeepLabV3(21, 101, c) for c in ("vortex", "aspp")}
    opts = {c: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for c, m in models.items()}
    x = torch.randn(batch, 3, crop, crop)
    t = torch.randint(0, 21, (batch, crop, crop))

    def step(c, fmt):
        models[c].to(memory_format=fmt)
        training_step(models[c], opts[c], x.contiguous(memory_format=fmt), t)
    layouts = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}
    best = vortex.best_times({(c, name): (lambda c=c, f=f: step(c, f)) for c in models
                              for name, f in layouts.items()}, steps)
    print(f"training step, ResNet-101 OS 8, crop {crop}, batch {batch}, CPU "
          f"{torch.get_num_threads()} threads, best of {steps}:")
    for name in layouts:
        v, a = best["vortex", name], best["aspp", name]
        print(f"  {name:14} Vortex {v:.2f} s/step ({batch / v:.2f} img/s)  ASPP {a:.2f} s/step"
              f"  Vortex/ASPP {v / a:.3f}   (target <= 1.03)")
    print(f"  channels-last speed-up (Vortex) "
          f"{best['vortex', 'NCHW'] / best['vortex', 'channels-last']:.2f}x")


def _cuda_steps(model, opt, batch, dtype, channels_last, device, crop=513, warmup=3, steps=10):
    """(images/s, peak GiB after the warm-up) of SGD training steps at this configuration (best
    of `steps`), or None if it does not fit in the GPU's memory. The peak is taken after the
    warm-up because cuDNN's autotuning tries kernels with workspaces as large as the free memory
    once."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    torch.cuda.empty_cache()
    try:
        x = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=fmt)
        t = torch.randint(0, 21, (batch, crop, crop), device=device)
        for _ in range(warmup):
            training_step(model, opt, x, t, dtype)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        best = vortex.best_times({"step": lambda: training_step(model, opt, x, t, dtype)},
                                 steps, warmup=0)["step"]
        return batch / best, torch.cuda.max_memory_allocated(device) / 2 ** 30
    except torch.OutOfMemoryError:
        return None
    finally:
        opt.zero_grad(set_to_none=True)
        x = t = None
        torch.cuda.empty_cache()


def bench_cuda(device):
    """Issue 11's table: ResNet-101 OS 8 + Vortex and + ASPP, crop 513, per-GPU batch 2/4/8 x
    {fp32, bf16} x {NCHW, channels-last}: training images/s, peak memory, and the time ratio
    Vortex/ASPP, both modules measured one after the other at every configuration."""
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    models = {c: DeepLabV3(21, 101, c).to(device) for c in ("vortex", "aspp")}
    opts = {c: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for c, m in models.items()}
    name = torch.cuda.get_device_name(device)
    total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    print(f"training steps, DeepLab v3 ResNet-101 OS 8, crop 513, one {name} ({total:.0f} GiB), "
          f"SGD, best of 10 steps after 3 warm-up, cudnn.benchmark on, torch {torch.__version__}, "
          f"pooling on the GPU: {vortex.GPU_POOLING}")
    print(f"{'batch':>5} {'precision':9} {'layout':13} {'Vortex img/s':>12} {'peak GiB':>8} "
          f"{'ASPP img/s':>10} {'peak GiB':>8} {'Vortex/ASPP time':>16}")
    rows = []
    for batch in (2, 4, 8):
        for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            for cl, lname in ((False, "NCHW"), (True, "channels-last")):
                r = {c: _cuda_steps(models[c], opts[c], batch, dtype, cl, device) for c in models}
                cells = [f"{r[c][0]:12.2f} {r[c][1]:8.1f}" if r[c] else f"{'out of memory':>21}"
                         for c in ("vortex", "aspp")]
                ratio = (f"{r['aspp'][0] / r['vortex'][0]:16.3f}" if r["vortex"] and r["aspp"]
                         else f"{'-':>16}")
                print(f"{batch:5d} {dname:9} {lname:13} {cells[0]} {cells[1]:>19} {ratio}",
                      flush=True)
                rows.append((batch, dname, lname, r))
    return rows


ABLATION_ROWS = tuple(row for row in TABLE1 if row != "image-level")
ABLATION_KEYS = ("dataset", "depth", "base_channels", "context_channels", "output_stride",
                 "multi_grid", "crop", "scale", "batch_size", "iters", "lr", "num_images",
                 "val_images", "image_size", "context", "pool_k", "seed", "count_include_pad")


def read_back(path, key):
    """A finished run's record from `path` if there is one made with the same settings (else
    None); a record made with other settings is refused with the differences."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rec = json.load(f)
    if rec.get("config") != key:
        old = rec.get("config") or {}
        diff = [f"{k} {old.get(k)} -> {key[k]}" for k in key if old.get(k) != key[k]]
        raise BadInput(f"{path} holds a run made with other settings ({'; '.join(diff)}); "
                       f"use the same flags, or another --out-dir")
    return rec


def ablation_run(run):
    """One cell of the table: (mIoU, context-class mIoU, seconds). A finished run is read back
    from its ablation.json and an interrupted one is resumed, so re-running the same command
    continues the table instead of starting over."""
    done = os.path.join(run["out_dir"], "ablation.json")
    key = json.loads(json.dumps({k: run[k] for k in ABLATION_KEYS}))
    rec = read_back(done, key)
    if rec is not None:
        print(f"{run['out_dir']}: finished earlier, read back")
        return rec["miou"], rec["context_miou"], rec["seconds"]
    resume = os.path.exists(os.path.join(run["out_dir"], "checkpoint.pt"))
    t = time.time()
    res = train(dict(run, resume="auto", no_eval=False))
    rec = dict(config=key, miou=res["miou"], context_miou=res.get("context_miou", float("nan")),
               seconds=time.time() - t, resumed=resume)
    if not dist.is_initialized() or dist.get_rank() == 0:
        data.write_json(done, rec)
    return rec["miou"], rec["context_miou"], rec["seconds"]


def ablation(cfg, seeds):
    """Paper Table 1 in miniature: every context module, the same budget and seeds; then the
    effective receptive fields of the trained none / ASPP / Vortex models (eval.erf_figure)."""
    root = cfg["out_dir"]
    rows = []
    for name in ABLATION_ROWS:
        row = TABLE1[name]
        runs = [ablation_run(dict(cfg, context=row.context, pool_k=row.k, seed=seed,
                                  out_dir=os.path.join(root, f"{name}-seed{seed}")))
                for seed in range(seeds)]
        rows.append((name, np.array(runs)))
    lines = [f"Table 1 in miniature: {cfg['dataset']}, ResNet-{cfg['depth']}, {cfg['iters']} "
             f"iterations, seeds 0..{seeds - 1}, single-scale evaluation",
             f"{'module':8} {'mIoU':>14} {'context classes':>16} {'s/run':>7} {'paper (VOC)':>12}"]
    for name, r in rows:
        lines.append(f"{name:8} {100 * r[:, 0].mean():7.2f} ± {100 * r[:, 0].std():4.2f} "
                     f"{100 * np.nanmean(r[:, 1]):9.2f} ± {100 * np.nanstd(r[:, 1]):4.2f} "
                     f"{r[:, 2].mean():7.0f} {TABLE1[name].miou or '-':>12}")
    rank, _, device = evaluation.setup_distributed(cfg["device"])
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


# ---------------------------------------------------------------------------------------------
# Table 1's question at the paper's geometry (paper 3.2-3.4, Fig. 3): at which distance can
# each context module still read the evidence that decides a pixel? One query pixel per sample
# and one cue at distance d = 1..40 (data.context_layouts, where the rule is written), X at the
# paper's 65 x 65. Two rows per module:
#   probe:   what its footprint holds. The values its branches read at the query (the taps,
#            pooled as the module pools, zero off the map, plus the image-level mean) and the
#            best linear readout of the cue's class from them, fitted per distance in closed
#            form (regularised Fisher discriminant) on training samples, tested on held-out ones;
#   trained: what training finds. The real branch convolutions -> BN -> ReLU -> projection ->
#            1x1 classifier (a ContextModule of Table 1) evaluated at the query from its taps
#            (module_at_query; a test shows it equals the module run on the whole map there),
#            trained on the same samples with the loop's own pieces, seeds 0..SEEDS-1.
# Settings: noise sigma 1 and 0.5 (which limits are geometry, which signal-to-noise), and a
# distractor of the other class at >= 1.5 d (3.4: fine near, coarse far). One departure from
# the loop: Adam instead of SGD (with SGD and momentum, lr 0.02-0.2, the earlier version of this
# experiment stayed at chance for 600 steps: the cue's share of a pooled feature is tiny).
# ---------------------------------------------------------------------------------------------

CONTEXT_ROWS = tuple(TABLE1)
CONTEXT_PRESET = dict(iters=600, batch_size=512, lr=0.003, context_channels=16)
CONTEXT_CHANNELS = 8  # c1 (paper: 2048); three orthogonal codes need few channels
PER_DISTANCE = {"train": 500, "test": 250}  # layouts per distance, each with its twin
SETTINGS = (("sigma 1", 1.0, False), ("sigma 0.5", 0.5, False),
            ("sigma 1, distractor", 1.0, True))
BANDS = ((1, 10), (11, 20), (21, 30), (31, 40))
PAIRS = (("Vortex", "ASPP"), ("Vortex", "A(5)"), ("Vortex", "A(13)"), ("A(5)", "ASPP"))
CONTEXT_KEYS = ("iters", "batch_size", "lr", "context_channels", "power")


def module_at_query(module, classifier, taps, mean):
    """Logits (N, 2) of a ContextModule + 1x1 classifier at one pixel, from what it reads there:
    `taps` (N, T, c1), branch after branch in data.tap_offsets' order, and the image-level mean
    (N, c1). Each branch's convolution at a pixel is the dot product of its weight with its taps;
    BN, ReLU, the image-level branch, the projection and the classifier are the module's own."""
    feats, t0 = [], 0
    for (k, offsets), branch in zip(data.tap_offsets(module), module.branches):
        x, t0 = taps[:, t0:t0 + len(offsets)], t0 + len(offsets)
        y = torch.einsum("ntc,oct->no", x, branch[0].weight.flatten(2))
        feats.append(branch[2](branch[1](y[:, :, None, None])))
    if module.image_pool is not None:
        feats.append(module.image_pool(mean[:, :, None, None]))
    return classifier(module.project(torch.cat(feats, 1)))[:, :, 0, 0]


def twins(parts, layouts, sigma, codes, image_level):
    """Every layout twice, cue P then cue Q: (taps, mean, label, distance) as tensors."""
    n, has = len(layouts["d"]), (layouts["distractor"][:, 0] > -1000).astype(np.float32)
    cls = np.repeat([0, 1], n)
    doubled = {k: np.concatenate([v, v]) for k, v in parts.items()}
    taps, mean = data.assemble(doubled, cls, sigma, codes, np.concatenate([has, has]),
                               image_level)
    return (torch.from_numpy(taps), None if mean is None else torch.from_numpy(mean),
            torch.from_numpy(cls), torch.from_numpy(np.concatenate([layouts["d"]] * 2)))


def per_distance(correct, d):
    """Accuracy (%) at each distance 0..40 (0 unused) of boolean `correct` (N,)."""
    total = np.bincount(d, minlength=data.CONTEXT_DISTANCES + 1)
    return 100 * np.bincount(d[correct], minlength=data.CONTEXT_DISTANCES + 1) / np.maximum(1, total)


def probe(train, test):
    """The best linear readout per distance (regularised Fisher discriminant, closed form):
    accuracy (%) by distance on the test samples."""
    def flat(s):
        f = s[0].flatten(1) if s[1] is None else torch.cat([s[0].flatten(1), s[1]], 1)
        return f.double().numpy()
    xs, xt = flat(train), flat(test)
    ys, ds, yt, dt = train[2].numpy(), train[3].numpy(), test[2].numpy(), test[3].numpy()
    correct = np.zeros(len(yt), bool)
    for d in range(1, data.CONTEXT_DISTANCES + 1):
        x, y = xs[ds == d], ys[ds == d]
        mu = [x[y == c].mean(0) for c in (0, 1)]
        centred = x - np.where(y[:, None] == 1, mu[1], mu[0])
        cov = centred.T @ centred / max(1, len(x) - 2)
        cov += (1e-3 * np.trace(cov) / len(cov) + 1e-9) * np.eye(len(cov))
        w = np.linalg.solve(cov, mu[1] - mu[0])
        score = (xt[dt == d] - (mu[0] + mu[1]) / 2) @ w
        correct[dt == d] = (score > 1e-9 * np.abs(w).sum()) == (yt[dt == d] == 1)
    return per_distance(correct, dt)


def trained(cfg, row, seed, train, test):
    """The real module trained on the samples' taps; accuracy (%) by distance on the test."""
    torch.manual_seed(seed)
    module = vortex.table1_module(row, CONTEXT_CHANNELS, out_channels=cfg["context_channels"])
    classifier = nn.Conv2d(cfg["context_channels"], 2, 1)
    params = list(module.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.Adam(params, cfg["lr"])
    order = torch.Generator().manual_seed(seed)
    n, b = len(train[2]), cfg["batch_size"]
    module.train()
    for it in range(cfg["iters"]):
        set_lr(optimizer, poly_lr(cfg["lr"], it, cfg["iters"], cfg["power"]))
        idx = torch.randint(n, (b,), generator=order)
        mean = None if train[1] is None else train[1][idx]
        loss = F.cross_entropy(module_at_query(module, classifier, train[0][idx], mean),
                               train[2][idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"{row} seed {seed}: non-finite loss; try a lower --lr")
    module.eval()
    with torch.no_grad():
        pred = module_at_query(module, classifier, test[0], test[1]).argmax(1)
    return per_distance((pred == test[2]).numpy(), test[3].numpy())


def context_experiment(cfg, seeds):
    """Every setting x row: the probe once, the trained module per seed (finished runs are read
    back, so the same command again continues an interrupted experiment); prints and writes
    the tables and a figure per setting."""
    out, t0 = cfg["out_dir"], time.time()
    codes = data.context_codes(CONTEXT_CHANNELS)
    modules = [vortex.table1_module(row, CONTEXT_CHANNELS) for row in CONTEXT_ROWS]
    key = json.loads(json.dumps(dict({k: cfg[k] for k in CONTEXT_KEYS}, per=PER_DISTANCE,
                                     channels=CONTEXT_CHANNELS)))
    results, lines, n_runs, done = {}, [], len(SETTINGS) * len(CONTEXT_ROWS) * (seeds + 1), 0
    samples = {}
    for setting, sigma, distractor in SETTINGS:
        results[setting] = {}
        for row, module in zip(CONTEXT_ROWS, modules):
            path = os.path.join(out, f"{setting.replace(' ', '').replace(',', '-')}-{row}.json")
            rec = read_back(path, dict(key, setting=setting, seeds=seeds))
            if rec is None:
                if distractor not in samples:  # layouts and noise serve both noise levels
                    samples[distractor] = context_samples(modules, distractor)
                sets = {s: twins(parts[module.name], lay, sigma, codes,
                                 module.image_pool is not None)
                        for s, (lay, parts) in samples[distractor].items()}
                rec = {"config": dict(key, setting=setting, seeds=seeds),
                       "probe": probe(sets["train"], sets["test"]).tolist(),
                       "trained": [trained(cfg, row, s, sets["train"], sets["test"]).tolist()
                                   for s in range(seeds)]}
                data.write_json(path, rec)
            results[setting][row] = {"probe": np.array(rec["probe"]),
                                     "trained": np.array(rec["trained"])}
            done += seeds + 1
            data.progress("context experiment", done, n_runs, t0, every=seeds + 1)
        lines.append(context_table(cfg, setting, results[setting], seeds))
        evaluation.context_figure(results[setting], {m.name: vortex.ring_coverage(m)
                                                      for m in modules}, setting,
                                  os.path.join(out, f"{setting.replace(' ', '').replace(',', '-')}.png"))
    table = "\n\n".join(lines) + f"\n\n{len(SETTINGS)} settings, {seeds} seed(s): " \
        f"{(time.time() - t0) / 60:.1f} min"
    print(table)
    data.atomic_save(os.path.join(out, "table.txt"), lambda f: f.write(table.encode() + b"\n"))
    print(f"wrote {os.path.join(out, 'table.txt')} and one figure per setting in {out}")
    return results


def context_samples(modules, distractor):
    """The training and test layouts of one condition and every module's taps there."""
    out = {}
    for i, split in enumerate(("train", "test")):
        layouts = data.context_layouts(1 + i + 2 * distractor, PER_DISTANCE[split], distractor)
        out[split] = (layouts, data.gather_taps(modules, layouts, CONTEXT_CHANNELS, 7 + i))
    return out


def paired(a, b):
    """Per-seed differences a - b: (mean, sign counts, paired t, two-sided p)."""
    d = a - b
    if len(d) < 2 or d.std(ddof=1) == 0:
        return d.mean(), (d > 0).sum(), (d < 0).sum(), math.nan, math.nan
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return d.mean(), (d > 0).sum(), (d < 0).sum(), t, student_t_p(t, len(d) - 1)


def student_t_p(t, df, steps=20000):
    """Two-sided p of Student's t with df degrees of freedom (numerical integral of the
    density from |t| out; scipy is not a dependency)."""
    x = np.linspace(abs(t), abs(t) + 200, steps)
    dens = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * \
        (1 + x * x / df) ** (-(df + 1) / 2)
    return float(min(1.0, 2 * np.trapezoid(dens, x)))


def context_table(cfg, setting, res, seeds):
    """One setting: accuracy (%) by band, the probe and the trained module (mean +- standard
    error over seeds), then paired comparisons of the trained modules."""
    def band(a, lo, hi):  # every distance weighs the same
        return a[..., lo:hi + 1].mean(-1)
    cols = BANDS + ((1, data.CONTEXT_DISTANCES),)
    head = "".join(f"{f'{lo}-{hi}':>21}" for lo, hi in cols)
    lines = [f"{setting}: one query and one cue at distance d, 65x65x{CONTEXT_CHANNELS}, "
             f"{PER_DISTANCE['test']} test layouts x 2 twins per distance; accuracy (%), "
             f"chance exactly 50; probe | trained (mean ± s.e. over {seeds} seed(s), "
             f"{cfg['iters']} iterations of {cfg['batch_size']})",
             f"{'module':12}{head}"]
    for row, r in res.items():
        cells = []
        for lo, hi in cols:
            tr = band(r["trained"], lo, hi)
            se = tr.std(ddof=1) / math.sqrt(len(tr)) if len(tr) > 1 else math.nan
            cells.append(f"{band(r['probe'], lo, hi):6.1f} | {tr.mean():5.1f} ± {se:3.1f}")
        lines.append(f"{row:12}" + "".join(f"{c:>21}" for c in cells))
    lines.append("paired by seed, trained: difference in points (seeds +/-), paired t, p")
    for a, b in PAIRS:
        parts = []
        for lo, hi in cols:
            m, plus, minus, t, p = paired(band(res[a]["trained"], lo, hi),
                                          band(res[b]["trained"], lo, hi))
            parts.append(f"{lo}-{hi} {m:+5.1f} ({plus}+/{minus}-, t {t:5.1f}, p {p:.3f})")
        lines.append(f"  {a + ' - ' + b:14} " + "  ".join(parts))
    return "\n".join(lines)


def main(argv=None):
    cfg = parse_args(argv)
    vortex.keep_freed_memory()  # large tensors reuse memory instead of page-faulting it in
    if cfg["bench"]:
        return bench(cfg["device"])
    try:
        if cfg["context_experiment"]:  # one experiment owns its folder
            lock = data.FolderLock(cfg["out_dir"], "train.py --context-experiment")
            try:
                return context_experiment(cfg, cfg["context_experiment"])
            finally:
                lock.release()
        return ablation(cfg, cfg["ablation"]) if cfg["ablation"] else train(cfg)
    except FloatingPointError as e:
        sys.exit(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    result = data.cli(main)
    sys.exit(EXIT_STOPPED if isinstance(result, dict) and "stopped_at" in result else 0)
