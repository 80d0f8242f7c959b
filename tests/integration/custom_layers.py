"""A registered custom layer, imported by workers and the evaluator through `custom_modules`."""
import keras


@keras.saving.register_keras_serializable(package="notpu_tests")
class TemporalMix(keras.layers.Layer):
    """Learned weighted sums over the time axis: (batch, steps, features) → (batch, features, units)."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[1], self.units), initializer="glorot_uniform", name="kernel")

    def call(self, x):
        return keras.ops.einsum("bsf,su->bfu", x, self.kernel)

    def get_config(self):
        return {**super().get_config(), "units": self.units}
