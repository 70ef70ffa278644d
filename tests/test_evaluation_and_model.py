"""Classification metrics and the Keras models (small arrays, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mnist_ray.evaluation import classification_metrics
from mnist_ray.model import MODEL_KINDS, build_model, compile_model

# --- classification_metrics ---------------------------------------------------------------------


def test_metrics_perfect_predictions():
    y = np.repeat(np.arange(10), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    m = classification_metrics(y, y.copy())
    assert m["count"] == len(y) and m["errors"] == 0
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == pytest.approx(1.0)
    cm = np.array(m["confusion_matrix"])
    np.testing.assert_array_equal(cm, np.diag([3, 1, 4, 1, 5, 9, 2, 6, 5, 3]))
    for k in range(10):
        assert m["per_class"][str(k)] == {
            "precision": 1.0,
            "recall": 1.0,
            "f1": 1.0,
            "support": int((y == k).sum()),
        }


def test_metrics_hand_computed_case():
    y_true = [0, 0, 0, 1, 1, 2, 9, 9]
    y_pred = [0, 0, 1, 1, 2, 2, 9, 0]
    m = classification_metrics(y_true, y_pred)
    assert m["count"] == 8 and m["errors"] == 3
    assert m["accuracy"] == pytest.approx(5 / 8)
    pc = m["per_class"]
    # class 0: predicted at 0, 1, 7 (two right); true at 0, 1, 2.
    assert pc["0"]["precision"] == pytest.approx(2 / 3) and pc["0"]["recall"] == pytest.approx(2 / 3)
    # class 1: predicted at 2, 3 (one right); true at 3, 4.
    assert pc["1"]["precision"] == pytest.approx(1 / 2) and pc["1"]["recall"] == pytest.approx(1 / 2)
    # class 2: predicted at 4, 5 (one right); true at 5.
    assert pc["2"]["precision"] == pytest.approx(1 / 2) and pc["2"]["recall"] == pytest.approx(1.0)
    assert pc["2"]["f1"] == pytest.approx(2 / 3)
    # class 9: predicted at 6 (right); true at 6, 7.
    assert pc["9"]["precision"] == pytest.approx(1.0) and pc["9"]["recall"] == pytest.approx(1 / 2)
    assert [pc[str(k)]["support"] for k in range(10)] == [3, 2, 1, 0, 0, 0, 0, 0, 0, 2]
    cm = m["confusion_matrix"]
    # [true][predicted]: a true 0 predicted as 1, a true 1 predicted as 2, a true 9 predicted as 0.
    assert cm[0][1] == 1 and cm[1][0] == 0
    assert cm[1][2] == 1 and cm[2][1] == 0
    assert cm[9][0] == 1 and cm[0][9] == 0
    assert cm[0][0] == 2 and cm[1][1] == 1 and cm[2][2] == 1 and cm[9][9] == 1
    assert np.array(cm).sum() == 8
    assert np.array(cm).sum(axis=1).tolist() == [pc[str(k)]["support"] for k in range(10)]


def test_metrics_macro_f1_ignores_classes_absent_from_the_sample():
    y = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    m = classification_metrics(y, y.copy())
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == pytest.approx(1.0)


def test_metrics_mismatched_lengths():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1, 2], [0, 1])


def test_metrics_are_json_serialisable():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 10, 200).astype(np.uint8)
    y_pred = np.where(rng.random(200) < 0.8, y_true, rng.integers(0, 10, 200)).astype(np.int64)
    m = classification_metrics(y_true, y_pred)
    assert json.loads(json.dumps(m, allow_nan=False)) == m
    assert m["accuracy"] == pytest.approx(float((y_true == y_pred).mean()))
    assert m["errors"] == int((y_true != y_pred).sum())


# --- models -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(mnist_arrays) -> tuple[np.ndarray, np.ndarray]:
    return mnist_arrays["x_train"][:512], mnist_arrays["y_train"][:512]


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_model_shapes_and_probabilities(kind, digits):
    model = build_model(kind)
    assert model.input_shape == (None, 28, 28)
    assert model.output_shape == (None, 10)
    x = digits[0][:16]
    assert x.dtype == np.uint8
    probs = model.predict(x, verbose=0)
    assert probs.shape == (16, 10) and probs.dtype == np.float32
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_unknown_model_kind():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")


def test_augmentation_only_in_training(digits):
    x = digits[0][:16]
    # mlp without dropout: apart from augmentation, training and inference compute the same thing.
    plain = build_model("mlp", dropout=0.0, augment=False)
    augmented = build_model("mlp", dropout=0.0, augment=True)
    augmented.set_weights(plain.get_weights())

    first = augmented(x, training=False).numpy()
    np.testing.assert_array_equal(first, augmented(x, training=False).numpy())
    np.testing.assert_allclose(first, plain(x, training=False).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(plain(x, training=True).numpy(), first, rtol=1e-6, atol=1e-7)
    assert np.abs(augmented(x, training=True).numpy() - first).max() > 1e-4


def test_trained_cnn_saves_and_loads_as_plain_keras(tmp_path, digits):
    import tf_keras

    images, labels = digits
    model = compile_model(build_model("cnn", augment=True), learning_rate=1e-3)
    before = model.predict(images[:64], verbose=0)
    history = model.fit(images, labels, epochs=1, batch_size=64, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = model.predict(images[:64], verbose=0)
    assert not np.allclose(before, after)

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = tf_keras.models.load_model(path, safe_mode=True)
    assert loaded.input_shape == (None, 28, 28)
    np.testing.assert_allclose(loaded.predict(images[:64], verbose=0), after, rtol=1e-5, atol=1e-6)
