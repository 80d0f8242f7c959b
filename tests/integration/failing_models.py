"""Models that build, score and save but cannot train: every worker fails at its first step (for the tests of a
run that did not train). Imported by workers and the evaluator through `custom_modules`."""
import keras


@keras.saving.register_keras_serializable(package="notpu_tests")
class FailsInTraining(keras.layers.Layer):
    """The identity when predicting; raises when called in training (inside `train_on_batch`)."""

    def call(self, x, training=None):
        if training:
            raise ValueError("this layer refuses to train")
        return x


def build(steps, features):
    """`notpu train --model failing_models:build`."""
    x = keras.Input((steps, features))
    h = keras.layers.Flatten()(FailsInTraining()(x))
    model = keras.Model(x, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model
