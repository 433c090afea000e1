"""Keras models in the style of the original DeepFault, shared by the Keras tests."""

from __future__ import annotations


def deepfault_mlp(keras):
    """DeepFault's MLPs: Dense without bias, then a separate LeakyReLU; softmax at the end
    (8x8x1 inputs, 10 classes, random weights of seed 1)."""
    L = keras.layers
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((8, 8, 1)), L.Flatten(name="flatten"),
        L.Dense(30, use_bias=False, name="dense_0"), L.LeakyReLU(name="leaky_0"),
        L.Dense(30, use_bias=False, name="dense_1"), L.LeakyReLU(name="leaky_1"),
        L.Dense(10, name="logits"), L.Activation("softmax", name="softmax"),
    ], name="mlp")  # fmt: skip
