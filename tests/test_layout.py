"""The layout rule that keeps the library usable from a notebook: sefe_core never imports Prefect."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import sefe_core


def test_sefe_core_does_not_import_prefect() -> None:
    modules = [f"sefe_core.{m.name}" for m in pkgutil.iter_modules(sefe_core.__path__)]
    assert {"sefe_core.train", "sefe_core.coin", "sefe_core.launch"} <= set(modules)
    code = "import importlib, sys\n"
    code += "".join(f"importlib.import_module({m!r})\n" for m in modules if m != "sefe_core.train_entry")
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))\n"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_design_citations_point_at_sections_that_exist() -> None:
    """The code cites docs/design.md by section (`docs/design.md §5`): each cited section is there."""
    import re

    root = Path(__file__).parents[1]
    headings = set(
        re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (root / "docs" / "design.md").read_text(), re.M)
    )
    assert {"1", "1.2", "5"} <= headings
    cited: dict[str, str] = {}
    for path in [*root.glob("*/**/*.py"), *root.glob("*.yaml"), *root.glob("configs/*.yaml")]:
        if ".venv" in path.parts:
            continue
        for m in re.finditer(r"design\.md (§[\d.]+(?:, §[\d.]+)*)", path.read_text()):
            for sec in re.findall(r"§(\d+(?:\.\d+)?)", m.group(1)):
                cited[sec.rstrip(".")] = str(path.relative_to(root))
    assert cited, "the code cites docs/design.md"
    missing = {s: p for s, p in cited.items() if s not in headings}
    assert not missing, missing
    old = "DESIGN" + ".md"  # the notes outside the repository the code used to cite
    assert not [p for p in root.glob("*/**/*.py") if ".venv" not in p.parts and old in p.read_text()]
