"""The zoo plan as data: each shipped model's training run (`ZooJob`), the lanes they run in, and the
expected wall time of a from-scratch `varbench train zoo` from measured seconds per step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from varbench.variants.presets import ZOO_CODE_DRAFT_STEPS, ZOO_VAR_DEPTHS, sizes, var_config
from varbench.variants.var_model import VARNet
from varbench.variants.vqvae import VQVAE

__all__ = ["ZooJob", "ZOO_VAR_LR", "ZOO_PLAN", "ZOO_LANES", "ZOO_SHIPPED", "SECONDS_PER_STEP_1THREAD",
           "VQVAE_THREAD_SPEEDUP", "TOKENIZE_MINUTES", "plan_minutes", "zoo_budget"]

# The VARs get 1500 steps at batch 32 each (equal steps and data for every size, so the loss fit compares
# sizes, not budgets) at a peak rate tuned per size (`ZOO_VAR_LR`): one rate for every width does not carry.
# 1500 steps at 3e-3 for all five gave d1..d5 held-out CE 1.599, 1.496, 1.451, 1.524, 1.554 (d4 and d5 worse
# than d3: no power law); the first zoo (500 steps at 1e-3) gave 1.880, 1.778, 1.730, 1.714, 1.707.


@dataclass(frozen=True)
class ZooJob:
    """One zoo member's training run: the arguments of its `varbench.harness.train` command line."""

    kind: str  # the trainer's kind: vqvae, classifier, var or hmar
    steps: int
    batch_size: int
    depth: int = 0
    lr: float | None = None  # None: the trainer's default
    init: str = ""  # the zoo member whose trained model.pt this run starts from
    from_scale: int = 0  # VAR: train on the scales >= from_scale only (a CoDe refiner)
    stage: int = 1  # HMAR: 1 = next-scale path, 2 = masked path
    shipped: bool = True  # False for an intermediate run (HMAR's stage 1, which stage 2 contains)


# Peak rate per VAR depth, picked by held-out CE over the runs in results/zoo_lr_sweep.md (3e-3 for all; 3e-3·96/width
# for d4 and d5; 1.2e-3 and 9e-4 for d5). d4 was not tried below 2.25e-3.
ZOO_VAR_LR = {1: 3e-3, 2: 3e-3, 3: 3e-3, 4: 2.25e-3, 5: 9e-4}


SECONDS_PER_STEP_1THREAD = {"vqvae": 3.47, "classifier": 0.60, "var_d1": 0.084, "var_d2": 0.207, "var_d3": 0.463,
                            "var_d4": 0.827, "var_d5": 1.375, "refiner_d2": 0.207, "hmar_d5_ns": 1.47,
                            "hmar_d5": 1.20}
VQVAE_THREAD_SPEEDUP = 1.76  # two threads against one, VQVAE at batch 32 (0.51 vs 0.29 steps/s)
TOKENIZE_MINUTES = 1.5  # a VAR/HMAR job's one-off encoding of the data set by the frozen VQVAE
ZOO_PLAN: dict[str, ZooJob] = {
    "vqvae": ZooJob("vqvae", 1200, 16),
    "classifier": ZooJob("classifier", 600, 64),
    **{f"var_d{d}": ZooJob("var", 1500, 32, depth=d, lr=ZOO_VAR_LR[d]) for d in ZOO_VAR_DEPTHS},
    # CoDe's refiner: the trained d2, fine-tuned on the scales it makes in CoDe (as the official refiner_N.pth
    # is VAR-d16 fine-tuned for entry N)
    "refiner_d2": ZooJob("var", 1000, 32, depth=2, lr=1e-3, init="var_d2", from_scale=ZOO_CODE_DRAFT_STEPS),
    # HMAR from the trained d5 (HMAR_SPEC §7): stage 1 the Markov next-scale path, stage 2 the masked path
    "hmar_d5_ns": ZooJob("hmar", 400, 32, depth=5, lr=1e-3, init="var_d5", shipped=False),
    "hmar_d5": ZooJob("hmar", 400, 32, depth=5, lr=1e-3, init="hmar_d5_ns", stage=2),
}
ZOO_LANES: tuple[tuple[str, ...], ...] = (("var_d5", "hmar_d5_ns", "hmar_d5"),
                                          ("var_d4", "var_d3", "var_d2", "refiner_d2", "var_d1"))
ZOO_SHIPPED: tuple[str, ...] = tuple(n for n, job in ZOO_PLAN.items() if job.shipped)


def plan_minutes() -> dict[str, float]:
    """Wall minutes of each phase of the plan from the measured seconds per step (batch-scaled)."""
    def minutes(name: str, base_batch: int = 32) -> float:
        job = ZOO_PLAN[name]
        return job.steps * SECONDS_PER_STEP_1THREAD[name] * job.batch_size / base_batch / 60

    vqvae = minutes("vqvae") / VQVAE_THREAD_SPEEDUP
    classifier = minutes("classifier", 64)
    lanes = [sum(minutes(n) + TOKENIZE_MINUTES for n in lane) for lane in ZOO_LANES]
    return {"vqvae": vqvae, "classifier": classifier, "var_lanes": max(lanes),
            "total": max(vqvae, classifier) + max(lanes)}


def zoo_budget(preset: str = "zoo", depths: Sequence[int] = ZOO_VAR_DEPTHS) -> dict[str, int]:
    """Parameter counts and fp16 bytes of the zoo (VQVAE, each VAR depth, ProjectCNN)."""
    from varbench.harness.eval.extractors import ProjectCNN

    from .steps import param_count

    p = sizes(preset)
    with torch.device("meta"):
        counts = {"vqvae": param_count(VQVAE(p.vqvae)), "classifier": param_count(ProjectCNN(p.num_classes))}
        for d in depths:
            counts[f"var_d{d}"] = param_count(VARNet(var_config(preset, d)))
    counts["total_params"] = sum(counts.values())
    counts["fp16_bytes"] = 2 * counts["total_params"]
    return counts
