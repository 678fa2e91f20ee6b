"""Feature extractors for the quality metrics, run through torch-fidelity's own feature-extraction path.

Two extractors:
- "inception-v3-compat": torch-fidelity's port of TF Inception 2015-12-05 (the ADM evaluator's network). Its
  weights file must be on disk; `inception_weights` finds it or raises, so torch-fidelity never downloads.
- "varbench-cnn": the project's small CNN (`ProjectCNN`), registered with torch-fidelity here. Its default
  weights are the zoo's classifier, trained on the project's synthetic data set (variants/zoo/classifier.pt,
  held-out accuracy in the zoo manifest). `weights="random"` gives a deterministic Kaiming init from a fixed
  seed instead (the same features on every machine), named "untrained" in every record.

`extract_features` turns uint8 NHWC images into {layer: N×D float tensor} for the pool layer (fid/kid/prc)
and the bias-free logits (isc).

The feature scale of "varbench-cnn". FID is invariant to a shift of the features and grows with the square of
their unit, so the raw pool features (per-feature std up to 10, total variance ~4,100 on the data) gave FIDs in
the thousands and KID×1e3 in the tens of millions for good models, which no reader can place. The zoo's
classifier.pt therefore carries two buffers, computed once by `calibrate_feature_scale` on the classifier's own
training split (synthetic set, seed 0, images 0..9,999): `feature_mean`, subtracted, and one global
`feature_scale`, multiplied, chosen so that the training split's features have mean 0 and average variance 1
per feature (total variance = D = 256). Both are a similarity transform, so they keep the classifier's feature
geometry: precision/recall are unchanged, FID is the raw FID times feature_scale², and ratios of FIDs between
models are unchanged. A per-feature standardisation was rejected: it changes that geometry and inflates the
finite-sample noise of rarely used features (the real-vs-real FID at 256 images went from 1.6 to 4.8). Centring
matters for KID, whose kernel (x·y/D + 1)³ was dominated by the features' mean offset. The logits used by IS
are computed from the raw features, as before. Weights without the buffers (or with the identity ones, as a
freshly trained classifier has) give the raw scale, and every quality record names its scale
(`feature_scale_name`), so numbers on different scales are never mistaken for each other.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from varbench.harness.core.hashing import file_sha256

__all__ = ["INCEPTION", "PROJECT_CNN", "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "ProjectCNN",
           "inception_weights", "project_extractor_name", "weights_sha256", "RANDOM_INIT", "describe_extractor", "resolve_weights",
           "feature_layers", "extract_features", "file_sha256", "check_images", "PROJECT_CNN_VERSION",
           "RAW_SCALE", "feature_scale_name", "calibrate_feature_scale", "calibrate_weights",
           "CALIBRATION_SEED", "CALIBRATION_IMAGES"]

log = logging.getLogger(__name__)

INCEPTION = "inception-v3-compat"
PROJECT_CNN = "varbench-cnn"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)
INCEPTION_ENV = "VARBENCH_INCEPTION_WEIGHTS"
PROJECT_SEED = 0
RANDOM_INIT = "random"  # extractor_weights value for the untrained ProjectCNN (seeded init)
PROJECT_CNN_VERSION = 2  # bump when ProjectCNN's layers, preprocessing or seeded init change: keys the caches
PROJECT_RESOLUTION = 64
RAW_SCALE = "raw"  # feature_scale_name of unnormalised features (Inception, the random init, uncalibrated weights)
CALIBRATION_SEED, CALIBRATION_IMAGES = 0, 10_000  # the zoo classifier's training split (harness/train/tasks.py)
SCALE_KEYS = ("feature_mean", "feature_scale")  # ProjectCNN's normalisation buffers


def inception_weights(path: str | None = None) -> str:
    """The InceptionV3 weights file: `path` (if given, only it), else $VARBENCH_INCEPTION_WEIGHTS, else the
    torch hub cache (<hub>/checkpoints/weights-inception-2015-12-05-6726825d.pth).

    Raises FileNotFoundError naming the file, the places looked in and where it comes from; it never downloads.
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    env = os.environ.get(INCEPTION_ENV)
    candidates = [("the given path", path), (f"${INCEPTION_ENV}", env), ("the torch hub cache", str(hub))]
    if path:  # an explicit path is authoritative: a typo must not silently fall back to another file
        candidates = candidates[:1]
    for _, cand in candidates:
        if cand and Path(cand).is_file():
            return str(Path(cand).resolve())
    looked = "; ".join(f"{where}: {cand if cand else '(not set)'}" for where, cand in candidates)
    raise FileNotFoundError(
        f"InceptionV3 weights {INCEPTION_WEIGHTS_FILE} not found (looked at {looked}). The file is "
        f"torch-fidelity's conversion of TF inception-2015-12-05, released at {INCEPTION_WEIGHTS_URL}; download "
        f"it on a machine with internet access and pass it with `--set quality.extractor_weights=PATH` or the "
        f"{INCEPTION_ENV} environment variable, or copy it to {hub}.")


class ProjectCNN(nn.Module):
    """Small CNN: 4 conv+ReLU stages (3 max-pools), global average pool to a 256-d feature, linear head.

    Input: uint8 B×3×H×W at any resolution (see `preprocess`). `features` gives the 256-d pool feature,
    `logits_unbiased` the head without its bias (what ISC uses, as with Inception); `forward` returns the
    biased logits, for training. `normalise` applies the feature scale (module docstring): identity until
    `calibrate_feature_scale` sets the buffers.
    """

    feature_dim = 256

    def __init__(self, num_classes: int = 10):
        super().__init__()
        widths = (3, 32, 64, 128, self.feature_dim)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
            if i < len(widths) - 2:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.num_classes = num_classes
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feature_scale", torch.ones(()))

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """uint8 B×3×H×W -> float B×3×64×64 in [-1, 1] (antialiased bilinear resize)."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 B×3×H×W images, got {x.dtype} {tuple(x.shape)}")
        x = x.float()
        if x.shape[-2:] != (PROJECT_RESOLUTION, PROJECT_RESOLUTION):
            x = F.interpolate(x, size=(PROJECT_RESOLUTION, PROJECT_RESOLUTION), mode="bilinear",
                              align_corners=False, antialias=True)
        return x / 127.5 - 1.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.preprocess(x)).mean(dim=(2, 3))

    def normalise(self, feat: torch.Tensor) -> torch.Tensor:
        return (feat - self.feature_mean) * self.feature_scale

    @property
    def is_calibrated(self) -> bool:
        return bool(self.feature_scale != 1) or bool(self.feature_mean.any())

    def logits_unbiased(self, feat: torch.Tensor) -> torch.Tensor:
        return feat @ self.head.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def reset_parameters_deterministic(self, seed: int = PROJECT_SEED) -> ProjectCNN:
        """Kaiming-normal convs and a 1/sqrt(fan_in) head from a CPU generator: identical on every machine."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
                    nn.init.zeros_(m.bias)
            nn.init.normal_(self.head.weight, std=self.feature_dim ** -0.5, generator=g)
            nn.init.zeros_(self.head.bias)
        return self

    @classmethod
    def load(cls, weights: str | None) -> ProjectCNN:
        """From a state dict file (num_classes read from the head), or the seeded random init (None, "random").
        A file without the feature-scale buffers (trained before they existed) loads with the raw scale."""
        if weights is None or weights == RANDOM_INIT:
            return cls().reset_parameters_deterministic()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model = cls(num_classes=state["head.weight"].shape[0])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - set(SCALE_KEYS):
            raise RuntimeError(f"{weights} is not a {cls.__name__} state dict: missing {missing}, unexpected "
                               f"{unexpected}")
        return model


class ProjectCNNFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """torch-fidelity wrapper of `ProjectCNN`: features "feat" (256-d) and "logits_unbiased"."""

    def __init__(self, name: str, features_list, feature_extractor_weights_path: str | None = None, **kwargs):
        super().__init__(name, features_list)
        self.model = ProjectCNN.load(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("feat", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits_unbiased" if metric == "isc" else "feat"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, PROJECT_RESOLUTION, PROJECT_RESOLUTION, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat = self.model.features(x)
        out = {"feat": self.model.normalise(feat), "logits_unbiased": self.model.logits_unbiased(feat)}
        return tuple(out[name] for name in self.features_list)


if PROJECT_CNN not in FEATURE_EXTRACTORS_REGISTRY:  # registration is global and raises on duplicates
    torch_fidelity.register_feature_extractor(PROJECT_CNN, ProjectCNNFeatureExtractor)


def weights_sha256(weights: str | None) -> str | None:
    """sha256 of a resolved weights file; None for the project CNN's random init."""
    return None if weights is None or weights == RANDOM_INIT else file_sha256(weights)


def project_extractor_name(weights: str | None) -> str:
    """Descriptive name for records: says whether the project CNN is the zoo's trained classifier or untrained."""
    sha = weights_sha256(weights)
    if sha is None:
        return f"{PROJECT_CNN} (random init, seed {PROJECT_SEED}: untrained)"
    from varbench.variants.zoo import manifest, zoo_dir

    with contextlib.suppress(OSError, KeyError, ValueError):
        entry = manifest()["models"]["classifier"]
        if Path(weights).resolve() == (zoo_dir() / entry["file"]).resolve() and entry["sha256"] == sha:
            acc = entry["heldout"].get("heldout_acc")
            return f"{PROJECT_CNN} (zoo classifier, held-out accuracy {acc:.3f}, sha256 {sha[:12]})"
    return f"{PROJECT_CNN} (weights sha256 {sha[:12]})"


def resolve_weights(extractor: str, weights: str | None) -> str | None:
    """The weights an extractor will load: Inception's file is required (never downloaded); the project CNN's
    default (None) is the zoo classifier, and "random" stays "random" (the untrained seeded init)."""
    if extractor == INCEPTION:
        return inception_weights(weights)
    if extractor == PROJECT_CNN:
        if weights == RANDOM_INIT:
            return weights
        if weights is None:
            from varbench.variants.zoo import ZooError, zoo_file

            try:
                return zoo_file("classifier")
            except ZooError as err:
                raise FileNotFoundError(f"{err}; or score with the untrained {PROJECT_CNN}: "
                                        f"--set quality.extractor_weights=random") from None
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{PROJECT_CNN} weights file {weights} does not exist")
        return weights
    raise ValueError(f"unknown feature extractor {extractor!r}: use {INCEPTION!r} or {PROJECT_CNN!r}")


def describe_extractor(extractor: str, weights: str | None) -> str:
    """Name + weights identity of an extractor (weights already resolved by `resolve_weights`)."""
    if extractor == PROJECT_CNN:
        return project_extractor_name(weights)
    return f"{extractor} (weights sha256 {file_sha256(weights)[:12]})" if weights else extractor


@functools.lru_cache(maxsize=4)
def _scale_of(weights: str, sha: str) -> tuple[float, str] | None:
    # (global factor, sha256 of both buffers' bytes) of a weights file, None for the raw scale; keyed by sha
    model = ProjectCNN.load(weights)
    if not model.is_calibrated:
        return None
    data = b"".join(getattr(model, k).float().numpy().tobytes() for k in SCALE_KEYS)
    return float(model.feature_scale), hashlib.sha256(data).hexdigest()


def feature_scale_name(extractor: str, weights: str | None) -> str:
    """The scale of an extractor's pool features, as quality records name it: "raw", or the project CNN's
    calibrated scale with its factor and the sha256 of its buffers (weights already resolved)."""
    if extractor != PROJECT_CNN or weights is None or weights == RANDOM_INIT:
        return RAW_SCALE
    scale = _scale_of(weights, file_sha256(weights))
    if scale is None:
        return RAW_SCALE
    return f"centred, unit mean variance on the training split (x{scale[0]:.4g}, sha256 {scale[1][:12]})"


def calibrate_feature_scale(model: ProjectCNN, images: np.ndarray, batch_size: int = 250) -> ProjectCNN:
    """Sets `model`'s feature_mean / feature_scale from its raw features of `images` (uint8 N×H×W×3, the
    classifier's training split): mean 0 and average variance 1 per feature there (module docstring)."""
    check_images(images, "calibration images")
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2))
                           for i in range(0, len(images), batch_size)]).double()
        model.feature_mean.copy_(feats.mean(0))
        model.feature_scale.fill_(float((feats.shape[1] / feats.var(0).sum()).sqrt()))
    return model


def calibrate_weights(src: str, dst: str, num_images: int = CALIBRATION_IMAGES,
                      seed: int = CALIBRATION_SEED) -> str:
    """Writes `src`'s state dict to `dst` with the feature-scale buffers calibrated on the synthetic set's images
    0..num_images-1 of `seed` (the zoo classifier's training split); other tensors keep their dtype and bytes.
    The buffers are stored in float32. Returns dst's sha256, for the zoo manifest."""
    from .synthetic import make_dataset

    state = torch.load(src, map_location="cpu", weights_only=True)
    model = calibrate_feature_scale(ProjectCNN.load(src), make_dataset(num_images, seed=seed)[0])
    state.update({k: getattr(model, k).detach().float().clone() for k in SCALE_KEYS})
    tmp = Path(dst).with_name(f".{Path(dst).name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, dst)
    return file_sha256(dst)


def feature_layers(extractor: str) -> dict[str, str]:
    """Which torch-fidelity layer each metric reads: {"fid"|"kid"|"prc"|"isc": layer}."""
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"feature extractor {extractor!r} is not registered with torch-fidelity")
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    return {m: cls.get_default_feature_layer_for_metric(m) for m in ("fid", "kid", "prc", "isc")}


class _ImageDataset(Dataset):
    """Map-style view of uint8 NHWC images; items are bare uint8 CHW tensors, as torch-fidelity requires."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1).contiguous()


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Validates uint8 N×H×W×3; raises ValueError naming the problem."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (0..255), got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"{what} must be a non-empty N×H×W×3 array, got shape {images.shape}")
    return images


@functools.lru_cache(maxsize=2)
def _extractor(extractor: str, weights: str | None, weights_sha: str | None, layers: tuple[str, ...],
               device: str):
    # Building Inception and loading its 96 MB weights costs ~0.5 s, so keep the last two built (keyed by the
    # weights' sha too, so a file rewritten in place is reloaded).
    cuda = torch.device(device).type == "cuda"
    with torch.cuda.device(torch.device(device)) if cuda else contextlib.nullcontext():
        return create_feature_extractor(extractor, list(layers), cuda=cuda, verbose=False,
                                        feature_extractor_weights_path=weights,
                                        feature_extractor_compile=False)


def extract_features(images: np.ndarray, extractor: str, weights: str | None, device: str = "cpu",
                     batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Features of uint8 N×H×W×3 images: {layer: N×D float32 CPU tensor} for the pool and isc layers.

    `weights` is resolved with `resolve_weights` (Inception: path, env var or hub cache, else
    FileNotFoundError). Runs torch-fidelity's `get_featuresdict_from_dataset` (0 workers, no progress bar).
    """
    check_images(images)
    weights = resolve_weights(extractor, weights)
    layers = feature_layers(extractor)
    wanted = tuple(dict.fromkeys((layers["fid"], layers["isc"])))
    fe = _extractor(extractor, weights, weights_sha256(weights), wanted, str(device))
    cuda = torch.device(device).type == "cuda"
    with torch.cuda.device(torch.device(device)) if cuda else contextlib.nullcontext():
        feats = get_featuresdict_from_dataset(_ImageDataset(images), fe, batch_size, cuda, True, False)
    log.debug("extracted %s features of %d images", extractor, len(images))
    return {k: v.float() for k, v in feats.items()}
