"""The data contract and everything that reads data into it.

* :mod:`~mnist_ray.data.schema` — columns, shapes, ranges, ``DataValidationError``;
* :mod:`~mnist_ray.data.csv_files`, :mod:`~mnist_ray.data.csv_rules`,
  :mod:`~mnist_ray.data.csv_reader` — Kaggle CSV files: bytes and lines, the rules of
  header and values, the reader training and scoring share;
* :mod:`~mnist_ray.data.sources` — bundled MNIST, ``.npz``, Keras, CSVs → Ray Datasets;
* :mod:`~mnist_ray.data.splits` — seeded stratified train / validation / test splits.
"""
