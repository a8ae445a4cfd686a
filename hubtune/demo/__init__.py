"""The demo: the whole workflow on scikit-learn's digits (`hubtune demo`, `hubtune demo`)."""
