"""Griffe extension for the API reference: the docstrings use Sphinx roles (``:func:`generate```,
``:class:`~prefixlens.KVPrefix```), which Markdown would show verbatim; render them as code."""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`~?([^`]+)`")


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
