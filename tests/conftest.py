import sys
from pathlib import Path

# the zoo of test architectures is imported by several test modules
sys.path.insert(0, str(Path(__file__).parent))
