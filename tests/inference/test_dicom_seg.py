"""predict --format dicom-seg and --save-probs on real SIIM DICOMs, read back independently
(highdicom's reader, pydicom, the PNGs of the same run, dciodvfy)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from factories import make_run

import tfpneumo
from tfpneumo import TfpneumoError
from tfpneumo.evaluation.rules import resize_prob
from tfpneumo.inference.pictures import predict

RULE = {"kind": "triplet", "top": 0.5, "bottom": 0.5, "min_area": 1}
NOTHING = {"kind": "triplet", "top": 1.0, "bottom": 1.0, "min_area": 10**9}  # always empty
SIZE = 64


def _sources(siim_mini):
    """Two stage-2 test files (invalid SOP Instance UID, no Study/Series UID) and one train file
    (valid UIDs throughout)."""
    tests = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[:2]
    train = sorted((siim_mini / "dicom-images-train").rglob("*.dcm"))[:1]
    return tests + train


@pytest.fixture(scope="module")
def run(siim_mini, tmp_path_factory):
    """One predict call writing every output (PNGs, binary SEGs, npz) and one writing
    fractional SEGs, and one whose rule leaves every mask empty."""
    work = tmp_path_factory.mktemp("seg")
    cfg = make_run(work)
    files = _sources(siim_mini)
    common = {"size": SIZE, "hflip": False, "workdir": work}
    summary = predict(cfg, files, out=work / "both", rule=RULE, formats=["png", "dicom-seg"],
                      save_probs=True, **common)
    predict(cfg, files[:1], out=work / "fractional", rule=RULE, formats=["dicom-seg"],
            seg_type="fractional", **common)
    predict(cfg, files[:1], out=work / "empty", rule=NOTHING, formats=["dicom-seg"], **common)
    return {"work": work, "cfg": cfg, "files": files, "summary": summary}


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path))


def _source_header(path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def test_binary_seg_is_predicts_mask_at_the_source_size(run):
    import highdicom as hd
    import pydicom

    masks_on = []
    for path in run["files"]:
        seg_path = run["work"] / "both" / f"{path.stem}_seg.dcm"
        mask = _png(run["work"] / "both" / f"{path.stem}_mask.png") == 255
        seg = hd.seg.segread(seg_path)
        assert seg.SegmentationType == "BINARY" and (seg.Rows, seg.Columns) == mask.shape
        (_, _, sop), = seg.get_source_image_uids()
        pixels = seg.get_pixels_by_source_instance([sop], segment_numbers=[1])
        assert pixels.shape == (1, *mask.shape, 1)
        np.testing.assert_array_equal(pixels[0, ..., 0].astype(bool), mask)
        np.testing.assert_array_equal(pydicom.dcmread(seg_path).pixel_array.astype(bool), mask)
        masks_on.append(mask.mean())
    assert 0.0 < max(masks_on) < 1.0  # a mask with something in it, not all of the image


def test_seg_references_the_source(run):
    import highdicom as hd

    for path in run["files"]:
        src = _source_header(path)
        seg = hd.seg.segread(run["work"] / "both" / f"{path.stem}_seg.dcm")
        (study, series, sop), = seg.get_source_image_uids()
        derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
        assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == sop
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
        assert seg.StudyInstanceUID == study
        assert sop.is_valid and study.is_valid and series.is_valid
        assert seg.SourceImageSequence[0].ReferencedSOPClassUID == src.SOPClassUID
        assert seg.SeriesInstanceUID != series and seg.SOPInstanceUID != sop  # its own
        if path.stem.startswith("ID_"):  # stage-2 test file: "ID_..." is not a UID
            assert sop == src.file_meta.MediaStorageSOPInstanceUID
            assert not src.StudyInstanceUID and not src.SeriesInstanceUID
        else:
            assert (study, series, sop) == (src.StudyInstanceUID, src.SeriesInstanceUID,
                                            src.SOPInstanceUID)
        # no Frame of Reference in the source: none in the SEG, and no Pixel Measures (the
        # spacing is the source's, pixel for pixel)
        assert "FrameOfReferenceUID" not in src and "FrameOfReferenceUID" not in seg
        assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
        assert derivation.SourceImageSequence[0].SpatialLocationsPreserved == "YES"
        assert float(src.PixelSpacing[0]) > 0
        assert seg.PatientOrientation == src.PatientOrientation
        assert seg.PatientAge == f"{int(src.PatientAge):03d}Y"  # SIIM writes "62"
        assert seg.PatientSex == src.PatientSex


def test_uids_filled_in_are_the_same_on_every_run(run):
    """Derived Study/Series UIDs depend on the source only: a rerun's SEG lands in the same
    study and references the same series."""
    import highdicom as hd

    path = run["files"][0]
    again = predict(run["cfg"], [path], out=run["work"] / "again", rule=RULE, size=SIZE,
                    hflip=False, formats=["dicom-seg"], workdir=run["work"])
    first = hd.seg.segread(run["work"] / "both" / f"{path.stem}_seg.dcm")
    second = hd.seg.segread(run["work"] / "again" / f"{path.stem}_seg.dcm")
    assert first.get_source_image_uids() == second.get_source_image_uids()
    assert first.SOPInstanceUID != second.SOPInstanceUID  # a new object each time
    assert "is not a UID" in again and "derived from the SOP Instance UID" in again


def test_segment_description_has_the_coded_concepts(run):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    seg = hd.seg.segread(run["work"] / "both" / f"{run['files'][0].stem}_seg.dcm")
    segment = seg.get_segment_description(1)
    assert segment.segment_label == "Pneumothorax"
    assert segment.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
    assert segment.segmented_property_type == codes.SCT.Pneumothorax
    raw = seg.SegmentSequence[0]
    assert (raw.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            raw.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("49755003", "36118008")
    assert raw.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert segment.algorithm_type.value == "AUTOMATIC"
    algorithm = segment.algorithm_identification
    assert algorithm.name == "tfpneumo" and algorithm.version == tfpneumo.__version__
    assert algorithm.family == codes.cid7162.ArtificialIntelligence
    params = algorithm.parameters
    assert params["run"] == "tiny" and params["folds"] == "0"
    assert params["weights"] == "fold_0/best.keras" and params["size"] == str(SIZE)
    assert (params["rule"], params["rule_top"], params["rule_bottom"],
            params["rule_min_area"]) == ("triplet", "0.5", "0.5", "1")
    assert (params["hflip"], params["scales"]) == ("no", "1")
    assert seg.Modality == "SEG" and seg.SoftwareVersions == tfpneumo.__version__


def test_fractional_seg_holds_the_probability(run):
    import highdicom as hd

    path = run["files"][0]
    seg = hd.seg.segread(run["work"] / "fractional" / f"{path.stem}_seg.dcm")
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    (_, _, sop), = seg.get_source_image_uids()
    stored = seg.get_pixels_by_source_instance([sop], rescale_fractional=False)[0, ..., 0]
    prob_png = _png(run["work"] / "both" / f"{path.stem}_prob.png")  # round(p * 255)
    np.testing.assert_array_equal(stored.astype(np.uint8), prob_png)
    scaled = seg.get_pixels_by_source_instance([sop], rescale_fractional=True)[0, ..., 0]
    np.testing.assert_allclose(scaled, prob_png / 255.0, atol=1e-6)
    assert "probability" in seg.get_segment_description(1).algorithm_identification.parameters[
        "content"]


def test_an_empty_mask_still_gives_a_seg_with_one_empty_frame(run):
    import highdicom as hd
    import pydicom

    path = run["files"][0]
    seg_path = run["work"] / "empty" / f"{path.stem}_seg.dcm"
    ds = pydicom.dcmread(seg_path)
    assert int(ds.NumberOfFrames) == 1 and not ds.pixel_array.any()
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns) == (1024, 1024)
    seg = hd.seg.segread(seg_path)
    (_, _, sop), = seg.get_source_image_uids()
    assert not seg.get_pixels_by_source_instance([sop]).any()


def test_save_probs_round_trips_to_predicts_probability(run):
    """The npz holds predict's full-size probability within float16 rounding (2**-12 for
    values in [0.5, 1)), recomputed here through the ensemble itself."""
    from tfpneumo.inference.ensemble import predictor
    from tfpneumo.inference.images import dicom_items

    ensemble = predictor(run["cfg"], size=SIZE, hflip=False, workdir=run["work"])
    for p in ensemble.predict(dicom_items(run["files"])):
        with np.load(run["work"] / "both" / f"{p.image_id}_prob.npz") as saved:
            assert sorted(saved.files) == ["label_probability", "probability"]
            prob, label = saved["probability"], saved["label_probability"]
        full = resize_prob(p.prob, p.original.shape)
        assert prob.dtype == np.float16 and prob.shape == full.shape == (1024, 1024)
        np.testing.assert_allclose(prob.astype(np.float32), full, rtol=0, atol=2.0**-12)
        assert label.dtype == np.float32 and label.shape == ()
        np.testing.assert_allclose(float(label), p.label_prob, atol=1e-6)
        # the probability PNG of the same call is the same map at 8 bits
        png = _png(run["work"] / "both" / f"{p.image_id}_prob.png").astype(np.float32)
        assert np.abs(png - prob.astype(np.float32) * 255.0).max() <= 0.5 + 255 * 2.0**-12
    assert not list((run["work"] / "both").glob("*.tmp"))
    assert "wrote 15 files" in run["summary"]  # 3 PNGs + SEG + npz for each of 3 images


def test_a_source_without_pixel_spacing_or_with_a_frame_of_reference(run, tmp_path):
    """No PixelSpacing (ImagerPixelSpacing only): no Pixel Measures rather than the detector's
    spacing; a FrameOfReferenceUID in the source is carried over."""
    import highdicom as hd
    import pydicom

    from tfpneumo.inference.dicom_seg import Algorithm, build_seg, seg_bytes, seg_source

    ds = pydicom.dcmread(run["files"][2])
    ds.ImagerPixelSpacing = ds.PixelSpacing
    del ds.PixelSpacing
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    path = tmp_path / "no-spacing.dcm"
    ds.save_as(path)
    mask = np.zeros((1024, 1024), bool)
    mask[100:300, 600:700] = True
    seg = build_seg(seg_source(path), mask, Algorithm("9.9", {"run": "x"}))
    (tmp_path / "seg.dcm").write_bytes(seg_bytes(seg))
    back = hd.seg.segread(tmp_path / "seg.dcm")
    assert "PixelMeasuresSequence" not in back.SharedFunctionalGroupsSequence[0]
    assert back.FrameOfReferenceUID == ds.FrameOfReferenceUID
    np.testing.assert_array_equal(back.pixel_array.astype(bool), mask)
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(tmp_path / "seg.dcm") == []


def _dciodvfy_errors(path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_dciodvfy_finds_no_errors(run):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not found (Debian package dicom3tools; .ci/run installs it with "
                    "apt where apt can run)")
    paths = [run["work"] / "both" / f"{p.stem}_seg.dcm" for p in run["files"]]
    paths += [run["work"] / kind / f"{run['files'][0].stem}_seg.dcm"
              for kind in ("fractional", "empty")]
    for path in paths:
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
        assert "Segmentation" in text, text  # it recognised the IOD
        assert _dciodvfy_errors(path) == [], text


# ----------------------------------------------------------------------------- bad input

def test_a_source_a_seg_cannot_reference_is_refused_before_anything_is_written(siim_mini,
                                                                               tmp_path):
    import pydicom

    cfg = make_run(tmp_path)
    good = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[0]
    ds = pydicom.dcmread(good)
    del ds.SOPClassUID
    bad = tmp_path / "no-class.dcm"
    ds.save_as(bad)
    with pytest.raises(TfpneumoError) as info:
        predict(cfg, [good, bad], out=tmp_path / "pred", rule=RULE, size=SIZE,
                formats=["dicom-seg"], workdir=tmp_path)
    assert str(info.value) == f"{bad}: no valid SOPClassUID; a DICOM SEG cannot reference it"
    assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--format", "tiff"], "--format tiff: expected png, dicom-seg or png,dicom-seg"),
    (["--format", "dicom-seg", "--seg-type", "labelmap"],
     "--seg-type labelmap: expected one of binary, fractional"),
])
def test_cli_bad_format_options_are_one_line(siim_mini, tmp_path, args, needle):
    from typer.testing import CliRunner

    from tfpneumo.cli import app

    dicom = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[0]
    result = CliRunner().invoke(app, ["predict", str(dicom), "--out", str(tmp_path / "pred"),
                                      *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip().splitlines() == [f"error: {needle}"]
    assert not (tmp_path / "pred").exists()



def test_a_full_disk_leaves_no_partial_seg_or_npz(siim_mini, tmp_path, monkeypatch):
    """The SEG and the npz are written like the PNGs: whole under their names or not at all,
    and ENOSPC is one line naming the file."""
    import errno
    import pathlib

    cfg = make_run(tmp_path)
    path = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[0]
    out = tmp_path / "pred"
    real = pathlib.Path.write_bytes

    def disk_fills_up(self, data):
        if self.name.endswith("_seg.dcm.tmp"):
            real(self, data[:100])  # what reached the disk before it filled up
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_fills_up)
    with pytest.raises(TfpneumoError) as e:
        predict(cfg, [path], out=out, rule=RULE, size=SIZE, hflip=False, workdir=tmp_path,
                formats=["dicom-seg"], save_probs=True)
    assert str(e.value) == (f"{out / path.stem}_seg.dcm: cannot write (No space left on "
                            "device); free space and rerun")
    assert list(out.iterdir()) == []  # the SEG comes before the npz; nothing else was begun


def test_a_source_without_any_valid_instance_uid_gets_one_from_its_bytes(siim_mini, tmp_path):
    """Neither SOPInstanceUID nor the file meta's is a UID: the reference is a UID derived
    from the file's bytes, the same on every read; PatientAge takes the AS form or goes."""
    import pydicom
    import pydicom.config

    from tfpneumo.inference.dicom_seg import seg_source

    ds = pydicom.dcmread(sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[0])
    path = tmp_path / "anonymised.dcm"
    with pydicom.config.disable_value_validation():  # the invalid values are the point
        ds.file_meta.MediaStorageSOPInstanceUID = "ID_not_a_uid"
        ds.PatientAge = "18 M"
        ds.save_as(path)
    first, second = seg_source(path), seg_source(path)
    uid = first.dataset.SOPInstanceUID
    assert pydicom.uid.UID(uid).is_valid and uid == second.dataset.SOPInstanceUID
    assert first.notes[0] == "no valid SOPInstanceUID: one derived from the file is referenced"
    assert first.dataset.PatientAge == "018M"
    with pydicom.config.disable_value_validation():
        ds.PatientAge = "about sixty"
        ds.save_as(path)
    changed = seg_source(path)
    assert "PatientAge" not in changed.dataset
    assert changed.dataset.SOPInstanceUID != uid  # other bytes, another UID
