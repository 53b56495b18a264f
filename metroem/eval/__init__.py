"""Evaluation: metrics, classical baselines, benchmark pairs and pictures.

See docs/evaluation.md. Submodules: :mod:`metrics`, :mod:`baselines`, :mod:`pairs`,
:mod:`report` and the ``metroem eval`` command in :mod:`cli`. Import them directly
(``from metroem.eval import metrics``); this package imports nothing heavy itself.
"""
