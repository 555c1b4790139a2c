"""Saved networks record their input convention; files of tfpneumo < 0.3 are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from factories import tiny_model_file

from tfpneumo.errors import TfpneumoError


@pytest.fixture(scope="module")
def saved(tf):
    from tfpneumo.models import saved

    return saved


def test_a_saved_network_records_its_convention_and_loads(saved, keras):
    from tfpneumo.models.layers import INPUT_CONVENTION

    path = tiny_model_file()
    assert saved.input_convention(path) == INPUT_CONVENTION
    net = saved.load_network(path)
    grey = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 1)).astype(np.uint8)
    want = keras.saving.load_model(path, safe_mode=True, compile=False)(grey, training=False)
    np.testing.assert_array_equal(np.asarray(net(grey, training=False)["mask"]),
                                  np.asarray(want["mask"]))


def test_a_file_of_the_previous_convention_is_refused(saved, keras, tmp_path):
    """The 0.2 layout: ImageNet-normalised RGB in, a Rescaling back to pixels, no GreyPixels."""
    from keras import layers

    image = keras.Input((None, None, 3), name="image")
    x = layers.Rescaling(scale=[58.395, 57.12, 57.375], offset=[123.675, 116.28, 103.53],
                         name="imagenet_to_pixels")(image)
    x = layers.Conv2D(1, 1, name="mask_logits")(x)
    mask = layers.Activation("sigmoid", name="mask")(x)
    label = layers.Dense(1, activation="sigmoid", name="label")(
        layers.GlobalAveragePooling2D()(x))
    path = tmp_path / "best.keras"
    keras.Model(image, {"mask": mask, "label": label}).save(path)
    with pytest.raises(TfpneumoError) as e:
        saved.load_network(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "tfpneumo < 0.3" in message


def test_not_a_keras_file_is_one_line(saved, tmp_path):
    path = tmp_path / "final.keras"
    path.write_bytes(b"not a zip")
    with pytest.raises(TfpneumoError, match="cannot load model") as e:
        saved.load_network(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def _declare(path, member: str, size: int) -> None:
    """Rewrites the uncompressed size that the zip's central directory declares for ``member``
    (what zipfile, and so Keras, trust; nothing is inflated)."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46:at + 46 + name_len] == member.encode():
            struct.pack_into("<I", data, at + 24, size)
            path.write_bytes(bytes(data))
            return
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{member} not in the central directory")


def test_archive_members_declared_sizes_are_checked_before_loading(saved, tmp_path):
    # Issue 11: a .keras whose config.json is a zip bomb exhausted memory when read.
    import zipfile

    def archive(name: str, members: dict[str, bytes], deflated: bool = False):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED) as z:
            for member, data in members.items():
                z.writestr(member, data)
        return path

    config = b'{"config": {"layers": []}}'
    cases = []
    # a real bomb: 40 MiB of spaces in config.json, ~40 KB compressed
    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z, z.open("config.json", "w") as f:
        f.write(b"{" + b" " * (1 << 20))
        for _ in range(39):
            f.write(b" " * (1 << 20))
    cases.append((bomb, "member config.json declares 41943041 bytes uncompressed (limit 16777216)"))
    # config.json small, its declared size patched to 100 MB (zipfile would trust it)
    liar = archive("liar.keras", {"metadata.json": b"{}", "config.json": config}, deflated=True)
    _declare(liar, "config.json", 100_000_000)
    cases.append((liar, "member config.json declares 100000000 bytes uncompressed"))
    # two weight files of 4 GiB - 1 each: 8 GiB in all
    huge = archive("huge.keras", {"config.json": config, "a.h5": b"x", "b.h5": b"y"}, deflated=True)
    _declare(huge, "a.h5", 0xFFFFFFFF)
    _declare(huge, "b.h5", 0xFFFFFFFF)
    cases.append((huge, "declares 4294967295 bytes from 3 compressed (ratio over 100)"))
    # stored (as Keras writes) but claiming more than it holds
    stored = archive("stored.keras", {"config.json": config, "model.weights.h5": b"\0" * 100})
    _declare(stored, "model.weights.h5", 3 << 30)
    cases.append((stored, "is stored uncompressed but declares 3221225472 bytes in 100"))
    # 2 MiB of zeros deflated: ratio ~1000
    zeros = archive("zeros.keras", {"config.json": config, "model.weights.h5": bytes(2 << 20)},
                    deflated=True)
    cases.append((zeros, "ratio over 100"))
    many = archive("many.keras", {"config.json": config, **{f"m{i}": b"" for i in range(1001)}})
    cases.append((many, "1002 archive members"))
    for path, needle in cases:
        with pytest.raises(TfpneumoError) as e:
            saved.load_network(path)
        message = str(e.value)
        assert message.startswith(f"{path}: ") and needle in message, message
        assert message.endswith("; refused") and "\n" not in message, message
    # members that pass one by one but not together (central directory entries only: a zip
    # that really held them would be 5 GiB)
    class Directory:
        def __init__(self, sizes: dict[str, int]) -> None:
            self.infos = [zipfile.ZipInfo(name) for name in sizes]
            for info in self.infos:
                info.file_size = info.compress_size = sizes[info.filename]

        def infolist(self) -> list:
            return self.infos

    with pytest.raises(TfpneumoError, match=r"declare 5368709120 bytes uncompressed in all"):
        saved.check_archive(tmp_path / "x.keras", Directory({"a.h5": 3 << 30, "b.h5": 2 << 30}))
    saved.check_archive(tmp_path / "x.keras", Directory({"a.h5": 3 << 30, "b.h5": 1 << 30}))


def _grey_net(keras, path, *, side=None, channels=1, mask_channels=1, stride=1, label_units=1):
    """A tiny network with this tfpneumo's input convention (GreyPixels) and outputs named
    ``mask`` and ``label``, whose shapes the arguments bend."""
    from keras import layers

    from tfpneumo.models.layers import GreyPixels

    image = keras.Input((side, side, channels), name="image")
    x = GreyPixels(name="grey_pixels")(image)
    mask = layers.Conv2D(mask_channels, 1, strides=stride, activation="sigmoid", name="mask")(x)
    label = layers.Dense(label_units, activation="sigmoid", name="label")(
        layers.GlobalAveragePooling2D()(x))
    keras.Model(image, {"mask": mask, "label": label}).save(path)
    return path


def test_a_right_shaped_grey_network_loads(saved, keras, tmp_path):
    saved.load_network(_grey_net(keras, tmp_path / "any.keras"))
    saved.load_network(_grey_net(keras, tmp_path / "fixed.keras", side=96))


@pytest.mark.parametrize(("bend", "needle"), [
    ({"mask_channels": 3}, "output 'mask' has shape (None, None, None, 3), expected "
                           "(None, None, None, 1)"),
    ({"side": 64, "stride": 2}, "output 'mask' has shape (None, 32, 32, 1), expected "
                                "(None, 64, 64, 1)"),
    ({"stride": 2}, "on a grey image (1, 64, 64, 1) the network gives mask (1, 32, 32, 1)"),
    ({"label_units": 2}, "output 'label' has shape (None, 2), expected (None, 1)"),
    ({"channels": 3}, "input shape (None, None, None, 3), a tfpneumo network takes grey images"),
])
def test_right_output_names_wrong_shapes_are_refused_at_load(saved, keras, tmp_path, bend, needle):
    # Issue 11: such a network loaded, then predict failed deep inside TensorFlow.
    path = _grey_net(keras, tmp_path / "bent.keras", **bend)
    with pytest.raises(TfpneumoError) as e:
        saved.load_network(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message, message


@pytest.mark.parametrize("config", [b"[1, 2]", b"7", b'"x"', b"null", b'{"config": 5}',
                                    b'{"config": {"layers": {"a": 1}}}'])
def test_a_config_json_that_is_not_a_model_config_is_one_line(saved, tmp_path, config):
    # Issue 11: valid JSON but not an object was an AttributeError traceback.
    import zipfile

    path = tmp_path / "odd.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", config)
    with pytest.raises(TfpneumoError) as e:
        saved.load_network(path)
    message = str(e.value)
    assert message == (f"{path}: config.json is not a Keras model's config (a JSON object with "
                       "config.layers); not a tfpneumo network"), message


def test_odd_layer_entries_do_not_crash_the_convention_check(saved, tmp_path):
    import zipfile

    path = tmp_path / "odd.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", b'{"config": {"layers": [1, {"class_name": "GreyPixels", '
                                  b'"config": [3]}]}}')
    assert saved.input_convention(path) == "(unreadable)"
    with pytest.raises(TfpneumoError, match=r"input convention '\(unreadable\)'"):
        saved.load_network(path)
