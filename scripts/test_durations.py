"""Write tests/durations.json, each test module's seconds (setup, calls and teardown),
from a JUnit XML report: `make durations` runs the suite with one and calls this.

The suite's conftest starts the longest modules first (`--dist loadfile` hands whole
modules to the workers in collection order), so a long module never starts last
while the other worker idles. The figures only order the modules; nothing asserts them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "durations.json"


def module_of(classname: str) -> str:
    """`tests.unit.test_x` or `tests.unit.test_x.TestCase` -> `tests/unit/test_x.py`."""
    parts = classname.split(".")
    for end in range(len(parts), 0, -1):
        path = "/".join(parts[:end]) + ".py"
        if (ROOT / path).is_file():
            return path
    return "/".join(parts) + ".py"


def module_seconds(report: Path) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for case in ElementTree.parse(report).iter("testcase"):
        module = module_of(str(case.get("classname", "")))
        seconds[module] = seconds.get(module, 0.0) + float(case.get("time", "0"))
    return {module: round(s, 1) for module, s in sorted(seconds.items()) if s >= 1.0}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: test_durations.py JUNIT.xml", file=sys.stderr)
        return 2
    found = module_seconds(Path(argv[0]))
    OUT.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}: {len(found)} modules, {sum(found.values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
