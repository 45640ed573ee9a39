"""Prints how many of llama.cpp's server tests each server passed, and kvsnap's share of the
tests llama-server passes (issue 11's measure), from the two JUnit reports run.sh leaves.

    python3 tests/compat/count.py OUT_DIR
"""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(report: Path) -> dict[str, str]:
    """Test id -> passed / failed / error / skipped, from a pytest JUnit report."""
    result = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        result[test_id] = kinds[0] if kinds else "passed"
    return result


def main() -> int:
    out = Path(sys.argv[1])
    theirs = outcomes(out / "llama-server.xml")
    ours = outcomes(out / "kvsnap.xml")
    their_passes = {t for t, o in theirs.items() if o == "passed"}
    our_passes = {t for t, o in ours.items() if o == "passed"}
    both = their_passes & our_passes
    print(f"tests run: {len(theirs)} (llama-server), {len(ours)} (kvsnap)")
    print(f"llama-server passes {len(their_passes)}, kvsnap passes {len(our_passes)}")
    share = 100.0 * len(both) / len(their_passes) if their_passes else 0.0
    print(f"kvsnap passes {len(both)} of the {len(their_passes)} llama-server passes: {share:.1f}%")
    print("per file: llama-server passes, kvsnap passes of those")
    for name in sorted({test_id.split("::")[0] for test_id in theirs}):
        theirs_here = {t for t in their_passes if t.split("::")[0] == name}
        ours_here = theirs_here & our_passes
        share_here = 100.0 * len(ours_here) / len(theirs_here) if theirs_here else 100.0
        print(f"  {name}: {len(theirs_here)}, {len(ours_here)} ({share_here:.0f}%)")
    missing = sorted(their_passes - our_passes)
    if missing:
        print("passed by llama-server, not by kvsnap:")
        for test_id in missing:
            print(f"  {test_id} ({ours.get(test_id, 'not run')})")
    extra = sorted(our_passes - their_passes)
    if extra:
        print(f"passed by kvsnap, not by llama-server: {len(extra)}")
        for test_id in extra:
            print(f"  {test_id} ({theirs.get(test_id, 'not run')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
