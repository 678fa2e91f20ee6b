"""`varbench train zoo`: trains the whole zoo from scratch, then exports it (fp16 + manifest) into the package.

    varbench train zoo --out runs/zoo --export          # ~75 min on a 2-core CPU; rerun to resume
    varbench train zoo --out runs/zoo --export DIR      # export somewhere else (then set VARBENCH_ZOO=DIR)

Phases (`ZOO_PLAN` and `ZOO_LANES` in harness/train/steps.py):
  1. the VQVAE on two threads, with the classifier beside it on one;
  2. the VAR lanes side by side, one thread each, on the frozen VQVAE.
Each job is its own `python -m varbench.harness.train KIND ... --resume` process writing OUT/<name>/, so an
interrupted build picks up where it stopped (a job whose summary.json says finished is skipped, a half-done
one resumes from its checkpoint with the same losses). A bar follows the steps of every job together.
`export` then writes each model.pt as fp16, hashes it, and writes manifest.json beside the files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import steps as T
from varbench.variants.zoo import MANIFEST, ZOO_DIR

from varbench.harness.core.records import capture_env
from .trainer import LOG, SUMMARY, WEIGHTS, load_checkpoint

__all__ = ["job_args", "build", "export", "main"]

Job = tuple[str, list[str]]


def job_args(name: str, out: Path, device: str = "cpu", threads: int = 1) -> list[str]:
    """The trainer's command line of one zoo member (its `ZooJob` in ZOO_PLAN); runs write OUT/<name>/."""
    job = T.ZOO_PLAN[name]
    args = [job.kind, "--out", str(out / name), "--steps", str(job.steps), "--batch-size", str(job.batch_size),
            "--preset", "zoo", "--device", device, "--threads", str(threads), "--resume", "--no-progress"]
    if job.lr is not None:
        args += ["--lr", repr(job.lr)]
    if job.kind in ("var", "hmar"):
        args += ["--depth", str(job.depth), "--vqvae", str(out / "vqvae" / WEIGHTS)]
    if job.init:
        args += ["--init", str(out / job.init / WEIGHTS)]
    if job.from_scale:
        args += ["--from-scale", str(job.from_scale)]
    if job.stage != 1:
        args += ["--stage", str(job.stage)]
    return args


def _finished(run: Path) -> bool:
    try:
        return bool(json.loads((run / SUMMARY).read_text()).get("finished"))
    except (OSError, json.JSONDecodeError):
        return False


def _steps_done(run: Path) -> int:
    try:
        lines = (run / LOG).read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, json.JSONDecodeError, KeyError, IndexError):
        return 0


def _run_lanes(lanes: Sequence[Sequence[Job]], out: Path) -> None:
    """Runs each lane's jobs in order, the lanes side by side; raises if any job fails."""
    failures: list[str] = []

    def lane(jobs: Sequence[Job]) -> None:
        for name, args in jobs:
            if failures:
                return
            if _finished(out / name):
                continue
            log = out / f"{name}.out"
            with open(log, "ab") as f:
                code = subprocess.call([sys.executable, "-m", "varbench.harness.train", *args], stdout=f, stderr=f)
            if code != 0:
                failures.append(f"{name} exited with {code} (its output: {log})")

    from tqdm.auto import tqdm

    names = [name for jobs in lanes for name, _ in jobs]
    total = sum(T.ZOO_PLAN[n].steps for n in names)
    threads = [threading.Thread(target=lane, args=(jobs,), daemon=True) for jobs in lanes]
    for t in threads:
        t.start()
    with tqdm(total=total, desc=" + ".join(names), unit="step") as bar:
        while any(t.is_alive() for t in threads):
            time.sleep(2.0)
            bar.n = sum(min(_steps_done(out / n), T.ZOO_PLAN[n].steps) for n in names)
            bar.refresh()
    if failures:
        raise RuntimeError("zoo training failed: " + "; ".join(failures))


def build(out: str | Path, export_to: str | Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Trains (or resumes) every zoo member under `out`; exports when `export_to` is given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _run_lanes([[("vqvae", job_args("vqvae", out, device, threads=2))],
                [("classifier", job_args("classifier", out, device))]], out)
    _run_lanes([[(n, job_args(n, out, device)) for n in lane] for lane in T.ZOO_LANES], out)
    minutes = (time.perf_counter() - t0) / 60
    return export(out, export_to, minutes) if export_to else {"out": str(out), "minutes": minutes}


def _loss_curve(run: Path) -> list[list[float]]:
    rows = [json.loads(line) for line in (run / LOG).read_text().splitlines() if line.strip()]
    return [[r["step"], round(r["loss"], 5)] for r in rows]


def _record(run: Path) -> dict[str, Any]:
    """What the manifest keeps of one finished run: size, training config, held-out metrics, loss curve."""
    summary = json.loads((run / SUMMARY).read_text())
    return {"params": summary["params"], "train_config": load_checkpoint(run / "last.pt")["config"],
            "heldout": {k: v for k, v in summary.items() if k.startswith(("heldout", "code_usage"))},
            "steps_per_s": summary["steps_per_s"], "loss_curve": _loss_curve(run)}


def export(out: str | Path, dest: str | Path, train_minutes: float | None = None,
           names: Sequence[str] = T.ZOO_SHIPPED, calibration_images: int | None = None) -> dict[str, Any]:
    """Writes each finished member's weights as an fp16 state dict into `dest`, with manifest.json. The
    classifier also gets its feature-scale buffers, calibrated on `calibration_images` images of its training
    split (default: the shipped zoo's count), so a retrained zoo scores on the documented FID scale."""
    from varbench.harness.core.hashing import file_sha256
    from varbench.harness.eval.extractors import CALIBRATION_IMAGES, CALIBRATION_SEED, calibrate_weights

    out, dest = Path(out), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    models: dict[str, Any] = {}
    for name in names:
        run = out / name
        if not _finished(run):
            raise RuntimeError(f"{run} has not finished training (no finished summary.json); run the build first")
        state = torch.load(run / WEIGHTS, map_location="cpu", weights_only=True)
        half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        file = dest / f"{name}.pt"
        tmp = file.with_suffix(".tmp")
        torch.save(half, tmp)
        tmp.replace(file)
        scale = {}
        if name == "classifier":
            images = calibration_images or CALIBRATION_IMAGES
            calibrate_weights(str(file), str(file), num_images=images)
            scale = {"feature_scale": {"images": images, "seed": CALIBRATION_SEED}}
        models[name] = {"file": file.name, "sha256": file_sha256(file), "bytes": file.stat().st_size, **_record(run),
                        **scale}
        init = T.ZOO_PLAN[name].init if name in T.ZOO_PLAN else ""
        if init and init not in T.ZOO_SHIPPED and _finished(out / init):  # an intermediate run (HMAR stage 1)
            models[name]["init_run"] = {"name": init, **_record(out / init)}
    env = capture_env("cpu")
    doc = {"schema": 1, "git_sha": env["git_sha"], "git_dirty": env["git_dirty"], "torch": env["torch"],
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "varbench train zoo --out OUT --export", "train_minutes": train_minutes,
           "data": {"set": "varbench synthetic (harness/eval/synthetic.py)", "image_size": T.ZOO_IMAGE_SIZE,
                    "num_classes": T.ZOO_NUM_CLASSES, "patch_nums": list(T.ZOO_PATCH_NUMS)},
           "models": models}
    (dest / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="varbench train zoo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="training folder (one subfolder per model; rerun to resume)")
    ap.add_argument("--export", nargs="?", const=str(ZOO_DIR), default=None, metavar="DIR",
                    help=f"write the fp16 zoo and manifest here (default with no DIR: the package, {ZOO_DIR})")
    ap.add_argument("--export-only", action="store_true", help="skip training: export a finished --out folder")
    ap.add_argument("--device", default="cpu")
    ns = ap.parse_args(argv)
    if ns.export_only:
        doc = export(ns.out, ns.export or ZOO_DIR)
    else:
        doc = build(ns.out, ns.export, ns.device)
    models = doc.get("models", {})
    for name, m in models.items():
        print(f"{name:10s} {m['params']:>10,} params  {m['bytes'] / 1e6:6.2f} MB  {m['heldout']}")
    print(json.dumps({k: v for k, v in doc.items() if k != "models"}, indent=1))
    return 0
