"""`varbench run [STUDY.toml] [--variants A,B] [--set k=v] [--out DIR]`: a study (default: the embedded one)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def default_study_path() -> Path:
    from importlib.resources import files

    return Path(str(files("varbench.harness") / "studies" / "default.toml"))


def _cmd_run(args: argparse.Namespace) -> int:
    import dataclasses
    import datetime as dt
    import os

    from varbench.harness.run.config import load_study
    from varbench.harness.core.records import load_records
    from varbench.harness.run.study import check_names, resolve_device, run_study
    from varbench.harness.eval.tables import results_table

    embedded = args.study is None
    study = load_study(default_study_path() if embedded else args.study, args.set or [])
    if args.variants is not None:
        study = dataclasses.replace(study, variants=_variant_list(args.variants))
    check_names(study)  # unknown names and argument keys fail here, before anything is written
    out = Path(args.out or Path("runs") / f"{study.study}-{dt.datetime.now():%Y%m%d-%H%M%S}")
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        what = "the embedded default study" if embedded else f"study {study.study!r} ({args.study})"
        print(f"varbench run: {what} on {resolve_device(study.device)} -> {out}")
        print(f"  variants: {', '.join(study.variants)}; KV policies: {', '.join(study.kv_policies)}")
        if embedded:
            from varbench.variants.zoo import manifest, zoo_dir

            doc = manifest()
            print(f"  weights: the trained zoo ({zoo_dir()}, trained at git {doc['git_sha']}, "
                  f"{len(doc['models'])} models); extractor weights: the zoo classifier")
        if study.quality is not None:
            print(f"  quality: {study.quality.num_samples} samples, extractor {study.quality.extractor!r}, "
                  f"reference {study.quality.reference!r}")
    try:
        run_study(study, out, progress=main_rank)
    except OSError as err:  # the folder is locked or read-only, a record could not be written (disk full)
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.is_initialized():  # started by torchrun: ranks leave together
        dist.destroy_process_group()
    if main_rank:
        table = results_table(load_records(out / "records.jsonl"))
        (out / "table.md").write_text(table + "\n")
        print()
        print(table)
        print(f"\nrecords: {out / 'records.jsonl'}   table: {out / 'table.md'}   samples: {out / 'samples'}")
        print(f"again: varbench table {out}")
    return 0


def _variant_list(text: str) -> tuple[str, ...]:
    """`--variants A,B`; an empty list is an error, never the study's own variants."""
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        from varbench.harness.core.registry import VARIANTS

        raise ValueError(f"--variants is empty ({text!r}): give comma-separated variant names, e.g. "
                         f"--variants var_zoo_d5,var_zoo_d2; registered: {', '.join(VARIANTS.list())}")
    return names


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a study (default: the embedded quick study)")
    p.add_argument("study", nargs="?", help="study TOML file (default: the embedded quick study)")
    p.add_argument("--variants", help="comma-separated variant names (replaces the study's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a study setting, e.g. --set quality.num_samples=1000 (repeatable)")
    p.add_argument("--out", help="output folder (default: runs/<study>-<time>); rerun to resume")
    p.set_defaults(fn=_cmd_run)
