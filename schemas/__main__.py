"""python -m schemas export [--check]"""

from __future__ import annotations

import argparse
import sys

from schemas.export import drift, write


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m schemas", description="export JSON Schemas and the AsyncAPI document",
        epilog="example:\n  python -m schemas export --check",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write schemas/json/*.json and schemas/asyncapi.yaml")
    export.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the committed files drift from the models")
    args = parser.parse_args()
    if args.check:
        stale = drift()
        for name in stale:
            sys.stderr.write(f"drift: {name} differs from the models; "
                             "run `python -m schemas export` and commit\n")
        return 1 if stale else 0
    for path in write():
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
