from __future__ import annotations

import subprocess
import sys

import turnstream


def test_all_is_sorted_and_importable() -> None:
    assert turnstream.__all__ == sorted(turnstream.__all__)
    for name in turnstream.__all__:
        assert getattr(turnstream, name) is not None, name


def test_public_objects_are_not_from_other_packages() -> None:
    for name in turnstream.__all__:
        module = getattr(getattr(turnstream, name), "__module__", "turnstream")
        assert module.startswith("turnstream"), (name, module)


def test_import_has_no_heavy_side_effects() -> None:
    # redis-py and the testing kit load only when used.
    code = (
        "import sys, turnstream; "
        "print('redis' in sys.modules, 'turnstream.testing' in sys.modules, "
        "'hypothesis' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]
