import pytest

from edge_deploy.calibration.formats import (read_ncnn_table, read_trt_cache, trt_version_number, write_ncnn_table,
                                 write_trt_cache)
from edge_deploy.pipeline.errors import InputError


def test_trt_cache_encodes_scale_as_big_endian_float_hex(tmp_path):
    path = tmp_path / "calib.cache"
    write_trt_cache(path, {"images": 127.0, "(Unnamed Layer* 3) [Conv]_output": 254.0, "a:b:c": 1.27},
                    trt_version="8.6.1")
    text = path.read_text()
    assert text.splitlines()[0] == "TRT-8601-EntropyCalibration2"
    assert "images: 3f800000" in text  # scale 1.0
    assert "(Unnamed Layer* 3) [Conv]_output: 40000000" in text  # scale 2.0
    assert text.endswith("\n") and "\n\n" not in text
    header, scales = read_trt_cache(path)
    assert header == "TRT-8601-EntropyCalibration2"
    assert scales["a:b:c"] == pytest.approx(0.01)
    assert list(scales) == ["images", "(Unnamed Layer* 3) [Conv]_output", "a:b:c"]


def test_trt_version_numbers():
    assert trt_version_number("8.6.1") == 8601
    assert trt_version_number("10.9.0") == 100900


def test_trt_cache_rejects_bad_values_and_files(tmp_path):
    with pytest.raises(InputError, match="no usable range"):
        write_trt_cache(tmp_path / "x.cache", {"t": float("nan")})
    assert not (tmp_path / "x.cache").exists()
    (tmp_path / "bad.cache").write_text("not a cache\n")
    with pytest.raises(InputError, match="TRT- header"):
        read_trt_cache(tmp_path / "bad.cache")
    (tmp_path / "short.cache").write_text("TRT-8601-EntropyCalibration2\nname: 3f80\n")
    with pytest.raises(InputError, match="8 hex digits"):
        read_trt_cache(tmp_path / "short.cache")


def test_ncnn_table_round_trip(tmp_path):
    path = tmp_path / "model.table"
    write_ncnn_table(path, {"conv_0": [127.0, 63.5], "convdw_3": [12.25]}, {"conv_0": 101.6, "convdw_3": 2.5})
    lines = path.read_text().splitlines()
    assert lines == ["conv_0_param_0 127.000000 63.500000", "convdw_3_param_0 12.250000",
                     "conv_0 101.600000", "convdw_3 2.500000"]
    weights, activations = read_ncnn_table(path)
    assert weights == {"conv_0": [127.0, 63.5], "convdw_3": [12.25]}
    assert activations == {"conv_0": 101.6, "convdw_3": 2.5}


def test_ncnn_table_rejects_spaces(tmp_path):
    with pytest.raises(InputError):
        write_ncnn_table(tmp_path / "t.table", {"a b": [1.0]}, {})
