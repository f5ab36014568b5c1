"""Deprecated: the benchmark helpers were split by job; import them from their modules instead.

:mod:`.cli` (arguments, planning, the driver ``run_cli``), :mod:`.timing` (timers, budget),
:mod:`.inputs` (inputs, FLOP counts), :mod:`.implementations` (what is timed), :mod:`.io` (CSV rows,
``CaseRecorder``, formerly ``Recorder``). This module re-exports them for one release.
"""

from __future__ import annotations

import warnings

from .cli import *  # noqa: F401,F403
from .cli import DEFAULT_N, DTYPES, NO_CUDA_MESSAGE, TINY_N_CPU, TINY_N_CUDA, Config, Group  # noqa: F401
from .implementations import *  # noqa: F401,F403
from .inputs import *  # noqa: F401,F403
from .io import *  # noqa: F401,F403
from .io import COLUMNS, KEY, CaseRecorder
from .timing import *  # noqa: F401,F403

Recorder = CaseRecorder  # the old name

warnings.warn("cab_eval.benchmark.common is split into cli, timing, inputs, implementations and io; "
              "import from those (this module goes in the next release)", DeprecationWarning, stacklevel=2)
