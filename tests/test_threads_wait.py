"""Idle OpenMP threads sleep instead of spinning by default (issue 16): with ranks x threads above
the cores, libgomp's default spinning at barriers let ranks spin-wait each other out (measured in
benchmarks/results/oversubscribed.txt). The policy must be in the environment before libgomp loads."""
import os
import subprocess
import sys

from ringattn import threads


def test_passive_unless_the_user_chose():
    env = {}
    assert threads.passive_wait_by_default(env) and env == {"OMP_WAIT_POLICY": "passive"}
    for chosen in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "100000"}):
        env = dict(chosen)
        assert not threads.passive_wait_by_default(env) and env == chosen


def _fresh(code, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**base, "OMP_NUM_THREADS": "1", **env})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()


CHECK = ("import os\n"
         "def gomp():\n"
         "    return any('gomp' in ln for ln in open('/proc/self/maps'))\n"
         "assert not gomp(), 'libgomp loaded before the kernels'\n"
         "import ringattn.kernels\n"
         "assert gomp()\n"
         "print(os.environ.get('OMP_WAIT_POLICY'))\n")


def test_the_kernels_module_sets_it_before_libgomp_loads():
    assert _fresh(CHECK) == "passive"
    assert _fresh(CHECK, OMP_WAIT_POLICY="active") == "active"
