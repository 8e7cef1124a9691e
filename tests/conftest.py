import sys
from pathlib import Path

# tests/oracles.py holds the reference implementations shared by the parity tests.
sys.path.insert(0, str(Path(__file__).parent))
