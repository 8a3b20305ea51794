"""Report surfaces: plots (and, later, the HTML audit) built from stage outputs."""
