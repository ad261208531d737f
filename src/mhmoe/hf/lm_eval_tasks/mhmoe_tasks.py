"""The datasets of mhmoe's lm-evaluation-harness tasks, built from text shipped in the package (`mhmoe.hf.harness`
holds the builders; this file is what the tasks' YAML names with `!function`)."""

from mhmoe.hf.harness import perplexity_results, udhr_en_cloze, udhr_en_document

__all__ = ["perplexity_results", "udhr_en_cloze", "udhr_en_document"]
