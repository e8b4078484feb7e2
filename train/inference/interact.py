"""Interactive completion prompt: ``python -m train.interact --run RUN_DIR | --hf HF_DIR``.

Type (or paste) code over several lines and end the input with an empty line; the model's
completion is printed after it. Commands on a line of their own:
``:temp 0.8`` (temperature; 0 = greedy), ``:len 64`` (new tokens), ``:top_p 0.95``,
``:seed 1``, ``:help``, ``:quit`` (or end of input).
"""

from __future__ import annotations

import argparse
import sys

from data_processing.tokens import EOS_TOKEN


def run(complete, settings: dict, read=input, write=print) -> None:
    """The prompt loop over ``complete(text, **settings) -> str``; ``read``/``write`` for tests."""
    buf: list[str] = []
    while True:
        try:
            line = read("... " if buf else ">>> ")
        except EOFError:
            line = None
        if line is not None and not buf and line.startswith(":"):
            cmd, _, arg = line[1:].partition(" ")
            try:
                if cmd in ("quit", "q", "exit"):
                    return
                if cmd == "help":
                    write(__doc__)
                elif cmd in ("temp", "temperature"):
                    settings["temperature"] = float(arg)
                elif cmd in ("len", "max_new_tokens"):
                    settings["max_new_tokens"] = int(arg)
                elif cmd == "top_p":
                    settings["top_p"] = float(arg)
                elif cmd == "seed":
                    settings["seed"] = int(arg)
                else:
                    write(f"unknown command :{cmd} (:help)")
                    continue
            except ValueError:
                write(f"bad value for :{cmd}: {arg!r}")
                continue
            write(f"[{', '.join(f'{k}={v}' for k, v in settings.items())}]")
            continue
        if line is None or (line == "" and buf):
            if buf:
                text = "\n".join(buf) + "\n"
                try:
                    write(text + complete(text, **settings))
                except ValueError as err:
                    write(f"error: {err}")
                buf = []
            if line is None:
                return
            continue
        buf.append(line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.interact", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run")
    src.add_argument("--hf")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from train.inference.decoding import generate_ids, load_model

    cfg, params, tok = load_model(args.run, args.hf)
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)

    def complete(text, *, temperature, max_new_tokens, top_p, seed):
        ids = tok.encode(text)[-(cfg.max_position_embeddings - max_new_tokens):]
        gen = generate_ids(cfg, params, [ids], max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, eos_id=eos)[0]
        return tok.decode([t for t in gen if t != eos])

    print(__doc__.split("\n\n", 1)[1], file=sys.stderr)
    run(complete, {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
                   "top_p": args.top_p, "seed": args.seed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
