"""Run infrastructure: the gates every command's input passes (settings, checkpoints, outputs,
records and lists, names), atomic writes and locks, progress lines, and process set-up.

Nothing here is the paper; the paper files (vortex, data, train, eval) and experiments.py call
it. Known-bad input raises BadInput, which `cli` turns into one line on stderr and exit code 2.
"""
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

import torch
import torch.distributed as dist

import vortex


class BadInput(ValueError):
    """Known-bad input that the user can fix (a flag, a file): the commands print its one-line
    message and exit with code 2, without a traceback. Anything else keeps its traceback."""


class MissingInput(BadInput, FileNotFoundError):
    """A file or folder that should exist does not."""


class ExistingOutput(BadInput, FileExistsError):
    """An output exists and is not overwritten without being asked (--force / --overwrite)."""


def cli(main):
    """Run a command's main(): BadInput becomes 'error: ...' on stderr and exit code 2; Ctrl-C
    one line and exit code 130 (every file is written whole, so what was written is kept)."""
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


def output_path(path, flag):
    """A path the user named for an output, refused when it names nothing (empty)."""
    if not str(path).strip() or "\0" in str(path):
        raise BadInput(f"{flag} {path!r}: give a file or folder name")
    return path


def refuse_existing(paths, force, inputs=(), hint="pass --force to overwrite, or choose "
                                                    "another --out"):
    """Before any work: refuse_inputs(paths, inputs); nothing is overwritten without `force`;
    every folder an output goes to can be written (made if needed, with a test file written and
    removed)."""
    refuse_inputs(paths, inputs)
    there = [p for p in paths if os.path.exists(p) and not (os.path.isdir(p) and not
                                                            os.listdir(p))]  # empty: nothing lost
    if there and not force:
        more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
        raise ExistingOutput(f"{there[0]} exists{more}; {hint}")
    for folder in sorted({p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
                          for p in paths}):
        try:
            os.makedirs(folder, exist_ok=True)
            test = os.path.join(folder, f".write-test-{os.getpid()}")
            os.close(os.open(test, os.O_CREAT | os.O_WRONLY))
            os.unlink(test)
        except OSError as e:
            raise BadInput(f"cannot write into {folder}: {e.strerror or e}") from None


def refuse_inputs(paths, inputs):
    """An output that is, holds or lies inside one of the command's `inputs` ((flag, path)
    pairs; real paths compared, hard links too) is refused whatever the flags."""
    for p in paths:
        for flag, i in ((f, i) for f, i in inputs if i):
            o, r = os.path.realpath(p), os.path.realpath(i)
            same = o == r or (os.path.exists(p) and os.path.exists(i) and os.path.samefile(p, i))
            how = "is" if same else "holds" if r.startswith(o.rstrip(os.sep) + os.sep) else \
                "lies inside" if o.startswith(r.rstrip(os.sep) + os.sep) else None
            if how:
                raise BadInput(f"output {p} {how} the input {flag} {i}: an output never replaces "
                               f"or writes into an input, even with --force; choose another")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(path, write):
    """Call write(file) on a temp file beside `path`, then rename it over `path`: a crash
    mid-write never leaves a half-written `path`. The file gets the permissions the umask allows
    (as open() would give it), leftovers of earlier interrupted saves of the same file are
    removed first, and a failed write (disk full, read-only folder) raises BadInput naming the
    file and the cause, with nothing left behind."""
    d, base = os.path.split(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        for old in os.listdir(d):  # a kill mid-save leaves .tmp-XXXX<name> behind
            if old.startswith(".tmp-") and old.endswith(base) and len(old) > len(base) + 5:
                os.unlink(os.path.join(d, old))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=base)
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        written = os.path.getsize(tmp)
        os.unlink(tmp)
        raise BadInput(f"cannot write {path}: {write_failure(e, d, written)}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_failure(error, folder, written):
    """Why a write failed, in words: no space, the file-size limit, or the system's message."""
    free = shutil.disk_usage(folder).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    so_far = f"it stopped after {written / 2 ** 20:.1f} MB"
    if getattr(error, "errno", None) == errno.EFBIG or (limit != resource.RLIM_INFINITY
                                                          and written >= limit):
        return (f"file too large: the file-size limit (ulimit -f) is {limit / 2 ** 20:.1f} MB "
                f"and {so_far}")
    if getattr(error, "errno", None) == errno.ENOSPC or free < 2 ** 20 + written // 100:
        return f"no space left on the device ({so_far}; {free / 2 ** 20:.0f} MB free there)"
    first = (str(getattr(error, "strerror", None) or error).strip().splitlines() or ["?"])[0]
    return f"{first} ({so_far}; {free / 2 ** 20:.0f} MB free there)"


def write_json(path, obj):
    """Strict JSON, atomically: NaN and infinities (a class absent from both prediction and
    ground truth has no IoU) become null, which every JSON reader accepts."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    text = json.dumps(clean(obj), indent=1, allow_nan=False)
    atomic_save(path, lambda f: f.write(text.encode() + b"\n"))


class FolderLock:
    """An exclusive lock on a folder for one command's run (train.py --out-dir, a prepared
    dataset): a second command on the same folder is refused, naming the holder. It is an
    fcntl lock on folder/.lock, which the system drops with the process however it ends (even
    kill -9), so a dead run never leaves a stale lock. release(remove=True) after a refused
    start takes away the lock file and the folders the lock made, when they are empty."""

    def __init__(self, folder, what):
        self.path, self.fd, self.made = os.path.join(folder, ".lock"), None, first_missing(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            raise BadInput(f"cannot write into {folder}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 200).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise BadInput(f"{folder} is in use by {holder}; wait for it to finish, or choose "
                           f"another folder") from None
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{what} (pid {os.getpid()} on {socket.gethostname()})".encode())
        except OSError as e:
            why = write_failure(e, folder, 0)
            self.release(remove=True)
            raise BadInput(f"cannot write the lock {self.path}: {why}; nothing was started") \
                from None

    def release(self, remove=False):
        if self.fd is not None:
            if remove:  # only the holder may remove it, before letting go
                os.unlink(self.path)
                remove_empty(os.path.dirname(self.path), self.made)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def first_missing(path):
    """The outermost folder of `path` that does not exist yet (None if it all exists)."""
    p, top = os.path.abspath(path), None
    while not os.path.exists(p):
        p, top = os.path.dirname(p), p
    return top


def remove_empty(path, top):
    """Remove `path` and its parents up to `top` while they are empty folders."""
    p = os.path.abspath(path)
    while top and os.path.isdir(p) and not os.listdir(p) and os.rmdir(p) is None and p != top:
        p = os.path.dirname(p)


def is_plain_name(name):
    """A file name or id that stays inside its folder: no folder part, no '..', not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not os.path.isabs(name)
            and os.path.basename(name) == name and "\\" not in name and "\0" not in name)


def shown(value, n=60):
    """A value in a one-line message: its repr on one line, cut at n characters."""
    return " ".join(repr(value).split())[:n]


def plain_name(name, what):
    """`name` when it is a plain name (is_plain_name), else one line naming `what` (a flag, a
    record field): every name that becomes a path stays inside its folder."""
    if not is_plain_name(name):
        raise BadInput(f"{what} {name!r} is not a plain file name inside its folder (a folder "
                       f"part, '..' or an absolute path would reach outside it); refused")
    return name


def read_record(path, fields=None, hint="delete it to make it again"):
    """A JSON record this project wrote (atomically: a crash leaves none or a whole one), read as
    untrusted: a dict whose `fields` ({name: allowed types}) are there, or one line naming the
    file and what to do."""
    try:
        with open(path) as f:
            rec, why = json.load(f), "not a dict"
    except (OSError, ValueError) as e:
        rec, why = None, (str(e).splitlines() or ["empty"])[0]
    bad = [k for k, types in (fields or {}).items() if isinstance(rec, dict)
           and not isinstance(rec.get(k, ()), types)]
    if not isinstance(rec, dict) or bad:
        raise BadInput(f"{path} is not a record that can be read ("
                       f"{f'field {bad[0]!r} is missing or wrong' if bad else why}); {hint}")
    return rec


def read_log(path, fields=("iter", "loss", "lr")):
    """The records of an append-only JSON-lines log (train.py's log.jsonl), whose `fields` are
    numbers ('iter' a whole one). A torn last line (a crash while it was written) is dropped with
    a warning; any other line that is not such a record is one line naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().decode(errors="replace").split("\n")
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for n, line in enumerate(lines):
        try:
            row = json.loads(line) if line.strip() else None
            ok = isinstance(row, dict) and type(row.get("iter")) is int and all(
                type(row.get(k)) in (int, float) for k in fields)
        except ValueError:
            row, ok = None, False
        if ok and n < len(lines) - 1:  # a whole record, its newline written
            rows.append(row)
        elif n == last:
            print(f"warning: {path}: its last line is torn (a crash while writing it); dropped",
                  file=sys.stderr)
        elif line.strip():
            raise BadInput(f"{path}, line {n + 1}: not a log record {line[:40]!r}; delete that "
                           f"line or the file (a checkpoint does not need its log)")
    return rows


def file_digest(path):
    """sha256 of a file's bytes (what a prepared folder was made from, by content)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_list(path, repeats=False):
    """The ids of a split list (one per line, first word), each a plain name that stays inside
    the dataset's folders, and none twice unless `repeats` (a dataset's list counts each id it
    holds; a list merged into another, like SBD's, need not); refused naming the file and line."""
    ids, seen = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            name = line.split()[0]
            if not is_plain_name(name):
                raise BadInput(f"{path}, line {n}: {name!r} is not a plain id (a folder part, "
                               f"'..' or an absolute path would read and write outside the "
                               f"dataset); refused")
            if name in seen and not repeats:
                raise BadInput(f"{path}, line {n}: {name!r} is listed again (first on line "
                               f"{seen[name]}); it would count twice")
            seen[name] = n
            ids.append(name)
    return ids


def progress(what, done, total, t0, log=print, every=None):
    """Print 'what: done/total, rate, ETA' about every 10% (or `every` items) and at the end."""
    every = every or max(1, total // 10)
    if done % every and done != total:
        return
    dt = time.time() - t0
    rate = done / dt if dt > 0 else float("inf")
    eta = (total - done) / rate if rate > 0 else 0
    log(f"{what}: {done}/{total}  {rate:.1f}/s  ETA {eta / 60:.1f} min")



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
        raise BadInput(f"--device {device_arg}: use cpu, cuda or cuda:N")
    if device_arg == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BadInput(f"--device {device_arg}: no CUDA device is visible "
                            f"(torch.cuda.is_available() is False); use --device cpu")
    index = int(device_arg.split(":")[1]) if device_arg[5:].isdigit() else local_rank
    if index >= torch.cuda.device_count():
        raise BadInput(f"--device {device_arg}: only {torch.cuda.device_count()} CUDA "
                            f"device(s)")
    return torch.device("cuda", index)



def read_weights_file(path):
    """The one reader of weight files (torchvision's and our checkpoints): torch.load with
    weights_only=True, and errors that name the file and say what is wrong with it, including
    a floating-point tensor that holds NaN or inf (such weights give garbage silently)."""
    if not os.path.exists(path):
        raise MissingInput(f"checkpoint not found: {path}")
    if os.path.isdir(path) or not os.access(path, os.R_OK):
        raise BadInput(f"cannot read {path}: " + ("it is a folder" if os.path.isdir(path) else
                                                  "permission denied"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise BadInput(f"cannot read {path}: permission denied") from None
    except Exception as e:  # truncated file, not a torch file, pickled code objects...
        first = (str(e).strip().splitlines() or ["empty file"])[0]
        raise BadInput(f"cannot read {path} as a weights-only torch checkpoint: it is truncated, "
                       f"corrupt or not a torch file ({type(e).__name__}: {first})") from None
    bad = next(_non_finite(obj), None)
    if bad is not None:
        raise BadInput(f"{path}: tensor {bad} holds NaN or infinite values; refused (a "
                       f"checkpoint of a diverged run)")
    return obj


def _non_finite(obj, name=""):
    """Names of the floating-point tensors inside `obj` (nested dicts/lists) with NaN or inf."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not torch.isfinite(obj).all():
            yield name or "(the file)"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _non_finite(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _non_finite(v, f"{name}[{i}]")


def read_state_dict(path):
    """A torchvision state dict (a dict of name -> tensor, or one under 'state_dict')."""
    sd = read_weights_file(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BadInput(f"{path} is not a state_dict (a dict of name -> tensor)")
    return sd



def load_pretrained(model, path, verbose=True):
    """--pretrained: a torchvision checkpoint (local file) into a ResNet or a DeepLabV3."""
    sd = read_state_dict(path)
    try:
        return vortex.load_backbone_weights(model, sd, path, verbose)
    except ValueError as e:
        raise BadInput(str(e)) from None
