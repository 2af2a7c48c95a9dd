"""The study as a workflow: a plan (YAML) expanded into notebook jobs run by a packaged Snakefile.

``plan``: plans, runs and jobs; ``stamps``: code stamps that rerun a step when its code changes;
``execute``: one notebook through papermill on a kernel of this interpreter; ``runfolder``: the run
folder's files; ``command``: ``memstudy study`` and ``memstudy run``. ``Snakefile`` and ``profiles/``
ship with the package.
"""
