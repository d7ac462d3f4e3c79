import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# the interpreter suite runs in its own process (tests/test_interpret.py)
collect_ignore = ["interpret"]
