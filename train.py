"""Training: one command on a CPU (built-in synthetic data) and on a GPU box (the paper's recipe).

  python train.py                                   # synthetic data, small ResNet, CPU, minutes
  torchrun --nproc_per_node=8 train.py --dataset voc_aug --data-root VOCdevkit/VOC2012 \\
      --pretrained resnet101-63fe2227.pth           # paper 4.1: ResNet-101, OS 8, Vortex, ...

Part I, the paper, in its order (first ~340 lines): the recipe (4.1), the poly learning rate
and SGD (4.1), synchronised batch norm (4.1), the three stages of 4.2 (COCO 200k iterations ->
train_aug -> trainval, by --init-from; batch norm frozen in the last, DeepLab v3's recipe, by
--freeze-bn), the set-up of one run, and the loop with one training step.
Part II: distributed helpers, starting or resuming, checkpoints, the data stream, signals and
sync points, progress, the command line and its checks. Experiments: experiments.py.
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
import infra
from infra import BadInput, MissingInput
import vortex
from vortex import CONTEXTS, DEPTHS, DeepLabV3

# =============================================================================================
# PART I: THE PAPER
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 4.1: "We keep the same hyper-parameters and training strategy as those in [DeepLab v3] ...
# initial learning rate 0.007 ... 30,000 iterations ... crop a 513 x 513 patch ... batchsize
# = 16"; 4.2: COCO "for 200,000 iterations". Each dataset carries its preset (ResNet-101, OS 8,
# scale 0.5-2.0 for the paper's); an explicit flag overrides it (see --help). The synthetic
# preset is ours: a slim ResNet-18, minutes on a CPU, trained on whole images (crop = side,
# scale <= 1): crops of enlarged images cut away the cues that decide its task.
# ---------------------------------------------------------------------------------------------
PAPER = dict(depth=101, base_channels=64, context_channels=256, output_stride=8, crop=513,
             scale=(0.5, 2.0), batch_size=16, iters=30000, lr=0.007, val_split="val",
             log_every=20, save_every=2000)
PRESETS = {
    "synthetic": dict(depth=18, base_channels=16, context_channels=64, output_stride=8,
                      crop=128, scale=(0.75, 1.0), batch_size=8, iters=1500, lr=0.02,
                      split="train", val_split="val", num_images=1024, val_images=128,
                      image_size=128, log_every=50, save_every=500, workers=1, warmup=0.3),
    "voc_aug": dict(PAPER, split="train_aug"), "voc": dict(PAPER, split="train"),
    "coco": dict(PAPER, iters=200000, split="train2017", val_split="val2017", save_every=5000)}
COMMON = dict(context="vortex", pool_k=5, multi_grid=(1, 2, 4), momentum=0.9, weight_decay=1e-4,
              power=0.9, warmup=0.0, seed=0, workers=4, num_images=None, val_images=None,
              image_size=None, accum_steps=1, sync_bn="auto", count_include_pad=False)


# ---------------------------------------------------------------------------------------------
# 4.1 "Learning rate policy": "we use the 'poly' learning rate policy with initial learning rate
# 0.007, and the learning rate is multiplied by (1 - iter / max_iter) ^ power at each iteration,
# where power is set to 0.9. We train the model for 30,000 iterations."
# With SGD and momentum, and pixel-wise cross-entropy with 255 (void, borders, discarded
# objects) ignored, as in DeepLab v3.
# ---------------------------------------------------------------------------------------------

def poly_lr(base, it, max_it, power=0.9, warmup=0.0):
    """The poly policy; with `warmup` > 0 (not the paper's; the synthetic preset's) the rate
    first rises linearly over that fraction of the iterations (docs/experiments.md, the
    miniature: why, and what it changed)."""
    ramp = min(1.0, (it + 1) / (warmup * max_it)) if warmup > 0 else 1.0
    return base * ramp * (1 - it / max_it) ** power


def warmup_fraction(text):
    """--warmup's type: a fraction of the iterations in [0, 1)."""
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a fraction in [0, 1)")
    return v


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


def make_optimizer(model, cfg):
    """SGD with momentum. DeepLab v3's code decays the convolution weights but not the
    batch-norm parameters; we follow it (and leave biases undecayed too): decay on weights
    with dim > 1."""
    return torch.optim.SGD(
        [{"params": [p for p in model.parameters() if p.dim() > 1],
          "weight_decay": cfg["weight_decay"]},
         {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}],
        lr=cfg["lr"], momentum=cfg["momentum"])


def loss_fn(logits, target):
    """Cross-entropy summed over the labelled pixels (255 ignored); train_step divides it by
    the number of labelled pixels of the whole batch."""
    return F.cross_entropy(logits, target, ignore_index=data.IGNORE, reduction="sum")


# ---------------------------------------------------------------------------------------------
# 4.1 "Batch Normalization": "We use batchsize = 16 ... updating the batch normalization layer
# can significantly increase the accuracy ... [per-GPU statistics make it] hard to approximate
# the global expectation and variance computed on the whole batch. We then determine to use the
# synchronized batch normalization layer ... to synchronize the statistics such as mean and
# variance across multiple GPUs."
# Synchronised batch norm from primitives (2-4 images per GPU give noisy statistics; they must
# be those of the whole batch).
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


# ---------------------------------------------------------------------------------------------
# 4.2: "a three-stage training strategy ... [DeepLab v3] firstly trains the model with MS COCO
# only, and then they use PASCAL VOC 2012 augmented set for further training. Finally, they
# fine-tune the model on official PASCAL VOC 2012 data." Each stage is a run that starts from the
# last one's checkpoint (--init-from). Batch norm frozen in the last stage is DeepLab v3's
# recipe (the paper does not say): with a small batch of fine data, the statistics learnt on
# the large sets are kept (--freeze-bn).
# ---------------------------------------------------------------------------------------------

def freeze_batchnorm(model):
    """DeepLab v3's last stage: batch-norm statistics and affine parameters stay as they are.
    Call after every model.train()."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# One run: the device this process drives (torchrun starts one process per GPU), the model,
# the batch-norm choice (4.1, 4.2), DistributedDataParallel and the optimizer. What is not the
# paper's (a resumed run, the output folder, the data order) is one named call into Part II.
# ---------------------------------------------------------------------------------------------

def setup(cfg):
    """Everything before the first step. Returns the run's state (an argparse.Namespace)."""
    rank, world, device = infra.setup_distributed(cfg["device"], cfg["deterministic"])
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
    if cfg["freeze_bn"]:  # DeepLab v3's last stage: fixed statistics need no synchronisation
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
    announce(run)  # Part II: one line saying what runs
    run.t0 = time.time()
    return run


# ---------------------------------------------------------------------------------------------
# The loop (4.1): the poly learning rate set every iteration, then one step on a batch of
# --batch-size images split over the ranks (torchrun) and --accum-steps micro-steps. The host
# waits for the device only at a sync point (a progress line, a checkpoint, the end, a stop):
# the loop itself reads no number back from the device.
# ---------------------------------------------------------------------------------------------

def train(cfg):
    """Paper 4.1's training from the first step (or a checkpoint) to the final evaluation."""
    run = setup(cfg)
    it, losses = run.iteration, torch.zeros((), device=run.device)
    with guard(run) as stop:  # Part II: Ctrl-C / SIGTERM save at the next sync point
        while it < cfg["iters"]:
            set_lr(run.optimizer, poly_lr(cfg["lr"], it, cfg["iters"], cfg["power"],
                                         cfg["warmup"]))
            batch = [next(run.batches) for _ in range(cfg["accum_steps"])]  # Part II: data order
            losses += train_step(run, batch)
            it += 1
            if stop.asked(it) or sync_iteration(cfg, it):  # the host waits for the device here
                if sync_point(run, it, losses, stop):  # Part II: progress, checkpoint, stop
                    return {"stopped_at": it, "checkpoint": run.ck_path}
        return finish(run, it)  # Part II: the final evaluation (paper 4.1: single scale)


def train_step(run, batch):
    """One SGD step on this rank's micro-batches [(images, labels), ...] of one batch.

    The loss is the cross-entropy summed over the batch's labelled pixels divided by their
    number in the WHOLE batch (every micro-step, every rank): the gradient is the batch's
    per-pixel mean however the pixels fall over ranks and micro-steps, and a batch with no
    labelled pixel adds nothing (its count is clamped to 1). DDP averages the ranks' gradients
    while the sum is wanted, hence `* run.world`; it all-reduces them on the last micro-step
    only. Returns this rank's share of the batch's mean loss, on the device (no host sync)."""
    batch = [(x.to(run.device, non_blocking=True), t.to(run.device, non_blocking=True))
             for x, t in batch]
    labelled = sum((t != data.IGNORE).sum() for _, t in batch).double()
    if run.world > 1:
        dist.all_reduce(labelled)  # the whole batch's count, on every rank
    labelled = labelled.clamp(min=1).float()
    share = torch.zeros((), device=run.device)
    for k, (images, labels) in enumerate(batch):
        last = k == len(batch) - 1
        with contextlib.nullcontext() if last or run.ddp is None else run.ddp.no_sync():
            if run.cfg["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(run.device.type, dtype=run.amp_dtype,
                                enabled=run.amp_dtype is not None):
                loss = loss_fn(run.net(images), labels) / labelled
            scaled = loss * run.world
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        share += loss.detach().float()
    if run.scaler is not None:  # fp16: skips a step whose gradients overflowed
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return share


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
# A resumed run must be the same experiment: its whole configuration (the data included: the
# split list's content) equals the checkpoint's, except the settings of RESUME_MAY_CHANGE, so
# that a new option is part of a run's identity unless it is listed here.
# ---------------------------------------------------------------------------------------------

RESUME_MAY_CHANGE = ("iters", "workers", "log_every", "save_every", "amp", "device", "sync_bn",
                     "channels_last", "compile", "deterministic", "no_eval", "stop_after",
                     "resume", "out_dir", "pretrained", "init_from", "val_data_args")
RUN_OUTPUTS = ("checkpoint.pt", "log.jsonl", "eval.json", "predictions.png", "curves.png")
EXIT_STOPPED = 3  # a graceful stop (signal): a checkpoint was saved, the run is not finished


def start_or_resume(run):
    """A new run (its weights from --pretrained / --init-from) or a resumed one. Sets
    run.resumed; returns the checkpoint on rank 0 (None elsewhere and for a new run). A refused
    start leaves no folder behind."""
    cfg = run.cfg
    if cfg["amp"] == "fp16" and run.device.type != "cuda":
        raise BadInput("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    if getattr(run.train_set, "split", None) is not None:  # the data is part of the run
        cfg["split_sha256"] = infra.file_digest(os.path.join(
            run.train_set.root, "ImageSets", "Segmentation", run.train_set.split + ".txt"))
    if not cfg["no_eval"]:  # the final evaluation's data is checked now, not after training
        run.val_set = data.get_dataset(cfg["dataset"], cfg["val_split"], cfg["data_root"],
                                       train=False, seed=cfg["seed"], **cfg["val_data_args"])
    size = 2.2 * sum(t.numel() * t.element_size() for t in run.model.state_dict().values())
    ck = None

    def decide():
        nonlocal ck
        run.lock = infra.FolderLock(cfg["out_dir"], "train.py")  # one run owns --out-dir
        ck = check_out_dir(cfg, run.ck_path, size)
        return ck is not None
    STARTING.append(run)  # until its first step, a refusal undoes the start (run_training)
    run.resumed = on_rank0(decide)
    if not run.resumed:
        take_weights(run.model, cfg, verbose=run.rank == 0)
    return ck


STARTING = []  # runs that took --out-dir and have not begun their first step


def run_training(cfg):
    """train(cfg); a refusal (or Ctrl-C) before the first step (in setup: --sync-bn, the
    optimizer's state, ...) leaves no lock and no new folder behind."""
    try:
        return train(cfg)
    except (BadInput, KeyboardInterrupt):
        while STARTING:
            release_out_dir(STARTING.pop(), remove=True)  # with the folders it made
        raise


def release_out_dir(run, remove=False):
    """Let go of --out-dir's lock (rank 0 holds it; the system drops it if the process dies)."""
    if getattr(run, "lock", None) is not None:
        run.lock.release(remove)
        run.lock = None


def take_weights(model, cfg, verbose):
    """--pretrained (torchvision files) or --init-from (our checkpoint of an earlier stage)."""
    if cfg["pretrained"]:
        try:
            infra.load_pretrained(model, cfg["pretrained"], verbose=verbose)
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
    # only rank 0 read the file (no shared filesystem needed): the others receive it, pickled
    state = from_rank0({k: ck[k] for k in ("model", "optimizer", "scaler", "rng_cpu", "rng_cuda",
                                           "iteration", "epoch", "batch_in_epoch")}
                       if ck is not None else None)
    run.model.load_state_dict(state["model"])  # names and shapes checked with the checkpoint
    try:  # the optimizer's and scaler's states fit only the optimizer built here: tried here
        run.optimizer.load_state_dict(state["optimizer"])
        if run.scaler is not None and state["scaler"]:
            run.scaler.load_state_dict(state["scaler"])
        if any(getattr(run.optimizer.state[p].get("momentum_buffer", p), "shape", None) != p.shape
               for g in run.optimizer.param_groups for p in g["params"]):
            raise ValueError("a momentum buffer has another shape than its weight")
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise BadInput(f"{run.ck_path}: optimizer does not fit this model's optimizer "
                       f"({(str(e).splitlines() or ['?'])[0][:150]}); refused") from None
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
    out = cfg["out_dir"]  # made only now, when the run starts; an earlier run's results are
    infra.refuse_existing(  # replaced only when resuming (--resume auto may start over them)
        [os.path.join(out, f) for f in RUN_OUTPUTS], cfg["resume"] is not None,
        [(f"--{k.replace('_', '-')}", cfg[k]) for k in ("data_root", "pretrained", "init_from")],
        hint="they are an earlier run's results: choose another --out-dir (or --resume auto to "
             "replace them)")
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
# good one (infra.atomic_save).
# ---------------------------------------------------------------------------------------------

def save_checkpoint(run, it):
    position = advance(run.position, (it - run.iteration) * run.cfg["accum_steps"], run.per_epoch)
    ck = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
          "scaler": run.scaler.state_dict() if run.scaler is not None else {},
          "iteration": it, "epoch": position[0], "batch_in_epoch": position[1],
          "rng_cpu": torch.get_rng_state(),
          "rng_cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else torch.empty(0),
          "config": run.model.config, "train_args": run.cfg, "dataset": run.cfg["dataset"],
          "classes": list(run.train_set.classes),
          "palette": np.asarray(run.train_set.palette).tolist(),
          "data_args": run.cfg["val_data_args"]}
    infra.atomic_save(run.ck_path, lambda f: torch.save(ck, f))
    evaluation.curves_figure(run.log_path, os.path.join(run.cfg["out_dir"], "curves.png"))


def resume_differences(saved, cfg):
    """The settings outside RESUME_MAY_CHANGE whose value differs from the checkpoint's (one it
    does not record differs too)."""
    def plain(c, k):  # as JSON: a tuple and its list are equal, True and 1 are not
        return json.dumps(c.get(k, "unrecorded"), default=repr)
    return [f"--{k.replace('_', '-')} {json.loads(plain(cfg, k))} (checkpoint: "
            f"{json.loads(plain(saved, k))})" for k in sorted(set(cfg) | set(saved))
            if k not in RESUME_MAY_CHANGE and plain(cfg, k) != plain(saved, k)]


def read_checkpoint_for_resume(cfg, path):
    """Rank 0 reads the checkpoint and refuses a resume that would be another experiment, or
    that has nothing left to do."""
    ck = evaluation.load_checkpoint(path, resume=True)
    wrong = resume_differences(ck["train_args"], cfg)
    if wrong:
        raise BadInput(f"--resume: {path} is another experiment; these differ: "
                       f"{'; '.join(wrong)}. Use the checkpoint's values, or another --out-dir. "
                       f"Safe to change on resume: " + ", ".join(
                           "--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE[:-1]))
    if ck["iteration"] > cfg["iters"]:
        raise BadInput(f"--resume: {path} is at iteration {ck['iteration']}, past --iters "
                       f"{cfg['iters']}; give --iters {ck['iteration']} or more (results are kept)")
    if ck["iteration"] == cfg["iters"]:
        print(f"{path} is at iteration {cfg['iters']} (--iters): nothing left to train; "
              + ("nothing is done" if cfg["no_eval"] else "the final evaluation runs again and "
                 "replaces eval.json and predictions.png"))
    return ck


def truncate_log(path, iteration):
    """Drop the log lines written after the checkpoint's iteration (a killed run's tail, a torn
    last line), so that a resumed run does not log the same iterations twice."""
    if not os.path.exists(path):
        return
    keep = "".join(json.dumps(r) + "\n" for r in infra.read_log(path) if r["iter"] <= iteration)
    if keep:
        infra.atomic_save(path, lambda f: f.write(keep.encode()))
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
# Around the loop: signals, sync points, progress lines, the end of a run.
# ---------------------------------------------------------------------------------------------

class guard(contextlib.AbstractContextManager):
    """The loop's surroundings. SIGINT/SIGTERM (and the testing aid --stop-after) ask the loop
    to save and stop at its next sync point, which is said at once; the same signal again, or
    one during the final evaluation, stops at once (exit code 130), leaving the last checkpoint
    as it was. On the way out the loader's workers stop and --out-dir's lock is released."""

    def __init__(self, run):
        self.run, self.it, self.name = run, run.iteration, None

    def __enter__(self):
        def on_signal(signum, frame):
            name, cfg = signal.Signals(signum).name, self.run.cfg
            if self.name is not None or self.it >= cfg["iters"]:
                ck = self.run.ck_path
                rank0_print(f"{name}{' again' if self.name else ''}: stopped at once, without "
                            f"saving; " + (f"the last checkpoint {ck} is kept" if
                                           os.path.exists(ck) else "no checkpoint was saved"),
                            file=sys.stderr)
                raise SystemExit(130)
            self.name = name
            at = next(j for j in range(self.it + 1, cfg["iters"] + 1) if sync_iteration(cfg, j))
            rank0_print(f"{name}: a checkpoint will be saved at iteration {at} (the next sync "
                        f"point), then the run stops; {name} again stops at once without saving",
                        file=sys.stderr)
        self.old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        STARTING.clear()  # the run has begun: its folder holds it now
        return self

    def asked(self, it):
        """After iteration `it`: whether --stop-after's steps are done, which every rank knows
        at once. A signal reaches one process: the ranks learn of it at the next sync point."""
        self.it, after = it, self.run.cfg["stop_after"]
        if after is not None and it - self.run.iteration == after:
            self.name = self.name or "SIGTERM (--stop-after)"
            return True
        return False

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        self.run.batches = None  # shuts the loader workers down, before the process group goes
        release_out_dir(self.run)


def sync_iteration(cfg, it):
    """The loop's sync points: a progress line, a checkpoint, the end."""
    return it % cfg["log_every"] == 0 or it % cfg["save_every"] == 0 or it == cfg["iters"]


def sync_point(run, it, losses, stop):
    """The loop's one host synchronisation: the mean loss since the last one over all ranks,
    whether any rank was asked to stop and whether the weights are finite (one all_reduce, one
    copy); then a progress line, and a checkpoint when one is due. Returns whether to stop."""
    finite = torch.stack([p.detach().isfinite().all() for p in run.model.parameters()]).all()
    flags = torch.stack([losses, torch.tensor(float(stop.name is not None), device=run.device),
                         (~finite).float()])
    if run.world > 1:
        dist.all_reduce(flags)
    total, stops, bad_weights = flags.tolist()
    last = getattr(run, "last_sync", run.iteration)
    loss = total / (it - last)  # each step added its batch's mean loss, in shares over the ranks
    if not math.isfinite(loss) or bad_weights:
        what = f"loss is {loss}" if not math.isfinite(loss) else "weights are not finite"
        raise FloatingPointError(
            f"{what} in the iterations up to {it}: training stopped. The last good checkpoint "
            f"({run.ck_path}, if any) is left as it was; try a lower --lr or no --amp fp16")
    stop.name = stop.name or ("signal on another rank" if stops > 0 else None)
    report(run, it, loss)
    losses.zero_()
    run.last_sync = it
    if run.rank == 0 and (stops > 0 or it % run.cfg["save_every"] == 0
                          or it == run.cfg["iters"]):
        save_checkpoint(run, it)
    if stops > 0:
        rank0_print(f"{stop.name}: checkpoint saved at iteration {it} to {run.ck_path}; "
                    f"continue with the same command plus --resume")
    return stops > 0


def announce(run):
    cfg = run.cfg
    rank0_print(f"training {cfg['dataset']} ({len(run.train_set)} images), ResNet-{cfg['depth']} "
                f"OS {cfg['output_stride']}, context {cfg['context']}, {run.world} rank(s) x "
                f"{run.micro} images x {cfg['accum_steps']} micro-step(s), sync BN "
                f"{run.sync_bn}{', BN frozen' if cfg['freeze_bn'] else ''}, {cfg['iters']} "
                f"iterations, device {run.device}; out: {cfg['out_dir']}")


def report(run, it, loss):
    """A progress line with the speed since the last line and the ETA, and a line of
    log.jsonl (rank 0)."""
    cfg, now = run.cfg, time.time()
    last_it, last_t = getattr(run, "last_report", (run.iteration, run.t0))
    run.last_report = (it, now)
    ips = (it - last_it) * cfg["batch_size"] / max(now - last_t, 1e-9)
    eta = (cfg["iters"] - it) * (now - run.t0) / max(1, it - run.iteration)
    lr = run.optimizer.param_groups[0]["lr"]
    mem = (f"  mem {torch.cuda.max_memory_allocated(run.device) / 2 ** 30:.1f} GiB"
           if run.device.type == "cuda" else "")
    rank0_print(f"it {it}/{cfg['iters']}  loss {loss:.4f}  lr {lr:.2e}  {ips:.1f} img/s  "
                f"ETA {eta / 60:.1f} min{mem}")
    if run.rank == 0:
        with open(run.log_path, "a") as f:
            f.write(json.dumps({"iter": it, "loss": loss, "lr": lr, "img_per_s": ips,
                                "time": time.time()}) + "\n")


def finish(run, it):
    """After the last step: the time taken, then (unless --no-eval) the final evaluation of the
    model that was saved."""
    run.batches = None  # shuts the loader workers down
    took = time.time() - run.t0
    rank0_print(f"trained {it - run.iteration} iterations in {took / 60:.1f} min; "
                f"checkpoint: {run.ck_path}")
    result = {"train_seconds": took, "checkpoint": run.ck_path, "iteration": it}
    if not run.cfg["no_eval"]:
        same_model_on_every_rank(run)  # what is evaluated is what was saved
        result.update(final_evaluation(run))
    return result


def final_evaluation(run):
    """Single-scale, no flip (paper 4.1 for ablations), via eval.py's one implementation."""
    cfg, model, out = run.cfg, run.model, run.cfg["out_dir"]
    torch.backends.cudnn.benchmark = False  # whole images of many sizes: no autotuning per size
    val = run.val_set  # built and checked at the start
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
        infra.write_json(os.path.join(out, "eval.json"), dict(res, **summary))
        pics = [evaluation.prediction_picture(model, val, run.device,
                                              os.path.join(out, "predictions.png"))]
        logs = [p for p in (run.log_path, os.path.join(out, "curves.png")) if os.path.exists(p)]
        rank0_print(f"evaluation numbers: {os.path.join(out, 'eval.json')}; pictures: "
                    f"{', '.join(pics)}" + (f"; training log: {' and '.join(logs)}" if logs else ""))
    return summary


# ---------------------------------------------------------------------------------------------
# The command line, and the checks that refuse nonsense before any work starts.
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None, prog=None):
    preset_text = "\n".join(
        f"  {name}: " + ", ".join(f"{k}={v}" for k, v in p.items()) for name, p in PRESETS.items())
    p = argparse.ArgumentParser(
        prog=prog,
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
    for action in p._actions:  # every limit is said in --help
        if action.dest in LIMITS:
            action.help += " [{}..{}]".format(*LIMITS[action.dest])
    args = p.parse_args(argv)
    cfg = dict(COMMON)
    cfg.update(PRESETS[args.dataset])
    for k, v in vars(args).items():
        if v is not None or k not in cfg:
            cfg[k] = v
    cfg["scale"] = tuple(cfg["scale"])
    cfg["data_root"] = cfg["data_root"] and os.path.abspath(cfg["data_root"])  # resume: same data
    cfg["multi_grid"] = parse_multi_grid(cfg["multi_grid"], cfg["depth"],
                                         explicit=args.multi_grid is not None)
    cfg["out_dir"] = infra.output_path(cfg["out_dir"], "--out-dir") if cfg["out_dir"] is not None \
        else os.path.join("runs", f"{args.dataset}-{cfg['context']}")
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
    a("--warmup", type=warmup_fraction, default=None, metavar="FRACTION",
      help="linear learning-rate warm-up over this fraction of --iters before the poly decay "
           "(paper presets: 0, the paper's schedule; synthetic: 0.3, so that no module's "
           "success is a race against the decay: docs/experiments.md)")
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
      help="keep batch-norm statistics and parameters fixed (DeepLab v3's last stage on "
           "trainval, which paper 4.2 follows: with a smaller --lr, e.g. 0.001)")
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
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
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


LIMITS = {  # flag: (lowest, highest) allowed; whole numbers where both are; stated in --help
    "iters": (1, 10 ** 8), "batch_size": (1, 10 ** 5), "accum_steps": (1, 10 ** 4),
    "save_every": (1, 10 ** 8), "log_every": (1, 10 ** 8), "stop_after": (1, 10 ** 8),
    "base_channels": (1, 4096), "context_channels": (1, 8192), "pool_k": (1, 99),
    "crop": (4, 8192), "num_images": (1, 10 ** 7), "val_images": (1, 10 ** 7),
    "image_size": (32, 4096), "workers": (0, 256), "seed": (0, 2 ** 32 - 1),
    "lr": (1e-8, 10.0), "power": (0.01, 10.0), "momentum": (0.0, 0.999),
    "weight_decay": (0.0, 1.0), "scale": (0.05, 10.0)}


def check_config(cfg):
    """One line naming the flag and what is allowed, for every value that cannot work."""
    def need(ok, flag, allowed):
        if not ok:
            value = cfg[flag.replace("-", "_")]
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
            raise BadInput(f"--{flag} {shown}: {allowed}")
    for k in ("split", "val_split"):
        infra.plain_name(cfg[k], f"--{k.replace('_', '-')}")
    for k, (lo, hi) in LIMITS.items():
        whole = isinstance(lo, int)
        need(all(v is None or lo <= v <= hi for v in np.ravel(cfg[k]).tolist()), k.replace(
            "_", "-"), f"must be a whole number in {lo}..{hi}" if whole else
            f"must be a number in [{lo:g}, {hi:g}]")
    need(cfg["pool_k"] % 2 == 1, "pool-k", "Module A's pooling window must be odd (a centred "
                                           "window: 1, 3, 5, ...)")
    need(cfg["crop"] >= 4 * cfg["output_stride"], "crop",
         f"must be at least 4 x the output stride ({4 * cfg['output_stride']}), so that the "
         f"context module sees a feature map of 4 x 4 or more (paper: 513)")
    need(cfg["scale"][0] <= cfg["scale"][1], "scale", "needs MIN <= MAX (paper: 0.5 2.0)")


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


def main(argv=None):
    cfg = parse_args(argv)
    vortex.keep_freed_memory()  # large tensors reuse memory instead of page-faulting it in
    try:
        return run_training(cfg)
    except FloatingPointError as e:
        sys.exit(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    result = infra.cli(main)
    sys.exit(EXIT_STOPPED if isinstance(result, dict) and "stopped_at" in result else 0)
