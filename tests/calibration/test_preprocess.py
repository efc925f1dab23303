import numpy as np
import pytest

from edge_deploy.calibration.preprocess import Preprocess, letterbox, to_tensor
from edge_deploy.pipeline.errors import InputError


def test_letterbox_matches_ultralytics(deploy_home, shapes_yaml):
    from ultralytics.data.augment import LetterBox

    images = sorted((shapes_yaml.parent / "images" / "val").iterdir())[:10]
    import cv2

    for path in images:
        image = cv2.imread(str(path))
        theirs = LetterBox(new_shape=(160, 160), auto=False, scaleup=True)(image=image)
        ours, _ = letterbox(image, Preprocess(160))
        assert np.array_equal(theirs, ours), path.name


def test_boxes_map_back_to_the_original_image():
    image = np.zeros((90, 200, 3), np.uint8)
    image[30:60, 50:100] = 255
    padded, lb = letterbox(image, Preprocess(160))
    ys, xs = np.nonzero(padded[..., 0] > 127)
    back = lb.to_original(np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32))[0]
    assert np.allclose(back, [50, 30, 100, 60], atol=1.5)


def test_layouts_and_scaling():
    image = np.full((40, 40, 3), (10, 20, 30), np.uint8)  # BGR
    nchw, _ = to_tensor([image], Preprocess(32))
    nhwc, _ = to_tensor([image], Preprocess(32, layout="NHWC"))
    assert nchw.shape == (1, 3, 32, 32) and nhwc.shape == (1, 32, 32, 3)
    assert np.allclose(nchw[0, :, 16, 16], np.array([30, 20, 10]) / 255)  # RGB order
    assert np.array_equal(nchw.transpose(0, 2, 3, 1), nhwc)


def test_grey_image_is_rejected():
    with pytest.raises(InputError):
        to_tensor([np.zeros((10, 10), np.uint8)], Preprocess(32))
