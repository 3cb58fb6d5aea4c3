"""Data preparation speed on the default corpus: cold (tokenizer training + encoding) and warm (cache hit).

Reference measured in the same run: reading the same corpus from disk (what any run pays).
    .venv/bin/python bench/bench_data.py [--vocab 4096] [--max-mb 8]
"""

import argparse
import tempfile
import time
from pathlib import Path

from supercluster.data import BatchSampler
from supercluster.data.corpus import load_corpus
from supercluster.data.prepare import DEFAULT_STDLIB_MB, prepare_data


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--max-mb", type=float, default=DEFAULT_STDLIB_MB)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        corpus, read_s = timed(lambda: load_corpus(None, args.max_mb))
        bundle, cold_s = timed(lambda: prepare_data(None, args.vocab, Path(cache), max_mb=args.max_mb))
        _, warm_s = timed(lambda: prepare_data(None, args.vocab, Path(cache), max_mb=args.max_mb))
        sampler = BatchSampler(bundle.train, seq_len=256, batch_size=32)
        sampler.next()  # pays torch's import
        _, sample_s = timed(lambda: [sampler.next() for _ in range(100)])
    print(f"corpus: {bundle.source}; {bundle.n_tokens:,} tokens at vocab {args.vocab} ({corpus.n_bytes / bundle.n_tokens:.2f} bytes/token)")
    print(f"read corpus (reference): {read_s:6.2f} s")
    print(f"cold prepare:            {cold_s:6.2f} s  ({cold_s / read_s:.1f}x read)")
    print(f"warm prepare:            {warm_s:6.2f} s  ({warm_s / read_s:.2f}x read)")
    print(f"sampler: {100 * 32 * 256 / sample_s / 1e6:.1f} M tokens/s (batches of 32 x 256)")


if __name__ == "__main__":
    main()
