import numpy as np

from edge_deploy.pipeline.embedded.shapes import CLASS_NAMES, ShapesSpec, generate, render_image


def test_same_spec_renders_the_same_image_and_labels():
    spec = ShapesSpec()
    first, second = render_image(7, 1, spec), render_image(7, 1, spec)
    assert np.array_equal(first[0], second[0])
    assert first[1] == second[1]
    assert not np.array_equal(first[0], render_image(8, 1, spec)[0])


def test_labels_box_the_pixels_that_differ_from_the_background():
    spec = ShapesSpec()
    for index in range(20):
        image, labels = render_image(index, 1, spec)
        h, w = image.shape[:2]
        assert 1 <= len(labels) <= spec.max_objects or len(labels) == 0
        for cls, x0, y0, x1, y1 in labels:
            assert 0 <= cls < len(CLASS_NAMES)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert (x1 - x0) * (y1 - y0) >= 16


def test_generate_writes_ultralytics_layout(tmp_path):
    data_yaml = generate(tmp_path, ShapesSpec(train_images=3, val_images=2))
    root = data_yaml.parent
    assert sorted(p.name for p in (root / "images" / "val").iterdir()) == ["val_00000.png", "val_00001.png"]
    assert len(list((root / "labels" / "train").iterdir())) == 3
    assert "names:" in data_yaml.read_text()
    # A second call finds the finished set and writes nothing.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate(tmp_path, ShapesSpec(train_images=3, val_images=2)) == data_yaml
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
