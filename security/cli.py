"""`python -m security` (`invoke scan`): run the checks, judge them, write and print the report.

Exit codes: 0 passed (checks that did not run are listed, never counted as passed),
1 policy violation, 2 a check broke or the policy file is invalid. Must not hold scan logic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from security import checks, policy, report
from security.targets import POLICY_FILE, REPO_ROOT, REPORTS_DIR, Targets


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m security", description=__doc__)
    ap.add_argument("--root", type=Path, default=REPO_ROOT, help="tree to scan")
    ap.add_argument("--policy", type=Path, default=POLICY_FILE, help="policy YAML")
    ap.add_argument("--reports", type=Path, default=REPORTS_DIR,
                    help="folder for scan-report.{json,md} and the SBOMs")
    ap.add_argument("--only", default="",
                    help=f"comma-separated checks (default all): {','.join(checks.NAMES)}")
    ap.add_argument("--offline", action="store_true",
                    help="skip checks that ask an online service (pip-audit); they show "
                         "as 'not run'")
    ap.add_argument("--image", default="", help="image for trivy-image (default "
                                                "$TOKENMETER_IMAGE or tokenmeter:latest)")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        pol = policy.load(args.policy)
        only = [x.strip() for x in args.only.split(",") if x.strip()]
        checks.select(only)
    except (policy.PolicyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    targets = Targets.for_root(args.root, image=args.image)
    results = checks.run_all(targets, args.reports, only=only, offline=args.offline)
    verdict = policy.evaluate(results, pol)
    paths = report.write(verdict, args.reports, targets.root)
    print(report.table(verdict))
    print()
    print(verdict.summary())
    print("report: " + ", ".join(str(p) for p in paths))
    for r in verdict.errors:
        print(f"error: {r.check}: {r.reason}", file=sys.stderr)
    return verdict.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
