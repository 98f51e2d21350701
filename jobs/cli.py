"""The `attrlab` command line: one entry point, subcommands registered explicitly."""
from __future__ import annotations

import argparse
import logging
import sys

from shards.format import ShardError


def build_parser() -> argparse.ArgumentParser:
    from bench import cli as bench_cli
    from cluster import submit as submit_cli
    from jobs import cli_train, index, latent, quickstart, report, tune
    from serve import cli as serve_cli
    from shards import cli as shards_cli

    p = argparse.ArgumentParser(prog="attrlab", description="visual-attribute models on a Ray cluster")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    shards_cli.add_parser(sub)
    cli_train.add_parsers(sub)
    report.add_parser(sub)
    index.add_parser(sub)
    latent.add_parser(sub)
    tune.add_parser(sub)
    serve_cli.add_parser(sub)
    quickstart.add_parser(sub)
    submit_cli.add_parsers(sub)
    bench_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ShardError as e:
        # user-fixable: one line naming the file/key/field, no traceback
        print(f"attrlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attrlab: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
