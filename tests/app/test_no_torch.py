"""The dashboard starts where torch is absent: no app module imports it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_app_modules_never_import_torch():
    modules = ["app", "app.common", "app.data", "study.figures", "study.results",
               "study.analysis", "db.queries", "db.engine"]
    modules += [f"app.views.{p.stem}" for p in sorted((ROOT / "app" / "views").glob("*.py"))
                if p.stem != "__init__"]
    code = ("import importlib, runpy, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            # main.py as a module (its body runs under __main__ only)
            f"runpy.run_path({str(ROOT / 'app' / 'main.py')!r}, run_name='app_main')\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
            "print('ok', len(sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
