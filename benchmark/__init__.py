"""fewstep-bench: a benchmark suite that compares few-step generators fairly."""

import os

# OpenMP threads that spin while waiting turn a busy CPU (other jobs, parallel local
# workers) into a 5-10x slowdown for these small models; sleeping threads degrade gently.
# Set before torch is imported anywhere in the suite; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
