"""Hyperparameter search: the job (:mod:`~mnist_ray.tune.job`), Ray Tune over training runs
(:mod:`~mnist_ray.tune.search`) and a finished search's files (:mod:`~mnist_ray.tune.results`)."""
