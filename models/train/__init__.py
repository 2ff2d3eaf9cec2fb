"""Training-data tools for the reference models (lung labels by a classical method)."""
