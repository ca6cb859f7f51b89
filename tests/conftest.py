import os
import sys

# Tests import their reference helpers (hf_reference.py, ...) as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
