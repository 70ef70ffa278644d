"""Online digit recognition with Ray Serve: the HTTP API, the application, the job, the drawing page.

* :mod:`~mnist_ray.serve.api` — what ``POST /predict`` accepts and answers, its errors (no Ray);
* :mod:`~mnist_ray.serve.app` — the deployment (onnxruntime, ``@serve.batch``), the model's
  resolution (``--model``) and the Serve settings that keep a replica from collapsing under load;
* :mod:`~mnist_ray.serve.job` — ``jobs/serve.py``: start, serve until SIGTERM/SIGINT, stop cleanly;
* ``page.html`` — the page served at ``GET /``: draw a digit, see the ten probabilities.

Nothing here imports TensorFlow: replicas load ``model.onnx`` with onnxruntime.
"""
