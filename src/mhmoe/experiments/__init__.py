"""The papers' experiments, beside the library: `mhmoe reproduce english|multilingual|multimodal`.

Each experiment module exposes `run(out, quick=, gpu=, seeds=, data=, overrides=, progress=, ...) -> results` and
`table(results) -> str`; what they share (the five models, the models × seeds driver, aggregation over seeds,
curves, results files) is `common`. The library (layers, models, train, data, analysis) never imports this package.
"""
