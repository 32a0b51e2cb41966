"""Evaluation: bits per byte, reply ranking, samples, privacy probes, the lm-eval adapter and the report card.

`murmur.eval.runner.run_stage(settings, run_dir)` runs them all and writes eval/ and report/.
"""
