"""Data. Part I, the paper: PASCAL VOC 2012 with train_aug and its augmentation (4.1), MS-COCO
in VOC's classes (4.2). Part II: safe file reading, a built-in synthetic dataset where context
decides the class (Fig. 1 made into data), the SBD and COCO converters (docs/data.md). An item is
(image, label): float (3, H, W), ImageNet-normalised, and int64 (H, W) classes, 255 = ignore.
"""
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from infra import (BadInput, Claim, ExistingOutput, MissingInput, Parser, add_flags, atomic_save,
                   check_settings, cli, file_digest, is_plain_name, plain_name, progress,
                   read_json, read_list, read_record, read_text, refuse_inputs, shown, write_json)

# =============================================================================================
# PART I: THE PAPER
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 4.1: "We use the PASCAL VOC 2012 dataset for ablation studies." Its 20 object classes and
# background, the colours of its masks, 255 for void pixels (ignored by the loss and the metric);
# images normalised with the ImageNet statistics the pretrained ResNet was trained with.

IGNORE = 255
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # ImageNet statistics (RGB, 0..1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")

def voc_palette():
    """The PASCAL VOC colour map (256 RGB triples): bit 3 j + k of the class index goes to bit
    7 - j of channel k. Index 255 ('void') comes out cream-white."""
    idx, pal = np.arange(256), np.zeros((256, 3), dtype=np.uint8)
    for j in range(8):
        for k in range(3):
            pal[:, k] |= (((idx >> (3 * j + k)) & 1) << (7 - j)).astype(np.uint8)
    return pal

VOC_PALETTE = voc_palette()


# ---------------------------------------------------------------------------------------------
# 4.1: "The official dataset has 1,464 training images, 1,449 validation images and 1,456 test
# images ... [we] use the official PASCAL VOC 2012 val set for evaluation."
# PASCAL VOC 2012 (and any tree laid out like it: train_aug, the COCO conversion).

VOC_TREE = """expected layout (root = the VOC2012 folder):
  VOC2012/
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png          palette PNGs, values 0..20 and 255
    SegmentationClassAug/<id>.png       only for split train_aug (python data.py prepare-sbd)
    ImageSets/Segmentation/<split>.txt  one id per line (train, val, trainval, train_aug)"""

class Pairs(torch.utils.data.Dataset):
    """(image, label) pairs: load(index) gives the raw pair, the transform augments it with the
    randomness of (seed, epoch, index). A key is an index (current epoch) or (epoch, index), as
    train.py's sampler sends it: workers living for the whole run need no epoch updates."""
    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        return self.transform(*self.load(index), np.random.default_rng([self.seed, epoch, index]))

class VOCSegmentation(Pairs):
    """PASCAL VOC 2012: `root` is the VOC2012 folder, `split` a list under ImageSets/Segmentation.
    Every listed file is checked now, so a broken tree fails at once, not hours into training."""

    def __init__(self, root, split, transform=None, seed=0, num_classes=21):
        self.root, self.split, self.seed, self.num_classes = root, split, seed, num_classes
        self.transform = transform if transform is not None else EvalTransform()
        self.classes, self.palette = VOC_CLASSES[:num_classes], VOC_PALETTE
        if not os.path.isdir(root):
            raise MissingInput(f"VOC root not found: {root}\n{VOC_TREE}")
        if os.path.isdir(os.path.join(root, "VOC2012")) and not os.path.isdir(
                os.path.join(root, "ImageSets")):
            raise MissingInput(f"{root} looks like VOCdevkit: use its VOC2012 folder, "
                               f"{os.path.join(root, 'VOC2012')}")
        list_dir = os.path.join(root, "ImageSets", "Segmentation")
        list_file = os.path.join(list_dir, split + ".txt")
        if not os.path.isfile(list_file):
            have = sorted(f[:-4] for f in os.listdir(list_dir) if f.endswith(".txt")) \
                if os.path.isdir(list_dir) else []
            hint = "\nrun `python data.py prepare-sbd ...` to make train_aug" * (
                split == "train_aug")
            raise MissingInput(f"split list not found: {list_file} (splits there: "
                               f"{', '.join(have) or 'none'})\n{VOC_TREE}{hint}")
        self.ids = read_list(list_file)  # plain ids only: nothing read from outside `root`
        if not self.ids:
            raise BadInput(f"split list {list_file} is empty")
        mask_dir = "SegmentationClass" + "Aug" * (split == "train_aug")
        self.images = [os.path.join(root, "JPEGImages", i + ".jpg") for i in self.ids]
        self.masks = [os.path.join(root, mask_dir, i + ".png") for i in self.ids]
        for kind, paths in (("image", self.images), ("mask", self.masks)):
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise MissingInput(f"{len(missing)} {kind}(s) listed in {list_file} do not "
                                   f"exist, e.g. " + ", ".join(missing[:3]))

    def load(self, index):
        """The raw (image uint8 HxWx3, mask uint8 HxW) pair, checked."""
        image = read_image(self.images[index])
        mask = read_mask(self.masks[index], self.num_classes)
        if image.shape[:2] != mask.shape:
            raise BadInput(f"size mismatch: image {self.images[index]} is "
                           f"{image.shape[1]}x{image.shape[0]} but mask {self.masks[index]} is "
                           f"{mask.shape[1]}x{mask.shape[0]} (width x height)")
        return image, mask


# ---------------------------------------------------------------------------------------------
# train_aug (paper 4.1: "Hariharan et al. augmented this dataset ... 10,582 images"); made from
# the SBD release by `python data.py prepare-sbd` (Part II).

def train_aug_ids(sbd_train, sbd_val, voc_train, voc_val):
    """train_aug = (SBD train + SBD val + VOC train) - VOC val, sorted (paper 4.1)."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


# ---------------------------------------------------------------------------------------------
# 4.1 "Data Augmentation": "we randomly scale the images from 0.5 to 2.0 and randomly flip the
# input images in a left-right manner during the training stage." "Crop Size": "we crop a
# 513 x 513 patch from every resized image for training".
# A transform maps (image uint8 HxWx3, label uint8 HxW, rng) to (float image, int64 label). Its
# only randomness is `rng`, from (seed, epoch, index): a sample gets the same augmentation
# whatever the number of loader workers, and a resumed run sees the data it would have seen.

_SCALE = torch.from_numpy(1.0 / (255.0 * STD))[:, None, None]
_SHIFT = torch.from_numpy(-MEAN / STD)[:, None, None]

def normalize(image):
    """uint8 (H, W, 3) -> float (3, H, W): (image / 255 - mean) / std, in two in-place ops."""
    t = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float()
    return t.mul_(_SCALE).add_(_SHIFT)

class TrainTransform:
    """Random scale in [scale], pad to crop (image with the mean, i.e. 0 after normalisation;
    label with 255), random crop x crop, random left-right flip, normalise (paper 4.1)."""

    def __init__(self, crop=513, scale=(0.5, 2.0), flip=True):
        self.crop, self.scale, self.flip = crop, tuple(scale), flip

    def __call__(self, image, label, rng):
        h, w = label.shape
        s = rng.uniform(*self.scale)
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        if (sh, sw) != (h, w):  # bilinear image, nearest label: labels stay class indices
            image = np.asarray(Image.fromarray(image).resize((sw, sh), Image.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize((sw, sh), Image.NEAREST))
        c = self.crop  # the window on the padded canvas (image top-left, padded right/bottom)
        y0 = int(rng.integers(0, max(sh, c) - c + 1))
        x0 = int(rng.integers(0, max(sw, c) - c + 1))
        img, lab = image[y0:y0 + c, x0:x0 + c], label[y0:y0 + c, x0:x0 + c]
        if self.flip and rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        pad = (0, c - img.shape[1], 0, c - img.shape[0])  # 0 is the mean after normalising
        return F.pad(normalize(img), pad), F.pad(torch.from_numpy(lab.astype(np.int64)), pad,
                                                 value=IGNORE)

class EvalTransform:
    """The full image, normalised: no resize, no crop (a centre crop inflates mIoU)."""

    def __call__(self, image, label, rng=None):
        return normalize(image), torch.from_numpy(np.asarray(label, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# MS-COCO -> VOC classes (paper 4.2: "we treat the categories which are not defined in PASCAL
# VOC 2012 as background and discard the objects which are smaller than 1000 pixels").
# Where the paper is silent (docs/data.md, why): a discarded object is marked 255 (ignored), crowd
# regions count as their class, objects are painted largest first (a smaller one lies on top).

COCO_TO_VOC = {"airplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat",
               "bottle": "bottle", "bus": "bus", "car": "car", "cat": "cat", "chair": "chair",
               "cow": "cow", "dining table": "diningtable", "dog": "dog", "horse": "horse",
               "motorcycle": "motorbike", "person": "person", "potted plant": "pottedplant",
               "sheep": "sheep", "couch": "sofa", "train": "train", "tv": "tvmonitor"}

def coco_voc_mask(anns, h, w, cat_to_voc, min_pixels=1000):
    """Index mask of one image's checked annotations: VOC objects of at least min_pixels as their
    class, smaller ones 255; None without a VOC object that large (nothing to learn)."""
    objs = []
    for ann in anns:
        if ann["category_id"] in cat_to_voc:
            cls, m = cat_to_voc[ann["category_id"]], annotation_mask(ann, h, w).astype(bool)
            area = int(m.sum())  # decoded: COCO's stored `area` can disagree with its RLE
            objs.append((area, cls if area >= min_pixels else IGNORE, m))
    if not any(cls != IGNORE for _, cls, _ in objs):
        return None
    mask = np.zeros((h, w), np.uint8)
    for _, cls, m in sorted(objs, key=lambda o: -o[0]):
        mask[m] = cls
    return mask

def get_dataset(name, split, root=None, train=False, crop=513, scale=(0.5, 2.0), seed=0,
                num_images=512, image_size=128):
    """A dataset by name (infra.DATASETS); `train` picks augmentation; synthetic val: own seed."""
    transform = TrainTransform(crop, scale) if train else EvalTransform()
    if name == "synthetic":
        if split not in ("train", "val"):
            raise BadInput(f"synthetic splits are 'train' and 'val', got {split!r}")
        return SyntheticContext(num_images, image_size, seed * 2 + (split == "val"), transform)
    if not root:
        raise BadInput(f"dataset {name!r} reads local files: pass --data-root (the VOC2012 "
                       f"folder, or the output folder of `python data.py prepare-coco`)")
    return VOCSegmentation(root, split, transform, seed)


# =============================================================================================
# PART II: ENGINEERING THE PAPER DOES NOT DESCRIBE
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# Reading files, with errors that say which file and what was expected. Images over
# MAX_IMAGE_PIXELS (~ 7300 x 5500) are refused from their header, before decoding.

MAX_IMAGE_PIXELS = 40_000_000

def _read_picture(path, what, read):
    """read(the opened picture), any failure one BadInput naming the file."""
    try:
        with Image.open(path) as im:
            return read(im)
    except FileNotFoundError:
        raise MissingInput(f"{what} not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise BadInput(f"{what} {path} is too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # a permission, a truncated file...
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None

def read_image(path, orientation=False):
    """RGB uint8 (H, W, 3); 16-bit images scaled to 8 bits (Pillow's convert would clip them to
    white). `orientation` applies the EXIF one (single images; datasets are used as stored)."""
    def read(im):
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise BadInput(f"image {path} is {w}x{h} = {w * h / 1e6:.0f} megapixels; the "
                           f"limit is {MAX_IMAGE_PIXELS / 1e6:.0f} (resize it first)")
        im.load()  # decode now, so that a truncated file fails here
        im = ImageOps.exif_transpose(im) if orientation else im
        if im.mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale
            a = np.asarray(im).astype(np.float64)
            a = a / (65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0)
            return np.repeat(np.round(a * 255).astype(np.uint8)[..., None], 3, axis=2)
        return np.asarray(im.convert("RGB"))
    return _read_picture(path, "image", read)

def read_mask(path, num_classes=21):
    """Class-index mask (H, W) uint8 from a palette ('P') or grayscale ('L') PNG. RGB colours are
    refused: mapping colours back to classes is how label errors creep in."""
    mode, arr = _read_picture(path, "mask", lambda im: (im.mode, np.asarray(im)))
    if mode not in ("P", "L"):
        why = ("it looks rendered to colours, which cannot be trusted as labels"
               if mode in ("RGB", "RGBA") else "other modes are not read as class indices")
        raise BadInput(f"mask {path} has mode {mode!r}: expected class indices in a palette "
                       f"('P') or 8-bit grayscale ('L') PNG; {why}")
    bad = np.setdiff1d(np.unique(arr), np.r_[np.arange(num_classes), IGNORE])
    if bad.size:
        raise BadInput(f"mask {path} holds values {bad.tolist()} outside 0..{num_classes - 1} "
                       f"and {IGNORE} (ignore)")
    return arr

def save_mask(path, mask, palette=VOC_PALETTE):
    """Write an index mask as a palette PNG, atomically (temp file + rename)."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    atomic_save(path, lambda f: im.save(f, format="PNG"))


# ---------------------------------------------------------------------------------------------
# The built-in synthetic dataset: the paper's Figure 1 (a bike seen up close looks like a fish)
# made into data. "bike" and "fish" share one body; only the surroundings tell them apart
# (docs/data.md; docs/history.md: why the cues near the body mislead).

SYNTHETIC_CLASSES = ("background", "water", "wheel", "bike", "fish")
SYNTHETIC_CONTEXT_CLASSES = (3, 4)  # told apart only by context
SYNTHETIC_PALETTE = np.zeros((256, 3), dtype=np.uint8)
SYNTHETIC_PALETTE[:5] = [(0, 0, 0), (40, 110, 220), (150, 150, 150), (220, 40, 40), (250, 170, 30)]
SYNTHETIC_PALETTE[IGNORE] = (255, 255, 255)

def render_synthetic(seed, index, size=128):
    """One synthetic (image uint8 HxWx3, label uint8 HxW) pair, a pure function of its inputs."""
    rng = np.random.default_rng([seed, index, 17])
    h = w = size if np.isscalar(size) else int(rng.integers(size[0], size[1] + 1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(70, 150, 3)  # background: an earthy colour, a 6 x 6 grid upsampled, noise
    grid = Image.fromarray(rng.normal(0, 18, (6, 6)).astype(np.float32), mode="F")
    img = base + np.asarray(grid.resize((w, h), Image.BILINEAR))[..., None] + rng.normal(
        0, 6, (h, w, 3))
    lab = np.zeros((h, w), np.uint8)

    def disc(cy, cx, r):  # a window around a disc, and its pixels' distance to the centre
        sy = slice(max(0, int(cy - r)), max(0, min(h, int(cy + r) + 2)))
        sx = slice(max(0, int(cx - r)), max(0, min(w, int(cx + r) + 2)))
        return sy, sx, np.hypot(yy[sy, sx] - cy, xx[sy, sx] - cx)

    def drop(cy, cx, r):  # a drop of water: blue, rippled
        sy, sx, d = disc(cy, cx, r)
        m = d <= r
        waves = 12 * np.sin(xx[sy, sx] / rng.uniform(1.5, 3)) * np.sin(yy[sy, sx] / 2.0)
        colour = np.array([30, 90, 190]) + rng.uniform(-15, 15, 3)
        img[sy, sx][m] = (colour + waves[..., None] + rng.normal(0, 6, d.shape + (3,)))[m]
        lab[sy, sx][m] = 1

    def wheel(cy, cx, r):  # a dark ring with a hub
        sy, sx, d = disc(cy, cx, r)
        m = ((d <= r) & (d >= r * 0.55)) | (d <= r * 0.2)
        img[sy, sx][m] = rng.uniform(20, 50)
        lab[sy, sx][m] = 2

    def inside(margin):  # the body's ellipse, grown by `margin`
        return ((yy - cy) / (ry + margin)) ** 2 + ((xx - cx) / (rx + margin)) ** 2 <= 1

    # One body (bike or fish, 50/50) in the middle; beyond a margin of plain background, 100
    # small cues: wheels (a bike park), drops of water (a pond). In a ring 0.08 h wide next to
    # the margin only 30% are of the body's kind (they mislead), farther out 75%: only the
    # proportion over a large area is right (evidence far from the pixel, paper 3.2; near told
    # from far, 3.4).
    cls = 3 if rng.random() < 0.5 else 4
    ry, rx = rng.uniform(0.16, 0.22) * h, rng.uniform(0.18, 0.26) * w
    gap = rng.uniform(0.10, 0.13) * h
    cy, cx = rng.uniform(0.4, 0.6) * h, rng.uniform(0.4, 0.6) * w
    inner, near = inside(gap), inside(gap + 0.08 * h)
    for _ in range(100):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        iy, ix = int(min(y, h - 1)), int(min(x, w - 1))
        if inner[iy, ix]:
            continue
        own_kind = 0.3 if near[iy, ix] else 0.75
        p_wheel = own_kind if cls == 3 else 1 - own_kind
        r = rng.uniform(2.5, 4)
        (wheel if rng.random() < p_wheel else drop)(y, x, r)
    # the body, one recipe for both classes: a striped ellipse, colour from one distribution
    m, theta = inside(0), rng.uniform(0, np.pi)
    stripes = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) / 2.5)
    colour = rng.uniform(120, 230, 3)
    img[m] = (colour + 35 * stripes[..., None] + rng.normal(0, 6, (h, w, 3)))[m]
    lab[m] = cls
    return np.clip(img, 0, 255).astype(np.uint8), lab

class SyntheticContext(Pairs):
    """The built-in dataset: `num_images` images of side `size` (int, or (min, max) per image)."""
    classes, palette = SYNTHETIC_CLASSES, SYNTHETIC_PALETTE
    context_classes, num_classes = SYNTHETIC_CONTEXT_CLASSES, len(SYNTHETIC_CLASSES)

    def __init__(self, num_images=512, size=128, seed=0, transform=None):
        self.ids, self.size, self.seed = range(num_images), size, seed
        self.transform = transform if transform is not None else EvalTransform()

    def load(self, index):
        if not 0 <= index < len(self.ids):
            raise IndexError(f"index {index} out of range for {len(self.ids)} images")
        return render_synthetic(self.seed, index, self.size)


# ---------------------------------------------------------------------------------------------
# SBD -> train_aug: the converter (train_aug_ids in Part I says which images).

def sbd_mat_to_mask(path, loadmat):
    """Class-index mask (H, W) uint8 from an SBD cls/<id>.mat file (GTcls.Segmentation)."""
    try:
        gt = loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"]
        seg = np.asarray(gt.Segmentation)
    except Exception as e:
        raise BadInput(f"cannot read SBD mask {path}: expected a MATLAB file with a GTcls "
                       f"struct holding Segmentation ({type(e).__name__}: {e})") from None
    bad = np.setdiff1d(np.unique(seg), np.arange(21))
    if seg.ndim != 2 or bad.size:
        raise BadInput(f"SBD mask {path}: expected a 2-D map of classes 0..20, got shape "
                       f"{seg.shape} with values {bad.tolist()}")
    return seg.astype(np.uint8)

def prepare_sbd(sbd, voc, overwrite=False, log=print):
    """Write SegmentationClassAug/<id>.png for every train_aug id and its list, in `voc`. VOC's own
    mask where VOC train has one (finer, object borders 255), else SBD's. Existing PNGs are kept
    (an interrupted run resumes). Returns the counts."""
    try:  # before anything is written
        from scipy.io import loadmat
    except ImportError:
        raise BadInput("reading SBD .mat files needs scipy: pip install scipy "
                       "(only `python data.py prepare-sbd` uses it)") from None
    seg_dir = os.path.join(voc, "ImageSets", "Segmentation")
    sbd_tree = "expected --sbd to be benchmark_RELEASE/dataset with cls/*.mat, train.txt, val.txt"
    for where, folder, need, tree in (("SBD", sbd, ("cls", "train.txt", "val.txt"), sbd_tree),
                                      ("VOC", seg_dir, ("train.txt", "val.txt"), VOC_TREE)):
        for p in (os.path.join(folder, name) for name in need):
            if not os.path.exists(p):
                raise MissingInput(f"{where} {os.path.basename(p)} not found: {p}\n{tree}")
    lists = {f"{who}_{part}": read_list(os.path.join(folder, part + ".txt"), repeats=True)
             for who, folder in (("sbd", sbd), ("voc", seg_dir)) for part in ("train", "val")}
    ids = train_aug_ids(lists["sbd_train"], lists["sbd_val"], lists["voc_train"], lists["voc_val"])
    counts = {k: len(set(v)) for k, v in lists.items()} | {"train_aug": len(ids)}
    out_list = os.path.join(seg_dir, "train_aug.txt")
    if os.path.exists(out_list) and not overwrite and read_text(
            out_list, "split list").splitlines() != ids:
        raise ExistingOutput(f"{out_list} exists with other contents; "
                             f"pass --overwrite to replace it")
    written, t0, voc_train = 0, time.time(), set(lists["voc_train"])
    for n, i in enumerate(ids, 1):
        dst = os.path.join(voc, "SegmentationClassAug", i + ".png")
        src = os.path.join(voc, "SegmentationClass", i + ".png")
        mat = os.path.join(sbd, "cls", i + ".mat")
        if overwrite or not os.path.exists(dst):  # else kept: an interrupted run resumes
            voc_mask = i in voc_train and os.path.isfile(src)
            if not voc_mask and not os.path.isfile(mat):
                raise MissingInput(f"{i} is in the SBD lists but {mat} does not exist")
            save_mask(dst, read_mask(src) if voc_mask else sbd_mat_to_mask(mat, loadmat))
            written += 1
        progress("prepare-sbd", n, len(ids), t0, log)
    atomic_save(out_list, lambda f: f.write("".join(i + "\n" for i in ids).encode()))
    missing = [i for i in ids if not os.path.isfile(os.path.join(voc, "JPEGImages", i + ".jpg"))]
    log(f"SBD train {counts['sbd_train']}, SBD val {counts['sbd_val']}, VOC train "
        f"{counts['voc_train']}, VOC val {counts['voc_val']} -> train_aug {counts['train_aug']} "
        f"({written} masks written, {len(ids) - written} kept) -> {out_list}")
    if counts["train_aug"] != 10582 or counts["voc_val"] != 1449:
        log(f"WARNING: expected train_aug 10582 and VOC val 1449 (the paper's sets), got "
            f"{counts['train_aug']} and {counts['voc_val']}: check that --sbd is the full SBD "
            f"release and --voc the full VOC 2012")
    if missing:
        log(f"WARNING: {len(missing)} train_aug ids have no JPEG in {voc}/JPEGImages, e.g. "
            f"{', '.join(missing[:3])}")
    return counts | {"missing_images": len(missing)}


# ---------------------------------------------------------------------------------------------
# COCO files: RLE, polygons rasterised exactly as pycocotools does, checks of every record, and
# the converter (coco_voc_mask in Part I is the paper's rule).

def rle_decode(rle):
    """COCO RLE (list or compressed counts) -> (h, w) uint8: runs of 0s, 1s, 0s... column-major."""
    (h, w), counts = rle["size"], rle["counts"]
    counts = np.asarray(rle_counts_from_string(counts) if isinstance(counts, (str, bytes))
                        else counts, dtype=np.int64)
    if counts.sum() != h * w:
        raise BadInput(f"RLE counts sum to {counts.sum()}, not h*w = {h * w}")
    values = np.zeros(len(counts), np.uint8)
    values[1::2] = 1
    return np.repeat(values, counts).reshape(w, h).T.copy()

def rle_counts_from_string(s):
    """COCO's compressed counts: 5-bit groups (+48 to printable), continuation bit 0x20, sign
    bit 0x10 on the last group; from the 3rd count on, each is stored minus the count 2 before."""
    s = s.decode() if isinstance(s, bytes) else s
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts

def _polygon_crossings(xy, h, w):
    """Column-major pixel positions (x * h + y) where one polygon's inside/outside flips, as
    pycocotools' rleFrPoly finds them: 1. vertices scaled by 5 and rounded as C does,
    (int)(5 x + 0.5); 2. each edge walked step by step along its longer axis from its lower end
    (an edge and its reverse give the same points), the other coordinate rounded the same way;
    3. where the walk enters a fine column whose centre is a pixel centre (fine x = 5 i + 2),
    pixel column i gets a crossing at row ceil(fine y / 5 + 0.1 - 0.5), clamped to [0, h];
    columns outside [0, w - 1] are dropped. Inside: an odd number of crossings precede it."""
    p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    x, y = np.trunc(5.0 * p + 0.5).astype(np.int64).T
    xe, ye = np.roll(x, -1), np.roll(y, -1)  # edge j runs from vertex j to vertex j + 1
    dx, dy = np.abs(xe - x), np.abs(ye - y)
    along_x = dx >= dy
    flip = np.where(along_x, x > xe, y > ye)
    x0, x1 = np.where(flip, xe, x), np.where(flip, x, xe)
    y0, y1 = np.where(flip, ye, y), np.where(flip, y, ye)
    n = np.maximum(dx, dy)  # steps per edge; the edge gives n + 1 points
    with np.errstate(divide="ignore", invalid="ignore"):  # n == 0: one point, slope unused
        slope = np.where(n == 0, 0.0, np.where(along_x, (y1 - y0) / np.maximum(dx, 1),
                                                (x1 - x0) / np.maximum(dy, 1)))
    edge = np.repeat(np.arange(len(x)), n + 1)
    d = np.arange(edge.size) - np.repeat(np.cumsum(n + 1) - (n + 1), n + 1)
    t = np.where(flip[edge], n[edge] - d, d)
    ax = along_x[edge]
    u = np.where(ax, t + x0[edge], np.trunc(x0[edge] + slope[edge] * t + 0.5)).astype(np.int64)
    v = np.where(ax, np.trunc(y0[edge] + slope[edge] * t + 0.5), t + y0[edge]).astype(np.int64)
    moved = np.flatnonzero(u[1:] != u[:-1]) + 1
    ua, ub, va, vb = u[moved], u[moved - 1], v[moved], v[moved - 1]
    xd = (np.where(ua < ub, ua, ua - 1) + 0.5) / 5.0 - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = np.ceil(np.clip((np.minimum(va, vb) + 0.5) / 5.0 - 0.5, 0, h))
    return xd[keep].astype(np.int64) * h + yd[keep].astype(np.int64)

def polygons_to_mask(polygons, h, w):
    """One object's COCO polygons ([x1, y1, x2, y2, ...]) as an (h, w) uint8 mask, identical
    to pycocotools' decode(merge(frPyObjects(polygons, h, w))) (tested on its output): each
    polygon filled by the even-odd rule of its crossings, the parts united."""
    mask = np.zeros(h * w, np.uint8)
    for poly in polygons:
        flips = np.bincount(_polygon_crossings(poly, h, w), minlength=h * w + 1)[: h * w]
        mask |= (np.cumsum(flips) & 1).astype(np.uint8)
    return mask.reshape(w, h).T.copy()

def annotation_problem(ann, h, w):
    """What is wrong with one COCO annotation for an h x w image (a short phrase), or None.
    Checked before anything is decoded: a wrong RLE size is refused before it allocates."""
    for key in ("category_id", "segmentation"):
        if key not in ann:
            return f"no '{key}'"
    if type(ann["category_id"]) is not int:
        return f"category_id {shown(ann['category_id'], 20)} is not a whole number"
    seg = ann["segmentation"]
    if isinstance(seg, list):
        for p in seg or [[]]:
            if not isinstance(p, list) or len(p) < 6 or len(p) % 2:
                return (f"a polygon of {len(p) if isinstance(p, list) else type(p).__name__} "
                        f"coordinates (needs x, y pairs, at least 3)")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in p):
                return "a polygon with a coordinate that is not a finite number"
        return None
    if not isinstance(seg, dict):
        return f"segmentation of unknown type {type(seg).__name__}"
    if seg.get("size") != [h, w]:
        return f"RLE size {shown(seg.get('size'), 30)} is not the image's [{h}, {w}]"
    counts = seg.get("counts")
    try:
        counts = rle_counts_from_string(counts) if isinstance(counts, (str, bytes)) else counts
        if (not isinstance(counts, list) or any(not isinstance(c, int) or c < 0 for c in counts)
                or sum(counts) != h * w):
            return f"RLE counts that do not cover the {h} x {w} image"
    except (IndexError, UnicodeDecodeError, TypeError):
        return "RLE counts that cannot be read"
    return None

def image_problem(img):
    """What is wrong with one COCO image record (a short phrase), or None."""
    if not isinstance(img, dict):
        return f"not a record: {shown(img, 40)}"
    missing = [k for k in ("id", "file_name", "height", "width") if k not in img]
    if missing:
        return f"no '{missing[0]}'"
    name = img["file_name"]
    if not (is_plain_name(name) and is_plain_name(os.path.splitext(name)[0])):
        return f"file_name {shown(name, 40)} is not a plain file name (what the list can hold)"
    if type(img["id"]) is not int:
        return f"id {shown(img['id'], 40)} is not a whole number"
    h, w = img["height"], img["width"]
    if not (type(h) is int and type(w) is int and h >= 1 and w >= 1 and h * w <= MAX_IMAGE_PIXELS):
        return (f"size {shown(w, 20)} x {shown(h, 20)} is not whole numbers >= 1 of at most "
                f"{MAX_IMAGE_PIXELS // 10 ** 6} megapixels")
    return None

def annotation_mask(ann, h, w):
    """(h, w) uint8 mask of a checked annotation (annotation_problem is None)."""
    seg = ann["segmentation"]
    return polygons_to_mask(seg, h, w) if isinstance(seg, list) else rle_decode(seg)

def _read_coco(annotations, images, skip):
    """The checked COCO file, usable images' sizes by id, their checked annotations by image id."""
    coco = read_json(annotations, "COCO annotations", 4 * 2 ** 30, strict=False)  # NaN: a
    # record's problem, not the file's
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
            raise BadInput(f"{annotations} has no '{key}' list: not a COCO instances file")
    for c in coco["categories"]:
        if not (isinstance(c, dict) and type(c.get("id")) is int and type(c.get("name")) is str):
            raise BadInput(f"{annotations}: category {shown(c)} needs a whole-number 'id' "
                           f"and a 'name'")
    if not os.path.isdir(images):
        raise MissingInput(f"COCO image folder not found: {images}")
    sizes = {img["id"]: (img["height"], img["width"]) for img in reversed(coco["images"])
             if image_problem(img) is None}  # reversed: an id's first image decides
    by_image = {}
    for ann in coco["annotations"]:
        a, i = (ann.get("id"), ann.get("image_id")) if isinstance(ann, dict) else (None, None)
        if not (type(a) is type(i) is int):
            skip(f"annotation {shown(ann, 40)}", "no whole-number 'id' and 'image_id'")
        elif i in sizes:
            problem = annotation_problem(ann, *sizes[i])
            if problem:
                skip(f"annotation {a} (image {i})", problem, f"image {i}: annotation {a}")
            else:
                by_image.setdefault(i, []).append(ann)
    return coco, sizes, by_image

def prepare_coco(annotations, images, out, split=None, min_pixels=1000, log=print,
                 strict=False, overwrite=False):
    """Write out/SegmentationClass/<name>.png, out/JPEGImages/<name>.jpg (links) and
    out/ImageSets/Segmentation/<split>.txt, for VOCSegmentation(out, split); a broken record is
    skipped (or stops all with `strict`); a rerun keeps its masks (docs/data.md)."""
    skipped, written, no_voc, missing, stems = [], [], 0, [], {}

    def skip(what, problem, strictly=None):  # name it and go on, or stop with `strict`
        if strict:
            raise BadInput(f"{annotations}: {strictly or what}: {problem}")
        skipped.append((what, problem))
    coco, sizes, by_image = _read_coco(annotations, images, skip)
    split = plain_name(split or os.path.splitext(os.path.basename(annotations))[0].replace(
        "instances_", ""), "--split")
    settings = {"annotations": os.path.abspath(annotations), "min_pixels": min_pixels,
                "annotations_sha256": file_digest(annotations)}  # by content, not only by name
    lists = os.path.join(out, "ImageSets", "Segmentation")
    record = os.path.join(lists, split + ".settings.json")
    if os.path.exists(record) and not overwrite:
        before = read_record(record, hint="pass --overwrite to rebuild the split")
        if before != settings:
            raise ExistingOutput(f"{out} holds split {split} made with other settings ({before}); "
                                 f"pass --overwrite to rebuild it, or choose another --out")
    others = [f for f in (os.listdir(lists) if os.path.isdir(lists) else [])
              if f.endswith(".settings.json") and f != split + ".settings.json"]
    for other in sorted(others):  # the splits of one --out share their masks
        theirs = read_record(os.path.join(lists, other)).get("min_pixels")
        if theirs != min_pixels:
            raise ExistingOutput(f"{out} holds split {other[:-14]}, made with --min-pixels {theirs}"
                                 f": its masks are this split's too; use that, or another --out")
    write_json(record, settings)
    cat_to_voc = {c["id"]: VOC_CLASSES.index(COCO_TO_VOC[c["name"]]) for c in coco["categories"]
                  if c["name"] in COCO_TO_VOC}
    t0 = time.time()
    for n, img in enumerate(coco["images"], 1):
        problem, rid = image_problem(img), img.get("id") if isinstance(img, dict) else "?"
        stem = None if problem else os.path.splitext(img["file_name"])[0]
        if stem in stems:  # a.jpg and a.png: one mask a.png, one list line a
            problem = f"its file_name has the stem of image {shown(stems[stem], 40)}'s"
        elif stem and sizes[rid] != (img["height"], img["width"]):  # annotations were checked
            problem = "its id is that of an earlier image of another size"
        if problem:
            skip(f"image {shown(rid, 40)}", problem, f"image record {shown(rid, 40)}")
            continue
        name, stems[stem] = img["file_name"], rid
        src, mask_path = os.path.join(images, name), os.path.join(out, "SegmentationClass",
                                                                   stem + ".png")
        if not os.path.isfile(src):
            missing.append(name)
        elif os.path.isfile(mask_path) and not overwrite:  # an earlier, interrupted run
            written.append(stem)
        else:
            mask = coco_voc_mask(by_image.get(rid, []), img["height"], img["width"], cat_to_voc,
                                 min_pixels)
            if mask is None:
                no_voc += 1
                if os.path.isfile(mask_path):  # left from other settings
                    os.unlink(mask_path)
            else:
                link = os.path.join(out, "JPEGImages", stem + ".jpg")
                os.makedirs(os.path.dirname(link), exist_ok=True)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(src), link)
                save_mask(mask_path, mask)
                written.append(stem)
        progress("prepare-coco", n, len(coco["images"]), t0, log)
    list_path = os.path.join(out, "ImageSets", "Segmentation", split + ".txt")
    atomic_save(list_path, lambda f: f.write("".join(s + "\n" for s in written).encode()))
    for name in missing:
        log(f"missing image, left out: {os.path.join(images, name)}")
    for what, problem in skipped[:20]:
        log(f"WARNING: {annotations}: skipped {what}: {problem}")
    log(f"{len(coco['images'])} images: {len(written)} written, {no_voc} without a VOC object "
        f">= {min_pixels} px, {len(missing)} missing, {len(skipped)} broken record(s) skipped "
        f"(--strict stops at the first) -> {list_path}")
    return {"written": written, "no_voc": no_voc, "missing": missing, "list": list_path,
            "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# Command line.

def parser():
    p = Parser(description="Dataset preparation for Vortex Pooling (paper 4.1, 4.2).")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare-sbd", help="VOC train_aug (10,582 images) from the SBD release")
    s.add_argument("--sbd", required=True,
                   help="SBD's benchmark_RELEASE/dataset folder (cls/*.mat, train.txt, val.txt)")
    s.add_argument("--voc", required=True, help="the VOCdevkit/VOC2012 folder (written into)")
    s.add_argument("--overwrite", action="store_true", help="replace existing "
                   "SegmentationClassAug PNGs and train_aug.txt")
    s = sub.add_parser("prepare-coco", help="COCO instances JSON -> VOC-class index masks "
                                            "(paper 4.2), laid out like VOC2012")
    s.add_argument("--annotations", required=True, help="e.g. annotations/instances_train2017.json")
    s.add_argument("--images", required=True, help="the matching image folder, e.g. train2017/")
    add_flags(s, ("out", "split"), required=("out",), out="output folder (VOC-like tree)",
              split="list name to write (default: from the JSON, e.g. train2017)")
    s.add_argument("--strict", action="store_true", help="stop at the first broken record "
                   "(default: name it, skip it, and count the skipped ones at the end)")
    s.add_argument("--overwrite", action="store_true", help="rebuild a split that --out holds "
                   "from other settings (--min-pixels, another annotation file)")
    add_flags(s, ("min_pixels",), default=1000)
    return p

def main(argv=None):
    args = parser().parse_args(argv)
    check_settings(vars(args))
    if args.cmd == "prepare-coco":  # everything is checked before the folder is locked
        folder, flag = args.out, "--out"
        inputs = [("--annotations", args.annotations), ("--images", args.images)]
        outputs = [os.path.join(folder, d) for d in ("SegmentationClass", "JPEGImages",
                                                     "ImageSets")]
    else:
        folder, flag, inputs = args.voc, "--voc", [("--sbd", args.sbd)]
        outputs = [os.path.join(folder, "SegmentationClassAug"),
                   os.path.join(folder, "ImageSets", "Segmentation", "train_aug.txt")]
        if not os.path.isdir(folder):
            raise MissingInput(f"--voc {folder}: no such folder\n{VOC_TREE}")
    refuse_inputs(outputs, inputs)
    with Claim(f"data.py {args.cmd}", [(flag, folder, "folder")]):  # one preparation a folder
        if args.cmd == "prepare-sbd":
            prepare_sbd(args.sbd, args.voc, args.overwrite)
        else:
            prepare_coco(args.annotations, args.images, args.out, args.split,
                         args.min_pixels, strict=args.strict, overwrite=args.overwrite)

if __name__ == "__main__":
    cli(main)
