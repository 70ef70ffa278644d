"""Write MNIST arrays as Kaggle "Digit Recognizer" CSV files, to try the CSV paths.

    python jobs/export_csv.py --output-dir data/kaggle [--data bundled|FILE.npz] [--gzip]

writes ``train.csv`` (label + pixels, the 60,000 training images),
``test.csv`` (pixels only, the 10,000 test images, as Kaggle's file to score)
and ``test_labelled.csv`` (the same test images with their labels).
"""

import argparse
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package is not installed, only uploaded.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_ray.data.csv_reader import write_kaggle_csv  # noqa: E402
from mnist_ray.data.sources import BUNDLED_MNIST, load_npz  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--data", default="bundled", help="'bundled' or an MNIST-layout .npz")
    parser.add_argument("--gzip", action="store_true", help="write .csv.gz files")
    args = parser.parse_args()
    arrays = load_npz(BUNDLED_MNIST if args.data == "bundled" else args.data)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".csv.gz" if args.gzip else ".csv"
    outputs = {
        "train": (arrays["x_train"], arrays["y_train"]),
        "test": (arrays["x_test"], None),
        "test_labelled": (arrays["x_test"], arrays["y_test"]),
    }
    for name, (images, labels) in outputs.items():
        path = args.output_dir / f"{name}{suffix}"
        write_kaggle_csv(path, images, labels)
        print(f"{path}: {len(images):,} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
