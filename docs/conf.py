"""Sphinx configuration: MyST Markdown pages, as metatrain, ASE and Optuna build their docs.

Build: `python -m sphinx -W -b html docs docs/_build/html` (the `docs` extra installs the tools).
The configuration reference is generated from the schema at every build (_ext/config_reference.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "pet-lora-sweeper"
author = "the pet-lora-sweeper developers"
extensions = ["myst_parser", "config_reference"]
source_suffix = {".md": "markdown"}
myst_heading_anchors = 3  # the README's `[Development](#development)` links resolve
exclude_patterns = ["_build", "_ext"]
html_theme = "alabaster"
html_static_path: list[str] = []
