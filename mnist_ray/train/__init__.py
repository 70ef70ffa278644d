"""Training: one run end to end (:mod:`~mnist_ray.train.job`) and the Ray Train worker loop
(:mod:`~mnist_ray.train.loop`)."""
