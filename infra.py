"""Run infrastructure, not the paper: the gates every command's input passes, once, where it
enters (settings, checkpoints, outputs, records, names), and what runs around the paper's code:
progress, devices, processes. Known-bad input raises BadInput: one line, exit code 2 (`cli`).
"""
import argparse
import errno
import fcntl
import hashlib
import json
import math
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

import vortex

class BadInput(ValueError):
    """Known-bad input the user can fix (a flag, a file): one line, exit code 2, no traceback."""

class MissingInput(BadInput, FileNotFoundError):
    """A file or folder that should exist does not."""

class ExistingOutput(BadInput, FileExistsError):
    """An output exists and is not overwritten without being asked (--force / --overwrite)."""

def cli(main):
    """main(), with BadInput as 'error: ...' and exit code 2, Ctrl-C as one line and code 130."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted: stopped at once; the files written so far are kept, each whole (a "
              "result file is written only at the end)", file=sys.stderr)
        sys.exit(130)
    except BadInput as e:
        message = str(e)
        if "Original Traceback" in message:  # raised in a DataLoader worker: its last line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

def shown(value, n=60):
    """A value in a one-line message: its repr on one line, cut at n characters."""
    return " ".join(repr(value).split())[:n]


# =============================================================================================
# Settings: one table of every option. A value one command accepts, every command accepts.
# =============================================================================================

class Setting(NamedTuple):
    kind: object  # int, float, str, bool, "path" (any file name) or "name" (a plain one)
    allowed: object  # (lowest, highest), a list of choices, or None
    help: str
    free: bool = False  # may change when a run is resumed (not part of the experiment)
    nargs: object = None
    const: object = None  # the value of the flag given alone (nargs '?')

DATASETS = ("synthetic", "voc", "voc_aug", "coco")
S = Setting
SETTINGS = {
    # the data
    "dataset": S(str, list(DATASETS), "synthetic (built in), voc, voc_aug (paper 4.1) or coco"),
    "data_root": S("path", None, "the VOC2012 folder, or the prepare-coco output folder"),
    "split": S("name", None, "training list under ImageSets/Segmentation"),
    "val_split": S("name", None, "list evaluated at the end"),
    "num_images": S(int, (1, 10 ** 7), "synthetic: training images"),
    "val_images": S(int, (1, 10 ** 7), "synthetic: validation images"),
    "image_size": S(int, (32, 4096), "synthetic: image side"),
    "crop": S(int, (4, 8192), "training crop side, at least 4 x the output stride (paper: 513)"),
    "scale": S(float, (0.05, 10.0), "random scale range MIN MAX (paper: 0.5 2.0)", nargs=2),
    # the model (DeepLabV3's arguments: the checkpoint's config)
    "num_classes": S(int, (1, 255), "classes the classifier predicts"),
    "depth": S(int, sorted(vortex.DEPTHS), "ResNet depth"),
    "context": S(str, list(vortex.CONTEXTS), "context module (paper: vortex)"),
    "pool_k": S(int, (1, 99), "Module A's pooling size k, odd"),
    "output_stride": S(int, [8, 16, 32], "paper: 8"),
    "multi_grid": S(int, (1, 64), "layer4 rate multipliers, one per block (paper: 1 2 4); "
                    "'none' for torchvision's dilated geometry", nargs="+"),
    "base_channels": S(int, (1, 4096), "ResNet width (64 = standard; synthetic: 16)"),
    "context_channels": S(int, (1, 8192), "context module width (paper: 256)"),
    "dropout": S(float, (0.0, 0.99), "dropout before the classifier (DeepLab's 0.1)"),
    "count_include_pad": S(bool, None, "average over the zero padding too (AvgPool2d's default)"),
    # the optimisation (paper 4.1)
    "batch_size": S(int, (1, 10 ** 5), "GLOBAL batch, over ranks and --accum-steps (paper: 16)"),
    "accum_steps": S(int, (1, 10 ** 4), "micro-steps per step (gradient accumulation)"),
    "iters": S(int, (1, 10 ** 8), "optimizer steps (paper: 30000)", free=True),
    "lr": S(float, (1e-8, 10.0), "base learning rate of the poly policy (paper: 0.007)"),
    "power": S(float, (0.01, 10.0), "poly power (paper: 0.9)"),
    "warmup": S(float, (0.0, 0.99), "warm-up fraction of --iters (paper: 0; synthetic: 0.3)"),
    "momentum": S(float, (0.0, 0.999), "SGD momentum (0.9)"),
    "weight_decay": S(float, (0.0, 1.0), "SGD weight decay (1e-4)"),
    "seed": S(int, (0, 2 ** 32 - 1), "seed of weights, data order and augmentation"),
    "freeze_bn": S(bool, None, "keep batch norm fixed (DeepLab v3's last stage, paper 4.2)"),
    # how a run goes: free to change on resume
    "workers": S(int, (0, 256), "data-loader processes per rank (0: none)", free=True),
    "pretrained": S("path", None, "local torchvision ResNet or deeplabv3_*_coco file", free=True),
    "init_from": S("path", None, "our checkpoint of an earlier stage (paper 4.2)", free=True),
    "sync_bn": S(str, ["auto", "torch", "ours", "off"], "batch-norm statistics over all ranks "
                 "(paper 4.1): auto = torch's on CUDA, ours on CPU; off = per rank", free=True),
    "resume": S(str, ["yes", "auto"], "continue --out-dir's checkpoint; 'auto' resumes when "
                "one exists (torchrun --max-restarts)", free=True, nargs="?", const="yes"),
    "out_dir": S("path", None, "where checkpoint, log and pictures go", free=True),
    "save_every": S(int, (1, 10 ** 8), "checkpoint every N iterations", free=True),
    "log_every": S(int, (1, 10 ** 8), "progress line every N iterations", free=True),
    "stop_after": S(int, (1, 10 ** 8), "testing aid: as if SIGTERM after N iterations", free=True),
    "amp": S(str, ["bf16", "fp16"], "mixed precision: bf16 autocast (--amp alone), or fp16 "
             "with a gradient scaler (CUDA only)", free=True, nargs="?", const="bf16"),
    "channels_last": S(bool, None, "NHWC memory format", free=True),
    "compile": S(bool, None, "torch.compile the model", free=True),
    "deterministic": S(bool, None, "reproducible CUDA kernels (slower)", free=True),
    "no_eval": S(bool, None, "skip the evaluation at the end", free=True),
    "device": S(str, None, "cpu, cuda or cuda:N (default: cuda when available)", free=True),
    # evaluation and the other commands
    "checkpoint": S("path", None, "a checkpoint written by train.py"),
    "scales": S(float, (0.05, 8.0), "inference scales (paper 4.1 ablations: 1.0)", nargs="+"),
    "threads": S(int, (0, 1024), "torch CPU threads (0: torch's default)"),
    "seeds": S(int, (1, 100), "seeds per module"),
    "force": S(bool, None, "overwrite outputs that exist"),
    "save_dir": S("path", None, "write palette PNGs and image|truth|prediction panels here"),
    "json": S("path", None, "write all numbers here (default: beside the checkpoint, "
              "eval_<dataset>_<split>_s<scales>[_flip].json)"),
    "image": S("path", None, "an image, or a folder of images"),
    "out": S("path", None, "the file or folder written"),
    "min_pixels": S(int, (0, 10 ** 8), "COCO objects of a VOC class smaller than this are "
                    "discarded: marked 255, ignored by the loss (paper 4.2: 1000)")}
del S

class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")

def allowed_text(name):
    s = SETTINGS[name]
    if isinstance(s.allowed, tuple):
        lo, hi = s.allowed
        return f"a whole number in {lo}..{hi}" if s.kind is int else f"a number in [{lo:g}, {hi:g}]"
    if s.allowed:
        return "one of " + ", ".join(map(str, s.allowed))
    return {bool: "a flag", "path": "a file or folder name",
            "name": "a plain file name (no folder part, no white space)"}.get(s.kind, "text")

def add_flags(parser, names, default=None, required=(), **helps):
    """argparse flags for `names`, unset by default (a preset or a checkpoint fills them in),
    their help SETTINGS' or `helps`' (what the flag means to this command)."""
    for name in names:
        s, flag = SETTINGS[name], "--" + name.replace("_", "-")
        text = helps.get(name, s.help)
        if s.kind is bool:
            parser.add_argument(flag, action="store_const", const=True, default=default, help=text)
            continue
        text = f"{text} [{allowed_text(name)}]" if isinstance(s.allowed, tuple) else text
        kind = s.kind if s.kind in (int, float) and name != "multi_grid" else str  # 'none' too
        parser.add_argument(flag, type=kind, nargs=s.nargs,
                            choices=s.allowed if isinstance(s.allowed, list) else None,
                            const=s.const, default=default, help=text, required=name in required,
                            metavar="RATE" if name == "multi_grid" else None)

def check_value(name, value):
    """None when `value` is allowed for setting `name`, else what is allowed (a phrase)."""
    s, many = SETTINGS[name], SETTINGS[name].nargs not in (None, "?")
    if value is None:
        return None
    if many and (not isinstance(value, (list, tuple)) or not value or (
            isinstance(s.nargs, int) and len(value) != s.nargs)):
        return f"{s.nargs if isinstance(s.nargs, int) else 'one or more'} values, each " \
               f"{allowed_text(name)}"
    types = {float: (int, float), "path": (str,), "name": (str,)}.get(s.kind, (s.kind,))
    for v in value if many else [value]:
        if s.kind == "path" and path_problem(v):
            return f"a file or folder name ({path_problem(v)})"
        if type(v) not in types:
            ok = False
        elif isinstance(s.allowed, tuple):
            ok = s.allowed[0] <= v <= s.allowed[1]  # NaN and infinities are outside too
        elif s.kind == "name":
            ok = is_plain_name(v)
        else:  # one of a list of choices, or text that is not blank
            ok = v in s.allowed if s.allowed else s.kind is not str or v.strip() != ""
        if not ok:
            return allowed_text(name)
    return None

def check_settings(cfg, where=None):
    """Every setting of `cfg` that SETTINGS knows, and the rules between settings; one line
    naming the first that is wrong: '--flag value: ...', or 'FILE: config.field is ...'."""
    def refuse(name, allowed):
        value = cfg[name]
        text = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        if isinstance(value, str) and not (value.strip() == value != "" and value.isprintable()):
            text = shown(value)  # blank, spaces around it, a control character: quoted, one line
        if where:
            raise BadInput(f"{where}.{name} is {shown(value)}; allowed: {allowed}")
        raise BadInput(f"--{name.replace('_', '-')} {text}: must be {allowed}")
    for name in cfg:
        problem = check_value(name, cfg[name]) if name in SETTINGS else None
        if problem:
            refuse(name, problem)
    get = cfg.get
    if get("pool_k") is not None and get("pool_k") % 2 == 0:
        refuse("pool_k", "an odd whole number in 1..99 (a centred window)")
    if get("crop") is not None and get("output_stride") and get("crop") < 4 * get("output_stride"):
        refuse("crop", f"at least 4 x the output stride ({4 * get('output_stride')}), so that "
                       f"the context module sees a feature map of 4 x 4 or more")
    if get("scale") is not None and get("scale")[0] > get("scale")[1]:
        refuse("scale", "MIN <= MAX (paper: 0.5 2.0)")
    if get("multi_grid") is not None and get("depth") in vortex.DEPTHS:
        blocks = vortex.DEPTHS[get("depth")][1][3]
        if len(get("multi_grid")) != blocks:
            refuse("multi_grid", f"{blocks} whole numbers in 1..64, one per layer4 block of "
                                 f"ResNet-{get('depth')} (paper: 1 2 4), or none")
    return cfg

def resume_differences(saved, cfg):
    """The settings of a run's identity (not SETTINGS' free ones) whose value differs from the
    checkpoint's (one it does not record differs too), as '--flag now (checkpoint: then)'."""
    def plain(c, k):  # as JSON: a tuple and its list are equal, True and 1 are not
        return json.dumps(c.get(k, "unrecorded"), default=repr)
    return [f"--{k.replace('_', '-')} {json.loads(plain(cfg, k))} (checkpoint: "
            f"{json.loads(plain(saved, k))})" for k in sorted(set(cfg) | set(saved))
            if not (k in SETTINGS and SETTINGS[k].free) and plain(cfg, k) != plain(saved, k)]


# =============================================================================================
# Checkpoints: one reader for every command that loads one.
# =============================================================================================

def read_weights(path):
    """torch.load(weights_only=True), errors naming the file; every tensor dense, real, finite in
    float32 (the dtype the model runs in: 1e300 in float64 is inf there), running_var >= 0."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MissingInput(f"checkpoint not found: {path}") from None
    except (IsADirectoryError, PermissionError) as e:
        why = "it is a folder" if isinstance(e, IsADirectoryError) else "permission denied"
        raise BadInput(f"cannot read {path}: {why}") from None
    except Exception as e:  # truncated file, not a torch file, pickled code objects...
        first = (str(e).strip().splitlines() or ["empty file"])[0]
        raise BadInput(f"cannot read {path} as a weights-only torch checkpoint: it is truncated, "
                       f"corrupt or not a torch file ({type(e).__name__}: {first[:200]})") from None
    for name, t in _tensors(obj):
        if t.layout != torch.strided or t.is_meta or t.is_complex() or t.is_quantized:
            problem = (f"is {t.layout if t.layout != torch.strided else t.dtype} "
                       f"{'on meta ' if t.is_meta else ''}(only dense real tensors are read)")
        elif t.is_floating_point() and not torch.isfinite(t.float()).all():
            problem = ("holds NaN or infinite values in float32 (a diverged run, or values "
                       "beyond float32's range)")
        elif t.is_floating_point() and name.endswith("running_var") and (t < 0).any():
            problem = "holds a negative variance"
        else:
            continue
        raise BadInput(f"{path}: tensor {name or '(the file)'} {problem}; refused")
    return obj

def _tensors(obj, name=""):
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}[{i}]")

def load_pretrained(model, path, verbose=True):
    """--pretrained: a torchvision state dict (or one under 'state_dict') into ResNet/DeepLabV3."""
    sd = read_weights(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BadInput(f"{path} is not a state_dict (a dict of name -> tensor)")
    try:
        return vortex.load_backbone_weights(model, sd, path, verbose)
    except ValueError as e:
        raise BadInput(str(e)) from None

def _whole(lo, hi):
    return (lambda v: type(v) is int and lo <= v <= hi), f"a whole number in {lo}..{hi}"

def _is(kind, what, ok=lambda v: True):
    return (lambda v: isinstance(v, kind) and ok(v)), what

CONFIG = ("num_classes", "depth", "context", "output_stride", "pool_k", "multi_grid",
          "base_channels", "context_channels", "dropout", "count_include_pad")
CHECKPOINT_FIELDS = {  # every checkpoint; RESUME_FIELDS too for --resume
    "model": _is(dict, "a dict of name -> tensor", lambda v: all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())),
    "config": _is(dict, f"a dict of {', '.join(CONFIG)}"),
    "iteration": _whole(0, 10 ** 9),
    "dataset": (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    "classes": _is(list, "a list of class names", lambda v: all(isinstance(c, str) for c in v)),
    "palette": _is(list, "256 [r, g, b] colours of 0..255", lambda v: len(v) == 256 and all(
        isinstance(c, list) and len(c) == 3 and all(_whole(0, 255)[0](x) for x in c) for c in v)),
    "data_args": _is(dict, "{} or {num_images: 1..10^7, image_size: 32..4096}", lambda v: (
        set(v) <= {"num_images", "image_size"} and _whole(1, 10 ** 7)[0](v.get("num_images", 1))
        and _whole(32, 4096)[0](v.get("image_size", 32)))),
    "train_args": _is(dict, "the dict of train.py's settings")}
RESUME_FIELDS = {
    "optimizer": _is(dict, "an optimizer state (state, param_groups)", lambda v: isinstance(
        v.get("state"), dict) and isinstance(v.get("param_groups"), list)),
    "scaler": _is(dict, "a gradient-scaler state ({} without fp16)"),
    "epoch": _whole(0, 10 ** 12), "batch_in_epoch": _whole(0, 10 ** 12),
    "rng_cpu": _is(torch.Tensor, f"a uint8 tensor of {torch.get_rng_state().numel()} bytes",
                   lambda v: v.dtype == torch.uint8 and v.shape == torch.get_rng_state().shape),
    "rng_cuda": _is(torch.Tensor, "a 1-D uint8 tensor (empty without CUDA)", lambda v: v.dim()
                    == 1 and (v.dtype == torch.uint8 or v.numel() == 0))}

def read_checkpoint(path, resume=False):
    """A train.py checkpoint, checked whole before anything is built from it: its tensors, every
    field, config and train_args through SETTINGS and against each other, and every weight's
    name and shape against the model its config describes."""
    ck = read_weights(path)
    if not isinstance(ck, dict):
        raise BadInput(f"{path} is not a train.py checkpoint (a dict with model, config...)")
    for name, (ok, allowed) in dict(CHECKPOINT_FIELDS, **(RESUME_FIELDS if resume else {})).items():
        if name not in ck:
            raise BadInput(f"{path}: {name} is missing (not a complete train.py checkpoint); "
                           f"expected {allowed}")
        if not ok(ck[name]):
            raise BadInput(f"{path}: {name} is {shown(ck[name])}; allowed: {allowed}")
    cfg, ta = ck["config"], ck["train_args"]
    for k in ("dataset", "val_split", "data_root", "seed"):  # what other commands read of it
        if k not in ta:
            raise BadInput(f"{path}: train_args.{k} is missing (not a complete train.py "
                           f"checkpoint)")
    if set(cfg) != set(CONFIG):
        odd = sorted(set(cfg) ^ set(CONFIG), key=str)[0]
        raise BadInput(f"{path}: config.{odd} is {'unknown' if odd in cfg else 'missing'}; "
                       f"config holds {', '.join(CONFIG)}")
    unset = [k for k in CONFIG if cfg[k] is None and k != "multi_grid"]
    if unset:
        raise BadInput(f"{path}: config.{unset[0]} is None; allowed: {allowed_text(unset[0])}")
    check_settings(dict(cfg), f"{path}: config")
    check_settings({k: v for k, v in ta.items() if k in SETTINGS}, f"{path}: train_args")
    synthetic = {"num_images": ta.get("val_images"), "image_size": ta.get("image_size")}
    pairs = [("len(classes)", len(ck["classes"]), "config.num_classes", cfg["num_classes"]),
             ("train_args.dataset", ta.get("dataset"), "dataset", ck["dataset"]),
             ("data_args", ck["data_args"], "train_args' val_images and image_size",
              synthetic if ck["dataset"] == "synthetic" else {})]
    pairs += [(f"train_args.{k}", ta.get(k), f"config.{k}", cfg[k]) for k in CONFIG
              if k not in ("num_classes", "dropout")]
    for a, x, b, y in pairs:
        if json.dumps(x, sort_keys=True) != json.dumps(y, sort_keys=True, default=list):
            raise BadInput(f"{path}: {a} is {shown(x)} but {b} is {shown(y)}: they must agree "
                           f"(an edited or mixed-up checkpoint); refused")
    with torch.device("meta"):  # the model's names and shapes, without its memory
        want = {k: tuple(v.shape) for k, v in vortex.DeepLabV3(**cfg).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in ck["model"].items()}
    wrong = ([f"{k}: missing" for k in want if k not in have] +
             [f"{k}: not in the model" for k in have if k not in want] +
             [f"{k}: shape {have[k]}, the model's {want[k]}" for k in want
              if k in have and have[k] != want[k]])
    if wrong:
        more = f"; {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise BadInput(f"{path}: its weights do not fit the model its config describes (model."
                       f"{'; model.'.join(wrong[:3])}{more})")
    return ck

def model_from_checkpoint(ck, path="checkpoint", **expected):
    """The model of a checked checkpoint; a flag that contradicts its architecture is refused."""
    cfg = dict(ck["config"])
    wrong = [f"{k}: checkpoint has {cfg.get(k)!r}, flags say {v!r}" for k, v in expected.items()
             if v is not None and cfg[k] != v]
    if wrong:
        raise BadInput(f"{path} does not match the requested architecture: " + "; ".join(wrong))
    cfg["multi_grid"] = None if cfg["multi_grid"] is None else tuple(cfg["multi_grid"])
    model = vortex.DeepLabV3(**cfg)
    model.load_state_dict(ck["model"])
    return model


# =============================================================================================
# Names: one rule for every flag and record field that names a file.
# =============================================================================================

def path_problem(path):
    """What keeps `path` from naming a file here (a short phrase), or None."""
    if not isinstance(path, str):
        return "it is not text"
    if not path.strip():
        return "it is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "it holds a control character: a NUL, a new line, a tab..."
    try:
        parts = [p.encode() for p in path.split(os.sep)]
    except UnicodeEncodeError:
        return "it holds characters the file system cannot store"
    if max(len(p) for p in parts) > 250 or len(path.encode()) > 4000:
        return "longer than the file system allows: 250 bytes a name, 4000 a path"
    return None

def path(value, flag):
    problem = path_problem(value)
    if problem:
        raise BadInput(f"{flag} {shown(value)}: must be a file or folder name ({problem})")
    return value

def is_plain_name(name):
    """A file name or id that stays in its folder: no folder part, '..', absolute path or space."""
    return (isinstance(name, str) and name not in ("", ".", "..") and path_problem(name) is None
            and os.path.basename(name) == name and "\\" not in name
            and not any(c.isspace() for c in name))

def plain_name(name, what):
    if not is_plain_name(name):
        raise BadInput(f"{what} {shown(name)} is not a plain file name inside its folder (a "
                       f"folder part, '..', white space or an absolute path); refused")
    return name


# =============================================================================================
# Outputs: one claim, made before any work.
# =============================================================================================

PICTURES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

def _lock(lock_path, what):
    """fd of an exclusive fcntl lock on `lock_path` (the system drops it with the process, even
    after kill -9), our name written in; or the holder's name when another process holds it."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return holder
        try:  # the holder before us removed the file as we opened it: lock the new one
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{what} (pid {os.getpid()} on {socket.gethostname()})".encode())
            except OSError:  # e.g. the file-size limit: we hold it, so we may remove it
                os.unlink(lock_path)
                os.close(fd)
                raise
            return fd
        os.close(fd)

class Claim:
    """The outputs of one command, claimed before any work: `outputs` are (flag, path, kind),
    kind 'folder' or the file name endings its format allows. Each is checked (name, inputs,
    kind, in use, exists without `force`: one line, nothing left behind) and locked (a folder by
    its .lock, a file by .<name>.lock beside it) until release(); `rank0`: rank 0 alone claims,
    and a refusal reaches every rank."""

    def __init__(self, what, outputs, inputs=(), force=False,
                 hint="pass --force to overwrite, or choose another name", rank0=False):
        self.held, self.made = [], []
        if rank0:
            on_rank0(self._take, what, outputs, inputs, force, hint)
        else:
            self._take(what, outputs, inputs, force, hint)

    def _take(self, what, outputs, inputs, force, hint):
        try:
            for flag, out, kind in outputs:
                path(out, flag)
                refuse_inputs([out], inputs)
                folder = kind == "folder"
                if not folder and os.path.splitext(out)[1].lower() not in kind:  # ".png": no name
                    raise BadInput(f"{flag} {out}: this output is written as {kind[0][1:].upper()}"
                                   f"; give a name ending in {' or '.join(kind)}, e.g. a{kind[0]}")
                if os.path.isdir(out) != folder and os.path.exists(out):
                    raise BadInput(f"{flag} {out} is {'a file' if folder else 'a folder'}; "
                                   f"give {'a folder' if folder else 'a file name'}")
                parent = out if folder else os.path.dirname(os.path.abspath(out))
                top, p = None, os.path.abspath(parent)  # the outermost folder we will make
                while not os.path.exists(p):
                    p, top = os.path.dirname(p), p
                self.made.append(top)
                lock = os.path.join(out, ".lock") if folder else os.path.join(
                    parent, f".{os.path.basename(out)}.lock")
                try:
                    os.makedirs(parent, exist_ok=True)
                except OSError as e:
                    raise BadInput(f"{flag} {out}: cannot write into {parent} "
                                   f"({e.strerror or e})") from None
                try:
                    fd = _lock(lock, what)
                except OSError as e:
                    raise BadInput(f"cannot write the lock {lock}: {write_failure(e, parent, 0)}"
                                   f"; nothing was started") from None
                if isinstance(fd, str):
                    raise BadInput(f"{out} is in use by {fd}; wait for it to finish, or choose "
                                   f"another {'folder' if folder else 'name'}")
                self.held.append((fd, lock))
                if not folder:
                    existing([out], force, hint)
        except BaseException:
            self.release(remove=True)
            raise

    def release(self, remove=False):
        """Remove the locks; with `remove` (a refused start) also the folders made, if empty."""
        for fd, lock in reversed(self.held):
            os.unlink(lock)  # only the holder removes it, before letting go
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self.held = []
        for top in self.made if remove else ():
            for folder, _, files in os.walk(top or "", topdown=False):
                if not files and not os.listdir(folder):  # made by us and still empty
                    os.rmdir(folder)
        self.made = []

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.release(remove=kind is not None and issubclass(kind, (BadInput, KeyboardInterrupt)))

def refuse_inputs(paths, inputs):
    """An output that is (hard links too), holds or lies inside one of `inputs` is refused."""
    for p in paths:
        for flag, i in ((f, i) for f, i in inputs if i):
            o, r = os.path.realpath(p), os.path.realpath(i)
            same = o == r or (os.path.exists(p) and os.path.exists(i) and os.path.samefile(p, i))
            how = "is" if same else "holds" if r.startswith(o.rstrip(os.sep) + os.sep) else \
                "lies inside" if o.startswith(r.rstrip(os.sep) + os.sep) else None
            if how:
                raise BadInput(f"output {p} {how} the input {flag} {i}: an output never replaces "
                               f"or writes into an input, whatever the flags; choose another")

def existing(paths, force, hint):
    """Refuse the first of `paths` that exists (an empty folder loses nothing), unless `force`."""
    there = [p for p in paths if os.path.exists(p) and not (os.path.isdir(p) and not
                                                            set(os.listdir(p)) - {".lock"})]
    if there and not force:
        more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
        raise ExistingOutput(f"{there[0]} exists{more}; {hint}")

def atomic_save(out, write):
    """write(file) on a temp file beside `out`, renamed over `out`: a crash never leaves a
    half-written file. Permissions as open() gives them; a failed write (disk full, read-only
    folder) is one line naming the file and the cause, leaving nothing behind."""
    d, base = os.path.split(os.path.abspath(out))
    try:
        os.makedirs(d, exist_ok=True)
        for old in os.listdir(d):  # a kill mid-save leaves .tmp-XXXX<name> behind
            if old.startswith(".tmp-") and old.endswith(base) and len(old) > len(base) + 5:
                os.unlink(os.path.join(d, old))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=base)
    except OSError as e:
        raise BadInput(f"cannot write {out}: {e.strerror or e}") from None
    try:
        umask = os.umask(0)  # reading it means setting it: set it back
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        written = os.path.getsize(tmp)
        os.unlink(tmp)
        raise BadInput(f"cannot write {out}: {write_failure(e, d, written)}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

def write_failure(error, folder, written):
    """Why a write failed, in words: no space, the file-size limit, or the system's message."""
    code, free = getattr(error, "errno", None), shutil.disk_usage(folder).free
    limit, so_far = resource.getrlimit(resource.RLIMIT_FSIZE)[0], written / 2 ** 20
    if code == errno.EFBIG or written >= limit != resource.RLIM_INFINITY:
        return (f"file too large: the file-size limit (ulimit -f) is {limit / 2 ** 20:.1f} MB "
                f"and it stopped after {so_far:.1f} MB")
    why = (str(getattr(error, "strerror", None) or error).strip().splitlines() or ["?"])[0]
    if code == errno.ENOSPC or free < 2 ** 20 + written // 100:
        why = "no space left on the device"
    return f"{why} (it stopped after {so_far:.1f} MB; {free / 2 ** 20:.0f} MB free there)"

def write_json(out, obj):
    """Strict JSON, atomically: NaN and infinities become null, which every JSON reader accepts."""
    nulled = json.loads(json.dumps(obj), parse_constant=lambda nan_or_infinity: None)
    text = json.dumps(nulled, indent=1, allow_nan=False)
    atomic_save(out, lambda f: f.write(text.encode() + b"\n"))

def save_picture(out, pixels):
    """An RGB uint8 array as a picture, in the format its name says (PICTURES), atomically."""
    from PIL import Image
    fmt = Image.registered_extensions()[os.path.splitext(out)[1].lower()]
    atomic_save(out, lambda f: Image.fromarray(pixels).save(f, format=fmt))
    return out


# =============================================================================================
# Records and lists: one reader per kind, every file read as untrusted (even our own).
# =============================================================================================

def read_text(p, what, limit=64 * 2 ** 20):
    """The text of a file: at most `limit` bytes; UTF-8 (a byte-order mark dropped) or UTF-16
    with its byte-order mark (as Windows editors save); otherwise one line naming the file."""
    try:
        size = os.path.getsize(p)
        if size > limit:
            raise BadInput(f"{what} {p} is {size / 2 ** 20:.1f} MB; the limit is "
                           f"{limit / 2 ** 20:.0f} MB")
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise MissingInput(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise BadInput(f"{what} {p} is a folder, not a file") from None
    except OSError as e:
        raise BadInput(f"cannot read {what} {p}: {e.strerror or e}") from None
    codec = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as e:
        raise BadInput(f"{what} {p} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                       f"{e.start}); save it as UTF-8") from None

def parse_json(text, strict=True):
    """(value, None), or (None, why `text` is not JSON); `strict` refuses NaN, Infinity."""
    def refuse(name):
        raise ValueError(f"{name} is not a JSON number")
    try:
        return json.loads(text, parse_constant=refuse if strict else None), None
    except (ValueError, RecursionError) as e:
        return None, (str(e).splitlines() or ["empty"])[0]

def read_json(p, what, limit=64 * 2 ** 20, strict=True):
    """A JSON file, or one line naming the file and the problem."""
    value, why = parse_json(read_text(p, what, limit), strict)
    if why:
        raise BadInput(f"{what} {p} is not JSON: {why}")
    return value

def read_record(p, fields=None, hint="delete it to make it again"):
    """A JSON record we wrote: a dict with `fields` ({name: allowed types}), or one line, `hint`."""
    try:
        rec, why = parse_json(read_text(p, "record", 16 * 2 ** 20))
    except BadInput as e:  # too large, not UTF-8...
        rec, why = None, str(e)
    bad = [k for k, types in (fields or {}).items() if isinstance(rec, dict) and  # True is no int
           type(rec.get(k, ())) not in (types if isinstance(types, tuple) else (types,))]
    why = f"field {bad[0]!r} is missing or wrong" if bad else why or "not a dict"
    if not isinstance(rec, dict) or bad:
        raise BadInput(f"{p} is not a record that can be read ({why}); {hint}")
    return rec

def read_log(p):
    """The records of train.py's append-only log.jsonl (a whole 'iter', finite 'loss' and 'lr');
    a torn last line (a crash while writing it) is dropped with a warning, any other refused."""
    lines = read_text(p, "log", 256 * 2 ** 20).split("\n")
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for n, line in enumerate(lines):
        row = parse_json(line)[0]
        ok = isinstance(row, dict) and type(row.get("iter")) is int and all(
            type(row.get(k)) in (int, float) and math.isfinite(row[k]) for k in ("loss", "lr"))
        if ok and n < len(lines) - 1:  # a whole record, its newline written
            rows.append(row)
        elif n == last:
            print(f"warning: {p}: its last line is torn (a crash while writing it); dropped",
                  file=sys.stderr)
        elif line.strip():
            raise BadInput(f"{p}, line {n + 1}: not a log record {line[:40]!r}; delete that "
                           f"line or the file (a checkpoint does not need its log)")
    return rows

def read_list(p, repeats=False):
    """The ids of a split list (one per line; VOC's lists may add words after it), each a plain
    name that stays inside the dataset's folders, none twice unless `repeats`."""
    ids, seen = [], {}
    for n, line in enumerate(read_text(p, "split list").splitlines(), 1):
        if not line.strip():
            continue
        name = line.split()[0]
        if not is_plain_name(name):
            raise BadInput(f"{p}, line {n}: {shown(name)} is not a plain id (a folder part, '..' "
                           f"or an absolute path would read and write outside the dataset)")
        if name in seen and not repeats:
            raise BadInput(f"{p}, line {n}: {name!r} is listed again (first on line "
                           f"{seen[name]}); it would count twice")
        seen[name] = n
        ids.append(name)
    return ids

def file_digest(p):
    """sha256 of a file's bytes (what a prepared folder was made from, by content)."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# =============================================================================================
# Around the work: progress, devices and processes.
# =============================================================================================

def progress(what, done, total, t0, log=print):
    """Print 'what: done/total, rate, ETA' about every 10% and at the end."""
    every = max(1, total // 10)
    if done % every and done != total:
        return
    dt = time.time() - t0
    rate = done / dt if dt > 0 else float("inf")
    eta = (total - done) / rate if rate > 0 else 0
    log(f"{what}: {done}/{total}  {rate:.1f}/s  ETA {eta / 60:.1f} min")

def pick_device(device_arg, local_rank=0):
    """--device: None (CUDA when visible, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    device_arg = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_arg == "cpu":
        return torch.device("cpu")
    if device_arg != "cuda" and not (device_arg.startswith("cuda:") and device_arg[5:].isdigit()):
        raise BadInput(f"--device {device_arg}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise BadInput(f"--device {device_arg}: no CUDA device is visible "
                       f"(torch.cuda.is_available() is False); use --device cpu")
    index = int(device_arg[5:]) if device_arg != "cuda" else local_rank
    if index >= torch.cuda.device_count():
        raise BadInput(f"--device {device_arg}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)

def setup_distributed(device_arg, deterministic=False, fixed_sizes=True):
    """(rank, world size, device) of this process; under torchrun, one process per GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_arg, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # fixed crops: cuDNN times its kernels once and keeps the fastest (not for images of
        # many sizes); not bitwise reproducible run to run, --deterministic trades speed for it
        torch.backends.cudnn.benchmark = fixed_sizes and not deterministic
        torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device

def rank0_print(*a, **k):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)

def on_rank0(fn, *args):
    """fn(*args) on rank 0 alone; its (small) result, or its BadInput, on every rank."""
    box = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            box = [(None, fn(*args))]
        except BadInput as e:
            box = [(type(e), str(e))]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    error, value = box[0]
    if error is not None:
        raise error(value)
    return value

def end(command):
    """End the process with the exit code of `command()` (a command's cli(main)). Under torchrun
    the interpreter's teardown is skipped: gloo's threads can abort there (SIGABRT), and torchrun
    then waits minutes on the node that aborted before it lets the others exit."""
    try:
        code = command()
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):  # sys.exit("message"): the message, exit code 1
        print(code, file=sys.stderr)
        code = 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code or 0)

def lost_rank(error):
    """One line when `error` is a collective that failed because another rank is gone (its
    process killed, its node down: gloo and NCCL see the connection close), else None."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if dist.is_initialized() and dist.get_world_size() > 1 and (
            isinstance(error, dist.DistError) or "/gloo/" in text or "NCCL" in text):
        return (f"rank {dist.get_rank()} lost another rank of the run ("
                f"{text.split('] ')[-1].split('. ')[0][:80]})"
                f"; stopped, the last checkpoint is kept: start every node again with --resume")
    return None

def same_on_every_rank(cfg):
    """Every rank of a run must have the same settings (a different --seed on one rank would
    silently change what each epoch sees): refused on every rank, naming the flags."""
    if not dist.is_initialized():
        return
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, json.dumps({k: v for k, v in cfg.items() if k != "device"},
                                             sort_keys=True, default=str))
    every = [json.loads(e) for e in every]
    differ = sorted(k for k in every[0] if any(e.get(k) != every[0][k] for e in every))
    if differ:
        raise BadInput(f"the ranks were started with different settings ("
                       f"{', '.join('--' + k.replace('_', '-') for k in differ)}): every rank of "
                       f"a run needs the same command line")
