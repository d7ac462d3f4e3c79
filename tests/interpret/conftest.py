import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/interpret must run with TRITON_INTERPRET=1 set before Triton is imported; "
                       "tests/test_interpret.py runs them that way")
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
