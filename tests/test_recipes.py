"""The recipe configs against tables of their sources' values.

Each table below is written from the source repository's files (path:line in the comment of
every entry, at the commit named in the table), not from the config: the test loads the
shipped config and checks every entry. ``stages.<name>.<key>`` entries are checked in that
stage; other keys in every stage (or in the config itself when it has no stages). Values the
config cannot hold (test-time augmentation, the submitted rule) are checked in the ``tfpneumo
submit`` command that the config's header gives.
"""

from __future__ import annotations

import math
import re
import shlex

import pytest

from tfpneumo.config import Config, find_config, load_config

SNEDDY = "sneddy/pneumothorax-segmentation@c96af5b34b12694089752ee0730523ea5546861e"
AMIRASSOV = "amirassov/kaggle-pneumothorax@24b91a9425097023f0cc7781a9380cb247babe22"
ZDAIOT = "zdaiot/Kaggle-Pneumothorax-Seg@db9a780c6cf865bafb4610df90c924874ce6ab90"


def sneddy_steps(positives: list[int], rate: float, batch: int = 2) -> int:
    """Batches per epoch of PneumoSampler (unet_pipeline/Pneumadataset.py:106-115): every
    positive of the training folds plus int(n * (1 - rate) / rate) negatives, mean over folds."""
    return round(sum((n + int(n * (1 - rate) / rate)) // batch for n in positives) / len(positives))


# Positives in the 4 training folds of folds 0-4, counted in unet_pipeline/folds/*.csv.
STAGE1_POSITIVES = [1910, 1915, 1895, 1899, 1897]   # folds/train_folds_5.csv (2379 positives)
STAGE2_POSITIVES = [2200, 2205, 2185, 2189, 2187]   # folds/2nd_stage_folds.csv (2669 positives)

FIRST = {  # sneddy, unet_pipeline/experiments/albunet_valid/ (P0..P2, S2 = train_config_*.yaml)
    "seed": 42,                                   # P0:5 SEED
    "data.image_size": 1024,                      # P0:3 dataset1024; json Resize 1024
    "data.crop": "resize",                        # train_transforms_complex_1024_old.json Resize
    "data.batch_size": 2,                         # P0:61 BATCH_SIZE
    "optimizer.accumulation_steps": 1,            # P0:62 GRADIENT_ACCUMULATION_STEPS
    "optimizer.clipnorm": 0.1,                    # P0:63 GRADIENT_CLIPPING; Learning.py:87
    "optimizer.weight_decay": 5e-6,               # P0:50 Adam weight_decay
    "model.encoder": "resnet34",                  # P0:17-18 AlbuNet (ternausnets.py:174 resnet34)
    "model.attention": "none",                    # ternausnets.py:150-226, no attention
    "model.skip_dropout": 0.0,                    # ternausnets.py:150-226, no dropout
    "model.bn_momentum": 0.9,                     # torch BatchNorm2d default momentum 0.1
    "model.mask_prior": 0.5,                      # ternausnets.py:202 nn.Conv2d default init
    "loss.mask": "combo",                         # P0:37-39 ComboLoss
    "loss.combo_bce": 3.0,                        # P0:42
    "loss.combo_dice": 1.0,                       # P0:43
    "loss.combo_focal": 4.0,                      # P0:44
    "loss.combo_lovasz": 0.0,                     # P0:41-44 (no lovasz)
    "loss.focal_gamma": 2.0,                      # Losses.py:295 FocalLoss2d(gamma=2)
    "loss.focal_alpha": None,                     # Losses.py:309-310 no alpha
    "loss.dice_smooth": 1e-6,                     # Losses.py:18 eps
    "loss.dice_per_image": False,                 # Losses.py:109 DiceLoss(per_image=False)
    "loss.mask_positives_only": False,            # Losses.py:126-146 every image
    "loss.label_weight": 0.0,                     # ternausnets.py:226 one output, no head
    "augment.hflip": 0.5,                         # train_transforms json HorizontalFlip p 0.5
    "augment.color_p": 0.3,                       # json OneOf p 0.3
    "augment.contrast": 0.2,                      # json RandomContrast limit 0.2
    "augment.gamma": 0.2,                         # json RandomGamma 80-120
    "augment.brightness": 0.2,                    # json RandomBrightness limit 0.2
    "augment.elastic_p": 0.1,                     # json OneOf p 0.3 of 3 (Elastic)
    "augment.grid_distortion_p": 0.1,             # json OneOf p 0.3 of 3 (GridDistortion)
    "augment.optical_distortion_p": 0.1,          # json OneOf p 0.3 of 3 (OpticalDistortion)
    "augment.affine_p": 0.5,                      # json ShiftScaleRotate p 0.5
    "augment.shift": 0.0625,                      # json shift_limit 0.0625
    "augment.scale": 0.1,                         # json scale_limit 0.1
    "augment.rotate": 45.0,                       # json rotate_limit 45
    "train.precision": "float32",                 # Learning.py: no amp
    "train.freeze_encoder_epochs": 0,             # P0:16 FREEZE False
    "stages.part0.data.positive_rate_start": 0.8,  # P0:29 NON_EMPTY_MASK_PROBA
    "stages.part0.data.positive_rate_end": 0.8,    # P0:29
    "stages.part0.train.steps_per_epoch": sneddy_steps(STAGE1_POSITIVES, 0.8),
    "stages.part0.optimizer.lr": 1e-4,             # P0:49
    "stages.part0.optimizer.schedule": "constant",  # P0:52-59 ReduceLROnPlateau (not in tfpneumo)
    "stages.part0.train.epochs": 10,               # README.md:81 "train for 10-12 epoches"
    "stages.part0.train.top_k": 5,                 # P0:71 TOPK
    "stages.part1.data.positive_rate_start": 0.6,  # P1:29
    "stages.part1.data.positive_rate_end": 0.6,    # P1:29
    "stages.part1.train.steps_per_epoch": sneddy_steps(STAGE1_POSITIVES, 0.6),
    "stages.part1.optimizer.lr": 1e-5,             # P1:49
    "stages.part1.optimizer.schedule": "cosine",   # P1:53-57 CosineAnnealingLR
    "stages.part1.optimizer.warmup_epochs": 0.0,   # P1:53-57 no warmup
    "stages.part1.train.epochs": 8,                # P1:56 T_max 8
    "stages.part1.optimizer.min_lr_ratio": 1e-7 / 1e-5,  # P1:57 eta_min / P1:49 lr
    "stages.part1.train.top_k": 3,                 # P1:75 TOPK
    "stages.part2.data.positive_rate_start": 0.4,  # P2:29
    "stages.part2.data.positive_rate_end": 0.4,    # P2:29
    "stages.part2.train.steps_per_epoch": sneddy_steps(STAGE1_POSITIVES, 0.4),
    "stages.part2.optimizer.lr": 1e-5,             # P2:49
    "stages.part2.optimizer.schedule": "cosine",   # P2:53-57
    "stages.part2.train.epochs": 8,                # P2:56 T_max 8
    "stages.part2.optimizer.min_lr_ratio": 1e-7 / 1e-5,  # P2:57 / P2:49
    "stages.part2.train.top_k": 3,                 # P2:75
    "stages.stage2.data.positive_rate_start": 0.4,  # S2:29
    "stages.stage2.data.positive_rate_end": 0.4,    # S2:29
    "stages.stage2.train.steps_per_epoch": sneddy_steps(STAGE2_POSITIVES, 0.4),
    "stages.stage2.optimizer.lr": 1e-5,             # S2:49
    "stages.stage2.optimizer.schedule": "cosine",   # S2:52-56
    "stages.stage2.train.epochs": 8,                # S2:55 T_max 8
    "stages.stage2.optimizer.min_lr_ratio": 1e-7 / 1e-5,  # S2:56 / S2:49
    "stages.stage2.train.top_k": 3,                 # S2:74
}
FIRST_SUBMIT = {  # 2nd_stage_inference.yaml:32 FLIP, 2nd_stage_submit.yaml:4-6, images at 1024
    "--size": 1024, "--hflip": True, "--rule": "triplet",
    "--top": 0.75, "--min-area": 800, "--bottom": 0.4,
}

FOURTH = {  # amirassov, configs/resnet34_768_unet.yaml (C) unless said
    "seed": 666,                                   # src/train.py:41 set_global_seeds(666)
    "prepare.folds": 8,                            # scripts/train.sh:3 FOLD in {0..7}
    "prepare.size": 768,                           # configs/train_transforms_768.yaml:87-92 Resize 768
    "data.image_size": 512,                        # train_transforms_768.yaml:93-98 RandomCrop 512
    "data.crop": "random_crop",                    # train_transforms_768.yaml:94
    "data.batch_size": 8,                          # C:37
    "data.positive_rate_start": 0.8,               # C:40; src/data.py:59 at epoch 0
    "data.positive_rate_end": 0.8 - (0.8 - 0.22) / 60 * 59,  # src/data.py:59 at epoch 59
    "train.epochs": 60,                            # C:29
    "train.top_k": 4,                              # src/train.py:30 num_checkpoints=4
    "train.precision": "float32",                  # src/runner.py: no amp
    "model.encoder": "resnet34",                   # C:6-9; src/models/unet.py:12-19
    "model.encoder_weights": "imagenet",           # src/models/unet.py:103 pretrained=True
    "model.decoder_filters": (256, 256, 128, 64, 64),  # src/models/unet.py:15-16 (+last 64)
    "model.head_dropout": 0.0,                     # src/models/unet.py:216-230 avgpool -> fc
    "model.head_pool": "avg",                      # src/models/unet.py:216 AdaptiveAvgPool2d
    "model.bn_momentum": 0.9,                      # torch BatchNorm2d default momentum 0.1
    "model.mask_prior": 0.5,                       # src/models/unet.py:28-29 bias zero_()
    "loss.mask": "combo",                          # C:15 ComboSuperVisionLoss
    "loss.combo_bce": 3.0,                         # C:18
    "loss.combo_dice": 1.0,                        # C:19
    "loss.combo_focal": 0.0,                       # C:17-19
    "loss.dice_smooth": 1e-5,                      # src/losses/dice.py:9 eps
    "loss.dice_per_image": False,                  # src/losses/combo.py:21 per_image=False
    "loss.mask_positives_only": False,             # src/losses/combo.py:72 every image
    "loss.mask_weight": 1 - 0.1,                   # C:20; src/losses/combo.py:74
    "loss.label_weight": 0.1,                      # C:20 sv_weight
    "optimizer.lr": 7.5e-5,                        # C:47
    "optimizer.weight_decay": 1e-5,                # C:48
    "optimizer.clipnorm": 0.5,                     # src/runner.py:121
    "optimizer.accumulation_steps": 1,             # src/runner.py:119-124
    "optimizer.schedule": "cosine_restarts",       # C:49 CosineAnnealingLR (periodic)
    "optimizer.restart_epochs": 8.0,               # C:51 T_max
    "optimizer.warmup_epochs": 0.0,                # C:49-52 no warmup
    "optimizer.min_lr_ratio": 1e-6 / 7.5e-5,       # C:52 eta_min / C:47 lr
    "augment.hflip": 0.5,                          # train_transforms_768.yaml:10-12
    "augment.color_p": 0.3,                        # train_transforms_768.yaml:14-26 OneOf p 0.3
    "augment.brightness": 0.2,                     # train_transforms_768.yaml:20-22
    "augment.contrast": 0.2,                       # train_transforms_768.yaml:23-25
    "augment.gamma": 0.0,                          # no RandomGamma in the file
    "augment.elastic_p": 0.1,                      # train_transforms_768.yaml:28-42 OneOf 0.3/3
    "augment.grid_distortion_p": 0.1,              # train_transforms_768.yaml:43-54
    "augment.optical_distortion_p": 0.1,           # train_transforms_768.yaml:55-68
    "augment.affine_p": 0.5,                       # train_transforms_768.yaml:75
    "augment.shift": 0.2,                          # train_transforms_768.yaml:83-85
    "augment.scale": 0.2,                          # train_transforms_768.yaml:80-82
    "augment.rotate": 20.0,                        # train_transforms_768.yaml:76-78
}
FOURTH_SUBMIT = {  # val_transforms_768.yaml:7-12, src/inference.py:25-31, src/submit.py:21-24
    "--size": 768, "--hflip": True, "--rule": "label",
    "--label-threshold": 0.4, "--min-area": 800, "--bottom": 0.4,
}

THIRTY_FOURTH = {  # zdaiot, train_sfold_stage2.py (T), solver.py (S)
    "prepare.folds": 5,                            # T:219 n_splits
    "prepare.seed": 1,                             # T:94 StratifiedKFold(random_state=1)
    "model.encoder": "resnet34",                   # S:90 smp.Unet('resnet34')
    "model.encoder_weights": "imagenet",           # S:90
    "model.decoder_filters": (256, 128, 64, 32, 16),  # smp.Unet decoder_channels default
    "model.attention": "none",                     # S:90 smp.Unet default
    "model.bn_momentum": 0.9,                      # torch BatchNorm2d default momentum 0.1
    "model.mask_prior": 0.5,                       # S:90 smp.Unet, no prior initialisation
    "loss.label_weight": 0.0,                      # S:90 one output, no head
    "loss.dice_per_image": True,                   # utils/loss.py:98-107 per sample, mean
    "loss.combo_focal": 0.0,                       # utils/loss.py:155-174 BCE + Dice only
    "optimizer.weight_decay": 0.0,                 # T:246
    "optimizer.clipnorm": 0.0,                     # S:216-219 no clipping
    "optimizer.accumulation_steps": 1,             # T:210 epoch_stage2_accumulation 0
    "optimizer.schedule": "cosine",                # S:175, 299, 431 CosineAnnealingLR
    "optimizer.warmup_epochs": 0.0,                # S:175 no warmup
    "train.freeze_encoder_epochs": 0,              # T:205 epoch_stage1_freeze
    "train.top_k": 1,                              # S:129-136 one _best.pth per stage
    "train.precision": "float32",                  # S: no amp
    "augment.hflip": 0.4,                          # utils/data_augmentation.py:54
    "augment.affine_p": 0.4,                       # utils/data_augmentation.py:55 Rotate p 0.4
    "augment.rotate": 15.0,                        # utils/data_augmentation.py:55 limit 15
    "augment.shift": 0.0,                          # utils/data_augmentation.py:53-77 none
    "augment.scale": 0.0,                          # utils/data_augmentation.py:53-77 none
    "augment.clahe_p": 0.4,                        # utils/data_augmentation.py:58
    "augment.color_p": 0.1,                        # utils/data_augmentation.py:61-62 p 0.1
    "augment.gamma": 0.2,                          # utils/data_augmentation.py:61 80-120
    "stages.stage1.data.image_size": 768,          # T:202
    "stages.stage1.data.positive_rate_start": None,  # datasets/siim.py:179 shuffle, no sampler
    "stages.stage1.data.batch_size": 12,           # T:203
    "stages.stage1.train.epochs": 40,              # T:204
    "stages.stage1.optimizer.lr": 2e-4,            # T:243
    "stages.stage1.optimizer.min_lr_ratio": (1 + math.cos(math.pi * 40 / 50)) / 2,  # S:175 T_max 40+10
    "stages.stage2.data.image_size": 1024,         # T:207
    "stages.stage2.data.positive_rate_start": None,  # datasets/siim.py:179 (T:141-142)
    "stages.stage2.data.batch_size": 6,            # T:208
    "stages.stage2.train.epochs": 15,              # T:209
    "stages.stage2.optimizer.lr": 5e-6,            # T:244
    "stages.stage2.optimizer.min_lr_ratio": (1 + math.cos(math.pi * 15 / 20)) / 2,  # S:299 +5
    "stages.stage3.data.image_size": 1024,         # T:159 same as stage 2
    "stages.stage3.data.batch_size": 6,            # T:161 batch_size_stage2
    "stages.stage3.train.epochs": 10,              # T:213
    "stages.stage3.optimizer.lr": 1e-7,            # T:245
    "stages.stage3.optimizer.min_lr_ratio": (1 + math.cos(math.pi * 10 / 15)) / 2,  # S:431 +5
    "stages.stage3.data.positive_rate_start": 1.0,  # T:160 images with a mask only
    "stages.stage3.data.positive_rate_end": 1.0,    # T:160
}
THIRTY_FOURTH_SUBMIT = {  # create_submission.py:130-170, :212-250 hflip; README.md:250 0.67, 2048
    "--size": 1024, "--hflip": True, "--rule": "triplet",
    "--top": 0.67, "--min-area": 2048, "--bottom": 0.67,
}

RECIPES = {
    "siim_1st_place": (SNEDDY, FIRST, FIRST_SUBMIT),
    "siim_4th_place": (AMIRASSOV, FOURTH, FOURTH_SUBMIT),
    "siim_34th_place": (ZDAIOT, THIRTY_FOURTH, THIRTY_FOURTH_SUBMIT),
}


def _get(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _same(got, want) -> bool:
    if isinstance(want, float) and not isinstance(got, bool) and got is not None:
        return got == pytest.approx(want, rel=1e-6)
    return got == want


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_config_holds_the_source_values(name):
    _, table, _ = RECIPES[name]
    cfg = load_config(find_config(name))
    stages = dict(cfg.stage_configs())
    wrong = []
    for key, want in table.items():
        if key.startswith("stages."):
            _, stage, dotted = key.split(".", 2)
            assert stage in stages, f"{name}: no stage {stage!r} (stages: {list(stages)})"
            checks = [(stage, stages[stage])]
        else:
            dotted, checks = key, list(stages.items())
        for stage, stage_cfg in checks:
            got = _get(stage_cfg, dotted)
            if not _same(got, want):
                wrong.append(f"{key} [{stage}]: config {got!r}, source {want!r}")
    assert not wrong, f"{name}:\n" + "\n".join(wrong)


def _header(name: str) -> str:
    lines = find_config(name).read_text(encoding="utf-8").splitlines()
    head = []
    for line in lines:
        if not line.startswith("#"):
            break
        head.append(line)
    return "\n".join(head)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_header_names_its_source_and_commit(name):
    source, _, _ = RECIPES[name]
    repo, commit = source.split("@")
    head = _header(name)
    assert f"github.com/{repo}" in head and commit in head


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_submit_command_holds_the_source_rule(name):
    from tfpneumo.evaluation.rules import Rule

    _, _, want = RECIPES[name]
    commands = re.findall(rf"^#\s+(tfpneumo submit --config {name}\b.*)$", _header(name), re.M)
    assert len(commands) == 1, f"{name}: one 'tfpneumo submit --config {name}' line in the header"
    args = shlex.split(commands[0])[2:]
    flags: dict = {}
    i = 0
    while i < len(args):
        if args[i] in ("--hflip", "--no-hflip"):
            flags["--hflip"] = args[i] == "--hflip"
            i += 1
        else:
            flags[args[i]] = args[i + 1]
            i += 2
    assert flags.pop("--config") == name
    got = {k: (v if isinstance(v, bool) else type(want.get(k, ""))(v)) for k, v in flags.items()}
    assert got == want
    # The command's rule is one tfpneumo accepts.
    Rule(kind=got["--rule"], bottom=got["--bottom"], top=got.get("--top"),
         min_area=got["--min-area"], label_threshold=got.get("--label-threshold"))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_losses_build(name):
    """The configured losses build (the batch Dice is not wrapped in positives-only)."""
    from tfpneumo.training import losses as L

    for _, cfg in load_config(find_config(name)).stage_configs():
        built, weights = L.build_losses(cfg.loss)
        assert not isinstance(built["mask"], L.PositivesOnly)
        assert weights == {"mask": cfg.loss.mask_weight, "label": cfg.loss.label_weight}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_model_builds_small(name, tf):
    """Each recipe's model at 64 px without downloading weights: outputs mask and label."""
    import numpy as np

    from tfpneumo.config import replace
    from tfpneumo.models.unet import build_model

    cfg = replace(load_config(find_config(name)), model={"encoder_weights": "none"})
    net = build_model(cfg.model, input_shape=(64, 64, 1))
    out = net(np.zeros((1, 64, 64, 1), np.float32), training=False)
    assert tuple(out["mask"].shape) == (1, 64, 64, 1) and tuple(out["label"].shape) == (1, 1)
