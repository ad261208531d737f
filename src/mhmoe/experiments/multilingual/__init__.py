"""`mhmoe reproduce multilingual`: the comparison on language-tagged text, per-language evaluation, language × expert
usage, and the sub-token divergence of false cognates (`experiment`, `words`, `wordlists`)."""

from mhmoe.experiments.multilingual.experiment import dry_run, plan, retabulate, run, table

__all__ = ["dry_run", "plan", "retabulate", "run", "table"]
