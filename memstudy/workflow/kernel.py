"""The Jupyter kernel of workflow jobs: ipykernel, without an import that only costs start-up time.

Each notebook job starts two Python processes, the job (papermill) and its kernel, and both import
nbformat (papermill does; so does plotly.io, to check its version), hence jsonschema. When
``rfc3987_syntax`` is installed (JupyterLab's jupyter-events brings it), jsonschema imports it, and it
compiles a grammar at import: about a second per process, for URI format checks that nothing here runs.
:func:`skip_uri_grammar` marks it absent, and jsonschema goes without those checks.
"""

from __future__ import annotations

import sys


def skip_uri_grammar() -> None:
    """Make ``import rfc3987_syntax`` fail in this process (unless it is already imported)."""
    sys.modules.setdefault("rfc3987_syntax", None)


def main() -> None:
    """``python -m memstudy.workflow.kernel -f CONNECTION_FILE [ipykernel options]``."""
    skip_uri_grammar()
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
