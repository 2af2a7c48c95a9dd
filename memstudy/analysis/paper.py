"""The paper's three findings, set against what a comparison table measured.

Akbar, Wang & Eklund (2025) found that diffusion models memorize more than GANs, that small training
sets are memorized more, and that slices of 3D volumes (BraTS) are memorized more than independent
images (chest x-rays). :func:`paper_claims` says for each whether a plan's runs agree, differ, are
mixed or do not tell, with the numbers behind the verdict, so the book can state where this build
departs from the paper instead of assuming it does not.
"""

from __future__ import annotations

import pandas as pd

from memstudy.data.datasets import SLICED_VOLUMES

#: The paper's findings, in the order :func:`paper_claims` returns them.
CLAIMS = {
    "models": "Diffusion models (DDPM) copy more training images than GANs (StyleGAN).",
    "sizes": "Smaller training sets are copied more.",
    "volumes": "Slices of 3D volumes (BraTS) are copied more than independent images (chest x-rays).",
}
_MODEL_NAMES = {"ddpm": "DDPM", "stylegan": "StyleGAN2"}


def last_checkpoints(table: pd.DataFrame) -> pd.DataFrame:
    """Mean likely-copy fraction per model, dataset and training-set size, each run at its last step.

    Means are over seeds and channels; a run's last step is the largest ``step`` among its rows
    (``run_dir`` names the run; without that column, model × dataset × size × seed does).
    """
    run = ["run_dir"] if "run_dir" in table else ["model", "dataset", "n_train_subjects", "seed"]
    last = table[table["step"] == table.groupby(run)["step"].transform("max")]
    return last.groupby(["model", "dataset", "n_train_subjects"], as_index=False)["frac_likely_copies"].mean()


def _verdict(differences: list[float]) -> str:
    """``agrees`` when every pair goes the paper's way, ``differs`` when every pair goes the other way,
    ``mixed`` otherwise; ``no difference`` when every pair is equal and ``not measured`` without pairs."""
    if not differences:
        return "not measured"
    if all(d == 0 for d in differences):
        return "no difference"
    if all(d >= 0 for d in differences):
        return "agrees"
    if all(d <= 0 for d in differences):
        return "differs"
    return "mixed"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.0f} %"


def _subjects(n: int) -> str:
    return f"{n} subject" + ("" if n == 1 else "s")


def paper_claims(table: pd.DataFrame) -> pd.DataFrame:
    """Compare a comparison table with the paper's three findings.

    Parameters
    ----------
    table : pandas.DataFrame
        A comparison table (:func:`memstudy.analysis.comparison_table`): at least ``model``, ``dataset``,
        ``n_train_subjects``, ``seed``, ``step`` and ``frac_likely_copies``.

    Returns
    -------
    pandas.DataFrame
        One row per finding (index ``models``, ``sizes``, ``volumes``) with the columns ``claim`` (the
        paper's finding), ``measured`` (the likely-copy fractions behind the verdict, each run at its
        last checkpoint) and ``verdict``: ``agrees`` or ``differs`` (every compared pair goes the
        paper's way, or the other way), ``mixed``, ``no difference`` (every pair equal, e.g. no copies
        anywhere) or ``not measured`` (the plan has no pair to compare). Pairs are compared as measured:
        a difference of one sample counts.

    Notes
    -----
    ``models``: DDPM against StyleGAN2 on the same dataset and training-set size. ``sizes``: the smallest
    against the largest training set of each model and dataset. ``volumes``: for each model, the mean
    fraction over its runs on slices of volumes (:data:`memstudy.data.datasets.SLICED_VOLUMES`) against
    that over its runs on independent images; the training sets are not matched in size or number of
    images, so this verdict is the weakest of the three.
    """
    last = last_checkpoints(table)
    rows = {}

    pairs, said = [], []
    by_set = last.pivot_table(
        index=["dataset", "n_train_subjects"], columns="model", values="frac_likely_copies"
    )
    if {"ddpm", "stylegan"} <= set(by_set.columns):
        for (dataset, size), row in by_set.dropna(subset=["ddpm", "stylegan"]).iterrows():
            pairs.append(row["ddpm"] - row["stylegan"])
            said.append(
                f"{dataset}, {_subjects(size)}: DDPM {_pct(row['ddpm'])}, StyleGAN2 {_pct(row['stylegan'])}"
            )
    rows["models"] = (said, _verdict(pairs))

    pairs, said = [], []
    for (model, dataset), sizes in last.groupby(["model", "dataset"], sort=True):
        if sizes["n_train_subjects"].nunique() < 2:
            continue
        sizes = sizes.sort_values("n_train_subjects")
        small, large = sizes.iloc[0], sizes.iloc[-1]
        pairs.append(small["frac_likely_copies"] - large["frac_likely_copies"])
        said.append(
            f"{_MODEL_NAMES.get(model, model)} on {dataset}: {_pct(small['frac_likely_copies'])} with "
            f"{_subjects(small['n_train_subjects'])}, {_pct(large['frac_likely_copies'])} with "
            f"{large['n_train_subjects']}"
        )
    rows["sizes"] = (said, _verdict(pairs))

    pairs, said = [], []
    last["volumes"] = last["dataset"].isin(SLICED_VOLUMES)
    for model, runs in last.groupby("model", sort=True):
        if runs["volumes"].nunique() < 2:
            continue
        volumes = runs.loc[runs["volumes"], "frac_likely_copies"].mean()
        independent = runs.loc[~runs["volumes"], "frac_likely_copies"].mean()
        pairs.append(volumes - independent)
        said.append(
            f"{_MODEL_NAMES.get(model, model)}: {_pct(volumes)} on slices of volumes, "
            f"{_pct(independent)} on independent images (mean over sizes)"
        )
    rows["volumes"] = (said, _verdict(pairs))

    return pd.DataFrame(
        {
            "claim": [CLAIMS[name] for name in rows],
            "measured": ["; ".join(said) or "no pair to compare in this plan" for said, _ in rows.values()],
            "verdict": [verdict for _, verdict in rows.values()],
        },
        index=pd.Index(list(rows), name="finding"),
    )
