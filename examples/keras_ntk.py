"""The empirical NTK of a Keras CNN, and which strategy computes it fastest.

    python examples/keras_ntk.py [--n 16] [--width 16] [--bridge]

Steps: build a small Keras CNN (TensorFlow backend, BatchNorm in inference mode); translate it to
JAX with `entk.from_tf` (tf2jax: trainable variables become `params`, BatchNorm statistics `state`);
compute its NTK from TF tensors with `entk.ntk` (a TF tensor comes back); print `entk.compare`'s
table of every strategy (FLOPs, peak memory, compile and run time, the one `auto` picks); hand the
kernel back to TensorFlow as a `tf.function` with `to_tf`. `--bridge` also compares bridge mode
(the model runs in TF through call_tf; JC and NTVP only).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import entk  # noqa: E402
from entk.adapters.tf import import_tensorflow, to_tf  # noqa: E402


def build_cnn(width: int, classes: int = 10):
    import keras

    layers = keras.layers
    inputs = keras.Input((16, 16, 3))
    h = layers.Conv2D(width, 3, padding="same")(inputs)
    h = layers.BatchNormalization()(h)
    h = layers.ReLU()(h)
    h = layers.MaxPooling2D()(h)
    h = layers.Conv2D(width, 3, padding="same", activation="relu")(h)
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, layers.Dense(classes)(h), name="small_cnn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="examples in x1 (x2 has half)")
    parser.add_argument("--width", type=int, default=16, help="channels per conv layer")
    parser.add_argument("--bridge", action="store_true", help="also compare bridge mode")
    args = parser.parse_args()

    tf = import_tensorflow()  # GPU memory growth on, so TF and JAX share the device
    import keras

    keras.utils.set_random_seed(0)
    model = build_cnn(args.width)
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((args.n, 16, 16, 3)).astype("float32")
    x2 = rng.standard_normal((max(args.n // 2, 1), 16, 16, 3)).astype("float32")

    start = time.perf_counter()
    converted = entk.from_tf(model, x1)
    print(f"translated {model.name} with {converted.info['mode']} in {time.perf_counter() - start:.2f} s: "
          f"{converted.info['param_count']:,} parameters in {len(converted.params)} arrays, "
          f"state {list(converted.state)}")

    kernel = entk.ntk(model, tf.constant(x1), tf.constant(x2))  # TF tensors in, a TF tensor out
    print(f"NTK: {type(kernel).__name__} of shape {tuple(kernel.shape)}, "
          f"mean entry {float(tf.reduce_mean(kernel)):.4g}")

    print("\nStrategies (translated model):")
    print(entk.compare(converted, x1, x2))

    if args.bridge:
        bridged = entk.from_tf(model, x1, mode="bridge")
        print("\nStrategies (bridge mode: the model runs in TensorFlow):")
        print(entk.compare(bridged, x1, x2))

    ntk_fn = entk.empirical_ntk_fn(converted)
    tf_kernel = to_tf(ntk_fn, converted.params)
    back = tf_kernel(tf.constant(x1), tf.constant(x2))
    error = float(np.max(np.abs(back.numpy() - kernel.numpy())))
    print(f"\nto_tf: the kernel as a tf.function; max |difference| to entk.ntk = {error:.2e}")


if __name__ == "__main__":
    main()
