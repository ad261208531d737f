"""`mhmoe reproduce multimodal`: masked multimodal modelling (BEiT-3 style) with a multiway Transformer: its data
(`data`), configuration (`config`), the masked task of the one training loop (`task`), routing analyses (`analysis`)
and the comparison (`experiment`)."""

from mhmoe.experiments.multimodal.experiment import dry_run, plan, retabulate, run, table

__all__ = ["dry_run", "plan", "retabulate", "run", "table"]
