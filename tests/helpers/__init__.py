"""Helpers the tests share: reference implementations (transformers, Mistral's format) and worker scripts."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
