"""Papers are cited by authors, year and arXiv id (docs/references.md), never as "the seed".

The source texts the formulas were taken from were once called "seeds" inside the project; a
reader of normlab has no such thing. This scans the package, the docs, the README, the
benchmarks and the tests for "seed" used as a citation ("filtered-BN seed eq. 4", "the seed's Fig. 3",
"(seed §3.2)") while leaving random seeds alone (``--seeds``, ``manual_seed``, "5 seeds",
"pairs by seed", ``seed: int``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "src", ROOT / "docs", ROOT / "README.md", ROOT / "benchmarks", ROOT / "tests"]
THIS = Path(__file__).resolve()  # its examples are citations on purpose
SUFFIXES = {".py", ".md", ".c", ".h", ".sh", ".txt", ".rst"}

_NAMES = r"(?:filtered[- ]?bn|frn|revisiting(?:[- ]bn)?|q&a|bn|classic[- ]bn|normali[sz]ation)"
_PARTS = r"(?:eqs?\.|eqn|equations?\b|§|figs?\.|figures?\b|tables?\b|appendix|sections?\b|alg)"
#: Each pattern is one way "seed" has been used to name a paper.
CITATION_PATTERNS = [
    rf"\b{_NAMES}[- ]seeds?\b",                       # "FRN seed", "the Q&A seed"
    rf"\bseeds?(?:'s|'|’s|’)?\s*\(?{_PARTS}",          # "seed eq. 23", "seed's Fig. 3", "seed (§II"
    r"\bseeds?(?:'s|'|’s|’)",                          # possessive: "the seed's arithmetic"
    r"shared/seeds",                                   # a path no user has
    r"\bseed[- ](?:style|experiments?|presets?)\b",    # "seed-style figures"
    r"\bthe seeds?\s*(?::|\)|,? (?:says?|uses?|used|compares?|reports?|ran|plots?|prepends?"
    r"|talks?|talk about|observes?|advises?|gives?|shows?|suggests?|measures?)\b)",
    r"\b(?:as|in|from|of) the seeds?\b(?! (?:value|of run|and the device))",
    r"(?<![\w.])\(\s*seed\s*\)",                         # "initialization (seed)", not f(seed)
    r"\|\s*seeds?\s*\|",                               # a table column "| seed |"
    r"(?<![\w.])\(seeds?: ",                             # "300 steps (seed: 1,000)", not f(seed: int)
]
CITATION = re.compile("|".join(f"(?:{p})" for p in CITATION_PATTERNS), re.IGNORECASE)


def _files():
    for place in SCANNED:
        if place.is_file():
            yield place
        elif place.is_dir():
            yield from sorted(p for p in place.rglob("*")
                              if p.is_file() and p.suffix in SUFFIXES
                              and "__pycache__" not in p.parts and p.resolve() != THIS)


def seed_citations(text: str) -> list[tuple[int, str]]:
    """``[(line number, line)]`` of the lines of ``text`` that use "seed" to cite a paper."""
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)
            if CITATION.search(line)]


def test_no_seed_citations():
    hits = [f"{path.relative_to(ROOT)}:{i}: {line}" for path in _files()
            for i, line in seed_citations(path.read_text(encoding="utf-8"))]
    assert not hits, ("cite papers by authors, year and arXiv id (keys in docs/references.md), "
                      "not as a 'seed':\n" + "\n".join(hits))


@pytest.mark.parametrize("line", [
    "Filtered batch normalization (filtered-BN seed, eq. 4–8).",
    "``ν² = 1/m Σ x²`` over ``dims`` (FRN seed eq. 1).",
    "σ_act (seed eq. 23)",
    "as in the seed's Fig. 3: the 5 largest values",
    "Distribution shape around a nonlinearity (the Q&A seed).",
    '"""Seed-style figures (matplotlib)."""',
    "| module | statistics | seed |",
    "name   tail   initialization (seed)",
    "The seed prepends a batch norm to the network",
    "default ``None`` = plain BN as the seed.",
    "300 steps each (the seed: 1,000)",
    "300 steps (seed: 1,000), 3 evaluations",
    "Drop-in modules for every normalization in the seeds.",
    "Statistics for comparisons, as the revisiting seed (§4.3) prescribes.",
    "the papers' own configurations of the seed presets",
])
def test_seed_citations_are_caught(line):
    assert seed_citations(line)


@pytest.mark.parametrize("line", [
    "torch.manual_seed(0)",
    "normlab compare --preset frn-batch-size --seeds 5",
    "def train_run(config: RunConfig, seed: int = 1, *, device=None):",
    "one-sided paired t-test by seed, p < 0.05 in **bold**",
    "Everything that determines a run's result, except the seed and the device.",
    "other methods are refused. The seeds may differ: more seeds extend the comparison.",
    "t-test over the seeds both have run (pairs by seed)",
    'artifacts = Path(out_dir) / "artifacts" / f"{h}-seed{seed}"',
    "| data | norm | seed 1 | seed 2 |",
    "MD5-derived random seeds and one-sided paired t-tests over 15 runs",
    "each process's shard, from their own seeded generator",
    "def iter_seeds(seeds: Iterable[int]) -> list[int]:",
    "seed: seed of the reservoirs' own generator (the global RNG is not used).",
    "gen = torch.Generator().manual_seed(seed)",
    "the run indices (seeds) and the baseline method",
    "if seeds == list(range(seeds[0], seeds[0] + len(seeds))):",
])
def test_random_seeds_are_not_citations(line):
    assert not seed_citations(line)
