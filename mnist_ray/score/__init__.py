"""Batch scoring, the nightly job, in the order a batch flows:

* :mod:`~mnist_ray.score.job` — one batch end to end;
* :mod:`~mnist_ray.score.inputs` — the inputs, hashed; which were scored before;
* :mod:`~mnist_ray.score.records` — CSV files → the record stream (its schema);
* :mod:`~mnist_ray.score.inference` — the model, loaded safely; records scored with Ray Data or here;
* :mod:`~mnist_ray.score.collect` — scored records → staged Parquet rows and counts;
* :mod:`~mnist_ray.score.summary` — the per-file record, the batch summary and its table;
* :mod:`~mnist_ray.score.output` — the output directory: Parquet layout, staging, publication,
  lock, manifest;
* :mod:`~mnist_ray.score.submission` — a Kaggle submission file.
* :mod:`~mnist_ray.score.audit` — an output directory checked against its manifest, after an incident.
"""
