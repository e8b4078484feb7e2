"""``python -m train --config configs/NAME.yaml [--set section.key=value ...]``: train a model.

``--check`` validates the config, including the mesh and batch checks for the devices this
process sees, prints it and exits: 0 when the run could start, 2 with a one-line error naming
the key and what it allows otherwise. Bad training data (a corrupt, truncated or empty shard, a
bad record) also ends a run with one line naming the file and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from train import config as C


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (e.g. configs/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config (also for the devices visible here), print it, and exit")
    return parser.parse_args(argv)


def check(cfg: C.Config) -> str:
    """The schedule check and the device-dependent checks for the devices this process sees;
    returns a summary line."""
    import jax  # only here: loading and validating a config needs no JAX

    from train.core.optimizer import check_schedule

    check_schedule(cfg.optimizer, cfg.schedule, cfg.train.max_steps)
    count = jax.device_count()
    data, fsdp, tensor = C.validate_for_devices(cfg, count)
    return (f"# ok for {count} {jax.default_backend()} device(s): mesh data={data} fsdp={fsdp} tensor={tensor}, "
            f"global batch {C.global_batch_size(cfg, count)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
        if args.check:
            summary = check(cfg)
            print(C.dump(cfg), end="")
            print(summary)
            return 0
        from train.run import train

        train(cfg)
    except C.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from train.core.loop import TrainingError  # a diverged run, or no checkpoint left to resume

        if not isinstance(err, TrainingError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        # Bad data found by the loader or the token cache build (a corrupt, truncated or empty
        # shard, a bad record): the message names the file (and line); anything else goes on up.
        from data_processing.shards import ShardError
        from data_processing.token_cache import TokenCacheError

        if not isinstance(err, (ShardError, TokenCacheError)):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
