"""Several recipe runs in one torchrun launch (used by the multi-process recipe tests).

    torchrun --standalone --nproc_per_node=2 tests/dist_runs.py SPEC.json

SPEC: a list of {"recipe": "dit" | "tokenizer", "config": NAME, "set": [KEY=VALUE...], "out": DIR,
"resume": bool, "latents": DIR (dit) | "synthetic": N (tokenizer)}. The process group is kept across
the runs (a launch's group cannot be formed twice), so each run costs its training time only; the
recipes' own end (barrier, destroy) runs once, after the last run. ``faulthandler`` prints
every thread's Python stack should a rank abort.
"""
from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import vefast.recipes.distributed as recipe_dist
from vefast.recipes import dit, tokenizer
from vefast.recipes.config import load_config


def main(spec_file: str) -> int:
    faulthandler.enable()
    end_group = recipe_dist.cleanup
    recipe_dist.cleanup = lambda: None  # the recipes destroy the group at their end; keep it for the next run
    for run in json.loads(Path(spec_file).read_text()):
        if run["recipe"] == "dit":
            cfg = load_config(dit.DiTConfig, run["config"], run["set"])
            rc = dit.train(cfg, latents=Path(run["latents"]), out=Path(run["out"]), resume=run.get("resume", False),
                           progress=False)
        else:
            cfg = load_config(tokenizer.TokenizerConfig, run["config"], run["set"])
            rc = tokenizer.train(cfg, out=Path(run["out"]), synthetic=run["synthetic"], resume=run.get("resume", False),
                                 progress=False)
        if rc != 0:
            return rc
    end_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
