"""The Ray glue every stage shares, one module per concern.

``session`` starts or joins Ray with the workers' environment; ``capacity`` refuses (or bounds the wait for)
demands the alive nodes cannot hold; ``relay`` carries each training step's metrics to the driver as they
come; ``logs`` copies the workers' logs into the run folder; ``devices`` reads the GPUs' memory on every
node; ``run_dir`` checks that every node reaches the run folder; ``internals`` is the one reach into Ray's
private APIs.  None of them imports Ray at module top: light CLI commands import some of them.
"""
