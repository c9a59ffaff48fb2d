"""Reading a run imports no model stack: its status, metrics, labels, checkpoint, lineage and the
store of answers and ratings are read without torch, transformers, the session or the config's
registries (a fresh interpreter, its ``sys.modules`` looked at)."""

from __future__ import annotations

import json
import subprocess
import sys

from tunesmith.store import Run

READER = """
import json, sys
from tunesmith.store import Run, db
from tunesmith.store.aliases import read_aliases
from tunesmith.store.lineage import chain
run = Run(sys.argv[1], writer=False)
seen = {"status": run.status(), "metrics": run.load_json("metrics"), "labels": run.labels(),
        "checkpoint": run.has_checkpoint(), "chain": [str(r.path) for r in chain(run.path)]}
db.connect(sys.argv[2]).close()
heavy = ("torch", "transformers", "peft", "tunesmith.session", "tunesmith.config", "tunesmith.objectives")
print(json.dumps({"seen": seen, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def test_reading_a_run_loads_no_model_stack(tmp_path):
    run = Run(tmp_path / "run")
    run.set_status("complete")
    run.save_json("metrics", {"tuned": {"loss": 1.5}})
    run.save_json("labels", ["negative", "positive"])
    out = subprocess.run([sys.executable, "-c", READER, str(run.path), str(tmp_path / "store.sqlite")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["seen"] == {"status": "complete", "metrics": {"tuned": {"loss": 1.5}},
                              "labels": ["negative", "positive"], "checkpoint": False, "chain": [str(run.path)]}
    assert result["loaded"] == []
