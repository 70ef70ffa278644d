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


@pytest.mark.parametrize("seed", range(5))
def test_metrics_are_sklearns(seed):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    classes = rng.choice(10, size=rng.integers(1, 11), replace=False)  # some digits absent
    y_true, y_pred = rng.choice(classes, 200), rng.choice(classes, 200)
    y_pred[:120] = y_true[:120]
    m = classification_metrics(y_true, y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=range(10), zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=range(10)).tolist()
    for k in range(10):
        assert m["per_class"][str(k)] == pytest.approx(
            {"precision": precision[k], "recall": recall[k], "f1": f1[k], "support": support[k]})


def test_metrics_refuse_a_class_id_outside_the_ten_digits():
    with pytest.raises(ValueError, match="y_pred holds a class id outside 0..9"):
        classification_metrics([1, 2], [1, 10])


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


@pytest.mark.parametrize("kind", ["deep_cnn", "cnn"])
def test_trained_cnn_saves_and_loads_as_plain_keras(tmp_path, digits, kind):
    import tf_keras

    images, labels = digits
    model = compile_model(build_model(kind, augment=True), learning_rate=1e-3)
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


def test_deep_cnn_is_deottes_architecture():
    model = build_model("deep_cnn", dropout=0.4)
    convolutions = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert [(c.filters, c.kernel_size[0], c.strides[0]) for c in convolutions] == [
        (32, 3, 1), (32, 3, 1), (32, 5, 2), (64, 3, 1), (64, 3, 1), (64, 5, 2), (128, 4, 1)]
    assert [c.output_shape[1] for c in convolutions] == [26, 24, 12, 10, 8, 4, 1]
    assert sum(layer.__class__.__name__ == "BatchNormalization" for layer in model.layers) == 7
    assert {layer.rate for layer in model.layers if layer.__class__.__name__ == "Dropout"} == {0.4}


def test_one_cycle_rises_for_a_quarter_then_falls_to_almost_nothing():
    from mnist_ray.train.schedules import OneCycle

    schedule = OneCycle(peak=3e-3, total_steps=400, steps_per_epoch=40)
    rates = [schedule.rate(step) for step in range(400)]
    assert rates[0] == pytest.approx(3e-3 / 25)
    assert max(rates) == pytest.approx(3e-3, rel=1e-3) and rates.index(max(rates)) == 100
    assert all(a <= b for a, b in zip(rates[:100], rates[1:101], strict=True))
    assert all(a >= b for a, b in zip(rates[100:-1], rates[101:], strict=True))
    assert rates[-1] < 1e-5
