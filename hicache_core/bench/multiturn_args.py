"""``hicache bench multiturn``'s command line: the workload (shared with ``bench pd``), the configurations and
what each run reports."""

from __future__ import annotations

import argparse

from hicache_core.config import add_hicache_args
from hicache_core.parse import add_kv_cache_dtype, arg_float, arg_int

CONFIGS = ("none", "radix", "hicache", "hicache+storage")
LABELS = {
    "none": "no cache",
    "radix": "device-only radix",
    "hicache": "HiCache L1+L2",
    "hicache+storage": "HiCache L1+L2+L3",
}

# the benchmark's random model (serve's default random model is ModelConfig's, smaller; scripts/bench-http.sh passes
# these to its servers so that HTTP runs the same workload)
BENCH_SHAPE = dict(
    hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, vocab_size=4096
)


def add_workload_arguments(p: argparse.ArgumentParser, output_length: int = 16) -> None:
    w = p.add_argument_group("workload (every configuration replays the same conversations)")
    w.add_argument(
        "--num-clients", type=arg_int(1, 100000), default=8, help="concurrent conversations (default %(default)s)"
    )
    w.add_argument(
        "--num-rounds",
        type=arg_int(1, 100000),
        default=4,
        help="turns per conversation; each sends the whole history so far (default %(default)s)",
    )
    w.add_argument(
        "--request-length",
        type=arg_int(1, 1 << 20),
        default=512,
        help="tokens of each client's first prompt (default %(default)s)",
    )
    w.add_argument(
        "--question-length",
        type=arg_int(1, 1 << 20),
        default=64,
        help="new user tokens appended in each later round (default %(default)s)",
    )
    w.add_argument(
        "--output-length",
        type=arg_int(1, 1 << 20),
        default=output_length,
        help="tokens generated per reply, greedy (default %(default)s)",
    )
    w.add_argument(
        "--request-rate",
        type=arg_float(0, above=True, allow_inf=True),
        default=4.0,
        help="arrivals per second within a round (default %(default)s)",
    )
    w.add_argument(
        "--distribution",
        choices=("uniform", "poisson"),
        default="uniform",
        help="gaps between arrivals: fixed 1/rate, or exponential (default %(default)s)",
    )
    w.add_argument(
        "--ready-queue-policy",
        choices=("random", "fifo"),
        default="random",
        help="order in which clients send within a round (default %(default)s)",
    )
    w.add_argument(
        "--seed", type=arg_int(0), default=0, help="seeds prompts, order and model weights (default %(default)s)"
    )
    w.add_argument(
        "--all-miss",
        action="store_true",
        help="every request a prompt never seen before, of the length its turn would have: nothing can hit, so "
        "each configuration's TTFT against no cache is what the cache costs when it misses",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p)
    add_engine_arguments(p)
    o = p.add_argument_group("output")
    o.add_argument(
        "--repeat",
        type=arg_int(1, 100),
        default=1,
        help="run everything N times (fresh storage each time) and report the spread (default %(default)s)",
    )
    o.add_argument(
        "--storage-dir", default=None, help="file backend directory (default: a temp dir, removed after the run)"
    )
    o.add_argument(
        "--warm",
        dest="warm",
        action="store_true",
        default=True,
        help="replay round 1 in a second process on the first one's storage (default)",
    )
    o.add_argument("--no-warm", dest="warm", action="store_false", help="skip the warm-restart replay")
    o.add_argument(
        "--keep-page-cache",
        action="store_true",
        help="let the warm restart read the store's files from the OS page cache (default: dropped first, with "
        "posix_fadvise DONTNEED, so its reads come from the disk as after a machine restart)",
    )
    o.add_argument(
        "--report-dir", default="hicache-report", help="where report.json and report.png go (default %(default)s)"
    )
    o.add_argument("--json", action="store_true", help="print the JSON report instead of tables")
    o.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines on stderr")
    o.add_argument(
        "--base-url",
        action="append",
        default=None,
        metavar="[LABEL=]URL",
        help="drive running servers (SGLang's /generate, e.g. hicache serve) instead of the in-process "
        "engine; repeat to compare them, the first is the reference",
    )
    o.add_argument("--warm-child", action="store_true", help=argparse.SUPPRESS)
    o.add_argument("--child-out", default=None, help=argparse.SUPPRESS)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The reference engine, its model and its cache (shared by ``bench multiturn`` and ``bench trace``)."""
    e = p.add_argument_group("engine (the reference engine and its tiny random llama, or --model-path)")
    e.add_argument(
        "--model-path",
        default=None,
        metavar="DIR|FILE.gguf",
        help="a real llama checkpoint (Hugging Face directory or GGUF file) instead of the random model: "
        "prompts are English text cut by its tokenizer, the report shows its replies; the random "
        "model's shape flags are then ignored",
    )
    e.add_argument(
        "--model-kind",
        default="llama",
        metavar="K[,K...]",
        help="the random model's attention: llama (every layer full), swa (every layer a sliding window, as "
        "Mistral), hybrid (odd layers windowed, even full, as gpt-oss), mla (DeepSeek-V2's latent attention: one "
        "128+32-wide latent per token and layer), mamba (Mamba-2 mixers on even layers, as Bamba, their state "
        "kept in the page); several, comma separated, run the whole "
        "benchmark once per kind and compare their gains (default %(default)s)",
    )
    e.add_argument(
        "--sliding-window",
        type=arg_int(1, 1 << 20),
        default=128,
        help="tokens each windowed layer attends to, for --model-kind swa and hybrid (default %(default)s)",
    )
    e.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="KV dtype with --model-path (default: the checkpoint's)",
    )
    add_kv_cache_dtype(e)
    e.add_argument(
        "--compute-dtype",
        default="float64",
        choices=("float64", "float32"),
        help="the model's weights and activations: float64 (default) gives tokens that do not depend on what was "
        "cached, so every configuration must equal the reference; float32 is about twice as fast and its tokens "
        "may differ in near ties: the report then counts the requests that agree instead",
    )
    e.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="configurations to run, comma separated; 'none' always runs as the reference (default %(default)s)",
    )
    e.add_argument(
        "--prefetch-policies",
        default=None,
        metavar="P,P,...",
        help="run hicache+storage once per storage prefetch policy (e.g. best_effort,wait_complete,"
        "cost_aware), each on a store of its own",
    )
    e.add_argument(
        "--storage-admissions",
        default=None,
        metavar="A,A,...",
        help="also run hicache+storage under each of these --hicache-storage-admission values (all, seen_twice), "
        "each on a store of its own; the report compares bytes written to L3 per storage-hit token",
    )
    e.add_argument(
        "--storage-codecs",
        default=None,
        metavar="C,C,...",
        help='also run hicache+storage under each of these L3 codecs (none, zstd, fp8: "codec" in the extra config), '
        "each on a store of its own; the report compares bytes written to L3 per storage-hit token and the gains",
    )
    e.add_argument(
        "--device-tokens",
        type=arg_int(1, 1 << 30),
        default=1024,
        help="device KV pool in tokens, deliberately smaller than the working set (default %(default)s)",
    )
    e.add_argument(
        "--max-running", type=arg_int(1, 100000), default=4, help="requests in one batch (default %(default)s)"
    )
    e.add_argument(
        "--tp",
        "--tp-size",
        dest="tp_size",
        type=arg_int(1, 64),
        default=1,
        help="tensor-parallel rank processes (gloo on CPU; heads and KV sharded; default %(default)s)",
    )
    from hicache_core.engine.model_config import SHAPE_FLAGS

    for flag, field, what in SHAPE_FLAGS:
        e.add_argument(flag, type=arg_int(1, 1 << 16), default=BENCH_SHAPE[field], help=f"{what} (default %(default)s)")
    add_hicache_args(p)
    # the demo's own defaults (help above shows these, not the library's)
    p.set_defaults(
        page_size=32,
        hicache_ratio=3.0,
        hicache_io_backend="direct",
        hicache_storage_backend="file",
        hicache_storage_prefetch_policy="wait_complete",
    )


# --- workload -----------------------------------------------------------------------------------------------------
