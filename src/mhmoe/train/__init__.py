"""Training: the run configuration, one loop over a task (`loop`), the causal LM task (`lm`), where a run executes
(`session`: one process or a torchrun rank), checkpoints (`checkpoint`, `dcp`) and metrics. Parallelism itself is
`mhmoe.parallel`; the layers and models know nothing of this package."""
