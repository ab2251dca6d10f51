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
# No page links outside docs/ (tests/test_docs.py checks): what the plugins' READMEs and benchmarks/README.md say is
# included into pages here, so a dead link fails the build (-W) instead of leaving the site with one.

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "furo"
html_title = f"gridboost {release}"
