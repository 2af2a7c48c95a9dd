"""Execute one step notebook with papermill, as a job of the workflow or by hand (``memstudy run``).

The notebook runs on a Jupyter kernel that starts the interpreter running this code, so a plain
``pip install`` works without ``ipykernel install``. An executed notebook appears at its target only
when every cell ran; a failing one is kept as ``<target>.failed.ipynb`` (its error cell says what went
wrong) and the target is left as it was. Each job runs in its own process with the thread count it
was given, so parallel jobs do not oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from memstudy.atomic import atomic_path, write_json
from memstudy.workflow.kernel import skip_uri_grammar

log = logging.getLogger(__name__)

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


class NotebookFailed(RuntimeError):
    """A notebook stopped at an error; the message names the error and the partial notebook."""


def failed_path(output: str | os.PathLike) -> Path:
    """Where the partial notebook of a failed execution of ``output`` is kept."""
    output = Path(output)
    return output.with_name(output.stem + ".failed.ipynb")


def template_path(name: str | os.PathLike) -> Path:
    """A step notebook by file name or stem (``02_train``), or any notebook by path."""
    path = Path(name)
    if path.suffix == ".ipynb" and path.is_file():
        return path
    packaged = NOTEBOOKS_DIR / (path.name if path.suffix == ".ipynb" else f"{path.name}.ipynb")
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb")))
    raise FileNotFoundError(f"{name}: no such notebook (the step notebooks are {known})")


def kernel_name() -> str:
    """Register (once) a Jupyter kernel that runs ``sys.executable``, and return its name.

    The kernel is ipykernel started through :mod:`memstudy.workflow.kernel`.

    The kernelspec lives in a private folder put first on ``JUPYTER_PATH`` for this process and its
    children; nothing is installed into the user's or the environment's Jupyter folders.
    """
    from memstudy.data.cache import cache_dir

    name = "memstudy-" + hashlib.sha256(sys.executable.encode()).hexdigest()[:12]
    root = cache_dir() / "jupyter"
    spec = root / "kernels" / name / "kernel.json"
    content = {
        # The kernel's own start-up warnings (TCP transport on loopback) would fill every job's log.
        "argv": [
            sys.executable,
            "-m",
            "memstudy.workflow.kernel",
            "-f",
            "{connection_file}",
            "--IPKernelApp.log_level=ERROR",
        ],
        "display_name": f"memstudy ({sys.executable})",
        "language": "python",
    }
    if not spec.is_file() or json.loads(spec.read_text()) != content:
        spec.parent.mkdir(parents=True, exist_ok=True)
        write_json(spec, content)
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if str(root) not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root), *filter(None, paths)])
    return name


def log_path(plan_dir: str | os.PathLike, notebook: str | os.PathLike) -> Path:
    """Where the workflow writes the stderr of the job executing ``notebook`` (relative to the plan's
    folder ``plan_dir``): ``logs/<notebook>.log`` there, as the Snakefile's ``log:`` entries say."""
    return Path(plan_dir) / "logs" / Path(notebook).with_suffix(".log")


def last_log_error(log: str | os.PathLike) -> str | None:
    """The last line of a job's log that names an error (``Name: message``, as a traceback ends), if any."""
    try:
        lines = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    errors = [line.strip() for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", line.strip())]
    return errors[-1] if errors else None


def last_error(notebook: str | os.PathLike) -> str | None:
    """``"Name: message"`` of the first error output in an executed notebook, if any."""
    import nbformat

    try:
        nb = nbformat.read(notebook, as_version=4)
    except (OSError, ValueError):
        return None
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"{output.get('ename', 'Error')}: {output.get('evalue', '')}".strip()
    return None


def run_notebook(
    template: str | os.PathLike,
    output: str | os.PathLike,
    parameters: dict[str, Any],
    *,
    cwd: str | os.PathLike = ".",
    threads: int | None = None,
) -> Path:
    """Execute ``template`` with ``parameters`` into ``output`` (in this process).

    Parameters
    ----------
    template : path or step name
        The notebook to run (see :func:`template_path`).
    output : path
        The executed notebook; written atomically once every cell has run.
    parameters : dict
        Values for the notebook's ``parameters`` cell (papermill injects them after it).
    cwd : path
        The kernel's working folder: relative paths in the parameters are relative to it.
    threads : int, optional
        Threads for BLAS and torch in the kernel (set through the environment it inherits).

    Raises
    ------
    NotebookFailed
        A cell raised; the partial notebook is at :func:`failed_path`.
    """
    import papermill

    template = template_path(template)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        os.environ.update({variable: str(threads) for variable in THREAD_VARIABLES})
    failed = failed_path(output)
    with atomic_path(output) as partial:
        for attempt in (1, 2):
            try:
                papermill.execute_notebook(
                    str(template),
                    str(partial),
                    parameters=parameters,
                    kernel_name=kernel_name(),
                    language="python",
                    cwd=str(cwd),
                    progress_bar=False,
                    request_save_on_cell_execute=False,
                )
                break
            except papermill.PapermillExecutionError as error:
                os.replace(partial, failed)
                raise NotebookFailed(
                    f"{output}: {error.ename}: {error.evalue} (partial notebook: {failed})"
                ) from None
            except Exception as error:
                # A kernel that dies before running any cell (two kernels starting at once can draw
                # the same free port) is retried once; anything else, or a second failure, propagates.
                if attempt == 2 or _ran_a_cell(partial):
                    raise
                log.warning(
                    "%s: the kernel failed before running a cell (%r); starting another", output, error
                )
    failed.unlink(missing_ok=True)
    return output


def _ran_a_cell(notebook: Path) -> bool:
    """Whether a partial notebook papermill left has any executed cell (absent or unreadable: no)."""
    import nbformat

    try:
        cells = nbformat.read(notebook, as_version=4).cells
    except (OSError, ValueError):
        return False
    return any(cell.get("execution_count") for cell in cells if cell.cell_type == "code")


def command_line(
    template: str, output: str | os.PathLike, parameters: dict[str, Any], threads: int | None = None
) -> str:
    """The shell command that runs :func:`run_notebook` in its own process (a workflow job's command).

    Parameters travel as JSON on the command line, so the command alone says what ran.
    """
    words = [sys.executable, "-m", "memstudy.workflow.execute", template, str(output), json.dumps(parameters)]
    words += ["--threads", str(threads)] if threads else []
    return shlex.join(words)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memstudy.workflow.execute")
    parser.add_argument("template")
    parser.add_argument("output")
    parser.add_argument("parameters", help="the notebook's parameters as a JSON object")
    parser.add_argument("--cwd", default=".")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    skip_uri_grammar()  # a second of start-up per job (memstudy.workflow.kernel says why)
    # Ctrl-C or Snakemake's termination ends the job at once. The kernel runs in a session of its own,
    # out of reach of both signals, and exits within a second of this process (ipykernel polls its
    # parent). Left to KeyboardInterrupt, papermill could keep waiting while the kernel went on and
    # wrote its results after the workflow had given the job up.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, lambda signum, frame: os._exit(128 + signum))
    logging.basicConfig(level=logging.WARNING)
    parameters = json.loads(args.parameters)
    try:
        run_notebook(args.template, args.output, parameters, cwd=args.cwd, threads=args.threads)
    except NotebookFailed as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
