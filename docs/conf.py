"""Sphinx configuration for the patchaug documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
# docs/scripts holds the results-include directive (benchmark results shown from their files)
sys.path.insert(0, os.path.abspath("scripts"))

project = "patchaug"
author = "patchaug developers"
copyright = "2026, patchaug developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "results_include",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_mock_imports = []
napoleon_numpy_docstring = True
napoleon_google_docstring = False
nitpicky = False
html_theme = "furo"
html_static_path = ["_static"]
html_title = "patchaug"
exclude_patterns = ["_build", "scripts"]
suppress_warnings = ["config.cache"]
