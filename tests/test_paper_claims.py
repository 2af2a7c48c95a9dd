"""The paper's three findings against comparison tables built here with known likely-copy fractions."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from memstudy.analysis import paper_claims


def table(
    fractions: dict[tuple[str, str, int], float], *, early: float | None = None, seeds=(0,)
) -> pd.DataFrame:
    """Rows for model × dataset × size runs with ``fractions`` at their last step (200); ``early``, when
    given, is every run's fraction at step 100, which the findings must ignore."""
    rows = []
    for (model, dataset, size), fraction in fractions.items():
        for seed in seeds:
            run_dir = f"{dataset}/{model}/n{size}-s{seed}"
            steps = [(100, early), (200, fraction)] if early is not None else [(200, fraction)]
            for step, value in steps:
                rows.append(
                    {
                        "model": model,
                        "dataset": dataset,
                        "n_train_subjects": size,
                        "seed": seed,
                        "step": step,
                        "frac_likely_copies": value,
                        "run_dir": run_dir,
                    }
                )
    return pd.DataFrame(rows)


def the_paper_s_way() -> dict[tuple[str, str, int], float]:
    """DDPM above StyleGAN2, small sets above large, brain slices above x-rays: every finding holds."""
    fractions = {}
    for model, dataset, size in itertools.product(
        ("ddpm", "stylegan"), ("brain-phantom", "cxr-phantom"), (1, 4)
    ):
        fractions[model, dataset, size] = (
            0.1 * (model == "ddpm") + 0.05 * (size == 1) + 0.02 * (dataset == "brain-phantom") + 0.01
        )
    return fractions


def test_every_finding_agrees_when_the_runs_go_the_paper_s_way():
    claims = paper_claims(table(the_paper_s_way(), early=0.9))  # step 100 is ignored
    assert claims["verdict"].to_dict() == {"models": "agrees", "sizes": "agrees", "volumes": "agrees"}
    assert "brain-phantom, 1 subject: DDPM 18 %, StyleGAN2 8 %" in claims.loc["models", "measured"]
    assert "DDPM on cxr-phantom: 16 % with 1 subject, 11 % with 4" in claims.loc["sizes", "measured"]


def test_every_finding_differs_when_the_runs_go_the_other_way():
    reversed_fractions = {key: 1 - value for key, value in the_paper_s_way().items()}
    claims = paper_claims(table(reversed_fractions))
    assert set(claims["verdict"]) == {"differs"}


def test_no_copies_anywhere_is_no_difference_and_a_missing_pair_is_not_measured():
    none = {key: 0.0 for key in the_paper_s_way()}
    assert set(paper_claims(table(none))["verdict"]) == {"no difference"}
    one_model_one_size = {("ddpm", "cxr-phantom", 16): 0.5}
    claims = paper_claims(table(one_model_one_size))
    assert set(claims["verdict"]) == {"not measured"}
    assert set(claims["measured"]) == {"no pair to compare in this plan"}


def test_pairs_going_both_ways_are_mixed_and_seeds_are_averaged():
    fractions = the_paper_s_way()
    fractions["ddpm", "cxr-phantom", 4] = 0.0  # below StyleGAN2's 0.01 on the same set
    claims = paper_claims(table(fractions, seeds=(0, 1)))
    assert claims.loc["models", "verdict"] == "mixed"
    rows = table(fractions, seeds=(0, 1))
    rows.loc[(rows["seed"] == 1) & (rows["model"] == "ddpm"), "frac_likely_copies"] = 1.0
    # Seed 1 of every DDPM run copies everything: the means put DDPM above StyleGAN2 on every set.
    assert paper_claims(rows).loc["models", "verdict"] == "agrees"


@pytest.mark.parametrize("dataset", ["brats20", "brats21", "brain-phantom"])
def test_slices_of_volumes_are_told_from_independent_images_by_dataset(dataset):
    fractions = {("ddpm", dataset, 4): 0.2, ("ddpm", "chestxray", 4): 0.1}
    claims = paper_claims(table(fractions))
    assert claims.loc["volumes", "verdict"] == "agrees"
    assert (
        claims.loc["volumes", "measured"]
        == "DDPM: 20 % on slices of volumes, 10 % on independent images (mean over sizes)"
    )
