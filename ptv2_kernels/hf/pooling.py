"""What a sentence or multiple-choice head reads; a module of its own so that the ``ptv2`` command line
checks ``--pooling`` without loading torch."""

POOLINGS = ("auto", "mean")  # sequence heads: the authors' rule, or the mean of the real tokens
