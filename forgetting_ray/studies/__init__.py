"""Research studies that run the product's stages; none of the product's own modules imports this package.

The controlled label-noise check needs no benchmark.  Corrupt the responses of a seeded fraction of the
training records (``corruption.corrupt_records``), run the real prepare -> reference -> score -> partition
stages on them (``experiments.run_noise_recovery``, through ``pipeline.run_pipeline``), and ask two questions
of the output (``metrics.recovery_report``):

* does the score rank corrupted tokens below clean ones?  ``auroc`` = P(score of a clean token >
  score of a corrupted token), ties counted one half: 0.5 is chance, 1.0 a perfect separation, and a
  sign-flipped score gives ``1 - auroc``;
* does the negative class (the bottom ``1 - rho`` of the scores) hold the corrupted tokens?
  ``negative_set_quality`` = precision and recall of that set against the corrupted tokens, next to
  what a random split would get (precision = the corrupted share, recall = the negative share).

The positive controls (``experiments.run_positive_controls``) plant what the reference learned and what it
never saw.  ``token_view`` joins the stage outputs into one flat view of the response tokens; ``tables``
renders the results as Markdown tables from a run's raw record (what bench/bench_noise_recovery.py prints and
BENCHMARKS.md quotes).
"""
