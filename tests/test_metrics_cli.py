"""python -m train.metrics: the evaluation summary the run scripts check."""

import json

from train.core.metrics import main


def _write(run, losses):
    run.mkdir()
    lines = [{"step": 0, "loss": 9.0}]
    lines += [{"step": 10 * i, "eval_loss": v, "perplexity": 2.0**v} for i, v in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_falling_loss_passes_and_prints_every_evaluation(tmp_path, capsys):
    _write(tmp_path / "r", [6.5, 6.1, 5.9])
    assert main(["--run", str(tmp_path / "r"), "--require-falling"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[-1].startswith("step    20: eval_loss 5.9000")


def test_flat_or_single_evaluation_fails_with_one_line(tmp_path, capsys):
    _write(tmp_path / "flat", [6.0, 6.2])
    assert main(["--run", str(tmp_path / "flat"), "--require-falling"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'flat'}: validation loss did not fall (2 evaluations)"
    _write(tmp_path / "one", [6.0])
    assert main(["--run", str(tmp_path / "one"), "--require-falling"]) == 1
    assert main(["--run", str(tmp_path / "one")]) == 0  # without the flag it only prints
