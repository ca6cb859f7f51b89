"""Planning: compiling the model ahead of time for TPU slices and reading XLA's memory figures."""
