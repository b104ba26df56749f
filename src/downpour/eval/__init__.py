"""Evaluation of a trained run: the face-neuron test, linear probes, optimal stimuli and detection maps.

Each command reads a run with :func:`downpour.runs.load_run` and writes its results under ``RUN_DIR/eval/``.
"""
