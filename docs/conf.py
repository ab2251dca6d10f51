"""Sphinx configuration: MyST Markdown pages, the API reference from docstrings, built with warnings as errors."""

from __future__ import annotations

import importlib.metadata

project = "gridboost"
author = "gridboost team"
copyright = "2026, gridboost team"
release = importlib.metadata.version("gridboost")

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Code fences carry flags for tests/test_docs.py (```python skip): the language is the first word.
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
# Pages link to files outside docs/ (the plugins' READMEs, benchmarks/README.md): those are for GitHub readers.
suppress_warnings = ["myst.xref_missing"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "furo"
html_title = f"gridboost {release}"
