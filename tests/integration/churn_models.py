"""`notpu train --model churn_models:NAME` builders: NAME(steps, features) returns a compiled Keras model."""
import keras


def _body(steps, features):
    x = keras.Input((steps, features))
    h = keras.layers.Conv1D(8, 3, activation="relu")(x)
    return x, keras.layers.GlobalAveragePooling1D()(h)


def sigmoid(steps, features):
    x, h = _body(steps, features)
    model = keras.Model(x, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model


def softmax(steps, features):
    x, h = _body(steps, features)
    model = keras.Model(x, keras.layers.Dense(2, activation="softmax")(h))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy())
    return model


def not_compiled(steps, features):
    x, h = _body(steps, features)
    return keras.Model(x, keras.layers.Dense(1, activation="sigmoid")(h))


def wrong_shape(steps, features):
    return sigmoid(steps + 1, features)


def regression(steps, features):
    x, h = _body(steps, features)
    model = keras.Model(x, keras.layers.Dense(1)(h))
    model.compile(optimizer="adam", loss="mse")
    return model


def nothing(steps, features):
    return None


def custom(steps, features):
    """A registered custom layer (custom_layers.TemporalMix): `notpu predict` must import its module to load it."""
    from custom_layers import TemporalMix

    x = keras.Input((steps, features))
    h = keras.layers.Flatten()(TemporalMix(2)(x))
    model = keras.Model(x, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model
