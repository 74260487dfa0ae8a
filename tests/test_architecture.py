"""The import contracts of kv3d_core hold (``[tool.importlinter]`` in pyproject.toml).

``lint-imports`` builds the import graph of the ``kv3d_core`` in this checkout (it puts its
working directory first on ``sys.path``) and checks every contract: the serving layers
api -> engine -> prefix -> tiers -> kv -> contracts import only downwards, the serving core
imports no command or test helper, kv3d_core imports nothing of kv3d_tools (the tools'
plugin), and config sits over userconfig and plugins.
No model is loaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.is_file(), f"{lint} is missing: install the test extra (pip install -e '.[test]')"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lint-imports exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
