"""On the suite's dry run only (bench/gpu/suite.py puts this folder on PYTHONPATH and sets SEMIPD_IMPORT_AUDIT):
every Python process of the run appends the top-level modules it imported to that file when it exits, so the dry
run can check that the GPU image plus the carried wheels hold all of them."""
import atexit
import os
import sys

_AUDIT = os.environ.get("SEMIPD_IMPORT_AUDIT")


def _record():
    with open(_AUDIT, "a") as f:
        f.write("\n".join(sorted({name.partition(".")[0] for name in list(sys.modules)})) + "\n")


if _AUDIT:
    atexit.register(_record)
