"""tfpneumo predict (PNGs, overlay drawing) and the test-time augmentation of inference.py."""

from __future__ import annotations

import numpy as np
import pytest
from factories import make_run, tiny_model_file

import tfpneumo  # noqa: F401  (sets SM_FRAMEWORK before segmentation_models is imported)
from tfpneumo import TfpneumoError as SubmitError
from tfpneumo.data.dicom import DicomError, read_dicom
from tfpneumo.inference.ensemble import ensemble_predictor, predict_tta, scaled_size
from tfpneumo.inference.pictures import OUTLINE, TINT_ALPHA, outline, overlay, predict

THRESHOLDS = {"kind": "triplet", "top": 0.5, "bottom": 0.5, "min_area": 1}


@pytest.fixture(scope="module")
def net(tf):
    import keras

    import tfpneumo.models.layers  # noqa: F401  (registers the custom layer)

    return keras.saving.load_model(tiny_model_file(), safe_mode=True, compile=False)


def _toy(keras, bias: float):
    """A pointwise model with the UNet's outputs: mask = sigmoid(x + bias) per pixel,
    label = its mean. Pointwise, so every scale and flip of a constant image agrees."""
    image = keras.Input((None, None, 1))
    logits = keras.layers.Conv2D(1, 1, kernel_initializer="ones", bias_initializer="zeros")(image)
    logits = keras.layers.Rescaling(1.0, offset=bias)(logits)
    mask = keras.layers.Activation("sigmoid", name="mask")(logits)
    label = keras.layers.GlobalAveragePooling2D(name="label")(mask)
    return keras.Model(image, {"mask": mask, "label": label})


# ----------------------------------------------------------------------------- predict

def test_predict_writes_three_pngs_at_the_dicom_size(siim_mini, tmp_path):
    from PIL import Image

    cfg = make_run(tmp_path)
    files = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[:2]
    out = tmp_path / "pred"
    summary = predict(cfg, files, out=out, rule=THRESHOLDS, size=64, workdir=tmp_path)
    assert len(summary.splitlines()) == 3 and "wrote 6 files" in summary
    for path in files:
        image_id = path.stem
        prob = np.asarray(Image.open(out / f"{image_id}_prob.png"))
        mask = np.asarray(Image.open(out / f"{image_id}_mask.png"))
        over = Image.open(out / f"{image_id}_overlay.png")
        assert prob.shape == mask.shape == (1024, 1024) and prob.dtype == np.uint8
        assert over.size == (1024, 1024) and over.mode == "RGB"
        assert set(np.unique(mask)) <= {0, 255}
        # mask = prob >= 0.5 (prob PNG is prob * 255 rounded): consistent up to rounding
        on = mask == 255
        assert prob[on].min(initial=255) >= 127 and prob[~on].max(initial=0) <= 128
        # away from the mask, its outline and the label box, the overlay is the radiograph
        grey, _ = read_dicom(path)
        rgb = np.asarray(over)
        far = ~on & ~outline(on)
        far[:80, :] = False
        np.testing.assert_array_equal(rgb[far], np.repeat(grey[far][:, None], 3, axis=1))


def test_predict_rejects_a_file_that_is_not_dicom(tmp_path):
    cfg = make_run(tmp_path)
    bad = tmp_path / "notes.dcm"
    bad.write_text("not a DICOM at all\n")
    with pytest.raises(DicomError, match="notes.dcm: not a DICOM file") as info:
        predict(cfg, [bad], out=tmp_path / "pred", rule=THRESHOLDS, workdir=tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pred").exists()
    with pytest.raises(DicomError, match="missing.dcm: file not found"):
        predict(cfg, [tmp_path / "missing.dcm"], out=tmp_path / "pred",
                rule=THRESHOLDS, workdir=tmp_path)


def test_predict_refuses_two_files_with_one_id(siim_mini, tmp_path):
    cfg = make_run(tmp_path)
    path = next((siim_mini / "dicom-images-test").glob("*.dcm"))
    with pytest.raises(SubmitError, match="would overwrite each other"):
        predict(cfg, [path, path], out=tmp_path / "pred", rule=THRESHOLDS,
                workdir=tmp_path)


# ----------------------------------------------------------------------------- drawing

def test_outline_is_the_two_pixel_morphological_gradient():
    mask = np.zeros((30, 30), bool)
    mask[10:20, 10:20] = True
    edge = outline(mask)
    column = edge[:, 15]
    assert np.flatnonzero(column).tolist() == [9, 10, 19, 20]  # one outside, one inside
    assert not edge[15, 15] and not edge[0, 0]
    assert not outline(np.zeros((8, 8), bool)).any()


def test_overlay_tints_outlines_and_labels():
    grey = np.full((256, 256), 100, np.uint8)
    mask = np.zeros((256, 256), bool)
    mask[100:200, 120:220] = True
    rgb = overlay(grey, mask, 0.8712)
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
    inside = np.round((1 - TINT_ALPHA) * 100 + TINT_ALPHA * np.array([255, 0, 0]))
    np.testing.assert_array_equal(rgb[150, 170], inside)
    np.testing.assert_array_equal(rgb[100, 170], OUTLINE)  # first row of the mask
    np.testing.assert_array_equal(rgb[99, 170], OUTLINE)  # the row above it
    np.testing.assert_array_equal(rgb[250, 10], [100, 100, 100])  # untouched
    corner = rgb[:40, :200]
    assert corner.max() == 255 and corner.min() < 60  # white text on a dark box
    assert np.array_equal(overlay(grey, np.zeros_like(mask), 0.1)[250, 250], [100, 100, 100])


# ----------------------------------------------------------------------------- TTA

def test_scaled_size_is_a_multiple_of_32():
    assert scaled_size(1024, 0.75) == 768 and scaled_size(1024, 1.25) == 1280
    assert scaled_size(512, 0.7) == 352  # 358.4 -> 11.2 blocks -> 11 * 32
    assert scaled_size(64, 0.1) == 32


def test_hflip_tta_equals_the_manual_average(net):
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 64, 96, 1)).astype(np.float32)
    plain = net(x, training=False)
    mirrored = net(x[:, :, ::-1].copy(), training=False)
    expected_mask = 0.5 * (plain["mask"].numpy() + mirrored["mask"].numpy()[:, :, ::-1])
    expected_label = 0.5 * (plain["label"].numpy() + mirrored["label"].numpy())[:, 0]
    mask, label = ensemble_predictor([net], hflip=True)(x)
    np.testing.assert_allclose(mask.numpy(), expected_mask, atol=1e-5)
    np.testing.assert_allclose(label.numpy(), expected_label, atol=1e-5)
    # without the flip: the plain prediction
    mask, _ = ensemble_predictor([net], hflip=False)(x)
    np.testing.assert_allclose(mask.numpy(), plain["mask"].numpy(), atol=1e-5)


def test_multiscale_tta_shapes(net):
    x = np.random.default_rng(2).uniform(0, 255, size=(3, 64, 96, 1)).astype(np.float32)
    mask, label = predict_tta(net, x, hflip=True, scales=(1.0, 0.75, 1.25))
    assert mask.shape == (3, 64, 96, 1) and label.shape == (3,)
    assert 0.0 <= float(np.min(mask)) and float(np.max(mask)) <= 1.0
    # the compiled ensemble takes any batch and image size (multiples of 32)
    run = ensemble_predictor([net], hflip=False, scales=(1.0, 0.5))
    assert run(x)[0].shape == (3, 64, 96, 1)
    small, small_label = run(x[:1, :32, :64])
    assert small.shape == (1, 32, 64, 1) and small_label.shape == (1,)


def test_multiscale_and_ensemble_on_pointwise_models(tf):
    import keras

    # a constant image through a pointwise model: sigmoid(c + bias) at every scale and flip
    c = 0.25
    x = np.full((2, 64, 64, 1), c, np.float32)
    a, b = _toy(keras, 0.0), _toy(keras, -1.0)
    mask, label = ensemble_predictor([a, b], scales=(1.0, 0.5, 1.5))(x)

    def sigmoid(v: float) -> float:
        return 1.0 / (1.0 + np.exp(-v))

    expected = 0.5 * (sigmoid(c) + sigmoid(c - 1.0))
    np.testing.assert_allclose(mask.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(label.numpy(), [expected, expected], atol=1e-6)


def test_two_folds_with_flip_in_one_forward_keep_the_masks_of_separate_passes(siim_mini, net):
    """Issue 13: each fold sees a batch and its mirror in one forward. Oracle, by hand: each
    network on the images, then separately on their mirror (eager, all 10 at once), mirror
    back, average; then the folds. The masks submit would write (1024 x 1024, from the map
    at 256) must be identical at every threshold, on the real test DICOMs of siim-mini."""
    import cv2
    import keras

    from tfpneumo.evaluation.rules import Rule
    from tfpneumo.inference.ensemble import Predictor

    second = keras.saving.load_model(tiny_model_file(), safe_mode=True, compile=False)
    rng = np.random.default_rng(3)
    for v in second.trainable_weights:  # another fold: every kernel rescaled at random
        if "kernel" in v.path:
            v.assign(v.numpy() * rng.uniform(0.7, 1.3, v.shape).astype(np.float32))
    nets, size = [net, second], 256
    files = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))
    assert len(files) == 10
    # batches of 3, 3, 3 and 1: every slice of the doubled batch, the last one short
    ensemble = Predictor(files=[], size=size, batch_size=3, hflip=True, scales=(1.0,),
                         clahe=False, run=ensemble_predictor(nets, hflip=True))
    got = list(ensemble.predict([(f.stem, f) for f in files]))
    assert [p.image_id for p in got] == [f.stem for f in files]

    x = np.stack([cv2.resize(read_dicom(f)[0], (size, size), interpolation=cv2.INTER_AREA)
                  for f in files]).astype(np.float32)[..., None]
    maps, labels = [], []
    for n in nets:
        plain, mirrored = n(x, training=False), n(x[:, :, ::-1].copy(), training=False)
        maps.append(0.5 * (plain["mask"].numpy() + mirrored["mask"].numpy()[:, :, ::-1]))
        labels.append(0.5 * (plain["label"].numpy() + mirrored["label"].numpy())[:, 0])
    expected, expected_label = 0.5 * (maps[0] + maps[1])[..., 0], 0.5 * (labels[0] + labels[1])
    assert np.abs(maps[0] - maps[1]).max() > 0.05  # the two folds really differ

    np.testing.assert_allclose(np.stack([p.prob for p in got]), expected, atol=1e-5)
    np.testing.assert_allclose([p.label_prob for p in got], expected_label, atol=1e-5)
    differing = 0
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):
        cut = float(np.quantile(expected, q))
        rule = Rule("triplet", bottom=cut, top=cut, min_area=1)
        for p, want, label in zip(got, expected, expected_label, strict=True):
            mask = rule.mask(p.prob, p.label_prob, p.original.shape)
            assert mask.shape == (1024, 1024)
            differing += np.count_nonzero(mask != rule.mask(want, label, (1024, 1024)))
    assert differing == 0


def test_predict_on_a_full_disk_leaves_no_partial_png(siim_mini, tmp_path, monkeypatch):
    """Issue 11: a full disk left 0-byte PNGs under final names. Every PNG is written whole
    or not at all, and ENOSPC is one line naming the file (the write itself is made to fail:
    the real full disk is tests/system/test_faults.py::test_predict_disk_full)."""
    import errno
    import pathlib

    from PIL import Image

    cfg = make_run(tmp_path)
    (path,) = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[:1]
    out = tmp_path / "pred"
    real, calls = pathlib.Path.write_bytes, []

    def disk_fills_up(self, data):
        calls.append(self.name)
        if len(calls) < 2:
            return real(self, data)
        real(self, data[:100])  # what reached the disk before it filled up
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_fills_up)
    with pytest.raises(SubmitError) as e:
        predict(cfg, [path], out=out, rule=THRESHOLDS, size=64, hflip=False, workdir=tmp_path)
    assert str(e.value) == (f"{out / path.stem}_mask.png: cannot write (No space left on "
                            "device); free space and rerun")
    assert calls == [f"{path.stem}_prob.png.tmp", f"{path.stem}_mask.png.tmp"]
    assert sorted(p.name for p in out.iterdir()) == [f"{path.stem}_prob.png"]
    assert Image.open(out / f"{path.stem}_prob.png").size == (1024, 1024)  # whole


# ----------------------------------------------------------------------------- merging

def test_merge_rules_hand_worked(tf):
    """Three members of one pixel, 0.2, 0.6 and 0.9, and two members 0.2 and 0.6."""
    from tfpneumo.inference.ensemble import merge_members

    three = tf.constant([[0.2], [0.6], [0.9]])
    assert merge_members(three, "mean").numpy() == pytest.approx([0.5666667])
    assert merge_members(three, "median").numpy() == pytest.approx([0.6])
    assert merge_members(three, "geomean").numpy() == pytest.approx([0.108 ** (1 / 3)])  # 0.4762
    assert merge_members(three, "mask_median").numpy() == pytest.approx([0.6])
    two = tf.constant([[0.2], [0.6]])
    assert merge_members(two, "median").numpy() == pytest.approx([0.4])
    assert merge_members(two, "geomean").numpy() == pytest.approx([0.12 ** 0.5])  # 0.3464
    assert merge_members(two, "mask_median").numpy() == pytest.approx([0.6])  # the union
    # a member at exactly 0 does not make the geometric mean 0 (floor 1e-7)
    assert merge_members(tf.constant([[0.0], [1.0]]), "geomean").numpy() == \
        pytest.approx([1e-7 ** 0.5])


def test_mask_median_is_the_median_of_the_members_masks(tf):
    """Oracle: each member thresholded, then the median of the 0/1 masks with ties (an even
    count split half and half) on; for every threshold at once, 1 to 6 members."""
    from tfpneumo.inference.ensemble import merge_members

    rng = np.random.default_rng(5)
    for count in range(1, 7):
        members = rng.random((count, 2, 16, 16, 1)).astype(np.float32)
        merged = merge_members(tf.constant(members), "mask_median").numpy()
        for t in (0.1, 0.35, 0.5, 0.8):
            votes = np.median((members >= t).astype(np.float64), axis=0)
            np.testing.assert_array_equal(merged >= t, votes >= 0.5)


def test_ensemble_merges_every_fold_and_flip_as_one_member_set(tf, net):
    """Oracle: each network on the images and on their mirror (eager), the four maps
    stacked, then numpy's median / geometric mean / vote over them."""
    import keras

    from tfpneumo.inference.ensemble import ensemble_tta

    second = keras.saving.load_model(tiny_model_file(), safe_mode=True, compile=False)
    rng = np.random.default_rng(8)
    for v in second.trainable_weights:
        if "kernel" in v.path:
            v.assign(v.numpy() * rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
    x = rng.uniform(0, 255, size=(2, 64, 64, 1)).astype(np.float32)
    maps, labels = [], []
    for n in (net, second):
        plain, mirrored = n(x, training=False), n(x[:, :, ::-1].copy(), training=False)
        maps += [plain["mask"].numpy(), mirrored["mask"].numpy()[:, :, ::-1]]
        labels += [plain["label"].numpy()[:, 0], mirrored["label"].numpy()[:, 0]]
    maps, labels = np.stack(maps), np.stack(labels)
    oracle = {"median": np.median, "geomean": lambda a, axis: np.exp(np.log(a).mean(axis)),
              "mask_median": lambda a, axis: np.sort(a, axis)[2]}
    for merge, reduce in oracle.items():
        mask, label = ensemble_tta([net, second], x, True, (1.0,), merge)
        np.testing.assert_allclose(mask.numpy(), reduce(maps, axis=0), atol=2e-6)
        np.testing.assert_allclose(label.numpy(), reduce(labels, axis=0), atol=2e-6)
    assert np.abs(np.median(maps, 0) - maps.mean(0)).max() > 1e-3  # the merges really differ
    with pytest.raises(SubmitError, match="--merge 'max': expected one of mean, median"):
        ensemble_tta([net], x, True, (1.0,), "max")


def test_in_bfloat16_keeps_weights_and_float32_outputs(tf):
    """The network rebuilt for ``--precision bfloat16``: every layer mixed_bfloat16 but the
    input and the two output sigmoids, the same weights, float32 probabilities close to the
    float32 network's (bfloat16 keeps 8 bits of mantissa)."""
    import keras

    from tfpneumo.inference.ensemble import in_bfloat16

    net = keras.saving.load_model(tiny_model_file(), compile=False)
    half = in_bfloat16(net)
    policies = {layer.name: layer.dtype_policy.name for layer in half.layers
                if not isinstance(layer, keras.layers.InputLayer)}
    assert policies.pop("mask") == policies.pop("label") == "float32"
    assert set(policies.values()) == {"mixed_bfloat16"}
    for a, b in zip(net.get_weights(), half.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 1)).astype("float32")
    full, low = net(x), half(x)
    assert low["mask"].dtype == low["label"].dtype == tf.float32
    np.testing.assert_allclose(low["mask"].numpy(), full["mask"].numpy(), atol=0.05)


def test_bfloat16_is_called_emulated_without_a_gpu_or_bf16_cpu_flags(tmp_path):
    from tfpneumo.machine import bfloat16_emulated, cpu_info

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx2 "
                    "avx512f\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    model, flags = cpu_info(info)
    assert model == "AMD EPYC 7B13" and flags == {"fpu", "sse2", "avx2", "avx512f"}
    assert bfloat16_emulated(flags, gpus=0)
    assert not bfloat16_emulated(flags, gpus=1)
    assert not bfloat16_emulated(flags | {"avx512_bf16"}, gpus=0)
    assert not bfloat16_emulated(flags | {"amx_bf16"}, gpus=0)
    assert cpu_info(tmp_path / "absent") == ("", set())
    assert not bfloat16_emulated(set(), gpus=0)  # nothing known: no claim
