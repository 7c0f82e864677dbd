import sys
from pathlib import Path

# the zoo of test architectures is imported by several test modules
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture
def unguarded(monkeypatch: pytest.MonkeyPatch):
    """grow without its last guard: the rules alone decide what the grown model is, so a
    wrong rule fails the test on fresh inputs instead of being caught by the guard."""
    import importlib

    # the module, not the function of the same name that lemon_fx exports
    grow_module = importlib.import_module("lemon_fx.api")
    monkeypatch.setattr(grow_module, "check_on_example", lambda *args, **kwargs: [])
