"""Corpora -> tokenizer -> token shards (uint16 memmaps) -> deterministic, rank-aware batches.

    bundle = prepare_data(None, vocab_size=4096)            # the stdlib corpus, cached
    sampler = BatchSampler(bundle.train, seq_len, global_batch, dp_rank, dp_size, seed)
    x, y = sampler.next()                                   # this rank's slice of the step
    tok = load_tokenizer(bundle.tokenizer_path)
"""

from supercluster.data.prepare import DataBundle, prepare_data
from supercluster.data.sampler import BatchSampler, eval_batches
from supercluster.data.tokenizer import load_tokenizer

__all__ = ["DataBundle", "prepare_data", "BatchSampler", "eval_batches", "load_tokenizer"]
