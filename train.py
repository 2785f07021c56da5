"""Training: one command on a CPU (built-in synthetic data) and on a GPU box (the paper's recipe).

  python train.py                                   # synthetic data, small ResNet, CPU, minutes
  torchrun --nproc_per_node=8 train.py --dataset voc_aug --data-root VOCdevkit/VOC2012 \\
      --pretrained resnet101-63fe2227.pth           # paper 4.1: ResNet-101, OS 8, Vortex, ...
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
from vortex import DEPTHS, DeepLabV3

# =============================================================================================
# PART I: THE PAPER
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 4.1: "We keep the same hyper-parameters and training strategy as those in [DeepLab v3] ...
# initial learning rate 0.007 ... 30,000 iterations ... crop a 513 x 513 patch ... batchsize
# = 16"; 4.2: COCO "for 200,000 iterations". A flag given overrides the preset. The synthetic
# preset is ours: a slim ResNet-18, minutes on a CPU, trained on whole images (crop = side,
# scale <= 1): crops of enlarged images cut away the cues that decide its task.
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
              power=0.9, warmup=0.0, seed=0, workers=4, accum_steps=1, sync_bn="auto",
              count_include_pad=False, freeze_bn=False, channels_last=False, compile=False,
              deterministic=False, no_eval=False)


# ---------------------------------------------------------------------------------------------
# 4.1 "Learning rate policy": "we use the 'poly' learning rate policy with initial learning rate
# 0.007, and the learning rate is multiplied by (1 - iter / max_iter) ^ power at each iteration,
# where power is set to 0.9. We train the model for 30,000 iterations." With SGD and momentum,
# and cross-entropy ignoring 255 (void, borders, discarded objects), as in DeepLab v3.

def poly_lr(base, it, max_it, power=0.9, warmup=0.0):
    """The poly policy, after a linear rise over a `warmup` fraction (ours: docs/experiments.md)."""
    ramp = min(1.0, (it + 1) / (warmup * max_it)) if warmup > 0 else 1.0
    return base * ramp * (1 - it / max_it) ** power

def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr

def make_optimizer(model, cfg):
    """SGD with momentum; weight decay on the convolution weights only (dim > 1), as DeepLab v3."""
    return torch.optim.SGD(
        [{"params": [p for p in model.parameters() if p.dim() > 1],
          "weight_decay": cfg["weight_decay"]},
         {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}],
        lr=cfg["lr"], momentum=cfg["momentum"])

def loss_fn(logits, target):
    """Cross-entropy summed over the labelled pixels (255 ignored); train_step divides it."""
    return F.cross_entropy(logits, target, ignore_index=data.IGNORE, reduction="sum")


# ---------------------------------------------------------------------------------------------
# 4.1 "Batch Normalization": "We use batchsize = 16 ... updating the batch normalization layer
# can significantly increase the accuracy ... [per-GPU statistics make it] hard to approximate
# the global expectation and variance computed on the whole batch. We then determine to use the
# synchronized batch normalization layer ... to synchronize the statistics such as mean and
# variance across multiple GPUs."
# Ours, derived from primitives, runs on CPU (gloo); on CUDA, --sync-bn auto uses torch's, fused
# (docs/gpu.md). Per channel, over the N values x of all ranks: mu = sum(x) / N, then s2 =
# sum((x - mu)^2) / N, two all_reduces (sum x and sum x^2 at once would cancel in float32 when
# |mean| >> std); xhat = (x - mu) / sqrt(s2 + eps). Its backward, with g = dL/dxhat and means
# over all N (one more all_reduce): dL/dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(s2 +
# eps). Every sum carries its count, so uneven per-rank batches are fine.

class _SyncNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        sums = torch.cat([count, x.sum(dim=(0, 2, 3)).double()])
        dist.all_reduce(sums)
        n, mean = sums[0], (sums[1:] / sums[0]).to(x.dtype)
        centred = x - mean[None, :, None, None]
        sq = centred.square().sum(dim=(0, 2, 3)).double()
        dist.all_reduce(sq)
        var = (sq / n).to(x.dtype)
        invstd = torch.rsqrt(var + eps)
        xhat = centred * invstd[None, :, None, None]
        ctx.save_for_backward(xhat, invstd)
        ctx.n = n
        return xhat, mean, var, n.to(x.dtype)

    @staticmethod
    def backward(ctx, g, _gm, _gv, _gn):
        xhat, invstd = ctx.saved_tensors
        sums = torch.cat([g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))]).double()
        dist.all_reduce(sums)
        mean_g, mean_gx = (sums / ctx.n).to(g.dtype).chunk(2)
        dx = (g - mean_g[None, :, None, None] - xhat * mean_gx[None, :, None, None])
        return dx * invstd[None, :, None, None], None

class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole distributed batch (works on
    CPU/gloo and CUDA/NCCL). Not distributed, or in eval mode: exactly nn.BatchNorm2d."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        xhat, mean, var, n = _SyncNormalize.apply(x, self.eps)
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
    """Make every nn.BatchNorm2d in `module` a SyncBatchNorm2d, in place: the subclass adds no
    state, only its forward, so weights, statistics, device and mode stay. Returns the module."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.__class__ = SyncBatchNorm2d
    return module

def synchronise_batchnorm(model, choice, device, world):
    """--sync-bn: 'auto' = torch's SyncBatchNorm on CUDA, ours on CPU. Returns what was done."""
    if world == 1 or choice == "off":
        return "off (one rank)" if world == 1 else "off"
    if choice == "auto":
        choice = "torch" if device.type == "cuda" else "ours"
    if choice == "torch" and device.type != "cuda":
        raise BadInput("--sync-bn torch: torch.nn.SyncBatchNorm needs CUDA (NCCL); on CPU use "
                       "--sync-bn ours (or auto)")
    convert = {"torch": nn.SyncBatchNorm.convert_sync_batchnorm, "ours": convert_sync_batchnorm}
    convert[choice](model)
    return choice


# ---------------------------------------------------------------------------------------------
# 4.2: "a three-stage training strategy ... [DeepLab v3] firstly trains the model with MS COCO
# only, and then they use PASCAL VOC 2012 augmented set for further training. Finally, they
# fine-tune the model on official PASCAL VOC 2012 data." Each stage is a run that starts from the
# last one's checkpoint (--init-from); --freeze-bn in the last stage is DeepLab v3's recipe
# (the paper does not say): with a small batch of fine data, the statistics stay those learnt.

def freeze_batchnorm(model):
    """Batch-norm statistics and affine parameters stay as they are; after every model.train()."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# One run, its state built once (torchrun: one process per GPU); what is not the paper's (the
# output folder, a resume, the data order) is a call into Part II.

def setup(cfg):
    """Everything before the first step; a refusal on the way leaves nothing behind."""
    rank, world, device = infra.setup_distributed(cfg["device"], cfg["deterministic"])
    infra.same_on_every_rank(cfg)  # torchrun: one command line for every rank
    train_set = data.get_dataset(cfg["dataset"], cfg["split"], cfg["data_root"], train=True,
                                 crop=cfg["crop"], scale=cfg["scale"], seed=cfg["seed"],
                                 num_images=cfg["num_images"], image_size=cfg["image_size"])
    val_set = None if cfg["no_eval"] else data.get_dataset(  # checked now, not after training
        cfg["dataset"], cfg["val_split"], cfg["data_root"], seed=cfg["seed"],
        num_images=cfg["val_images"], image_size=cfg["image_size"])
    torch.manual_seed(cfg["seed"])
    model = DeepLabV3(len(train_set.classes), **{k: cfg[k] for k in infra.CONFIG if k in cfg})
    micro = per_rank_images(cfg, world, device, len(train_set))
    model.train()
    if cfg["freeze_bn"]:  # DeepLab v3's last stage: fixed statistics need no synchronising
        freeze_batchnorm(model)
        sync_bn = "off (frozen)"
    else:  # 4.1 "Batch Normalization": statistics of the whole batch, over all GPUs
        sync_bn = synchronise_batchnorm(model, cfg["sync_bn"], device, world)
    model.to(device, memory_format=torch.channels_last if cfg["channels_last"] else
             torch.preserve_format)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if cfg["amp"] == "fp16" else None
    claim, iteration, position = start_or_resume(cfg, model, optimizer, scaler, train_set, device)
    try:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None) \
            if world > 1 else None
        net = torch.compile(ddp or model) if cfg["compile"] else (ddp or model)
        per_epoch = len(train_set) // world // micro
        batches = data_stream(train_set, cfg, rank, world, micro, position, device)  # Part II
    except (BadInput, KeyboardInterrupt):
        claim.release(remove=True)
        raise
    return argparse.Namespace(  # net: the model as the loop calls it (DDP, compiled)
        cfg=cfg, rank=rank, world=world, device=device, model=model, net=net, ddp=ddp,
        optimizer=optimizer, scaler=scaler, amp_dtype={"bf16": torch.bfloat16, "fp16":
                                                       torch.float16, None: None}[cfg["amp"]],
        train_set=train_set, val_set=val_set, batches=batches, micro=micro, per_epoch=per_epoch,
        iteration=iteration, position=position, claim=claim, sync_bn=sync_bn, t0=time.time(),
        ck_path=os.path.join(cfg["out_dir"], "checkpoint.pt"),
        log_path=os.path.join(cfg["out_dir"], "log.jsonl"))


# ---------------------------------------------------------------------------------------------
# The loop (4.1): the poly learning rate set every iteration, then one step on a batch of
# --batch-size images split over the ranks and --accum-steps micro-steps. The loop reads no
# number back from the device: the host waits for it only at a sync point.

def train(cfg):
    """Paper 4.1's training from the first step (or a checkpoint) to the final evaluation."""
    run = setup(cfg)
    it, losses = run.iteration, torch.zeros((), device=run.device)
    with guard(run) as stop:  # Part II: Ctrl-C / SIGTERM save at the next sync point
        while it < cfg["iters"]:
            set_lr(run.optimizer, poly_lr(cfg["lr"], it, cfg["iters"], cfg["power"], cfg["warmup"]))
            batch = [next(run.batches) for _ in range(cfg["accum_steps"])]  # Part II: data order
            losses += train_step(run, batch)
            it += 1
            if stop.asked(it) or sync_iteration(cfg, it):  # the host waits for the device here
                if sync_point(run, it, losses, stop):  # Part II: progress, checkpoint, stop
                    return {"stopped_at": it, "checkpoint": run.ck_path}
        return finish(run, it)  # Part II: the final evaluation (paper 4.1: single scale)

def train_step(run, batch):
    """One SGD step on this rank's micro-batches of one batch: the loss summed over the labelled
    pixels, divided by their count in the WHOLE batch; DDP averages the ranks' gradients while
    the sum is wanted, hence `* run.world`. Returns this rank's share of the batch's mean loss."""
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
# Starting or resuming a run. Checkpoints are plain dicts of tensors and numbers, read with
# torch.load(weights_only=True). A resumed run must be the same experiment: every setting not
# SETTINGS' `free` (the data too: the split list's content) equals the checkpoint's.

RUN_OUTPUTS = ("checkpoint.pt", "log.jsonl", "eval.json", "predictions.png", "curves.png")
EXIT_STOPPED = 3  # a graceful stop (signal): a checkpoint was saved, the run is not finished

def start_or_resume(cfg, model, optimizer, scaler, train_set, device):
    """Rank 0 claims and reads --out-dir; every rank takes the weights or rank 0's checkpoint.
    Returns (claim, iteration, (epoch, micro-batch)); a refusal on any rank undoes the claim."""
    if getattr(train_set, "split", None) is not None:  # the data is part of the run
        cfg["split_sha256"] = infra.file_digest(os.path.join(
            train_set.root, "ImageSets", "Segmentation", train_set.split + ".txt"))
    size = 2.2 * sum(t.numel() * t.element_size() for t in model.state_dict().values())
    claim = infra.Claim("train.py", [("--out-dir", cfg["out_dir"], "folder")], inputs=[
        (f"--{k.replace('_', '-')}", cfg[k]) for k in ("data_root", "pretrained", "init_from")],
        rank0=True)  # one run a folder: rank 0 holds it, a refusal reaches every rank

    def decide():  # the checkpoint's training state (None: a new run), on every rank
        ck = check_out_dir(cfg, size)
        return ck and {k: ck[k] for k in ("model", "iteration", *infra.RESUME_FIELDS)}
    try:
        state = infra.on_rank0(decide)
        if state is None:
            take_weights(model, cfg)
            return claim, 0, (0, 0)
        model.load_state_dict(state["model"])  # names and shapes checked with the checkpoint
        try:  # the optimizer's and scaler's states fit only the optimizer built here: tried here
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            if any(getattr(optimizer.state[p].get("momentum_buffer", p), "shape", None) !=
                   p.shape for g in optimizer.param_groups for p in g["params"]):
                raise ValueError("a momentum buffer has another shape than its weight")
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
            raise BadInput(f"{os.path.join(cfg['out_dir'], 'checkpoint.pt')}: optimizer does "
                           f"not fit this model's optimizer "
                           f"({(str(e).splitlines() or ['?'])[0][:150]}); refused") from None
    except (BadInput, KeyboardInterrupt):
        claim.release(remove=True)
        raise
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state["rng_cuda"].numel():
        torch.cuda.set_rng_state(state["rng_cuda"])
    infra.rank0_print(f"resumed {cfg['out_dir']} at iteration {state['iteration']}")
    return claim, state["iteration"], (state["epoch"], state["batch_in_epoch"])

def take_weights(model, cfg):
    """--pretrained (torchvision files) or --init-from (our checkpoint of an earlier stage)."""
    if cfg["pretrained"]:
        try:
            infra.load_pretrained(model, cfg["pretrained"],
                                  verbose=not dist.is_initialized() or dist.get_rank() == 0)
        except BadInput as e:
            raise type(e)(f"--pretrained {e}") from None
        if cfg["multi_grid"] is not None:
            infra.rank0_print(f"note: multi-grid {cfg['multi_grid']} gives layer4 other dilations "
                              f"than torchvision's weights had (--multi-grid none keeps theirs)")
    if cfg["init_from"]:
        src = infra.read_checkpoint(cfg["init_from"])
        sd, theirs = src["model"], src["config"]["context"]
        same = theirs == model.config["context"]  # else its context module cannot serve here
        if not same:
            infra.rank0_print(f"--init-from {cfg['init_from']} holds a {theirs} model, this run "
                              f"is {model.config['context']}: only its backbone is taken")
        try:
            (model if same else model.backbone).load_state_dict(
                sd if same else {k[9:]: v for k, v in sd.items() if k.startswith("backbone.")})
        except RuntimeError as e:
            raise BadInput(f"--init-from {cfg['init_from']} does not fit this model: "
                           f"{str(e).splitlines()[1].strip()}") from None
        infra.rank0_print(f"initialised from {cfg['init_from']} (iteration {src['iteration']})")

def check_out_dir(cfg, checkpoint_bytes):
    """Rank 0, --out-dir claimed: a new run or a resume (else refused). Returns the checkpoint."""
    out = cfg["out_dir"]
    ck_path = os.path.join(out, "checkpoint.pt")
    exists = os.path.exists(ck_path)
    if cfg["resume"] == "yes" and not exists:
        raise MissingInput(f"--resume: no checkpoint at {ck_path} (--resume auto starts a new "
                           f"run when there is none)")
    if exists and cfg["resume"] is None:
        raise BadInput(f"{ck_path} exists: pass --resume to continue it, or choose another "
                       f"--out-dir (nothing is overwritten without asking)")
    ck = infra.read_checkpoint(ck_path, resume=True) if exists else None
    wrong = infra.resume_differences(ck["train_args"], cfg) if ck else []
    if wrong:
        raise BadInput(f"--resume: {ck_path} is another experiment; these differ: "
                       f"{'; '.join(wrong)}. Use the checkpoint's values, or another --out-dir. "
                       f"Safe to change on resume: " + ", ".join(
                           "--" + k.replace("_", "-") for k, s in infra.SETTINGS.items()
                           if s.free and k in cfg))
    if ck and ck["iteration"] > cfg["iters"]:
        raise BadInput(f"--resume: {ck_path} is at iteration {ck['iteration']}, past --iters "
                       f"{cfg['iters']}; give --iters {ck['iteration']} or more (results are kept)")
    if ck and ck["iteration"] == cfg["iters"]:
        print(f"{ck_path} is at iteration {cfg['iters']} (--iters): nothing left to train; "
              + ("nothing is done" if cfg["no_eval"] else "the final evaluation runs again and "
                 "replaces eval.json and predictions.png"))
    infra.existing([os.path.join(out, f) for f in RUN_OUTPUTS], cfg["resume"] is not None,
                   "they are an earlier run's results: choose another --out-dir (or --resume "
                   "auto to replace them)")
    free, limit = shutil.disk_usage(out).free, resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if free < 1.2 * checkpoint_bytes:  # the new checkpoint's temp file beside the old one
        raise BadInput(f"--out-dir {out}: {free / 2 ** 30:.2f} GiB free, but a checkpoint "
                       f"of this model takes about {checkpoint_bytes / 2 ** 30:.2f} GiB")
    if limit != resource.RLIM_INFINITY and limit < checkpoint_bytes:
        raise BadInput(f"the file-size limit (ulimit -f) is {limit / 2 ** 20:.0f} MB, but a "
                       f"checkpoint of this model takes about {checkpoint_bytes / 2 ** 20:.0f} MB")
    truncate_log(os.path.join(out, "log.jsonl"), ck["iteration"] if ck else 0)  # new run: new log
    return ck

def save_checkpoint(run, it):
    position = advance(run.position, (it - run.iteration) * run.cfg["accum_steps"], run.per_epoch)
    ck = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
          "scaler": run.scaler.state_dict() if run.scaler is not None else {},
          "iteration": it, "epoch": position[0], "batch_in_epoch": position[1],
          "rng_cpu": torch.get_rng_state(),
          "rng_cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else torch.empty(
              0, dtype=torch.uint8),
          "config": run.model.config, "train_args": run.cfg, "dataset": run.cfg["dataset"],
          "classes": list(run.train_set.classes),
          "palette": np.asarray(run.train_set.palette).tolist(),
          "data_args": {"num_images": run.cfg["val_images"], "image_size": run.cfg["image_size"]}
              if run.cfg["dataset"] == "synthetic" else {}}
    infra.atomic_save(run.ck_path, lambda f: torch.save(ck, f))
    evaluation.log_figure(run.log_path, os.path.join(run.cfg["out_dir"], "curves.png"))

def truncate_log(path, iteration):
    """Keep the log lines up to `iteration`: a killed run's tail and a torn last line go."""
    if not os.path.exists(path):
        return
    keep = "".join(json.dumps(r) + "\n" for r in infra.read_log(path) if r["iter"] <= iteration)
    if keep:
        infra.atomic_save(path, lambda f: f.write(keep.encode()))
    else:
        os.unlink(path)


# ---------------------------------------------------------------------------------------------
# The data: one stream of micro-batches, one loader for the whole run. Epoch e is a shuffle of
# the dataset (DistributedSampler's, seeded by e) cut into this rank's micro-batches; the stream
# starts anywhere and runs on across epochs: a resumed run sees the data it would have seen.

class SampleOrder(torch.utils.data.Sampler):
    """(epoch, index) keys of this rank's samples, micro-batch after micro-batch, from `start`."""

    def __init__(self, dataset, rank, world, seed, micro, start=(0, 0)):
        self.args, self.micro, self.start = (dataset, world, rank, True, seed, True), micro, start
        self.per_epoch = len(dataset) // world // micro  # micro-batches per epoch and rank

    def __iter__(self):
        epoch, b = self.start
        while True:
            s = torch.utils.data.DistributedSampler(*self.args)
            s.set_epoch(epoch)
            for i in list(s)[b * self.micro: self.per_epoch * self.micro]:
                yield epoch, i
            epoch, b = epoch + 1, 0

def quiet_worker(_):
    """Ctrl-C (SIGINT to the whole process group) is the trainer's: it saves, then stops us."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

def advance(position, micro_batches, per_epoch):
    """(epoch, micro-batch in epoch) after `micro_batches` more."""
    n = position[0] * per_epoch + position[1] + micro_batches
    return n // per_epoch, n % per_epoch

def data_stream(train_set, cfg, rank, world, micro, position, device):
    """This rank's micro-batches from `position` on, through one DataLoader for the run."""
    return iter(torch.utils.data.DataLoader(
        train_set, micro, sampler=SampleOrder(train_set, rank, world, cfg["seed"], micro, position),
        num_workers=cfg["workers"], pin_memory=device.type == "cuda",
        persistent_workers=cfg["workers"] > 0, worker_init_fn=quiet_worker,
        prefetch_factor=4 if cfg["workers"] > 0 else None,
        # its own generator: an iterator would otherwise draw a seed from the global RNG
        generator=torch.Generator().manual_seed(cfg["seed"])))


# ---------------------------------------------------------------------------------------------
# Around the loop: signals, sync points, progress lines, the end of a run.

class guard(contextlib.AbstractContextManager):
    """SIGINT/SIGTERM (and --stop-after) ask for a save and stop at the next sync point, a second
    one (or one during the final evaluation) stops at once (docs/troubleshooting.md)."""

    def __init__(self, run):
        self.run, self.it, self.name = run, run.iteration, None
        self.last_sync = (run.iteration, run.t0)

    def __enter__(self):
        run, cfg = self.run, self.run.cfg
        infra.rank0_print(
            f"training {cfg['dataset']} ({len(run.train_set)} images), ResNet-{cfg['depth']} OS "
            f"{cfg['output_stride']}, context {cfg['context']}, {run.world} rank(s) x {run.micro} "
            f"images x {cfg['accum_steps']} micro-step(s), sync BN {run.sync_bn}, {cfg['iters']} "
            f"iterations, device {run.device}; out: {cfg['out_dir']}")

        def on_signal(signum, frame):
            name, ck = signal.Signals(signum).name, run.ck_path
            if self.name is not None or self.it >= cfg["iters"]:
                kept = f"the last checkpoint {ck} is kept" if os.path.exists(ck) else \
                    "no checkpoint was saved"
                infra.rank0_print(f"{name}{' again' if self.name else ''}: stopped at once, "
                                  f"without saving; {kept}", file=sys.stderr)
                raise SystemExit(130)
            self.name = name
            at = next(j for j in range(self.it + 1, cfg["iters"] + 1) if sync_iteration(cfg, j))
            infra.rank0_print(f"{name}: a checkpoint will be saved at iteration {at} (the next "
                              f"sync point), then the run stops; {name} again stops at once "
                              f"without saving", file=sys.stderr)
        self.old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def asked(self, it):
        """After iteration `it`: whether --stop-after's steps are done, which every rank knows
        at once. A signal reaches one process: the ranks learn of it at the next sync point."""
        self.it, due = it, it - self.run.iteration == self.run.cfg["stop_after"]
        if due:
            self.name = self.name or "SIGTERM (--stop-after)"
        return due

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        self.run.batches = None  # shuts the loader workers down, before the process group goes
        self.run.claim.release()

def sync_iteration(cfg, it):
    """The loop's sync points: a progress line, a checkpoint, the end."""
    return it % cfg["log_every"] == 0 or it % cfg["save_every"] == 0 or it == cfg["iters"]

def sync_point(run, it, losses, stop):
    """The loop's one host synchronisation (one all_reduce, one copy): the mean loss, a stop
    asked on any rank, finite weights; then the progress lines, a checkpoint. Returns: stop?"""
    cfg = run.cfg
    finite = torch.stack([p.detach().isfinite().all() for p in run.model.parameters()]).all()
    flags = torch.stack([losses, torch.tensor(float(stop.name is not None), device=run.device),
                         (~finite).float()])
    if run.world > 1:
        dist.all_reduce(flags)
    total, stops, bad_weights = flags.tolist()
    (last_it, last_t), now = stop.last_sync, time.time()
    loss = total / (it - last_it)  # each step added its batch's mean loss, in shares
    if not math.isfinite(loss) or bad_weights:
        what = f"loss is {loss}" if not math.isfinite(loss) else "weights are not finite"
        raise FloatingPointError(
            f"{what} in the iterations up to {it}: training stopped. The last good checkpoint "
            f"({run.ck_path}, if any) is left as it was; try a lower --lr or no --amp fp16")
    stop.name = stop.name or ("signal on another rank" if stops > 0 else None)
    ips = (it - last_it) * cfg["batch_size"] / max(now - last_t, 1e-9)
    eta = (cfg["iters"] - it) * (now - run.t0) / max(1, it - run.iteration)
    lr = run.optimizer.param_groups[0]["lr"]
    mem = (f"  mem {torch.cuda.max_memory_allocated(run.device) / 2 ** 30:.1f} GiB"
           if run.device.type == "cuda" else "")
    infra.rank0_print(f"it {it}/{cfg['iters']}  loss {loss:.4f}  lr {lr:.2e}  {ips:.1f} img/s  "
                      f"ETA {eta / 60:.1f} min{mem}")
    losses.zero_()
    stop.last_sync = (it, now)
    if run.rank == 0:
        with open(run.log_path, "a") as f:
            f.write(json.dumps({"iter": it, "loss": loss, "lr": lr, "img_per_s": ips,
                                "time": time.time()}) + "\n")
        if stops > 0 or it % cfg["save_every"] == 0 or it == cfg["iters"]:
            save_checkpoint(run, it)
    if stops > 0:
        infra.rank0_print(f"{stop.name}: checkpoint saved at iteration {it} to {run.ck_path}; "
                          f"continue with the same command plus --resume")
    return stops > 0

def finish(run, it):
    """The time taken, then (unless --no-eval) the saved model's evaluation: single scale (4.1)."""
    run.batches = None  # shuts the loader workers down
    took = time.time() - run.t0
    infra.rank0_print(f"trained {it - run.iteration} iterations in {took / 60:.1f} min; "
                      f"checkpoint: {run.ck_path}")
    result = {"train_seconds": took, "checkpoint": run.ck_path, "iteration": it}
    if run.cfg["no_eval"]:
        return result
    cfg, model, out, val = run.cfg, run.model, run.cfg["out_dir"], run.val_set
    if run.world > 1:  # rank 0's batch-norm statistics: what is evaluated is what was saved
        for b in model.buffers():
            dist.broadcast(b, src=0)
    torch.backends.cudnn.benchmark = False  # whole images of many sizes: no autotuning per size
    t = time.time()
    res = evaluation.evaluate(model, val, device=run.device, log=infra.rank0_print,
                              workers=cfg["workers"], amp=cfg["amp"])
    infra.rank0_print(f"{cfg['dataset']} {cfg['val_split']} ({len(val)} images, single scale):")
    ctx = getattr(run.train_set, "context_classes", ())
    infra.rank0_print(evaluation.format_table(res, run.train_set.classes, ctx))
    summary = dict({k: res[k] for k in ("miou", "iou", "pixel_acc")}, eval_seconds=time.time() - t)
    if ctx:
        summary["context_miou"] = float(np.nanmean([res["iou"][c] for c in ctx]))
    if run.rank == 0:
        infra.write_json(os.path.join(out, "eval.json"), dict(res, **summary))
        pic = evaluation.prediction_picture(model, val, run.device,
                                            os.path.join(out, "predictions.png"))
        logs = [p for p in (run.log_path, os.path.join(out, "curves.png")) if os.path.exists(p)]
        print(f"evaluation numbers: {os.path.join(out, 'eval.json')}; pictures: {pic}"
              + (f"; training log: {' and '.join(logs)}" if logs else ""))
    return dict(result, **summary)


# ---------------------------------------------------------------------------------------------
# The command line: a flag for every setting of COMMON, the presets and NO_PRESET (infra.SETTINGS).

NO_PRESET = ("dataset", "data_root", "pretrained", "init_from", "resume", "out_dir", "amp",
             "device", "stop_after")
FLAGS = tuple(k for k in infra.SETTINGS  # in SETTINGS' order, --help's
              if k in NO_PRESET or any(k in d for d in (COMMON, *PRESETS.values())))

def parse_args(argv=None, prog=None):
    """train.py's configuration: COMMON, then the dataset's preset, then the flags given."""
    defaults = "\n".join(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                         for name, d in dict(PRESETS, common=COMMON).items())
    p = infra.Parser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train DeepLab v3 with a swappable context module (Vortex Pooling, paper "
                    "4.1/4.2); a flag given overrides its dataset's preset.",
        epilog=f"defaults of each dataset, and common to all:\n{defaults}\n\nexit codes: 0 "
        f"finished, 1 failed (e.g. non-finite loss), 2 refused input, {EXIT_STOPPED} stopped by "
        f"a signal after saving a checkpoint (resume it), 130 stopped by a second signal")
    infra.add_flags(p, FLAGS)
    args = p.parse_args(argv)
    cfg = dict(COMMON, **PRESETS[args.dataset or "synthetic"])
    cfg.update({k: v for k, v in vars(args).items() if v is not None or k not in cfg})
    cfg["dataset"] = cfg["dataset"] or "synthetic"
    mg = [int(v) if str(v).lstrip("-").isdigit() else v for v in cfg["multi_grid"]]
    if args.multi_grid is None:  # the preset's rates, one per layer4 block of this depth
        mg = mg[:DEPTHS[cfg["depth"]][1][3]]
    cfg["multi_grid"] = None if [str(v).lower() for v in mg] == ["none"] else mg
    cfg["scale"] = list(cfg["scale"])
    if cfg["out_dir"] is None:
        cfg["out_dir"] = os.path.join("runs", f"{cfg['dataset']}-{cfg['context']}")
    infra.check_settings(cfg)
    for k in ("data_root", "pretrained", "init_from"):  # resume: the same files
        cfg[k] = cfg[k] and os.path.abspath(cfg[k])
    return cfg

def per_rank_images(cfg, world, device, n_images):
    """Images per rank and micro-step; refuses a batch that cannot train batch norm."""
    if cfg["amp"] == "fp16" and device.type != "cuda":
        raise BadInput("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    per, accum = cfg["batch_size"] / (world * cfg["accum_steps"]), cfg["accum_steps"]
    if not per.is_integer():
        raise BadInput(f"--batch-size {cfg['batch_size']} (global) must be divisible by "
                       f"ranks x --accum-steps = {world} x {accum}")
    seen = int(per) * (world if cfg["sync_bn"] != "off" else 1)
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

def main(argv=None):
    cfg = parse_args(argv)
    vortex.keep_freed_memory()  # large tensors reuse memory instead of page-faulting it in
    try:
        return train(cfg)
    except FloatingPointError as e:
        sys.exit(str(e))
    except RuntimeError as e:  # a rank killed or its node down: one line, not a traceback
        if not infra.lost_rank(e):
            raise
        sys.exit(f"error: {infra.lost_rank(e)}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    infra.end(lambda: EXIT_STOPPED if "stopped_at" in (infra.cli(main) or {}) else 0)
