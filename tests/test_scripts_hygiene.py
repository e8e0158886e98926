"""scripts/ import the installed package, and no source file names a path of one particular machine."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a home or project folder of some machine; /tmp defaults of shell scripts are not machine-specific
MACHINE_PATH = re.compile(r"(?<![\w.$])/(work|home|root|Users)/")


def _sources(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((ROOT / f).rglob("*")) if p.suffix in (".py", ".sh", ".yaml")]


def test_scripts_do_not_edit_sys_path():
    offenders = [str(p.relative_to(ROOT)) for p in _sources("scripts")
                 if re.search(r"sys\.path\.(insert|append)|os\.environ\[.PYTHONPATH.\]", p.read_text())]
    assert offenders == []


def test_no_machine_specific_paths():
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in _sources("scripts", "ldm_train")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if MACHINE_PATH.search(line)]
    assert offenders == []
