"""`varbench bench`: speed, memory, KV bytes and MFU of one variant as one JSON object, and a record."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _sampling(args: argparse.Namespace):
    from varbench.harness.core.sampling import SampleConfig

    return SampleConfig(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=False)


def _cmd_bench(args: argparse.Namespace) -> int:
    import datetime as dt
    import time

    import torch

    from varbench.harness.core.registry import create_variant
    from varbench.harness.run.bench import bench_variant
    from varbench.harness.run.outdir import prepare_out

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from varbench.variants.engine import EngineConfig

    name = args.variant or ("var" if args.depth else "test_var")  # `var`: any depth, 256 px layout
    if args.weights is None and args.depth and not args.variant:
        args.weights = "random"  # `var` at a depth: a speed benchmark of the architecture
    policy = None  # --kv-policy NAME --kv-args JSON; neither: the variant's own cache
    if args.kv_policy is not None or args.kv_args is not None:
        import varbench.variants  # noqa: F401  (registers the KV policies)

        from varbench.harness.core.registry import KV_POLICIES

        kv_args = _json_object("--kv-args", args.kv_args, '{"budget": 0.1}')
        policy = KV_POLICIES.get(args.kv_policy or "full")(**kv_args)
    accel_args = _json_object("--accel-args", args.accel_args, '{"window": 8}')
    if args.accel is not None or accel_args:
        from varbench.variants.accel import ACCELERATIONS

        ACCELERATIONS.get(args.accel or "none")(**accel_args)  # unknown names and keys fail before any build

    def build(engine: EngineConfig):
        kwargs = {"engine": engine, "device": args.device}
        if args.weights is not None:  # None: the variant's own (the zoo's files, test_var's random weights)
            kwargs["weights"] = args.weights
        if args.weights in (None, "random") and args.vae_ch:
            kwargs["vae_ch"] = args.vae_ch
        if policy is not None:
            kwargs["kv_policy"] = policy
        if args.depth and not args.variant:
            kwargs["depth"] = args.depth
        variant = create_variant(name, **kwargs)
        if args.accel is None and not accel_args:
            return variant
        from varbench.variants.accel import apply_acceleration

        return apply_acceleration(variant, args.accel or "none", **accel_args)

    if args.reference:
        engine = EngineConfig.reference(args.precision)
    else:
        engine = EngineConfig(args.precision, compile=args.compile, cuda_graphs=args.cuda_graphs)
    out = Path(args.out or Path("runs") / f"bench-{dt.datetime.now():%Y%m%d-%H%M%S}")
    t0 = time.time()
    variant = build(engine)
    try:
        prepare_out(out)  # a folder the record cannot be written to fails now, not after the measurement
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {"weights": variant.weights} | bench_variant(variant, args.batch, _sampling(args), args.warmup,
                                                         args.repeats)
    if policy is not None:  # name, arguments as given and resolved, unverified settings, calibration source
        result |= policy.record() | {"kv_args_given": kv_args}
    measured = [(variant, result, t0, "")]
    if args.vs_reference:
        t1 = time.time()
        ref_variant = build(EngineConfig.reference(args.precision))
        ref = bench_variant(ref_variant, args.batch, _sampling(args), args.warmup, args.repeats)
        result["reference"] = {k: ref[k] for k in ("images_per_s", "latency_ms_p50", "latency_ms_iqr",
                                                   "latency_ms_per_scale", "vae_decode_ms", "peak_memory_bytes")}
        result["speedup_vs_reference"] = result["images_per_s"] / ref["images_per_s"]
        measured.append((ref_variant, ref, t1, " reference"))
    path = _bench_records(args, out, name, kv_args if policy is not None else {}, accel_args, measured)
    print(json.dumps(result, indent=2))
    print(f"record: {path} (print it: varbench table {out})", file=sys.stderr)
    return 0


def _json_object(option: str, text: str | None, example: str) -> dict:
    """A JSON object given on the command line ({} when absent), or a ValueError naming the option."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"{option} is not JSON ({err}); e.g. {option} '{example}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object such as '{example}', got {text}")
    return value


def _check_args(args: argparse.Namespace) -> None:
    """Counts and the device, checked before anything is built (ValueError naming the option and its range)."""
    for option, value, least in (("--batch", args.batch, 1), ("--repeats", args.repeats, 1),
                                 ("--warmup", args.warmup, 0), ("--threads", args.threads, 0)):
        if value < least:
            zero = " (0 = torch's default)" if option == "--threads" else ""
            raise ValueError(f"{option} must be >= {least}{zero}, got {value}")
    check_device(args.device)


def check_device(device: str) -> None:
    """A device this machine has: cpu, cuda or cuda:N (with CUDA available and N below the device count)."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} is not a device here; valid: cpu, cuda, cuda:N")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def _bench_records(args: argparse.Namespace, out: Path, name: str, kv_args: dict, accel_args: dict,
                   measured: list) -> Path:
    """Appends one speed record per measurement to OUT/records.jsonl, in a study's speed-record schema (study
    "bench"; the reference loop's record has " reference" after its label); returns the records' path."""
    from varbench.harness.core.records import append_record, capture_env, config_hash
    from varbench.harness.run.config import to_dict
    from varbench.harness.run.study import make_record, new_run_id

    variant_args = {"weights": args.weights} if args.weights is not None else {}
    if args.depth and not args.variant:
        variant_args["depth"] = args.depth
    if args.weights in (None, "random") and args.vae_ch:
        variant_args["vae_ch"] = args.vae_ch
    cell = {"variant": name, "kv_policy": args.kv_policy or "full", "variant_args": variant_args,
            "kv_args": kv_args, "sweep": {}}
    if (args.accel or "none") != "none":  # as a study's accelerated cell; a plain one keeps its old hash
        cell |= {"acceleration": args.accel, "accel_args": accel_args}
    sample, env, run_id, path = to_dict(_sampling(args)), capture_env(args.device), new_run_id(), out / "records.jsonl"
    for i, (variant, metrics, started, suffix) in enumerate(measured, 1):
        engine, precision = to_dict(variant.engine), variant.engine.precision  # "auto" resolved by the variant
        chash = config_hash({"kind": "speed", "study": "bench", "cell": cell, "batch": args.batch,
                             "device": args.device, "engine": engine, "precision": precision,
                             "sample": sample, "speed": {"warmup": args.warmup, "repeats": args.repeats},
                             "threads": args.threads})
        label = " ".join([name, cell["kv_policy"]] + ([args.accel] if "acceleration" in cell else [])) + suffix
        append_record(path, make_record(f"{run_id}/{i}", "speed", "bench", cell, label,
                                        chash, precision, 0, sample, engine, args.device, metrics, env,
                                        started, batch_size=args.batch, weights=variant.weights,
                                        command=getattr(args, "command_line", None)))
    return path


def add(sub: argparse._SubParsersAction) -> None:
    from varbench.harness.run.config import SpeedConfig
    from varbench.variants.engine import PRECISIONS

    speed = SpeedConfig()  # a study's speed pass, so that `bench` and a one-cell study measure alike
    p = sub.add_parser("bench", help="measure speed and memory of one variant (a one-cell study's speed pass)")
    p.add_argument("--variant", help="registered name (default: test_var, or var with --depth)")
    p.add_argument("--depth", type=int, help="the registered `var` at this depth (variant argument depth)")
    p.add_argument("--weights", help="a checkpoint source or 'random' (default: the variant's own: the zoo's "
                   "files for *_zoo_*, random for test_var and --depth D, official checkpoints for var_d16...)")
    p.add_argument("--vae-ch", type=int, default=None, help="VQVAE width of random models (default 160)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="compute precision (default auto: bf16 on a GPU, fp32 on a CPU, as a study's engine)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the per-scale step")
    p.add_argument("--cuda-graphs", action="store_true", help="capture the per-scale step as CUDA graphs")
    p.add_argument("--reference", action="store_true", help="measure the reference loop (engine off)")
    p.add_argument("--vs-reference", action="store_true", help="also measure the reference; report speedup")
    p.add_argument("--warmup", type=int, default=speed.warmup, help=f"untimed runs first (default {speed.warmup})")
    p.add_argument("--repeats", type=int, default=speed.repeats,
                   help=f"timed runs; median and IQR (default {speed.repeats})")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--kv-policy", help="KV-cache policy: full, streaming, h2o, snapkv, pyramidkv, scalekv, hack")
    p.add_argument("--kv-args", help='JSON object of the policy\'s arguments, e.g. \'{"budget": 0.1}\'')
    p.add_argument("--accel", help="acceleration (`varbench list`): fastvar, skipvar, stagevar, litevar (VAR); "
                   "sjd, lantern, zipar (LlamaGen)")
    p.add_argument("--accel-args", help='JSON object of the acceleration\'s arguments, e.g. \'{"window": 8}\'')
    p.add_argument("--out", help="folder for the speed record(s), printable by `varbench table` "
                   "(default: runs/bench-<time>)")
    p.set_defaults(fn=_cmd_bench)
