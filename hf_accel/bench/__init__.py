"""``hf-accel bench``: speed, memory and fidelity of every method against vanilla and HF's own accelerators.

See :mod:`hf_accel.bench.methods` for the method names, :mod:`hf_accel.bench.runner` for how runs are timed
and counted, :mod:`hf_accel.bench.report` for the outputs and :mod:`hf_accel.bench.project` for the scale
projection.
"""

from .methods import MethodSpec, parse
from .runner import Record, run_bench, run_once

__all__ = ["MethodSpec", "Record", "parse", "run_bench", "run_once"]
