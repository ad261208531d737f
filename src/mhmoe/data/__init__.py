"""Data pipeline: text corpora -> token arrays on disk -> (inputs, targets) batches.

    corpus = load_corpus(path)                      # or load_corpus(default_corpus(data_cache_dir()))
    tokenizer = load_tokenizer("byte")              # or BPETokenizer.train(corpus.train, 8192)
    tokens = tokenize_corpus(corpus, tokenizer, data_cache_dir())
    sampler = BatchSampler(tokens["train"], batch_size=8, seq_len=256, seed=0)
    x_BL, y_BL = sampler.next_batch()

Optional packages (`tokenizers` for BPE, `tqdm` for progress bars) are imported only when used.
"""

from mhmoe.data.corpus import Corpus, data_cache_dir, default_corpus, default_ood_text, load_corpus, load_documents
from mhmoe.data.dataset import BatchSampler, eval_batch_count, eval_batches, tokenize_corpus
from mhmoe.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BPETokenizer",
    "BatchSampler",
    "ByteTokenizer",
    "Corpus",
    "Tokenizer",
    "data_cache_dir",
    "default_corpus",
    "default_ood_text",
    "eval_batch_count",
    "eval_batches",
    "load_corpus",
    "load_documents",
    "load_tokenizer",
    "tokenize_corpus",
]
