"""The model lifecycle on MLflow: tracking, the model registry, and the promotion gate.

* :mod:`~mnist_ray.registry.tracking` — the store (``--tracking-uri``), and every training run,
  search (with its trials) and scoring batch as an MLflow run; logged by the job's driver, and
  never able to fail a job;
* :mod:`~mnist_ray.registry.versions` — registered versions of ``mnist-digits``, the aliases
  ``champion`` and ``challenger``, and :func:`~mnist_ray.registry.versions.resolve`, the one place a
  ``--model`` reference (a run directory, ``champion``, ``models:/…``) becomes model files;
* :mod:`~mnist_ray.registry.gate` — candidate against champion on one labelled gate set
  (onnxruntime, McNemar's test) and the decisions recorded on the registered model;
* :mod:`~mnist_ray.registry.job` — ``jobs/promote.py``: promote, refuse, force or roll back.

MLflow is imported only when a store is used: ``--help``, and scoring or serving a run
directory, never import it.
"""
