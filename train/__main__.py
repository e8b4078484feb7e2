"""``python -m train --config configs/NAME.yaml [--set section.key=value ...]``: train a model."""

from __future__ import annotations

import argparse
import sys

from train import config as C


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config file (e.g. configs/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--check", action="store_true", help="validate the config, print it, and exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
        if args.check:
            from train.core.optimizer import check_schedule

            check_schedule(cfg.optimizer, cfg.schedule, cfg.train.max_steps)
            print(C.dump(cfg), end="")
            return 0
        from train.run import train

        train(cfg)
    except C.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
