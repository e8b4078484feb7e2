"""Evaluation: the code sandbox, HumanEval and other benchmarks, keystrokes saved, the training-time eval hook."""
