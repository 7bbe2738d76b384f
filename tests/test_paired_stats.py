"""benchmarks/paired_stats.py and generate_power.py: the prompt-count arithmetic behind the
README's "how many prompts the comparison needs" table (numpy only, synthetic runs)."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("paired_stats"), importlib.import_module("generate_power")
    finally:
        sys.path.remove(str(BENCH))


def _pair(n, seed=0, shift=0.3):
    rng = np.random.default_rng(seed)
    base = rng.poisson(3.0, n)
    return base + rng.normal(shift, 1.5, n).round().astype(int), base


def test_sizes_are_consistent(mods):
    stats, _ = mods
    acc, base = _pair(400)
    sd = stats.spread(acc, base)
    assert sd == pytest.approx(np.std(acc - base, ddof=1) / base.mean())
    hw = stats.halfwidth_pct(sd, 400)
    assert stats.halfwidth_pct(sd, 1600) == pytest.approx(hw / 2)  # 4x the prompts, half the width
    assert stats.prompts_for(sd, hw) in (400, 401)  # the inverse, up to the ceiling
    assert stats.detectable_pct(sd, 400) == pytest.approx(hw * (1.959964 + 0.841621) / 1.959964, rel=1e-4)


def test_normal_halfwidth_matches_the_bootstrap(mods):
    stats, _ = mods
    acc, base = _pair(2000, seed=3)
    lo, hi = stats.paired_interval(acc, base)
    # the bootstrap resamples the ratio of sums; the normal width is the difference over the base mean
    assert (hi - lo) / 2 == pytest.approx(stats.halfwidth_pct(stats.spread(acc, base), 2000), rel=0.15)


def test_power_rows_split_matches_at_the_first_miss(mods, tmp_path):
    _, power = mods
    n, new = 50, 8

    def row(system, store, seed):
        r = np.random.default_rng(seed)
        prefix = r.integers(0, 4, n)
        matches = prefix + r.integers(0, 3, n)
        return {"system": system, "datastore": store, "matches_per_prompt": matches.tolist(),
                "prefix_per_prompt": prefix.tolist(), "forced_hits_per_prompt": (matches + 2).tolist()}

    run = {"args": {"context": 16, "new_tokens": new, "model": "unused"}, "split_tokens": 16 + 100 * new + 5,
           "quality": [row("base LM", "–", 0), row("docs, auto", "docs", 1)]}
    rows = power.power_rows(run, run["split_tokens"])
    by = {r["measure"]: r for r in rows}
    assert set(by) == {"free-running matches", "before the first miss", "after the first miss", "fed the truth: top-1"}
    assert by["before the first miss"]["base"] + by["after the first miss"]["base"] == \
        by["free-running matches"]["base"]
    assert by["before the first miss"]["system_total"] + by["after the first miss"]["system_total"] == \
        by["free-running matches"]["system_total"]
    assert all(r["split_prompts"] == 100 and r["prompts"] == n for r in rows)
    assert all(r["split_halfwidth_pct"] < r["halfwidth_pct"] for r in rows)  # 100 prompts beat 50
    del run["quality"][1]["forced_hits_per_prompt"]
    assert "fed the truth: top-1" not in {r["measure"] for r in power.power_rows(run, run["split_tokens"])}

    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    out = subprocess.run([sys.executable, str(BENCH / "generate_power.py"), str(path), "--json"],
                         capture_output=True, text=True, cwd=BENCH)
    assert out.returncode == 0, out.stderr
    assert [r["measure"] for r in json.loads(out.stdout)][0] == "free-running matches"
    path.write_text("{}")
    bad = subprocess.run([sys.executable, str(BENCH / "generate_power.py"), str(path)], capture_output=True,
                         text=True, cwd=BENCH)
    assert bad.returncode != 0 and "no per-prompt quality counts" in bad.stderr and "Traceback" not in bad.stderr


def test_two_runs_pool_their_prompts_and_mismatched_runs_are_refused(mods, tmp_path):
    _, power = mods

    def run(seed, systems=("base LM", "docs, auto")):
        r = np.random.default_rng(seed)
        quality = []
        for i, system in enumerate(systems):
            prefix = r.integers(0, 3, 30)
            quality.append({"system": system, "datastore": "–" if i == 0 else "docs",
                            "matches_per_prompt": (prefix + r.integers(0, 3, 30)).tolist(),
                            "prefix_per_prompt": prefix.tolist()})
        return {"args": {"context": 16, "new_tokens": 8, "model": "unused", "split": "test"}, "split_tokens": 2000,
                "quality": quality}

    a, b = run(1), run(2)
    both = power.pooled([a, b], ["a", "b"])
    assert both["quality"][1]["matches_per_prompt"] == a["quality"][1]["matches_per_prompt"] + \
        b["quality"][1]["matches_per_prompt"]
    assert both["quality"][0]["forced_hits_per_prompt"] is None  # neither run fed the truth
    rows = {r["measure"]: r for r in power.power_rows(both, 2000)}
    assert rows["free-running matches"]["prompts"] == 60
    assert rows["free-running matches"]["base"] == sum(a["quality"][0]["matches_per_prompt"]) + \
        sum(b["quality"][0]["matches_per_prompt"])
    with pytest.raises(SystemExit, match="cannot pool"):
        power.pooled([a, run(3, ("base LM", "docs, fixed"))], ["a", "c"])
    paths = []
    for name, r in (("a.json", a), ("b.json", b)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(r))
    out = subprocess.run([sys.executable, str(BENCH / "generate_power.py"), *map(str, paths), "--json"],
                         capture_output=True, text=True, cwd=BENCH)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["prompts"] == 60
