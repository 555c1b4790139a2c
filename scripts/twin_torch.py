"""Peer reference trainer in plain PyTorch, to run side by side with tfpneumo.

A copy of ../shared/peer/peer_torch_train.py (the team's PyTorch twin of the demo recipe) with
tfpneumo's fixes applied the same way, so that scripts/learning_check.py can compare both on
the same caches: ``--mask-prior`` initialises the mask head's bias to log(p / (1 - p)) as
tfpneumo's ``model.mask_prior`` does (the twin already computed its losses from logits, which
is tfpneumo's other fix). Needs torch: ``pip install -e ".[twin]"``.

Independent of the project's code: it reads the SIIM layout itself (pydicom, train-rle.csv
through oracles.rle_decode), and takes from a tfpneumo cache only its index.csv (columns
image_id, split, fold, has_mask) so that both trainers validate on the same images.

Usage:
  python peer_torch_train.py --data DATA --index CACHE/index.csv --fold 0 --size 128 \
      --encoder resnet18 --decoder 128,64,32,16,8 --epochs 8 --steps 20 --batch 8 \
      --lr 1e-3 --warmup 0.5 --out OUT.json [--seed 0] [--threads 2]

Recipe (tfpneumo's configs/demo.yaml as resolved over base.yaml):
  model     UNet on a randomly initialised ResNet18/34. --encoder-layout preact (default)
            is segmentation-models' Keras ResNet (pre-activation units, an input BatchNorm
            without scale, skips taken after the pre-activation ReLUs, final BN-ReLU);
            torchvision is the usual post-activation ResNet (smp's encoder). Decoder: 5
            stages of bilinear x2, concat skip, Dropout2d 0.1, 2 x conv3x3-BN-ReLU, scSE
            (--attention scse, the demo's default; none to drop it); 1x1 conv to the mask.
            Classification head: global average pool of the bottleneck, dropout 0.5, linear.
            He-uniform convs, Glorot 1x1 heads and linear, as Keras; BN momentum 0.1
            (= Keras 0.9), eps 2e-5 in the encoder and 1e-3 in the decoder, as Keras.
  data      grey image -> --size with cv2 INTER_AREA (bilinear when enlarging), mask with
            nearest (--mask-resize area: coverage >= 0.5, as the tfpneumo cache); ImageNet
            normalisation of the grey replicated to RGB. Augmentation: hflip 0.5;
            shift-scale-rotate (0.0625, 0.1, 10 deg, zero border) p 0.5; brightness/contrast/
            gamma +-0.2 p 0.5. Positive share of each batch drawn per image with a rate going
            linearly 0.8 (first epoch) -> 0.4 (last epoch); each class cycled in fresh random
            order.
  loss      combo BCE 3 : soft Dice 1 (smooth 1) : focal 4 (gamma 2, alpha 0.25), per image,
            averaged over the images with a mask only; + 0.5 x BCE of the label head on every
            image.
  optimizer AdamW (eps 1e-7 as Keras), weight decay 1e-4 on every parameter, global-norm
            clip 1.0, lr linear 0 -> lr over round(warmup * steps) steps then cosine to 1 % of
            lr at the last step (Keras CosineDecay with warmup).
  selection after each epoch the validation fold is predicted (hflip TTA) and the triplet
            search below is run; the weights of the best epoch (ties: the later) are kept.
            SWA of the last --swa-epochs epochs with BN recomputed on --swa-bn-steps training
            batches (tfpneumo's demo uses 2 and 10; its evaluate scores that SWA model) is
            scored too, and reported apart under "swa".
  report    triplet rule (1st place): image positive when >= min_area pixels exceed top,
            mask = prob > bottom; top 0.3..0.8 step 0.05, min_area {0,10,20,50,100,200,400}
            px at --size, bottom 0.2..0.6 step 0.1 (every combination); score = mean
            per-image Dice, 1 when both empty. Also: the best plain threshold (0.2..0.8 step
            0.05), the all-empty score, and the best triplet on tfpneumo evaluate's default
            grid (tops 0.3..0.8, min_area = its "auto" fractions of the image, bottom in
            {0.2,0.3,0.4,0.5} or = top, bottom <= top).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import twin_oracles as oracles  # noqa: E402  (verified RLE decoder and the competition metric)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

TOPS = np.round(np.arange(0.30, 0.8001, 0.05), 2)
MIN_AREAS = np.array([0, 10, 20, 50, 100, 200, 400])
BOTTOMS = np.round(np.arange(0.2, 0.6001, 0.1), 2)
LABEL_THRESHOLDS = np.round(np.arange(0.1, 0.91, 0.05), 2)
PLAIN = np.round(np.arange(0.2, 0.8001, 0.05), 2)
# tfpneumo evaluate's defaults, to score the peer on the grid the TF project searches.
TF_AREA_FRACTIONS = (0.0, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003,
                     0.004, 0.005)
TF_BOTTOMS = (0.2, 0.3, 0.4, 0.5)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ============================================================================ data

def find_dicoms(root: str) -> dict[str, str]:
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(".dcm"):
                found[name[:-4]] = os.path.join(folder, name)
    return found


def read_dicom(path: str) -> np.ndarray:
    """(H, W) uint8 grey pixels (MONOCHROME1 inverted, wider data scaled to its range)."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        px = ds.pixel_array
    if px.ndim == 3:  # colour or multi-frame: first frame / mean of the samples
        px = px.mean(axis=-1) if px.shape[-1] in (3, 4) else px[0]
    if px.dtype != np.uint8:
        px = px.astype(np.float64)
        lo, hi = float(px.min()), float(px.max())
        px = np.round((px - lo) / (hi - lo) * 255.0 if hi > lo else px * 0).astype(np.uint8)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        px = 255 - px
    return px


def read_labels(path: str) -> dict[str, list[str]]:
    """ImageId -> its EncodedPixels strings (several rows per image are kept, to be unioned)."""
    rows: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or not row[0].strip():
                continue
            if i == 0 and row[0].strip().lower() == "imageid":
                continue
            rows.setdefault(row[0].strip(), []).append(row[1].strip() if len(row) > 1 else "-1")
    return rows


def read_index(path: str, fold: int) -> tuple[list[str], list[str], dict[str, int]]:
    """Training and validation ids from a tfpneumo cache's index.csv, and its has_mask."""
    train, val, has_mask = [], [], {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["split"] != "train":
                continue
            has_mask[row["image_id"]] = int(row["has_mask"])
            (val if int(row["fold"]) == fold else train).append(row["image_id"])
    if not val:
        sys.exit(f"{path}: no training image has fold {fold}")
    return train, val, has_mask


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if img.shape == (size, size):
        return img
    shrink = size < min(img.shape)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: int, how: str) -> np.ndarray:
    import cv2

    if mask.shape == (size, size):
        return mask.astype(np.uint8)
    if how == "nearest":
        return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
    cover = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    out = cover >= 0.5
    if not out.any() and mask.any():
        out = cover > 0
    return out.astype(np.uint8)


def load_images(ids, dicoms, labels, size, mask_resize):
    """Stacked uint8 images (N, S, S), masks (N, S, S), and the per-image Dice between this
    mask and the other resize method's (how much the two trainers' truths can differ)."""
    imgs = np.empty((len(ids), size, size), np.uint8)
    masks = np.empty((len(ids), size, size), np.uint8)
    agree = []
    other = "area" if mask_resize == "nearest" else "nearest"
    for i, image_id in enumerate(ids):
        if image_id not in dicoms:
            sys.exit(f"{image_id}: in index.csv but no DICOM under --data")
        if image_id not in labels:
            sys.exit(f"{image_id}: in index.csv but not in train-rle.csv")
        px = read_dicom(dicoms[image_id])
        h, w = px.shape
        full = np.zeros((h, w), np.uint8)
        for rle in labels[image_id]:
            full |= oracles.rle_decode(rle, h, w)
        imgs[i] = resize_image(px, size)
        masks[i] = resize_mask(full, size, mask_resize)
        agree.append(oracles.image_dice(masks[i], resize_mask(full, size, other)))
    return imgs, masks, np.array(agree)


class Augmenter:
    """Per-image augmentation as tfpneumo's demo: hflip, shift-scale-rotate, grey-level LUT."""

    def __init__(self, size, rng, hflip=0.5, affine_p=0.5, shift=0.0625, scale=0.1, rotate=10.0,
                 color_p=0.5, brightness=0.2, contrast=0.2, gamma=0.2):
        self.size, self.rng = size, rng
        self.hflip, self.affine_p, self.shift, self.scale, self.rotate = hflip, affine_p, shift, scale, rotate
        self.color_p, self.brightness, self.contrast, self.gamma = color_p, brightness, contrast, gamma
        self.levels = np.arange(256, dtype=np.float32) / 255.0

    def __call__(self, img: np.ndarray, mask: np.ndarray):
        import cv2

        u = self.rng.random(8)
        sym = lambda k, limit: (2.0 * u[k] - 1.0) * limit  # noqa: E731
        if u[0] < self.hflip:
            img, mask = img[:, ::-1], mask[:, ::-1]
        img, mask = np.ascontiguousarray(img), np.ascontiguousarray(mask)
        if u[1] < self.affine_p:
            s = self.size
            m = cv2.getRotationMatrix2D(((s - 1) / 2.0, (s - 1) / 2.0), sym(3, self.rotate),
                                        1.0 + sym(4, self.scale))
            m[0, 2] += sym(5, self.shift) * s
            m[1, 2] += sym(6, self.shift) * s
            kw = dict(dsize=(s, s), borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            img = cv2.warpAffine(img, m, flags=cv2.INTER_LINEAR, **kw)
            mask = cv2.warpAffine(mask, m, flags=cv2.INTER_NEAREST, **kw)
        lut = self.levels
        if u[2] < self.color_p:
            v = self.rng.random(3)
            alpha = 1.0 + (2 * v[0] - 1) * self.contrast
            beta = (2 * v[1] - 1) * self.brightness
            gamma = 1.0 + (2 * v[2] - 1) * self.gamma
            lut = np.clip(lut * alpha + beta, 0.0, 1.0) ** gamma
        return lut[img], mask


def to_input(grey01: np.ndarray) -> np.ndarray:
    """(N, S, S) float grey in [0, 1] -> (N, 3, S, S) float32 ImageNet-normalised."""
    x = grey01.astype(np.float32)[:, None]
    return (x - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]


class BalancedSampler:
    """Batches whose images are positive with probability ``rate`` (per image), each class
    cycled in a fresh random order (without replacement within a pass)."""

    def __init__(self, imgs, masks, labels, batch, augment, rng):
        self.imgs, self.masks, self.labels = imgs, masks, labels
        self.batch, self.augment, self.rng = batch, augment, rng
        self.pools = {1: np.flatnonzero(labels == 1), 0: np.flatnonzero(labels == 0)}
        self.order = {1: [], 0: []}
        self.balanced = len(self.pools[1]) > 0 and len(self.pools[0]) > 0
        self.all = np.arange(len(labels))
        self.order_all: list[int] = []

    def _next(self, cls):
        if cls is None:
            if not self.order_all:
                self.order_all = list(self.rng.permutation(self.all))
            return self.order_all.pop()
        if not self.order[cls]:
            self.order[cls] = list(self.rng.permutation(self.pools[cls]))
        return self.order[cls].pop()

    def __call__(self, rate):
        x, m, y = [], [], []
        for _ in range(self.batch):
            cls = (1 if self.rng.random() < rate else 0) if self.balanced else None
            i = self._next(cls)
            img, msk = self.augment(self.imgs[i], self.masks[i])
            x.append(img)
            m.append(msk)
            y.append(self.labels[i])
        return to_input(np.stack(x)), np.stack(m)[:, None].astype(np.float32), np.array(y, np.float32)


def positive_rate(epoch, epochs, start=0.8, end=0.4):
    return start if epochs <= 1 else start + (end - start) * epoch / (epochs - 1)


def lr_at(step, lr, warmup, total, min_ratio=0.01):
    """Keras CosineDecay(initial 0, warmup_target lr, warmup_steps, decay_steps total-warmup,
    alpha min_ratio) at optimizer iteration ``step`` (0 on the first update)."""
    if step < warmup:
        return lr * step / warmup
    frac = min(step - warmup, total - warmup) / max(total - warmup, 1)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ============================================================================ model

def build_model(encoder, layout, decoder, attention, skip_dropout=0.1, head_dropout=0.5,
                mask_prior=0.5):
    import torch
    from torch import nn
    import torch.nn.functional as F

    mom = 0.1  # PyTorch: running = 0.9 running + 0.1 batch, i.e. Keras momentum 0.9
    reps = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}[encoder]

    def bn(c, eps):
        return nn.BatchNorm2d(c, eps=eps, momentum=mom)

    def conv(cin, cout, k, stride=1):
        return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)

    class PreActUnit(nn.Module):  # classification_models' residual_conv_block
        def __init__(self, cin, cout, stride, project):
            super().__init__()
            self.bn1, self.conv1 = bn(cin, 2e-5), conv(cin, cout, 3, stride)
            self.bn2, self.conv2 = bn(cout, 2e-5), conv(cout, cout, 3)
            self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if project else None

        def forward(self, x):
            a = F.relu(self.bn1(x))
            y = self.conv2(F.relu(self.bn2(self.conv1(a))))
            return y + (x if self.short is None else self.short(a)), a

    class InputBN(nn.Module):  # bn_data: BatchNorm with a shift and no scale
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm2d(3, eps=2e-5, momentum=mom, affine=False)
            self.bias = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.norm(x) + self.bias[None, :, None, None]

    class PreActResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_data = InputBN()  # inputs are ImageNet-normalised: running stats 0 / 1 fit
            self.conv0, self.bn0 = conv(3, 64, 7, 2), bn(64, 2e-5)
            self.pool = nn.MaxPool2d(3, 2, 1)
            stages, cin = [], 64
            for i, n in enumerate(reps):
                cout = 64 * 2 ** i
                units = [PreActUnit(cin, cout, 1 if i == 0 else 2, True)]
                units += [PreActUnit(cout, cout, 1, False) for _ in range(n - 1)]
                stages.append(nn.ModuleList(units))
                cin = cout
            self.stages = nn.ModuleList(stages)
            self.bn1 = bn(512, 2e-5)

        def forward(self, x):
            x0 = F.relu(self.bn0(self.conv0(self.bn_data(x))))  # relu0, x2
            x = self.pool(x0)
            skips = [x0]
            for i, stage in enumerate(self.stages):
                for j, unit in enumerate(stage):
                    x, pre = unit(x)
                    if j == 0 and i > 0:  # stage{2,3,4}_unit1_relu1: x4, x8, x16
                        skips.append(pre)
            return F.relu(self.bn1(x)), skips[::-1]

    class BasicBlock(nn.Module):  # torchvision
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = conv(cin, cout, 3, stride), bn(cout, 1e-5)
            self.conv2, self.bn2 = conv(cout, cout, 3), bn(cout, 1e-5)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout, 1e-5))

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(y + (x if self.down is None else self.down(x)))

    class TorchvisionResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = conv(3, 64, 7, 2), bn(64, 1e-5)
            self.pool = nn.MaxPool2d(3, 2, 1)
            layers, cin = [], 64
            for i, n in enumerate(reps):
                cout = 64 * 2 ** i
                layers.append(nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2),
                                            *[BasicBlock(cout, cout, 1) for _ in range(n - 1)]))
                cin = cout
            self.layers = nn.ModuleList(layers)

        def forward(self, x):
            x0 = F.relu(self.bn1(self.conv1(x)))
            x = self.pool(x0)
            skips = [x0]
            for layer in self.layers:
                x = layer(x)
                skips.append(x)
            return x, skips[:-1][::-1]  # x16, x8, x4, x2

    class SCSE(nn.Module):
        def __init__(self, c, reduction=16):
            super().__init__()
            mid = max(c // reduction, 1)
            self.reduce, self.expand, self.spatial = nn.Conv2d(c, mid, 1), nn.Conv2d(mid, c, 1), nn.Conv2d(c, 1, 1)

        def forward(self, x):
            g = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
            return x * g + x * torch.sigmoid(self.spatial(x))

    class DecoderStage(nn.Module):
        def __init__(self, cin, cskip, cout):
            super().__init__()
            self.drop = nn.Dropout2d(skip_dropout) if cskip and skip_dropout > 0 else nn.Identity()
            self.conv1, self.bn1 = conv(cin + cskip, cout, 3), bn(cout, 1e-3)
            self.conv2, self.bn2 = conv(cout, cout, 3), bn(cout, 1e-3)
            self.att = SCSE(cout) if attention == "scse" else nn.Identity()

        def forward(self, x, skip):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            if skip is not None:
                x = self.drop(torch.cat([x, skip], 1))
            x = F.relu(self.bn1(self.conv1(x)))
            return self.att(F.relu(self.bn2(self.conv2(x))))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = PreActResNet() if layout == "preact" else TorchvisionResNet()
            chans = [512, *decoder]
            skip_ch = (256, 128, 64, 64, 0)
            self.decoder = nn.ModuleList(DecoderStage(chans[i], skip_ch[i], chans[i + 1]) for i in range(5))
            self.mask_head = nn.Conv2d(decoder[-1], 1, 1)
            self.head_drop, self.cls = nn.Dropout(head_dropout), nn.Linear(512, 1)

        def forward(self, x):
            z, skips = self.encoder(x)
            label = self.cls(self.head_drop(z.mean((2, 3))))[:, 0]
            y = z
            for stage, skip in zip(self.decoder, [*skips, None]):
                y = stage(y, skip)
            return self.mask_head(y), label  # logits (B, 1, S, S), (B,)

    net = UNet()
    glorot = {net.mask_head, net.cls}
    for m in net.modules():
        if isinstance(m, SCSE):
            glorot |= {m.reduce, m.expand, m.spatial}
    for m in net.modules():  # Keras initialisers: he_uniform (sm convs, our 3x3), glorot_uniform
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if m in glorot:
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_uniform_(m.weight, a=0.0, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.constant_(net.mask_head.bias, math.log(mask_prior / (1.0 - mask_prior)))
    return net


# ============================================================================ loss

def combo_loss(logits, target, w_bce=3.0, w_dice=1.0, w_focal=4.0, gamma=2.0, alpha=0.25):
    """Per-image combo loss (B,) on logits (B, 1, S, S) and 0/1 targets."""
    import torch
    import torch.nn.functional as F

    z, t = logits.flatten(1).float(), target.flatten(1)
    bce = F.binary_cross_entropy_with_logits(z, t, reduction="none").mean(1)
    p = torch.sigmoid(z)
    dice = 1.0 - (2.0 * (p * t).sum(1) + 1.0) / (p.sum(1) + t.sum(1) + 1.0)
    logp, log1mp = F.logsigmoid(z), F.logsigmoid(-z)
    focal = -(alpha * t * (1 - p) ** gamma * logp + (1 - alpha) * (1 - t) * p ** gamma * log1mp).mean(1)
    return w_bce * bce + w_dice * dice + w_focal * focal


# ============================================================================ evaluation

def predict(net, x: np.ndarray, batch=16, tta=True):
    """Mask probabilities (N, S, S) float32 and label probabilities (N,), hflip TTA."""
    import torch

    net.eval()
    probs, labels = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i:i + batch])
            m, c = net(xb)
            m, c = torch.sigmoid(m), torch.sigmoid(c)
            if tta:
                mf, cf = net(torch.flip(xb, dims=[3]))
                m = 0.5 * (m + torch.flip(torch.sigmoid(mf), dims=[3]))
                c = 0.5 * (c + torch.sigmoid(cf))
            probs.append(m[:, 0].numpy())
            labels.append(c.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def dice_table(probs, truth, thresholds):
    """(N, K) competition Dice of mask = prob > t for each t."""
    p = probs.reshape(len(probs), -1)
    t = truth.reshape(len(truth), -1) > 0
    above = p[:, None, :] > np.asarray(thresholds)[None, :, None]  # (N, K, P)
    pred = above.sum(2)
    inter = (above & t[:, None, :]).sum(2)
    denom = pred + t.sum(1)[:, None]
    return np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))


def triplet_search(probs, truth, tops, areas, bottoms, bottom_le_top=False, bottom_eq_top=False):
    """Best (top, min_area, bottom) and the score grid (T, A, Bo[+1])."""
    n = len(probs)
    p = probs.reshape(n, -1)
    empty = (truth.reshape(n, -1).sum(1) == 0).astype(np.float64)  # Dice of calling it empty
    count = (p[:, None, :] > np.asarray(tops)[None, :, None]).sum(2)  # (N, T)
    dice_b = dice_table(probs, truth, bottoms)  # (N, Bo)
    best, grid = None, np.full((len(tops), len(areas), len(bottoms) + bottom_eq_top), np.nan)
    dice_top = dice_table(probs, truth, tops) if bottom_eq_top else None
    for ti, top in enumerate(tops):
        for ai, area in enumerate(areas):
            keep = count[:, ti] >= area  # (N,)
            cols = [(b, dice_b[:, bi]) for bi, b in enumerate(bottoms)
                    if not (bottom_le_top and b > top + 1e-9)]
            if bottom_eq_top:
                cols.append((float(top), dice_top[:, ti]))
            for bi, (b, d) in enumerate(cols):
                score = float(np.mean(np.where(keep, d, empty)))
                grid[ti, ai, bi] = score
                if best is None or score > best["score"] + 1e-12:
                    best = {"top": float(top), "min_area": int(area), "bottom": float(b), "score": score}
    return best, grid


def check_triplet(probs, truth, rule):
    """The rule re-scored image by image with oracles.image_dice (independent of the search)."""
    scores = []
    for p, t in zip(probs, truth):
        positive = np.count_nonzero(p > rule["top"]) >= rule["min_area"]
        pred = (p > rule["bottom"]) if positive else np.zeros_like(t)
        scores.append(oracles.image_dice(pred, t))
    return float(np.mean(scores))


def auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def evaluate(probs, label_probs, truth, labels, size, full=False):
    best, _ = triplet_search(probs, truth, TOPS, MIN_AREAS, BOTTOMS)
    out = {"best_triplet": best}
    plain = dice_table(probs, truth, PLAIN).mean(0)
    k = int(np.argmax(np.round(plain, 12)))
    out["best_plain"] = {"threshold": float(PLAIN[k]), "score": float(plain[k])}
    # The classification-head rule: positive when p(label) > t, mask prob > bottom.
    n = len(probs)
    empty = (truth.reshape(n, -1).sum(1) == 0).astype(np.float64)
    dice_b = dice_table(probs, truth, BOTTOMS)
    best_label = None
    for t in LABEL_THRESHOLDS:
        keep = label_probs.reshape(-1) > t
        for bi, b in enumerate(BOTTOMS):
            score = float(np.mean(np.where(keep, dice_b[:, bi], empty)))
            if best_label is None or score > best_label["score"] + 1e-12:
                best_label = {"label_threshold": float(t), "bottom": float(b), "score": score}
    out["best_label"] = best_label
    out["dice@0.5"] = float(dice_table(probs, truth, [0.5]).mean())
    out["label_auc"] = auc(label_probs, labels)
    if full:
        areas = np.unique(np.round(np.array(TF_AREA_FRACTIONS) * size * size).astype(int))
        tf_best, _ = triplet_search(probs, truth, TOPS, areas, np.array(TF_BOTTOMS),
                                    bottom_le_top=True, bottom_eq_top=True)
        out["best_triplet_tfpneumo_grid"] = {**tf_best, "min_areas": areas.tolist()}
        out["plain_by_threshold"] = {f"{t:g}": round(float(s), 6) for t, s in zip(PLAIN, plain)}
    return out


# ============================================================================ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="SIIM layout: dicom-images-train/, train-rle.csv")
    ap.add_argument("--index", required=True, help="index.csv of a tfpneumo cache (folds)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--encoder", choices=("resnet18", "resnet34"), default="resnet18")
    ap.add_argument("--encoder-layout", choices=("preact", "torchvision"), default="preact",
                    help="preact: segmentation-models' Keras ResNet (as tfpneumo); torchvision: smp's")
    ap.add_argument("--attention", choices=("scse", "none"), default="scse",
                    help="scSE after each decoder stage (tfpneumo demo: scse, from base.yaml)")
    ap.add_argument("--decoder", default="128,64,32,16,8")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=float, default=0.5, help="warmup length in epochs")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--swa-epochs", type=int, default=2, help="also score SWA of the last K epochs (0: off)")
    ap.add_argument("--swa-bn-steps", type=int, default=10)
    ap.add_argument("--mask-resize", choices=("nearest", "area"), default="nearest")
    ap.add_argument("--labels", default=None, help="label CSV (default DATA/train-rle.csv)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-val", default=None, help="npz of validation ids, probabilities, truths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mask-prior", type=float, default=0.5,
                    help="initial mask probability (bias log(p/(1-p))); 0.5: zero bias")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import cv2
    import torch
    import torch.nn.functional as F

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    decoder = [int(v) for v in args.decoder.split(",")]
    if len(decoder) != 5 or args.size % 32:
        sys.exit("--decoder needs 5 values and --size a multiple of 32")

    # ---- data
    labels_csv = args.labels or os.path.join(args.data, "train-rle.csv")
    train_ids, val_ids, index_has_mask = read_index(args.index, args.fold)
    dicoms = find_dicoms(os.path.join(args.data, "dicom-images-train"))
    labels = read_labels(labels_csv)
    tr_img, tr_mask, _ = load_images(train_ids, dicoms, labels, args.size, args.mask_resize)
    va_img, va_mask, va_agree = load_images(val_ids, dicoms, labels, args.size, args.mask_resize)
    # has_mask from our own decoding (before resizing: any label row with pixels).
    def rle_positive(i):
        return int(any(r.strip() not in ("", "-1") for r in labels[i]))
    tr_lab = np.array([rle_positive(i) for i in train_ids], np.int64)
    va_lab = np.array([rle_positive(i) for i in val_ids], np.int64)
    mismatch = [i for i in train_ids + val_ids if rle_positive(i) != index_has_mask[i]]
    if mismatch:
        log(f"warning: {len(mismatch)} ids whose has_mask differs from index.csv, e.g. {mismatch[0]}")
    lost = int(np.sum((va_lab == 1) & (va_mask.reshape(len(va_mask), -1).sum(1) == 0)))
    va_x = to_input(va_img.astype(np.float32) / 255.0)
    load_s = time.perf_counter() - t_start
    log(f"data: {len(train_ids)} train ({tr_lab.sum()} positive), {len(val_ids)} val "
        f"({va_lab.sum()} positive) at {args.size}px in {load_s:.1f}s")

    # ---- model and optimizer
    net = build_model(args.encoder, args.encoder_layout, decoder, args.attention,
                      mask_prior=args.mask_prior)
    n_params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=0.0, betas=(0.9, 0.999), eps=1e-7,
                            weight_decay=args.weight_decay)
    total = args.epochs * args.steps
    warmup = round(args.warmup * args.steps)
    if warmup >= total:
        sys.exit("--warmup leaves no step for the cosine decay")
    augment = Augmenter(args.size, rng)
    sampler = BalancedSampler(tr_img, tr_mask, tr_lab, args.batch, augment, rng)

    # ---- training
    history, best, best_state, best_epoch = [], None, None, -1
    swa_sum, swa_n = None, 0
    step = 0
    t_train = time.perf_counter()
    for epoch in range(args.epochs):
        rate = positive_rate(epoch, args.epochs)
        net.train()
        t_ep, sums = time.perf_counter(), np.zeros(3)
        for _ in range(args.steps):
            lr = lr_at(step, args.lr, warmup, total)
            for g in opt.param_groups:
                g["lr"] = lr
            x, m, y = sampler(rate)
            x, m, y = torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(y)
            mask_logits, label_logits = net(x)
            per_image = combo_loss(mask_logits, m)
            positive = (m.flatten(1).amax(1) > 0.5).float()
            mask_loss = (per_image * positive).sum() / positive.sum().clamp(min=1.0)
            label_loss = F.binary_cross_entropy_with_logits(label_logits, y)
            loss = mask_loss + 0.5 * label_loss
            if not torch.isfinite(loss):
                sys.exit(f"loss became {loss.item()} at epoch {epoch + 1} step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sums += (loss.item(), mask_loss.item(), label_loss.item())
            step += 1
        fit_s = time.perf_counter() - t_ep
        probs, label_probs = predict(net, va_x)
        res = evaluate(probs, label_probs, va_mask, va_lab, args.size)
        score = res["best_triplet"]["score"]
        row = {"epoch": epoch + 1, "positive_rate": round(rate, 4), "lr_end": lr,
               "loss": sums[0] / args.steps, "mask_loss": sums[1] / args.steps,
               "label_loss": sums[2] / args.steps, "val_best_triplet": score,
               "val_best_plain": res["best_plain"]["score"], "val_dice@0.5": res["dice@0.5"],
               "val_label_auc": res["label_auc"], "fit_seconds": round(fit_s, 1),
               "val_seconds": round(time.perf_counter() - t_ep - fit_s, 1)}
        history.append(row)
        log(f"epoch {epoch + 1}/{args.epochs} rate {rate:.2f} loss {row['loss']:.4f} "
            f"(mask {row['mask_loss']:.4f} label {row['label_loss']:.4f}) val triplet {score:.4f} "
            f"plain {row['val_best_plain']:.4f} auc {row['val_label_auc']:.3f} "
            f"[{fit_s:.1f}s + {row['val_seconds']:.1f}s]")
        if best is None or score >= best - 1e-12:
            best, best_epoch = score, epoch + 1
            best_state = copy.deepcopy(net.state_dict())
        if args.swa_epochs and epoch >= args.epochs - args.swa_epochs:
            params = {k: v.detach().clone() for k, v in net.named_parameters()}
            swa_sum = params if swa_sum is None else {k: swa_sum[k] + params[k] for k in params}
            swa_n += 1
    train_s = time.perf_counter() - t_train

    # ---- SWA (reported apart), then the kept best-epoch model
    swa_report = None
    if swa_n:
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.copy_(swa_sum[k] / swa_n)
        bns = [mod for mod in net.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [mod.momentum for mod in bns]
        for mod in bns:
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average, as torch.optim.swa_utils.update_bn
        net.train()
        with torch.no_grad():
            for _ in range(args.swa_bn_steps):
                # first-epoch positive rate: tfpneumo recomputes BN on a fresh training stream
                net(torch.from_numpy(sampler(positive_rate(0, args.epochs))[0]))
        for mod, mom in zip(bns, saved):
            mod.momentum = mom
        probs, label_probs = predict(net, va_x)
        swa_res = evaluate(probs, label_probs, va_mask, va_lab, args.size, full=True)
        swa_report = {"epochs_averaged": swa_n, "bn_steps": args.swa_bn_steps, **swa_res}

    net.load_state_dict(best_state)
    t_eval = time.perf_counter()
    probs, label_probs = predict(net, va_x)
    final = evaluate(probs, label_probs, va_mask, va_lab, args.size, full=True)
    check = check_triplet(probs, va_mask, final["best_triplet"])
    if abs(check - final["best_triplet"]["score"]) > 1e-9:
        sys.exit(f"internal check failed: search {final['best_triplet']['score']} vs oracle {check}")
    empty = float(np.mean(va_mask.reshape(len(va_mask), -1).sum(1) == 0))
    eval_s = time.perf_counter() - t_eval

    if args.save_val:
        np.savez_compressed(args.save_val, image_id=np.array(val_ids), prob=probs.astype(np.float16),
                            label_prob=label_probs, truth=va_mask, has_mask=va_lab)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    settings.update({
        "decoder": decoder, "total_steps": total, "warmup_steps": warmup,
        "n_train": len(train_ids), "n_train_positive": int(tr_lab.sum()),
        "n_val_positive": int(va_lab.sum()), "n_params": n_params,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "best_epoch": best_epoch, "selection": "best validation triplet score (ties: later epoch)",
        "has_mask_mismatches_vs_index": len(mismatch),
        "val_positive_emptied_by_resize": lost,
        "val_truth_dice_vs_other_resize": float(va_agree.mean()),
        "grids": {"top": TOPS.tolist(), "min_area": MIN_AREAS.tolist(), "bottom": BOTTOMS.tolist(),
                  "plain": PLAIN.tolist()},
    })
    report = {
        "best_triplet": final["best_triplet"],
        "best_plain": final["best_plain"],
        "all_empty": empty,
        "train_seconds": round(train_s, 1),
        "n_val": len(val_ids),
        "best_triplet_tfpneumo_grid": final["best_triplet_tfpneumo_grid"],
        "dice@0.5": final["dice@0.5"],
        "label_auc": final["label_auc"],
        "plain_by_threshold": final["plain_by_threshold"],
        "swa": swa_report,
        "history": history,
        "load_seconds": round(load_s, 1),
        "eval_seconds": round(eval_s, 2),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "settings": settings,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"peer best triplet {final['best_triplet']['score']:.4f} vs all-empty {empty:.4f}")


if __name__ == "__main__":
    main()
