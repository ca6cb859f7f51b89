"""Helpers the tests share: reference implementations (transformers, Mistral's format) and worker scripts."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def memory_mappings() -> int:
    """This process's memory mappings (Linux caps them at `vm.max_map_count`)."""
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)
