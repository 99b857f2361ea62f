"""docs/recipes.md: the published recipes beside the shipped search spaces, generated from
docs/official_recipes.yaml and search_spaces/*.yaml; every difference explained, none stale."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import recipes  # noqa: E402


def test_recipes_md_is_generated_from_the_files():
    done = subprocess.run([sys.executable, "docs/recipes.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("recipe", recipes.load_recipes(), ids=lambda r: r["name"])
def test_every_difference_is_explained_and_every_explanation_is_of_a_difference(recipe):
    ours = recipes.shipped(recipe["space"])
    for key, entry in recipe["settings"].items():
        differs = not recipes.same(entry["official"], ours[key])
        assert differs == ("why" in entry), f"{recipe['name']}: {key} official {entry['official']!r} vs {ours[key]!r}"


def test_the_paco_ray_column_is_read_from_the_search_space(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "search_spaces").mkdir()
    config = (ROOT / "configs" / "cifar100_lt.yaml").read_text()
    (tmp_path / "configs" / "cifar100_lt.yaml").write_text(config.replace("alpha: 0.01 ", "alpha: 0.02 "))
    space = tmp_path / "search_spaces" / "cifar100_lt.yaml"
    space.write_text((ROOT / "search_spaces" / "cifar100_lt.yaml").read_text())
    real = recipes.shipped
    monkeypatch.setattr(recipes, "shipped", lambda name: real(name) if name != "cifar100_lt" else
                        recipes.flatten(recipes.load_space(space).full_config().to_dict()))
    cifar = next(r for r in recipes.load_recipes() if r["space"] == "cifar100_lt")
    alpha = next(row for row in recipes.rows(cifar) if row[0] == "`paco.alpha`")
    assert alpha[2] == "0.02" and alpha[3] == "UNEXPLAINED DIFFERENCE"
