"""``hicache bench multiturn``'s command line: the workload (shared with ``bench pd``), the configurations and
what each run reports."""

from __future__ import annotations

import argparse

from hicache_core.bench.options import add_output_arguments, int_option
from hicache_core.config import add_hicache_args
from hicache_core.parse import add_kv_cache_dtype, arg_float

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
    int_option(w, "--num-clients", 1, 100000, 8, "concurrent conversations")
    int_option(w, "--num-rounds", 1, 100000, 4, "turns per conversation; each sends the whole history so far")
    int_option(w, "--request-length", 1, 1 << 20, 512, "tokens of each client's first prompt")
    int_option(w, "--question-length", 1, 1 << 20, 64, "new user tokens appended in each later round")
    int_option(w, "--output-length", 1, 1 << 20, output_length, "tokens generated per reply, greedy")
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
    int_option(w, "--seed", 0, None, 0, "seeds prompts, order and model weights")
    w.add_argument(
        "--all-miss",
        action="store_true",
        help="every request a prompt never seen before, of the length its turn would have: nothing can hit, so "
        "each configuration's TTFT against no cache is what the cache costs when it misses",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p)
    add_engine_arguments(p)
    o = add_output_arguments(
        p,
        report="report.json and report.png go",
        progress="no progress bar or progress lines on stderr",
        repeat="fresh storage each time",
        storage_dir="file backend directory",
        base_url="drive running servers (SGLang's /generate, e.g. hicache serve)",
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
    int_option(
        e, "--sliding-window", 1, 1 << 20, 128, "tokens each windowed layer attends to, for --model-kind swa and hybrid"
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
    int_option(
        e, "--device-tokens", 1, 1 << 30, 1024, "device KV pool in tokens, deliberately smaller than the working set"
    )
    int_option(e, "--max-running", 1, 100000, 4, "requests in one batch")
    int_option(
        e,
        "--tp --tp-size",
        1,
        64,
        1,
        "tensor-parallel rank processes (gloo on CPU; heads and KV sharded)",
        dest="tp_size",
    )
    from hicache_core.engine.model_config import SHAPE_FLAGS

    for flag, field, what in SHAPE_FLAGS:
        int_option(e, flag, 1, 1 << 16, BENCH_SHAPE[field], what)
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
