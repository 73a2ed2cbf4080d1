"""``fkd-demo``: the whole flow on scikit-learn's bundled 8x8 digits, on a laptop CPU."""
