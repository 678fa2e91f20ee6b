"""The trained zoo: small models of the project's 64 px synthetic data set, shipped inside the package.

Offline, with random weights, FID is noise and a scaling curve has nothing to fit. The zoo is a family of
genuinely trained models (`varbench train zoo` retrains it from scratch, see `ZOO_PLAN` in harness/train/steps.py):

* `vqvae.pt`       the multi-scale residual tokenizer (VAR's architecture, 8x, vocab 512, scales 1,2,3,4,5,6,8),
                   its decoder fine-tuned afterwards with the tokens frozen (`varbench train vqvae-decoder`,
                   the manifest's `finetune` entry), so the VARs trained on its tokens stay valid;
* `var_d{1..5}.pt` VAR transformers of width 32·depth on its 155-token pyramids (the sizes of the loss fit);
* `refiner_d2.pt`  CoDe's refiner: var_d2 fine-tuned on the two scales it makes in `code_zoo_d5_d2`;
* `hmar_d5.pt`     HMAR: var_d5 fine-tuned with Markov attention (stage 1), then a masked path (stage 2);
* `classifier.pt`  ProjectCNN trained on the data set: the `varbench-cnn` extractor's default weights.

All are fp16 state dicts in the official layouts (loaded strictly, computed in fp32). `manifest.json` holds
each file's sha256, parameter count, training config, held-out metrics and loss curve, and the git sha of
the code that trained it; every file is checked against it on load. `$VARBENCH_ZOO` points at another zoo
folder (a retrained one) with the same layout.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from varbench.harness.core.registry import register_variant

from .code import CoDe, _pair, build_code
from .hmar import HMAR, build_hmar
from .hmar import _arch as _hmar_arch
from .presets import ZOO_CODE_DRAFT_STEPS, hmar_config, var_config
from .factory import register_model
from .params import param_count
from .var import VAR, build_var

__all__ = ["ZOO_DIR", "MANIFEST", "ZooError", "zoo_dir", "manifest", "zoo_file", "zoo_weights_note",
           "RETRAIN_COMMAND", "ZOO_CODE_DRAFT_STEPS", "ZOO_HMAR_SCHEDULE"]

ZOO_DIR = Path(__file__).with_name("zoo")
MANIFEST = "manifest.json"
RETRAIN_COMMAND = "varbench train zoo --out runs/zoo --export"
# CoDe on the zoo (ZOO_CODE_DRAFT_STEPS = 5): the drafter makes scales 1..5 and the refiner the last two (6x6 and
# 8x8, 100 of the 155 tokens), mirroring the official N = 8 of 10 scales, which leaves the two largest to the refiner.
# HMAR on the zoo: the official schedule's masked steps (2x2 in two steps, 3x3 in four) on the zoo's 7 scales.
ZOO_HMAR_SCHEDULE: tuple[tuple[int, ...], ...] = ((1,), (1, 3), (1, 1, 2, 5), (16,), (25,), (36,), (64,))


class ZooError(FileNotFoundError):
    """The zoo folder, its manifest or one of its files is missing or does not match the manifest."""


def zoo_dir() -> Path:
    return Path(os.environ.get("VARBENCH_ZOO") or ZOO_DIR)


def _retrain_hint() -> str:
    return f"retrain it with `{RETRAIN_COMMAND}` (about 80 minutes on a 2-core CPU), or set VARBENCH_ZOO"


@cache
def _manifest(root: str) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ZooError(f"no zoo manifest at {path}; {_retrain_hint()}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ZooError(f"zoo manifest {path} is not valid JSON ({err}); {_retrain_hint()}") from None


def manifest(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The zoo's manifest: {'models': {name: {file, sha256, params, config, heldout, loss_curve, ...}}, ...}."""
    return _manifest(str(Path(root or zoo_dir()).resolve()))


def zoo_file(name: str, root: str | os.PathLike | None = None) -> str:
    """Path of one zoo model's file, checked against the manifest's sha256."""
    from varbench.harness.core.hashing import file_sha256

    base = Path(root or zoo_dir())
    models = manifest(base)["models"]
    if name not in models:
        raise ZooError(f"the zoo has no model {name!r}; it has: {', '.join(sorted(models))}")
    entry = models[name]
    path = base / entry["file"]
    if not path.is_file():
        raise ZooError(f"zoo file {path} is missing; {_retrain_hint()}")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise ZooError(f"zoo file {path} has sha256 {digest[:12]}…, the manifest says {entry['sha256'][:12]}…: "
                       f"the file is corrupt or from another training run; {_retrain_hint()}")
    return str(path)


def zoo_weights_note(name: str) -> str:
    """How records name a zoo model: 'zoo:var_d5 (sha256 0123456789ab)'."""
    return f"zoo:{name} (sha256 {manifest()['models'][name]['sha256'][:12]})"


def _zoo_var(depth: int, **kwargs: Any) -> VAR:
    if kwargs.get("weights") == "random":  # the same architecture untrained (trained tokenizer): a baseline
        kwargs.setdefault("vae", zoo_file("vqvae"))
        return build_var(depth, name=f"var_zoo_d{depth}", config=var_config("zoo", depth), **kwargs)
    kwargs.setdefault("weights", zoo_file(f"var_d{depth}"))
    kwargs.setdefault("vae", zoo_file("vqvae"))
    policy = kwargs.pop("kv_policy", None)  # attached once the model has its zoo name: calibrations key on it
    variant = build_var(depth, name=f"var_zoo_d{depth}", **kwargs)
    variant.weights = f"{zoo_weights_note(f'var_d{depth}')}; vqvae {zoo_weights_note('vqvae')}"
    if policy is not None:
        variant.set_kv_policy(policy)
        policy.prepare(variant)
    return variant


# One registered model per depth in ZOO_VAR_DEPTHS (tests/test_zoo.py checks that they agree).
_ZOO_VAR_NOTES = {1: "the loss fit's smallest size", 2: "`refiner_d2` starts from it", 3: "", 4: "",
                  5: "the default model of `varbench run`"}
for _depth, _note in _ZOO_VAR_NOTES.items():
    _cfg = var_config("zoo", _depth)
    register_model(f"var_zoo_d{_depth}", _zoo_var, _cfg,
                   f"Zoo VAR-d{_depth} (width {_cfg.width}, {param_count(_cfg) / 1e6:.2g} M params), trained on the "
                   f"64 px synthetic set" + (f": {_note}." if _note else "."), fixed={"depth": _depth},
                   signature_of=build_var)


@register_variant
@_pair(var_config("zoo", 5), var_config("zoo", 2))
def code_zoo_d5_d2(finetuned: bool = True, training_free: bool | None = None, **kwargs: Any) -> CoDe:
    """CoDe on the zoo: VAR-d5 drafts scales 1..N, the zoo's refiner makes the rest; N = 5 of 7 scales.

    The refiner is VAR-d2 fine-tuned on the last two scales (`refiner_d2`), as the official refiner_N.pth is
    VAR-d16 fine-tuned for its entry N; the drafter is the plain VAR-d5 (the zoo has no fine-tuned drafter).
    `finetuned=False` (or the official scripts' `training_free=True`) is the training-free pair: the plain VAR-d2
    refines."""
    if training_free is not None:
        finetuned = not training_free
    refiner = "refiner_d2" if finetuned else "var_d2"
    kwargs.setdefault("draft_steps", ZOO_CODE_DRAFT_STEPS)
    kwargs.setdefault("drafter_weights", zoo_file("var_d5"))
    kwargs.setdefault("refiner_weights", zoo_file(refiner))
    kwargs.setdefault("vae", zoo_file("vqvae"))
    variant = build_code(5, 2, name="code_zoo_d5_d2", **kwargs)
    variant.weights = f"drafter {zoo_weights_note('var_d5')}; refiner {zoo_weights_note(refiner)}"
    return variant


@register_variant
@_hmar_arch(hmar_config("zoo", 5))
def hmar_zoo_d5(**kwargs: Any) -> HMAR:
    """HMAR on the zoo: the trained VAR-d5 turned Markov (stage 1) with a masked path (stage 2); 11 passes.

    Mask schedule `ZOO_HMAR_SCHEDULE`: the official one's masked steps on the 2x2 and 3x3 scales, carried over
    to the zoo's 7 scales (a varbench choice: no HMAR schedule exists for this layout)."""
    kwargs.setdefault("weights", zoo_file("hmar_d5"))
    kwargs.setdefault("vae", zoo_file("vqvae"))
    kwargs.setdefault("mask_schedule", ZOO_HMAR_SCHEDULE)
    variant = build_hmar(5, name="hmar_zoo_d5", **kwargs)
    variant.default_sampling = None  # the study's sampling, like every other zoo model
    variant.weights = f"{zoo_weights_note('hmar_d5')}; vqvae {zoo_weights_note('vqvae')}"
    return variant
