"""`varbench`: the command line. The only module that prints.

    varbench run [STUDY.toml] [--set k=v] [--out DIR]  a study (default: the embedded one, on a CPU)
    varbench table RESULTS [--format md|csv]          the tables of recorded results
    varbench fit RESULTS|CSV --x COL --y COL [--floor] power-law fits with intervals
    varbench reproduce TABLE [--measured RESULTS]     a published table beside our measurements (--list)
    varbench train KIND --out DIR --steps N           train on the synthetic set (or --data IMAGENET_DIR); KIND:
                                                      vqvae, var (--from-scale N --init VAR.pt: a CoDe-style
                                                      refiner), hmar (--stage 1, then --stage 2 --init), classifier
    varbench train zoo --out DIR --export             retrain the shipped zoo from scratch (~75 min, 2 CPUs)
    varbench list [PATTERN]                           registered variants with parameter counts
    varbench bench [--variant NAME] [--batch N] ...   speed, memory, KV bytes, MFU as one JSON object
    varbench conformance DIR [--device cpu]           replay official reference outputs; exit 0 iff all pass
    varbench env                                      the environment block records carry
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from varbench.harness.core.registry import KV_POLICIES, VARIANTS
    from varbench.variants import describe

    rows = [describe(name) for name in VARIANTS.list(args.pattern)]
    policies = [{"name": name, "family": "kv_policy", "params": "-",
                 "description": (KV_POLICIES.get(name).__doc__ or "").strip().split("\n")[0],
                 "defined in": KV_POLICIES.origin(name)} for name in KV_POLICIES.list(args.pattern)]
    if not rows and not policies:
        print(f"no variant or KV policy matches {args.pattern!r}", file=sys.stderr)
        return 1
    print(tabulate(rows + policies, headers="keys", tablefmt="github"))
    return 0


def _sampling(args: argparse.Namespace):
    from varbench.harness.core.sampling import SampleConfig

    return SampleConfig(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=False)


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from varbench.harness.core.registry import create_variant
    from varbench.harness.run.bench import bench_variant

    if args.threads:
        torch.set_num_threads(args.threads)
    from varbench.harness.core.registry import VARIANTS
    from varbench.variants.var import EngineConfig, build_var

    name = args.variant or (f"var_d{args.depth}" if args.depth else "test_var")
    policy = None  # --kv-policy NAME --kv-args JSON; neither: the variant's own cache
    if args.kv_policy is not None or args.kv_args is not None:
        import varbench.variants  # noqa: F401  (registers the KV policies)

        from varbench.harness.core.registry import KV_POLICIES

        try:
            kv_args = json.loads(args.kv_args or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"--kv-args is not JSON ({err}); e.g. --kv-args '{{\"budget\": 0.1}}'") from None
        if not isinstance(kv_args, dict):
            raise ValueError(f"--kv-args must be a JSON object such as '{{\"budget\": 0.1}}', got {args.kv_args}")
        policy = KV_POLICIES.get(args.kv_policy or "full")(**kv_args)

    def build(engine: EngineConfig):
        kwargs = {"engine": engine, "device": args.device, "weights": args.weights}
        if args.weights == "random" and args.vae_ch:
            kwargs["vae_ch"] = args.vae_ch
        if policy is not None:
            kwargs["kv_policy"] = policy
        if args.depth and not args.variant and name not in VARIANTS:  # any depth, 256 px layout
            return build_var(args.depth, **kwargs)
        return create_variant(name, **kwargs)

    if args.reference:
        engine = EngineConfig.reference(args.precision)
    else:
        engine = EngineConfig(args.precision, compile=args.compile, cuda_graphs=args.cuda_graphs)
    result = bench_variant(build(engine), args.batch, _sampling(args), args.warmup, args.repeats)
    if policy is not None:  # name, arguments as given and resolved, unverified settings, calibration source
        result |= policy.record() | {"kv_args_given": kv_args}
    if args.vs_reference:
        ref = bench_variant(build(EngineConfig.reference(args.precision)), args.batch, _sampling(args),
                            args.warmup, args.repeats)
        result["reference"] = {k: ref[k] for k in ("images_per_s", "latency_ms_p50", "latency_ms_iqr",
                                                   "latency_ms_per_scale", "vae_decode_ms", "peak_memory_bytes")}
        result["speedup_vs_reference"] = result["images_per_s"] / ref["images_per_s"]
    print(json.dumps(result, indent=2))
    return 0


def _cmd_conformance(args: argparse.Namespace) -> int:
    from varbench.harness.conformance import run_conformance

    report = run_conformance(args.folder, args.device)
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


def _cmd_env(args: argparse.Namespace) -> int:
    from varbench.harness.core.records import capture_env

    print(json.dumps(capture_env(args.device), indent=2))
    return 0


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
    if args.variants:
        study = dataclasses.replace(study, variants=tuple(v.strip() for v in args.variants.split(",")))
    check_names(study)  # unknown names fail here, before anything is written
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
    run_study(study, out, progress=main_rank)
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


def _cmd_table(args: argparse.Namespace) -> int:
    from varbench.harness.core.records import load_records
    from varbench.harness.eval.tables import results_table

    path = Path(args.results)
    if not path.exists():
        raise FileNotFoundError(f"no records at {str(path)!r}: give a records .jsonl file or a run folder")
    records = list(load_records(path))
    if not records:
        raise ValueError(f"{str(path)!r} holds no records")
    print(results_table(records, args.format).rstrip("\n"))
    return 0


def _fit_columns(path: Path, x: str, y: str):
    """The (x, y) columns of a CSV file or of records (flattened: `metrics.fid` may be written `fid`)."""
    import pandas as pd

    from varbench.harness.core.records import load_records

    if path.suffix == ".csv":
        frame = pd.read_csv(path)
    else:
        frame = pd.json_normalize(list(load_records(path)))
    columns = []
    for name in (x, y):
        match = next((c for c in (name, f"metrics.{name}", f"cell.{name}") if c in frame.columns), None)
        if match is None:
            import difflib

            close = difflib.get_close_matches(name, list(frame.columns), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise KeyError(f"no column {name!r} in {path}.{hint}")
        columns.append(match)
    data = frame[columns].apply(pd.to_numeric, errors="coerce").dropna()
    return data[columns[0]].to_numpy(), data[columns[1]].to_numpy()


def _cmd_fit(args: argparse.Namespace) -> int:
    from varbench.harness.eval.fits import compare, fit_power_law, fit_power_law_floor

    path = Path(args.results)
    if not path.exists():
        raise FileNotFoundError(f"no results at {str(path)!r}: give a CSV file, a records .jsonl or a folder")
    x, y = _fit_columns(path, args.x, args.y)
    pure = fit_power_law(x, y, holdout=args.holdout)
    result: dict = {"x": args.x, "y": args.y, "power_law": pure.to_dict()}
    floor = None
    if args.floor:
        floor = fit_power_law_floor(x, y)
        result["power_law_with_floor"] = floor.to_dict()
        result["comparison"] = compare(pure, floor)
    if args.plot:
        from varbench.harness.eval.plots import plot_fit

        result["plot"] = str(plot_fit(x, y, pure, floor, args.plot, args.x, args.y))
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    lo_t, hi_t = pure.alpha_ci95_t
    lo_b, hi_b = pure.alpha_ci95_bootstrap
    print(f"{args.y} = {pure.a:.4g}·{args.x}^{pure.alpha:.4f} = ({pure.beta:.4g}·{args.x})^{pure.alpha:.4f}")
    print(f"  alpha {pure.alpha:.4f} ± {pure.alpha_se:.4f} (se); 95% t [{lo_t:.4f}, {hi_t:.4f}], "
          f"bootstrap [{lo_b:.4f}, {hi_b:.4f}]")
    print(f"  r {pure.r:.4f}, R² {pure.r2:.4f}, n {pure.n}, {args.x} in [{pure.x_range[0]:.4g}, {pure.x_range[1]:.4g}]")
    print("  log residuals: " + ", ".join(f"{r:+.3f}" for r in pure.residuals_log))
    if pure.holdout:
        errs = ", ".join(f"{e:+.1%}" for e in pure.holdout["relative_error"])
        print(f"  largest {pure.holdout['points']} points predicted from the rest: relative error {errs}")
    if floor is not None:
        cmp = result["comparison"]
        print(f"with a floor: {args.y} = {floor.c:.4g} + {floor.a:.4g}·{args.x}^{floor.alpha:.4f}")
        print(f"  AIC {cmp['aic_power_law']:.2f} (pure) vs {cmp['aic_with_floor']:.2f} (floor): "
              f"preferred {cmp['preferred']}")
    if args.plot:
        print(f"plot: {result['plot']}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from varbench.harness.eval.reproduce import reproduce, tables_overview

    if args.list or not args.table:
        print(tables_overview())
        return 0
    measured = None
    if args.measured:
        from varbench.harness.core.records import load_records

        path = Path(args.measured)
        if not path.exists():
            raise FileNotFoundError(f"no records at {str(path)!r}")
        measured = list(load_records(path))
    print(reproduce(args.table, measured))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="varbench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a study (default: the embedded quick study)")
    run.add_argument("study", nargs="?", help="study TOML file (default: the embedded quick study)")
    run.add_argument("--variants", help="comma-separated variant names (replaces the study's)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a study setting, e.g. --set quality.num_samples=1000 (repeatable)")
    run.add_argument("--out", help="output folder (default: runs/<study>-<time>); rerun to resume")
    run.set_defaults(fn=_cmd_run)

    t = sub.add_parser("table", help="print the tables of recorded results")
    t.add_argument("results", help="records .jsonl file or a folder of them")
    t.add_argument("--format", default="md", choices=["md", "csv"])
    t.set_defaults(fn=_cmd_table)

    f = sub.add_parser("fit", help="fit a power law (and one with a floor) to recorded or CSV data")
    f.add_argument("results", help="CSV file, records .jsonl or a folder of records")
    f.add_argument("--x", required=True, help="column of x (e.g. params)")
    f.add_argument("--y", required=True, help="column of y (e.g. fid or metrics.fid)")
    f.add_argument("--floor", action="store_true", help="also fit y = c + a·x^alpha and compare by AIC")
    f.add_argument("--holdout", type=int, default=2, help="largest points to predict from the rest")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.add_argument("--plot", help="write a log-log plot with the fit and its band to this file")
    f.set_defaults(fn=_cmd_fit)

    r = sub.add_parser("reproduce", help="a published table beside our measurements")
    r.add_argument("table", nargs="?", help="table id (see --list)")
    r.add_argument("--measured", help="records .jsonl or folder to put beside the published values")
    r.add_argument("--list", action="store_true", help="list the published tables")
    r.set_defaults(fn=_cmd_reproduce)

    sub.add_parser("train", help="train on the synthetic set or an ImageNet folder (--data): varbench train --help")

    ls = sub.add_parser("list", help="list registered variants")
    ls.add_argument("pattern", nargs="?", default="*")
    ls.set_defaults(fn=_cmd_list)

    b = sub.add_parser("bench", help="measure speed and memory of one variant")
    b.add_argument("--variant", help="registered name (default: test_var, or var_d{depth})")
    b.add_argument("--depth", type=int, help="VAR depth (16, 20, 24, 30, 36) instead of --variant")
    b.add_argument("--weights", default="random", help="'random' (default) or a checkpoint source")
    b.add_argument("--vae-ch", type=int, default=None, help="VQVAE width of random models (default 160)")
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--device", default="cpu")
    b.add_argument("--compile", action="store_true", help="torch.compile the per-scale step")
    b.add_argument("--cuda-graphs", action="store_true", help="capture the per-scale step as CUDA graphs")
    b.add_argument("--reference", action="store_true", help="measure the reference loop (engine off)")
    b.add_argument("--vs-reference", action="store_true", help="also measure the reference; report speedup")
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    b.add_argument("--cfg", type=float, default=1.5)
    b.add_argument("--top-k", type=int, default=900)
    b.add_argument("--top-p", type=float, default=0.96)
    b.add_argument("--kv-policy", help="KV-cache policy: full, streaming, h2o, snapkv, pyramidkv, scalekv, hack")
    b.add_argument("--kv-args", help='JSON object of the policy\'s arguments, e.g. \'{"budget": 0.1}\'')
    b.set_defaults(fn=_cmd_bench)

    c = sub.add_parser("conformance", help="replay a conformance fixture folder")
    c.add_argument("folder")
    c.add_argument("--device", default="cpu")
    c.set_defaults(fn=_cmd_conformance)

    e = sub.add_parser("env", help="print the environment block")
    e.add_argument("--device", default="cpu")
    e.set_defaults(fn=_cmd_env)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["train", "zoo"]:  # the whole zoo: both training phases, then the fp16 export
        from varbench.harness.train.zoo_build import main as zoo_main

        return zoo_main(argv[2:])
    if argv[:1] == ["train"]:  # the trainer owns its flags (and --help)
        from varbench.harness.train import main as train_main

        return train_main(argv[1:])
    args = _parser().parse_args(argv)
    from varbench.harness.core.checkpoints import CheckpointError

    try:
        return args.fn(args)
    except (KeyError, ValueError, CheckpointError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
