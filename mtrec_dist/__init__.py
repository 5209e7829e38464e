"""mtrec_dist: distributed multi-task BERT news recommendation (MTRec and relatives)."""

__version__ = "0.1.0"
