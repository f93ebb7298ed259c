"""Recompute a projection's rows from its saved timings and the bench results it was made from (no device
needed: the timings are the measurement, the rows are arithmetic). Rewrites projection.json/.md/.png in DIR.

    python scripts/reproject.py DIR/results.json DIR/projection.json
"""

import json
import sys
from pathlib import Path

from hf_accel.bench import project as bp

results, proj_path = (Path(a) for a in sys.argv[1:3])
methods = json.loads(results.read_text())["methods"]
proj = json.loads(proj_path.read_text())
tables, graphed = proj["forward_seconds"], proj.get("graphed_forward_seconds") or {}
proj["method"] = bp.PROJECTION_METHOD
proj["profiles"] = bp.profiles(methods, {"eager": tables["bench-model"], "graphed": graphed.get("bench-model")})
proj["rows"] = bp.project(proj["profiles"], tables, proj["weight_bytes"], proj["bandwidth_bytes_s"], graphed=graphed)
proj["recomputed_by"] = "python " + " ".join(sys.argv)
proj_path.write_text(json.dumps(proj, indent=1))
(proj_path.parent / "projection.md").write_text(bp.markdown(proj) + "\n")
bp.plot(proj, proj_path.parent)
print(bp.markdown(proj).split("| shape | prefix")[1])
